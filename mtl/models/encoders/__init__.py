"""Encoders by name: ``build_encoder(name, config, modality)``; ``ENCODERS`` lists them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from mtl.errors import MtlError
from mtl.models.encoders import conv, resnet, text  # noqa: F401  (registers the encoders)
from mtl.models.encoders.registry import ENCODERS, encoder_names, register_encoder
from mtl.models.encoders.text import TextEncoder

if TYPE_CHECKING:
    from mtl.models.multitask import ModelConfig


def build_encoder(name: str, config: ModelConfig, modality: str) -> nn.Module:
    """The encoder a recipe names: a registered one, or for text the folder of any transformers
    sentence encoder (saved with ``save_pretrained``; mean pooling), e.g. a larger model than MiniLM."""
    if name in ENCODERS and ENCODERS[name].modality == modality:
        return ENCODERS[name].build(config)
    if modality == "text" and Path(name).is_dir():
        return TextEncoder(name, config.text_trainable_layers, config.text_checkpointing)
    other = " or the folder of a transformers model" if modality == "text" else ""
    raise MtlError(f"unknown {modality} encoder '{name}'", f"use one of {', '.join(encoder_names(modality))}{other}")


__all__ = ["ENCODERS", "build_encoder", "encoder_names", "register_encoder"]
