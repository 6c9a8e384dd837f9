#!/usr/bin/env python3
"""Two more voices for ``adapt --select``'s mix that need no sentence encoder of their own to be fitted:
would either add what the shipped three (fine-tuning, the linear probe, token matching) miss?

- ``lexical``: logistic regression (C = 10) on TF-IDF of word 1-2-grams and character 2-5-grams
  (``char_wb``, sublinear term frequencies), the class names as examples where they read as words.
  It reads spelling, not meaning, so its errors should differ most from the encoder's.
- ``gaussian``: linear discriminant analysis (shared covariance with Ledoit-Wolf shrinkage, equal
  priors) on the frozen encoder's embeddings, in place of or beside the logistic-regression probe.

Each is mixed into the shipped weights (7 : 3 : 3, fine-tuning : probe : tokens) at several shares and
temperatures, using the other voices' test logits from ``benchmarks/ensemble_weights.py``'s cache (run
it first), and scored on the same development and held-out tasks, draws 0-2. Choose on the
development tasks; the held-out ones are printed beside them.

    python benchmarks/ensemble_weights.py && python benchmarks/other_voices.py [--cache /tmp/voices]
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from ensemble_weights import DEV, HELD, accuracy
from scipy.special import log_softmax
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_union
from text_encoders import known_test

from mtl.data.registry import Registry
from mtl.device import cpu_name
from mtl.run.alternatives import model_features, plain_model
from mtl.run.label_text import descriptive, with_names
from mtl.run.mixing import FIXED
from mtl.run.support import support_from_task

SHIPPED = {v: w for v, w in FIXED.items() if w}  # 7 : 3 : 3, fine-tuning : probe : tokens
# (voice, weight beside the shipped three, weight of the probe, temperature dividing the voice's logits)
VARIANTS = [("lexical", w, 3, t) for t in (1, 2) for w in (1, 2, 3, 5)] + \
           [("gaussian", w, p, t) for t in (1, 10, 100) for w, p in ((3, 0), (1, 3), (3, 3))]
TEMPERATURES = sorted({t for *_, t in VARIANTS})


def lexical(texts: list[str], ys: np.ndarray, queries: list[str]) -> np.ndarray:
    words = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    chars = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True)
    v = make_union(words, chars).fit(texts)
    return LogisticRegression(C=10.0, max_iter=3000).fit(v.transform(texts), ys).decision_function(v.transform(queries))


def gaussian(x: np.ndarray, ys: np.ndarray, xq: np.ndarray) -> np.ndarray:
    k = int(ys.max()) + 1
    lda = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto", priors=np.full(k, 1 / k))
    return lda.fit(x, ys).decision_function(xq)


def new_voices(spec: str, seed: int, plain: torch.nn.Module) -> dict[str, np.ndarray]:
    name, shots = spec.split(":")
    task = Registry().load(name)
    support = support_from_task(task, int(shots), seed)
    names = support.classes if descriptive(support.classes) else None
    texts, ys = with_names(support.inputs.tolist(), np.asarray(support.labels), names)
    queries, truth = known_test(task, support.classes)
    queries = queries.tolist()
    x, xq = model_features(plain, texts).numpy(), model_features(plain, queries).numpy()
    return {"truth": truth, "lexical": lexical(texts, ys, queries), "gaussian": gaussian(x, ys, xq)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, default=Path("/tmp/voices"), help="ensemble_weights.py's test logits")
    p.add_argument("--seeds", type=int, default=3)
    a = p.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    torch.set_num_threads(2)
    plain = plain_model("minilm", torch.device("cpu"))
    dev, held = DEV.split(","), HELD.split(",")
    runs: dict[str, list[dict[str, np.ndarray]]] = {}
    for spec in dev + held:
        for seed in range(a.seeds):
            cached = np.load(a.cache / f"{spec.replace(':', '_')}_minilm_{seed}.npz")
            new = new_voices(spec, seed, plain)
            assert np.array_equal(new["truth"], cached["truth"]), "another support draw or test split than the cache's"
            scaled = {f"{v}/{t}": log_softmax(new[v] / t, 1) for v in ("lexical", "gaussian") for t in TEMPERATURES}
            runs.setdefault(spec, []).append({"truth": new["truth"], **scaled,
                                              **{v: log_softmax(cached[v], 1) for v in SHIPPED}})
    print(json.dumps({"cpu": cpu_name(), "encoder": "minilm", "draws": a.seeds}))
    for voice in ("lexical", "gaussian"):
        alone = {t: round(accuracy(runs[t], {f"{voice}/1": 1}), 2) for t in dev + held}
        print(json.dumps({"alone": voice, "dev_mean": round(float(np.mean([alone[t] for t in dev])), 2), **alone}))
    for voice, weight, probe, t in [("lexical", 0, 3, 1), *VARIANTS]:
        weights = {**SHIPPED, "linear_probe": probe, f"{voice}/{t}": weight}
        scores = {s: round(accuracy(runs[s], weights), 2) for s in dev + held}
        print(json.dumps({"voice": voice if weight else "none (shipped)", "weight": weight, "probe": probe,
                          "temperature": t, "dev_mean": round(float(np.mean([scores[s] for s in dev])), 2),
                          "held_mean": round(float(np.mean([scores[s] for s in held])), 2), **scores}))


if __name__ == "__main__":
    main()
