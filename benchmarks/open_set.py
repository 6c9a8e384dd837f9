"""Calibration and out-of-scope rejection, measured as Larson et al. (2019) report CLINC150: in-scope
accuracy with and without refusals, out-of-scope recall and precision, AUROC of the rejection score,
and expected calibration error (15 bins) before and after the temperature. Nothing here is tuned on
the test data: the temperature and the threshold come from each support set alone.

    python benchmarks/open_set.py --text-checkpoint runs/methods/clinc150-protonet \
        --image-checkpoint runs/quickstart [--seeds 3] [--json out.json]

Text: CLINC150, all 150 intents at 5 and 10 shots (support drawn from the train split with each seed),
the whole test split plus its 1,000 out-of-scope queries, for each rejection score (distance,
similarity, probability) and in-scope refusal budget (--reject-rate 0.03, 0.05); and the three
held-out CLINC150 domains.
Images: Omniglot's 423 test characters (never seen in meta-training), episodes of 20 known characters
at 5 shots with 20 other characters' drawings as the unknowns; calibration on 5-way episodes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtl.data.registry import Registry
from mtl.device import cpu_name
from mtl.run.adapt import adapt, fit
from mtl.run.evaluate import evaluate, mean_ci
from mtl.run.learner import load_learner
from mtl.run.openset import open_set_on_tasks, open_set_report
from mtl.run.support import support_from_arrays

KEYS = ("in_scope_accuracy", "in_scope_accuracy_with_rejection", "in_scope_refused", "oos_recall", "oos_precision",
        "auroc")



def summary(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for k in keys:
        m, ci = mean_ci([r[k] for r in rows])
        out[k] = f"{m:.4f} +/- {ci:.4f}" if np.isfinite(ci) else f"{m:.4f}"
    return out


SETTINGS = (("distance", 0.03), ("distance", 0.05), ("similarity", 0.05), ("probability", 0.05))


def text(checkpoint: str, seeds: int, registry: Registry) -> dict[str, Any]:
    learner, _ = load_learner(Path(checkpoint), torch.device("cpu"), hold_text=True)
    known, unknown = registry.load("clinc150"), registry.load("clinc150-oos")
    result: dict[str, Any] = {}
    for shots in (5, 10):
        for score, rate in SETTINGS:
            rows = []
            for seed in range(seeds):
                t0 = time.perf_counter()
                m = adapt(learner, known, shots=shots, seed=seed, reject_by=score, reject_rate=rate)
                r = {**open_set_on_tasks(m, known, unknown), "ece_uncalibrated": m.meta["test_ece_uncalibrated"],
                     "ece_calibrated": m.meta["test_ece"], "temperature": m.meta["calibration"]["temperature"],
                     "seconds": time.perf_counter() - t0}
                rows.append(r)
                print(f"clinc150 {shots}-shot, --reject-by {score} --reject-rate {rate}, seed {seed}: "
                      + ", ".join(f"{k} {r[k]:.4f}" for k in KEYS), flush=True)
            keys = (*KEYS, "ece_uncalibrated", "ece_calibrated", "seconds")
            result[f"clinc150 {shots}-shot, --reject-by {score} --reject-rate {rate}"] = summary(rows, keys)
    for domain in ("kitchen-and-dining", "travel", "work"):
        task = registry.load(f"clinc150-{domain}")
        for shots in (5, 10):
            rows = []
            for seed in range(seeds):
                m = adapt(learner, task, shots=shots, seed=seed)
                rows.append({"accuracy": m.meta["test_accuracy"], "ece_uncalibrated": m.meta["test_ece_uncalibrated"],
                             "ece_calibrated": m.meta["test_ece"]})
            result[f"clinc150-{domain} {shots}-shot"] = summary(rows, ("accuracy", "ece_uncalibrated",
                                                                       "ece_calibrated"))
            print(f"clinc150-{domain} {shots}-shot: {result[f'clinc150-{domain} {shots}-shot']}", flush=True)
    return result


def images(checkpoint: str, episodes: int, registry: Registry) -> dict[str, Any]:
    learner, _ = load_learner(Path(checkpoint), torch.device("cpu"))
    task = registry.load("omniglot")
    test = task.test
    chars = np.unique(test.labels)
    rng = np.random.default_rng(0)
    rows = []
    for e in range(episodes):
        picked = rng.choice(chars, 40, replace=False)
        known, other = picked[:20], picked[20:]
        sx, sy, qx, qy = [], [], [], []
        for i, c in enumerate(known):
            members = rng.permutation(np.flatnonzero(test.labels == c))
            sx += list(test.inputs[members[:5]])
            sy += [str(i)] * 5
            qx += list(test.inputs[members[5:]])
            qy += [i] * (len(members) - 5)
        unknown = test.inputs[np.isin(test.labels, other)]
        support = support_from_arrays(np.stack(sx), sy, "image", task.spec.image_options, "omniglot")
        m = fit(learner, support)
        order = [int(c) for c in m.classes]  # classes are sorted as strings
        remap = {c: i for i, c in enumerate(order)}
        r = open_set_report(m, np.stack(qx), np.asarray([remap[y] for y in qy]), unknown, cached=False)
        rows.append(r)
        print(f"omniglot open-set episode {e}: " + ", ".join(f"{k} {r[k]:.4f}" for k in KEYS), flush=True)
    out: dict[str, Any] = {"omniglot 20 known x 5 shots, 20 unknown characters": summary(rows, KEYS)}
    for ways, shots in ((5, 1), (5, 5), (20, 1)):
        info = evaluate(checkpoint, task, ways, shots, 15, 300, registry=registry, device="cpu")
        out[f"omniglot {ways}-way {shots}-shot"] = {k: info[k] for k in ("accuracy", "ci95", "ece_uncalibrated",
                                                                          "ece", "temperature")}
        print(f"omniglot {ways}-way {shots}-shot: {out[f'omniglot {ways}-way {shots}-shot']}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text-checkpoint")
    p.add_argument("--image-checkpoint")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    registry = Registry()
    result: dict[str, Any] = {"cpu": cpu_name(), "threads": torch.get_num_threads()}
    if a.text_checkpoint:
        result["text"] = text(a.text_checkpoint, a.seeds, registry)
    if a.image_checkpoint:
        result["images"] = images(a.image_checkpoint, a.episodes, registry)
    print(json.dumps(result, indent=1))
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
