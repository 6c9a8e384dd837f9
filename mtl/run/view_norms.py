"""Batch-norm statistics that an image episode's views share: those of the support set in all its turns.

With ``--views``, each turned copy of an episode is adapted to and answered on its own (:mod:`mtl.data.views`),
and each copy's batch norms used to normalise with the statistics of that copy's support set alone: 20
drawings in a 20-way 1-shot episode, 5 in a 5-way one. The turns show the same drawings, so their statistics
estimate the same thing; pooled over the 8 views they come from 8 times as many images, and every view is
normalised alike. On Lake's within-alphabet one-shot challenge this lowered the error of the same checkpoints
on the same episodes, and off it changed nothing beyond the noise (docs/BENCHMARKS.md, "The views' batch-norm
statistics shared"). Checkpoints with MAML++'s per-step running statistics keep theirs, and so does an inner loop
whose gradient steps change the image encoder (:func:`shares`).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from mtl.algorithms import Algorithm
from mtl.data.views import turned
from mtl.models.batchnorm import EpisodicBatchNorm2d, setting, step_statistics

Rows = dict[str, tuple[Tensor, Tensor]]  # batch norm's name -> (mean, biased variance) per channel


def shares(learner: Algorithm, views: int, steps: int | None = None) -> bool:
    """Whether ``views`` copies of an episode can share statistics: more than one view, batch norms that take
    theirs from the support set (not MAML++'s per-step running statistics), and an image encoder that the
    ``steps`` of the inner loop (default: the checkpoint's) leave unchanged. Where gradient steps change the
    encoder, the batch norms must follow its activations, as in meta-training: with the statistics held fixed a
    MAML checkpoint's steps can make them diverge (an Olivetti 3-shot draw did, docs/BENCHMARKS.md)."""
    steps = learner.eval_steps if steps is None else steps
    moves = steps > 0 and any(n.startswith("encoders.image.") for n in learner.adapted_names("image"))
    return views > 1 and not moves and not learner.inner.per_step_bn_stats and any(
        isinstance(m, EpisodicBatchNorm2d) for m in learner.model.modules())


@torch.no_grad()
def view_statistics(learner: Algorithm, xs: Tensor, views: int) -> Rows:
    """Every batch norm's statistics over the support images ``xs`` in all ``views`` turns, each layer's taken
    from the layer below normalised with its own pooled statistics: the per-step statistics' collection
    (:func:`mtl.models.batchnorm.step_statistics`) run once, with momentum 1. Under the caller's autocast.
    Images that are not square turn into two shapes, which one pass cannot hold: each shape's views are then
    collected apart and their statistics pooled (the layers below normalised by their own shape's)."""
    model = learner.model
    shapes: dict[tuple[int, ...], list[Tensor]] = {}
    for v in range(views):
        x = turned(xs, v)
        shapes.setdefault(tuple(x.shape), []).append(x)
    parts = []
    for group in shapes.values():
        rows = {n: (torch.zeros(m.num_features, device=xs.device), torch.ones(m.num_features, device=xs.device))
                for n, m in model.named_modules() if isinstance(m, EpisodicBatchNorm2d)}
        # batch norms collect in training mode only (in eval mode they read their running statistics)
        with setting(model, EpisodicBatchNorm2d, "momentum_of_steps", 1.0), \
                setting(model, EpisodicBatchNorm2d, "training", True), \
                setting(model, EpisodicBatchNorm2d, "stats_rows", None), step_statistics(model, rows, "collect"):
            model.encoders["image"](torch.cat(group))
        parts.append((len(group) / views, rows))
    if len(parts) == 1:
        return parts[0][1]
    pooled = {}
    for n in parts[0][1]:
        mean = sum(w * r[n][0] for w, r in parts)
        pooled[n] = (mean, (sum(w * (r[n][1] + r[n][0] ** 2) for w, r in parts) - mean**2).clamp_min(0))
    return pooled  # type: ignore[return-value]


def shared_rows(learner: Algorithm, xs: Tensor, views: int, share: bool, steps: int | None = None) -> Rows | None:
    """:func:`view_statistics` where ``share`` is asked for and :func:`shares` allows it, else None."""
    return view_statistics(learner, xs, views) if share and shares(learner, views, steps) else None


def normalising_with(learner: Algorithm, rows: Rows | None) -> contextlib.AbstractContextManager[None]:
    """Within the block, every batch norm normalises with ``rows`` (nothing changes for None)."""
    return contextlib.nullcontext() if rows is None else step_statistics(learner.model, rows, "use")


def episode_shared(learner: Algorithm, xs: Tensor, views: int, share: bool, steps: int | None = None
                   ) -> contextlib.AbstractContextManager[None]:
    """Within the block, every view of the episode whose support images are ``xs`` is normalised with their
    :func:`view_statistics` (where ``share`` and :func:`shares`)."""
    return normalising_with(learner, shared_rows(learner, xs, views, share, steps))


@torch.no_grad()
def keep_statistics(model: torch.nn.Module, rows: Rows) -> None:
    """Store ``rows`` as the batch norms' running statistics: what an adapted model in eval mode normalises with."""
    for name, m in model.named_modules():
        if isinstance(m, EpisodicBatchNorm2d) and name in rows:
            m.running_mean.copy_(rows[name][0])  # type: ignore[union-attr]
            m.running_var.copy_(rows[name][1])  # type: ignore[union-attr]
