"""Meta-SGD (Li et al., 2017): a learned inner step size for every weight, meta-learned with it."""

from __future__ import annotations

from mtl.algorithms.maml import MAML
from mtl.algorithms.registry import algorithm


@algorithm("metasgd")
class MetaSGD(MAML):
    """Meta-SGD: second-order MAML with a learned step size per weight (``lrs.*`` in the checkpoint)."""

    learned_lrs = "per_parameter"
