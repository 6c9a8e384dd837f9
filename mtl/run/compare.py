"""Side-by-side comparison on the very same episodes: meta-learned checkpoints (MAML, ProtoNet,
Baseline++, the multi-task baseline, any registered algorithm) against a from-scratch model, a
linear probe and nearest class centroids on frozen features.

Every method sees identical episodes (same seeds), so differences are paired; the report gives
mean accuracy with a 95% confidence interval and a paired t-test of the reference checkpoint
(``maml`` when given, else the first) against each other method. Fine-tuned methods get the same
number of steps, and each its step size chosen on episodes of the task's validation split (never on
test queries): from a grid, or a checkpoint's own (learned) settings. Without a validation split, the train
split's episodes serve, with fewer queries where it holds only a few examples per class.

Every task and setting is checked before the first episode; classes of a split with too few
examples for ``shots + queries`` are left out of the draw (and reported); each finished setting's
rows are handed to ``on_rows`` (``cli.py compare`` writes the reports after each), so a failure late
in a long run loses nothing.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats

from mtl.algorithms import Algorithm
from mtl.data.cache import atomic_write_bytes
from mtl.data.inputs import concat
from mtl.data.registry import Registry, task_read_as, with_dirs
from mtl.data.stream import EpisodeStream, TaskBatch
from mtl.data.task import Task, reading
from mtl.data.views import check_views, episode_view, together
from mtl.device import resolve_device
from mtl.errors import MtlError
from mtl.models import MultiTaskModel
from mtl.run.calibration import expected_calibration_error, softmax
from mtl.run.evaluate import check_episodes, mean_ci
from mtl.run.learner import build_learner, load_learner
from mtl.run.recipe import Recipe
from mtl.run.select import LR_GRID, Setting, check_setting, choose
from mtl.run.view_norms import episode_shared

log = logging.getLogger(__name__)  # which setting and method is running (the CLI shows it on a spinner)

BASELINES = ("scratch", "linear_probe", "centroid")
# text only: logistic regression on the pretrained sentence encoder's embeddings, what `adapt` keeps for text
# unless the meta-learned adaptation beats it (mtl.run.text_default); cheap, so run on text tasks by default
TEXT_BASELINES = ("encoder_probe",)
ON_REQUEST = ("finetune", "setfit")  # text only and costly (the encoder per episode): run when named in `methods`


@dataclass
class Row:
    task: str
    shots: int
    method: str
    accuracy: float
    ci95: float
    episodes: int
    p_vs_maml: float | None  # paired t-test against the reference checkpoint (maml when given)
    step_size: str = "-"  # the fine-tuning step size chosen on validation episodes ("learned": its own)
    left_out: list[str] = field(default_factory=list)  # classes too small for an episode of this setting
    ece: float | None = None  # expected calibration error of the pooled query predictions (15 bins)
    views: int = 1  # images: each episode answered as the mean log-probability of its turned copies


def frozen_features(learner: Algorithm, b: TaskBatch) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        f = learner.episode_features({}, concat(b.xs, b.xq), b.modality, 0, len(b.ys)).float().cpu().numpy()
    return f[: len(b.ys)], f[len(b.ys):]


Scored = tuple[float, np.ndarray, np.ndarray]  # an episode's accuracy, query probabilities, query labels


def scored(probs: np.ndarray, b: TaskBatch) -> Scored:
    y = b.yq.cpu().numpy()
    return float((probs.argmax(1) == y).mean()), probs, y


def probe_scores(learner: Algorithm, b: TaskBatch) -> Scored:
    from sklearn.linear_model import LogisticRegression

    fs, fq = frozen_features(learner, b)
    with warnings.catch_warnings():  # 1 shot: as many classes as examples, which scikit-learn warns about
        warnings.simplefilter("ignore", UserWarning)
        clf = LogisticRegression(max_iter=1000, C=1.0).fit(fs, b.ys.cpu().numpy())
    return scored(clf.predict_proba(fq), b)


def encoder_probe_scores(plain: MultiTaskModel, b: TaskBatch) -> Scored:
    """Logistic regression (:func:`mtl.models.heads.probe_logits`, as ``adapt``'s probe) on the pretrained
    encoder's (``plain``: :func:`mtl.run.adapted.plain_model`) embeddings of the episode's texts; no class
    names, which episodes do not carry."""
    from mtl.models.heads import probe_logits
    from mtl.run.adapted import model_inputs

    with torch.no_grad():  # not through the disk cache: every episode is another list of texts
        fs, fq = (plain.features(model_inputs(np.asarray(texts, dtype=np.str_), plain, "text", plain.anchor.device,
                                              cache=False), "text").float().cpu().numpy()
                  for texts in b.raw)  # type: ignore[union-attr]
    return scored(softmax(probe_logits(fs, b.ys.cpu().numpy(), b.ways, fq)), b)


def centroid_scores(learner: Algorithm, b: TaskBatch) -> Scored:
    fs, fq = frozen_features(learner, b)
    ys = b.ys.cpu().numpy()
    protos = np.stack([fs[ys == c].mean(0) for c in range(int(ys.max()) + 1)])
    return scored(softmax(-((fq[:, None, :] - protos[None]) ** 2).sum(-1)), b)  # ProtoNet's probabilities


def adapted_scores(learner: Algorithm, episodes: list[TaskBatch], s: Setting, views: int = 1,
                   shared_norms: bool = False) -> list[Scored]:
    return [in_views(lambda e: scored(softmax(learner.query_logits_after(e, s.steps, s.lr, s.head_init).cpu()
                                              .numpy()), e), b, views, learner if shared_norms else None, s.steps)
            for b in episodes]


def in_views(score: Callable[[TaskBatch], Scored], b: TaskBatch, views: int,
             shared_by: Algorithm | None = None, steps: int = 0) -> Scored:
    """Episode ``b`` scored as ``adapt --views`` answers: ``score`` of each turned copy of the whole episode,
    the views' mean log-probability the answer (:func:`mtl.data.views.together`); every view normalised with
    the batch-norm statistics of the support set in all views of ``shared_by``'s network, when given and its
    ``steps`` leave the encoder as it is (:mod:`mtl.run.view_norms`)."""
    if views == 1:
        return score(b)
    shared = contextlib.nullcontext() if shared_by is None else episode_shared(shared_by, b.xs, views, True, steps)
    with shared:
        logs = [torch.as_tensor(np.log(np.clip(score(episode_view(b, v) if v else b)[1], 1e-30, None)))
                for v in range(views)]
    return scored(softmax(together(logs).numpy()), b)


def choose_setting(learner: Algorithm, val: list[TaskBatch], steps: int, own: bool) -> Setting:
    """The setting with the best accuracy on validation episodes: for a trained checkpoint its own
    settings or a grid step size with its own head; for a model from scratch, a grid step size."""
    if own:
        own_steps = steps if learner.compare_steps is None else learner.compare_steps
        options = [Setting(own_steps)] + [Setting(steps, lr) for lr in LR_GRID]
    else:
        options = [Setting(steps, lr, "zero") for lr in LR_GRID]
    return choose(learner, val, options)[0] if val else options[0]  # ties: the first (its own settings)


@dataclass
class Plan:
    """One (task, shots) setting, with its episodes drawn and checked before any method runs."""

    task: Task
    shots: int
    test: EpisodeStream
    val: EpisodeStream | None  # None: too few examples to choose on, so every method adapts with its first setting

    @property
    def left_out(self) -> list[str]:
        return self.test.samplers[0].left_out


def plan(tasks: Sequence[Task], shots_list: Sequence[int], ways: int | None, queries: int, seed: int,
         recipe: Recipe, device: torch.device) -> list[Plan]:
    """Every setting's episode streams, built up front: a task too small for a setting fails here,
    before the first episode of the first task."""
    out = []
    layers, encoder = recipe.model.text_trainable_layers, recipe.model.text_encoder
    for task in tasks:
        val_split = task.spec.val_split or task.spec.train_split
        for shots in shots_list:
            need = shots + queries
            counts = task.test.counts()
            eligible = sum(n >= need for n in counts.values())
            n_ways = ways or min(eligible, recipe.ways)
            if n_ways < 2:
                raise MtlError(f"task '{task.name}' has {eligible} test classes with at least {need} examples, too "
                               f"few for {shots}-shot episodes with {queries} queries",
                               "use fewer --shots or --queries, or leave the task out")
            test = EpisodeStream([task], task.spec.test_split, n_ways, shots, queries, seed, device, encoder, layers,
                                 cap_ways=False, skip_small=True)
            q = val_queries(task, val_split, n_ways, shots, queries)
            val = EpisodeStream([task], val_split, n_ways, shots, q, seed + 1, device, encoder, layers,
                                cap_ways=False, skip_small=True) if q else None
            out.append(Plan(task, shots, test, val))
    return out


def val_queries(task: Task, split: str, ways: int, shots: int, queries: int) -> int:
    """How many queries the validation episodes can have, at most ``queries``: a user's task whose train split
    holds only a few examples per class (the ones to adapt from) still has its step sizes chosen there, on fewer
    queries; 0 when ``ways`` of its classes cannot give even one beyond the shots."""
    counts = sorted(task.split(split).counts().values(), reverse=True)
    return 0 if len(counts) < ways else max(0, min(queries, counts[ways - 1] - shots))


def compare(tasks: Sequence[Task | str], shots_list: Sequence[int], episodes: int,
            checkpoints: dict[str, Path | str], methods: Sequence[str] | None = None, ways: int | None = None,
            steps: int = 10, queries: int = 15, seed: int = 0, device: torch.device | str = "cpu",
            on_rows: Callable[[list[Row]], None] | None = None, registry: Registry | None = None,
            finetune_epochs: int | None = None, views: int = 1, shared_norms: bool = True) -> list[Row]:
    """``checkpoints``: label -> run folder (``maml=runs/a,protonet=runs/b``); ``methods``: which of
    those labels, of ``BASELINES`` (default: all of those) and of ``ON_REQUEST`` to run (``finetune``: the
    pretrained encoder fine-tuned whole as ``adapt --select`` fine-tunes it, for ``finetune_epochs``, by
    default about 125 steps; ``setfit``: SetFit on the same encoder). ``views`` (image tasks: 4 or 8) answers
    every method's episodes as ``adapt --views`` does (``shared_norms``: :mod:`mtl.run.view_norms`). ``on_rows``
    gets every row so far after each finished (task, shots) setting."""
    check_episodes(ways, shots_list, queries, episodes)
    check_setting(steps, None, None)
    device = resolve_device(device) if isinstance(device, str) else device
    checkpoints = {k: Path(v) for k, v in checkpoints.items()}
    if not checkpoints:
        raise MtlError("compare needs at least one checkpoint", "pass --checkpoints maml=RUN_DIR[,multitask=RUN_DIR]")
    learners = {k: load_learner(p, device) for k, p in checkpoints.items()}
    if any(isinstance(t, str) for t in tasks):  # also where the checkpoints' own task folders are
        registry = with_dirs(registry, [d for _, meta in learners.values()
                                        for d in meta["recipe"].get("tasks_dirs", [])])
    modalities = {t.modality if isinstance(t, Task) else registry.spec(t).modality  # type: ignore[union-attr]
                  for t in tasks}
    texts = "text" in modalities
    methods = list(methods or [*checkpoints, *BASELINES, *(TEXT_BASELINES if texts else ())])
    unknown = [m for m in methods if m not in checkpoints and m not in BASELINES + TEXT_BASELINES + ON_REQUEST]
    if unknown:
        raise MtlError(f"unknown method '{unknown[0]}'", f"use checkpoint labels ({', '.join(checkpoints)}) "
                       f"or baselines ({', '.join(BASELINES + TEXT_BASELINES + ON_REQUEST)})")
    depth = {k: lm[0].model.config.text_trainable_layers for k, lm in learners.items()}
    if len(set(depth.values())) > 1:  # one set of episode inputs serves every checkpoint
        raise MtlError(f"the checkpoints train different numbers of text encoder layers ({depth})",
                       "compare checkpoints trained with the same model.text_trainable_layers")
    reads = {k: lm[0].model.config.image_overrides for k, lm in learners.items()}
    if len({reading(r) for r in reads.values()}) > 1:
        raise MtlError(f"the checkpoints read images differently ({reads})",
                       "compare checkpoints trained with the same model.image_size and model.image_fit_content")
    tasks = [task_read_as(t, next(iter(reads.values())), registry) for t in tasks]  # read once, as the models do
    reference = "maml" if "maml" in checkpoints else next(iter(checkpoints))
    ref_learner, ref_meta = learners[reference]
    recipe = Recipe.model_validate(ref_meta["recipe"])
    check_views(views, "image")  # a number of views; text tasks are answered with one
    for t in tasks:
        for m in set(methods) & set(ON_REQUEST + TEXT_BASELINES):
            if t.modality != "text" and (m in ON_REQUEST or not texts):
                raise MtlError(f"`{m}` needs a sentence encoder; task '{t.name}' has images",
                               f"leave {m} out of --methods for image tasks")
        if t.modality not in ref_learner.model.encoders:
            raise MtlError(f"the checkpoints have no {t.modality} encoder for task '{t.name}'",
                           f"compare on tasks of the checkpoints' modalities ({', '.join(ref_learner.model.encoders)})")
    plans = plan(tasks, shots_list, ways, queries, seed, recipe, device)
    feature_source = learners.get("multitask", learners[reference])[0]
    shared = feature_source if shared_norms else None
    rows: list[Row] = []
    for p in plans:
        test, val = p.test.fixed(episodes), p.val.fixed(min(20, episodes)) if p.val else []
        results: dict[str, list[Scored]] = {}
        chosen: dict[str, str] = {}
        seen = views if p.task.modality == "image" else 1  # texts have one view
        for m in methods:
            if m in TEXT_BASELINES and p.task.modality != "text":
                continue  # asked for the text tasks of a mixed comparison
            log.info("%s %d-shot: %s on %d episodes", p.task.name, p.shots, m, len(test))
            if m in learners or m == "scratch":
                if m == "scratch":
                    torch.manual_seed(seed)
                    learner = build_learner(recipe.model_copy(update={"method": "maml"}), ref_meta["modalities"],
                                            {}).to(device)
                else:
                    learner = learners[m][0]
                setting = choose_setting(learner, val, steps, own=m != "scratch")
                chosen[m] = setting.label() + ("" if val else " (no validation episodes)")
                results[m] = adapted_scores(learner, test, setting, seen, shared_norms)
            elif m == "linear_probe":
                results[m] = [in_views(lambda e: probe_scores(feature_source, e), b, seen, shared) for b in test]
            elif m == "centroid":
                results[m] = [in_views(lambda e: centroid_scores(feature_source, e), b, seen, shared) for b in test]
            elif m == "encoder_probe":
                from mtl.run.adapted import plain_model

                plain = plain_model(recipe.model.text_encoder, device)  # one frozen encoder for every episode
                results[m] = [encoder_probe_scores(plain, b) for b in test]
            elif m == "finetune":
                from mtl.run.alternatives import finetuned_probs

                results[m] = [scored(finetuned_probs(b.raw[0], b.ys.cpu().numpy(), b.ways,  # type: ignore[index]
                                                     b.raw[1], recipe.model.text_encoder, device,  # type: ignore[index]
                                                     finetune_epochs, seed), b) for b in test]
            elif m == "setfit":
                from mtl.run.setfit_baseline import setfit_probs

                results[m] = [scored(setfit_probs(b.raw[0], b.ys.cpu().numpy(), b.raw[1],  # type: ignore[index]
                                                  recipe.model.text_encoder, seed=seed, device=device), b)
                              for b in test]
        accs = {m: [r[0] for r in rs] for m, rs in results.items()}
        for m, values in accs.items():
            mean, ci = mean_ci(values)
            pv = None
            if m != reference and reference in accs:
                diff = np.asarray(accs[reference]) - np.asarray(values)
                with warnings.catch_warnings():  # near-constant differences over few episodes: scipy warns
                    warnings.simplefilter("ignore", RuntimeWarning)
                    pv = 1.0 if np.allclose(diff, 0) else float(stats.ttest_rel(accs[reference], values).pvalue)
            ece = expected_calibration_error(np.concatenate([r[1] for r in results[m]]),
                                             np.concatenate([r[2] for r in results[m]]))
            rows.append(Row(p.task.name, p.shots, m, mean, ci, len(values), pv, chosen.get(m, "-"), p.left_out,
                            round(ece, 5), seen))
        if on_rows:
            on_rows(rows)
    return rows


def write_reports(rows: list[Row], out: Path) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    fields = ["task", "shots", "method", "accuracy", "ci95", "episodes", "p_vs_maml", "step_size", "ece"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    for r in rows:
        w.writerow({k: getattr(r, k) for k in fields})
    atomic_write_bytes(out / "results.csv", buf.getvalue().encode())
    md = ["| task | shots | method | accuracy (%) | 95% CI | episodes | p (paired t, vs MAML) | step size | ECE |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = "-" if r.p_vs_maml is None else f"{r.p_vs_maml:.3g}"
        ece = "-" if r.ece is None else f"{r.ece:.3f}"
        md.append(f"| {r.task} | {r.shots} | {r.method} | {100 * r.accuracy:.2f} | ±{100 * r.ci95:.2f} | "
                  f"{r.episodes} | {p} | {r.step_size} | {ece} |")
    atomic_write_bytes(out / "results.md", ("\n".join(md) + "\n").encode())
    _plot(rows, out / "results.png")
    doc = {"results": [r.__dict__ for r in rows], "files": {k: str(out / f"results.{k}") for k in ("csv", "md", "png")}}
    atomic_write_bytes(out / "results.json", json.dumps(doc, indent=1).encode())
    return doc


def _plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r.task for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for m in dict.fromkeys(r.method for r in rows):
            pts = sorted((r.shots, r.accuracy, r.ci95) for r in rows if r.task == task and r.method == m)
            if pts:
                x, y, e = zip(*pts, strict=True)
                ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=m)
        ax.set(title=task, xlabel="shots per class", ylabel="accuracy")
        ax.set_xticks(sorted({r.shots for r in rows}))
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
