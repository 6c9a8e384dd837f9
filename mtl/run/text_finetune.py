"""Fine-tuning a sentence encoder's top layers with the head on a support set, and its defaults: how
many steps, and a learning rate that follows the encoder's width."""

from __future__ import annotations

import logging

import numpy as np
import torch

from mtl.data.embeddings import load_transformer, transformer_layers
from mtl.device import autocast, native_bf16
from mtl.models import MultiTaskModel
from mtl.run.adapted import HEAD
from mtl.run.select import count_or_all

log = logging.getLogger(__name__)  # progress of a long adaptation (the CLI shows it on a spinner)


ALL_LAYERS = 10_000  # `--encoder-layers all`: every transformer layer (capped at the encoder's depth)


def layer_count(layers: int | str) -> int:
    """``--encoder-layers``: a number, or ``all`` (every layer of the sentence encoder)."""
    n = count_or_all(layers, "--encoder-layers")
    return ALL_LAYERS if n is None else n


# optimizer steps of encoder fine-tuning by default, at ENCODER_LR: BANKING77 10-shot gains nothing from
# 250 steps at 1e-4 (86.16% over 3 draws) against 125 at 2e-4 (86.23%), which take 0.6x the time
ENCODER_STEPS = 125
ENCODER_LR = 2e-4  # for all-MiniLM-L6-v2's width, ENCODER_WIDTH; a wider encoder gets proportionally less
ENCODER_WIDTH = 384


def encoder_lr_for(encoder: str, lr: float | None = None) -> float:
    """``lr`` if given, else :data:`ENCODER_LR` scaled by :data:`ENCODER_WIDTH` / the encoder's width.

    A wider encoder's fine-tuning moves further per step: Adam moves every weight by about the learning
    rate, so a layer summing twice as many inputs changes its outputs about twice as much. all-mpnet-base-v2
    (768) then gets 1e-4: ``--select`` on six development tasks 90.44% against 90.03% at 2e-4, its
    fine-tuning alone 88.24% against 86.76% (docs/BENCHMARKS.md)."""
    if lr is not None:
        return lr
    return ENCODER_LR * ENCODER_WIDTH / int(load_transformer(encoder)[0].config.hidden_size)


def auto_epochs(batches: int) -> int:
    """Epochs for about :data:`ENCODER_STEPS` optimizer steps, 5 to 30: a 15-way 5-shot support set
    (3 batches) gets 30 epochs, a 77-way 10-shot one (25 batches) 5, so a large support set is not
    fine-tuned for minutes past the point where it stops gaining."""
    return min(30, max(5, -(-ENCODER_STEPS // max(batches, 1))))


def tune_text_encoder(model: MultiTaskModel, texts: list[str], ys: torch.Tensor, layers: int, epochs: int | None,
                      lr: float, seed: int, precision: str = "auto") -> None:
    """Fine-tune the top ``layers`` of the text encoder with the trunk and the adapted head on the
    support set (cross-entropy, AdamW): what lifts text tasks past a frozen encoder's ceiling.

    The lower layers' outputs are computed once, so an epoch costs the top layers only. Layers that
    meta-training already trained keep training (``layers`` is at least their number): everything
    below ``text_trainable_layers`` must stay pretrained, as cached token states stand in for it.
    ``precision``: ``auto`` runs the layers under bf16 autocast where bf16 is native (weights and the
    optimizer stay fp32), else ``fp32`` or ``bf16`` as given. ``epochs``: None for :func:`auto_epochs`.
    """
    encoder = model.encoders["text"]
    if layers >= ALL_LAYERS:
        layers = len(transformer_layers(load_transformer(model.config.text_encoder)[0]))
    layers = max(layers, encoder.trainable_layers)
    encoder.set_trainable(layers)
    model.config = model.config.model_copy(update={"text_trainable_layers": layers})
    batches = encoder.lower_states(texts)
    epochs = epochs or auto_epochs(len(batches))
    log.info("fine-tuning %d layers of the text encoder: %d epochs of %d examples", layers, epochs, len(texts))
    top = [p for p in encoder.parameters() if p.requires_grad]
    rest = [p for n, p in model.named_parameters() if not n.startswith("encoders.") and
            (not n.startswith("heads.") or n.startswith(f"heads.{HEAD}."))]
    opt = torch.optim.AdamW([{"params": top, "lr": lr}, {"params": rest, "lr": lr}], weight_decay=0.01)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)  # dropout: same seed, same model
    encoder.dropout = True
    model.train()
    if precision == "auto":
        precision = "bf16" if native_bf16(ys.device) else "fp32"
    with torch.enable_grad():
        for _ in range(epochs):
            for j in rng.permutation(len(batches)):
                idx, hidden, mask = batches[j]
                with autocast(ys.device, precision):
                    logits = model.heads[HEAD](model.from_encoding(encoder.upper(hidden, mask), "text"))
                loss = torch.nn.functional.cross_entropy(logits.float(), ys[idx.to(ys.device)])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    encoder.dropout = False
    model.eval()
