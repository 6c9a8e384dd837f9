"""First-order MAML: the query gradient at the adapted weights, applied to the initial ones."""

from __future__ import annotations

from mtl.algorithms.inner import Algorithm
from mtl.algorithms.registry import algorithm


@algorithm("fomaml")
class FOMAML(Algorithm):
    """First-order MAML: drops the second-order term, so memory does not grow with inner steps."""
