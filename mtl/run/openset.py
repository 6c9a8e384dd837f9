"""How well an adapted model says "none of these": in-scope accuracy with and without refusals,
out-of-scope recall and precision, and the AUROC of its rejection score, as Larson et al. (2019)
report them for CLINC150; the unknowns are any inputs outside the model's classes (CLINC150's
out-of-scope queries, characters of other alphabets)."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from mtl.data.task import Task
from mtl.run.adapted import AdaptedModel
from mtl.run.calibration import expected_calibration_error


def open_set_report(model: AdaptedModel, known_x: np.ndarray, known_y: np.ndarray, unknown_x: np.ndarray,
                    cached: bool = True) -> dict[str, Any]:
    """``known_y``: class indices into ``model.classes``; every ``unknown_x`` belongs to none of them."""
    probs_k, scores_k, refused_k = model.decide(known_x, cached=cached)
    _, scores_u, refused_u = model.decide(unknown_x, cached=cached)
    correct = probs_k.argmax(1) == known_y
    recall = float(refused_u.mean()) if len(unknown_x) else float("nan")
    flagged = int(refused_u.sum() + refused_k.sum())
    both = np.concatenate([scores_k, scores_u])
    auroc = float(roc_auc_score(np.r_[np.zeros(len(scores_k)), np.ones(len(scores_u))], -both)) \
        if len(scores_k) and len(scores_u) and np.isfinite(both).all() else float("nan")
    r = model.rejection
    return {
        "in_scope_accuracy": round(float(correct.mean()), 5),  # refusing nothing
        "in_scope_accuracy_with_rejection": round(float((correct & ~refused_k).mean()), 5),
        "in_scope_refused": round(float(refused_k.mean()), 5),
        "oos_recall": round(recall, 5),
        "oos_precision": round(float(refused_u.sum() / flagged), 5) if flagged else float("nan"),
        "auroc": round(auroc, 5), "score": r.score, "threshold": r.threshold,
        "ece": round(expected_calibration_error(probs_k, known_y), 5),
        "known_examples": len(known_y), "unknown_examples": len(unknown_x),
    }


def open_set_on_tasks(model: AdaptedModel, known: Task, unknown: Task, split: str | None = None) -> dict[str, Any]:
    """The report on ``known``'s test split (the classes the model knows) against every example of
    ``unknown``'s test split."""
    index = {c: i for i, c in enumerate(model.classes)}
    test = known.split(split or known.spec.test_split)
    keep = np.asarray([known.classes[c] in index for c in test.labels.tolist()], bool)
    y = np.asarray([index[known.classes[c]] for c in test.labels[keep].tolist()], dtype=np.int64)
    other = unknown.split(split or unknown.spec.test_split)
    return {"unknown_task": unknown.name, **open_set_report(model, test.inputs[keep], y, other.inputs)}
