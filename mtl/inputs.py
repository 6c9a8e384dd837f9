"""Model-ready inputs of a task split, on the device, indexed by example number.

Images stay uint8 (the encoder scales them); text becomes cached sentence embeddings when the text
encoder is frozen, or stays as strings when some of its layers train.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from mtl.data import Split


class SplitInputs:
    def __init__(self, split: Split, modality: str, device: torch.device, text_encoder: str = "minilm",
                 frozen_text: bool = True) -> None:
        self.modality = modality
        self.texts: np.ndarray | None = None
        self.tensor: Tensor | None = None
        if modality == "image":
            self.tensor = torch.from_numpy(np.ascontiguousarray(split.inputs)).to(device)
        elif frozen_text:
            from mtl.embeddings import embed_texts

            self.tensor = embed_texts(split.inputs.tolist(), text_encoder).to(device)
        else:
            self.texts = split.inputs

    def __getitem__(self, idx: np.ndarray | Sequence[int]) -> Tensor | list[str]:
        if self.tensor is not None:
            return self.tensor[torch.as_tensor(np.asarray(idx), device=self.tensor.device)]
        assert self.texts is not None
        return self.texts[np.asarray(idx)].tolist()


def concat(a: Tensor | list[str], b: Tensor | list[str]) -> Tensor | list[str]:
    return torch.cat([a, b]) if isinstance(a, Tensor) else list(a) + list(b)  # type: ignore[list-item]
