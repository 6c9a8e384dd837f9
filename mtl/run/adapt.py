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
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtl.algorithms import Algorithm
from mtl.data.inputs import Inputs
from mtl.data.registry import Registry, task_read_as, with_dirs
from mtl.data.stream import TaskBatch
from mtl.data.task import Split, Task
from mtl.data.views import answered, check_views, episode_view, turned
from mtl.device import resolve_device
from mtl.errors import MtlError
from mtl.models import MultiTaskModel, calibrate_batchnorm
from mtl.run import outliers, text_default
from mtl.run.adapted import HEAD, AdaptedModel, model_inputs, plain_model, text_features
from mtl.run.calibration import (
    CALIBRATION_FOLDS,
    REJECT_RATE,
    Rejection,
    calibrate_from,
    expected_calibration_error,
    one_shot_rejection,
    softmax,
)
from mtl.run.examples import read_examples
from mtl.run.learner import load_learner
from mtl.run.select import LOGISTIC, Setting, as_dict, candidates, check_setting, choose, support_folds
from mtl.run.support import Support, support_from_arrays, support_from_examples, support_from_task, values_modality
from mtl.run.text_finetune import encoder_lr_for, layer_count, tune_text_encoder
from mtl.run.view_norms import Rows, episode_shared, keep_statistics, normalising_with, shared_rows

DEFAULT_VIEWS = 8  # images: the support set and its 7 other symmetries of the square (mtl.data.views)
log = logging.getLogger(__name__)  # progress of a long adaptation (the CLI shows it on a spinner)


def views_for(views: int | None, modality: str) -> int:
    """How many views of the support set to adapt to: as given, else :data:`DEFAULT_VIEWS` for images and 1
    for texts."""
    return views if views is not None else DEFAULT_VIEWS if modality == "image" else 1


def choose_setting(learner: Algorithm, support: Support, xs: Inputs, ys: torch.Tensor, steps: int | None,
                   lr: float | None, head_init: str | None, stored: dict[str, Any] | None) -> dict[str, Any]:
    """How to adapt when the user did not say: by cross-validation on the support set when it has
    two or more examples per class (for images a head fitted by logistic regression unless beaten beyond
    the folds' noise: :func:`mtl.run.select.prefer`); with one, for images that head, else as chosen on
    meta-validation episodes at the end of training (``stored``), else the recipe's; what the user gives
    is used as given."""
    if steps is not None or lr is not None or head_init is not None:
        s = Setting(learner.eval_steps if steps is None else steps, lr, head_init)
        return as_dict(s, "given", {})
    if support.shots >= 2:
        folds = support_folds(support.task, support.modality, xs, ys)
        options = candidates(learner, stored)
        if support.modality == "image" and learner.head_kind == "linear":
            # off Omniglot, 3.2 points ahead of the algorithm's own adaptation on average, in 13 of 14 image
            # task settings (docs/BENCHMARKS.md): the default, unless beaten beyond the folds' noise
            options = [LOGISTIC, *options]
        s, scores = choose(learner, folds, options, default=LOGISTIC)
        return as_dict(s, f"{len(folds)}-fold cross-validation on the support set", scores)
    if support.modality == "image" and learner.head_kind == "linear":  # 1-shot: ahead in 7 of 8 settings too
        return as_dict(LOGISTIC, "the image default at 1 shot per class", {})
    if stored:
        return {**stored, "by": "meta-validation at the end of training"}
    return as_dict(Setting(learner.eval_steps), "the recipe", {})


def calibrate(learner: Algorithm, feats: torch.Tensor, support: Support, xs: Inputs, ys: torch.Tensor,
              selection: dict[str, Any], stored: dict[str, Any] | None, reject_by: str, reject_rate: float,
              none: str, reads: str = "model", views: int = 1, shared_norms: bool = False
              ) -> tuple[dict[str, Any], Rejection, dict[str, torch.Tensor]]:
    """The temperature, the rejection threshold and the out-of-scope score's statistics, from the
    support set alone.

    With two or more examples per class, out-of-fold predictions (leaving one example per class out
    at a time, up to 5 folds) fit the temperature and give the in-scope scores whose low quantile is
    the threshold; with one, the temperature fitted on meta-validation episodes at the end of training
    is used and nothing is refused unless the user sets a threshold. With ``views``, each fold is answered
    as the adapted model will answer, by the mean log-probability of its turned copies (normalised alike where
    ``shared_norms``: :mod:`mtl.run.view_norms`)."""
    if support.shots < 2:  # a temperature fitted on meta-validation episodes for the head in use, if any
        key = "logistic_temperature" if selection.get("head_init") == "logistic" else "temperature"
        t = float((stored or {}).get(key, 1.0))
        by = "meta-validation at the end of training" if stored and key in stored else "none (1-shot)"
        off = one_shot_rejection(reject_by, none, reads)
        return {"temperature": t, "by": by}, off, outliers.fit(reject_by, feats, ys, len(support.classes))
    folds = support_folds(support.task, support.modality, xs, ys, folds=min(support.shots, CALIBRATION_FOLDS))
    steps, lr, head_init = int(selection["steps"]), selection.get("lr"), selection.get("head_init")
    logits = torch.cat([fold_answers(learner, b, steps, lr, head_init, views, shared_norms)
                        for b in folds]).cpu().numpy()
    held = torch.cat([b.yq for b in folds]).cpu().numpy()
    return calibrate_from(logits, held, f"{len(folds)}-fold cross-validation on the support set", feats, ys,
                          len(support.classes), reject_by, reject_rate, none, reads)


def fold_answers(learner: Algorithm, b: TaskBatch, steps: int, lr: float | None, head_init: str | None, views: int,
                 shared_norms: bool) -> torch.Tensor:
    """Fold ``b``'s held-out logits, answered in ``views`` as the adapted model answers."""
    with episode_shared(learner, b.xs, views, shared_norms, steps):  # type: ignore[arg-type]
        return answered(lambda e: learner.query_logits_after(e, steps, lr, head_init), b, views)


def fit(learner: Algorithm, support: Support, steps: int | None = None, lr: float | None = None,
        head_init: str | None = None, encoder_layers: int = 0, encoder_epochs: int | None = None,
        encoder_lr: float | None = None, seed: int = 0, checkpoint: str | None = None,
        stored: dict[str, Any] | None = None, reject_by: str = "distance", reject_rate: float = REJECT_RATE,
        none: str = "none", views: int = 1, shared_norms: bool = True) -> AdaptedModel:
    """Adapt a copy of ``learner``'s initialization to ``support``; ``learner`` is left unchanged.

    The algorithm's inner loop adapts first: ``steps`` and ``lr`` (replacing the learned step sizes)
    and ``head_init`` (``zero`` or ``proto``) as given, or chosen by :func:`choose_setting`; with
    ``encoder_layers`` > 0 (text), the top layers of the text encoder are then fine-tuned with the
    trunk and head. The probabilities are then calibrated and a rejection threshold chosen on the support
    set (:func:`calibrate`). ``views`` (images, 4 or 8): a model is also adapted to each turned copy of the
    support set (:mod:`mtl.data.views`), with the same setting, and the adapted model answers with their mean
    log-probability over the input's copies: MNIST, the digits, faces and held-out Omniglot alphabets from
    four checkpoints, 1 to 5 shots, ahead in 67 of 69 draws by 5.2 points on average (docs/BENCHMARKS.md).
    With ``shared_norms``, every view is normalised with the batch-norm statistics of the support set in all
    views (:mod:`mtl.run.view_norms`), else each with its own view's."""
    check_views(views, support.modality)
    device = learner.model.anchor.device  # a frozen encoder with no trunk has no parameters
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
    shared = shared_rows(learner, xs, views, shared_norms, steps)  # type: ignore[arg-type]  # None for 1 view
    model = adapted_network(learner, batch, steps, lr, head_init, shared=shared)
    if encoder_layers:
        tune_text_encoder(model, support.inputs.tolist(), ys, encoder_layers, encoder_epochs,
                          encoder_lr_for(model.config.text_encoder, encoder_lr), seed)
    if shared is None:
        set_norm_statistics(learner, model, xs, modality, steps)
    model.eval()
    others = [adapted_network(learner, episode_view(batch, v), steps, lr, head_init, norms_from=turned(xs, v),
                              shared=shared) for v in range(1, views)]  # type: ignore[arg-type]
    frozen = plain_model(model.config.text_encoder, device) if encoder_layers and reject_by != "probability" \
        else None  # a tuned encoder has seen the support set: the rejection score reads the pretrained one
    with torch.no_grad():
        feats = text_features(model if frozen is None else frozen, support.inputs, device) if encoder_layers \
            else model.features(xs, modality)
    calibration, rejection, state = calibrate(learner, feats, support, xs, ys, selection, stored, reject_by,
                                              reject_rate, none, "frozen" if frozen else "model", views,
                                              shared is not None)
    return AdaptedModel(model, {
        "model_config": model.config.model_dump(mode="json"), "modality": modality, "classes": support.classes,
        "task": support.task, "image": support.image.model_dump(mode="json"), "shots": support.shots,
        "examples": len(support.labels), "steps": steps, "lr": lr, "selection": selection, "head": learner.head_kind,
        "algorithm": learner.name,
        "checkpoint": checkpoint, "calibration": calibration, "rejection": rejection.as_dict(), "views": views,
        "shared_norms": shared is not None},
        state, frozen, views=others)


def adapted_network(learner: Algorithm, batch: TaskBatch, steps: int, lr: float | None, head_init: str | None,
                    norms_from: Inputs | None = None, shared: Rows | None = None) -> MultiTaskModel:
    """A copy of the learner's network after its inner loop on ``batch``'s support set, with the adapted
    head; its batch-norm statistics are ``shared`` (:mod:`mtl.run.view_norms`) in the inner loop and after
    when given, else set from ``norms_from`` when given (else by the caller, after any encoder fine-tuning)."""
    with torch.enable_grad(), learner.evaluation(), normalising_with(learner, shared):
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
        head = model.add_head(HEAD, fast["head.weight"].shape[0], learner.head_kind)
        head.weight.copy_(fast["head.weight"])
        head.bias.copy_(fast["head.bias"])
    if shared is not None:
        keep_statistics(model, shared)
    elif norms_from is not None:
        set_norm_statistics(learner, model, norms_from, batch.modality, steps)
    return model.eval()


def set_norm_statistics(learner: Algorithm, model: MultiTaskModel, xs: Inputs, modality: str, steps: int) -> None:
    """Batch-norm running statistics: the meta-learned ones of the last inner step (MAML++), else the
    support set's ``xs``."""
    if learner.inner.per_step_bn_stats:
        keep_statistics(model, learner.step_stats(steps))
    else:
        calibrate_batchnorm(model, lambda: model.features(xs, modality))


def scored_split(task: Task, support: Support | None = None) -> Split:
    """Where an adaptation to ``task`` is scored: its test split, or, for shots drawn from another split than
    the train split (a class-disjoint task's held-out classes), the rest of that split. The examples the
    model learned from are never among those it is scored on."""
    drawn = support.split if support is not None else None
    name = task.spec.test_split if drawn in (None, task.spec.train_split) else drawn
    split = task.split(name)
    if drawn != name or support is None or support.rows is None:
        return split
    rest = np.setdiff1d(np.arange(len(split)), support.rows)
    return Split(split.task, split.name, split.inputs[rest], split.labels[rest])


TEST_EXAMPLES = 5000  # scored by `adapt` at most (a seeded sample): every shipped test split; 1.8 min of long texts


def score_on_task(model: AdaptedModel, task: Task, support: Support | None = None, limit: int | None = None
                  ) -> dict[str, Any]:
    """Accuracy (and its 95% CI) and expected calibration error, before and after the temperature, on
    the examples of :func:`scored_split` whose class the model knows (at most ``limit`` of them, drawn at
    random with a fixed seed; ``test_of`` says of how many)."""
    name_to_id = {c: i for i, c in enumerate(model.classes)}
    test = scored_split(task, support)
    keep = np.flatnonzero([task.classes[c] in name_to_id for c in test.labels.tolist()])
    if not len(keep):
        return {"test_accuracy": None, "test_ci95": None, "test_examples": 0, "test_split": test.name}
    total = len(keep)
    if limit is not None and total > limit:
        keep = np.sort(np.random.default_rng(0).choice(keep, limit, replace=False))
    yq = np.asarray([name_to_id[task.classes[c]] for c in test.labels[keep].tolist()])
    log.info("scoring the %s split: %d examples%s", test.name, len(yq), f" of {total}" if total > len(yq) else "")
    logits, _ = model.outputs(test.inputs[keep], cached=True)
    acc = float((logits.argmax(1) == yq).mean())
    return {"test_accuracy": acc, "test_ci95": float(1.96 * np.sqrt(acc * (1 - acc) / len(yq))),
            "test_examples": len(yq), "test_of": total, "test_split": test.name,
            "test_ece": expected_calibration_error(softmax(logits, model.temperature), yq),
            "test_ece_uncalibrated": expected_calibration_error(softmax(logits), yq)}


def adapt(checkpoint: Path | str | Algorithm, task: str | Task | tuple[Any, Any] | None = None, *,
          shots: int = 5, examples: Path | str | None = None, steps: int | None = None, lr: float | None = None,
          head_init: str | None = None, encoder_layers: int | str = 0, encoder_epochs: int | None = None,
          encoder_lr: float | None = None, seed: int = 0, device: str | torch.device = "auto",
          out: Path | str | None = None, registry: Registry | None = None, reject_by: str = "distance",
          reject_rate: float = REJECT_RATE, reject_below: float | None = None, none: str = "none",
          unknown: str | Task | None = None, select: bool = False,
          unlabeled: Path | str | Sequence[str] | None = None, meta_only: bool = False,
          split: str | None = None, views: int | None = None, shared_norms: bool = True,
          test_examples: int | None = TEST_EXAMPLES) -> AdaptedModel:
    """Adapt a learned initialization to a task and return the adapted model (saved to ``out`` if given).

    ``task``: a registry task name (or a loaded :class:`Task`), whose train split gives ``shots``
    examples per class (or ``examples``: a CSV/JSONL of text (or image path),label or a folder label/image)
    and whose test split scores the result (``meta["test_accuracy"]``, ``meta["test_ece"]``); or ``(inputs, labels)``
    of your own. ``split``: draw the shots from this split instead, and score on its other examples (the
    held-out classes of a task split ``by: classes``, which meta-training never saw). ``predict`` answers
    ``none`` for inputs whose ``reject_by`` score (``distance``: relative Mahalanobis distance to the
    classes; ``similarity``: cosine to the nearest class prototype; ``probability``: the calibrated top
    probability; :mod:`mtl.run.outliers`) is below the threshold chosen on the support set to refuse
    ``reject_rate`` of known inputs, or below ``reject_below``.
    ``unknown``: a task whose test examples fit none of the classes (``clinc150-oos``); the open-set
    report on them and the known test examples goes to ``meta["open_set"]``. ``select`` (text): the
    meta-learned initialization, a linear probe or plain fine-tuning of the pretrained encoder
    (``encoder_epochs``, ``encoder_lr``: default :func:`encoder_lr_for`), by cross-validation on the support set
    (:func:`mtl.run.alternatives.select`); what was chosen goes to ``meta["choice"]``. Without it, a text task
    with two or more shots per class and no inner-loop setting given gets the meta-learned adaptation, a
    linear probe or the probe with token matching, by the same folds (at one shot, with class names that
    read as words, the probe on the examples and the names: :mod:`mtl.run.text_default`), unless
    ``meta_only``. ``unlabeled``: inputs
    without labels (texts or a ``.txt`` file of them, one per line; images, a folder of them or a ``.txt``
    file of their paths) that the adapted model labels for a self-trained linear classifier: for text a
    probe answering beside it, for images its new head (:mod:`mtl.run.self_training`; ``meta["self_training"]``).
    ``views``: for images, how many turned copies of the support set are adapted to and answer together
    (1, 4 or 8; by default 8: :func:`fit`; with ``unlabeled``, each view's head is refitted); texts have one.
    ``shared_norms``: the views normalised with the batch-norm statistics of the support set in all of them
    (:mod:`mtl.run.view_norms`), else each with its own. ``test_examples``: score on a seeded random sample of
    at most this many test examples (None: all), so a large test split does not hold up the adapted model.
    """
    t0 = time.perf_counter()
    if test_examples is not None and test_examples < 1:
        raise MtlError(f"--test-examples {test_examples} is not a number of examples", "use 1 or more, or all")
    if shots < 1:
        raise MtlError(f"--shots {shots} is not a number of examples", "use --shots 1 or more")
    check_setting(steps, lr, head_init)
    if out is not None and Path(out).is_file():  # said now, not after the adaptation
        raise MtlError(f"--out {out} is a file", "give a folder for the adapted model (made if missing)")
    if unlabeled is not None:
        from mtl.run.self_training import check_path

        check_path(unlabeled)
    if encoder_lr is not None and not encoder_lr > 0:
        raise MtlError(f"--encoder-lr {encoder_lr} is not a learning rate", "use one above 0, e.g. --encoder-lr 1e-4")
    if reject_by not in outliers.SCORES:
        raise MtlError(f"--reject-by {reject_by} is unknown", f"use one of {', '.join(outliers.SCORES)}")
    if not 0 <= reject_rate < 1:
        raise MtlError(f"--reject-rate {reject_rate} is not a fraction", "use e.g. 0.03 (0: refuse nothing)")
    encoder_layers = layer_count(encoder_layers)
    if encoder_layers < 0 or (encoder_epochs is not None and encoder_epochs < 1):
        raise MtlError("--encoder-layers must be 0 or more (or all) and --encoder-epochs 1 or more",
                       "e.g. --encoder-layers 2")
    stored, trained_on = None, []
    if isinstance(checkpoint, Algorithm):
        learner, source = checkpoint, None
    else:
        learner, meta = load_learner(Path(checkpoint), resolve_device(device), hold_text=encoder_layers == 0)
        source, stored, trained_on = meta.get("path"), meta.get("adaptation"), meta["recipe"].get("tasks", [])
        if not isinstance(task, tuple | Task):
            registry = with_dirs(registry, meta["recipe"].get("tasks_dirs", []))
    loaded: Task | None = None
    if isinstance(task, tuple):
        inputs, labels = task
        support = support_from_arrays(inputs, labels, *values_modality(inputs, learner.model, trained_on, registry))
    elif task is None and examples is not None:  # a user's own examples alone: no registry task, no test split
        if split is not None:
            raise MtlError("--split draws the shots from a registry task", "give --task NAME, or leave --split out")
        support = support_from_examples(examples, learner.model, trained_on, registry)
    else:
        if task is None:
            raise MtlError("no task to adapt to", "give a registry task name, examples, or (inputs, labels)")
        loaded = task_read_as(task, learner.model.config.image_overrides, registry)
        if examples is not None:
            if split is not None:
                raise MtlError("--split draws the shots from the task, --examples gives them", "leave one of them out")
            xs, ys, classes = read_examples(examples, loaded.modality, loaded.spec.image_options,
                                            (loaded.spec.input_fields, loaded.spec.label_field))
            foreign = [c for c in classes if c not in loaded.classes]
            if foreign:
                raise MtlError(f"label '{foreign[0]}' in {examples} is not a class of task '{loaded.name}'",
                               f"use the task's labels ({', '.join(loaded.classes[:8])}...), or register your own task")
            support = Support(xs, ys, classes, loaded.modality, loaded.name, loaded.spec.image_options)
        else:
            support = support_from_task(loaded, shots, seed, split)
    if select and support.modality != "text":
        raise MtlError("--select chooses among a linear probe and fine-tuning of a sentence encoder; this task has "
                       "images", "leave --select out for image tasks")
    views = views_for(views, support.modality)
    model = fit(learner, support, steps, lr, head_init, encoder_layers, encoder_epochs, encoder_lr, seed, source,
                stored, reject_by, reject_rate, none, views, shared_norms)
    if select and support.shots >= 2:
        from mtl.run.alternatives import select as choose_method

        model = choose_method(model, learner, support, encoder_epochs, encoder_lr, seed, reject_by, reject_rate, none)
    elif not meta_only and text_default.applies(support, steps, lr, head_init, encoder_layers):  # --select's too
        model = text_default.choose_text(model, learner, support, reject_by, reject_rate, none)
    if unlabeled is not None:
        from mtl.run.self_training import self_train

        model = self_train(model, support, unlabeled, seed, reject_rate)
    model.meta.update(score_on_task(model, loaded, support, test_examples) if loaded is not None else
                      {"test_accuracy": None, "test_ci95": None, "test_examples": 0})
    if loaded is not None:  # where `predict` finds the inputs in a table laid out as the task's data
        model.meta["input_fields"] = loaded.spec.input_fields
    if reject_below is not None:
        model.reject_below(reject_below)
    if unknown is not None:
        from mtl.run.openset import open_set_on_tasks

        if loaded is None:
            raise MtlError("--unknown needs a registry task to adapt to", "give --task NAME")
        other = task_read_as(unknown, learner.model.config.image_overrides, registry)
        model.meta["open_set"] = open_set_on_tasks(model, loaded, other)
    if out is not None:
        model.save(out)
    model.meta["seconds"] = round(time.perf_counter() - t0, 3)
    return model
