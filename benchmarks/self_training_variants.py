#!/usr/bin/env python3
"""How ``adapt --unlabeled`` was chosen (mtl.run.self_training): self-training variants on a task's train
split (labels dropped) as the unlabeled texts, with the voices of ``adapt --select`` at its fixed weights
(fine-tuning 7 : probe 3 : tokens 3, the class names as examples), the given support draws, the whole
test split. One JSON line per draw:

    python benchmarks/self_training_variants.py clinc150-banking 5 0,1,2

Keys: ``mix`` (the voices as shipped); ``selfprobe<f>`` (the probe self-trained on its own answers, two
rounds) and ``mix_selfprobe<f>`` (that probe in the mix, at the probe's weight); ``mixT_<r>_<f>_...``: the
mix as the teacher, one or two rounds (``r1``, ``r2``; round 2's teacher is the mix with round 1's student
at the probe's weight), the student probe ``alone``, ``in_mix`` (at the probe's 3) or ``in_mix_even`` (at
7, fine-tuning's weight); ``<f>``: the share of an even split of the pool that each class keeps.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from text_encoders import known_test

from mtl.data.embeddings import embed_texts
from mtl.data.registry import Registry
from mtl.models.heads import linear_fit
from mtl.run.adapted import AdaptedModel, mixed_logits
from mtl.run.alternatives import finetune
from mtl.run.label_text import with_names
from mtl.run.self_training import pseudo_labels
from mtl.run.support import support_from_task
from mtl.run.token_match import TokenMatcher


def features(texts: list[str]) -> np.ndarray:
    """The frozen MiniLM's sentence embeddings as the product's probe reads them (unit length x 10)."""
    x = embed_texts(list(texts), "minilm")
    return 10 * x / np.linalg.norm(x, axis=1, keepdims=True)


def linear(x: np.ndarray, w: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    return (torch.as_tensor(x) @ w.T + b).numpy()


def one_draw(task, everything: list[str], everything_x: np.ndarray, shots: int, seed: int) -> dict[str, float]:
    """Every variant's test accuracy on support draw ``seed``."""
    s = support_from_task(task, shots, seed)
    k, texts, ys = len(s.classes), s.inputs.tolist(), np.asarray(s.labels)
    test, truth = known_test(task, s.classes)
    test_x = features(test.tolist())
    keep = [i for i, t in enumerate(everything) if t not in set(texts)]
    pool, pool_x = [everything[i] for i in keep], everything_x[keep]
    named, named_ys = with_names(texts, ys, s.classes)
    x = features(named)
    w, b = linear_fit(x, named_ys, k)
    probe_test, probe_pool = linear(test_x, w, b), linear(pool_x, w, b)
    matcher = TokenMatcher.fit("minilm", named, named_ys, k)
    tok_test, tok_pool = matcher.logits("minilm", test.tolist(), True), matcher.logits("minilm", pool, True)
    tuned = AdaptedModel(finetune(texts, ys, k, "minilm", torch.device("cpu"), None, 2e-4, seed, "auto", s.classes),
                         {"classes": s.classes, "modality": "text"})
    ft_test, ft_pool = tuned.outputs(test, cached=True)[0], tuned.outputs(np.asarray(pool), cached=True)[0]

    def acc(z: np.ndarray) -> float:
        return round(100 * float((z.argmax(1) == truth).mean()), 2)

    def student(teacher: np.ndarray, frac: float) -> tuple[torch.Tensor, torch.Tensor]:
        rows, labels = pseudo_labels(teacher, frac)
        return linear_fit(np.concatenate([x, pool_x[rows]]), np.concatenate([named_ys, labels]), k)

    res = {"probe": acc(probe_test), "finetune": acc(ft_test),
           "mix": acc(mixed_logits([(ft_test, 7), (probe_test, 3), (tok_test, 3)]))}
    for frac in (0.5, 0.75):
        w1, b1 = student(probe_pool, frac)
        w2, b2 = student(linear(pool_x, w1, b1), frac)
        res[f"selfprobe{frac}"] = acc(linear(test_x, w2, b2))
        res[f"mix_selfprobe{frac}"] = acc(mixed_logits([(ft_test, 7), (linear(test_x, w2, b2), 3), (tok_test, 3)]))
        w1, b1 = student(mixed_logits([(ft_pool, 7), (probe_pool, 3), (tok_pool, 3)]), frac)
        w2, b2 = student(mixed_logits([(ft_pool, 7), (linear(pool_x, w1, b1), 3), (tok_pool, 3)]), frac)
        for tag, (ww, bb) in (("r1", (w1, b1)), ("r2", (w2, b2))):
            alone = linear(test_x, ww, bb)
            res[f"mixT_{tag}_{frac}_alone"] = acc(alone)
            res[f"mixT_{tag}_{frac}_in_mix"] = acc(mixed_logits([(ft_test, 7), (alone, 3), (tok_test, 3)]))
            res[f"mixT_{tag}_{frac}_in_mix_even"] = acc(mixed_logits([(ft_test, 7), (alone, 7), (tok_test, 3)]))
    return res


def main() -> None:
    torch.set_num_threads(2)
    name, shots, seeds = sys.argv[1], int(sys.argv[2]), [int(s) for s in sys.argv[3].split(",")]
    task = Registry().load(name)
    everything = task.train.inputs.tolist()
    everything_x = features(everything)
    for seed in seeds:
        t0 = time.time()
        res = one_draw(task, everything, everything_x, shots, seed)
        print(json.dumps({"task": name, "shots": shots, "seed": seed, "seconds": round(time.time() - t0), **res}),
              flush=True)


if __name__ == "__main__":
    main()
