"""Few-shot adaptation of a learned initialization to a new task: a pure function of the loaded
algorithm and a support set, returning an :class:`~mtl.run.adapted.AdaptedModel`.

``fit`` copies the model, runs the algorithm's inner loop on the support set (the same one training
uses), optionally fine-tunes the top text-encoder layers, and sets batch-norm statistics from the
support set; the loaded algorithm is never changed, so one load serves any number of adaptations.
``adapt`` is the whole job behind ``cli.py adapt`` and ``mtl.adapt``: load, draw or read the support
set, fit, score on the task's test split, save.
"""

from __future__ import annotations

import copy
import itertools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtl.algorithms import Algorithm
from mtl.data.embeddings import load_transformer, transformer_layers
from mtl.data.inputs import Inputs
from mtl.data.registry import Registry
from mtl.data.schema import ImageOptions
from mtl.data.stream import TaskBatch
from mtl.data.task import Task
from mtl.device import autocast, native_bf16, resolve_device
from mtl.errors import MtlError
from mtl.models import MultiTaskModel, calibrate_batchnorm
from mtl.run import outliers
from mtl.run.adapted import HEAD, AdaptedModel, model_inputs, plain_model, text_features
from mtl.run.calibration import (
    CALIBRATION_FOLDS,
    REJECT_RATE,
    Rejection,
    calibrate_from,
    expected_calibration_error,
    softmax,
)
from mtl.run.examples import read_examples
from mtl.run.learner import load_learner
from mtl.run.select import Setting, as_dict, candidates, choose, support_folds

log = logging.getLogger(__name__)  # progress of a long adaptation (the CLI shows it on a spinner)


@dataclass(frozen=True)
class Support:
    """The labelled examples to adapt to: inputs, label ids into ``classes``."""

    inputs: np.ndarray
    labels: np.ndarray
    classes: list[str]
    modality: str
    task: str = "user"
    image: ImageOptions = field(default_factory=ImageOptions)

    @property
    def shots(self) -> int:
        return int(np.bincount(self.labels).min())


def support_from_task(task: Task, shots: int, seed: int) -> Support:
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
    return Support(split.inputs[sel], np.asarray([remap[c] for c in split.labels[sel].tolist()]),
                   [task.classes[c] for c in classes], task.modality, task.name, task.spec.image_options)


def support_from_arrays(inputs: Any, labels: Any, modality: str, image: ImageOptions | None = None,
                        task: str = "user") -> Support:
    """A support set from Python values: texts (or uint8 images) and label names."""
    labels = [str(x) for x in labels]
    if len(labels) != len(inputs):
        raise MtlError(f"{len(inputs)} inputs but {len(labels)} labels", "give one label per input")
    if not labels:
        raise MtlError("no examples to adapt to", "give at least one example of each of two classes")
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise MtlError(f"only one label ({classes[0]})", "give examples of at least two classes")
    if modality == "text":
        x = np.asarray([str(t) for t in inputs], dtype=np.str_)
    else:
        x = np.stack([np.asarray(i) for i in inputs])
    index = {c: i for i, c in enumerate(classes)}
    return Support(x, np.asarray([index[c] for c in labels]), classes, modality, task, image or ImageOptions())


ALL_LAYERS = 10_000  # `--encoder-layers all`: every transformer layer (capped at the encoder's depth)


def layer_count(layers: int | str) -> int:
    """``--encoder-layers``: a number, or ``all`` (every layer of the sentence encoder)."""
    if isinstance(layers, str):
        if layers.strip().lower() == "all":
            return ALL_LAYERS
        try:
            return int(layers)
        except ValueError:
            raise MtlError(f"--encoder-layers {layers} is not a number of layers", "use a number or all") from None
    return layers


# optimizer steps of encoder fine-tuning by default, at ENCODER_LR: BANKING77 10-shot gains nothing from
# 250 steps at 1e-4 (86.16% over 3 draws) against 125 at 2e-4 (86.23%), which take 0.6x the time
ENCODER_STEPS = 125
ENCODER_LR = 2e-4  # for all-MiniLM-L6-v2's width, ENCODER_WIDTH; a wider encoder gets proportionally less
ENCODER_WIDTH = 384


def encoder_lr_for(encoder: str, lr: float | None = None) -> float:
    """``lr`` if given, else :data:`ENCODER_LR` scaled by :data:`ENCODER_WIDTH` / the encoder's width.

    A wider encoder's fine-tuning moves further per step: Adam moves every weight by about the learning
    rate, so a layer summing twice as many inputs changes its outputs about twice as much. all-mpnet-base-v2
    (768) then gets 1e-4: ``--select`` on six development tasks 90.44% against 90.03% at 2e-4, its
    fine-tuning alone 88.24% against 86.76% (docs/BENCHMARKS.md)."""
    if lr is not None:
        return lr
    return ENCODER_LR * ENCODER_WIDTH / int(load_transformer(encoder)[0].config.hidden_size)


def auto_epochs(batches: int) -> int:
    """Epochs for about :data:`ENCODER_STEPS` optimizer steps, 5 to 30: a 15-way 5-shot support set
    (3 batches) gets 30 epochs, a 77-way 10-shot one (25 batches) 5, so a large support set is not
    fine-tuned for minutes past the point where it stops gaining."""
    return min(30, max(5, -(-ENCODER_STEPS // max(batches, 1))))


def tune_text_encoder(model: MultiTaskModel, texts: list[str], ys: torch.Tensor, layers: int, epochs: int | None,
                      lr: float, seed: int, precision: str = "auto") -> None:
    """Fine-tune the top ``layers`` of the text encoder with the trunk and the adapted head on the
    support set (cross-entropy, AdamW): what lifts text tasks past a frozen encoder's ceiling.

    The lower layers' outputs are computed once, so an epoch costs the top layers only. Layers that
    meta-training already trained keep training (``layers`` is at least their number): everything
    below ``text_trainable_layers`` must stay pretrained, as cached token states stand in for it.
    ``precision``: ``auto`` runs the layers under bf16 autocast where bf16 is native (weights and the
    optimizer stay fp32), else ``fp32`` or ``bf16`` as given. ``epochs``: None for :func:`auto_epochs`.
    """
    encoder = model.encoders["text"]
    if layers >= ALL_LAYERS:
        layers = len(transformer_layers(load_transformer(model.config.text_encoder)[0]))
    layers = max(layers, encoder.trainable_layers)
    encoder.set_trainable(layers)
    model.config = model.config.model_copy(update={"text_trainable_layers": layers})
    batches = encoder.lower_states(texts)
    epochs = epochs or auto_epochs(len(batches))
    log.info("fine-tuning %d layers of the text encoder: %d epochs of %d examples", layers, epochs, len(texts))
    top = [p for p in encoder.parameters() if p.requires_grad]
    rest = [p for n, p in model.named_parameters() if not n.startswith("encoders.") and
            (not n.startswith("heads.") or n.startswith(f"heads.{HEAD}."))]
    opt = torch.optim.AdamW([{"params": top, "lr": lr}, {"params": rest, "lr": lr}], weight_decay=0.01)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)  # dropout: same seed, same model
    encoder.dropout = True
    model.train()
    if precision == "auto":
        precision = "bf16" if native_bf16(ys.device) else "fp32"
    with torch.enable_grad():
        for _ in range(epochs):
            for j in rng.permutation(len(batches)):
                idx, hidden, mask = batches[j]
                with autocast(ys.device, precision):
                    logits = model.heads[HEAD](model.from_encoding(encoder.upper(hidden, mask), "text"))
                loss = torch.nn.functional.cross_entropy(logits.float(), ys[idx.to(ys.device)])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    encoder.dropout = False
    model.eval()


def choose_setting(learner: Algorithm, support: Support, xs: Inputs, ys: torch.Tensor, steps: int | None,
                   lr: float | None, head_init: str | None, stored: dict[str, Any] | None) -> dict[str, Any]:
    """How to adapt when the user did not say: by cross-validation on the support set when it has
    two or more examples per class, else as chosen on meta-validation episodes at the end of
    training (``stored``), else the recipe's; what the user gives is used as given."""
    if steps is not None or lr is not None or head_init is not None:
        s = Setting(learner.eval_steps if steps is None else steps, lr, head_init)
        return as_dict(s, "given", {})
    if support.shots >= 2:
        folds = support_folds(support.task, support.modality, xs, ys)
        s, scores = choose(learner, folds, candidates(learner, stored))
        return as_dict(s, f"{len(folds)}-fold cross-validation on the support set", scores)
    if stored:
        return {**stored, "by": "meta-validation at the end of training"}
    return as_dict(Setting(learner.eval_steps), "the recipe", {})


def calibrate(learner: Algorithm, feats: torch.Tensor, support: Support, xs: Inputs, ys: torch.Tensor,
              selection: dict[str, Any], stored: dict[str, Any] | None, reject_by: str, reject_rate: float,
              none: str, reads: str = "model") -> tuple[dict[str, Any], Rejection, dict[str, torch.Tensor]]:
    """The temperature, the rejection threshold and the out-of-scope score's statistics, from the
    support set alone.

    With two or more examples per class, out-of-fold predictions (leaving one example per class out
    at a time, up to 5 folds) fit the temperature and give the in-scope scores whose low quantile is
    the threshold; with one, the temperature fitted on meta-validation episodes at the end of training
    is used and nothing is refused unless the user sets a threshold."""
    if support.shots < 2:
        t = float((stored or {}).get("temperature", 1.0))
        by = "meta-validation at the end of training" if stored and "temperature" in stored else "none (1-shot)"
        off = Rejection(reject_by, None, none, "1 shot per class: none held out to set a threshold; use --reject-below",
                        reads)
        return {"temperature": t, "by": by}, off, outliers.fit(reject_by, feats, ys, len(support.classes))
    folds = support_folds(support.task, support.modality, xs, ys, folds=min(support.shots, CALIBRATION_FOLDS))
    steps, lr, head_init = int(selection["steps"]), selection.get("lr"), selection.get("head_init")
    logits = torch.cat([learner.query_logits_after(b, steps, lr, head_init) for b in folds]).cpu().numpy()
    held = torch.cat([b.yq for b in folds]).cpu().numpy()
    return calibrate_from(logits, held, f"{len(folds)}-fold cross-validation on the support set", feats, ys,
                          len(support.classes), reject_by, reject_rate, none, reads)


def fit(learner: Algorithm, support: Support, steps: int | None = None, lr: float | None = None,
        head_init: str | None = None, encoder_layers: int = 0, encoder_epochs: int | None = None,
        encoder_lr: float | None = None, seed: int = 0, checkpoint: str | None = None,
        stored: dict[str, Any] | None = None, reject_by: str = "distance", reject_rate: float = REJECT_RATE,
        none: str = "none") -> AdaptedModel:
    """Adapt a copy of ``learner``'s initialization to ``support``; ``learner`` is left unchanged.

    The algorithm's inner loop adapts first: ``steps`` and ``lr`` (replacing the learned step sizes)
    and ``head_init`` (``zero`` or ``proto``) as given, or chosen by :func:`choose_setting`; with
    ``encoder_layers`` > 0 (text), the top layers of the text encoder are then fine-tuned with the
    trunk and head. The probabilities are then calibrated and a rejection threshold chosen on the support
    set (:func:`calibrate`)."""
    # a held encoder has buffers only; a frozen encoder with no trunk, nothing at all
    device = next(itertools.chain(learner.parameters(), learner.buffers()), torch.empty(0)).device
    modality = support.modality
    if modality not in learner.model.encoders:
        raise MtlError(f"the checkpoint has no {modality} encoder (trained on {', '.join(learner.model.encoders)} "
                       "tasks)", f"adapt a checkpoint trained with {modality} tasks")
    if encoder_layers and modality != "text":
        raise MtlError("--encoder-layers fine-tunes a text encoder; this task has images",
                       "leave --encoder-layers out for image tasks")
    xs = model_inputs(support.inputs, learner.model, modality, device)
    ys = torch.as_tensor(support.labels, device=device)
    selection = choose_setting(learner, support, xs, ys, steps, lr, head_init, stored)
    steps, lr, head_init = int(selection["steps"]), selection.get("lr"), selection.get("head_init")
    batch = TaskBatch(support.task, modality, xs, ys, xs, ys)
    with torch.enable_grad(), learner.evaluation():
        _, fast, _ = learner.adapt(batch, steps, create_graph=False, track_query=False, detach=True, lr=lr,
                                   head_init=head_init)
    model: MultiTaskModel = copy.deepcopy(learner.model)
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, value in fast.items():
            if name in params:
                params[name].copy_(value)
        if learner.inner.per_step_bn:
            row = min(steps, learner.inner.steps)
            for name in learner.bn_params():
                params[name].copy_(learner.bn_steps[name.replace(".", "__")][row])
        head = model.add_head(HEAD, len(support.classes), learner.head_kind)
        head.weight.copy_(fast["head.weight"])
        head.bias.copy_(fast["head.bias"])
    if encoder_layers:
        tune_text_encoder(model, support.inputs.tolist(), ys, encoder_layers, encoder_epochs,
                          encoder_lr_for(model.config.text_encoder, encoder_lr), seed)
    norms = dict(model.named_modules())
    if learner.inner.per_step_bn_stats:  # the meta-learned statistics of the last step
        with torch.no_grad():
            for name, (mean, var) in learner.step_stats(steps).items():
                norms[name].running_mean.copy_(mean)  # type: ignore[union-attr]
                norms[name].running_var.copy_(var)  # type: ignore[union-attr]
    else:
        calibrate_batchnorm(model, lambda: model.features(xs, modality))
    model.eval()
    frozen = plain_model(model.config.text_encoder, device) if encoder_layers and reject_by != "probability" \
        else None  # a tuned encoder has seen the support set: the rejection score reads the pretrained one
    with torch.no_grad():
        feats = text_features(model if frozen is None else frozen, support.inputs, device) if encoder_layers \
            else model.features(xs, modality)
    calibration, rejection, state = calibrate(learner, feats, support, xs, ys, selection, stored, reject_by,
                                              reject_rate, none, "frozen" if frozen else "model")
    return AdaptedModel(model, {
        "model_config": model.config.model_dump(mode="json"), "modality": modality, "classes": support.classes,
        "task": support.task, "image": support.image.model_dump(mode="json"), "shots": support.shots,
        "steps": steps, "lr": lr, "selection": selection, "head": learner.head_kind, "algorithm": learner.name,
        "checkpoint": checkpoint, "calibration": calibration, "rejection": rejection.as_dict()}, state, frozen)


def score_on_task(model: AdaptedModel, task: Task) -> dict[str, Any]:
    """Accuracy (and its 95% CI) and expected calibration error, before and after the temperature, on
    the examples of ``task``'s test split whose class the model knows."""
    name_to_id = {c: i for i, c in enumerate(model.classes)}
    test = task.test
    keep = np.asarray([task.classes[c] in name_to_id for c in test.labels.tolist()], bool)
    if not keep.any():
        return {"test_accuracy": None, "test_ci95": None, "test_examples": 0}
    yq = np.asarray([name_to_id[task.classes[c]] for c in test.labels[keep].tolist()])
    log.info("scoring the test split: %d examples", len(yq))
    logits, _ = model.outputs(test.inputs[keep], cached=True)
    acc = float((logits.argmax(1) == yq).mean())
    return {"test_accuracy": acc, "test_ci95": float(1.96 * np.sqrt(acc * (1 - acc) / len(yq))),
            "test_examples": len(yq), "test_ece": expected_calibration_error(softmax(logits, model.temperature), yq),
            "test_ece_uncalibrated": expected_calibration_error(softmax(logits), yq)}


def adapt(checkpoint: Path | str | Algorithm, task: str | Task | tuple[Any, Any] | None = None, *,
          shots: int = 5, examples: Path | None = None, steps: int | None = None, lr: float | None = None,
          head_init: str | None = None, encoder_layers: int | str = 0, encoder_epochs: int | None = None,
          encoder_lr: float | None = None, seed: int = 0, device: str | torch.device = "auto",
          out: Path | str | None = None, registry: Registry | None = None, reject_by: str = "distance",
          reject_rate: float = REJECT_RATE, reject_below: float | None = None, none: str = "none",
          unknown: str | Task | None = None, select: bool = False) -> AdaptedModel:
    """Adapt a learned initialization to a task and return the adapted model (saved to ``out`` if given).

    ``task``: a registry task name (or a loaded :class:`Task`), whose train split gives ``shots``
    examples per class (or ``examples``: a CSV/JSONL of text,label or a folder label/image) and whose
    test split scores the result (``meta["test_accuracy"]``, ``meta["test_ece"]``); or ``(inputs, labels)``
    of your own. ``predict`` answers ``none`` for inputs whose ``reject_by`` score (``distance``: relative
    Mahalanobis distance to the classes; ``similarity``: cosine to the nearest class prototype;
    ``probability``: the calibrated top probability; :mod:`mtl.run.outliers`) is below the threshold
    chosen on the support set to refuse ``reject_rate`` of known inputs, or below ``reject_below``.
    ``unknown``: a task whose test examples fit none of the classes (``clinc150-oos``); the open-set
    report on them and the known test examples goes to ``meta["open_set"]``. ``select`` (text): the
    meta-learned initialization, a linear probe or plain fine-tuning of the pretrained encoder
    (``encoder_epochs``, ``encoder_lr``: default :func:`encoder_lr_for`), by cross-validation on the support set
    (:func:`mtl.run.alternatives.select`); what was chosen goes to ``meta["choice"]``.
    """
    t0 = time.perf_counter()
    if shots < 1:
        raise MtlError(f"--shots {shots} is not a number of examples", "use --shots 1 or more")
    if head_init not in (None, "zero", "proto"):
        raise MtlError(f"--head-init {head_init} is unknown", "use zero or proto")
    if reject_by not in outliers.SCORES:
        raise MtlError(f"--reject-by {reject_by} is unknown", f"use one of {', '.join(outliers.SCORES)}")
    if not 0 <= reject_rate < 1:
        raise MtlError(f"--reject-rate {reject_rate} is not a fraction", "use e.g. 0.03 (0: refuse nothing)")
    encoder_layers = layer_count(encoder_layers)
    if encoder_layers < 0 or (encoder_epochs is not None and encoder_epochs < 1):
        raise MtlError("--encoder-layers must be 0 or more (or all) and --encoder-epochs 1 or more",
                       "e.g. --encoder-layers 2")
    stored = None
    if isinstance(checkpoint, Algorithm):
        learner, source = checkpoint, None
    else:
        learner, meta = load_learner(Path(checkpoint), resolve_device(device), hold_text=encoder_layers == 0)
        source, stored = meta.get("path"), meta.get("adaptation")
    loaded: Task | None = None
    if isinstance(task, tuple):
        inputs, labels = task
        modality = "text" if isinstance(next(iter(inputs), None), str) else "image"
        support = support_from_arrays(inputs, labels, modality)
    else:
        if task is None:
            raise MtlError("no task to adapt to", "give a registry task name, or (inputs, labels)")
        loaded = task if isinstance(task, Task) else (registry or Registry()).load(task)
        if examples is not None:
            xs, ys, classes = read_examples(examples, loaded.modality, loaded.spec.image_options)
            foreign = [c for c in classes if c not in loaded.classes]
            if foreign:
                raise MtlError(f"label '{foreign[0]}' in {examples} is not a class of task '{loaded.name}'",
                               f"use the task's labels ({', '.join(loaded.classes[:8])}...), or register your own task")
            support = Support(xs, ys, classes, loaded.modality, loaded.name, loaded.spec.image_options)
        else:
            support = support_from_task(loaded, shots, seed)
    if select and support.modality != "text":
        raise MtlError("--select chooses among a linear probe and fine-tuning of a sentence encoder; this task has "
                       "images", "leave --select out for image tasks")
    model = fit(learner, support, steps, lr, head_init, encoder_layers, encoder_epochs, encoder_lr, seed, source,
                stored, reject_by, reject_rate, none)
    if select:
        from mtl.run.alternatives import select as choose_method

        model = choose_method(model, learner, support, encoder_epochs, encoder_lr, seed, reject_by, reject_rate, none)
    model.meta.update(score_on_task(model, loaded) if loaded is not None else
                      {"test_accuracy": None, "test_ci95": None, "test_examples": 0})
    if reject_below is not None:
        model.reject_below(reject_below)
    if unknown is not None:
        from mtl.run.openset import open_set_on_tasks

        if loaded is None:
            raise MtlError("--unknown needs a registry task to adapt to", "give --task NAME")
        other = unknown if isinstance(unknown, Task) else (registry or Registry()).load(unknown)
        model.meta["open_set"] = open_set_on_tasks(model, loaded, other)
    if out is not None:
        model.save(out)
    model.meta["seconds"] = round(time.perf_counter() - t0, 3)
    return model
