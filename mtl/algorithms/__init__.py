"""Meta-learning algorithms, one module each, registered by name (``ALGORITHMS``).

``build_algorithm(name, model, inner, heads)`` builds one; ``cli.py algorithms`` lists them.
"""

from mtl.algorithms import (  # noqa: F401  (each module registers its algorithm)
    anil,
    baseline_pp,
    fomaml,
    maml,
    mamlpp,
    metasgd,
    multitask,
    protonet,
    reptile,
)
from mtl.algorithms.inner import Algorithm, InnerConfig
from mtl.algorithms.registry import ALGORITHMS, algorithm, get_algorithm, summary
from mtl.models import MultiTaskModel


def build_algorithm(name: str, model: MultiTaskModel, inner: InnerConfig,
                    heads: dict[str, int] | None = None) -> Algorithm:
    """``heads``: task -> outputs of each training task's head, for methods that keep one."""
    return get_algorithm(name)(model, inner, heads)


__all__ = ["ALGORITHMS", "Algorithm", "InnerConfig", "algorithm", "build_algorithm", "get_algorithm", "summary"]
