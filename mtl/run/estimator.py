"""A scikit-learn estimator over a learned initialization: ``FewShotClassifier(checkpoint=...)``.

``fit(X, y)`` adapts the initialization to the few labelled examples given (texts, or images: uint8 arrays
of the size the checkpoint was trained on, PIL images or image files); ``predict``, ``predict_proba`` and
``score`` follow scikit-learn's conventions (``classes_`` sorted, probabilities in that column order), so it works
with ``clone``, ``cross_val_score`` and ``GridSearchCV`` (e.g. over ``lr`` or ``steps``). A loaded
checkpoint is shared by every estimator on it: adaptation never changes it.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

from mtl.algorithms import Algorithm
from mtl.device import resolve_device
from mtl.run import text_default
from mtl.run.adapt import fit, views_for
from mtl.run.adapted import AdaptedModel
from mtl.run.calibration import REJECT_RATE
from mtl.run.learner import load_learner
from mtl.run.support import support_from_arrays, values_modality


@lru_cache(maxsize=4)
def _learner(checkpoint: str, device: str, hold_text: bool) -> tuple[Algorithm, list[str]]:
    """The loaded checkpoint and the tasks it was trained on."""
    from pathlib import Path

    learner, meta = load_learner(Path(checkpoint), resolve_device(device), hold_text=hold_text)
    return learner, meta["recipe"].get("tasks", [])


class FewShotClassifier(ClassifierMixin, BaseEstimator):
    """Few-shot classifier adapted from a meta-learned checkpoint.

    Parameters
    ----------
    checkpoint : str
        Run folder (or ``.safetensors`` file) of ``mtl train``.
    steps : int or None
        Inner-loop steps when fitting; ``None``: the recipe's ``eval_steps``.
    lr : float or None
        Inner step size; ``None``: the learned (or recipe) step sizes.
    head_init : {"zero", "proto"} or None
        How the new head starts; ``None``: as in meta-training.
    encoder_layers : int
        Text: also fine-tune this many top layers of the sentence encoder.
    views : int or None
        Images: how many turned copies of the support set to adapt to, answering together (1, 4 or 8);
        ``None``: 8 for images, 1 for texts, as ``adapt``.
    shared_norms : bool
        Images with views: every view normalised with the batch-norm statistics of the support set in all
        views (:mod:`mtl.run.view_norms`), else each with its own.
    meta_only : bool
        Text: keep the meta-learned adaptation. By default, with none of the four settings above, a linear
        probe on the pretrained encoder is weighed against it on the support set's folds, as ``adapt`` does
        (:mod:`mtl.run.text_default`).
    select : bool
        Text: also weigh fine-tuning of the pretrained encoder, as ``adapt --select`` does (a minute or more
        per fit on a CPU, instead of seconds).
    device : str
        ``auto``, ``cpu`` or ``cuda``.
    seed : int
        Seed of the encoder fine-tuning's shuffling.
    """

    def __init__(self, checkpoint: str = "", steps: int | None = None, lr: float | None = None,
                 head_init: str | None = None, encoder_layers: int = 0, device: str = "cpu", seed: int = 0,
                 meta_only: bool = False, views: int | None = None, shared_norms: bool = True,
                 select: bool = False) -> None:
        self.checkpoint = checkpoint
        self.steps = steps
        self.lr = lr
        self.head_init = head_init
        self.encoder_layers = encoder_layers
        self.device = device
        self.seed = seed
        self.meta_only = meta_only
        self.views = views
        self.shared_norms = shared_norms
        self.select = select

    def fit(self, X: Any, y: Any) -> FewShotClassifier:
        learner, trained_on = _learner(str(self.checkpoint), self.device, self.encoder_layers == 0)
        X = [str(x) if isinstance(x, np.str_) else x for x in X]
        modality, image = values_modality(X, learner.model, trained_on, None)
        y = np.asarray(list(y))
        support = support_from_arrays(X, [str(v) for v in y], modality, image)
        self.model_: AdaptedModel = fit(learner, support, self.steps, self.lr, self.head_init, self.encoder_layers,
                                        seed=self.seed, checkpoint=str(self.checkpoint),
                                        views=views_for(self.views, modality), shared_norms=self.shared_norms)
        if self.select and support.shots >= 2:
            from mtl.run.alternatives import select

            self.model_ = select(self.model_, learner, support, None, None, self.seed, "distance", REJECT_RATE, "none")
        elif not self.meta_only and text_default.applies(support, self.steps, self.lr, self.head_init,
                                                         self.encoder_layers):
            self.model_ = text_default.choose_text(self.model_, learner, support, "distance", REJECT_RATE, "none")
        self.classes_ = np.unique(y)  # scikit-learn's order and the labels' own type (ints stay ints)
        column = {c: i for i, c in enumerate(support.classes)}  # the model's classes: their names, sorted as text
        self.columns_ = np.asarray([column[str(c)] for c in self.classes_])
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        return self.model_.predict_proba(list(X) if not isinstance(X, np.ndarray) else X)[:, self.columns_]

    def predict(self, X: Any) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(1)]

