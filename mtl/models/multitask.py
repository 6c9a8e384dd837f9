"""The shared-trunk multi-head model: an encoder per modality, a trunk, one head per task.

Plain ``nn.Module``s: the meta-learning code adapts them through ``torch.func.functional_call``.
Encoders are built by name from a registry (:mod:`mtl.models.encoders`), timm-style, so a recipe
says ``image_encoder: conv4`` and ``python cli.py models`` lists what exists.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn

from mtl.data.embeddings import TokenStates
from mtl.errors import MtlError
from mtl.models.encoders import ENCODERS, build_encoder
from mtl.models.heads import make_head, widened


def mlp(in_dim: int, hidden: Sequence[int]) -> tuple[nn.Module, int]:
    layers: list[nn.Module] = []
    d = in_dim
    for h in hidden:
        layers += [nn.Linear(d, h), nn.ReLU()]
        d = h
    return (nn.Sequential(*layers) if layers else nn.Identity()), d


class ModelConfig(BaseModel):
    """What to build; saved in every checkpoint so a model is rebuilt without code."""

    model_config = ConfigDict(extra="forbid")
    image_encoder: str = "conv4"
    image_channels: int = 1
    # every image task is read at this size x size for this model, in training and whenever the checkpoint
    # meets a task (evaluate, adapt, compare); None: each task file's own `image.size`
    image_size: int | None = Field(default=None, ge=4, le=1024)
    # the same for cropping every image to its content first (`image.fit_content` of a task file)
    image_fit_content: bool | None = None
    text_encoder: str = "minilm"  # a registered name or a transformers model folder (made absolute)
    text_trainable_layers: int = 0
    text_checkpointing: bool = False  # recompute the trained layers' activations in backward: less memory
    projection: int | None = None  # per-modality linear map to a common width before the trunk
    trunk: list[int] = []  # hidden widths of the shared MLP trunk; [] = none
    normalize_text: bool = True
    # features whitened by the within-class covariance estimated after training, shrunk by this much towards
    # the identity (`cli.py whiten`, :mod:`mtl.run.whitening`); None: features as trained
    feature_whitening: float | None = Field(default=None, ge=0, le=1)

    @property
    def image_overrides(self) -> dict[str, object]:
        """The image options this model reads every image task with, in place of the task files' own."""
        return {k: v for k, v in (("size", self.image_size), ("fit_content", self.image_fit_content))
                if v is not None}

    @field_validator("text_encoder")
    @classmethod
    def _absolute_folder(cls, name: str) -> str:
        """A checkpoint must find the folder again from wherever it is adapted."""
        return name if name in ENCODERS or not Path(name).is_dir() else str(Path(name).resolve())


class MultiTaskModel(nn.Module):
    """``features(x, modality)`` -> shared representation; ``forward(x, modality, task)`` -> logits.

    Heads are plain linear layers keyed by task; meta-learning may also pass an episode head
    (weight, bias) of its own and use only ``features``.
    """

    def __init__(self, config: ModelConfig, modalities: Sequence[str]) -> None:
        super().__init__()
        self.config = config
        self.encoders = nn.ModuleDict()
        self.projections = nn.ModuleDict()
        dims = {}
        for m in sorted(set(modalities)):
            name = config.image_encoder if m == "image" else config.text_encoder
            self.encoders[m] = build_encoder(name, config, m)
            dims[m] = self.encoders[m].out_dim
        if config.projection:
            for m, d in dims.items():
                self.projections[m] = nn.Linear(d, config.projection)
            dims = dict.fromkeys(dims, config.projection)
        if len(set(dims.values())) > 1:
            raise MtlError(f"encoders give features of different widths {dims}",
                           "set `model.projection` to map every modality to one width")
        self.trunk, self.feature_dim = mlp(next(iter(dims.values())), config.trunk)
        self.heads = nn.ModuleDict()
        # an empty buffer that moves with .to(): a model of a frozen encoder alone (adapt --select's probe) has no
        # parameters, and a head added to it must still land on its device
        self.register_buffer("anchor", torch.empty(0), persistent=False)
        if config.feature_whitening is not None:
            self.register_buffer("whitening", torch.eye(self.feature_dim))

    def features(self, x: Tensor | Sequence[str] | TokenStates, modality: str) -> Tensor:
        return self.from_encoding(self.encoders[modality](x), modality)

    def from_encoding(self, h: Tensor, modality: str) -> Tensor:
        """The shared representation of an encoder's output."""
        if modality == "text" and self.config.normalize_text:
            h = F.normalize(h, dim=-1) * 10.0  # unit-norm sentence embeddings, scaled for a linear head
        if modality in self.projections:
            h = F.relu(self.projections[modality](h))
        h = self.trunk(h)
        if hasattr(self, "whitening"):
            with torch.autocast(h.device.type, enabled=False):  # as the heads: look-alikes differ in small digits
                h = widened(h) @ self.whitening
        return h

    def forward(self, x: Tensor | Sequence[str] | TokenStates, modality: str, task: str | None = None,
                encoded: bool = False) -> Tensor:
        """``encoded``: ``x`` is already the encoder's output (an inner loop that leaves the encoder
        alone encodes an episode once)."""
        h = self.from_encoding(x, modality) if encoded else self.features(x, modality)  # type: ignore[arg-type]
        return h if task is None else self.heads[head_key(task)](h)

    def add_head(self, task: str, classes: int, kind: str = "linear") -> nn.Linear:
        """A zero head for ``task``: ``linear``, or ``cosine`` (:class:`~mtl.models.heads.CosineLinear`)."""
        head = make_head(kind, self.feature_dim, classes)
        self.heads[head_key(task)] = head.to(self.anchor.device)
        return head


def head_key(task: str) -> str:
    """Module names cannot hold '.', task names can."""
    return task.replace(".", "__")
