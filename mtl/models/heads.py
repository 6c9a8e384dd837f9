"""Task heads: a linear layer, or a cosine-similarity classifier (Baseline++); and logistic regression,
the linear head fitted to a support set's features in closed form rather than by inner steps."""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The mean feature norm features are scaled to before logistic regression (C = 1): all-MiniLM-L6-v2's
# sentence embeddings have norm 10 here, the scale its probe was tuned at; image features vary widely.
FEATURE_NORM = 10.0
# Logistic regression at C = 1 answers image tasks with about half the confidence its accuracy warrants:
# temperatures of 0.46-0.65 fitted on the support set's folds (scikit-learn's digits, MNIST, Olivetti).
# Doubling its logits changes no answer and lets the fitted temperature sit near 1, where its prior pulls.
SHARPEN = 2.0


class CosineLinear(nn.Linear):
    """``scale * cos(features, class weights)``: logits bounded by ``scale``; the bias is unused but kept
    so that state dicts have the keys of a linear head."""

    def __init__(self, in_features: int, out_features: int, scale: float = 10.0) -> None:
        super().__init__(in_features, out_features)
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return cosine_logits(x, self.weight, self.scale)


def linear_logits(feats: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``feats @ weight.T + bias`` in float32, under bf16 autocast too: a prototype head's logits are
    differences of large squared norms, which bf16's 8-bit mantissa rounds away (Lake's challenge, one
    view: 8.37% error with a bf16 head, 7.87% with this one; docs/BENCHMARKS.md)."""
    with torch.autocast(feats.device.type, enabled=False):
        return widened(feats) @ widened(weight).T + widened(bias)


def widened(x: Tensor) -> Tensor:
    """``x`` in float32 if it is of a narrower float type (float64 stays, for the exact gradient checks)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def class_means(feats: Tensor, ys: Tensor, ways: int) -> Tensor:
    """Each class's mean feature (the prototypes), summed in float32 as :func:`linear_logits` computes."""
    feats = widened(feats)
    sums = torch.zeros(ways, feats.shape[1], device=feats.device, dtype=feats.dtype).index_add(0, ys, feats)
    return sums / torch.bincount(ys, minlength=ways).clamp_min(1).unsqueeze(1).to(feats.dtype)


def cosine_logits(feats: Tensor, weight: Tensor, scale: float) -> Tensor:
    with torch.autocast(feats.device.type, enabled=False):  # as linear_logits: the head in float32
        return scale * F.normalize(widened(feats), dim=-1) @ F.normalize(widened(weight), dim=-1).T


def make_head(kind: str, in_features: int, out_features: int) -> nn.Linear:
    """A zero-initialised head of ``kind`` (``linear`` or ``cosine``)."""
    head = CosineLinear(in_features, out_features) if kind == "cosine" else nn.Linear(in_features, out_features)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


def linear_fit(x: np.ndarray, ys: np.ndarray, classes: int) -> tuple[Tensor, Tensor]:
    """The weight and bias of logistic regression (C = 1) of ``ys`` on features ``x``, one row per class."""
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        clf = LogisticRegression(max_iter=2000, C=1.0).fit(x, ys)
    w, b = torch.as_tensor(clf.coef_, dtype=torch.float32), torch.as_tensor(clf.intercept_, dtype=torch.float32)
    if classes == 2:  # scikit-learn keeps one row for two classes: logit(1) - logit(0)
        w, b = torch.cat([-w / 2, w / 2]), torch.cat([-b / 2, b / 2])
    return w, b


def probe_logits(x: np.ndarray, ys: np.ndarray, classes: int, new: np.ndarray) -> np.ndarray:
    """The logits for features ``new`` of :func:`linear_fit` on ``x``, ``ys``: a probe's held-out answers."""
    w, b = linear_fit(x, ys, classes)
    return (torch.as_tensor(new, dtype=torch.float32) @ w.T + b).numpy()


def logistic_head(feats: Tensor, ys: Tensor, classes: int) -> tuple[Tensor, Tensor]:
    """A linear head for raw ``feats``, fitted by :func:`linear_fit` to them scaled to :data:`FEATURE_NORM`
    (its logits times :data:`SHARPEN`): regularised and converged, where a few gradient steps from
    prototypes or zero are neither. On models meta-trained on Omniglot it gains 3.2 points on average
    over their own adaptation on MNIST, Olivetti faces, scikit-learn's digits and an Omniglot alphabet
    (docs/BENCHMARKS.md)."""
    x = feats.detach().float().cpu().numpy()
    scale = FEATURE_NORM / max(float(np.linalg.norm(x, axis=1).mean()), 1e-12)
    w, b = linear_fit(x * scale, ys.cpu().numpy(), classes)
    return (w * (scale * SHARPEN)).to(feats.device), (b * SHARPEN).to(feats.device)
