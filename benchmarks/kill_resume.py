#!/usr/bin/env python3
"""SIGKILL a training run at random moments, then check that what it left is never corrupt and that
``--resume`` reaches exactly the parameters of an uninterrupted run with the same seed.

    python benchmarks/kill_resume.py --trials 20

Prints one JSON line per trial and a summary line.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mtl.run.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
RECIPE = """\
method: maml
tasks: [omniglot-latin]
ways: 5
shots: 1
queries: 2
meta_batch: 2
iterations: 12
val_every: 1
outer_lr: 0.003
inner: {steps: 1, lr: 0.4}
threads: 1
device: cpu
"""


def params(path: Path) -> dict[str, torch.Tensor]:
    tensors, _ = load_checkpoint(path)
    return {k: v for k, v in tensors.items() if k.startswith("learner.")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmpd = Path(tmp)
        cfg = tmpd / "recipe.yaml"
        cfg.write_text(RECIPE)
        cmd = [sys.executable, str(ROOT / "cli.py"), "train", "--config", str(cfg), "--json"]
        t0 = time.perf_counter()
        subprocess.run([*cmd, "--out", str(tmpd / "ref")], check=True, capture_output=True)
        full_time = time.perf_counter() - t0
        ref = params(tmpd / "ref" / "last.safetensors")
        ok = 0
        for trial in range(a.trials):
            out = tmpd / f"t{trial}"
            proc = subprocess.Popen([*cmd, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            delay = rng.uniform(0.3 * full_time, 0.95 * full_time)
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            last = out / "last.safetensors"
            state = "absent"
            if last.exists():
                load_checkpoint(last)  # raises if corrupt or half-written
                state = "valid"
            leftovers = [p.name for p in out.glob(".*.tmp")] if out.exists() else []
            resume = ["--resume"] if last.exists() else []
            if out.exists() and not last.exists():  # killed before the first checkpoint: start over
                for p in out.iterdir():
                    p.unlink()
            subprocess.run([*cmd, "--out", str(out), *resume], check=True, capture_output=True)
            got = params(last)
            same = got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
            ok += same
            print(json.dumps({"trial": trial, "killed_after_s": round(delay, 2), "checkpoint": state,
                              "temp_files_left": len(leftovers), "resumed_equals_uninterrupted": same}), flush=True)
        print(json.dumps({"trials": a.trials, "identical_after_resume": ok, "corrupt_checkpoints": 0}))
        if ok != a.trials:
            sys.exit(1)


if __name__ == "__main__":
    main()
