#!/usr/bin/env python3
"""Wall time (process start-up included) and peak memory of ``cli.py adapt`` on a 5-shot text task.

Needs a text checkpoint (e.g. from ``python cli.py train --config configs/clinc150.yaml --out runs/clinc``).
Runs the command ``--repeats`` times after one warm-up (which fills the embedding cache) and prints
one JSON line with the median wall time and the peak resident memory of the child process.

    python benchmarks/adapt_latency.py --checkpoint runs/clinc --task clinc150-travel
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--task", default="clinc150-travel")
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    times, peaks = [], []
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(ROOT / "cli.py"), "adapt", "--task", a.task, "--checkpoint", a.checkpoint,
               "--shots", str(a.shots), "--out", tmp, "--device", "cpu", "--json"]
        for i in range(a.repeats + 1):
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                sys.exit(proc.stderr)
            if i == 0:
                continue  # warm-up: fills the embedding cache
            times.append(wall)
            result = json.loads(proc.stdout)
        peaks.append(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
    print(json.dumps({"task": a.task, "shots": a.shots, "wall_s_median": round(statistics.median(times), 3),
                      "wall_s_max": round(max(times), 3), "peak_rss_mb": round(max(peaks)),
                      "test_accuracy": result["test_accuracy"], "repeats": a.repeats}))


if __name__ == "__main__":
    main()
