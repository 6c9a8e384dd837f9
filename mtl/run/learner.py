"""Build an algorithm (model + meta-learned state) from a recipe, and rebuild it from a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mtl.algorithms import Algorithm, build_algorithm
from mtl.errors import MtlError
from mtl.models import MultiTaskModel
from mtl.run.checkpoint import load_checkpoint, load_into
from mtl.run.recipe import Recipe


def build_learner(recipe: Recipe, modalities: list[str], heads: dict[str, int]) -> Algorithm:
    """``heads``: task -> outputs (episode ways for learned episode heads, all classes for joint training)."""
    return build_algorithm(recipe.method, MultiTaskModel(recipe.model, modalities), recipe.inner, heads)


def load_learner(path: Path, device: torch.device, hold_text: bool = False) -> tuple[Algorithm, dict[str, Any]]:
    """``hold_text``: the text encoder will not be trained (plain adaptation), so meta-learned text
    layers are held as a fixed function with cached embeddings (:meth:`TextEncoder.hold`)."""
    tensors, meta = load_checkpoint(path, device)
    if "recipe" not in meta:
        raise MtlError(f"{meta['path']} is an adapted model, not a training checkpoint",
                       "pass the run folder of `cli.py train` to --checkpoint")
    recipe = Recipe.model_validate(meta["recipe"])
    config = recipe.model
    hold = (hold_text and config.text_trainable_layers > 0 and "text" in meta["modalities"]
            and recipe.inner.encoder_lr is None)  # else the inner loop itself adapts the layers
    if hold:  # build the text encoder without its transformer, then hand it the tensors
        recipe = recipe.model_copy(update={"model": config.model_copy(update={"text_trainable_layers": 0})})
    learner = build_learner(recipe, meta["modalities"], {k: int(v) for k, v in meta["heads"].items()})
    if hold:
        prefix = "learner.model.encoders.text.transformer."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        learner.model.encoders["text"].hold(state, config.text_trainable_layers)  # type: ignore[operator]
        learner.model.config = config
    load_into(learner, tensors, "learner.")
    learner.to(device)
    return learner, meta
