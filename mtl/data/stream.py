"""Training data as tensors: meta-batches of episodes (meta-learning) and task-balanced batches over
all classes (joint training); the bridge from registry tasks to the algorithms.

Which registry task and which episode make up slot ``b`` of iteration ``it`` depends only on
``(seed, it, b)``, so a resumed or a distributed run sees exactly the episodes of a plain run.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from mtl.data.augment import augment
from mtl.data.episodes import Episode, EpisodeSampler, listed
from mtl.data.inputs import Inputs, SplitInputs
from mtl.data.task import Task


@dataclass
class TaskBatch:
    """One episode as tensors on the device: what every algorithm's inner loop takes."""

    task: str
    modality: str
    xs: Inputs
    ys: Tensor
    xq: Inputs
    yq: Tensor
    raw: tuple[list[str], list[str]] | None = None  # text episodes: the support and query texts themselves

    @property
    def ways(self) -> int:
        return int(self.ys.max()) + 1


def warn_left_out(stream: EpisodeStream, purpose: str) -> None:
    """One warning per task whose classes too small for an episode (fewer than shots + queries examples) are left
    out of the ``purpose`` episodes: a registry's uneven task trains on the rest instead of stopping."""
    for sampler in stream.samplers:
        if sampler.left_out:
            warnings.warn(f"task '{sampler.tasks[0].name}': {len(sampler.left_out)} classes with fewer than "
                          f"{sampler.shots + sampler.queries} examples in split '{sampler.split}' (shots + queries) "
                          f"left out of the {purpose} episodes ({listed(sampler.left_out)})", stacklevel=2)


class EpisodeStream:
    def __init__(self, tasks: Sequence[Task], split: str | dict[str, str] | None, ways: int, shots: int,
                 queries: int, seed: int, device: torch.device, text_encoder: str = "minilm",
                 text_layers: int = 0, cap_ways: bool = True, skip_small: bool = False,
                 augment: str | None = None, within_groups: float = 0.0) -> None:
        """``split``: one split name, or one per task; ``None`` uses each task's train split.
        ``cap_ways`` lowers ``ways`` for tasks with fewer classes (training on mixed registries);
        ``skip_small`` leaves out classes too small for an episode (see :class:`EpisodeSampler`);
        ``augment``: distort the images of drawn episodes (:mod:`mtl.data.augment`; not ``fixed`` ones);
        ``within_groups``: the share of episodes drawn within one group of classes (:class:`EpisodeSampler`)."""
        self.tasks = list(tasks)
        self.seed = seed
        self.augment = augment
        self.samplers: list[EpisodeSampler] = []
        self.inputs: list[SplitInputs] = []
        for i, t in enumerate(self.tasks):
            name = (split.get(t.name) if isinstance(split, dict) else split) or t.spec.train_split
            counts = t.split(name).counts()
            n_classes = sum(n >= shots + queries for n in counts.values()) if skip_small else len(counts)
            n_ways = min(ways, max(n_classes, 2)) if cap_ways else ways  # too few left: the sampler says so
            self.samplers.append(EpisodeSampler(t, name, n_ways, shots, queries, seed=seed * 1000 + i,
                                                skip_small=skip_small, within_groups=within_groups))
            self.inputs.append(SplitInputs(t.split(name), t.modality, device, text_encoder, text_layers))
        self.device = device

    def ways_of(self, task: str) -> int:
        return next(s.ways for s, t in zip(self.samplers, self.tasks, strict=True) if t.name == task)

    def to_batch(self, pos: int, ep: Episode) -> TaskBatch:
        inp = self.inputs[pos]
        t = self.tasks[pos]
        ys = torch.as_tensor(ep.support_y, device=self.device)
        yq = torch.as_tensor(ep.query_y, device=self.device)
        raw = (ep.support_x.tolist(), ep.query_x.tolist()) if t.modality == "text" else None
        return TaskBatch(t.name, t.modality, inp[ep.support_src[:, 1]], ys, inp[ep.query_src[:, 1]], yq, raw)

    def slot(self, iteration: int, slot: int) -> TaskBatch:
        """Slot ``slot`` of meta-batch ``iteration``: a task chosen uniformly, then its next episode."""
        rng = np.random.default_rng([self.seed, iteration, slot])
        pos = int(rng.integers(len(self.tasks)))
        episode_index = int(rng.integers(2**62))
        b = self.to_batch(pos, self.samplers[pos].sample(episode_index))
        if self.augment and b.modality == "image":
            b.xs = augment(self.augment, b.xs, (self.seed, iteration, slot, 0))  # type: ignore[arg-type]
            b.xq = augment(self.augment, b.xq, (self.seed, iteration, slot, 1))  # type: ignore[arg-type]
        return b

    def meta_batch(self, iteration: int, size: int, slots: Sequence[int] | None = None) -> list[TaskBatch]:
        return [self.slot(iteration, b) for b in (slots if slots is not None else range(size))]

    def fixed(self, n: int) -> list[TaskBatch]:
        """``n`` episodes spread over the tasks, the same every call (validation)."""
        return [self.to_batch(i % len(self.tasks), self.samplers[i % len(self.tasks)].sample(i)) for i in range(n)]


class ClassBatches:
    """Task-balanced batches over all of each task's classes (joint training): ``examples_per_step``
    split evenly over the tasks; the batch of task ``pos`` at ``iteration`` depends only on
    ``(seed, iteration, pos)``."""

    def __init__(self, tasks: Sequence[Task], examples_per_step: int, seed: int, device: torch.device,
                 text_encoder: str = "minilm", text_layers: int = 0) -> None:
        self.tasks = list(tasks)
        self.per_task = max(1, examples_per_step // len(self.tasks))
        self.seed = seed
        self.device = device
        self.inputs = [SplitInputs(t.train, t.modality, device, text_encoder, text_layers) for t in self.tasks]
        self.labels = [torch.as_tensor(t.train.labels, device=device) for t in self.tasks]

    def batch(self, iteration: int, pos: int) -> tuple[Tensor | Inputs, Tensor]:
        rng = np.random.default_rng([self.seed, iteration, pos])
        n = len(self.labels[pos])
        idx = rng.choice(n, min(self.per_task, n), replace=False)
        return self.inputs[pos][idx], self.labels[pos][torch.as_tensor(idx, device=self.device)]
