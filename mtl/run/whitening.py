"""Features whitened by how the examples of one class vary, for nearest-prototype answers.

A prototypical network is trained to bring a class's examples together, but not equally in every
direction: drawings of one character by different people still differ more along some features than
along others, and those directions say little about which character a drawing is. Measured after
whitening by the within-class covariance, a distance weighs the features that tell look-alike classes
apart. The covariance is estimated on episodes of the checkpoint's own training tasks (never on a new
task), and shrunk towards a multiple of the identity, so that directions it barely saw are not blown up.
With ``shrink = 1`` the features are left as they are.

On Lake's within-alphabet one-shot challenge (``--within-groups 1``, shrink 0.5, 8 views): a validation model
(40 x 40, five background alphabets kept out of training) erred 6.13% -> 5.67%; the shipped 8-minute recipe on the
20 evaluation alphabets 11.19% -> 10.81%, and a 50-minute 40 x 40 model 8.77% -> 8.33% (paired standard
error 0.24): 0.30-0.43 points in each of three runs, with large gains on the alphabets of look-alikes (Ulog 20.40%
-> 16.10%) and losses on others (docs/BENCHMARKS.md). A step of its own after training, not a default: a recipe's
``whiten:`` (:class:`~mtl.run.recipe.Whitening`) makes it training's last step. ``cli.py whiten`` writes the matrix
into the checkpoint (:attr:`~mtl.models.multitask.ModelConfig.feature_whitening`), so ``evaluate``, ``adapt`` and
the benchmarks read whitened features with no option of their own.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mtl.algorithms import Algorithm
from mtl.data.registry import Registry, task_read_as, with_dirs
from mtl.data.task import Task
from mtl.errors import MtlError

SHRINK = 0.5  # chosen on Lake's validation alphabets: 0.3 / 0.5 / 0.7 erred 5.85 / 5.68 / 5.76% (8 views)


def within_class_covariance(learner: Algorithm, tasks: Sequence[Task], precision: str, episodes: int = 200,
                            ways: int = 20, shots: int = 1, queries: int = 4, views: int = 1, seed: int = 0,
                            within_groups: float = 0.0) -> Tensor:
    """The pooled within-class covariance of ``learner``'s features (float64, features x features), over
    ``episodes`` episodes of ``tasks`` (their train splits) as evaluation reads them: support-set batch norm,
    each episode also in ``views`` turned copies (images, :mod:`mtl.data.views`); ``within_groups``: the share
    of episodes drawn from one group of classes (:class:`~mtl.data.episodes.EpisodeSampler`), as the new tasks
    will be if they are, e.g., one alphabet each."""
    from mtl.data.inputs import concat
    from mtl.data.stream import EpisodeStream
    from mtl.data.views import episode_view
    from mtl.device import autocast

    model = learner.model
    dev = model.anchor.device
    config = model.config
    stream = EpisodeStream(list(tasks), None, ways, shots, queries, seed, dev, config.text_encoder,
                           config.text_trainable_layers, cap_ways=True, skip_small=True, within_groups=within_groups)
    params = dict(model.named_parameters())
    dim = model.feature_dim
    scatter = torch.zeros(dim, dim, dtype=torch.float64)
    dof = 0
    with learner.evaluation(), torch.no_grad(), autocast(dev, precision):
        for b in stream.fixed(episodes):
            for v in range(views if b.modality == "image" else 1):
                e = episode_view(b, v) if v else b
                f = learner.episode_features(params, concat(e.xs, e.xq), e.modality, 0, len(e.ys))
                f, y = f.double().cpu(), torch.cat([e.ys, e.yq]).cpu()
                for c in y.unique():
                    d = f[y == c] - f[y == c].mean(0)
                    scatter += d.T @ d
                    dof += len(d) - 1
    if dof == 0:
        raise MtlError("no class of the tasks has two examples in an episode",
                       "whiten on tasks with at least shots + queries examples per class")
    return scatter / dof


def whitening_matrix(cov: Tensor, shrink: float = SHRINK) -> Tensor:
    """``cov`` shrunk by ``shrink`` towards its mean variance times the identity, to the power -1/2, times the
    square root of that mean variance: distances keep their scale (so a checkpoint's temperature still fits),
    and ``shrink = 1`` gives the identity."""
    dim = cov.shape[0]
    scale = torch.trace(cov) / dim
    shrunk = (1 - shrink) * cov + shrink * scale * torch.eye(dim, dtype=cov.dtype)
    w, u = torch.linalg.eigh(shrunk)
    return ((u * (scale / w.clamp_min(1e-12 * scale)).sqrt()) @ u.T).float()


def whiten(run: Path | str, tasks: Sequence[str] | None = None, shrink: float = SHRINK, episodes: int = 200,
           views: int = 8, within_groups: float = 0.0, registry: Registry | None = None) -> dict[str, Any]:
    """Write the whitening of :func:`whitening_matrix` into the checkpoint that ``evaluate`` and ``adapt`` read
    in ``run`` (best, else last), estimated on ``tasks`` (default: the recipe's training tasks); returns what
    was done. Running it again re-estimates from the unwhitened features."""
    from mtl.data.views import check_views
    from mtl.run.checkpoint import load_checkpoint, save_checkpoint
    from mtl.run.learner import load_learner

    if not 0.0 <= shrink <= 1.0:
        raise MtlError(f"--shrink {shrink} is outside [0, 1]", "use 0 (whiten fully) to 1 (leave the features)")
    if not 0.0 <= within_groups <= 1.0:
        raise MtlError(f"--within-groups {within_groups} is outside [0, 1]", "give the share of such episodes")
    if episodes < 1:
        raise MtlError(f"--episodes {episodes} estimates nothing", "use --episodes 1 or more (200 by default)")
    check_views(views, "image")  # the count only: text tasks take one view whatever it says
    tensors, meta = load_checkpoint(Path(run))
    path = Path(meta.pop("path"))
    learner, _ = load_learner(path, torch.device("cpu"))
    if hasattr(learner.model, "whitening"):
        learner.model.whitening.copy_(torch.eye(learner.model.feature_dim))  # estimate on the features as trained
    names = list(tasks or meta["recipe"]["tasks"])
    registry = with_dirs(registry, meta["recipe"].get("tasks_dirs", []))
    loaded = [task_read_as(n, learner.model.config.image_overrides, registry) for n in names]
    cov = within_class_covariance(learner, loaded, meta["recipe"].get("precision", "fp32"), episodes, views=views,
                                  within_groups=within_groups)
    tensors["learner.model.whitening"] = whitening_matrix(cov, shrink)
    meta["recipe"]["model"]["feature_whitening"] = shrink
    meta["whitening"] = {"tasks": names, "shrink": shrink, "episodes": episodes, "views": views,
                         "within_groups": within_groups}
    for key in ("format_version", "versions"):
        meta.pop(key, None)
    save_checkpoint(path, tensors, meta)
    return {"checkpoint": str(path), **meta["whitening"]}
