#!/usr/bin/env python3
"""How much fine-tuning the top layers of the text encoder on the support set adds.

Measures the next step for issue 3's text targets: all-MiniLM-L6-v2 with its top ``--layers``
transformer layers and a cosine-softmax head (rows initialised from the support prototypes) trained
with cross-entropy on K shots per class; the lower layers' outputs are computed once and cached, so
an epoch costs only the top layers. Accuracy on the task's whole test split after every 5 epochs.
With ``--pretrain TASK``, the same layers are first trained with cross-entropy on all of another
task's training split (intent pre-training, e.g. CLINC150's 15,000 examples before BANKING77).

    python benchmarks/text_encoder_finetune.py --task clinc150-work --shots 5 --layers 2 --epochs 30
    python benchmarks/text_encoder_finetune.py --task banking77 --shots 10 --layers 6 --epochs 20
    python benchmarks/text_encoder_finetune.py --task banking77 --shots 10 --layers 6 --epochs 20 \
        --pretrain clinc150 --pretrain-epochs 1
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mtl.data.registry import Registry
from mtl.models import TextEncoder


def pretrain(encoder: TextEncoder, top: list[Tensor], name: str, epochs: int) -> float:
    """Cross-entropy on every training example of task ``name`` through a cosine head (scale 20),
    the encoder's layers at 5e-5 with warm-up and linear decay; returns the seconds it took."""
    t0 = time.perf_counter()
    split = Registry().load(name).train
    y = torch.as_tensor(split.labels)
    batches = encoder.lower_states([str(x) for x in split.inputs], 64)
    rows = torch.nn.Parameter(0.01 * torch.randn(int(y.max()) + 1, encoder.out_dim))
    opt = torch.optim.AdamW([{"params": top, "lr": 5e-5}, {"params": [rows], "lr": 1e-2}], weight_decay=0.01)
    steps = epochs * len(batches)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * max(0.0, 1 - s / steps))
    encoder.dropout = True
    encoder.train()
    for epoch in range(epochs):
        for j in np.random.default_rng(100 + epoch).permutation(len(batches)):
            idx, h, m = batches[j]
            logits = 20 * F.normalize(encoder.upper(h, m), dim=-1) @ F.normalize(rows, dim=-1).T
            loss = F.cross_entropy(logits, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    encoder.dropout = False
    encoder.train()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", required=True)
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--lr", type=float, default=1e-4, help="encoder layers' learning rate (head: 1e-2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pretrain", help="a task whose whole training split trains the layers first")
    ap.add_argument("--pretrain-epochs", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(a.seed)
    task = Registry().load(a.task)
    rng = np.random.default_rng(a.seed)
    tr = task.train
    sup = rng.permutation(np.concatenate([rng.choice(np.flatnonzero(tr.labels == c), a.shots, replace=False)
                                          for c in sorted(tr.counts())]))
    ys = torch.as_tensor(tr.labels[sup])
    yq = torch.as_tensor(task.test.labels)
    encoder = TextEncoder("minilm", trainable_layers=a.layers)  # a private copy of the pretrained encoder
    top = [p for p in encoder.parameters() if p.requires_grad]
    pretrain_seconds = pretrain(encoder, top, a.pretrain, a.pretrain_epochs) if a.pretrain else 0.0
    t0 = time.perf_counter()
    support = encoder.lower_states([str(x) for x in tr.inputs[sup]], 32)
    query = encoder.lower_states([str(x) for x in task.test.inputs], 128)
    prep = time.perf_counter() - t0

    def run_top(h: Tensor, mask: Tensor) -> Tensor:
        return F.normalize(encoder.upper(h, mask), dim=-1)

    def embed(batches: list[tuple[Tensor, Tensor, Tensor]]) -> Tensor:
        out = torch.zeros(sum(len(b[0]) for b in batches), encoder.out_dim)
        for idx, h, m in batches:
            out[idx] = run_top(h, m)
        return out

    def accuracy() -> float:
        encoder.eval()
        with torch.no_grad():
            pred = head(embed(query)).argmax(1)
        encoder.train()
        return float((pred == yq).float().mean())

    with torch.no_grad():
        es = embed(support)
    classes = int(ys.max()) + 1
    protos = torch.stack([es[ys == c].mean(0) for c in range(classes)])
    head = torch.nn.Linear(es.shape[1], classes)
    with torch.no_grad():  # a cosine classifier with temperature 10: logits = 10 * (2 p.x - |p|^2)
        head.weight.copy_(20 * protos)
        head.bias.copy_(-10 * (protos ** 2).sum(1))
    opt = torch.optim.AdamW([{"params": top, "lr": a.lr}, {"params": head.parameters(), "lr": 1e-2}],
                            weight_decay=0.01)
    curve = {0: accuracy()}
    t0 = time.perf_counter()
    for epoch in range(1, a.epochs + 1):
        for j in np.random.default_rng(epoch).permutation(len(support)):
            idx, h, m = support[j]
            loss = F.cross_entropy(head(run_top(h, m)), ys[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if epoch % 5 == 0:
            curve[epoch] = accuracy()
    print(json.dumps({"task": a.task, "shots": a.shots, "layers": a.layers, "seed": a.seed,
                      "accuracy_by_epoch": {k: round(v, 4) for k, v in curve.items()},
                      "pretrain": a.pretrain, "pretrain_epochs": a.pretrain_epochs if a.pretrain else 0,
                      "pretrain_seconds": round(pretrain_seconds, 1), "prepare_seconds": round(prep, 1),
                      "train_seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
