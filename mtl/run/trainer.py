"""The training loop: meta-training (MAML family) or joint multi-task training, one recipe.

Writes into the run folder: ``recipe.yaml``, ``metrics.jsonl`` (one JSON line per logged step),
``curve.png``, ``last.safetensors`` (for ``--resume``) and ``best.safetensors`` (best meta-validation
accuracy). Checkpoints are replaced atomically; a lock file keeps two runs out of one folder.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from mtl.algorithms import get_algorithm
from mtl.data.cache import atomic_write_bytes
from mtl.data.registry import Registry
from mtl.data.stream import ClassBatches, EpisodeStream, warn_left_out
from mtl.device import all_reduce_sum, autocast, barrier, close_distributed, init_distributed, set_threads
from mtl.errors import MtlError
from mtl.run.calibration import fit_temperature
from mtl.run.checkpoint import load_checkpoint, load_into, optimizer_tensors, restore_optimizer, save_checkpoint
from mtl.run.evaluate import mean_ci
from mtl.run.learner import build_learner, load_learner
from mtl.run.recipe import Recipe, changed_settings, load_recipe
from mtl.run.run_control import RunInterrupted, RunLock, StopSignals
from mtl.run.select import LOGISTIC, Setting, as_dict, candidates, choose, episode_logits
from mtl.run.tracking import open_trackers

Callback = Callable[[dict[str, Any]], None]


class Trainer:
    """One training run of a recipe, torchtune-style: construction only records what to do;
    :meth:`setup` builds the pieces (threads, process group, data, model, optimizer), :meth:`run`
    trains. ``Trainer(recipe, out).run()`` does both."""

    def __init__(self, recipe: Recipe, out: Path, registry: Registry | None = None) -> None:
        self.recipe = recipe
        self.out = out
        self.registry = registry
        self.algorithm = get_algorithm(recipe.method)
        self.ready = False
        self.start = 0
        self.best = -1.0
        self.elapsed = 0.0
        self.lr = recipe.outer_lr
        self.rank, self.world = 0, 1

    def setup(self) -> Trainer:
        """Threads and allocator, process group, data, model and optimizer; idempotent."""
        if self.ready:
            return self
        r = self.recipe
        set_threads(r.threads)
        self.rank, self.world, self.device = init_distributed(r.device)
        self.registry = self.registry or Registry(_dirs(r))
        tasks = [self.registry.load(n, r.model.image_overrides) for n in r.tasks]
        layers = r.model.text_trainable_layers
        # the training data: episodes (meta-learning) or task-balanced batches over all classes (joint)
        self.source: EpisodeStream | ClassBatches
        if self.algorithm.training_data == "classes":
            self.source = ClassBatches(tasks, r.meta_batch * r.ways * (r.shots + r.queries), r.seed, self.device,
                                       r.model.text_encoder, layers)
            self.heads = {t.name: len(t.classes) for t in tasks}
        else:
            self.source = EpisodeStream(tasks, None, r.ways, r.shots, r.queries, r.seed, self.device,
                                        r.model.text_encoder, layers, skip_small=True, augment=r.augment,
                                        within_groups=r.within_groups)
            self.heads = {t.name: self.source.ways_of(t.name) for t in tasks}
            if self.rank == 0:
                warn_left_out(self.source, "training")
        self.val: EpisodeStream | None = None
        if r.val_tasks:
            vt = [self.registry.load(n, r.model.image_overrides) for n in r.val_tasks]
            split = {t.name: t.spec.val_split or t.spec.test_split for t in vt}
            self.val = EpisodeStream(vt, split, r.val_ways or r.ways, r.val_shots or r.shots, r.queries,
                                     r.seed + 7919, self.device, r.model.text_encoder, layers, skip_small=True)
            if self.rank == 0:
                warn_left_out(self.val, "validation")
        val_tasks = self.val.tasks if self.val else []
        self.modalities = sorted({t.modality for t in tasks} | {t.modality for t in val_tasks})
        torch.manual_seed(r.seed)
        self.learner = build_learner(r, self.modalities, self.heads).to(self.device)
        self.params = [p for p in self.learner.parameters() if p.requires_grad]
        if not self.params:  # a frozen sentence encoder, no trunk, and an algorithm that trains no head
            raise MtlError(f"{r.method} has no weights to train in this model (a frozen text encoder, no trunk)",
                           "give it a trunk, `model: {trunk: [384]}`, or train the encoder's top layers, "
                           "`model: {text_trainable_layers: 2}`")
        # a pretrained encoder's trainable layers may learn more slowly than the rest (`encoder_lr`)
        pretrained = {id(p) for n, p in self.learner.named_parameters() if n.startswith("model.encoders.text.")}
        groups = [{"params": [p for p in self.params if id(p) not in pretrained], "scale": 1.0},
                  {"params": [p for p in self.params if id(p) in pretrained],
                   "scale": (r.encoder_lr or r.outer_lr) / r.outer_lr}]
        self.opt = torch.optim.Adam([g for g in groups if g["params"]], lr=r.outer_lr)
        self.task_info = {t.name: {"modality": t.modality, "classes": t.classes, "file": str(t.file)} for t in tasks}
        self.ready = True
        return self

    # --- checkpoints ---------------------------------------------------------------------------

    def meta(self, iteration: int) -> dict[str, Any]:
        return {"recipe": self.recipe.model_dump(mode="json"), "iteration": iteration, "best_val": self.best,
                "modalities": self.modalities, "heads": self.heads, "tasks": self.task_info,
                "elapsed_seconds": round(self.elapsed, 2), "method": self.recipe.method}

    def save(self, name: str, iteration: int, with_optimizer: bool) -> None:
        tensors = {f"learner.{k}": v for k, v in self.learner.state_dict().items()}
        meta = self.meta(iteration)
        if with_optimizer:
            opt_t, opt_meta = optimizer_tensors(self.opt)
            tensors.update(opt_t)
            meta["optimizer"] = opt_meta
        save_checkpoint(self.out / f"{name}.safetensors", tensors, meta)

    def resume(self) -> None:
        path, metrics = self.out / "last.safetensors", self.out / "metrics.jsonl"
        if not path.exists() and metrics.exists():  # stopped before its first save: begun again, not refused
            warnings.warn(f"{self.out} was stopped before it saved anything: starting from the first iteration",
                          stacklevel=2)
            if self.rank == 0:  # emptied, not deleted: every rank sees the same folder
                atomic_write_bytes(metrics, b"")
            return
        if not path.exists():
            raise MtlError(f"nothing to resume in {self.out} (no last.safetensors)", "run without --resume")
        tensors, meta = load_checkpoint(path, self.device)
        changed = changed_settings(Recipe.model_validate(meta["recipe"]), self.recipe)
        if changed:
            raise MtlError(f"the recipe differs from the one {self.out} was started with: {'; '.join(changed[:3])}",
                           "resume with the same config and overrides (only the length, the device and the "
                           "end-of-run steps may change)")
        load_into(self.learner, tensors, "learner.")
        restore_optimizer(self.opt, tensors, meta["optimizer"])
        self.start = int(meta["iteration"]) + 1
        self.best = float(meta["best_val"])
        self.elapsed = float(meta.get("elapsed_seconds", 0.0))
        if self.rank == 0 and metrics.exists():  # drop lines logged after the checkpoint: logged again
            keep = [line for line in metrics.read_text().splitlines()
                    if line.strip() and json.loads(line)["iteration"] <= meta["iteration"]]
            atomic_write_bytes(metrics, "".join(x + "\n" for x in keep).encode())

    # --- the loop ------------------------------------------------------------------------------

    def lr_at(self, it: int) -> float:
        """Cosine annealing over the run's budget: its iterations, or its wall time when that ends first,
        so that a time-limited run still ends at the low learning rate that the last gains come from."""
        r = self.recipe
        if not r.cosine:
            return r.outer_lr
        progress = it / r.iterations
        if r.time_limit_minutes:
            progress = min(1.0, max(progress, self.elapsed / (60 * r.time_limit_minutes)))
        return r.min_outer_lr + 0.5 * (r.outer_lr - r.min_outer_lr) * (1 + math.cos(math.pi * progress))

    def step(self, it: int) -> tuple[float, float]:
        r = self.recipe
        self.lr = self.lr_at(it)
        for g in self.opt.param_groups:
            g["lr"] = self.lr * g.get("scale", 1.0)
        self.opt.zero_grad(set_to_none=True)
        self.learner.train()
        with autocast(self.device, r.precision):  # this process's share: slots rank, rank + world, ...
            loss, acc, count = self.learner.outer_backward(self.source, it, r.meta_batch, self.rank, self.world)
        if self.world > 1:
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            stats = torch.tensor([loss, acc * count, count], dtype=torch.float64, device=self.device)
            all_reduce_sum([p.grad for p in self.params] + [stats])
            loss, acc = float(stats[0]), float(stats[1] / max(stats[2], 1))
        norm = torch.nn.utils.clip_grad_norm_(self.params, r.grad_clip or float("inf"))
        for what, value in (("training loss", loss), ("gradient norm", float(norm))):
            if not math.isfinite(value):
                raise MtlError(f"the {what} became {value} at iteration {it}; the last good checkpoint in "
                               f"{self.out} is kept", "lower outer_lr or inner.lr (or use precision: fp32) "
                               "and run again with --resume")
        self.opt.step()
        if self.learner.lrs:  # learned inner learning rates stay positive
            with torch.no_grad():
                for p in self.learner.lrs.values():
                    p.clamp_(min=1e-6)
        return loss, acc

    def agreed(self, seconds: float, stop: bool) -> tuple[float, bool]:
        """The ranks' mean elapsed time, and whether any was asked to stop: every rank must take the same
        learning rate and stop at the same iteration, or their collectives would no longer pair up."""
        if self.world == 1:
            return seconds, stop
        t = torch.tensor([seconds, float(stop)], dtype=torch.float64, device=self.device)
        all_reduce_sum([t])
        return float(t[0]) / self.world, bool(t[1] > 0)

    def validate(self) -> tuple[float, float]:
        assert self.val is not None  # batch norm keeps episodic (support) statistics: train mode on purpose
        with autocast(self.device, self.recipe.precision):
            accs = [self.learner.evaluate(b) for b in self.val.fixed(self.recipe.val_episodes)]
        return mean_ci(accs)

    def choose_adaptation(self) -> None:
        """Pick the adaptation settings (steps, step size) of the best checkpoint on validation
        episodes and store them in it: what ``adapt`` uses when a support set is too small to choose
        by cross-validation."""
        path = self.out / "best.safetensors"
        learner, meta = load_learner(path, self.device)
        episodes = self.val.fixed(min(self.recipe.val_episodes, 20)) if self.val else []
        with autocast(self.device, self.recipe.precision):
            # a tenth of the training time (at least a minute) for the choice
            tried: dict[Setting, list[torch.Tensor]] = {}  # each tried setting's query logits
            setting, scores = choose(learner, episodes, candidates(learner), max(60.0, self.elapsed / 10), tried)
            logits = tried[setting]
            # an image task's 1-shot default, the logistic head, needs a temperature of its own: at 1 shot its
            # regularised logits are far flatter than its accuracy warrants in the training domain
            images = bool(episodes) and learner.head_kind == "linear" and all(b.modality == "image" for b in episodes)
            heads = {"temperature": logits, **({"logistic_temperature": episode_logits(learner, episodes, LOGISTIC)}
                                               if images else {})}
        # the temperatures for 1-shot adaptation, where the support set cannot hold any example out
        held = torch.cat([b.yq for b in episodes]).cpu() if episodes else None
        temperatures = {key: round(fit_temperature(torch.cat(z).cpu(), held), 4) if episodes else 1.0
                        for key, z in heads.items()}
        tensors, _ = load_checkpoint(path, self.device)
        meta = {k: v for k, v in meta.items() if k not in ("path", "format_version", "versions")}
        chosen = {**as_dict(setting, "meta-validation", scores), **temperatures}
        save_checkpoint(path, tensors, {**meta, "adaptation": chosen})

    def run(self, resume: bool = False, on_step: Callback | None = None) -> dict[str, Any]:
        """Train; under torchrun every rank trains, rank 0 alone writes and validates."""
        self.setup()
        r = self.recipe
        lead = self.rank == 0
        with RunLock(self.out) if lead else contextlib.nullcontext(), StopSignals() as signals:
            if resume:
                self.resume()
            elif lead:
                for name in ("last.safetensors", "best.safetensors", "metrics.jsonl"):
                    if (self.out / name).exists():
                        raise MtlError(f"{self.out} already holds a run", "pass --resume to continue it, or use "
                                       "another --out folder")
            text = yaml.safe_dump(r.model_dump(mode="json"), sort_keys=False)
            if lead:
                atomic_write_bytes(self.out / "recipe.yaml", text.encode())
            metrics = (self.out / "metrics.jsonl").open("a") if lead else open(os.devnull, "w")  # noqa: SIM115
            trackers = open_trackers(r.log, self.out, r.model_dump(mode="json")) if lead else []
            t0 = time.perf_counter() - self.elapsed
            last_val: tuple[float, float] | None = None
            whitened: dict[str, Any] | None = None  # what the recipe's whitening did
            saved = self.elapsed  # when last.safetensors was last written (seconds of the run)
            it = self.start - 1
            try:
                for it in range(self.start, r.iterations):
                    loss, acc = self.step(it)
                    self.elapsed, stop = self.agreed(time.perf_counter() - t0, signals.requested)
                    row: dict[str, Any] = {"iteration": it, "loss": round(loss, 5), "accuracy": round(acc, 5),
                                           "lr": self.lr, "seconds": round(self.elapsed, 2)}
                    last = it == r.iterations - 1 or (r.time_limit_minutes and self.elapsed > 60 * r.time_limit_minutes)
                    if lead and ((it + 1) % r.val_every == 0 or last) and not stop:
                        if self.val is not None:
                            mean, ci = self.validate()
                            row.update(val_accuracy=round(mean, 5), val_ci95=round(ci, 5))
                            last_val = (mean, ci)
                            if mean > self.best:
                                self.best = mean
                                self.save("best", it, with_optimizer=False)
                        else:
                            self.save("best", it, with_optimizer=False)
                        self.save("last", it, with_optimizer=True)
                        saved = self.elapsed
                    elif lead and r.save_every_minutes and self.elapsed - saved > 60 * r.save_every_minutes:
                        self.save("last", it, with_optimizer=True)  # no validation: what --resume needs
                        saved = self.elapsed
                    metrics.write(json.dumps(row) + "\n")
                    metrics.flush()
                    for tracker in trackers:
                        tracker.log(row, it)
                    if on_step:
                        on_step(row)
                    if stop:  # Ctrl-C or SIGTERM: this iteration saved for --resume, without validating
                        if lead:
                            self.save("last", it, with_optimizer=True)
                        raise RunInterrupted(f"interrupted after iteration {it + 1} of {r.iterations}: saved "
                                             f"{self.out / 'last.safetensors'}; run the same command with --resume "
                                             "to go on (adapt and evaluate can use it as it is)")
                    if last:
                        break
            finally:
                metrics.close()
                for tracker in trackers:
                    tracker.close()
            if lead:
                plot_curve(self.out)
                if r.whiten is not None:  # first, so that the adaptation is chosen on the features as answered
                    from mtl.run.whitening import whiten

                    whitened = whiten(self.out, **r.whiten.model_dump(), registry=self.registry)
                if self.val is not None and r.choose_adaptation and (self.out / "best.safetensors").exists():
                    self.choose_adaptation()
        barrier()  # every rank returns once rank 0 has written the checkpoints
        return {"iterations": it + 1, "best_val_accuracy": self.best if self.val and self.best >= 0 else None,
                "last_val": last_val, "seconds": round(self.elapsed, 1), "out": str(self.out), "rank": self.rank,
                "algorithm": r.method, "whitening": whitened}


def train(recipe: Recipe | Path | str | dict[str, Any], out: Path | str, *, resume: bool = False,
          on_step: Callback | None = None, registry: Registry | None = None,
          tasks_dirs: Path | str | list[Path | str] | None = None, **overrides: Any) -> dict[str, Any]:
    """Train a recipe (a :class:`Recipe`, a YAML path or a dict) into the run folder ``out``.

    ``overrides`` set recipe fields, dotted for nested ones: ``train("configs/smoke.yaml", "runs/a",
    iterations=50, **{"inner.steps": 2})``. Returns a summary (iterations, best validation accuracy,
    seconds, run folder); under ``torchrun``, or with ``workers: N`` (:mod:`mtl.run.workers`), every rank
    trains and rank 0 writes."""
    if isinstance(recipe, str):
        recipe = Path(recipe)
    if Path(out).is_file():
        raise MtlError(f"--out {out} is a file", "give a folder for the run (made if missing)")
    r = load_recipe(recipe, overrides)
    if isinstance(tasks_dirs, str | Path):  # one folder of the user's task files
        tasks_dirs = [tasks_dirs]
    if tasks_dirs:
        r = r.model_copy(update={"tasks_dirs": r.tasks_dirs + [str(Path(p).resolve()) for p in tasks_dirs]})
    if r.workers > 1 and "WORLD_SIZE" not in os.environ:  # not under torchrun already
        from mtl.run.workers import in_workers

        return in_workers(_train, r, Path(out), resume, registry, on_step)
    return _train(r, Path(out), resume, registry, on_step)


def _train(recipe: Recipe, out: Path, resume: bool, registry: Registry | None, on_step: Callback | None
           ) -> dict[str, Any]:
    """One process's training (all of it, or one rank's share)."""
    try:
        return Trainer(recipe, out, registry).run(resume=resume, on_step=on_step)
    finally:
        close_distributed()


def _dirs(recipe: Recipe) -> list[Path]:
    from mtl import settings

    return settings.tasks_dirs([Path(p) for p in recipe.tasks_dirs])


def plot_curve(out: Path) -> None:
    """Training loss and accuracy, and validation accuracy with its 95% CI, against iteration."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    it = np.array([r["iteration"] for r in rows])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    k = max(1, len(rows) // 50)
    smooth = lambda v: np.convolve(v, np.ones(k) / k, mode="valid")  # noqa: E731
    a1.plot(it[k - 1:], smooth(np.array([r["loss"] for r in rows])))
    a1.set(xlabel="iteration", ylabel="query loss (train)", title="meta-training loss")
    a2.plot(it[k - 1:], smooth(np.array([r["accuracy"] for r in rows])), label="train (query)")
    val = [r for r in rows if "val_accuracy" in r]
    if val:
        a2.errorbar([r["iteration"] for r in val], [r["val_accuracy"] for r in val],
                    yerr=[r["val_ci95"] for r in val], marker="o", capsize=3, label="validation")
    a2.set(xlabel="iteration", ylabel="accuracy", title="accuracy")
    a2.legend()
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(out / "curve.png", buf.getvalue())
