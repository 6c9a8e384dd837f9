"""``adapt``'s default for a text task with two or more examples per class: the meta-learned adaptation,
a linear probe on the frozen sentence encoder, or that probe and token matching answering together,
whichever the support set's folds favour; the probe unless beaten beyond the folds' noise. With one
example per class and class names that read as words, the probe on the examples and the names.

Why a probe is the default. Meta-training a trunk over frozen sentence embeddings narrows what it keeps
of the encoder to what the training tasks needed: on the training tasks' own intents it is ahead
(CLINC150's banking domain, 5-shot: 94.96% against the probe's 89.85%), but on every text task outside
them that was measured it is behind, by 0.8 to 9 points on the development tasks (SNIPS, TREC, SST-2,
SST-5) and 2 to 9 on the held-out ones (docs/BENCHMARKS.md, "The default for text"). Choosing by the
folds keeps the first and mends the second; it costs one pass of the frozen encoder over the support
set (seconds), where ``--select`` also fine-tunes the encoder (minutes).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import torch

from mtl.algorithms import Algorithm
from mtl.models.heads import probe_logits
from mtl.run import outliers
from mtl.run.adapted import AdaptedModel, mixed_logits, plain_model
from mtl.run.alternatives import (
    Candidate,
    cross_validate_tokens,
    fold_indices,
    meta_learned_candidate,
    model_features,
    pick,
    probe_candidate,
    replaced_meta,
    with_linear_head,
    with_name_rows,
)
from mtl.run.calibration import calibrate_from, fit_temperature, one_shot_rejection
from mtl.run.label_text import descriptive, with_names
from mtl.run.token_match import TokenMatcher, take, token_vectors, vocabulary

if TYPE_CHECKING:
    from mtl.run.support import Support

log = logging.getLogger(__name__)
PROBE_TOKENS = "probe+tokens"  # the probe and token matching on the frozen encoder, equal shares
DEFAULT = "linear_probe"


def applies(support: Support, steps: int | None, lr: float | None, head_init: str | None, encoder_layers: int
            ) -> bool:
    """Whether the default weighs the probe: a text task with folds to score on (or, at 1 shot, class names
    that read as words), and no inner-loop setting or encoder fine-tuning asked for (those ask for the
    meta-learned path itself)."""
    return (support.modality == "text" and (support.shots >= 2 or descriptive(support.classes))
            and not encoder_layers and steps is None and lr is None and head_init is None)


def choose_text(adapted: AdaptedModel, learner: Algorithm, support: Support, reject_by: str, reject_rate: float,
                none: str) -> AdaptedModel:
    """``adapted`` (the meta-learned adaptation, as :func:`mtl.run.adapt.fit` made it), a linear probe, or
    the probe with token matching, by :func:`mtl.run.alternatives.pick` on the support set's folds with the
    probe as the default; the choice and every candidate's accuracy go to ``meta["choice"]``."""
    if support.shots < 2:
        return one_shot_probe(adapted, support, reject_by, none)
    encoder = adapted.model.config.text_encoder
    ys, k = np.asarray(support.labels), len(support.classes)
    folds = fold_indices(ys)
    meta_learned = meta_learned_candidate(adapted, learner, support, len(folds))
    plain, linear, names, x, x_names = probe_candidate(encoder, adapted.device, support, folds)
    log.info("token matching: the frozen encoder's token states")
    named_texts, named_ys = with_names(support.inputs.tolist(), ys, support.classes)
    vectors, vocab = token_vectors(encoder, named_texts, cached=True), vocabulary(encoder)  # cached: seconds saved
    tokens = cross_validate_tokens(vectors, ys, k, folds, vocab, names is not None)
    both = mixed_logits([(linear.logits, 0.5), (tokens.logits, 0.5)])
    cands = [meta_learned, linear, Candidate(PROBE_TOKENS, float((both.argmax(1) == linear.held).mean()), both,
                                             linear.held)]
    best = pick(cands, default=DEFAULT)
    by = f"{len(folds)}-fold cross-validation on the support set, the probe unless beaten beyond its noise"
    choice = {"method": best.name, "by": by, "accuracy": {c.name: round(c.accuracy, 4) for c in cands},
              "label_names": names is not None and best.name != "meta-learned"}
    if best.name == "meta-learned":
        adapted.meta["choice"] = choice
        return adapted
    with_linear_head(plain, *with_name_rows(x, ys, x_names if names else None), k)
    feats = torch.as_tensor(x, device=adapted.device)  # the frozen encoder's: what the probe's body gives
    calibration, rejection, state = calibrate_from(best.logits, best.held, by, feats, torch.as_tensor(ys), k,
                                                    reject_by, reject_rate, none, "model")
    meta = replaced_meta(adapted, plain, best.name, by, calibration, rejection, choice)
    matcher = None
    if best.name == PROBE_TOKENS:
        rows = np.arange(len(ys) + (k if names else 0))  # the support set, and the names where they joined it
        matcher = TokenMatcher.from_vectors(*take(vectors, rows), named_ys[rows], k, vocab)
        meta["tokens"] = {"weight": 0.5, "text_encoder": encoder}
    return AdaptedModel(plain, meta, state, None, matcher)


def one_shot_probe(adapted: AdaptedModel, support: Support, reject_by: str, none: str) -> AdaptedModel:
    """1 shot per class, class names that read as words: the probe on each example and its class's name.

    Nothing can be chosen by folds here (``--select`` at 1 shot comes here too), so this was decided on the
    development tasks (SNIPS, TREC, SST-2, SST-5, two CLINC150 training domains): the probe 65.75% against
    the meta-learned adaptation's 58.49% with the names, 55.47% without them (docs/BENCHMARKS.md). The
    names also give the temperature held-out answers: the names' probe answers for the examples and the
    examples' for the names. No threshold: one example per class bounds no refusal rate (as for the
    meta-learned path at 1 shot)."""
    encoder = adapted.model.config.text_encoder
    ys, k = np.asarray(support.labels), len(support.classes)
    plain = plain_model(encoder, adapted.device)
    x = model_features(plain, with_names(support.inputs.tolist(), ys, support.classes)[0]).cpu().numpy()
    x, x_names = x[:len(ys)], x[len(ys):]
    named = np.arange(k)
    logits = [probe_logits(x_names, named, k, x), probe_logits(x, ys, k, x_names)]
    t = fit_temperature(np.concatenate(logits), np.concatenate([ys, named]))
    with_linear_head(plain, *with_name_rows(x, ys, x_names), k)
    by = "1 shot per class: each example and its class name, the names answering for the examples and back"
    rejection = one_shot_rejection(reject_by, none)
    state = outliers.fit(reject_by, torch.as_tensor(x, device=adapted.device), torch.as_tensor(ys), k)
    meta = replaced_meta(adapted, plain, DEFAULT, by, {"temperature": round(t, 4), "by": by}, rejection,
                         {"method": DEFAULT, "by": by, "label_names": True})
    return AdaptedModel(plain, meta, state)
