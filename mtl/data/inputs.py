"""Model-ready inputs of a task split, on the device, indexed by example number.

Images stay uint8 (the encoder scales them). Text becomes cached sentence embeddings when the text
encoder is frozen, or the cached hidden states entering its trainable top layers when some train
(:class:`~mtl.embeddings.TokenStates`): either way the frozen part of the transformer runs once per
text, not once per episode.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from mtl.data.embeddings import TokenStates, TokenStore, embed_texts, token_states
from mtl.data.task import Split

Inputs = Tensor | TokenStates | list[str]


class SplitInputs:
    def __init__(self, split: Split, modality: str, device: torch.device, text_encoder: str = "minilm",
                 text_layers: int = 0) -> None:
        """``text_layers``: how many top layers of the text encoder train (0: frozen)."""
        self.modality = modality
        self.data: Tensor | TokenStore
        if modality == "image":
            self.data = torch.from_numpy(np.ascontiguousarray(split.inputs)).to(device)
        elif text_layers == 0:
            self.data = embed_texts(split.inputs.tolist(), text_encoder).to(device)
        else:
            self.data = token_states(split.inputs.tolist(), text_encoder, text_layers).to(device)
        self.device = device

    def __getitem__(self, idx: np.ndarray | Sequence[int]) -> Tensor | TokenStates:
        return self.data[torch.as_tensor(np.asarray(idx), device=self.device)]


def concat(a: Inputs, b: Inputs) -> Inputs:
    if isinstance(a, TokenStates):
        return TokenStates.cat(a, b)  # type: ignore[arg-type]
    return torch.cat([a, b]) if isinstance(a, Tensor) else list(a) + list(b)  # type: ignore[list-item]


def take(x: Inputs, rows: slice) -> Inputs:
    """Rows ``rows`` of a batch of inputs, whatever their kind."""
    if isinstance(x, TokenStates):
        return TokenStates(x.hidden[rows], x.mask[rows])
    return x[rows]
