#!/usr/bin/env python3
"""What unlabeled inputs add to ``adapt`` (``adapt --select`` for text): each task's train split, labels
dropped, as the unlabeled inputs of ``adapt --unlabeled`` (mtl.run.self_training), against the same
adaptation without them. All classes, K shots per class from the train split, the whole test split,
support draws 0..S-1.

This is semi-supervised: the few-shot figures elsewhere (docs/BENCHMARKS.md) use the labelled
examples alone, and published few-shot results mostly do too.

    python cli.py train --config configs/clinc150.yaml --out runs/clinc
    python benchmarks/self_training.py --checkpoint runs/clinc --tasks banking77:10,banking77:5 --seeds 3
    python benchmarks/self_training.py --checkpoint runs/clinc --tasks banking77:10 --plain   # text: plain adapt
    python cli.py train --config configs/quickstart.yaml --out runs/quickstart
    python benchmarks/self_training.py --checkpoint runs/quickstart --tasks mnist:5,olivetti:3 --seeds 3
    python benchmarks/self_training.py --checkpoint runs/quickstart --tasks mnist:5 --per-class 10
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from mtl.data.registry import Registry
from mtl.device import cpu_name
from mtl.run.adapt import adapt, score_on_task
from mtl.run.evaluate import mean_ci
from mtl.run.self_training import self_train
from mtl.run.support import support_from_task


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a run folder of cli.py train")
    p.add_argument("--tasks", default="banking77:10", help="comma-separated task:shots")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--per-class", type=int, default=0,
                   help="cut the pool to this many inputs of each class (drawn with seed 100 + the draw's)")
    p.add_argument("--plain", action="store_true", help="text: plain adapt (its default), not adapt --select")
    p.add_argument("--views", type=int, default=1,
                   help="images: views adapted to (1 as measured in stop 38; 8, adapt's default since stop 41)")
    a = p.parse_args()
    torch.set_num_threads(2)
    registry, summary = Registry(), []
    for item in a.tasks.split(","):
        name, shots = item.split(":")
        task = registry.load(name)
        base = "select" if task.modality == "text" and not a.plain else "adapt"
        runs: dict[str, list[float]] = {base: [], f"{base}+unlabeled": []}
        for seed in range(a.seeds):
            t0 = time.perf_counter()
            model = adapt(a.checkpoint, task, shots=int(shots), seed=seed, select=base == "select", device="cpu",
                          views=a.views)
            t1 = time.perf_counter()
            runs[base].append(model.meta["test_accuracy"])
            pool = task.train.inputs
            if a.per_class:  # a smaller pool: how little still helps
                rng, labels = np.random.default_rng(100 + seed), task.train.labels
                pool = pool[np.concatenate([rng.choice(np.flatnonzero(labels == c), a.per_class, replace=False)
                                            for c in np.unique(labels)])]
            model = self_train(model, support_from_task(task, int(shots), seed), pool, seed)
            t2 = time.perf_counter()
            runs[f"{base}+unlabeled"].append(score_on_task(model, task)["test_accuracy"])
            print(json.dumps({"task": name, "shots": int(shots), "seed": seed,
                              **{k: round(100 * v[-1], 2) for k, v in runs.items()},
                              "self_training": model.meta["self_training"], "adapt_seconds": round(t1 - t0, 1),
                              "self_training_seconds": round(t2 - t1, 1)}), flush=True)
        for method, accs in runs.items():
            mean, ci = mean_ci(accs)
            summary.append({"task": name, "shots": int(shots), "method": method, "mean": round(100 * mean, 2),
                            "ci95": round(100 * ci, 2), "runs": [round(100 * x, 2) for x in accs]})
        gain = np.subtract(runs[f"{base}+unlabeled"], runs[base])
        summary.append({"task": name, "shots": int(shots), "method": "gain (points)",
                        "mean": round(100 * float(gain.mean()), 2), "runs": [round(100 * g, 2) for g in gain]})
    print(json.dumps({"cpu": cpu_name(), "checkpoint": a.checkpoint, "results": summary}, indent=1))


if __name__ == "__main__":
    main()
