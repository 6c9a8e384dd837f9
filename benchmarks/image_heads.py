#!/usr/bin/env python3
"""The logistic-regression head for images (``adapt``'s default since stop 38) against the rule before it:
the algorithm's own adaptation or 10 steps at a grid step size, chosen by cross-validation on the support set
(2 or more shots per class), or the setting stored at the end of training (1 shot). All classes, K shots per
class from the train split, the whole test split, support draws 0..S-1. With ``--episodes N``, also N fixed
episodes of ``--episode-task``'s test split (the training domain), scored both ways.

    python cli.py train --config configs/quickstart.yaml --out runs/quickstart
    python benchmarks/image_heads.py --checkpoint runs/quickstart --tasks digits:3,mnist:5,olivetti:3,mnist:1 \\
        --episodes 200
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from mtl.data.registry import Registry
from mtl.device import cpu_name
from mtl.run.adapt import adapt, fit, score_on_task
from mtl.run.adapted import model_inputs
from mtl.run.evaluate import evaluate
from mtl.run.learner import load_learner
from mtl.run.select import candidates, choose, support_folds
from mtl.run.support import support_from_task


def before(learner, meta, task, shots: int, seed: int) -> float:  # type: ignore[no-untyped-def]
    """Test accuracy under the rule before the logistic head."""
    support = support_from_task(task, shots, seed)
    stored = meta.get("adaptation")
    if shots >= 2:
        xs = model_inputs(support.inputs, learner.model, "image", torch.device("cpu"))
        folds = support_folds(support.task, "image", xs, torch.as_tensor(support.labels))
        s, _ = choose(learner, folds, candidates(learner, stored))
        steps, lr = s.steps, s.lr
    else:
        steps, lr = int(stored["steps"]), stored.get("lr")
    model = fit(learner, support, steps, lr, seed=seed, stored=stored)  # given: no second choice inside
    return float(score_on_task(model, task)["test_accuracy"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="an image run folder of cli.py train")
    p.add_argument("--tasks", default="digits:3,mnist:5,olivetti:3", help="comma-separated task:shots")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--episodes", type=int, default=0, help="fixed episodes of the training domain, scored both ways")
    p.add_argument("--episode-task", default="omniglot")
    a = p.parse_args()
    torch.set_num_threads(2)
    registry = Registry()
    learner, meta = load_learner(Path(a.checkpoint), torch.device("cpu"))
    rows = []
    for item in a.tasks.split(","):
        name, shots = item.split(":")
        task = registry.load(name)
        old = [before(learner, meta, task, int(shots), s) for s in range(a.seeds)]
        new = [adapt(learner, task, shots=int(shots), seed=s, views=1).meta["test_accuracy"] for s in range(a.seeds)]
        gain = round(100 * float(np.mean(new) - np.mean(old)), 2)
        rows.append({"task": name, "shots": int(shots), "before": [round(100 * x, 2) for x in old],
                     "logistic": [round(100 * x, 2) for x in new], "gain": gain})
        print(json.dumps(rows[-1]), flush=True)
    for ways, shots in ((5, 1), (20, 1), (5, 5)) if a.episodes else ():  # evaluate: the same fixed episodes
        own, lg = (evaluate(a.checkpoint, a.episode_task, ways, shots, episodes=a.episodes, device="cpu", **kw)
                   for kw in ({}, {"steps": 0, "head_init": "logistic"}))
        rows.append({"task": a.episode_task, "ways": ways, "shots": shots, "episodes": a.episodes,
                     "own": round(100 * own["accuracy"], 2), "logistic": round(100 * lg["accuracy"], 2)})
        print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"cpu": cpu_name(), "checkpoint": a.checkpoint, "results": rows}))


if __name__ == "__main__":
    main()
