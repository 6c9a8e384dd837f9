"""The symmetries of the square as test-time views of an image episode.

A model meta-trained with each rotation of a character as a class of its own (``image.rotations``)
has met turned drawings as ordinary ones, so an episode turned as a whole, support and queries alike,
is a like problem whose errors differ from the original's. Answering with the views' mean
log-probability errs less: on Lake's within-alphabet one-shot challenge, 8 views lowered the error of
the same checkpoint on the same episodes (docs/BENCHMARKS.md). Turning only the support drawings, or
distorting them, blurs the prototypes instead (measured and not kept).

``adapt`` does the same for a new image task by default: one model adapted to each view of the support set,
each answering that view of an input (:class:`mtl.run.adapted.AdaptedModel`). There it helps models trained
without rotations too, as an ensemble of like problems (docs/BENCHMARKS.md, "Eight views of a new image task").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from mtl.data.stream import TaskBatch
from mtl.errors import MtlError

VIEWS = (1, 4, 8)  # the original; its 4 rotations by 90 degrees; those and their mirror images


def turned(x: Tensor, view: int) -> Tensor:
    """Images ``x`` turned by 90 degrees ``view % 4`` times, mirrored first from view 4 on. ``x`` is laid out
    as the encoders read it (:func:`mtl.models.encoders.conv.pixels`): (N, H, W), (N, C, H, W), or colour
    as decoded, (N, H, W, 3)."""
    dims = (1, 2) if x.dim() == 4 and x.shape[-1] == 3 and x.shape[1] != 3 else (-2, -1)
    return torch.rot90(x.flip(dims[1]) if view >= 4 else x, view % 4, dims=dims)


def episode_view(b: TaskBatch, view: int) -> TaskBatch:
    """Episode ``b`` with every image, support and query, turned as :func:`turned` says."""
    return dataclasses.replace(b, xs=turned(b.xs, view), xq=turned(b.xq, view))  # type: ignore[arg-type]


def together(logits: Sequence[Tensor]) -> Tensor:
    """One answer from each view's logits: the logits themselves for one view, else the views' mean
    log-probability (unnormalised: a softmax of it, or a temperature, reads it as logits)."""
    if len(logits) == 1:
        return logits[0].float()
    return torch.stack([torch.log_softmax(z.float(), 1) for z in logits]).mean(0)


def answered(logits: Callable[[TaskBatch], Tensor], b: TaskBatch, views: int) -> Tensor:
    """``logits`` of episode ``b``'s queries as they come (1 view), or :func:`together` over ``views``
    turned copies of the whole episode."""
    return together([logits(episode_view(b, v) if v else b) for v in range(views)])


def check_views(views: int, modality: str) -> None:
    """A one-line error for a number of views that is not one of :data:`VIEWS`, or views of texts."""
    if views not in VIEWS:
        raise MtlError(f"--views {views} is not a number of views", "use 1, 4 (rotations) or 8 (and mirror images)")
    if views > 1 and modality != "image":
        raise MtlError("--views turns images; this task has texts", "leave --views out for text tasks")
