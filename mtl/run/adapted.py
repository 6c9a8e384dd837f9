"""A model adapted to one task, with a scikit-learn-style interface: ``predict`` (label names, or
"none of these"), ``predict_proba`` (calibrated), ``score``, ``save`` and ``load``. Saved as
``model.safetensors`` + ``model.json``; the support set's statistics that out-of-scope scores compare
with (:mod:`mtl.run.outliers`) travel in the same file."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtl.data.images import given_images
from mtl.data.schema import ImageOptions
from mtl.device import autocast, native_bf16
from mtl.errors import MtlError
from mtl.models import ModelConfig, MultiTaskModel
from mtl.run import outliers
from mtl.run.calibration import Rejection
from mtl.run.checkpoint import load_checkpoint, load_into, save_checkpoint
from mtl.run.given_inputs import read_inputs
from mtl.run.token_match import TAU as TOKEN_TAU
from mtl.run.token_match import TokenMatcher, own_token_vectors

HEAD = "adapted"
log = logging.getLogger(__name__)
OUTLIER_PREFIX = "rejection."  # saved tensors of the out-of-scope score: rejection.means, ...
PROBE_PREFIX = "probe."  # saved linear head of a companion probe on the frozen encoder (meta["probe"])
TOKENS_PREFIX = "tokens."  # saved support token states of a companion token matcher (meta["tokens"])
# the same on the fine-tuned model's own token states (meta["tuned_tokens"])
TUNED_TOKENS_PREFIX = "tuned_tokens."
VIEW_PREFIX = "view{}."  # saved weights of the model adapted to view v >= 1 of the support set (meta["views"])


def mixed_logits(parts: Sequence[tuple[np.ndarray, float]]) -> np.ndarray:
    """The weighted sum of each part's log-probabilities: one answer from models that err on different
    examples (BANKING77 10-shot: a linear probe on the frozen encoder 85.5%, the fine-tuned model
    86.6%, both 87.4%, with token matching too 87.8%; docs/BENCHMARKS.md)."""
    from scipy.special import log_softmax

    return sum(w * log_softmax(z, axis=1) for z, w in parts)  # type: ignore[return-value]


def plain_model(encoder: str, device: torch.device | str) -> MultiTaskModel:
    """The pretrained text encoder and nothing else (no trunk, frozen): what the alternatives to the
    meta-learned path start from, and what a fine-tuned model's out-of-scope score reads."""
    return MultiTaskModel(ModelConfig(text_encoder=encoder), ["text"]).to(device).eval()


def model_inputs(x: np.ndarray, model: MultiTaskModel, modality: str, device: torch.device, cache: bool = True
                 ) -> torch.Tensor | list[str]:
    """What the model's encoder takes: image tensors, sentence embeddings (kept in the disk cache
    unless ``cache=False``), or strings."""
    if modality == "image":
        return torch.from_numpy(np.ascontiguousarray(x)).to(device)
    encoder = model.encoders["text"]
    if encoder.reads_embeddings:
        return encoder.embed(x.tolist(), cache).to(device)  # type: ignore[operator]
    return x.tolist()


def length_batches(texts: np.ndarray | list[Any], batch_size: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Index batches of texts of like lengths (little padding for a transformer to run over: 4x faster on
    BANKING77) and the permutation that puts the batches' rows back in input order."""
    order = np.argsort([len(str(t)) for t in texts], kind="stable")
    back = np.empty_like(order)
    back[order] = np.arange(len(order))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)], back


def transformer_precision(model: MultiTaskModel, device: torch.device) -> AbstractContextManager[object]:
    """bf16 autocast where a text model runs its transformer per input and bf16 is native (2x faster
    scoring; fine-tuning ran under it too), else nothing."""
    runs = "text" in model.encoders and not model.encoders["text"].reads_embeddings
    return autocast(device, "bf16" if runs and native_bf16(device) else "fp32")


def text_features(model: MultiTaskModel, texts: np.ndarray, device: torch.device, batch_size: int = 64
                  ) -> torch.Tensor:
    """Features of raw texts through a transformer that runs per batch, in batches of like lengths."""
    batches, back = length_batches(texts, batch_size)
    with transformer_precision(model, device):
        feats = torch.cat([model.features(model_inputs(texts[idx], model, "text", device), "text").float()
                           for idx in batches])
    return feats[torch.as_tensor(back, device=feats.device)]


class AdaptedModel:
    """A model adapted to one task: predicts its label names. ``meta`` says how it was made (task,
    classes, shots, steps, the checkpoint it came from, its measured accuracy, its temperature and how
    it refuses inputs that fit no class)."""

    def __init__(self, model: MultiTaskModel, meta: dict[str, Any],
                 outlier_state: dict[str, torch.Tensor] | None = None, frozen: MultiTaskModel | None = None,
                 tokens: TokenMatcher | None = None, tuned_tokens: TokenMatcher | None = None,
                 views: Sequence[MultiTaskModel] = ()) -> None:
        self.model = model.eval()
        # images: the models adapted to the support set turned by view 1, 2, ... (mtl.data.views.turned); each
        # answers its view of an input, and their mean log-probability with the model's is the answer
        self.views = [m.eval() for m in views]
        self.meta = meta
        self.device = next(model.parameters()).device
        self.outlier_state = outlier_state or {}  # the support set's statistics (outliers.fit)
        # the pretrained encoder (plain_model): the probe's body (its head when meta["probe"]), and what the
        # rejection score reads when rejection.reads == "frozen"
        self.frozen = frozen.eval() if frozen is not None else None
        # companions that answer with the model: on the frozen encoder, meta["probe"] and meta["tokens"]; on
        # the model's own encoder, meta["tuned_tokens"]
        self.tokens = tokens
        self.tuned_tokens = tuned_tokens

    @property
    def temperature(self) -> float:
        return float(self.meta.get("calibration", {}).get("temperature", 1.0))

    @property
    def rejection(self) -> Rejection:
        r = self.meta.get("rejection") or {}
        return Rejection(**{k: r[k] for k in ("score", "threshold", "none", "by", "reads") if k in r})

    def reject_below(self, threshold: float | None, score: str | None = None) -> None:
        """Refuse inputs whose score is below ``threshold`` (None: refuse nothing)."""
        r = self.rejection
        self.meta["rejection"] = {**r.as_dict(), "score": score or r.score,
                                  "threshold": None if threshold is None else float(threshold),
                                  "by": "given"}

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def modality(self) -> str:
        return str(self.meta["modality"])

    def _own_state(self, model: MultiTaskModel) -> dict[str, torch.Tensor]:
        """What of ``model`` an adapted model keeps: this modality's encoder and projection, the trunk, the head."""
        return {k: v for k, v in model.state_dict().items()
                if (k.startswith(("encoders.", "projections.")) and k.split(".")[1] == self.modality)
                or k.startswith(("trunk.", f"heads.{HEAD}."))}

    def save(self, out: Path | str) -> Path:
        out = Path(out)
        state = self._own_state(self.model)
        for v, view in enumerate(self.views, 1):
            state.update({VIEW_PREFIX.format(v) + k: t for k, t in self._own_state(view).items()})
        state.update({OUTLIER_PREFIX + k: v for k, v in self.outlier_state.items()})
        if self.frozen is not None and "probe" in self.meta:
            state.update({PROBE_PREFIX + k: v for k, v in self.frozen.heads[HEAD].state_dict().items()})
        for prefix, matcher in ((TOKENS_PREFIX, self.tokens), (TUNED_TOKENS_PREFIX, self.tuned_tokens)):
            if matcher is not None:
                state.update({prefix + k: v for k, v in matcher.state_dict().items()})
        save_checkpoint(out / "model.safetensors", state, {**self.meta, "kind": "adapted"})
        return out

    @classmethod
    def load(cls, folder: Path | str, device: torch.device | str | None = None) -> AdaptedModel:
        folder = Path(folder)
        path = folder / "model.safetensors" if folder.is_dir() else folder
        tensors, meta = load_checkpoint(path, device or "cpu")
        if meta.get("kind") != "adapted":
            raise MtlError(f"{path} is a training checkpoint, not an adapted model",
                           "run `cli.py adapt` first and pass its --out folder to --model")
        def network() -> MultiTaskModel:
            net = MultiTaskModel(ModelConfig.model_validate(meta["model_config"]), [meta["modality"]])
            net.add_head(HEAD, len(meta["classes"]), meta.get("head", "linear"))
            return net

        model, views = network(), [network() for _ in range(int(meta.get("views", 1)) - 1)]
        for v, view in enumerate(views, 1):
            prefix = VIEW_PREFIX.format(v)
            load_into(view, {k[len(prefix):]: tensors.pop(k) for k in list(tensors) if k.startswith(prefix)})
        state = {k[len(OUTLIER_PREFIX):]: tensors.pop(k) for k in list(tensors) if k.startswith(OUTLIER_PREFIX)}
        frozen = None
        if "probe" in meta or (meta.get("rejection") or {}).get("reads") == "frozen":
            name = meta["probe"]["text_encoder"] if "probe" in meta else meta["model_config"]["text_encoder"]
            frozen = plain_model(name, "cpu")
        if "probe" in meta:  # the probe's saved head on the frozen encoder
            frozen.add_head(HEAD, len(meta["classes"])).load_state_dict(  # type: ignore[union-attr]
                {k[len(PROBE_PREFIX):]: tensors.pop(k) for k in list(tensors) if k.startswith(PROBE_PREFIX)})
        tokens, tuned = (TokenMatcher.from_state({k[len(prefix):]: tensors.pop(k).cpu() for k in list(tensors)
                                                  if k.startswith(prefix)}, len(meta["classes"]))
                         if key in meta else None
                         for key, prefix in (("tokens", TOKENS_PREFIX), ("tuned_tokens", TUNED_TOKENS_PREFIX)))
        load_into(model, tensors)
        return cls(model.to(device or "cpu"), meta, state, frozen.to(device or "cpu") if frozen else None, tokens,
                   tuned, [view.to(device or "cpu") for view in views])

    @torch.no_grad()
    def outputs(self, inputs: np.ndarray | list[Any], batch_size: int = 512, cached: bool = False
                ) -> tuple[np.ndarray, np.ndarray]:
        """Logits (before the temperature) and each input's out-of-scope score (:mod:`mtl.run.outliers`;
        NaN for ``probability``, which comes from the logits). ``cached``: for a model with trainable
        text layers, read the frozen layers' outputs from the disk cache (a task's test split: the same
        texts every time)."""
        inputs = self._array(inputs)
        if not len(inputs):
            return np.zeros((0, len(self.classes)), np.float32), np.zeros(0, np.float32)
        cfg = self.model.config
        states = None
        if cached and self.modality == "text" and not self.model.encoders["text"].reads_embeddings:
            from mtl.data.embeddings import token_states

            states = token_states(inputs.tolist(), cfg.text_encoder, cfg.text_trainable_layers).to(self.device)
        if self.modality == "text" and not self.model.encoders["text"].reads_embeddings:
            batches, back = length_batches(inputs, batch_size)
        else:
            back = np.arange(len(inputs))
            batches = [back[i:i + batch_size] for i in range(0, len(inputs), batch_size)]
        logits, sims = [], []
        parts: dict[str, list[np.ndarray]] = {"probe": [], "tokens": [], "tuned_tokens": []}
        for done, idx in enumerate(batches, 1):
            if len(batches) > 1:  # a long `predict` (the CLI shows it on a spinner)
                log.info("labelling inputs %d-%d of %d", (done - 1) * batch_size + 1,
                         min(done * batch_size, len(inputs)), len(inputs))
            if states is not None:
                x: Any = states[torch.as_tensor(idx, device=self.device)]
            else:
                x = model_inputs(inputs[idx], self.model, self.modality, self.device, cached)
            with transformer_precision(self.model, self.device):
                feats = self.model.features(x, self.modality).float()
            logits.append(self._viewed(self.model.heads[HEAD](feats).float(), x).cpu().numpy())
            read = feats  # what the rejection score is measured on
            if self.frozen is not None:
                frozen = self.frozen.features(model_inputs(inputs[idx], self.frozen, "text", self.device, cached),
                                              "text").float()
                if "probe" in self.meta:
                    parts["probe"].append(self.frozen.heads[HEAD](frozen).float().cpu().numpy())
                if self.rejection.reads == "frozen":
                    read = frozen
            if self.tokens is not None:
                parts["tokens"].append(self.tokens.logits(self.meta["tokens"]["text_encoder"], inputs[idx].tolist(),
                                                          cached))
            if self.tuned_tokens is not None:
                own = own_token_vectors(self.model, inputs[idx].tolist())
                parts["tuned_tokens"].append(self.tuned_tokens.scores(*own).numpy() / TOKEN_TAU)
            sims.append(outliers.score(self.rejection.score, self.outlier_state, read).cpu().numpy())
        answers = {key: np.concatenate(p)[back] for key, p in parts.items() if p}
        return self.with_companions(np.concatenate(logits)[back], answers), np.concatenate(sims)[back]

    def _viewed(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The model's logits ``z`` of images ``x``, answering together with its views (:func:`together`)."""
        from mtl.data.views import together, turned

        return together([z, *(m.heads[HEAD](m.features(turned(x, v), self.modality)) for v, m in
                              enumerate(self.views, 1))])

    def with_companions(self, z: np.ndarray, answers: dict[str, np.ndarray]) -> np.ndarray:
        """The model's logits ``z`` mixed with its companions' ``answers`` (by their ``meta`` key: "probe",
        "tokens", "tuned_tokens"), each at its ``meta[key]["weight"]`` (:func:`mixed_logits`)."""
        parts = [(a, float(self.meta[key]["weight"])) for key, a in answers.items()]
        return mixed_logits([(z, 1.0 - sum(w for _, w in parts)), *parts]) if parts else z

    def predict_proba(self, inputs: np.ndarray | list[Any], batch_size: int = 512, cached: bool = False
                      ) -> np.ndarray:
        """Calibrated class probabilities (the logits over the fitted temperature), columns in the
        order of :attr:`classes`."""
        from mtl.run.calibration import softmax

        return softmax(self.outputs(inputs, batch_size, cached)[0], self.temperature)

    def decide(self, inputs: np.ndarray | list[Any], cached: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(calibrated probabilities, rejection scores, refused?) for each input."""
        from mtl.run.calibration import softmax

        logits, sims = self.outputs(inputs, cached=cached)
        probs = softmax(logits, self.temperature)
        r = self.rejection
        scores = probs.max(1) if r.score == "probability" and len(probs) else sims
        return probs, scores, r.refuses(scores)

    def predict_ids(self, inputs: np.ndarray | list[Any], cached: bool = False) -> np.ndarray:
        """Class indices, never refused (accuracy over the known classes)."""
        return self.predict_proba(inputs, cached=cached).argmax(1)

    def predict(self, inputs: np.ndarray | list[Any]) -> np.ndarray:
        """Label names; the ``none`` label where the input fits no class (see :attr:`rejection`)."""
        probs, _, refused = self.decide(inputs)
        names = np.asarray(self.classes, dtype=object)[probs.argmax(1)] if len(probs) else np.zeros(0, object)
        names[refused] = self.rejection.none
        return names

    def score(self, inputs: np.ndarray | list[Any], labels: np.ndarray | list[Any]) -> float:
        """Accuracy on labelled examples (label names; an out-of-scope example is labelled ``none``)."""
        return float(np.mean(self.predict(inputs) == np.asarray(labels, dtype=object)))

    def _array(self, inputs: np.ndarray | list[Any]) -> np.ndarray:
        if isinstance(inputs, str | Path):  # a text is a sequence too: it would be labelled letter by letter
            raise MtlError(f"predict takes a list of inputs, not one {type(inputs).__name__}",
                           "wrap it in a list: predict([x])")
        if self.modality == "text":
            return inputs if isinstance(inputs, np.ndarray) else np.asarray([str(x) for x in inputs], dtype=np.str_)
        return self._images(inputs)

    def _images(self, items: np.ndarray | Sequence[Any]) -> np.ndarray:
        """Images as the model takes them: arrays of the model's own shape as they are (a task's decoded images);
        image files, PIL images and arrays of another shape read as the task's images were (resized, grey or
        colour, inverted where the task file says)."""
        options = ImageOptions.model_validate(self.meta["image"])
        shape = options.hw if options.grayscale else (*options.hw, 3)
        if isinstance(items, np.ndarray) and items.dtype.kind not in "OUS" and items.shape[1:] == shape:
            return items
        items = list(items)
        if all(isinstance(x, np.ndarray) and x.shape == shape for x in items):
            return np.stack(items) if items else np.zeros((0, *shape), np.uint8)
        return given_images(items, options)

    def load_inputs(self, items: list[str]) -> tuple[np.ndarray, list[str], list[str | None]]:
        """What ``predict`` is given, read (:func:`~mtl.run.given_inputs.read_inputs`): the model's inputs, how
        each is shown, and the label a table gave it (else None)."""
        values, expected = read_inputs(items, self.modality, self.meta, self.classes)
        x = np.asarray(values, dtype=np.str_) if self.modality == "text" else self._images(values)
        return x, values, expected

    def predictions(self, items: list[str], top: int = 1) -> list[dict[str, Any]]:
        """``predict``'s rows: for each input its label (or ``none``), calibrated probability, the
        ``top`` best labels, the score rejection compares with its threshold, and the ``expected`` label where
        a table of inputs has a ``label`` column."""
        x, shown, expected = self.load_inputs(items)
        rows = self.rows(x, shown, top)
        for row, label in zip(rows, expected, strict=True):
            if label is not None:
                row["expected"] = label
        return rows

    def rows(self, x: np.ndarray, shown: list[str], top: int = 1) -> list[dict[str, Any]]:
        probs, scores, refused = self.decide(x)
        none = self.rejection.none
        rows = []
        for item, p, s, no in zip(shown, probs, scores, refused, strict=True):
            order = np.argsort(-p)[: max(1, top)]
            rows.append({"input": item, "label": none if no else self.classes[order[0]],
                         "probability": round(float(p[order[0]]), 5), "rejected": bool(no),
                         "score": None if np.isnan(s) else round(float(s), 5),
                         "top": [{"label": self.classes[i], "probability": round(float(p[i]), 5)} for i in order]})
        return rows
