"""MAML (Finn et al., 2017): second-order meta-gradients through the inner updates."""

from __future__ import annotations

from mtl.algorithms.inner import Algorithm
from mtl.algorithms.registry import algorithm


@algorithm("maml")
class MAML(Algorithm):
    """Second-order MAML: the outer gradient flows through every inner step (Finn et al., 2017)."""

    def second_order(self, iteration: int) -> bool:
        # MAML++'s derivative-order annealing: first order before `second_order_from`
        return iteration >= self.inner.second_order_from
