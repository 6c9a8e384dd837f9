"""The shares of ``adapt --select``'s mix: fixed, or chosen on the support set's out-of-fold answers.

Which voice deserves most weight depends on the encoder: with all-MiniLM-L6-v2 fine-tuning does, with
all-mpnet-base-v2 token matching on the fine-tuned encoder's own token states (docs/BENCHMARKS.md,
benchmarks/ensemble_weights.py). Rather than a table of encoders, the weights are read off the
cross-validation that ``select`` runs anyway: every voice's out-of-fold log-probabilities are mixed by
each weighting of a small grid, and the one with the lowest out-of-fold log-loss is taken, but only
where it also answers more held-out support examples right than the fixed weights beyond the noise of
that count (a sign test, as :func:`mtl.run.alternatives.pick`): a 5-shot support set's folds are too
few to trust a small difference (benchmarks/cv_weights.py).
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy.special import log_softmax

VOICES = ("finetune", "linear_probe", "tokens", "tuned_tokens")
# shares of the log-probabilities, 7 : 3 : 3 for fine-tuning, the probe and token matching: chosen on six
# unrelated tasks by benchmarks/ensemble_weights.py, within 0.06 points of the best of 600 weightings there
FIXED = {"finetune": 7, "linear_probe": 3, "tokens": 3, "tuned_tokens": 0}
GRID = {"finetune": (0, 1, 3, 5, 7, 10), "linear_probe": (0, 1, 2, 3, 5), "tokens": (0, 1, 2, 3, 5),
        "tuned_tokens": (0, 1, 2, 3, 5)}
TEMPERATURES = (0.25, 0.5, 1.0, 2.0, 4.0)  # a mix's scale is arbitrary: its log-loss is taken at the best


def weightings() -> list[dict[str, float]]:
    """Every weighting of :data:`GRID` with some weight."""
    return [dict(zip(GRID, c, strict=True)) for c in itertools.product(*GRID.values()) if any(c)]


def mix(logprobs: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
    """The voices' log-probabilities (``logprobs``, by name) weighted by ``weights`` normalised to sum to one."""
    total = sum(weights.values())
    return sum(w / total * logprobs[v] for v, w in weights.items() if w)  # type: ignore[return-value]


def logloss(z: np.ndarray, y: np.ndarray) -> float:
    """Log-loss of logits ``z`` for classes ``y``, at the best of :data:`TEMPERATURES`."""
    return min(float(-log_softmax(z / t, 1)[np.arange(len(y)), y].mean()) for t in TEMPERATURES)


def beats(z: np.ndarray, base: np.ndarray, y: np.ndarray, sd: float = 1.0) -> bool:
    """Whether ``z`` answers more of ``y`` right than ``base`` by more than ``sd`` standard errors of the
    paired difference (wins - losses > sd * sqrt(wins + losses))."""
    right, ok = z.argmax(1) == y, base.argmax(1) == y
    wins, losses = int((right & ~ok).sum()), int((ok & ~right).sum())
    return wins - losses > sd * np.sqrt(wins + losses)


def choose_weights(logits: dict[str, np.ndarray], y: np.ndarray, sd: float = 1.0) -> tuple[dict[str, float], str]:
    """The mix's weights from every voice's out-of-fold ``logits`` for held-out classes ``y``, and why;
    ``sd``: the margin over the fixed weights, in standard errors (:func:`beats`; 1 is best on the
    development tasks of benchmarks/cv_weights.py)."""
    logprobs = {v: log_softmax(z, 1) for v, z in logits.items()}
    options = [w for w in weightings() if all(logits.get(v) is not None for v, x in w.items() if x)]
    best = min(options, key=lambda w: logloss(mix(logprobs, w), y))
    if best != FIXED and beats(mix(logprobs, best), mix(logprobs, FIXED), y, sd):
        return best, "the lowest out-of-fold log-loss, ahead of the fixed weights beyond the noise"
    return dict(FIXED), "fixed: no weighting beat them beyond the noise of the support set's folds"
