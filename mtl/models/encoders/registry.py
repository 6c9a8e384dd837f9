"""The encoder registry: a name maps to a builder, registered where the encoder is defined (timm-style).

A new encoder is one file in this folder with a ``@register_encoder("name", "image")`` builder,
imported by ``mtl/models/encoders/__init__.py``; recipes then name it and ``cli.py models`` lists it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from mtl.models.multitask import ModelConfig

Builder = Callable[["ModelConfig"], nn.Module]


@dataclass(frozen=True)
class EncoderEntry:
    name: str
    modality: str
    build: Builder
    doc: str


ENCODERS: dict[str, EncoderEntry] = {}


def register_encoder(name: str, modality: str) -> Callable[[Builder], Builder]:
    """Register ``fn(config) -> nn.Module`` (with an ``out_dim`` attribute) as encoder ``name``."""

    def add(fn: Builder) -> Builder:
        if name in ENCODERS:
            raise ValueError(f"encoder {name!r} is registered twice")
        doc = (fn.__doc__ or "").strip().splitlines()
        ENCODERS[name] = EncoderEntry(name, modality, fn, doc[0] if doc else "")
        return fn

    return add


def encoder_names(modality: str | None = None) -> list[str]:
    return [n for n, e in ENCODERS.items() if modality is None or e.modality == modality]


def describe() -> list[dict[str, Any]]:
    return [{"name": e.name, "modality": e.modality, "description": e.doc} for e in ENCODERS.values()]
