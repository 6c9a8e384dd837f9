"""The shares of ``adapt --select``'s mix: fixed, or chosen on the support set's out-of-fold answers.

Which voice deserves most weight depends on the encoder: with all-MiniLM-L6-v2 fine-tuning does, with
all-mpnet-base-v2 token matching on the fine-tuned encoder's own token states (docs/BENCHMARKS.md,
benchmarks/ensemble_weights.py). Rather than a table of encoders, the weights are read off the
cross-validation that ``select`` runs anyway: every voice's out-of-fold log-probabilities are mixed by
each weighting of a small grid, and the one with the lowest out-of-fold log-loss is taken. With the
encoder the fixed weights were chosen on (all-MiniLM-L6-v2), only where that log-loss is below theirs
by several standard errors: followed freely, a 5-shot support set's folds lose it 0.2 points on the
development tasks. With any other encoder the fixed weights are a guess, and the folds, followed
freely, gain 1.0 point on the same tasks with all-mpnet-base-v2 (benchmarks/cv_weights.py).
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy.special import log_softmax

# shares of the log-probabilities, 7 : 3 : 3 for fine-tuning, the probe and token matching: chosen on six
# unrelated tasks by benchmarks/ensemble_weights.py, within 0.06 points of the best of 600 weightings there
FIXED = {"finetune": 7, "linear_probe": 3, "tokens": 3, "tuned_tokens": 0}
GRID = {"finetune": (0, 1, 3, 5, 7, 10), "linear_probe": (0, 1, 2, 3, 5), "tokens": (0, 1, 2, 3, 5),
        "tuned_tokens": (0, 1, 2, 3, 5)}
FIXED_FOR = ("minilm", "sentence-transformers/all-MiniLM-L6-v2")  # the encoder FIXED was chosen on, by its names
# the lowest of hundreds of log-losses is low partly by chance: with the encoder FIXED was chosen on, the
# folds' weighting must beat it by this many standard errors (2 and 3 tie on the development tasks)
MARGIN = 3.0
TEMPERATURES = (0.25, 0.5, 1.0, 2.0, 4.0)  # a mix's scale is arbitrary: its log-loss is taken at the best


def weightings() -> list[dict[str, float]]:
    """Every weighting of :data:`GRID` with some weight."""
    return [dict(zip(GRID, c, strict=True)) for c in itertools.product(*GRID.values()) if any(c)]


def mix(logprobs: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
    """The voices' log-probabilities (``logprobs``, by name) weighted by ``weights`` normalised to sum to one."""
    total = sum(weights.values())
    return sum(w / total * logprobs[v] for v, w in weights.items() if w)  # type: ignore[return-value]


def losses(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Each example's log-loss under logits ``z``, at the one of :data:`TEMPERATURES` best on average."""
    per = [-log_softmax(z / t, 1)[np.arange(len(y)), y] for t in TEMPERATURES]
    return min(per, key=lambda x: float(x.mean()))


def logloss(z: np.ndarray, y: np.ndarray) -> float:
    return float(losses(z, y).mean())


def clearly_lower(a: np.ndarray, b: np.ndarray, sd: float) -> bool:
    """Whether per-example losses ``a`` are lower than ``b``'s (the same examples) by more than ``sd``
    standard errors of the mean paired difference."""
    d = b - a  # a rounding difference (the same answers, summed in another order) is no difference
    return len(d) > 1 and float(d.mean()) > max(sd * float(d.std(ddof=1)) / np.sqrt(len(d)), 1e-6)


def beats(z: np.ndarray, base: np.ndarray, y: np.ndarray, sd: float = 1.0) -> bool:
    """Whether ``z`` answers more of ``y`` right than ``base`` by more than ``sd`` standard errors of the
    paired difference (wins - losses > sd * sqrt(wins + losses))."""
    right, ok = z.argmax(1) == y, base.argmax(1) == y
    wins, losses = int((right & ~ok).sum()), int((ok & ~right).sum())
    return wins - losses > sd * np.sqrt(wins + losses)


def choose_weights(logits: dict[str, np.ndarray], y: np.ndarray, encoder: str,
                   sd: float | None = None) -> tuple[dict[str, float], str]:
    """The mix's weights from every voice's out-of-fold ``logits`` for held-out classes ``y``, and why.

    ``sd``: how far below the fixed weights' the chosen weights' log-loss must be, in standard errors of
    the paired difference (:func:`clearly_lower`); by default :data:`MARGIN` for the encoder the fixed
    weights were chosen for, none for any other (where they are only a guess)."""
    if sd is None:
        sd = MARGIN if encoder in FIXED_FOR else 0.0
    logprobs = {v: log_softmax(z, 1) for v, z in logits.items()}
    options = [w for w in weightings() if all(logits.get(v) is not None for v, x in w.items() if x)]
    best = min(options, key=lambda w: logloss(mix(logprobs, w), y))
    if best != FIXED and clearly_lower(losses(mix(logprobs, best), y), losses(mix(logprobs, FIXED), y), sd):
        return best, (f"the lowest out-of-fold log-loss, below the fixed weights' by over {sd:g} standard errors"
                      if sd else "the lowest out-of-fold log-loss")
    return dict(FIXED), "fixed: no weighting's out-of-fold log-loss was clearly lower"
