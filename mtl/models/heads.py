"""Task heads: a linear layer, or a cosine-similarity classifier (Baseline++)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class CosineLinear(nn.Linear):
    """``scale * cos(features, class weights)``: logits bounded by ``scale``; the bias is unused but kept
    so that state dicts have the keys of a linear head."""

    def __init__(self, in_features: int, out_features: int, scale: float = 10.0) -> None:
        super().__init__(in_features, out_features)
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return cosine_logits(x, self.weight, self.scale)


def cosine_logits(feats: Tensor, weight: Tensor, scale: float) -> Tensor:
    return scale * F.normalize(feats, dim=-1) @ F.normalize(weight, dim=-1).T


def make_head(kind: str, in_features: int, out_features: int) -> nn.Linear:
    """A zero-initialised head of ``kind`` (``linear`` or ``cosine``)."""
    head = CosineLinear(in_features, out_features) if kind == "cosine" else nn.Linear(in_features, out_features)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head
