"""Few-shot episodes: N classes, K support and Q query examples each, labels remapped to 0..N-1.

Episode ``i`` of a sampler depends only on ``(seed, i)``, never on what was drawn before, so runs
are reproducible, methods can be compared on the very same episodes, and workers can draw disjoint
episode indices in parallel.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mtl.data.task import Task
from mtl.errors import MtlError


@dataclass(frozen=True)
class Episode:
    """One few-shot problem. ``*_src`` are ``(pool task position, example index in its split)``
    pairs, so caches keyed by example (e.g. text embeddings) can be reused."""

    tasks: tuple[str, ...]
    classes: tuple[str, ...]
    support_x: np.ndarray
    support_y: np.ndarray
    query_x: np.ndarray
    query_y: np.ndarray
    support_src: np.ndarray
    query_src: np.ndarray

    @property
    def ways(self) -> int:
        return len(self.classes)


def listed(names: Sequence[str], most: int = 5) -> str:
    """The first ``most`` of ``names``, for a one-line message (the classes left out of episodes)."""
    return ", ".join(names[:most]) + (", ..." if len(names) > most else "")


class EpisodeSampler:
    """Draws episodes from one split of one task, or from the pooled classes of several tasks."""

    def __init__(self, tasks: Task | Sequence[Task], split: str = "train", ways: int = 5, shots: int = 1,
                 queries: int = 15, seed: int = 0, skip_small: bool = False, within_groups: float = 0.0) -> None:
        """``skip_small``: leave out classes with fewer than ``shots + queries`` examples (listed in
        ``left_out``) instead of refusing the split; an error only if fewer than ``ways`` remain.
        ``within_groups``: the share of episodes whose classes all come from one group (see :func:`class_groups`)."""
        self.tasks = [tasks] if isinstance(tasks, Task) else list(tasks)
        if not self.tasks:
            raise MtlError("no tasks to draw episodes from", "name at least one task")
        modalities = {t.modality for t in self.tasks}
        if len(modalities) > 1:
            raise MtlError("a class pool cannot mix text and image tasks", "pool tasks of one modality")
        if ways < 1 or shots < 1 or queries < 0:
            raise MtlError(f"ways={ways}, shots={shots}, queries={queries} is not an episode",
                           "use ways >= 1, shots >= 1, queries >= 0")
        self.split, self.ways, self.shots, self.queries, self.seed = split, ways, shots, queries, seed
        self._splits = [t.split(split) for t in self.tasks]
        self._classes: list[tuple[int, int]] = []
        self._members: list[np.ndarray] = []
        for pos, s in enumerate(self._splits):
            order = np.argsort(s.labels, kind="stable")
            ids, starts = np.unique(s.labels[order], return_index=True)
            for c, members in zip(ids.tolist(), np.split(order, starts[1:]), strict=True):
                self._classes.append((pos, c))
                self._members.append(members)
        name = "+".join(t.name for t in self.tasks)
        need = shots + queries
        self.left_out: list[str] = []
        sizes = sorted((len(m) for m in self._members), reverse=True)
        if skip_small:
            keep = [i for i, m in enumerate(self._members) if len(m) >= need]
            self.left_out = [self.tasks[p].classes[c] for i, (p, c) in enumerate(self._classes) if i not in set(keep)]
            self._classes = [self._classes[i] for i in keep]
            self._members = [self._members[i] for i in keep]
        if ways > len(self._classes):
            enough = f" with at least {need} examples" if skip_small else ""
            room = sizes[ways - 1] if skip_small and len(sizes) >= ways else 0  # what `ways` classes all have
            fewer = [f"at most {len(self._classes)} ways"] if len(self._classes) >= 1 else []
            if room > shots:
                fewer.append(f"at most {room} shots + queries, e.g. --queries {room - shots}")
            raise MtlError(f"task '{name}' split '{split}' has {len(self._classes)} classes{enough}, fewer than "
                           f"the {ways} ways asked", f"ask for {' or '.join(fewer)}" if fewer else
                           f"use a split with {ways} or more classes of {shots + 1} or more examples")
        for (pos, c), members in zip(self._classes, self._members, strict=True):
            if len(members) < need:
                raise MtlError(f"class '{self.tasks[pos].classes[c]}' of task '{self.tasks[pos].name}' split "
                               f"'{split}' has {len(members)} examples, fewer than shots + queries = "
                               f"{shots} + {queries}",
                               f"ask for at most {len(members)} shots + queries in all"
                               + (f", e.g. --queries {len(members) - shots} (in a recipe, `queries: "
                                  f"{len(members) - shots}`)" if len(members) > shots else ""))

        self.within_groups = within_groups
        groups = class_groups([f"{p}:{self.tasks[p].classes[c]}" for p, c in self._classes]) if within_groups else []
        self._groups = [g for g in groups if len(g) >= ways]  # those that can fill an episode

    @property
    def num_classes(self) -> int:
        return len(self._classes)

    def sample(self, index: int) -> Episode:
        rng = np.random.default_rng([self.seed, index])
        if self.within_groups and self._groups and rng.random() < self.within_groups:
            chosen = rng.choice(self._groups[int(rng.integers(len(self._groups)))], self.ways, replace=False)
        else:
            chosen = rng.choice(len(self._classes), self.ways, replace=False)
        sup: list[tuple[int, int]] = []
        qry: list[tuple[int, int]] = []
        for k in chosen.tolist():
            pos = self._classes[k][0]
            picks = rng.choice(self._members[k], self.shots + self.queries, replace=False)
            sup += [(pos, i) for i in picks[: self.shots].tolist()]
            qry += [(pos, i) for i in picks[self.shots:].tolist()]
        sup_src = np.asarray(sup, np.int64).reshape(-1, 2)
        qry_src = np.asarray(qry, np.int64).reshape(-1, 2)
        return Episode(
            tasks=tuple(t.name for t in self.tasks),
            classes=tuple(self.tasks[p].classes[c] for p, c in (self._classes[k] for k in chosen.tolist())),
            support_x=self._gather(sup_src),
            support_y=np.repeat(np.arange(self.ways), self.shots),
            query_x=self._gather(qry_src),
            query_y=np.repeat(np.arange(self.ways), self.queries),
            support_src=sup_src,
            query_src=qry_src,
        )

    def _gather(self, src: np.ndarray) -> np.ndarray:
        if len(self._splits) == 1:
            return self._splits[0].inputs[src[:, 1]]
        return np.stack([self._splits[p].inputs[i] for p, i in src.tolist()]) if len(src) else \
            self._splits[0].inputs[:0]

    def __iter__(self) -> Iterator[Episode]:
        i = 0
        while True:
            yield self.sample(i)
            i += 1

    def take(self, n: int, start: int = 0) -> list[Episode]:
        return [self.sample(i) for i in range(start, start + n)]


def class_groups(names: Sequence[str]) -> list[np.ndarray]:
    """The classes (positions in ``names``) of each group: a group is the part of a class's name before
    its first ``/`` (Omniglot's ``Alphabet/character07``: its alphabet, whatever its rotation suffix).
    Classes without one form a group each. Few-shot problems are often drawn within a group: Lake et
    al.'s one-shot challenge asks for the characters of one alphabet, and Meta-Dataset draws Omniglot's
    training episodes one alphabet at a time, so that what separates look-alike classes gets learned."""
    keys = [n.split("/", 1)[0] if "/" in n else n for n in names]
    order = np.argsort(keys, kind="stable")
    _, starts = np.unique(np.asarray(keys)[order], return_index=True)
    return [np.sort(g) for g in np.split(order, starts[1:])]


def describe_episode(task: Task, split: str, ways: int, shots: int, queries: int, seed: int, index: int
                     ) -> dict[str, Any]:
    """Episode ``index`` of the seeded stream, as JSON-ready data (``cli.py episode``)."""
    ep = EpisodeSampler(task, split=split, ways=ways, shots=shots, queries=queries, seed=seed).sample(index)
    support = [{"label": ep.classes[y], "input": str(x) if task.modality == "text" else f"image {x.shape}"}
               for x, y in zip(ep.support_x, ep.support_y, strict=True)]
    return {"task": task.name, "split": split, "seed": seed, "index": index, "classes": list(ep.classes),
            "support_size": len(ep.support_y), "query_size": len(ep.query_y),
            "support_indices": ep.support_src[:, 1].tolist(), "query_indices": ep.query_src[:, 1].tolist(),
            "support": support}
