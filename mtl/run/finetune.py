"""Plain fine-tuning, the baseline a text user would otherwise pick: the pretrained sentence encoder
with a new linear head, every layer fine-tuned on the support set (AdamW, cross-entropy), no
meta-learning anywhere. ``compare --methods ...,finetune`` runs it on the very episodes the
meta-learned checkpoints see.

The head starts from the support set's class prototypes (unit-norm mean embeddings, scaled as the
model scales sentence embeddings), the usual strong start; the encoder is a fresh copy of the
pretrained one for every episode, so episodes are independent.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F

from mtl.data.embeddings import load_transformer, mean_pool

SCALE = 10.0  # the scale of normalised sentence embeddings before a linear head (as MultiTaskModel's)


def finetune_probs(texts_s: list[str], ys: np.ndarray, texts_q: list[str], encoder: str = "minilm",
                   epochs: int = 10, lr: float = 5e-5, batch_size: int = 16, seed: int = 0,
                   device: torch.device | str = "cpu") -> np.ndarray:
    """Query probabilities after fine-tuning the whole encoder and a prototype-initialised head."""
    shared, tok = load_transformer(encoder)
    model = copy.deepcopy(shared).to(device).train()
    torch.manual_seed(seed)
    y = torch.as_tensor(ys, dtype=torch.long, device=device)
    ways = int(y.max()) + 1

    def embed(texts: list[str]) -> torch.Tensor:
        batch = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt").to(device)
        return F.normalize(mean_pool(model(**batch).last_hidden_state, batch["attention_mask"]), dim=-1) * SCALE

    with torch.no_grad():
        e = embed(texts_s)
        protos = torch.zeros(ways, e.shape[1], device=device).index_add_(0, y, e) / torch.bincount(y).unsqueeze(1)
    head = torch.nn.Linear(e.shape[1], ways).to(device)
    with torch.no_grad():  # a scaled nearest-prototype rule (2<x, c> - |c|^2) as a linear layer
        head.weight.copy_(2 * protos / SCALE)
        head.bias.copy_(-(protos / SCALE).pow(2).sum(1))
    opt = torch.optim.AdamW([{"params": model.parameters(), "lr": lr}, {"params": head.parameters(), "lr": lr * 20}],
                            weight_decay=0.01)
    rng = np.random.default_rng(seed)
    with torch.enable_grad():
        for _ in range(epochs):
            order = rng.permutation(len(texts_s))
            for i in range(0, len(order), batch_size):
                idx = order[i:i + batch_size]
                loss = F.cross_entropy(head(embed([texts_s[j] for j in idx])), y[torch.as_tensor(idx, device=device)])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(texts_q), 128):
            out.append(torch.softmax(head(embed(texts_q[i:i + 128])).float(), dim=1).cpu().numpy())
    return np.concatenate(out)
