"""Few-shot adaptation of a learned initialization to a new task, and the adapted model it saves.

``adapt`` takes K labelled examples per class (from the task's train split, or a user's file),
fine-tunes the initialization with the meta-learned inner loop, sets batch-norm statistics from the
support set, reports accuracy on the task's test split and saves an :class:`AdaptedModel`
(``model.safetensors`` + ``model.json``), which ``predict`` uses.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtl.algorithms.base import MetaLearner, TaskBatch
from mtl.data.images import prepare_images
from mtl.data.schema import ImageOptions
from mtl.data.task import Task
from mtl.errors import MtlError
from mtl.models import ModelConfig, MultiTaskModel, calibrate_batchnorm
from mtl.run.checkpoint import load_checkpoint, load_into, save_checkpoint

HEAD = "adapted"


def support_from_task(task: Task, shots: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """K examples of every class of the train split, drawn with ``seed``."""
    split = task.train
    rng = np.random.default_rng(seed)
    idx: list[np.ndarray] = []
    classes = sorted(split.counts())
    for c in classes:
        members = np.flatnonzero(split.labels == c)
        if len(members) < shots:
            raise MtlError(f"class '{task.classes[c]}' of task '{task.name}' has {len(members)} training examples, "
                           f"fewer than the {shots} shots asked", f"use --shots {len(members)} or fewer")
        idx.append(rng.choice(members, shots, replace=False))
    sel = np.concatenate(idx)
    remap = {c: i for i, c in enumerate(classes)}
    return split.inputs[sel], np.asarray([remap[c] for c in split.labels[sel].tolist()]), \
        [task.classes[c] for c in classes]


def read_examples(path: Path, modality: str, image: ImageOptions) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Labelled examples from a CSV/JSONL (``text``, ``label``) or a folder ``label/image``."""
    if not path.exists():
        raise MtlError(f"examples file {path} not found", "check the path")
    texts: list[Any] = []
    labels: list[str] = []
    if path.is_dir():
        if modality != "image":
            raise MtlError(f"{path} is a folder of images but the task is text", "give a CSV or JSONL of texts")
        files = sorted(p for p in path.glob("*/*") if p.is_file())
        texts = [p.read_bytes() for p in files]
        labels = [p.parent.name for p in files]
        names = [str(p) for p in files]
        inputs = prepare_images(texts, image, names)
    else:
        try:
            if path.suffix == ".jsonl":
                rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            else:
                rows = list(csv.DictReader(path.open(encoding="utf-8", newline="")))
        except (UnicodeDecodeError, json.JSONDecodeError, csv.Error) as e:
            raise MtlError(f"cannot read {path} ({e})", "use UTF-8 CSV with a header or JSON lines") from None
        for n, row in enumerate(rows, 1):
            if not isinstance(row, dict) or "text" not in row or "label" not in row:
                raise MtlError(f"{path} row {n} has no `text` and `label` fields", "name the columns text,label")
            texts.append(str(row["text"]))
            labels.append(str(row["label"]))
        if modality != "text":
            raise MtlError(f"{path} holds texts but the task is images", "give a folder of label/image files")
        inputs = np.asarray(texts, dtype=np.str_)
    if not labels:
        raise MtlError(f"{path} holds no examples", "add at least one example per class")
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise MtlError(f"{path} has only one label ({classes[0]})", "give examples of at least two classes")
    ids = np.asarray([classes.index(x) for x in labels])
    return inputs, ids, classes


def _inputs(x: np.ndarray, model: MultiTaskModel, modality: str, device: torch.device) -> torch.Tensor | list[str]:
    """What the model's encoder takes: image tensors, cached sentence embeddings, or strings."""
    if modality == "image":
        return torch.from_numpy(np.ascontiguousarray(x)).to(device)
    encoder = model.encoders["text"]
    if encoder.reads_embeddings:
        return encoder.embed(x.tolist()).to(device)  # type: ignore[operator]
    return x.tolist()


@dataclass
class AdaptResult:
    model_dir: str
    task: str
    classes: int
    shots: int
    steps: int
    test_accuracy: float | None
    test_ci95: float | None
    test_examples: int
    seconds: float


def tune_text_encoder(model: MultiTaskModel, texts: list[str], ys: torch.Tensor, layers: int, epochs: int,
                      lr: float, seed: int) -> None:
    """Fine-tune the top ``layers`` of the text encoder with the trunk and the adapted head on the
    support set (cross-entropy, AdamW): what lifts text tasks past a frozen encoder's ceiling.

    The lower layers' outputs are computed once, so an epoch costs the top layers only. Layers that
    meta-training already trained keep training (``layers`` is at least their number): everything
    below ``text_trainable_layers`` must stay pretrained, as cached token states stand in for it.
    """
    encoder = model.encoders["text"]
    layers = max(layers, encoder.trainable_layers)
    encoder.set_trainable(layers)
    model.config = model.config.model_copy(update={"text_trainable_layers": layers})
    batches = encoder.lower_states(texts)
    top = [p for p in encoder.parameters() if p.requires_grad]
    rest = [p for n, p in model.named_parameters() if not n.startswith("encoders.") and
            (not n.startswith("heads.") or n.startswith(f"heads.{HEAD}."))]
    opt = torch.optim.AdamW([{"params": top, "lr": lr}, {"params": rest, "lr": lr}], weight_decay=0.01)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)  # dropout: same seed, same model
    encoder.dropout = True
    model.train()
    with torch.enable_grad():
        for _ in range(epochs):
            for j in rng.permutation(len(batches)):
                idx, hidden, mask = batches[j]
                logits = model.heads[HEAD](model.from_encoding(encoder.upper(hidden, mask), "text"))
                loss = torch.nn.functional.cross_entropy(logits.float(), ys[idx.to(ys.device)])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    encoder.dropout = False
    model.eval()


def adapt(learner: MetaLearner, meta: dict[str, Any], task: Task, out: Path, shots: int, seed: int = 0,
          steps: int | None = None, lr: float | None = None, examples: Path | None = None,
          head_init: str | None = None, device: torch.device | None = None, encoder_layers: int = 0,
          encoder_epochs: int = 30, encoder_lr: float = 1e-4) -> AdaptResult:
    """Adapt ``learner``'s initialization to ``task`` from K shots (or ``examples``) and save the model.

    The meta-learned inner loop adapts first; with ``encoder_layers`` > 0 (text tasks), the top layers
    of the text encoder are then fine-tuned with the trunk and head for ``encoder_epochs`` epochs.
    """
    t0 = time.perf_counter()
    device = device or torch.device("cpu")
    model = learner.model
    modality = task.modality
    if modality not in model.encoders:
        raise MtlError(f"the checkpoint has no {modality} encoder (trained on {', '.join(model.encoders)} tasks)",
                       f"adapt a checkpoint trained with {modality} tasks")
    cfg = model.config
    image = task.spec.image_options
    if examples is not None:
        xs_np, ys_np, classes = read_examples(examples, modality, image)
        unknown = [c for c in classes if c not in task.classes]
        if unknown:
            raise MtlError(f"label '{unknown[0]}' in {examples} is not a class of task '{task.name}'",
                           f"use the task's labels ({', '.join(task.classes[:8])}...), or register your own task")
        shots = int(np.bincount(ys_np).min())
    else:
        xs_np, ys_np, classes = support_from_task(task, shots, seed)
    updates: dict[str, Any] = {}
    if lr is not None:
        updates.update(lr=lr, lslr=False)
        learner.lrs = torch.nn.ParameterDict()  # a user's learning rate replaces the learned ones
    if head_init is not None:
        updates["head_init"] = head_init
    learner.inner = learner.inner.model_copy(update=updates)
    steps = learner.eval_steps if steps is None else steps
    xs = _inputs(xs_np, model, modality, device)
    ys = torch.as_tensor(ys_np, device=device)
    batch = TaskBatch(task.name, modality, xs, ys, xs, ys)
    with torch.enable_grad(), learner.evaluation():
        _, fast, _ = learner.adapt(batch, steps, create_graph=False, track_query=False, detach=True)
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, value in fast.items():
            if name in params:
                params[name].copy_(value)
        if learner.inner.per_step_bn:
            row = min(steps, learner.inner.steps)
            for name in learner.bn_params():
                params[name].copy_(learner.bn_steps[name.replace(".", "__")][row])
        head = model.add_head(HEAD, len(classes))
        head.weight.copy_(fast["head.weight"])
        head.bias.copy_(fast["head.bias"])
    if encoder_layers:
        if modality != "text":
            raise MtlError("--encoder-layers fine-tunes a text encoder; this task has images",
                           "leave --encoder-layers out for image tasks")
        tune_text_encoder(model, xs_np.tolist(), ys, encoder_layers, encoder_epochs, encoder_lr, seed)
        cfg = model.config
    if learner.inner.per_step_bn_stats:  # the meta-learned statistics of the last step
        with torch.no_grad():
            for name, (mean, var) in learner.step_stats(steps).items():
                norm = learner.norms()[name]
                norm.running_mean.copy_(mean)  # type: ignore[union-attr]
                norm.running_var.copy_(var)  # type: ignore[union-attr]
    else:
        calibrate_batchnorm(model, lambda: model.features(xs, modality))
    adapted = AdaptedModel(model, {"model_config": cfg.model_dump(mode="json"), "modality": modality,
                                   "classes": classes, "task": task.name, "image": image.model_dump(mode="json"),
                                   "shots": shots, "steps": steps, "checkpoint": meta.get("path")})
    acc = ci = None
    n_test = 0
    name_to_id = {c: i for i, c in enumerate(classes)}
    test = task.test
    keep = np.asarray([task.classes[c] in name_to_id for c in test.labels.tolist()], bool)
    if keep.any():
        xq = test.inputs[keep]
        yq = np.asarray([name_to_id[task.classes[c]] for c in test.labels[keep].tolist()])
        pred = adapted.predict_ids(xq, cached=True)
        correct = (pred == yq).astype(np.float64)
        n_test = len(yq)
        acc = float(correct.mean())
        ci = float(1.96 * np.sqrt(acc * (1 - acc) / n_test))
    adapted.meta.update(test_accuracy=acc, test_ci95=ci, test_examples=n_test)
    adapted.save(out)
    return AdaptResult(str(out), task.name, len(classes), shots, steps, acc, ci, n_test,
                       round(time.perf_counter() - t0, 3))


class AdaptedModel:
    """A model adapted to one task: predicts its label names. Saved as safetensors + JSON."""

    def __init__(self, model: MultiTaskModel, meta: dict[str, Any]) -> None:
        self.model = model.eval()
        self.meta = meta
        self.device = next(model.parameters()).device

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    def save(self, out: Path) -> None:
        modality = self.meta["modality"]
        state = {k: v for k, v in self.model.state_dict().items()
                 if (k.startswith(("encoders.", "projections.")) and k.split(".")[1] == modality)
                 or k.startswith(("trunk.", f"heads.{HEAD}."))}
        save_checkpoint(out / "model.safetensors", state, {**self.meta, "kind": "adapted"})

    @classmethod
    def load(cls, folder: Path, device: torch.device | None = None) -> AdaptedModel:
        path = folder / "model.safetensors" if folder.is_dir() else folder
        tensors, meta = load_checkpoint(path, device or "cpu")
        if meta.get("kind") != "adapted":
            raise MtlError(f"{path} is a training checkpoint, not an adapted model",
                           "run `cli.py adapt` first and pass its --out folder to --model")
        model = MultiTaskModel(ModelConfig.model_validate(meta["model_config"]), [meta["modality"]])
        model.add_head(HEAD, len(meta["classes"]))
        load_into(model, tensors)
        return cls(model.to(device or "cpu"), meta)

    @torch.no_grad()
    def predict_proba(self, inputs: np.ndarray, batch_size: int = 512, cached: bool = False) -> np.ndarray:
        """``cached``: for a model with trainable text layers, read the frozen layers' outputs from
        the disk cache (a task's test split: the same texts every time), not for one-off inputs."""
        cfg = self.model.config
        modality = self.meta["modality"]
        states = None
        if cached and modality == "text" and not self.model.encoders["text"].reads_embeddings:
            from mtl.data.embeddings import token_states

            states = token_states(inputs.tolist(), cfg.text_encoder, cfg.text_trainable_layers).to(self.device)
        out = []
        for i in range(0, len(inputs), batch_size):
            if states is not None:
                x: Any = states[torch.arange(i, min(i + batch_size, len(inputs)), device=self.device)]
            else:
                x = _inputs(inputs[i:i + batch_size], self.model, modality, self.device)
            out.append(torch.softmax(self.model(x, self.meta["modality"], HEAD).float(), dim=1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)))

    def predict_ids(self, inputs: np.ndarray, cached: bool = False) -> np.ndarray:
        return self.predict_proba(inputs, cached=cached).argmax(1)

    def load_inputs(self, items: list[str]) -> tuple[np.ndarray, list[str]]:
        """Texts, or image paths; a ``.txt`` file holds one text (or image path) per line."""
        expanded: list[str] = []
        for item in items:
            p = Path(item)
            if p.suffix == ".txt" and p.is_file():
                expanded += [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
            elif self.meta["modality"] == "image" and p.is_dir():
                expanded += sorted(str(f) for f in p.iterdir() if f.is_file())
            else:
                expanded.append(item)
        if not expanded:
            raise MtlError("no inputs to predict", "give texts, image paths or a .txt file of them")
        if self.meta["modality"] == "text":
            return np.asarray(expanded, dtype=np.str_), expanded
        blobs = []
        for f in expanded:
            try:
                blobs.append(Path(f).read_bytes())
            except OSError:
                raise MtlError(f"image {f} cannot be read", "check the path") from None
        images = prepare_images(blobs, ImageOptions.model_validate(self.meta["image"]), expanded)
        return images, expanded
