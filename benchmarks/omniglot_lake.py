#!/usr/bin/env python3
"""Lake et al.'s (2015) Omniglot one-shot challenge: 20-way 1-shot classification among characters of
one alphabet, for each of the 20 evaluation alphabets, with a model meta-trained on the 30 background
alphabets only (configs/omniglot_lake.yaml). Within an alphabet the characters look alike, so this is
harder than 20-way episodes across alphabets. Published errors: people 4.5%, Bayesian program
learning 3.3%, Siamese networks 8.0%, hierarchical deep model 34.8%.

Each alphabet's held-out task (``omniglot-<alphabet>``, 5 drawers per character in its test split)
gives ``--episodes`` episodes of 20 of its characters, one drawing each to learn from and the other
four to classify. Prints each alphabet's error and the mean over alphabets with its 95% CI.

    python benchmarks/omniglot_lake.py --checkpoint runs/omniglot_lake [--episodes 50] [--support-copies 4]

Several checkpoints, comma-separated, are scored as an ensemble: each query's answer is the sum of
their log-probabilities (docs/BENCHMARKS.md: two 8-minute models err 1.5-2 points less than either,
three err more than one 30-minute model). Each alphabet's line, and the last line as means
(``subsets_mean_error_pct``), also give the error of every member and every smaller ensemble on the same episodes,
at no extra cost; members are numbered as given ("1", "1+3", ...). ``--keep-answers`` keeps every member's
log-probabilities in the cache (``MTL_CACHE_DIR/lake_answers``, keyed by its weights' hash, the alphabet, episodes,
views and copies), so that an ensemble scored again with one more member costs that member's time alone.

``--tasks`` scores other alphabets instead: the five background alphabets that
``benchmarks/lake_validation`` keeps out of training, to choose a recipe without looking at the
evaluation alphabets (docs/BENCHMARKS.md).

``--support-copies N`` adds N distorted copies of every support drawing (the training distortions,
``augment: affine``) before adapting: test-time augmentation, measured and not shipped (it raised
the error from 21.1% to 25.8% with 4 copies; docs/BENCHMARKS.md).

``--views 4`` (or 8) answers each episode also with every drawing, support and query alike, turned by
90, 180 and 270 degrees (and, with 8, mirrored too), summing the log-probabilities: the network met
every rotation of the background characters as a class of its own, so each view is a like problem
whose errors differ. Test-time augmentation that turns the whole episode, not the support drawings alone.

With views, every view of an episode is normalised with the batch-norm statistics of the support set in all its
views (8 x 20 drawings instead of 20; the support set only, so nothing transductive), as ``evaluate`` and ``adapt`` do
since stop 62 (:mod:`mtl.run.view_norms`); ``--own-norms`` normalises each view with its own support set's, as
every figure before stop 62 did (docs/BENCHMARKS.md).

``--tune-steps N`` first trains a copy of each checkpoint on the episode itself for N steps: the clean
support drawings as its examples, 4 distorted copies of each as its queries, the outer loss, Adam at
``--tune-lr`` on the parameters whose names contain ``--tune-params`` (by default the encoder's last
block). Test-time training, measured and not shipped (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch

from mtl.algorithms import Algorithm
from mtl.data.registry import Registry
from mtl.data.stream import TaskBatch
from mtl.data.task import Task, read_as, reading
from mtl.data.views import answered
from mtl.device import cpu_name
from mtl.run.evaluate import evaluate, mean_ci
from mtl.run.learner import load_learner


@dataclasses.dataclass(frozen=True)
class Tuning:
    """Test-time training: ``steps`` outer-loss steps on the episode's own support set (clean drawings as
    examples, ``copies`` distorted copies of each as queries), Adam at ``lr`` on parameters named ``params``."""

    steps: int = 0
    lr: float = 3e-4
    params: str = "blocks.3."
    copies: int = 4


def tuned(learner: Algorithm, precision: str, b: TaskBatch, episode: int, t: Tuning) -> Algorithm:
    """A copy of ``learner`` trained on episode ``b``'s support set as :class:`Tuning` says."""
    from mtl.data.augment import augment
    from mtl.device import autocast

    learner = copy.deepcopy(learner)
    for n, p in learner.named_parameters():
        p.requires_grad_(t.params in n)
    params = [p for p in learner.parameters() if p.requires_grad]
    if not params:
        raise SystemExit(f"--tune-params {t.params!r} names no parameter of the checkpoint")
    opt = torch.optim.Adam(params, lr=t.lr)
    for step in range(t.steps):
        xq = torch.cat([augment("affine", b.xs, (1000 + episode, 100 * step + j)) for j in range(t.copies)])
        opt.zero_grad(set_to_none=True)
        with autocast(b.xs.device, precision):
            learner.meta_backward([dataclasses.replace(b, xq=xq, yq=b.ys.repeat(t.copies))], 0)
        opt.step()
    return learner


def scored(learners: list[tuple[Algorithm, str]], task: Task, episodes: int, copies: int,
           tuning: Tuning = Tuning(), views: int = 1, keys: list[str] | None = None, shared_norms: bool = True
           ) -> dict[tuple[int, ...], float]:
    """Mean accuracy of 20-way 1-shot episodes (the same as ``evaluate``'s, on CPU), each answered by the
    sum of the ``learners``' log-probabilities (an ensemble) over ``views`` turned copies of the whole
    episode (:mod:`mtl.data.views`), adapted to each support drawing and ``copies`` distorted copies of it,
    after ``tuning``; for every subset of the learners (by their indices), so that one pass over the
    episodes scores each member and each smaller ensemble on the same episodes as the whole.
    ``keys``: per learner, what names its log-probabilities for these episodes in the cache
    (:func:`mtl.data.cache.cached_arrays`), so that a new member is scored without scoring the others again."""
    from mtl.data.cache import cached_arrays
    from mtl.data.stream import EpisodeStream

    dev = torch.device("cpu")

    def reads(learner: Algorithm) -> tuple:  # the same episodes, read as each model reads images
        return reading(learner.model.config.image_overrides)

    fixed = {r: EpisodeStream([read_as(task, dict(r))], task.spec.test_split, 20, 1, 4, 0, dev, None, 0, cap_ways=False
                              ).fixed(episodes) for r in {reads(m) for m, _ in learners}}
    logp = []  # per learner: (episodes, queries, 20)
    for (learner, precision), key in zip(learners, keys or [None] * len(learners), strict=True):
        def build(learner: Algorithm = learner, precision: str = precision) -> dict[str, np.ndarray]:
            return {"logp": torch.stack([answer(learner, precision, fixed[reads(learner)][i], i, copies, tuning,
                                                views, shared_norms) for i in range(episodes)]).float().numpy()}
        name = [key, task.name, episodes, views, copies] + (["view statistics"] if shared_norms and views > 1 else [])
        arrays = build() if key is None else cached_arrays("lake_answers", name, build)
        logp.append(torch.from_numpy(arrays["logp"]))
    labels = next(iter(fixed.values()))
    subsets = [c for k in range(1, len(learners) + 1) for c in itertools.combinations(range(len(learners)), k)]
    return {c: float(np.mean([float((sum(logp[j][i] for j in c).argmax(1) == labels[i].yq).float().mean())
                              for i in range(episodes)])) for c in subsets}


def answer(learner: Algorithm, precision: str, b: TaskBatch, i: int, copies: int, tuning: Tuning,
           views: int, shared_norms: bool = True) -> torch.Tensor:
    """Episode ``i``'s query log-probabilities by one learner (see :func:`scored`)."""
    from mtl.data.augment import augment
    from mtl.device import autocast
    from mtl.run.view_norms import episode_shared

    xs = torch.cat([b.xs] + [augment("affine", b.xs, (i, j)) for j in range(copies)])
    batch = dataclasses.replace(b, xs=xs, ys=b.ys.repeat(copies + 1))
    if tuning.steps:
        learner = tuned(learner, precision, b, i, tuning)
    # no no_grad: a MAML checkpoint adapts by gradient steps
    with autocast(b.xs.device, precision), episode_shared(learner, batch.xs, views, shared_norms):
        return torch.log_softmax(answered(lambda e: learner.query_logits_after(e, None), batch, views), 1)


def weights_digest(meta: dict) -> str:
    """What names a member's answers (``--keep-answers``): its weights' hash, so that a changed checkpoint
    (e.g. after ``whiten``) is scored afresh."""
    return hashlib.sha256(Path(meta["path"]).read_bytes()).hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a run folder, or several comma-separated: an ensemble")
    ap.add_argument("--episodes", type=int, default=50)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--support-copies", type=int, default=0, help="distorted copies of each support drawing")
    ap.add_argument("--tune-steps", type=int, default=0, help="test-time training steps on each episode's support set")
    ap.add_argument("--tune-lr", type=float, default=Tuning.lr)
    ap.add_argument("--tune-params", default=Tuning.params, help="what test-time training changes: parameters "
                    "whose names contain this")
    ap.add_argument("--views", type=int, default=1, choices=(1, 4, 8),
                    help="answer with the episode turned by 90-degree steps (8: mirrored too) as well")
    ap.add_argument("--tasks", default=None, help="comma-separated alphabet tasks instead of the 20 evaluation "
                    "alphabets, e.g. background alphabets held out of training to choose a recipe on")
    ap.add_argument("--own-norms", action="store_true", help="normalise each view with its own support set's "
                    "batch-norm statistics (every figure before stop 62), not those of all views together")
    ap.add_argument("--keep-answers", action="store_true", help="keep each member's answers in the cache, so that "
                    "scoring an ensemble again with one more member scores that member alone")
    a = ap.parse_args()
    registry = Registry()
    alphabets = a.tasks.split(",") if a.tasks else [
        n for n in registry.names(role="held_out")
        if n.startswith("omniglot-") and "images_evaluation" in registry.spec(n).description]
    learners, digests = [], []
    tuning = Tuning(a.tune_steps, a.tune_lr, a.tune_params)
    if a.keep_answers and tuning.steps:
        raise SystemExit("--keep-answers keeps the checkpoints' own answers: leave out --tune-steps")
    if a.support_copies or tuning.steps or "," in a.checkpoint or a.keep_answers:
        for run in a.checkpoint.split(","):
            learner, meta = load_learner(Path(run), torch.device("cpu"))
            learners.append((learner, meta["recipe"].get("precision", "fp32")))
            if a.keep_answers:
                digests.append(weights_digest(meta))
    t0 = time.perf_counter()
    errors, parts = {}, {}
    for name in alphabets:
        if learners:
            acc = scored(learners, registry.load(name), a.episodes, a.support_copies, tuning, a.views,
                         digests if a.keep_answers else None, not a.own_norms)
            errors[name] = 1.0 - acc[tuple(range(len(learners)))]
            for c, v in acc.items():
                parts.setdefault("+".join(str(j + 1) for j in c), []).append(1.0 - v)
        else:
            r = evaluate(a.checkpoint, name, ways=20, shots=1, queries=4, episodes=a.episodes, registry=registry,
                         device=a.device, views=a.views, shared_norms=not a.own_norms)
            errors[name] = 1.0 - r["accuracy"]
        each = "; " + ", ".join(f"{k}: {100 * v[-1]:.2f}%" for k, v in parts.items()) if len(parts) > 1 else ""
        print(f"{name}: error {100 * errors[name]:.2f}% ({a.episodes} episodes of 20-way 1-shot{each})", flush=True)
    m, ci = mean_ci(list(errors.values()))
    print(json.dumps({"device": cpu_name() if not torch.cuda.is_available() else torch.cuda.get_device_name(),
                      "checkpoint": a.checkpoint, "alphabets": len(errors), "episodes_per_alphabet": a.episodes,
                      **({"tune": dataclasses.asdict(tuning)} if tuning.steps else {}),
                      **({"views": a.views, "shared_norms": not a.own_norms} if a.views > 1 else {}),
                      "mean_error_pct": round(100 * m, 2), "ci95_pct": round(100 * ci, 2),
                      "worst": max(errors, key=errors.get), "worst_error_pct": round(100 * max(errors.values()), 2),
                      "best_error_pct": round(100 * float(np.min(list(errors.values()))), 2),
                      **({"subsets_mean_error_pct": {k: round(100 * float(np.mean(v)), 2) for k, v in parts.items()}}
                         if len(learners) > 1 else {}),
                      "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
