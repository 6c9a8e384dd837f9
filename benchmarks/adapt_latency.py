#!/usr/bin/env python3
"""Wall time (process start-up included) and peak memory of ``cli.py adapt`` on a 5-shot text task.

Needs a text checkpoint (e.g. from ``python cli.py train --config configs/clinc150.yaml --out runs/clinc``).
Runs the command ``--repeats`` times after one warm-up (which fills the embedding cache) and prints
one JSON line with the median wall time and the largest peak resident memory of the timed runs.

    python benchmarks/adapt_latency.py --checkpoint runs/clinc --task clinc150-travel
"""

from __future__ import annotations

import argparse
import json
import os
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
    ap.add_argument("--meta-only", action="store_true", help="adapt --meta-only: no probe weighed (before stop 39)")
    a = ap.parse_args()
    times, peaks = [], []
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(ROOT / "cli.py"), "adapt", "--task", a.task, "--checkpoint", a.checkpoint,
               "--shots", str(a.shots), "--out", tmp, "--device", "cpu", "--json", *(["--meta-only"] * a.meta_only)]
        for i in range(a.repeats + 1):
            with tempfile.TemporaryFile("w+") as err:
                t0 = time.perf_counter()
                proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
                out = proc.stdout.read()  # type: ignore[union-attr]
                _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak, not the warm-up's
                wall = time.perf_counter() - t0
                if os.waitstatus_to_exitcode(status) != 0:
                    err.seek(0)
                    sys.exit(err.read())
            if i == 0:
                continue  # warm-up: fills the embedding cache
            times.append(wall)
            peaks.append(usage.ru_maxrss / 1024)
            result = json.loads(out)
    print(json.dumps({"task": a.task, "shots": a.shots, "wall_s_median": round(statistics.median(times), 3),
                      "wall_s_max": round(max(times), 3), "peak_rss_mb": round(max(peaks)),
                      "test_accuracy": result["test_accuracy"], "repeats": a.repeats}))


if __name__ == "__main__":
    main()
