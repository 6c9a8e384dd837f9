"""MAML++ (Antoniou et al., 2019) as one preset: MAML with its stabilising options switched on.

Multi-step loss (``inner.msl``), learned per-layer per-step step sizes (``inner.lslr``), per-step
batch-norm weights and running statistics (``inner.per_step_bn``, ``inner.per_step_bn_stats``).
Each can still be set in the recipe; derivative-order annealing (``inner.second_order_from``) and
cosine annealing of the outer rate (``cosine: true``) are the recipe's to choose.
"""

from __future__ import annotations

from mtl.algorithms.inner import InnerConfig
from mtl.algorithms.maml import MAML
from mtl.algorithms.registry import algorithm

OPTIONS = ("msl", "lslr", "per_step_bn", "per_step_bn_stats")


@algorithm("maml++")
class MAMLPlusPlus(MAML):
    """MAML++: MAML with multi-step loss, per-step learned step sizes and per-step batch norm on."""

    @classmethod
    def configure(cls, inner: InnerConfig) -> InnerConfig:
        return inner.model_copy(update={k: True for k in OPTIONS if k not in inner.model_fields_set})
