"""Pretrained transformer sentence encoders (all-MiniLM-L6-v2 by default), frozen or with their top
layers trained."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from mtl.data.embeddings import (
    EncoderWeights,
    TokenStates,
    TokenStore,
    embed_texts,
    encoder_dim,
    load_transformer,
    lower_token_states,
    mean_pool,
    transformer_layers,
)
from mtl.errors import MtlError
from mtl.models.encoders.registry import register_encoder

if TYPE_CHECKING:
    from mtl.models.multitask import ModelConfig


class HeldState(nn.Module):
    """A module's tensors without its code: buffers nested under the same names, so the
    ``state_dict`` of a model holding it has the keys the real module would give."""

    def __init__(self, state: dict[str, Tensor]) -> None:
        super().__init__()
        for name, tensor in state.items():
            *path, leaf = name.split(".")
            module: nn.Module = self
            for part in path:
                if part not in module._modules:
                    module.add_module(part, nn.Module())
                module = module._modules[part]  # type: ignore[assignment]
            module.register_buffer(leaf, tensor)


class TextEncoder(nn.Module):
    """A pretrained transformer (all-MiniLM-L6-v2 by default) with mean pooling.

    Frozen by default: ``forward`` then accepts precomputed sentence embeddings (a float tensor),
    which training reads from a disk cache (:mod:`mtl.data.embeddings`). With ``trainable_layers = n``
    the top ``n`` transformer layers are trained in the outer loop and ``forward`` takes strings, or
    the cached :class:`TokenStates` that enter those layers (what training feeds it). A meta-learned
    encoder that adaptation leaves alone is ``hold``-ed: cached embeddings again, its weights kept.
    """

    def __init__(self, name: str = "minilm", trainable_layers: int = 0, checkpointing: bool = False) -> None:
        super().__init__()
        self.name = name
        self.checkpointing = checkpointing  # recompute the trainable layers' activations in backward
        self.trainable_layers = trainable_layers
        self.out_dim = encoder_dim(name)
        self.transformer: nn.Module | None = None
        self.weights: EncoderWeights | None = None  # see `hold`
        self.dropout = False  # see `train`
        if trainable_layers > 0:
            self.set_trainable(trainable_layers)

    def hold(self, state: dict[str, Tensor], layers: int) -> None:
        """Keep a meta-learned encoder (``state``: its transformer's tensors, ``layers`` trained) as a
        fixed function of the text, without building it: for adaptation that leaves the encoder
        alone. Its sentence embeddings come from the disk cache, keyed by a digest of ``state``, so
        a warm cache skips importing transformers and running the layers (what makes ``adapt``
        fast); ``state_dict`` still holds every tensor, so the saved model is complete."""
        self.transformer = HeldState(state)
        self.weights = EncoderWeights.of(state)
        self.trainable_layers = layers

    @property
    def reads_embeddings(self) -> bool:
        """``forward`` maps texts to cached sentence embeddings (frozen or held encoder)."""
        return self.transformer is None or isinstance(self.transformer, HeldState)

    def embed(self, texts: Sequence[str], cache: bool = True) -> Tensor:
        return embed_texts(list(texts), self.name, self.weights, cache)

    def set_trainable(self, layers: int) -> None:
        """Train the top ``layers`` transformer layers; ``forward`` then takes strings."""
        if self.reads_embeddings:
            held = self.transformer.state_dict() if self.transformer is not None else None
            device = next(itertools.chain(self.parameters(), self.buffers()), torch.empty(0)).device
            shared, self.tokenizer = load_transformer(self.name)
            # a private copy: the shared instance stays frozen, so cached embeddings stay valid
            self.transformer = copy.deepcopy(shared).to(device)
            # eager attention is twice differentiable (second-order MAML through the layers: the fused
            # CPU attention kernel has no double backward), and no slower at sentence lengths
            if hasattr(self.transformer, "set_attn_implementation"):
                self.transformer.set_attn_implementation("eager")
            else:
                self.transformer.config._attn_implementation = "eager"
            if held is not None:
                self.transformer.load_state_dict(held)
            self.weights = None
        assert self.transformer is not None
        n_layers = len(transformer_layers(self.transformer))
        if not 1 <= layers <= n_layers:
            raise MtlError(f"the text encoder has {n_layers} layers; {layers} cannot be trained",
                           f"train between 1 and {n_layers} layers")
        self.trainable_layers = layers
        for p in self.transformer.parameters():
            p.requires_grad_(False)
        for layer in transformer_layers(self.transformer)[-layers:]:
            for p in layer.parameters():
                p.requires_grad_(True)

    def _tokens(self, texts: Sequence[str]) -> dict[str, Tensor]:
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=128, return_tensors="pt")
        assert self.transformer is not None
        device = next(self.transformer.parameters()).device
        return {k: v.to(device) for k, v in batch.items()}

    @torch.no_grad()
    def lower_states(self, texts: Sequence[str], batch_size: int = 32) -> list[tuple[Tensor, Tensor, Tensor]]:
        """(row indices, hidden states entering the trainable layers, attention mask) of length-sorted
        batches: computed once, so that an epoch of fine-tuning runs the trainable layers only. From
        this encoder's own layers, unlike :func:`mtl.embeddings.token_states` (the pretrained ones)."""
        assert self.transformer is not None
        start = len(transformer_layers(self.transformer)) - self.trainable_layers
        arrays = lower_token_states(self.transformer, self.tokenizer, list(texts), start, np.float32)
        device = next(self.transformer.parameters()).device
        store = TokenStore(torch.from_numpy(arrays["tokens"]), torch.from_numpy(arrays["offsets"])).to(device)
        order = np.argsort([len(t) for t in texts], kind="stable")
        out = []
        for i in range(0, len(texts), batch_size):
            idx = torch.as_tensor(order[i:i + batch_size])
            states = store[idx.to(device)]
            out.append((idx, states.hidden, states.mask))
        return out

    def upper(self, hidden: Tensor, mask: Tensor) -> Tensor:
        """Sentence embeddings from :meth:`lower_states`: the trainable layers, then mean pooling."""
        assert self.transformer is not None
        additive = (1.0 - mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        for layer in transformer_layers(self.transformer)[-self.trainable_layers:]:
            if self.checkpointing and torch.is_grad_enabled():
                hidden = checkpointed(layer, hidden, additive)
            else:
                hidden = layer(hidden, attention_mask=additive)
                hidden = hidden[0] if isinstance(hidden, tuple) else hidden  # older transformers return tuples
        return mean_pool(hidden, mask)

    def train(self, mode: bool = True) -> TextEncoder:
        """Meta-learning runs episodes, validation included, in training mode (for batch norm's
        episodic statistics); the transformer's dropout stays off unless ``dropout`` is set, so the
        same episode gives the same accuracy."""
        super().train(mode)
        if self.transformer is not None and not self.dropout:
            self.transformer.eval()
        return self

    def forward(self, x: Tensor | Sequence[str] | TokenStates) -> Tensor:
        if isinstance(x, TokenStates):
            return self.upper(x.hidden, x.mask)
        if isinstance(x, Tensor):
            if not self.reads_embeddings:
                raise ValueError("a text encoder with trainable layers takes strings, not embeddings")
            return x.float()
        if self.reads_embeddings:
            return self.embed(x)
        batch = self._tokens(x)
        out = self.transformer(**batch).last_hidden_state
        return mean_pool(out, batch["attention_mask"])


def checkpointed(layer: nn.Module, hidden: Tensor, additive: Tensor) -> Tensor:
    """``layer(hidden)``, its activations recomputed in the backward pass instead of stored (what lets
    every layer be meta-learned in memory). The layer's weights enter the checkpoint as inputs, so the
    recomputation uses the forward pass's weights even under ``functional_call`` (an inner loop's fast
    weights); ``torch.utils.checkpoint`` alone re-reads the module, whose own weights are back by then."""
    names, weights = zip(*layer.named_parameters(), strict=True)

    def run(h: Tensor, *ws: Tensor) -> Tensor:
        out = functional_call(layer, dict(zip(names, ws, strict=True)), (h,), {"attention_mask": additive})
        return out[0] if isinstance(out, tuple) else out

    return checkpoint(run, hidden, *weights, use_reentrant=False)


@register_encoder("minilm", "text")
def minilm(config: ModelConfig) -> TextEncoder:
    """all-MiniLM-L6-v2 (384 wide), shipped as a Python package; mean pooling."""
    return TextEncoder("minilm", config.text_trainable_layers, config.text_checkpointing)
