"""Choosing how to adapt (inner steps and step size) without test data: on meta-validation episodes
at the end of training, or by cross-validation on the new task's own support set.

A user should not have to tune ``adapt``: a model meta-trained on 5-way 1-shot Omniglot, adapted to
10-way 5-shot MNIST with the meta-learned single step, lands far below what ten steps at a chosen
step size reach. The same candidates serve training (stored in the checkpoint as ``adaptation``) and
``adapt`` (chosen on the support set when it has at least two examples per class).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from mtl.algorithms import Algorithm
from mtl.data.inputs import Inputs
from mtl.data.stream import TaskBatch
from mtl.errors import MtlError

LR_GRID = (0.01, 0.05, 0.2, 0.5)
MORE_STEPS = 10  # the alternative to the meta-trained number of steps (often 1)


@dataclass(frozen=True)
class Setting:
    """How one method adapts: its own settings (``lr=None``: learned or recipe step sizes, its own
    head) or plain fine-tuning with step size ``lr`` (and ``head_init``, default its own)."""

    steps: int
    lr: float | None = None
    head_init: str | None = None

    def label(self) -> str:
        return "logistic" if self.head_init == "logistic" else "learned" if self.lr is None else f"{self.lr:g}"

    def describe(self) -> str:
        return f"{self.steps} steps at {'the learned step size' if self.lr is None else f'step size {self.lr:g}'}"


def candidates(learner: Algorithm, stored: dict[str, Any] | None = None) -> list[Setting]:
    """The algorithm's own settings first (ties go to it), the stored choice, then more steps with the
    learned and the grid step sizes (for ProtoNet: fine-tuning the prototype head)."""
    own = Setting(learner.eval_steps if learner.compare_steps is None else learner.compare_steps)
    out = [own]
    if stored:
        out.append(Setting(int(stored["steps"]), stored.get("lr")))
    if learner.lrs or learner.compare_steps is None:  # a learned or recipe step size to try with more steps
        out.append(Setting(MORE_STEPS))
    out += [Setting(MORE_STEPS, lr) for lr in LR_GRID[1:]]
    return list(dict.fromkeys(out))


LOGISTIC = Setting(0, None, "logistic")  # a head fitted by logistic regression (mtl.models.heads.logistic_head)
HEAD_INITS = ("zero", "proto", "logistic")  # what a new task's head may start from at adaptation


def count_or_all(value: int | str, flag: str) -> int | None:
    """A count given as a number or a string (the command line's), or ``all`` (None)."""
    if isinstance(value, int):
        return value
    if value.strip().lower() == "all":
        return None
    try:
        return int(value)
    except ValueError:
        raise MtlError(f"{flag} {value} is not a number", "give a count, or all") from None


def check_setting(steps: int | None, lr: float | None, head_init: str | None) -> None:
    """Refuses an adaptation setting given by hand that is not one: a negative step count, a step size of 0 or
    below (which would climb the loss), an unknown head."""
    if steps is not None and steps < 0:
        raise MtlError(f"--steps {steps} is not a number of steps", "use --steps 0 or more")
    if lr is not None and not lr > 0:
        raise MtlError(f"--lr {lr} is not a step size", "use a step size above 0, e.g. --lr 0.1")
    if head_init not in (None, *HEAD_INITS):
        raise MtlError(f"--head-init {head_init} is unknown", f"use {', '.join(HEAD_INITS[:-1])} or {HEAD_INITS[-1]}")


def prefer(default: Setting, best: Setting, scores: dict[Setting, float], held_out: int) -> Setting:
    """``best`` only where it beats ``default`` on the folds by more than one standard error of an
    accuracy measured on ``held_out`` examples; else ``default``. A handful of held-out examples per class
    cannot tell settings a few points apart, so a default chosen on many tasks is kept unless beaten
    beyond that noise."""
    p = scores[default]
    margin = float(np.sqrt(max(p * (1 - p), 1e-4) / max(held_out, 1)))
    return best if scores[best] - p > margin else default


def episode_logits(learner: Algorithm, episodes: Sequence[TaskBatch], s: Setting) -> list[torch.Tensor]:
    return [learner.query_logits_after(b, s.steps, s.lr, s.head_init) for b in episodes]


def choose(learner: Algorithm, episodes: Sequence[TaskBatch], options: Sequence[Setting],
           seconds: float | None = None, logits: dict[Setting, list[torch.Tensor]] | None = None,
           default: Setting | None = None) -> tuple[Setting, dict[str, float]]:
    """The best setting on ``episodes`` (the first on ties), and every candidate's accuracy. With
    ``seconds``, candidates after the first are tried only while that much time is left (an inner loop
    through a whole transformer makes each one cost minutes). ``logits``, if given, receives each
    tried setting's query logits (what a temperature is fitted on, without adapting again). ``default``
    (one of ``options``) is kept unless beaten beyond the noise of the episodes' query count (:func:`prefer`)."""
    start = time.perf_counter()
    scores: dict[Setting, float] = {}
    for s in options:
        if scores and seconds is not None and time.perf_counter() - start > seconds:
            break
        z = episode_logits(learner, episodes, s)
        scores[s] = float(np.mean([float((zi.argmax(1) == b.yq).float().mean()) for zi, b in zip(z, episodes,
                                                                                                   strict=True)]))
        if logits is not None:
            logits[s] = z
    options = list(scores)
    best = max(options, key=lambda s: scores[s])
    if default in scores:
        best = prefer(default, best, scores, sum(len(b.yq) for b in episodes))
    return best, {f"{s.steps}@{s.label()}": round(v, 4) for s, v in scores.items()}


def class_ranks(ys: np.ndarray) -> np.ndarray:
    """Each example's position among its class's examples: with F folds, example r of a class is held out
    in fold r % F, so every fold holds out one example per class where it can."""
    rank = np.zeros(len(ys), int)
    for c in np.unique(ys):
        members = np.flatnonzero(ys == c)
        rank[members] = np.arange(len(members))
    return rank


def support_folds(task: str, modality: str, xs: Inputs, ys: torch.Tensor, folds: int = 3) -> list[TaskBatch]:
    """Stratified folds of a support set: fold ``f`` holds out the ``f``-th example of every class
    (classes with fewer examples keep theirs in training). Needs >= 2 examples per class."""
    ys_np = ys.cpu().numpy()
    rank = class_ranks(ys_np)
    shots = int(np.bincount(ys_np).min())
    out = []
    for f in range(min(folds, shots)):
        held = np.flatnonzero(rank % min(folds, shots) == f)
        keep = np.setdiff1d(np.arange(len(ys_np)), held)
        out.append(TaskBatch(task, modality, _take(xs, keep), ys[torch.as_tensor(keep, device=ys.device)],
                             _take(xs, held), ys[torch.as_tensor(held, device=ys.device)]))
    return out


def _take(x: Inputs, idx: np.ndarray) -> Inputs:
    if isinstance(x, list):
        return [x[i] for i in idx.tolist()]
    return x[torch.as_tensor(idx, device=x.device if isinstance(x, torch.Tensor) else None)]


def as_dict(s: Setting, by: str, scores: dict[str, float]) -> dict[str, Any]:
    return {**asdict(s), "by": by, "scores": scores}
