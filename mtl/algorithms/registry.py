"""The algorithm registry: a name maps to an :class:`~mtl.algorithms.inner.Algorithm` subclass,
registered where it is defined (``@algorithm("maml")``), the way timm registers models.

A new method is one new module: subclass ``Algorithm``, override the hooks that differ, decorate it.
Recipes (``method: NAME``), ``cli.py train --method``, ``cli.py algorithms`` and the docs read the
names from here; a class registered from a user's own file works the same once that file is imported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from mtl.errors import MtlError

if TYPE_CHECKING:
    from mtl.algorithms.inner import Algorithm

ALGORITHMS: dict[str, type[Algorithm]] = {}
A = TypeVar("A", bound="type[Algorithm]")


def algorithm(name: str) -> Callable[[A], A]:
    """Class decorator: register an ``Algorithm`` subclass as ``name``."""

    def add(cls: A) -> A:
        if name in ALGORITHMS and ALGORITHMS[name] is not cls:
            raise ValueError(f"algorithm {name!r} is registered twice")
        cls.name = name
        ALGORITHMS[name] = cls
        return cls

    return add


def get_algorithm(name: str) -> type[Algorithm]:
    if name not in ALGORITHMS:
        raise MtlError(f"unknown algorithm '{name}'", f"use one of {', '.join(ALGORITHMS)} (`cli.py algorithms`)")
    return ALGORITHMS[name]


def summary(cls: type[Algorithm]) -> str:
    """The first line of the class docstring."""
    doc = (cls.__doc__ or "").strip().splitlines()
    return doc[0] if doc else ""
