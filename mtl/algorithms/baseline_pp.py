"""Baseline++ (Chen et al., 2019, "A Closer Look at Few-shot Classification"): standard training over
every training class with a cosine classifier, then a new cosine head for the new task.

The new head starts from the support set's class means (weight imprinting) and is fine-tuned with
the shared inner loop; the paper fine-tunes the head alone (``inner.adapt: head``), the default
here fine-tunes everything the recipe's ``inner.adapt`` names.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtl.algorithms.inner import InnerConfig
from mtl.algorithms.multitask import MultiTask
from mtl.algorithms.registry import algorithm
from mtl.data.inputs import Inputs
from mtl.models import head_key
from mtl.models.heads import cosine_logits


@algorithm("baseline_pp")
class BaselinePlusPlus(MultiTask):
    """Baseline++: joint training with cosine-similarity heads, then a new cosine head fine-tuned."""

    scale = 10.0  # cosine logits are scaled so that softmax can be confident

    @classmethod
    def configure(cls, inner: InnerConfig) -> InnerConfig:
        return inner if "head_init" in inner.model_fields_set else inner.model_copy(update={"head_init": "proto"})

    head_kind = "cosine"

    def head_logits(self, feats: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        return cosine_logits(feats, weight, self.scale)

    def head_from_prototypes(self, protos: Tensor) -> tuple[Tensor, Tensor]:
        return protos, torch.zeros(len(protos), device=protos.device, dtype=protos.dtype)

    def class_logits(self, x: Inputs, modality: str, task: str) -> Tensor:
        head = self.model.heads[head_key(task)]
        return self.head_logits(self.model.features(x, modality), head.weight, head.bias)
