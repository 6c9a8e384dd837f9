#!/usr/bin/env python3
"""Should ``adapt --select`` choose its mix's weights on the support set itself, by cross-validation?

The right shares of the voices depend on the encoder (benchmarks/ensemble_weights.py: with
all-MiniLM-L6-v2 fine-tuning should weigh most, with all-mpnet-base-v2 the fine-tuned encoder's token
matching). Weights chosen on the few labelled examples would follow the encoder, and the task, with no
table of encoders. This script measures whether they do better than the fixed weights on tasks whose
test splits chose nothing.

For each task and support draw it fits the four voices (``linear_probe``, ``finetune``, ``tokens``,
``tuned_tokens``) on the support set's folds exactly as ``select`` does (:mod:`mtl.run.alternatives`'s
``fold_indices``, ``cross_validate``, ``cross_validate_probe``, ``cross_validate_tokens``) and keeps
their out-of-fold logits under ``--cache``; the same voices' test-split logits, fitted on the whole
support set, come from ``ensemble_weights.py``'s cache (computed here when missing). Each rule then
picks weights from the out-of-fold logits alone, and the test split scores them:

- ``fixed``: the shipped weights, whatever the folds say;
- ``cv_accuracy``: the grid's weighting that answers most held-out support examples right (ties: the
  lower log-loss);
- ``cv_logloss``: the weighting whose mix (weights summing to one) has the lowest out-of-fold log-loss;
- ``cv_sign_test``: ``cv_logloss``'s, only where it also answers more held-out examples right than the
  fixed weights by more than one standard error of the paired difference (a sign test), else fixed;
- ``cv_guarded_3``: ``cv_logloss``'s, only where its out-of-fold log-loss is below the fixed weights'
  by more than 3 standard errors of the paired per-example difference, else fixed; ``cv_guarded_2``
  and ``cv_guarded_1``: smaller margins;
- ``select``: what ``select`` does (:func:`mtl.run.mixing.choose_weights`): ``cv_guarded_3`` with the
  encoder the fixed weights were chosen on (all-MiniLM-L6-v2), ``cv_logloss`` with any other.

    python benchmarks/cv_weights.py [--encoder minilm] [--seeds 3] [--tasks banking77:10,...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from ensemble_weights import DEV, HELD, voices
from scipy.special import log_softmax

from mtl.data.registry import Registry
from mtl.device import cpu_name
from mtl.run.alternatives import (
    cross_validate,
    cross_validate_probe,
    cross_validate_tokens,
    finetune,
    fold_indices,
    model_features,
    plain_model,
    tuned_tokens,
)
from mtl.run.label_text import descriptive, with_names
from mtl.run.mixing import FIXED, GRID, beats, choose_weights, logloss, mix, weightings
from mtl.run.support import support_from_task
from mtl.run.text_finetune import ENCODER_LR
from mtl.run.token_match import token_vectors, vocabulary

VOICES = list(GRID)
GUARDS = (1.0, 2.0, 3.0)  # cv_guarded's margins in standard errors


def out_of_fold(task_name: str, shots: int, seed: int, encoder: str, lr: float) -> dict[str, np.ndarray]:
    """Every voice's out-of-fold logits on support draw ``seed`` and the held-out examples' classes."""
    cpu = torch.device("cpu")
    support = support_from_task(Registry().load(task_name), shots, seed)
    texts, ys, k = support.inputs.tolist(), np.asarray(support.labels), len(support.classes)
    names = support.classes if descriptive(support.classes) else None
    folds = fold_indices(ys)
    x = model_features(plain_model(encoder, cpu), with_names(texts, ys, names)[0]).numpy()
    probe = cross_validate_probe(x[:len(texts)], ys, k, folds, extra=x[len(texts):] if names else None)
    vocab = vocabulary(encoder)
    ft, tuned = cross_validate("finetune", lambda t, y: finetune(t, y, k, encoder, cpu, None, lr, seed, names=names),
                               texts, ys, folds, also={"tuned_tokens": tuned_tokens(k, vocab, names)})
    vectors = token_vectors(encoder, with_names(texts, ys, support.classes)[0])
    tokens = cross_validate_tokens(vectors, ys, k, folds, vocab, names is not None)
    return {"held": ft.held, **{c.name: c.logits for c in (probe, ft, tokens, tuned)}}


def choose(oof: dict[str, np.ndarray], options: list[dict[str, float]], encoder: str) -> dict[str, dict[str, float]]:
    """Each rule's weights from the out-of-fold log-probabilities ``oof`` alone."""
    y = oof["held"]
    acc = [float((mix(oof, w).argmax(1) == y).mean()) for w in options]
    loss = [logloss(mix(oof, w), y) for w in options]
    by_acc = max(range(len(options)), key=lambda i: (acc[i], -loss[i]))
    by_loss = min(range(len(options)), key=lambda i: loss[i])
    sign = options[by_loss] if beats(mix(oof, options[by_loss]), mix(oof, FIXED), y) else FIXED
    voices = {v: oof[v] for v in VOICES}
    guarded = {f"cv_guarded_{sd:g}": choose_weights(voices, y, encoder, sd)[0] for sd in GUARDS}
    return {"fixed": FIXED, "cv_accuracy": options[by_acc], "cv_logloss": options[by_loss], "cv_sign_test": sign,
            **guarded, "select": choose_weights(voices, y, encoder)[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default=f"{HELD},{DEV}", help="task:shots, comma-separated")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--encoder", default="minilm")
    p.add_argument("--lr", type=float, default=ENCODER_LR, help="fine-tuning's learning rate")
    p.add_argument("--cache", type=Path, default=Path("/tmp/voices"), help="ensemble_weights.py's test logits")
    p.add_argument("--oof-cache", type=Path, default=Path("/tmp/oof"), help="the out-of-fold logits, kept")
    a = p.parse_args()
    torch.set_num_threads(2)
    a.cache.mkdir(parents=True, exist_ok=True)
    a.oof_cache.mkdir(parents=True, exist_ok=True)
    options = weightings()
    print(json.dumps({"cpu": cpu_name(), "encoder": a.encoder, "draws": a.seeds, "weightings": len(options)}))
    totals: dict[str, dict[str, float]] = {}
    for spec in a.tasks.split(","):
        name, shots = spec.split(":")
        scores: dict[str, list[float]] = {}
        chosen = []
        for seed in range(a.seeds):
            stem = f"{name}_{shots}_{Path(a.encoder).name}_{seed}.npz"
            t0 = time.perf_counter()
            if not (a.cache / stem).exists():
                np.savez(a.cache / stem, **voices(name, int(shots), seed, a.encoder, a.lr))
            if not (a.oof_cache / stem).exists():
                np.savez(a.oof_cache / stem, **out_of_fold(name, int(shots), seed, a.encoder, a.lr))
            test, oof = dict(np.load(a.cache / stem)), dict(np.load(a.oof_cache / stem))
            test = {"truth": test["truth"], **{v: log_softmax(test[v], 1) for v in VOICES}}
            oof = {"held": oof["held"], **{v: log_softmax(oof[v], 1) for v in VOICES}}
            rules = choose(oof, options, a.encoder)
            for rule, w in rules.items():
                scores.setdefault(rule, []).append(100 * float((mix(test, w).argmax(1) == test["truth"]).mean()))
            chosen.append({r: ":".join(f"{w[v]:g}" for v in VOICES) for r, w in rules.items() if r != "fixed"})
            print(json.dumps({"task": spec, "draw": seed, "seconds": round(time.perf_counter() - t0),
                              **{r: round(s[-1], 2) for r, s in scores.items()}, "weights": chosen[-1]}), flush=True)
        totals[spec] = {r: round(float(np.mean(s)), 2) for r, s in scores.items()}
        print(json.dumps({"task": spec, "mean": totals[spec]}), flush=True)
    for group, specs in (("development", DEV.split(",")), ("held-out", HELD.split(","))):
        rows = [totals[t] for t in specs if t in totals]
        if rows:  # the margin (and any rule) is chosen on the development tasks
            print(json.dumps({f"mean of {len(rows)} {group} tasks": {r: round(float(np.mean([x[r] for x in rows])), 2)
                                                                    for r in rows[0]}}))


if __name__ == "__main__":
    main()
