"""Side-by-side comparison on the very same episodes: MAML against the multi-task baseline, a
from-scratch model, a linear probe and nearest class centroids on frozen features.

Every method sees identical episodes (same seeds), so differences are paired; the report gives
mean accuracy with a 95% confidence interval and a paired t-test of MAML against each baseline.
Fine-tuned methods get the same number of steps, and each its step size chosen on episodes of the
task's validation split (never on test queries): from a grid, and for MAML also its meta-learned ones.
"""

from __future__ import annotations

import csv
import io
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats

from mtl.algorithms.base import MetaLearner, TaskBatch
from mtl.data.cache import atomic_write_bytes
from mtl.data.inputs import concat
from mtl.data.stream import EpisodeStream
from mtl.data.task import Task
from mtl.run.evaluate import mean_ci
from mtl.run.learner import build_learner, load_learner
from mtl.run.recipe import Recipe

LR_GRID = (0.01, 0.05, 0.2, 0.5)
METHODS = ("maml", "multitask", "scratch", "linear_probe", "centroid")


@dataclass
class Row:
    task: str
    shots: int
    method: str
    accuracy: float
    ci95: float
    episodes: int
    p_vs_maml: float | None
    step_size: str = "-"  # the fine-tuning step size chosen on validation episodes ("learned": meta-learned)


def frozen_features(learner: MetaLearner, b: TaskBatch) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        f = learner.episode_features({}, concat(b.xs, b.xq), b.modality, 0, len(b.ys)).float().cpu().numpy()
    return f[: len(b.ys)], f[len(b.ys):]


def probe_accuracy(learner: MetaLearner, b: TaskBatch) -> float:
    from sklearn.linear_model import LogisticRegression

    fs, fq = frozen_features(learner, b)
    with warnings.catch_warnings():  # 1 shot: as many classes as examples, which scikit-learn warns about
        warnings.simplefilter("ignore", UserWarning)
        clf = LogisticRegression(max_iter=1000, C=1.0).fit(fs, b.ys.cpu().numpy())
    return float((clf.predict(fq) == b.yq.cpu().numpy()).mean())


def centroid_accuracy(learner: MetaLearner, b: TaskBatch) -> float:
    fs, fq = frozen_features(learner, b)
    ys = b.ys.cpu().numpy()
    protos = np.stack([fs[ys == c].mean(0) for c in range(int(ys.max()) + 1)])
    pred = ((fq[:, None, :] - protos[None]) ** 2).sum(-1).argmin(1)
    return float((pred == b.yq.cpu().numpy()).mean())


def finetune_accuracy(learner: MetaLearner, b: TaskBatch, steps: int) -> float:
    return learner.evaluate(b, steps)


def with_lr(learner: MetaLearner, lr: float, keep_head: bool = False) -> MetaLearner:
    """Plain fine-tuning with step size ``lr``; a new zero head unless ``keep_head`` (MAML's own init)."""
    update: dict[str, Any] = {"lr": lr, "lslr": False} if keep_head else {"lr": lr, "lslr": False, "head_init": "zero"}
    learner.inner = learner.inner.model_copy(update=update)
    learner.lrs = torch.nn.ParameterDict()
    return learner


def choose_lr(make: Any, val: list[TaskBatch], steps: int, learned: bool = False) -> float | None:
    """The step size with the best accuracy on validation episodes: one of LR_GRID or, for a
    meta-learned model, its own learned step sizes (``None``)."""
    candidates: list[float | None] = [None, *LR_GRID] if learned else list(LR_GRID)
    scores = {lr: np.mean([finetune_accuracy(make() if lr is None else with_lr(make(), lr, keep_head=learned), b,
                                             steps) for b in val]) for lr in candidates}
    return max(scores, key=lambda k: scores[k])  # ties: the first (the learned one)


def compare(tasks: Sequence[Task], shots_list: Sequence[int], episodes: int, checkpoints: dict[str, Path],
            methods: Sequence[str], ways: int | None, steps: int, queries: int, seed: int,
            device: torch.device) -> list[Row]:
    learners = {k: load_learner(p, device) for k, p in checkpoints.items()}
    if "maml" not in learners:
        from mtl.errors import MtlError

        raise MtlError("compare needs a MAML checkpoint", "pass --checkpoints maml=RUN_DIR[,multitask=RUN_DIR]")
    maml_meta = learners["maml"][1]
    depth = {k: lm[0].model.config.text_trainable_layers for k, lm in learners.items()}
    if len(set(depth.values())) > 1:  # one set of episode inputs serves every checkpoint
        from mtl.errors import MtlError

        raise MtlError(f"the checkpoints train different numbers of text encoder layers ({depth})",
                       "compare checkpoints trained with the same model.text_trainable_layers")
    feature_source = learners.get("multitask", learners["maml"])[0]
    recipe = Recipe.model_validate(maml_meta["recipe"])
    rows: list[Row] = []
    layers = recipe.model.text_trainable_layers
    for task in tasks:
        n_ways = ways or min(len(task.test.class_ids()), recipe.ways)
        val_split = task.spec.val_split or task.spec.train_split
        for shots in shots_list:
            test = EpisodeStream([task], task.spec.test_split, n_ways, shots, queries, seed, device,
                                 recipe.model.text_encoder, layers, cap_ways=False).fixed(episodes)
            val = EpisodeStream([task], val_split, n_ways, shots, queries, seed + 1, device, recipe.model.text_encoder,
                                layers, cap_ways=False).fixed(min(20, episodes))
            accs: dict[str, list[float]] = {}
            chosen: dict[str, str] = {}
            for m in methods:
                if m == "maml":  # its meta-learned step sizes, unless a grid value does better on validation
                    def make_maml() -> MetaLearner:
                        return load_learner(checkpoints["maml"], device)[0]

                    lr = choose_lr(make_maml, val, steps, learned=True)
                    learner = make_maml() if lr is None else with_lr(make_maml(), lr, keep_head=True)
                    chosen[m] = "learned" if lr is None else f"{lr:g}"
                    accs[m] = [finetune_accuracy(learner, b, steps) for b in test]
                elif m in ("multitask", "scratch"):
                    if m == "multitask" and "multitask" not in learners:
                        continue
                    path = checkpoints.get("multitask")

                    def make(m: str = m, path: Path | None = path) -> MetaLearner:
                        if m == "multitask":
                            return load_learner(path, device)[0]  # type: ignore[arg-type]
                        torch.manual_seed(seed)
                        return build_learner(recipe.model_copy(update={"method": "maml"}),
                                             maml_meta["modalities"], {}).to(device)

                    lr = choose_lr(make, val, steps)
                    assert lr is not None
                    learner = with_lr(make(), lr)
                    chosen[m] = f"{lr:g}"
                    accs[m] = [finetune_accuracy(learner, b, steps) for b in test]
                elif m == "linear_probe":
                    accs[m] = [probe_accuracy(feature_source, b) for b in test]
                elif m == "centroid":
                    accs[m] = [centroid_accuracy(feature_source, b) for b in test]
            for m, values in accs.items():
                mean, ci = mean_ci(values)
                p = None
                if m != "maml" and "maml" in accs:
                    diff = np.asarray(accs["maml"]) - np.asarray(values)
                    p = 1.0 if np.allclose(diff, 0) else float(stats.ttest_rel(accs["maml"], values).pvalue)
                rows.append(Row(task.name, shots, m, mean, ci, len(values), p, chosen.get(m, "-")))
    return rows


def write_reports(rows: list[Row], out: Path) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    fields = ["task", "shots", "method", "accuracy", "ci95", "episodes", "p_vs_maml", "step_size"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    for r in rows:
        w.writerow({k: getattr(r, k) for k in fields})
    atomic_write_bytes(out / "results.csv", lambda f: f.write(buf.getvalue().encode()))
    md = ["| task | shots | method | accuracy (%) | 95% CI | episodes | p (paired t, vs MAML) | step size |",
          "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = "-" if r.p_vs_maml is None else f"{r.p_vs_maml:.3g}"
        md.append(f"| {r.task} | {r.shots} | {r.method} | {100 * r.accuracy:.2f} | ±{100 * r.ci95:.2f} | "
                  f"{r.episodes} | {p} | {r.step_size} |")
    atomic_write_bytes(out / "results.md", lambda f: f.write(("\n".join(md) + "\n").encode()))
    _plot(rows, out / "results.png")
    doc = {"results": [r.__dict__ for r in rows], "files": {k: str(out / f"results.{k}") for k in ("csv", "md", "png")}}
    atomic_write_bytes(out / "results.json", lambda f: f.write(json.dumps(doc, indent=1).encode()))
    return doc


def _plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r.task for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for m in METHODS:
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
    atomic_write_bytes(path, lambda f: f.write(buf.getvalue()))
