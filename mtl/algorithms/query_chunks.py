"""The query loss differentiated a piece of the query set at a time (``inner.query_chunks``).

In second-order MAML on few-shot images the query set's graph, not the inner loop's, is most of the
memory: 5-way 1-shot has 5 support and 75 query images (docs/BENCHMARKS.md, "Memory against inner
steps"). The query loss reaches the meta-parameters only through the fast weights (and, when the
encoder ran once for the episode, the query's encoding), plus any parameter the query forward reads
directly. So the graph is cut there: each piece of the query set is forwarded from detached copies
of those tensors and differentiated into them at once, freeing its graph, and the summed gradients
are handed to the outer backward by a surrogate whose value is the query loss and whose gradient is
theirs. Peak memory holds one piece's graph; the meta-gradient is exact, because batch norm
normalises queries with the support set's statistics (``bn: support``), so queries never interact.
Each piece is forwarded beside the support set, which those statistics need: the cost is the
support set's forward once more per extra piece.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from mtl.data.inputs import take

if TYPE_CHECKING:
    from mtl.algorithms.inner import Algorithm
    from mtl.data.stream import TaskBatch


def _cut(t: Tensor | None) -> Tensor | None:
    return t.detach().requires_grad_() if t is not None and t.requires_grad else t


def _rows(t: Tensor | None, rows: slice) -> Tensor | None:
    return None if t is None else t[rows]


def query_loss_in_pieces(algo: Algorithm, b: TaskBatch, fast: dict[str, Tensor], step: int, fq: Tensor | None,
                         encoded_query: Tensor | None, pieces: int) -> tuple[Tensor, Tensor]:
    """The mean query cross-entropy after ``step`` inner steps, whose backward gives the same
    gradients as the whole query set's, and the query logits (detached)."""
    cut_fast = {k: _cut(v) for k, v in fast.items()}
    cut_fq, cut_eq = _cut(fq), _cut(encoded_query)
    # (tensor of the graph, its detached copy that the pieces read)
    pairs = [(t, c) for t, c in zip((*fast.values(), fq, encoded_query), (*cut_fast.values(), cut_fq, cut_eq),
                                    strict=True) if c is not None and c.requires_grad]
    leaves = [p for p in algo.parameters() if p.requires_grad]  # read directly (per-step batch norm...)
    inputs = [c for _, c in pairs] + leaves
    n = len(b.yq)
    grads: list[Tensor | None] = [None] * len(inputs)
    total = torch.zeros((), device=b.yq.device)
    logits = []
    bounds = [round(i * n / min(pieces, n)) for i in range(min(pieces, n) + 1)]
    for i, (start, stop) in enumerate(itertools.pairwise(bounds)):
        rows = slice(start, stop)
        piece = dataclasses.replace(b, xq=take(b.xq, rows), yq=b.yq[rows])
        algo.replaying = i > 0  # per-step batch-norm statistics are collected once, as from the whole set
        try:
            z = algo.query_logits(piece, cut_fast, step, _rows(cut_fq, rows), _rows(cut_eq, rows))
        finally:
            algo.replaying = False
        loss = F.cross_entropy(z, piece.yq, reduction="sum") / n
        for j, g in enumerate(torch.autograd.grad(loss, inputs, allow_unused=True)):
            if g is not None:
                prev = grads[j]
                grads[j] = g if prev is None else prev + g
        total = total + loss.detach()
        logits.append(z.detach())
    targets = [t for t, _ in pairs] + leaves  # where each summed gradient belongs in the outer graph
    surrogate = sum(((t * g.to(t.dtype)).sum() for t, g in zip(targets, grads, strict=True) if g is not None),
                    torch.zeros((), device=total.device))
    return total + surrogate - surrogate.detach(), torch.cat(logits)
