"""Episodic evaluation of a checkpoint, and confidence intervals."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from mtl.data.registry import Registry, task_read_as, with_dirs
from mtl.data.task import Task


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of the ``level`` confidence interval (Student t; 1.96-sigma for large n)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return float(v.mean()) if len(v) else float("nan"), float("nan")
    half = stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
    return float(v.mean()), float(half)


def check_episodes(ways: int | None, shots: Sequence[int], queries: int, episodes: int) -> None:
    """Refuses episodes that would measure nothing (no query, one class, none at all) before any is drawn."""
    from mtl.errors import MtlError

    for value, flag, least in ((ways, "--ways", 2), (min(shots, default=1), "--shots", 1), (queries, "--queries", 1),
                               (episodes, "--episodes", 1)):
        if value is not None and value < least:
            raise MtlError(f"{flag} {value} leaves nothing to measure", f"use {flag} {least} or more")


def evaluate(checkpoint: Path | str, task: str | Task, ways: int = 5, shots: int = 1, queries: int = 15,
             episodes: int = 600, split: str | None = None, steps: int | None = None, lr: float | None = None,
             seed: int = 0, device: str = "auto", registry: Registry | None = None,
             head_init: str | None = None, views: int = 1, shared_norms: bool = True) -> dict[str, Any]:
    """Mean query accuracy and its 95% CI over ``episodes`` seeded N-way K-shot episodes of ``task``,
    each adapted with the checkpoint's own inner loop (``steps``, ``lr``, ``head_init``: replace its
    settings; ``head_init="logistic"`` with ``steps=0`` scores ``adapt``'s image default); and the
    expected calibration error of the pooled query predictions, as they come and under the temperature
    the checkpoint stored at the end of training (fitted on meta-validation episodes). ``views`` (images:
    4 or 8): each episode is also answered turned by 90-degree steps (and mirrored), and the views' mean
    log-probabilities answer (:mod:`mtl.data.views`), every view normalised with the batch-norm statistics
    of the support set in all views where ``shared_norms`` (:mod:`mtl.run.view_norms`)."""
    from mtl.data.stream import EpisodeStream
    from mtl.data.views import answered, check_views
    from mtl.device import autocast, resolve_device
    from mtl.errors import MtlError
    from mtl.run.calibration import expected_calibration_error, softmax
    from mtl.run.learner import load_learner
    from mtl.run.select import check_setting
    from mtl.run.view_norms import episode_shared, shares

    check_episodes(ways, [shots], queries, episodes)
    dev = resolve_device(device)
    learner, meta = load_learner(Path(checkpoint), dev)
    if isinstance(task, str):  # a name: looked for in the task folders the checkpoint was trained with too
        registry = with_dirs(registry, meta["recipe"].get("tasks_dirs", []))
    t = task_read_as(task, learner.model.config.image_overrides, registry)
    check_setting(steps, lr, head_init)
    if t.modality not in learner.model.encoders:
        raise MtlError(f"the checkpoint has no {t.modality} encoder", f"use a checkpoint trained on {t.modality} tasks")
    check_views(views, t.modality)
    name = split or t.spec.test_split
    config = learner.model.config
    stream = EpisodeStream([t], name, ways, shots, queries, seed, dev, config.text_encoder,
                           config.text_trainable_layers, cap_ways=False, skip_small=True)  # as compare does
    logits, labels = [], []
    with autocast(dev, meta["recipe"].get("precision", "fp32")):
        for b in stream.fixed(episodes):
            with episode_shared(learner, b.xs, views, shared_norms, steps):  # type: ignore[arg-type]
                z = answered(lambda e: learner.query_logits_after(e, steps, lr=lr, head_init=head_init), b, views)
            logits.append(z.cpu().numpy())
            labels.append(b.yq.cpu().numpy())
    mean, ci = mean_ci([float((z.argmax(1) == y).mean()) for z, y in zip(logits, labels, strict=True)])
    temperature = float((meta.get("adaptation") or {}).get("temperature", 1.0))
    ece = [expected_calibration_error(softmax(np.concatenate(logits), t), np.concatenate(labels))
           for t in (1.0, temperature)]
    return {"task": t.name, "split": name, "ways": stream.samplers[0].ways, "shots": shots, "queries": queries,
            "episodes": episodes, "accuracy": round(mean, 5), "ci95": round(ci, 5),
            "ece_uncalibrated": round(ece[0], 5), "ece": round(ece[1], 5), "temperature": temperature,
            "checkpoint": meta["path"], "algorithm": learner.name, "head_init": head_init, "views": views,
            "shared_norms": shared_norms and shares(learner, views, steps), "left_out": stream.samplers[0].left_out}
