"""Token matching: a text scored against each labelled example word by word, with no training.

Late interaction (ColBERT, Khattab and Zaharia, 2020): every token of a new text finds its most
similar token of a labelled example (cosine of the frozen encoder's last-layer token states); the
text's score for that example is the mean of those maxima, each token weighted by its rarity in the
support set (idf, as BERTScore weights them), and a class scores its best-matching example. A
sentence embedding averages the one word that tells ``card_arrival`` from ``card_delivery_estimate``
away; matching tokens keeps it, so its errors differ from the probe's and fine-tuning's. Alone it is
weaker (BANKING77 10-shot: 80.6%, the probe 85.5%), but as a third voice beside them it adds up to 0.5
points on the held-out text tasks and lowers none (means of 3 draws; docs/BENCHMARKS.md). Fitting is
one pass of the encoder over the support set.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

TAU = 0.1  # similarities (in [-1, 1]) over this: logits whose softmax is as peaked as the probe's
CHUNK = 1024  # query tokens compared with every support token at once (memory: 4 x CHUNK x support tokens bytes)


@torch.no_grad()
def token_vectors(encoder: str, texts: list[str], cached: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(unit-length last-layer token states, offsets: text i owns rows offsets[i]:offsets[i+1], token
    ids) of the frozen ``encoder``; ``cached``: through the disk cache (a task's fixed splits)."""
    from mtl.data.embeddings import load_transformer, token_states

    if not cached:
        return transformer_token_vectors(*load_transformer(encoder), texts)
    store = token_states(texts, encoder, 0)  # on a warm cache neither the model nor its tokenizer is loaded
    return torch.nn.functional.normalize(store.tokens.float(), dim=1), store.offsets, cached_token_ids(encoder, texts)


@torch.no_grad()
def transformer_token_vectors(model: torch.nn.Module, tok: object, texts: list[str]) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`token_vectors` of any transformer and its tokenizer (a fine-tuned one too)."""
    from mtl.data.embeddings import lower_token_states, transformer_layers

    arrays = lower_token_states(model, tok, texts, len(transformer_layers(model)), np.float32)
    tokens = torch.nn.functional.normalize(torch.from_numpy(arrays["tokens"]), dim=1)
    return tokens, torch.from_numpy(arrays["offsets"]), token_ids(tok, texts)


def own_token_vectors(model: torch.nn.Module, texts: list[str]) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`token_vectors` of a fine-tuned model's own transformer (``model.encoders["text"]``)."""
    encoder = model.encoders["text"]
    return transformer_token_vectors(encoder.transformer, encoder.tokenizer, texts)


def token_ids(tok: object, texts: list[str]) -> Tensor:
    """The texts' token ids, one text after another: the rows of their token states."""
    ids = tok(texts, truncation=True, max_length=128)["input_ids"]  # type: ignore[operator]
    return torch.as_tensor([i for row in ids for i in row], dtype=torch.long)


def cached_token_ids(encoder: str, texts: list[str]) -> Tensor:
    """:func:`token_ids` through the disk cache, beside the texts' cached token states."""
    from mtl.data.cache import cached_arrays
    from mtl.data.embeddings import encoder_key, load_tokenizer, text_digest

    arrays = cached_arrays("token-ids", [encoder_key(encoder), text_digest(texts), len(texts)],
                           lambda: {"ids": token_ids(load_tokenizer(encoder), texts).numpy()})
    return torch.from_numpy(arrays["ids"])


def vocabulary(encoder: str) -> int:
    """The size of ``encoder``'s tokenizer: the length of an idf table (kept in the disk cache)."""
    from mtl.data.cache import cached_arrays
    from mtl.data.embeddings import encoder_key, load_tokenizer

    arrays = cached_arrays("vocabulary", [encoder_key(encoder)],
                           lambda: {"size": np.asarray([len(load_tokenizer(encoder))])})
    return int(arrays["size"][0])


def owners(offsets: Tensor) -> Tensor:
    """The text each token row belongs to."""
    return torch.repeat_interleave(torch.arange(len(offsets) - 1), torch.diff(offsets))


class TokenMatcher:
    """The support set's token states, their examples' labels and the idf of every vocabulary entry."""

    def __init__(self, tokens: Tensor, offsets: Tensor, labels: Tensor, idf: Tensor, classes: int) -> None:
        self.tokens, self.offsets, self.labels, self.idf, self.classes = tokens, offsets, labels, idf, classes

    @classmethod
    def fit(cls, encoder: str, texts: list[str], ys: np.ndarray, classes: int) -> TokenMatcher:
        return cls.from_vectors(*token_vectors(encoder, texts), ys, classes, vocabulary(encoder))

    @classmethod
    def from_vectors(cls, tokens: Tensor, offsets: Tensor, ids: Tensor, ys: np.ndarray, classes: int, vocab: int
                     ) -> TokenMatcher:
        """From :func:`token_vectors` of the labelled texts (cross-validation computes them once);
        ``vocab``: the tokenizer's size."""
        pairs = torch.unique(torch.stack([owners(offsets), ids]), dim=1)  # each (text, token) once
        df = torch.zeros(vocab).index_add_(0, pairs[1], torch.ones(pairs.shape[1]))
        texts = len(offsets) - 1
        idf = torch.log((texts + 1.0) / (df + 1.0))  # rare in the support set: weighs more
        # copies: two matchers saved in one file (safetensors) must share no memory
        return cls(tokens.half(), offsets.clone(), torch.tensor(ys, dtype=torch.long), idf, classes)

    def scores(self, tokens: Tensor, offsets: Tensor, ids: Tensor) -> Tensor:
        """Each query text's best-example similarity per class, from its :func:`token_vectors`."""
        support = self.tokens.float()
        owner = owners(self.offsets)
        n = len(self.offsets) - 1
        weights = self.idf[ids.clamp_max(len(self.idf) - 1)]
        query_owner = owners(offsets)
        per_example = torch.zeros(len(offsets) - 1, n)
        for start in range(0, len(tokens), CHUNK):
            sim = tokens[start:start + CHUNK] @ support.T
            best = torch.full((len(sim), n), -2.0).scatter_reduce(1, owner.expand(len(sim), -1), sim, "amax")
            per_example.index_add_(0, query_owner[start:start + CHUNK], best * weights[start:start + CHUNK, None])
        per_example /= torch.zeros(len(offsets) - 1).index_add_(0, query_owner, weights).clamp_min(1e-6)[:, None]
        return torch.full((len(per_example), self.classes), -1.0).scatter_reduce(
            1, self.labels.expand(len(per_example), -1), per_example, "amax")

    def logits(self, encoder: str, texts: list[str], cached: bool = False) -> np.ndarray:
        return (self.scores(*token_vectors(encoder, texts, cached)) / TAU).numpy()

    def state_dict(self) -> dict[str, Tensor]:
        return {"tokens": self.tokens, "offsets": self.offsets, "labels": self.labels, "idf": self.idf}

    @classmethod
    def from_state(cls, state: dict[str, Tensor], classes: int) -> TokenMatcher:
        return cls(state["tokens"], state["offsets"], state["labels"], state["idf"], classes)


def take(vectors: tuple[Tensor, Tensor, Tensor], idx: np.ndarray) -> tuple[Tensor, Tensor, Tensor]:
    """The :func:`token_vectors` of texts ``idx`` only."""
    tokens, offsets, ids = vectors
    rows = torch.cat([torch.arange(int(offsets[i]), int(offsets[i + 1])) for i in idx]) if len(idx) else \
        torch.zeros(0, dtype=torch.long)
    lengths = torch.diff(offsets)[torch.as_tensor(idx, dtype=torch.long)]
    return tokens[rows], torch.cat([torch.zeros(1, dtype=offsets.dtype), torch.cumsum(lengths, 0)]), ids[rows]
