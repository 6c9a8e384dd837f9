"""Probabilities a user can act on: a temperature fitted without test data, the expected calibration
error, and the threshold below which an input is answered "none of these".

A model adapted from a handful of examples is overconfident: its top probability is near 1 for
right and wrong answers alike. Temperature scaling (Guo et al., 2017) divides the logits by one
number fitted to minimise the log loss on held-out predictions; here those are the out-of-fold
predictions of cross-validation on the support set itself, so no test data is touched. The same
out-of-fold predictions give the rejection threshold: the score below which only ``reject_rate`` of
in-scope examples fall (a split-conformal bound on how many known inputs are refused), with no
out-of-scope examples needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mtl.run import outliers

ECE_BINS = 15
# The share of in-scope inputs the chosen threshold may refuse. 3%: on CLINC150 (150 intents, 10 shots)
# the in-scope accuracy then falls 2.3 points while 82% of out-of-scope queries are refused; at 5% it
# falls 4.0 points for 88% (docs/BENCHMARKS.md). Needs 33 or more support examples (5%: 19).
REJECT_RATE = 0.03
CALIBRATION_FOLDS = 5  # out-of-fold predictions from K-1 shots up to 5 shots, from 4/5 of them above
T_GRID = np.geomspace(0.05, 20.0, 161)
PRIOR = 5.0  # strength of the pull of log T towards 0 (T = 1), in units of summed log loss


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE with equal-width confidence bins (Naeini et al., 2015; Guo et al., 2017): the mean gap
    between confidence and accuracy, weighted by how many predictions fall in each bin."""
    if len(labels) == 0:
        return float("nan")
    conf = probs.max(1)
    correct = (probs.argmax(1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            total += m.mean() * abs(conf[m].mean() - correct[m].mean())
    return float(total)


def fit_temperature(logits: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor,
                    prior: float = PRIOR) -> float:
    """The temperature that minimises the summed log loss of ``softmax(logits / T)`` plus
    ``prior * log(T)**2``: a few dozen held-out predictions with no error would otherwise drive T to
    zero (certainty), so T moves from 1 only as far as the evidence carries it. A grid in log space,
    then the best point refined between its neighbours."""
    z = torch.as_tensor(logits, dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.long)
    if len(y) == 0:
        return 1.0

    def loss(t: float) -> float:
        return float(F.cross_entropy(z / t, y, reduction="sum")) + prior * float(np.log(t)) ** 2

    losses = [loss(t) for t in T_GRID]
    i = int(np.argmin(losses))
    lo, hi = T_GRID[max(i - 1, 0)], T_GRID[min(i + 1, len(T_GRID) - 1)]
    fine = np.geomspace(lo, hi, 41)
    return float(fine[int(np.argmin([loss(t) for t in fine]))])


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


@dataclass(frozen=True)
class Rejection:
    """How ``predict`` refuses: inputs whose ``score`` (see :mod:`mtl.run.outliers`: ``distance``,
    ``similarity`` or ``probability``) is below ``threshold`` get the label ``none``; a threshold of
    None refuses nothing. ``reads``: whose features the score is measured on, the model's own
    (``model``) or, for a model whose encoder was fine-tuned on the support set, the pretrained
    encoder's (``frozen``): the fine-tuned encoder has seen every support example, so their scores
    would be in-sample and the threshold would refuse a quarter of new in-scope inputs instead of 3%."""

    score: str = "probability"
    threshold: float | None = None
    none: str = "none"
    by: str = "off"
    reads: str = "model"

    def as_dict(self) -> dict[str, object]:
        return {"score": self.score, "threshold": self.threshold, "none": self.none, "by": self.by,
                "reads": self.reads}

    def refuses(self, scores: np.ndarray) -> np.ndarray:
        """Which inputs are answered ``none`` (never those without a score: NaN)."""
        if self.threshold is None:
            return np.zeros(len(scores), bool)
        return np.nan_to_num(scores, nan=np.inf) < self.threshold


def one_shot_rejection(score: str, none: str, reads: str = "model") -> Rejection:
    """No threshold: with one example per class none can be held out to bound the in-scope refusals."""
    return Rejection(score, None, none, "1 shot per class: none held out to set a threshold; use --reject-below",
                     reads)


def threshold_for(in_scope_scores: np.ndarray, reject_rate: float = REJECT_RATE) -> float | None:
    """The score below which ``reject_rate`` of in-scope examples fall: with n held-out in-scope
    scores, the floor(rate * (n + 1))-th smallest (split conformal), or None (refuse nothing) when the
    support set is too small for that bound."""
    s = np.sort(np.asarray(in_scope_scores, dtype=np.float64))
    k = int(np.floor(reject_rate * (len(s) + 1)))
    return float(s[k - 1]) if k >= 1 else None


def calibrate_from(logits: np.ndarray, held: np.ndarray, by: str, feats: torch.Tensor, ys: torch.Tensor, classes: int,
                   reject_by: str, reject_rate: float, none: str, reads: str = "model"
                   ) -> tuple[dict[str, Any], Rejection, dict[str, torch.Tensor]]:
    """The temperature, the rejection threshold and the out-of-scope score's statistics, from
    out-of-fold ``logits`` of the examples labelled ``held`` and the support ``feats`` the rejection
    score ``reads`` (:class:`Rejection`): any way of adapting that yields held-out predictions can use
    it. ``feats`` must not come from an encoder fine-tuned on these very examples (their leave-one-out
    scores would be in-sample): give such a model's frozen encoder's."""
    t = fit_temperature(logits, held)
    calibration = {"temperature": round(t, 4), "by": by,
                   "ece_before": round(expected_calibration_error(softmax(logits), held), 4),
                   "ece_after": round(expected_calibration_error(softmax(logits, t), held), 4)}
    if reject_by == "probability":
        scores = softmax(logits, t).max(1)
    else:
        scores = outliers.held_out(reject_by, feats, ys).numpy()
    threshold = threshold_for(scores, reject_rate)
    why = f"refuses {reject_rate:.0%} of held-out support examples" if threshold is not None else \
        "--reject-rate 0" if reject_rate == 0 else "too few examples to bound in-scope refusals; use --reject-below"
    rejection = Rejection(reject_by, None if threshold is None else round(threshold, 5), none, why,
                          "model" if reject_by == "probability" else reads)
    return calibration, rejection, outliers.fit(reject_by, feats, ys, classes)
