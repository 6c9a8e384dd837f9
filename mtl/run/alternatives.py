"""``adapt --select``: the meta-learned initialization against what a text user would otherwise pick,
chosen by cross-validation on the support set itself.

The alternatives are built from the pretrained sentence encoder alone, with no meta-learning: a
linear probe (logistic regression on its frozen embeddings), plain fine-tuning (every layer, with a
prototype-initialised head), and the two answering together with token matching on the frozen and on
the fine-tuned encoder (``probe+finetune+tokens``: their log-probabilities mixed,
:func:`mtl.run.adapted.mixed_logits`, at shares :mod:`mtl.run.mixing` chooses; :mod:`mtl.run.token_match`).
Each is scored by the same stratified folds as the meta-learned path
(:func:`mtl.run.select.support_folds`). The voices together, the strongest way on text tasks never
met in meta-training (docs/BENCHMARKS.md), are kept unless another way answers more held-out support
examples right by more than the noise of that count (:func:`pick`): three folds of a 5-shot support
set are too few to tell a 2-point difference from chance, and following them cost up to 16 points on
TREC. A task unlike anything met in
meta-training is thus never left worse off than the plain encoder by more than the cross-validation
noise.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mtl.algorithms import Algorithm
from mtl.errors import MtlError
from mtl.models import MultiTaskModel
from mtl.models.heads import linear_fit, probe_logits
from mtl.run.adapted import HEAD, AdaptedModel, mixed_logits, plain_model
from mtl.run.calibration import Rejection, calibrate_from
from mtl.run.label_text import descriptive, with_names
from mtl.run.mixing import beats, choose_weights
from mtl.run.text_finetune import ALL_LAYERS, encoder_lr_for, tune_text_encoder
from mtl.run.token_match import TAU as TOKEN_TAU
from mtl.run.token_match import TokenMatcher, own_token_vectors, take, token_vectors, vocabulary

if TYPE_CHECKING:
    from mtl.run.support import Support

log = logging.getLogger(__name__)  # what a long --select is doing (the CLI shows it on a spinner)
ENSEMBLE = "probe+finetune+tokens"  # the voices answering together (mtl.run.mixing): --select's default


# a companion of a fitted model: (model, its training texts, their labels, new texts) -> logits of the new texts
Companion = Callable[[MultiTaskModel, list[str], np.ndarray, list[str]], np.ndarray]


@dataclass
class Candidate:
    """A way of adapting, its cross-validated accuracy and out-of-fold logits (for calibration)."""

    name: str
    accuracy: float
    logits: np.ndarray
    held: np.ndarray


def probe(texts: list[str], ys: np.ndarray, classes: int, encoder: str, device: torch.device,
          names: list[str] | None = None) -> MultiTaskModel:
    """Logistic regression on the frozen encoder's (normalised) embeddings, as the model's linear head;
    ``names`` (the classes' names), when given, are one more example of each class."""
    texts, ys = with_names(texts, ys, names)
    model = plain_model(encoder, device)
    return with_linear_head(model, model_features(model, texts).cpu().numpy(), ys, classes)


def with_linear_head(model: MultiTaskModel, x: np.ndarray, ys: np.ndarray, classes: int) -> MultiTaskModel:
    """``model`` with a linear head fitted to its own features ``x`` of the labelled examples."""
    w, b = linear_fit(x, ys, classes)
    layer = model.add_head(HEAD, classes)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    return model.eval()


def finetune(texts: list[str], ys: np.ndarray, classes: int, encoder: str, device: torch.device, epochs: int | None,
             lr: float, seed: int, precision: str = "auto", names: list[str] | None = None) -> MultiTaskModel:
    """Every layer of the pretrained encoder and a prototype-initialised head, fine-tuned together;
    ``names`` as in :func:`probe`."""
    texts, ys = with_names(texts, ys, names)
    model = plain_model(encoder, device)
    x = model_features(model, texts)
    y = torch.as_tensor(ys, device=device)
    protos = torch.zeros(classes, x.shape[1], device=device).index_add_(0, y, x)
    layer = model.add_head(HEAD, classes)
    with torch.no_grad():  # cosine to the class prototypes (features have norm 10): logits in [-10, 10]
        layer.weight.copy_(torch.nn.functional.normalize(protos, dim=1))
        layer.bias.zero_()
    tune_text_encoder(model, texts, y, ALL_LAYERS, epochs, lr, seed, precision)
    return model.eval()


def finetuned_probs(texts: list[str], ys: np.ndarray, classes: int, queries: list[str], encoder: str,
                    device: torch.device, epochs: int | None = None, seed: int = 0) -> np.ndarray:
    """The queries' probabilities after :func:`finetune` at ``adapt``'s defaults, no class names: ``compare``'s
    ``finetune`` baseline is the very fine-tuning ``adapt --select`` weighs."""
    model = finetune(texts, ys, classes, encoder, device, epochs, encoder_lr_for(encoder), seed)
    with torch.no_grad():
        return torch.softmax(model.heads[HEAD](model_features(model, queries)).float(), 1).cpu().numpy()


def model_features(model: MultiTaskModel, texts: list[str]) -> torch.Tensor:
    from mtl.run.adapted import model_inputs

    with torch.no_grad():
        return model.features(model_inputs(np.asarray(texts, dtype=np.str_), model, "text", model.anchor.device),
                              "text").float()


def cross_validate(name: str, build: Callable[[list[str], np.ndarray], MultiTaskModel], texts: list[str],
                   ys: np.ndarray, folds: list[np.ndarray], also: dict[str, Companion] | None = None
                   ) -> list[Candidate]:
    """Accuracy and out-of-fold logits of ``build`` (texts, labels -> model) over ``folds`` (held-out
    indices), then of each of ``also``: what answers from each fold's model without fitting it again."""
    also = also or {}
    logits: dict[str, list[np.ndarray]] = {n: [] for n in [name, *also]}
    held = []
    for f, idx in enumerate(folds, 1):
        log.info("%s: fold %d of %d", name, f, len(folds))
        keep = np.setdiff1d(np.arange(len(ys)), idx)
        model = build([texts[i] for i in keep], ys[keep])
        with torch.no_grad():
            feats = model_features(model, [texts[i] for i in idx])
            logits[name].append(model.heads[HEAD](feats).float().cpu().numpy())
        for n, companion in also.items():
            logits[n].append(companion(model, [texts[i] for i in keep], ys[keep], [texts[i] for i in idx]))
        held.append(ys[idx])
    y = np.concatenate(held)
    return [Candidate(n, float((z.argmax(1) == y).mean()), z, y) for n, z in
            ((n, np.concatenate(parts)) for n, parts in logits.items())]


def with_name_rows(x: np.ndarray, ys: np.ndarray, names: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Features ``x`` and labels ``ys`` with the class names' features (row c: class c) appended, as
    :func:`mtl.run.label_text.with_names` appends the names themselves; unchanged when ``names`` is None."""
    if names is None:
        return x, ys
    return np.concatenate([x, names]), np.concatenate([ys, np.arange(len(names))])


def cross_validate_probe(x: np.ndarray, ys: np.ndarray, classes: int, folds: list[np.ndarray],
                         extra: np.ndarray | None = None) -> Candidate:
    """:func:`cross_validate` of the linear probe on features computed once (the encoder is frozen, so
    a fold's features are the same as everyone's); ``extra`` (one row per class, e.g. the names'
    features) joins every fold's training rows."""
    logits = []
    for idx in folds:
        keep = np.setdiff1d(np.arange(len(ys)), idx)
        logits.append(probe_logits(*with_name_rows(x[keep], ys[keep], extra), classes, x[idx]))
    z, y = np.concatenate(logits), np.concatenate([ys[idx] for idx in folds])
    return Candidate("linear_probe", float((z.argmax(1) == y).mean()), z, y)


def cross_validate_tokens(vectors: tuple[torch.Tensor, torch.Tensor, torch.Tensor], ys: np.ndarray, classes: int,
                          folds: list[np.ndarray], vocab: int, names: bool) -> Candidate:
    """:func:`cross_validate` of token matching on :func:`token_vectors` computed once: ``vectors`` of
    the support texts, then the class names (row ``len(ys) + c``: class c), which join every fold's
    labelled examples when ``names``."""
    named = np.arange(len(ys), len(ys) + classes) if names else np.zeros(0, int)
    labels = np.concatenate([ys, np.arange(classes)])
    logits = []
    for idx in folds:
        keep = np.concatenate([np.setdiff1d(np.arange(len(ys)), idx), named])
        matcher = TokenMatcher.from_vectors(*take(vectors, keep), labels[keep], classes, vocab)
        logits.append(matcher.scores(*take(vectors, idx)).numpy() / TOKEN_TAU)
    z, y = np.concatenate(logits), np.concatenate([ys[idx] for idx in folds])
    return Candidate("tokens", float((z.argmax(1) == y).mean()), z, y)


def tuned_tokens(classes: int, vocab: int, names: list[str] | None) -> Companion:
    """Token matching on a fine-tuned model's own token states (``names`` join its labelled examples, as
    they joined its fine-tuning): the voice that fine-tuning sharpens most on a larger encoder."""
    def answer(model: MultiTaskModel, texts: list[str], ys: np.ndarray, new: list[str]) -> np.ndarray:
        labelled, labels = with_names(texts, ys, names)
        matcher = TokenMatcher.from_vectors(*own_token_vectors(model, labelled), labels, classes, vocab)
        return matcher.scores(*own_token_vectors(model, new)).numpy() / TOKEN_TAU
    return answer


def names_stay(without: Candidate, named: Candidate) -> bool:
    """Whether the class names stay as examples: unless the probe without them answers more held-out
    examples right by more than the sign test's noise (:func:`mtl.run.mixing.beats`); by the bare
    difference they were dropped where they were worth 6 points (:mod:`mtl.run.label_text`)."""
    return not beats(without.logits, named.logits, named.held)


def pick(cands: list[Candidate], default: str = "finetune", z: float = 1.0) -> Candidate:
    """``default`` unless another candidate beats it on the same held-out examples by more than ``z``
    standard errors of the paired difference (wins - losses > z * sqrt(wins + losses), a sign test);
    among those that do, the most accurate. The candidates' out-of-fold answers must be aligned."""
    base = next(c for c in cands if c.name == default)
    best = base
    for c in cands:
        assert np.array_equal(c.held, base.held), "out-of-fold answers of different examples"
        if beats(c.logits, base.logits, base.held, z) and c.accuracy > best.accuracy:
            best = c
    return best


def fold_indices(ys: np.ndarray, folds: int = 3) -> list[np.ndarray]:
    """The folds of :func:`mtl.run.select.support_folds`: fold f holds out the f-th example of each class."""
    from mtl.run.select import class_ranks

    rank = class_ranks(ys)
    k = min(folds, int(np.bincount(ys).min()))
    return [np.flatnonzero(rank % k == f) for f in range(k)]


def replaced_meta(adapted: AdaptedModel, model: MultiTaskModel, method: str, by: str, calibration: dict[str, Any],
                  rejection: Rejection, choice: dict[str, Any]) -> dict[str, Any]:
    """``adapted``'s meta for ``model``, a way of adapting without the inner loop (``method``) that took its
    place: its config, calibration, rejection and the choice that made it."""
    return {**adapted.meta, "model_config": model.config.model_dump(mode="json"), "steps": 0, "lr": None,
            "selection": {"steps": 0, "lr": None, "by": by}, "head": "linear", "algorithm": method,
            "calibration": calibration, "rejection": rejection.as_dict(), "choice": choice}


def meta_learned_candidate(adapted: AdaptedModel, learner: Algorithm, support: Support, folds: int) -> Candidate:
    """The meta-learned adaptation as :func:`mtl.run.adapt.fit` chose it, scored on the same folds as the
    alternatives (:func:`fold_indices`)."""
    from mtl.run.adapted import model_inputs
    from mtl.run.select import support_folds

    sel, device = adapted.meta["selection"], adapted.device
    xs = model_inputs(support.inputs, learner.model, "text", device)
    batches = support_folds(support.task, "text", xs, torch.as_tensor(support.labels, device=device), folds)
    z = torch.cat([learner.query_logits_after(b, int(sel["steps"]), sel.get("lr"), sel.get("head_init"))
                   for b in batches]).cpu().numpy()
    held = torch.cat([b.yq for b in batches]).cpu().numpy()
    return Candidate("meta-learned", float((z.argmax(1) == held).mean()), z, held)


def probe_candidate(encoder: str, device: torch.device, support: Support, folds: list[np.ndarray]
                    ) -> tuple[MultiTaskModel, Candidate, list[str] | None, np.ndarray, np.ndarray]:
    """The frozen encoder (its features are computed once, for every fold), the linear probe's candidate,
    the class names if they stay as examples (:func:`names_stay`), and the support set's and the names'
    features."""
    log.info("linear probe: the frozen encoder's features")
    texts, ys, k = support.inputs.tolist(), np.asarray(support.labels), len(support.classes)
    plain = plain_model(encoder, device)
    readable_names = descriptive(support.classes)
    x = model_features(plain, with_names(texts, ys, support.classes if readable_names else None)[0]).cpu().numpy()
    x, x_names = x[:len(texts)], x[len(texts):]
    linear = cross_validate_probe(x, ys, k, folds)
    names = None
    if readable_names:  # the class names as examples, unless the (cheap) probe does better without them beyond
        named = cross_validate_probe(x, ys, k, folds, extra=x_names)  # the folds' noise (mtl.run.label_text)
        if names_stay(linear, named):
            linear, names = named, support.classes
    return plain, linear, names, x, x_names


def select(adapted: AdaptedModel, learner: Algorithm, support: Support, epochs: int | None, lr: float | None,
           seed: int, reject_by: str, reject_rate: float, none: str) -> AdaptedModel:
    """The best of ``adapted`` (the meta-learned initialization, as :func:`mtl.run.adapt.fit` made it),
    a linear probe, plain fine-tuning and the last two together with token matching, by cross-validated
    accuracy on the support set (:func:`pick`); what was chosen, every candidate's accuracy and the mix's
    shares go to ``meta["choice"]``. ``lr``: fine-tuning's, by default
    :func:`mtl.run.text_finetune.encoder_lr_for`'s."""
    if support.modality != "text":
        raise MtlError("--select chooses among a linear probe and fine-tuning of a sentence encoder; this task "
                       "has images", "leave --select out for image tasks")
    if support.shots < 2:
        adapted.meta["choice"] = {"method": "meta-learned", "by": "1 shot per class: nothing to cross-validate"}
        return adapted
    device = adapted.device
    encoder = adapted.model.config.text_encoder
    lr = encoder_lr_for(encoder, lr)
    texts, ys, k = support.inputs.tolist(), np.asarray(support.labels), len(support.classes)
    folds = fold_indices(ys)
    meta_learned = meta_learned_candidate(adapted, learner, support, len(folds))
    plain, linear, names, x, x_names = probe_candidate(encoder, device, support, folds)
    vocab = vocabulary(encoder)
    ft, tuned = cross_validate("finetune", lambda t, y: finetune(t, y, k, encoder, device, epochs, lr, seed,
                                                                 names=names),
                               texts, ys, folds, also={"tuned_tokens": tuned_tokens(k, vocab, names)})
    named_texts, named_ys = with_names(texts, ys, support.classes)  # the support set, then each class's name
    log.info("token matching: the frozen encoder's token states")
    vectors = token_vectors(encoder, named_texts)
    tokens = cross_validate_tokens(vectors, ys, k, folds, vocab, names is not None)
    voices = {c.name: c for c in (ft, linear, tokens, tuned)}
    weights, weights_by = choose_weights({v: c.logits for v, c in voices.items()}, ft.held, encoder)
    shares = {v: w / sum(weights.values()) for v, w in weights.items()}
    # scored on the folds its weights came from (slightly flattered, when they moved): it is the default anyway
    mixed = mixed_logits([(voices[v].logits, w) for v, w in shares.items() if w])
    ensemble = Candidate(ENSEMBLE, float((mixed.argmax(1) == ft.held).mean()), mixed, ft.held)
    cands = [meta_learned, linear, ft, ensemble]
    best = pick(cands, default=ENSEMBLE)
    by = f"{len(folds)}-fold cross-validation on the support set, {ENSEMBLE} unless beaten beyond its noise"
    choice = {"method": best.name, "by": by, "accuracy": {c.name: round(c.accuracy, 4) for c in [*cands, tuned]},
              "label_names": names is not None and best.name != "meta-learned",
              "weights": {v: round(w, 4) for v, w in shares.items()}, "weights_by": weights_by}
    if best.name == "meta-learned":
        adapted.meta["choice"] = choice
        return adapted
    if best.name == "linear_probe" or (best.name == ENSEMBLE and shares["linear_probe"]):
        with_linear_head(plain, *with_name_rows(x, ys, x_names if names else None), k)
    log.info("%s chosen: fitting it to the whole support set", best.name)
    model = plain if best.name == "linear_probe" else \
        finetune(texts, ys, k, encoder, device, epochs, lr, seed, names=names)
    # the rejection score reads the frozen encoder (exact leave-one-out scores): a fine-tuned one has seen them all
    calibration, rejection, state = calibrate_from(best.logits, best.held, by, torch.as_tensor(x, device=device),
                                                    torch.as_tensor(ys), k, reject_by, reject_rate, none,
                                                    "model" if best.name == "linear_probe" else "frozen")
    meta = replaced_meta(adapted, model, best.name, by, calibration, rejection, choice)
    needs_frozen = rejection.reads == "frozen" or (best.name == ENSEMBLE and shares["linear_probe"])
    frozen = plain if best.name != "linear_probe" and needs_frozen else None
    if best.name != ENSEMBLE:
        return AdaptedModel(model, meta, state, frozen)
    # the companions with a share answer with the fine-tuned model (mtl.run.adapted.mixed_logits)
    rows = np.arange(len(ys) + (k if names else 0))  # the support set, and the names where they joined it
    tokens = TokenMatcher.from_vectors(*take(vectors, rows), named_ys[rows], k, vocab) if shares["tokens"] else None
    own = TokenMatcher.from_vectors(*own_token_vectors(model, [named_texts[i] for i in rows]), named_ys[rows], k,
                                    vocab) if shares["tuned_tokens"] else None
    for key, voice in (("probe", "linear_probe"), ("tokens", "tokens"), ("tuned_tokens", "tuned_tokens")):
        if shares[voice]:
            meta[key] = {"weight": shares[voice], "text_encoder": encoder}
    return AdaptedModel(model, meta, state, frozen, tokens, own)
