"""Self-training on unlabeled inputs: ``adapt --unlabeled``.

A user with a handful of labelled examples often has thousands of unlabeled ones (the inputs a
deployed model will see). The adapted model labels them; of each class it answered, the most
confident share (:data:`FRACTION` of an even split of the pool) joins the support set as examples of
that class, and a linear classifier, cheap to fit on thousands of examples, is fitted to the lot:

- **Texts:** a linear probe on the frozen sentence encoder, answering beside the model at
  :data:`SHARE` of the mix, as the probe of ``adapt --select`` does (it replaces that probe where there
  is one). Chosen on six development tasks (four CLINC150 training domains, SNIPS, TREC, 5-shot, their
  train splits as the unlabeled texts; docs/BENCHMARKS.md): the model's own answers as the teacher and
  one round, the most confident three quarters, a share of 0.4: 91.22% against 90.44% for ``--select``
  alone, ahead on each of the six tasks. The temperature and the rejection threshold stay as the
  support set's cross-validation set them: pseudo-labels are not ground truth to calibrate on.
- **Images:** a linear head fitted by logistic regression on the adapted model's own features
  (:func:`mtl.models.heads.logistic_head`, as ``adapt`` fits one from the support set alone), in place
  of its head: on scikit-learn's digits it beat every mix with the model's own answers. Its temperature
  comes from out-of-fold answers on the labelled examples, each fold's head fitted without them.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtl.data.views import together, turned
from mtl.errors import MtlError
from mtl.models.heads import logistic_head
from mtl.run.adapted import HEAD, AdaptedModel, model_inputs, plain_model
from mtl.run.alternatives import model_features, with_linear_head
from mtl.run.calibration import CALIBRATION_FOLDS, REJECT_RATE, calibrate_from, softmax
from mtl.run.label_text import descriptive, with_names
from mtl.run.select import class_ranks
from mtl.run.support import Support

log = logging.getLogger(__name__)  # progress of a long adaptation (the CLI shows it on a spinner)

FRACTION = 0.75  # of an even split of the pool per class: how many of a class's most confident answers join it
SHARE = 0.4  # the self-trained text probe's share of the mixed log-probabilities
# Fewer unlabeled inputs than this per class are refused: 2 per class (Olivetti faces, 40 classes) cost
# 1-4 points in 5 of 6 draws; 5 per class still helped on MNIST and scikit-learn's digits (docs/BENCHMARKS.md).
MIN_PER_CLASS = 5
MAX_UNLABELED = 20_000  # inputs drawn from a larger pool (seeded): scoring them is the cost


def check_path(source: Path | str | Sequence[Any]) -> None:
    """A missing ``--unlabeled`` file or folder, said before the adaptation (a minute or more) instead of after."""
    if isinstance(source, (str, Path)) and not Path(source).exists():
        raise MtlError(f"--unlabeled {source}: no such file or folder",
                       "give a .txt file of unlabeled texts (or image paths), or a folder of images")


def read_unlabeled(source: Path | str | Sequence[Any], model: AdaptedModel | None = None) -> np.ndarray:
    """Unlabeled inputs. Texts: a sequence of strings, or a ``.txt`` file of one text per line. Images
    (``model`` an image model): a folder of image files, a ``.txt`` file of image paths, or a sequence
    of images as the model takes them (``predict``'s arrays)."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        check_path(path)
        if model is not None and model.modality == "image":
            return model.load_inputs([str(path)])[0]
        if not path.is_file():
            raise MtlError(f"--unlabeled {path} is a folder", "give a .txt file with one unlabeled text per line")
        try:
            texts = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
        except UnicodeDecodeError:
            raise MtlError(f"--unlabeled {path} is not UTF-8 text", "give a .txt file with one text per line") from None
        return np.asarray(texts, dtype=np.str_)
    if model is not None and model.modality == "image":
        items = [np.asarray(x) for x in source]  # arrays as the model takes them, as predict() takes them
        return np.stack(items) if items else np.zeros((0, 1, 1), np.uint8)
    return np.asarray([str(t).strip() for t in source if str(t).strip()], dtype=np.str_)


def pseudo_labels(logits: np.ndarray, fraction: float = FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """(rows, labels) of the most confident answers of each class, at most ``fraction`` x rows / classes of
    each: a class the model answers often does not crowd out the others."""
    classes = logits.shape[1]
    probs = softmax(logits)
    answer, confidence = probs.argmax(1), probs.max(1)
    cap = max(1, round(fraction * len(logits) / classes))
    rows = [np.flatnonzero(answer == c)[np.argsort(-confidence[answer == c], kind="stable")[:cap]]
            for c in range(classes)]
    picked = np.concatenate(rows) if rows else np.zeros(0, int)
    return picked, answer[picked]


def unlabeled_pool(unlabeled: np.ndarray, support: Support, classes: int, seed: int) -> np.ndarray:
    """The unlabeled inputs once each, none of the labelled ones, at most :data:`MAX_UNLABELED` (seeded)."""
    def key(x: Any) -> Any:
        return x if isinstance(x, str) else hashlib.blake2b(np.ascontiguousarray(x).tobytes(), digest_size=16).digest()

    seen = {key(x) for x in support.inputs}
    first: dict[Any, int] = {}
    for i, x in enumerate(unlabeled):
        first.setdefault(key(x), i)
    keep = np.asarray(sorted(i for k, i in first.items() if k not in seen), int)
    what = "texts" if support.modality == "text" else "images"
    if len(keep) < MIN_PER_CLASS * classes:
        raise MtlError(f"--unlabeled gives {len(keep)} {what} beyond the support set, fewer than {MIN_PER_CLASS} per "
                       f"class ({MIN_PER_CLASS * classes} for {classes} classes)",
                       f"give more unlabeled {what} (hundreds or more help), or leave --unlabeled out")
    if len(keep) > MAX_UNLABELED:
        keep = np.sort(np.random.default_rng(seed).choice(keep, MAX_UNLABELED, replace=False))
    return unlabeled[keep]


def self_train(model: AdaptedModel, support: Support, unlabeled: Path | str | Sequence[Any], seed: int = 0,
               reject_rate: float = REJECT_RATE) -> AdaptedModel:
    """``model`` with a linear classifier fitted to ``support`` and its own confident answers on
    ``unlabeled`` (see the module's docstring); ``meta["self_training"]`` says what was used.
    ``reject_rate``: as given to ``adapt``, for a threshold on the images' new probabilities."""
    k = len(model.classes)
    pool = unlabeled_pool(read_unlabeled(unlabeled, model), support, k, seed)
    log.info("self-training: the adapted model answers %d unlabeled %s", len(pool), support.modality + "s")
    feats: list[np.ndarray] = []
    if support.modality == "text":
        rows, labels = pseudo_labels(model.outputs(pool)[0])  # the mix of voices answers, not one head
    else:  # each view's head on its features: computed once, for the answers and for the new heads
        feats = [image_features(model, pool, v) for v in range(1 + len(model.views))]
        rows, labels = pseudo_labels(viewed_logits(model, feats))
    model.meta["self_training"] = {"unlabeled": len(pool), "pseudo_labelled": len(rows), "fraction": FRACTION,
                                   "per_class": int(np.bincount(labels, minlength=k).max())}
    if support.modality == "text":
        return with_text_probe(model, support, pool[rows], labels)
    return with_image_heads(model, support, [f[rows] for f in feats], labels, reject_rate)


def with_text_probe(model: AdaptedModel, support: Support, texts: np.ndarray, labels: np.ndarray) -> AdaptedModel:
    """A linear probe on the frozen sentence encoder, fitted to the support set (with the class names where
    ``--select`` kept them) and the pseudo-labelled ``texts``, answering beside ``model`` at :data:`SHARE`."""
    k = len(model.classes)
    encoder = model.model.config.text_encoder
    frozen = model.frozen if model.frozen is not None else plain_model(encoder, model.device)
    choice = model.meta.get("choice", {})
    names = support.classes if choice.get("label_names", descriptive(support.classes)) else None
    labelled, ys = with_names(support.inputs.tolist(), np.asarray(support.labels), names)
    log.info("self-training: a linear probe on %d labelled and %d pseudo-labelled texts", len(labelled), len(texts))
    x = model_features(frozen, [*labelled, *texts.tolist()]).cpu().numpy()
    with_linear_head(frozen, x, np.concatenate([ys, labels]), k)
    meta = model.meta
    meta["self_training"].update(share=SHARE, student="a linear probe on the pretrained encoder")
    if meta.get("algorithm") in ("linear_probe", "probe+tokens") and model.frozen is None:  # it is the probe: refit
        model.model.heads[HEAD].load_state_dict(frozen.heads[HEAD].state_dict())
        meta["self_training"]["share"] = 1.0
        return model
    others = {key: float(meta[key]["weight"]) for key in ("tokens", "tuned_tokens") if key in meta}
    scale = (1 - SHARE) / (1 - float(meta.get("probe", {}).get("weight", 0.0)))  # the rest keep their ratios
    for key, weight in others.items():
        meta[key]["weight"] = weight * scale
    meta["probe"] = {"weight": SHARE, "text_encoder": encoder}
    model.frozen = frozen.eval()
    return model


@torch.no_grad()
def image_features(model: AdaptedModel, images: np.ndarray, view: int = 0, batch_size: int = 512) -> np.ndarray:
    """Features of ``images`` turned as ``view`` says, by the network adapted to that view of the support set."""
    net = model.model if view == 0 else model.views[view - 1]
    return np.concatenate([net.features(turned(model_inputs(images[i:i + batch_size], net, "image", model.device),
                                               view), "image").float().cpu().numpy()
                           for i in range(0, len(images), batch_size)])


@torch.no_grad()
def viewed_logits(model: AdaptedModel, feats: list[np.ndarray]) -> np.ndarray:
    """The model's answer from each view's features (``feats[v]``): one view's logits, or the views' mean
    log-probability, as :meth:`AdaptedModel.outputs` answers."""
    nets = [model.model, *model.views]
    return together([net.heads[HEAD](torch.as_tensor(f, device=model.device))
                     for net, f in zip(nets, feats, strict=True)]).cpu().numpy()


def with_image_heads(model: AdaptedModel, support: Support, fp: list[np.ndarray], labels: np.ndarray,
                     reject_rate: float) -> AdaptedModel:
    """``model`` with each view's head replaced by logistic regression on that view's features of the support
    set and of the pseudo-labelled images (``fp[v]``); the temperature (and a ``probability`` threshold)
    refitted on out-of-fold answers for the labelled examples, answered as the model answers."""
    k, views = len(model.classes), 1 + len(model.views)
    fs = [image_features(model, support.inputs, v) for v in range(views)]
    ys = np.asarray(support.labels)
    log.info("self-training: %d linear head(s) on %d labelled and %d pseudo-labelled images", views, len(ys),
             len(labels))

    def fitted(v: int, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return logistic_head(torch.as_tensor(np.concatenate([fs[v][rows], fp[v]])),
                             torch.as_tensor(np.concatenate([ys[rows], labels])), k)

    for v, net in enumerate([model.model, *model.views]):
        w, b = fitted(v, np.arange(len(ys)))
        head = net.add_head(HEAD, k)  # a plain linear head, whatever kind the model had
        with torch.no_grad():
            head.weight.copy_(w)
            head.bias.copy_(b)
    model.meta["head"] = "linear"
    model.meta["self_training"].update(share=1.0, student="a linear head on the model's features, in its place")
    folds = min(support.shots, CALIBRATION_FOLDS)
    if folds < 2:  # one labelled example per class: none to hold out
        model.meta["calibration"] = {"temperature": 1.0, "by": "none (1-shot; the head was refitted)"}
        return model
    rank = class_ranks(ys)  # the folds of adapt's own calibration
    held_logits, held = [], []
    for f in range(folds):  # each fold's heads fitted without its held-out labelled examples
        out = rank % folds == f
        z = []
        for v in range(views):
            w, b = fitted(v, np.flatnonzero(~out))
            z.append(torch.as_tensor(fs[v][out]) @ w.T + b)
        held_logits.append(together(z).numpy())
        held.append(ys[out])
    r = model.rejection
    feats = torch.as_tensor(fs[0])
    calibration, rejection, state = calibrate_from(
        np.concatenate(held_logits), np.concatenate(held), f"{folds}-fold cross-validation on the support set",
        feats, torch.as_tensor(ys), k, r.score, reject_rate, r.none, r.reads)
    model.meta["calibration"], model.meta["rejection"] = calibration, rejection.as_dict()
    model.outlier_state = {name: v.to(model.device) for name, v in state.items()}
    return model
