"""``train``, ``adapt``, ``predict``, ``evaluate`` and ``compare``: each parses, calls one library function, prints."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Column, Table

from mtl.cli.common import (
    Device,
    Json,
    SharedNorms,
    TasksDir,
    _print_json,
    _registry,
    app,
    err,
    out,
    progress,
)
from mtl.errors import MtlError


@app.command("train")
def train(config: Annotated[Path, typer.Option("--config", help="Recipe YAML (see configs/).")],
          out_dir: Annotated[Path, typer.Option("--out", help="Run folder.")],
          method: Annotated[str | None, typer.Option(help="A registered algorithm (`algorithms` lists them).")] = None,
          seed: Annotated[int | None, typer.Option()] = None,
          device: Annotated[str | None, typer.Option(help="auto, cpu or cuda.")] = None,
          iterations: Annotated[int | None, typer.Option()] = None,
          workers: Annotated[int | None, typer.Option(
              help="Processes on this machine sharing every meta-batch (faster on a CPU).")] = None,
          resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out.")] = False,
          override: Annotated[list[str] | None, typer.Option(
              "--set", help="Override any recipe field: --set inner.steps=5 (repeatable).")] = None,
          log: Annotated[list[str] | None, typer.Option(
              "--log", help="Also log to tensorboard or mlflow (repeatable; optional packages).")] = None,
          tasks_dir: TasksDir = None, as_json: Json = False) -> None:
    """Meta-train (or jointly train) a shared-trunk multi-head model from a recipe."""
    import yaml as _yaml
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from mtl.run.recipe import load_recipe
    from mtl.run.run_control import RunInterrupted
    from mtl.run.trainer import train as run_training

    overrides: dict[str, object] = {"method": method, "seed": seed, "device": device, "iterations": iterations,
                                    "workers": workers, "log": log}
    for item in override or []:
        if "=" not in item:
            raise MtlError(f"--set {item!r} is not key=value", "write e.g. --set inner.lr=0.1")
        key, value = item.split("=", 1)
        overrides[key] = _yaml.safe_load(value)
    recipe = load_recipe(config, overrides)
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]:.3f} acc {task.fields[acc]:.3f} val {task.fields[val]}"),
               TextColumn("{task.fields[rate]:.2f} it/s"), TimeRemainingColumn()]
    with Progress(*columns, console=err, disable=as_json or not err.is_terminal, transient=False) as bar:
        job = bar.add_task(recipe.method, total=recipe.iterations, loss=0.0, acc=0.0, val="-", rate=0.0)
        rate = _Rate()

        def on_step(row: dict[str, Any]) -> None:
            val = f"{row['val_accuracy']:.3f}" if "val_accuracy" in row else bar.tasks[0].fields["val"]
            bar.update(job, completed=int(row["iteration"]) + 1, loss=row["loss"], acc=row["accuracy"], val=val,
                       rate=rate.tick())

        try:
            result = run_training(recipe, out_dir, resume=resume, on_step=on_step, tasks_dirs=tasks_dir)
        except RunInterrupted as e:  # Click would swallow it without a word
            bar.stop()
            err.print(str(e), highlight=False, markup=False)
            raise typer.Exit(130) from None
    if result["rank"] != 0:  # under torchrun, rank 0 alone reports
        return
    if as_json:
        _print_json(result)
        return
    val = result["best_val_accuracy"]
    best = f"; best validation accuracy {val:.4f}" if val is not None else ""
    out.print(f"trained {result['iterations']} iterations in {result['seconds']} s{best}", highlight=False)
    if result["whitening"]:
        out.print(_whitened(result["whitening"]), highlight=False)
    files = [f for f in ("best.safetensors", "last.safetensors", "metrics.jsonl", "curve.png")
             if (out_dir / f).exists()]
    out.print(f"run folder: {out_dir} ({', '.join(files)})", highlight=False)


class _Rate:
    """Iterations per second since the first step (the first one includes start-up)."""

    t0: float | None = None
    n = 0

    def tick(self) -> float:
        now = time.perf_counter()
        self.t0, self.n = self.t0 or now, self.n + 1
        return (self.n - 1) / (now - self.t0) if now > self.t0 else 0.0


@app.command("adapt")
def adapt_cmd(checkpoint: Annotated[Path, typer.Option("--checkpoint", help="Run folder or checkpoint file.")],
              out_dir: Annotated[Path, typer.Option("--out", help="Folder for the adapted model.")],
              task: Annotated[str | None, typer.Option(
                  "--task", help="Registry task to adapt to (with --examples: optional; then the examples alone, "
                  "named after their file).")] = None,
              shots: Annotated[int, typer.Option(help="Labelled examples per class.")] = 5,
              steps: Annotated[int | None, typer.Option(help="Gradient steps (default: the recipe's).")] = None,
              lr: Annotated[float | None, typer.Option(help="Step size (default: the learned ones).")] = None,
              examples: Annotated[Path | None, typer.Option(
                  help="Your labelled examples: CSV/JSONL with text,label (or the task file's field names, or any "
                  "two columns: text, then label); for images the same with each image file's path; or a folder "
                  "label/image (label/text file).")] = None,
              head_init: Annotated[str | None, typer.Option(
                  help="zero, proto or logistic (a head fitted by logistic regression).")] = None,
              encoder_layers: Annotated[str, typer.Option(
                  help="Text tasks: then also fine-tune this many top layers of the text encoder (or all).")] = "0",
              encoder_epochs: Annotated[int | None, typer.Option(
                  help="Epochs of that fine-tuning (default: about 125 steps, 5 to 30 epochs).")] = None,
              encoder_lr: Annotated[float | None, typer.Option(
                  help="Its learning rate (default: 2e-4 x 384 / the encoder's width; MiniLM 2e-4, mpnet 1e-4).")
              ] = None,
              reject_by: Annotated[str, typer.Option(
                  help="Out-of-scope score: distance (relative Mahalanobis, to the classes), similarity (cosine, "
                       "to the nearest class prototype) or probability (calibrated).")] = "distance",
              reject_rate: Annotated[float | None, typer.Option(
                  help="Share of known inputs the threshold chosen on the support set may refuse "
                       "(default 0.03).")] = None,
              reject_below: Annotated[float | None, typer.Option(
                  help="Refuse inputs scoring below this instead.")] = None,
              none_label: Annotated[str, typer.Option(help="The answer for refused inputs.")] = "none",
              select: Annotated[bool, typer.Option(
                  "--select/--no-select", help="Text: cross-validate the meta-learned initialization, a linear "
                  "probe, plain fine-tuning and the last two together with token matching on the support set; keep "
                  "the three together unless beaten beyond the noise (about a minute for 60 texts on 2 CPU cores, "
                  "instead of seconds).")] = False,
              unknown: Annotated[str | None, typer.Option(
                  help="A task of inputs that fit no class (clinc150-oos): report out-of-scope recall, "
                       "precision and AUROC on its test split.")] = None,
              meta_only: Annotated[bool, typer.Option(
                  "--meta-only", help="Text: keep the meta-learned adaptation; do not weigh a linear probe on the "
                  "pretrained encoder against it (the default with 2 or more shots).")] = False,
              unlabeled: Annotated[Path | None, typer.Option(
                  help="Unlabeled inputs like those you expect: a .txt file of texts, one per line, or a folder "
                       "of images; the adapted model labels them and a linear classifier trained on its confident "
                       "answers joins it (text) or replaces its head (images).")] = None,
              split: Annotated[str | None, typer.Option(
                  help="Draw the shots from this split (default: the task's train split) and score on its other "
                       "examples: `--split test` adapts to the held-out classes of a task split by classes.")] = None,
              views: Annotated[int | None, typer.Option(
                  help="Images: also adapt to the support set turned by 90-degree steps (4) and mirrored (8); "
                       "the views answer together (default 8).")] = None,
              shared_norms: SharedNorms = True,
              test_examples: Annotated[str, typer.Option(
                  help="Score on at most this many test examples, a seeded random sample (or all).")] = "5000",
              device: Device = "auto", seed: int = 0, tasks_dir: TasksDir = None, as_json: Json = False) -> None:
    """Fine-tune a learned initialization on a few labelled examples of a task and save it.

    The adapted model's probabilities are calibrated, and it learns when to answer "none of these"."""
    from mtl.cli.adapt_summary import summary
    from mtl.run.adapt import adapt
    from mtl.run.select import count_or_all
    from mtl.run.text_finetune import layer_count

    if task is None and examples is None:
        raise MtlError("adapt needs a task", "give --task NAME (a registry task) or --examples FILE (your own)")
    with progress(f"adapting to {task or examples}", quiet=as_json):
        m = adapt(checkpoint, task, shots=shots, examples=examples, steps=steps, lr=lr, head_init=head_init,
                  encoder_layers=encoder_layers, encoder_epochs=encoder_epochs, encoder_lr=encoder_lr, seed=seed,
                  device=device, out=out_dir,
                  registry=_registry(tasks_dir), reject_by=reject_by, reject_below=reject_below,
                  none=none_label, unknown=unknown, select=select, unlabeled=unlabeled, meta_only=meta_only,
                  split=split, views=views, shared_norms=shared_norms, test_examples=count_or_all(test_examples,
                                                                                                "--test-examples"),
                  **({} if reject_rate is None else {"reject_rate": reject_rate}))
    task = m.meta["task"]
    result = {"model_dir": str(out_dir), "task": task, "classes": len(m.classes),
              **{k: m.meta.get(k) for k in ("shots", "steps", "lr", "selection", "test_accuracy", "test_ci95",
                                            "test_examples", "test_of", "test_split", "test_ece",
                                            "test_ece_uncalibrated",
                                            "calibration", "rejection", "open_set", "choice", "self_training",
                                            "views", "shared_norms", "seconds")}}
    if as_json:
        _print_json(result)
        return
    out.print(summary(m.meta, len(m.classes), out_dir, split, examples), highlight=False)
    if m.meta.get("modality") == "text" and not select and layer_count(encoder_layers) == 0:
        folds = (m.meta.get("choice") or {}).get("accuracy") or {}
        said = (f"the support set's folds answered {max(folds.values()):.0%} right this way; " if folds else "")
        err.print(f"tip: {said}--select also tries fine-tuning the pretrained encoder, alone and with the probe and "
                  "token matching, and keeps what cross-validation on the support set favours: minutes instead of "
                  "seconds (TREC's 6 question types, 10 examples each: 59% -> 84% of the test split, in 61 s)",
                  highlight=False)
    if m.meta.get("open_set"):
        o = m.meta["open_set"]
        out.print(f"against {o['unknown_examples']} inputs of {o['unknown_task']}: out-of-scope recall "
                  f"{o['oos_recall']:.3f}, precision {o['oos_precision']:.3f}, AUROC {o['auroc']:.3f}; in-scope "
                  f"accuracy {o['in_scope_accuracy_with_rejection']:.4f} with refusals ({o['in_scope_accuracy']:.4f} "
                  "without)", highlight=False)


@app.command("predict")
def predict(model: Annotated[Path, typer.Option("--model", help="Folder written by `adapt`.")],
            inputs: Annotated[list[str], typer.Argument(
                help="Texts or image paths; .txt files of them, one per line; CSV/TSV/JSON(L) tables (their `text` "
                "column, or for images `path`); folders of images, or of text files.")],
            top: Annotated[int, typer.Option(help="How many labels to list per input.")] = 1,
            reject_below: Annotated[float | None, typer.Option(
                help="Answer 'none' below this score instead of the model's threshold.")] = None,
            device: Device = "auto", as_json: Json = False) -> None:
    """Predict label names (or 'none' for inputs that fit no class) and calibrated probabilities."""
    from mtl.device import resolve_device
    from mtl.run.adapted import AdaptedModel
    from mtl.run.given_inputs import table_score

    m = AdaptedModel.load(model, resolve_device(device))
    if reject_below is not None:
        m.reject_below(reject_below)
    with progress("reading the inputs", quiet=as_json):
        rows = m.predictions(inputs, top)
    score = table_score(rows)  # a table of inputs with a label column
    if as_json:
        _print_json({"model": str(model), "task": m.meta["task"], "predictions": rows,
                     **({"score": score} if score else {})})
        return
    for r in rows:
        others = "".join(f"\t{t['label']}\t{t['probability']:.3f}" for t in r["top"][1:])
        out.print(f"{r['label']}\t{r['probability']:.3f}{others}\t{r['input']}", highlight=False, markup=False)
    if score:
        err.print(f"accuracy {score['accuracy']:.4f} +/- {score['ci95']:.4f} on the {score['labelled']} inputs "
                  "whose table (or class folder) gives their label", highlight=False)


@app.command("evaluate")
def evaluate(checkpoint: Annotated[Path, typer.Option("--checkpoint", help="Run folder or checkpoint file.")],
             task: Annotated[str, typer.Option("--task", help="Registry task.")],
             ways: int = 5, shots: int = 1, queries: int = 15, episodes: int = 600,
             split: Annotated[str | None, typer.Option(help="Default: the task's test split.")] = None,
             steps: Annotated[int | None, typer.Option(help="Adaptation steps (default: the recipe's).")] = None,
             head_init: Annotated[str | None, typer.Option(
                 help="The new head's start: zero, proto or logistic (default: the recipe's).")] = None,
             views: Annotated[int, typer.Option(
                 help="Images: also answer each episode turned by 90-degree steps (4) and mirrored (8), "
                      "averaging the views (for models trained with rotations as classes).")] = 1,
             shared_norms: SharedNorms = True,
             seed: int = 0, device: Device = "auto", tasks_dir: TasksDir = None, as_json: Json = False) -> None:
    """Episodic accuracy: mean and 95% confidence interval over seeded episodes."""
    from mtl.run.evaluate import evaluate as run_evaluation

    info = run_evaluation(checkpoint, task, ways, shots, queries, episodes, split, steps, seed=seed, device=device,
                          registry=_registry(tasks_dir), head_init=head_init, views=views,
                          shared_norms=shared_norms)
    if as_json:
        _print_json(info)
    else:
        seen = f" ({views} views each)" if views > 1 else ""
        out.print(f"{task} ({info['split']}) {info['ways']}-way {shots}-shot over {episodes} episodes{seen}: "
                  f"{100 * info['accuracy']:.2f}% +/- {100 * info['ci95']:.2f}% (95% CI); ECE {info['ece']:.3f} at "
                  f"temperature {info['temperature']:.2f} ({info['ece_uncalibrated']:.3f} at 1)", highlight=False)
        left = info["left_out"]
        if left:
            from mtl.data.episodes import listed

            out.print(f"{len(left)} classes with fewer than {shots + queries} examples (shots + queries) left out "
                      f"({listed(left)})", highlight=False)


@app.command("whiten")
def whiten_cmd(checkpoint: Annotated[Path, typer.Option("--checkpoint", help="Run folder of `cli.py train`.")],
               tasks: Annotated[str | None, typer.Option(
                   help="Tasks to estimate on, comma-separated (default: the recipe's training tasks).")] = None,
               shrink: Annotated[float, typer.Option(
                   help="0 whitens fully, 1 leaves the features as they are.")] = 0.5,
               episodes: int = 200,
               views: Annotated[int, typer.Option(help="Images: each episode also turned and mirrored.")] = 8,
               within_groups: Annotated[float, typer.Option(
                   help="Share of episodes drawn within one group of classes (the part of their names before a /: "
                        "Omniglot's alphabets), as the new tasks will be.")] = 0.0,
               tasks_dir: TasksDir = None, as_json: Json = False) -> None:
    """Whiten a checkpoint's features by their within-class covariance (nearest-prototype models)."""
    from mtl.run.whitening import whiten

    info = whiten(checkpoint, tasks.split(",") if tasks else None, shrink, episodes, views, within_groups,
                  _registry(tasks_dir))
    if as_json:
        _print_json(info)
    else:
        out.print(_whitened(info), highlight=False)


def _whitened(info: dict[str, Any]) -> str:
    return (f"whitened {info['checkpoint']}: within-class covariance of {info['episodes']} episodes of "
            f"{', '.join(info['tasks'])}, shrunk {info['shrink']} towards the identity")


@app.command("compare")
def compare_cmd(tasks: Annotated[str, typer.Option("--tasks", help="Registry tasks, comma-separated.")],
                checkpoints: Annotated[str, typer.Option(
                    "--checkpoints", help="label=RUN_DIR,...: maml=runs/a,protonet=runs/b,multitask=runs/c")],
                shots: Annotated[str, typer.Option(help="Shots per class, comma-separated.")] = "1,5",
                episodes: int = 100, ways: Annotated[int | None, typer.Option(help="Default: the recipe's.")] = None,
                methods: Annotated[str | None, typer.Option(
                    help="Comma-separated checkpoint labels and baselines (scratch, linear_probe, centroid; for "
                    "text encoder_probe, the pretrained encoder probed, and finetune and setfit: it fine-tuned "
                    "whole, or by SetFit); default: all but those last two.")] = None,
                steps: Annotated[int, typer.Option(help="Fine-tuning steps, the same for every method.")] = 10,
                queries: int = 15, seed: int = 0,
                finetune_epochs: Annotated[int | None, typer.Option(
                    help="Epochs of the finetune baseline (default: adapt's, about 125 steps).")] = None,
                out_dir: Annotated[Path, typer.Option("--out", help="Folder for results.*")] = Path("runs/compare"),
                views: Annotated[int, typer.Option(
                    help="Image tasks: answer every episode also turned (4) and mirrored (8), as adapt does.")] = 1,
                shared_norms: SharedNorms = True,
                device: Device = "auto", tasks_dir: TasksDir = None, as_json: Json = False) -> None:
    """Checkpoints (MAML, ProtoNet, multi-task...) and baselines on the same episodes, with CIs and tests.

    The reports (table, CSV, JSON, plot) are rewritten after every finished setting."""
    from mtl.device import resolve_device
    from mtl.run.compare import compare, write_reports

    reg = _registry(tasks_dir)
    cps: dict[str, Path] = {}
    for item in checkpoints.split(","):
        if "=" not in item:
            raise MtlError(f"--checkpoints entry {item!r} is not label=RUN_DIR", "write maml=runs/a,multitask=runs/b")
        k, v = item.split("=", 1)
        cps[k.strip()] = Path(v.strip())
    try:
        shot_list = [int(s) for s in shots.split(",")]
    except ValueError:
        raise MtlError(f"--shots {shots!r} is not a list of numbers", "write e.g. --shots 1,5,10") from None
    chosen = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
    done: list[Any] = []

    def keep(rows: list[Any]) -> None:
        write_reports(rows, out_dir)
        done[:] = rows

    try:
        with progress("comparing", quiet=as_json):
            rows = compare([t.strip() for t in tasks.split(",")], shot_list, episodes, cps, chosen, ways, steps,
                           queries, seed, resolve_device(device), on_rows=keep, registry=reg,
                           finetune_epochs=finetune_epochs, views=views, shared_norms=shared_norms)
    except KeyboardInterrupt:  # Click would swallow it without a word
        n = len(done)
        kept = f"{out_dir} holds the {n} result{'s' * (n != 1)} finished so far" if n else "no setting had finished"
        err.print(f"interrupted: {kept}", highlight=False)
        raise typer.Exit(130) from None
    doc = write_reports(rows, out_dir)
    if as_json:
        _print_json(doc)
        return
    names = [Column(h, overflow="fold", min_width=min(32, max(len(getattr(r, h)) for r in rows)))
             for h in ("task", "method")]
    table = Table(names[0], "shots", names[1], "accuracy", "95% CI", "p vs reference", "step size", "ECE",
                  title="same episodes for every method")  # the names whole: a user types them again
    for r in rows:
        table.add_row(r.task, str(r.shots), r.method, f"{100 * r.accuracy:.2f}%", f"±{100 * r.ci95:.2f}",
                      "-" if r.p_vs_maml is None else f"{r.p_vs_maml:.3g}", r.step_size,
                      "-" if r.ece is None else f"{r.ece:.3f}")
    out.print(table)
    from mtl.data.episodes import listed

    for task, shot, left in sorted({(r.task, r.shots, tuple(r.left_out)) for r in rows if r.left_out}):
        out.print(f"{task} {shot}-shot: {len(left)} classes with too few test examples left out "
                  f"({listed(left)})", highlight=False)
    out.print(f"wrote {out_dir}/results.csv, results.md, results.png, results.json", highlight=False)
