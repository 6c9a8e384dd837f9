#!/usr/bin/env python3
"""How ``adapt --select``'s default mixes its voices, chosen on development tasks, not on the held-out ones.

Each voice answers the test split of a task after fitting on the same support set (all classes, K
shots from the train split, the class names as examples where they read as words, fine-tuning at the
product's defaults): ``linear_probe``, ``finetune`` and ``tokens`` (the three that
``probe+finetune+tokens`` mixes), and two candidates that were tried as more voices:

- ``tuned_tokens``: token matching on the fine-tuned encoder's own token states instead of the frozen one's;
- ``probe_meanmax``: the linear probe on the frozen encoder's mean- *and* max-pooled last layer (each
  half unit length), where the shipped probe reads the mean only.

Every weighting of a grid over the voices' log-probabilities is scored on the development tasks
(CLINC150's training domains, SNIPS and TREC: tasks the held-out ones share nothing with), the best
are printed with their scores on the held-out tasks (BANKING77, CLINC150's held-out domains) beside
them. The voices' test logits are kept under ``--cache``, so a second run only mixes.

    python benchmarks/ensemble_weights.py [--seeds 3] [--cache /tmp/voices]
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy.special import log_softmax
from text_encoders import known_test, test_logits

from mtl.data.embeddings import token_states
from mtl.data.registry import Registry
from mtl.device import cpu_name
from mtl.models.heads import linear_fit
from mtl.run.adapted import AdaptedModel
from mtl.run.alternatives import finetune, probe, tuned_tokens
from mtl.run.label_text import descriptive, with_names
from mtl.run.mixing import FIXED
from mtl.run.support import support_from_task
from mtl.run.text_finetune import ENCODER_LR
from mtl.run.token_match import TokenMatcher, vocabulary

DEV = "clinc150-banking:5,clinc150-credit-cards:5,clinc150-utility:5,clinc150-small-talk:5,snips:5,trec:5"
HELD = "banking77:10,banking77:5,clinc150-kitchen-and-dining:5,clinc150-travel:5,clinc150-work:5"
VOICES = ["linear_probe", "finetune", "tokens", "tuned_tokens", "probe_meanmax"]
GRID = {"linear_probe": [0, 1, 2, 3, 5], "finetune": [3, 5, 7, 10], "tokens": [0, 1, 2, 3, 5],
        "tuned_tokens": [0, 1, 2, 3, 5], "probe_meanmax": [0, 3]}
SHIPPED = {**FIXED, "probe_meanmax": 0}


def meanmax(encoder: str, texts: list[str], cached: bool) -> np.ndarray:
    """The frozen encoder's last layer, mean- and max-pooled per text, each half unit length, times 10
    over sqrt(2) (the product's features have norm 10)."""
    if cached:
        store = token_states(texts, encoder, 0)
        tokens, offsets = store.tokens.float(), store.offsets
    else:
        from mtl.data.embeddings import load_transformer, lower_token_states, transformer_layers

        model, tok = load_transformer(encoder)
        arrays = lower_token_states(model, tok, texts, len(transformer_layers(model)), np.float32)
        tokens, offsets = torch.from_numpy(arrays["tokens"]), torch.from_numpy(arrays["offsets"])
    rows = [tokens[int(offsets[i]):int(offsets[i + 1])] for i in range(len(texts))]
    mean = torch.nn.functional.normalize(torch.stack([r.mean(0) for r in rows]), dim=1)
    top = torch.nn.functional.normalize(torch.stack([r.max(0).values for r in rows]), dim=1)
    return (torch.cat([mean, top], 1) * 10 / np.sqrt(2)).numpy()


def voices(task_name: str, shots: int, seed: int, encoder: str, lr: float) -> dict[str, np.ndarray]:
    """Every voice's test-split logits after fitting on support draw ``seed``, and the true classes."""
    task = Registry().load(task_name)
    support = support_from_task(task, shots, seed)
    texts, ys, k = support.inputs.tolist(), np.asarray(support.labels), len(support.classes)
    names = support.classes if descriptive(support.classes) else None
    queries, truth = known_test(task, support.classes)
    queries = queries.tolist()
    meta = {"classes": support.classes, "modality": "text"}
    out = {"truth": truth}
    out["linear_probe"] = test_logits(AdaptedModel(probe(texts, ys, k, encoder, torch.device("cpu"), names), meta),
                                      task)[0]
    tuned = finetune(texts, ys, k, encoder, torch.device("cpu"), None, lr, seed, names=names)
    out["finetune"] = test_logits(AdaptedModel(tuned, meta), task)[0]
    labelled, labels = with_names(texts, ys, names)
    out["tokens"] = TokenMatcher.fit(encoder, labelled, labels, k).logits(encoder, queries, True)
    out["tuned_tokens"] = tuned_tokens(k, vocabulary(encoder), names)(tuned, texts, ys, queries)
    w, b = linear_fit(meanmax(encoder, labelled, False), labels, k)
    out["probe_meanmax"] = meanmax(encoder, queries, True) @ w.numpy().T + b.numpy()
    return out


def accuracy(runs: list[dict[str, np.ndarray]], weights: dict[str, float]) -> float:
    """Mean test accuracy (%) over the support draws of the voices' log-probabilities mixed by ``weights``."""
    return float(np.mean([100 * (sum(w * r[v] for v, w in weights.items() if w).argmax(1) == r["truth"]).mean()
                          for r in runs]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dev", default=DEV, help="task:shots, comma-separated: where the weights are chosen")
    p.add_argument("--held", default=HELD, help="task:shots, comma-separated: scored beside them, never chosen on")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--encoder", default="minilm")
    p.add_argument("--lr", type=float, default=ENCODER_LR, help="fine-tuning's learning rate")
    p.add_argument("--cache", type=Path, default=Path("/tmp/voices"), help="the voices' test logits, kept")
    p.add_argument("--top", type=int, default=10)
    a = p.parse_args()
    torch.set_num_threads(2)
    a.cache.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict[str, np.ndarray]]] = {}
    for spec in a.dev.split(",") + a.held.split(","):
        name, shots = spec.split(":")
        for seed in range(a.seeds):
            f = a.cache / f"{name}_{shots}_{Path(a.encoder).name}_{seed}.npz"
            if not f.exists():
                t0 = time.perf_counter()
                np.savez(f, **voices(name, int(shots), seed, a.encoder, a.lr))
                print(f"{spec} draw {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
            z = dict(np.load(f))
            runs.setdefault(spec, []).append({"truth": z["truth"], **{v: log_softmax(z[v], 1) for v in VOICES}})
    dev, held = a.dev.split(","), a.held.split(",")
    alone = {v: {t: round(accuracy(runs[t], {v: 1}), 2) for t in dev + held} for v in VOICES}
    scored = []
    for combo in itertools.product(*GRID.values()):
        weights = dict(zip(GRID, combo, strict=True))
        if weights["linear_probe"] and weights["probe_meanmax"]:
            continue  # the two probes are alternatives, not companions
        scored.append((float(np.mean([accuracy(runs[t], weights) for t in dev])), weights))
    scored.sort(key=lambda s: -s[0])
    rows = []
    shipped = next(s for s in scored if s[1] == SHIPPED)
    for mean, weights in scored[:a.top] + ([] if shipped in scored[:a.top] else [shipped]):
        rows.append({"weights": weights, "dev_mean": round(mean, 2), "shipped": weights == SHIPPED,
                     "rank": next(i for i, s in enumerate(scored) if s[1] == weights) + 1,
                     "dev": {t: round(accuracy(runs[t], weights), 2) for t in dev},
                     "held": {t: round(accuracy(runs[t], weights), 2) for t in held}})
    print(json.dumps({"cpu": cpu_name(), "encoder": a.encoder, "draws": a.seeds, "weightings": len(scored)}))
    for v, scores in alone.items():
        print(json.dumps({"alone": v, **scores}))
    for row in rows:  # the best on the development tasks, then the shipped weights
        print(json.dumps(row))


if __name__ == "__main__":
    main()
