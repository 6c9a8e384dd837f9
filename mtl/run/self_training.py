"""Self-training on unlabeled texts: ``adapt --unlabeled FILE``.

A user with a handful of labelled examples often has thousands of unlabeled ones (the inputs a
deployed model will see). The adapted model labels them; of each class it answered, the most
confident share (:data:`FRACTION` of an even split of the pool) joins the support set as examples of
that class, and a linear probe on the frozen sentence encoder is fitted to the whole lot (it is
cheap to fit on thousands of examples, unlike fine-tuning). That probe then answers beside the model
at :data:`SHARE` of the mix, as the probe of ``adapt --select`` does (it replaces that probe where
there is one). Chosen on six development tasks (four CLINC150 training domains, SNIPS, TREC, 5-shot,
their train splits as the unlabeled texts; docs/BENCHMARKS.md): the model's own answers as the teacher
and one round, the most confident three quarters, and a share of 0.4 (7 of 17 against the probe's usual
3 of 13): 91.22% against 90.44% for ``--select`` alone, ahead on each of the six tasks (by 0.5 to 1.3
points, means of 3 support draws).

The temperature and the rejection threshold stay as the support set's cross-validation set them:
pseudo-labels are not ground truth to calibrate on.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mtl.errors import MtlError
from mtl.run.adapted import HEAD, AdaptedModel, plain_model
from mtl.run.alternatives import model_features, with_linear_head
from mtl.run.calibration import softmax
from mtl.run.label_text import descriptive, with_names
from mtl.run.support import Support

log = logging.getLogger(__name__)  # progress of a long adaptation (the CLI shows it on a spinner)

FRACTION = 0.75  # of an even split of the pool per class: how many of a class's most confident answers join it
SHARE = 0.4  # the self-trained probe's share of the mixed log-probabilities
MAX_UNLABELED = 20_000  # texts drawn from a larger pool (seeded): scoring them is the cost


def read_unlabeled(source: Path | str | Sequence[str]) -> list[str]:
    """Unlabeled texts: a sequence of strings, or a ``.txt`` file of one text per line."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise MtlError(f"--unlabeled {path}: no such file", "give a .txt file with one unlabeled text per line")
        try:
            return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError:
            raise MtlError(f"--unlabeled {path} is not UTF-8 text", "give a .txt file with one text per line") from None
    return [str(t).strip() for t in source if str(t).strip()]


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


def self_train(model: AdaptedModel, support: Support, unlabeled: Sequence[str], seed: int = 0) -> AdaptedModel:
    """``model`` with a linear probe fitted to ``support`` and its own confident answers on ``unlabeled``
    answering beside it (see the module's docstring); ``meta["self_training"]`` says what was used."""
    if model.modality != "text":
        raise MtlError("--unlabeled self-trains on unlabeled texts; this task has images", "leave --unlabeled out")
    seen = set(support.inputs.tolist())
    pool = list(dict.fromkeys(t for t in unlabeled if t not in seen))  # unique, and none of the labelled ones
    k = len(model.classes)
    if len(pool) < k:
        raise MtlError(f"--unlabeled gives {len(pool)} texts beyond the support set, fewer than the {k} classes",
                       "give more unlabeled texts (hundreds or more help), or leave --unlabeled out")
    if len(pool) > MAX_UNLABELED:
        keep = np.sort(np.random.default_rng(seed).choice(len(pool), MAX_UNLABELED, replace=False))
        pool = [pool[i] for i in keep]
    log.info("self-training: the adapted model answers %d unlabeled texts", len(pool))
    texts = np.asarray(pool, dtype=np.str_)
    rows, labels = pseudo_labels(model.outputs(texts)[0])
    encoder = model.model.config.text_encoder
    frozen = model.frozen if model.frozen is not None else plain_model(encoder, model.device)
    choice = model.meta.get("choice", {})
    names = support.classes if choice.get("label_names", descriptive(support.classes)) else None
    labelled, ys = with_names(support.inputs.tolist(), np.asarray(support.labels), names)
    log.info("self-training: a linear probe on %d labelled and %d pseudo-labelled texts", len(labelled), len(rows))
    x = model_features(frozen, [*labelled, *texts[rows].tolist()]).cpu().numpy()
    with_linear_head(frozen, x, np.concatenate([ys, labels]), k)
    meta = model.meta
    meta["self_training"] = {"unlabeled": len(pool), "pseudo_labelled": len(rows), "fraction": FRACTION,
                             "share": SHARE, "per_class": int(np.bincount(labels, minlength=k).max())}
    if meta.get("algorithm") == "linear_probe" and model.frozen is None:  # the model is the probe: refitted
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
