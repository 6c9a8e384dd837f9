#!/usr/bin/env python3
"""``adapt``'s views for images: the support set adapted to as it is (1 view), with its rotations by 90
degrees (4) and their mirror images too (8, the default), each view answering the same view of a test
image and the views' mean log-probability the answer (:mod:`mtl.data.views`). All classes, K shots per class
from the train split, the whole test split, support draws 0..S-1; accuracy, calibration error after the
fitted temperature, and the seconds ``adapt`` took (scoring the test split included). ``--norms shared,own``
also sets the views' batch-norm statistics both ways (:mod:`mtl.run.view_norms`): each setting's row then holds
``V views`` (shared, the default) and ``V views own``.

    python cli.py train --config configs/quickstart.yaml --out runs/quickstart
    python benchmarks/image_views.py --checkpoint runs/quickstart \\
        --tasks mnist:1,mnist:5,digits:1,digits:5,olivetti:1,olivetti:3
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from mtl.data.registry import Registry
from mtl.device import cpu_name
from mtl.run.adapt import adapt


def label(views: int, norms: str) -> str:
    return f"{views} views" + (" own" if norms == "own" else "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="an image run folder of cli.py train")
    p.add_argument("--tasks", default="mnist:5,digits:5,olivetti:3", help="comma-separated task:shots")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--views", default="1,8", help="comma-separated numbers of views (1, 4, 8)")
    p.add_argument("--norms", default="shared", help="the views' batch-norm statistics: shared, own or both")
    a = p.parse_args()
    torch.set_num_threads(2)
    registry = Registry()
    counts = [int(v) for v in a.views.split(",")]
    kinds = list(dict.fromkeys((v, n if v > 1 else "shared") for v in counts for n in a.norms.split(",")))
    rows = []
    for item in a.tasks.split(","):
        name, shots = item.split(":")
        task = registry.load(name)
        row: dict[str, object] = {"task": name, "shots": int(shots)}
        for views, norms in kinds:
            acc, ece, secs = [], [], []
            for seed in range(a.seeds):
                t0 = time.perf_counter()
                m = adapt(a.checkpoint, task, shots=int(shots), seed=seed, views=views, device="cpu",
                          shared_norms=norms == "shared")
                secs.append(time.perf_counter() - t0)
                acc.append(100 * m.meta["test_accuracy"])
                ece.append(m.meta["test_ece"])
            row[label(views, norms)] = {"accuracy": round(float(np.mean(acc)), 2), "draws": [round(x, 2) for x in acc],
                                        "ece": round(float(np.mean(ece)), 3), "seconds": round(float(np.mean(secs)), 1)}
        first = row[label(*kinds[0])]["draws"]  # type: ignore[index]
        for views, norms in kinds[1:]:
            draws = row[label(views, norms)]["draws"]  # type: ignore[index]
            row[f"gain {label(views, norms)}"] = {"mean": round(float(np.mean(draws) - np.mean(first)), 2),
                                    "ahead": int(sum(b > f for f, b in zip(first, draws, strict=True)))}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps({"cpu": cpu_name(), "checkpoint": a.checkpoint, "results": rows}))


if __name__ == "__main__":
    main()
