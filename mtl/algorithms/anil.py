"""ANIL (Raghu et al., 2020): only the head adapts in the inner loop; the body learns in the outer loop."""

from __future__ import annotations

from mtl.algorithms.inner import InnerConfig
from mtl.algorithms.maml import MAML
from mtl.algorithms.registry import algorithm


@algorithm("anil")
class ANIL(MAML):
    """Almost No Inner Loop: the head alone adapts; the body's features are computed once per episode."""

    @classmethod
    def configure(cls, inner: InnerConfig) -> InnerConfig:
        return inner.model_copy(update={"adapt": "head"})
