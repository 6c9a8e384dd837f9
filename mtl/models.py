"""The shared-trunk multi-head model: an encoder per modality, a trunk, one head per task.

Plain ``nn.Module``s: the meta-learning code adapts them through ``torch.func.functional_call``.
Encoders and trunks are built by name from small registries (``ENCODERS``), timm-style, so a
recipe says ``image_encoder: conv4`` and ``python cli.py models`` lists what exists.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, field_validator
from torch import Tensor, nn

from mtl.embeddings import (
    EncoderWeights,
    TokenStates,
    TokenStore,
    embed_texts,
    encoder_dim,
    load_transformer,
    lower_token_states,
    mean_pool,
    transformer_layers,
)
from mtl.errors import MtlError


class EpisodicBatchNorm2d(nn.BatchNorm2d):
    """Batch norm whose statistics come from the first ``stats_rows`` rows of the batch.

    Meta-learning puts ``[support; query]`` through one forward with ``stats_rows = len(support)``:
    queries are normalised with support statistics only, so no query sees another query's
    statistics (no transductive leak). With ``stats_rows = None`` it uses the whole batch (the
    transductive MAML default). In ``eval()`` it uses the running statistics, which
    :func:`calibrate_batchnorm` sets from an adapted model's support set. Gradients through the
    statistics are exact: the whole-batch mode is the native kernel, differentiable twice (MAML's
    support pass); support statistics go through :class:`SupportBatchNorm`, differentiable once
    (the query pass); MAML++'s per-step statistics are plain tensor ops.
    """

    stats_rows: int | None = None
    # MAML++'s per-step running statistics (see :func:`step_statistics`): the (mean, var) rows of
    # the current inner step, and whether this forward "collect"s into them or "use"s them
    step_stats: tuple[Tensor, Tensor] | None = None
    step_mode: str | None = None
    momentum_of_steps: float = 0.1

    def forward(self, x: Tensor) -> Tensor:
        if self.step_stats is not None and self.step_mode == "use":
            mean, var = self.step_stats
        elif self.training or self.running_mean is None:
            if self.step_stats is None and self.stats_rows is None:
                # transductive: the native kernel (fewer memory passes; exact double backward)
                return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
            if self.step_stats is None:
                return SupportBatchNorm.apply(x, self.weight, self.bias, self.stats_rows, self.eps)
            mean, var = channel_stats(x[: self.stats_rows])  # and collect them, MAML++'s per-step statistics
            with torch.no_grad():
                self.step_stats[0].lerp_(mean.detach().to(self.step_stats[0].dtype), self.momentum_of_steps)
                self.step_stats[1].lerp_(var.detach().to(self.step_stats[1].dtype), self.momentum_of_steps)
        else:
            mean, var = self.running_mean, self.running_var  # type: ignore[assignment]
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        shift = -mean * scale + (self.bias if self.bias is not None else 0.0)
        # x * scale + shift, through the native kernel as an eval-mode batch norm with mean 0 and
        # variance 1 - eps: scale and shift are its (differentiable) affine parameters, and its
        # fused backward and double backward are ~20% faster per meta-iteration than addcmul's
        unit = torch.full_like(scale, 1.0 - self.eps)
        return F.batch_norm(x, torch.zeros_like(scale), unit, scale, shift, False, 0.0, self.eps)


class SupportBatchNorm(torch.autograd.Function):
    """Batch norm of all rows of ``x`` with the statistics of its first ``rows`` rows, differentiable
    once (the query pass of MAML with support statistics is not differentiated twice).

    As a composition of ``x[:rows]``, the statistics and an eval-mode batch norm, autograd's backward
    would build a zero gradient of the whole batch for the slice and add it to the batch norm's: two
    more passes over the largest tensor of a meta-iteration (~15% of its time on Omniglot). Here one
    fused eval-mode backward gives every row's gradient and the parameter sums, and the statistics'
    share is added to the support rows only."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, weight: Tensor | None,
                bias: Tensor | None, rows: int, eps: float) -> Tensor:
        mean, var = channel_stats(x[:rows])
        invstd = torch.rsqrt(var + eps)
        scale = invstd * weight if weight is not None else invstd
        shift = -mean * scale + (bias if bias is not None else 0.0)
        # x * scale + shift as an eval-mode batch norm with mean 0 and variance 1 - eps: the native
        # kernel, ~20% faster per meta-iteration than addcmul
        unit = torch.full_like(scale, 1.0 - eps)
        ctx.save_for_backward(x, weight, mean, var, scale)
        ctx.rows, ctx.eps, ctx.bias_dtype = rows, eps, None if bias is None else bias.dtype
        return F.batch_norm(x, torch.zeros_like(scale), unit, scale, shift, False, 0.0, eps)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, gy: Tensor
                 ) -> tuple[Tensor, Tensor | None, Tensor | None, None, None]:
        x, weight, mean, var, scale = ctx.saved_tensors  # type: ignore[attr-defined]
        rows, eps, bias_dtype = ctx.rows, ctx.eps, ctx.bias_dtype  # type: ignore[attr-defined]
        unit = torch.full_like(scale, 1.0 - eps)
        # gy * scale for every row, sum(gy * x) and sum(gy) per channel, in one pass
        gx, sum_gx, sum_g = torch.ops.aten.native_batch_norm_backward(
            gy, x, scale, torch.zeros_like(scale), unit, None, None, False, eps, [True, True, True])
        invstd = torch.rsqrt(var + eps)
        sum_gx, sum_g = _wide(sum_gx), _wide(sum_g)
        sum_g_centred = sum_gx - mean * sum_g  # sum(gy * (x - mean))
        w = weight if weight is not None else torch.ones_like(invstd)
        # through the statistics of the support rows: d mean / d x_i = 1/n, d var / d x_i = 2 (x_i - mean)/n
        n = rows * x.shape[2] * x.shape[3]
        d_mean = -sum_g * scale
        d_var = (sum_g_centred * w * -0.5 * invstd.pow(3)) * (var > 0)  # var is clamped at 0
        shape = (1, -1, 1, 1)
        support = _wide(x[:rows]) - mean.view(shape)
        gx[:rows] += (d_mean.view(shape) / n + support * (2 * d_var / n).view(shape)).to(gx.dtype)
        needs = ctx.needs_input_grad  # type: ignore[attr-defined]
        g_weight = (sum_g_centred * invstd).to(weight.dtype) if weight is not None and needs[1] else None
        g_bias = sum_g.to(bias_dtype) if bias_dtype is not None and needs[2] else None
        return gx, g_weight, g_bias, None, None


def _wide(x: Tensor) -> Tensor:
    """``x`` in at least single precision: reductions never in half precision."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def channel_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance; E[x^2] - E[x]^2 in fp32 is 8x faster than ``var`` on
    channels-last CPU tensors."""
    xf = _wide(x)
    mean = xf.mean(dim=(0, 2, 3))
    return mean, ((xf * xf).mean(dim=(0, 2, 3)) - mean * mean).clamp_min(0)


@contextlib.contextmanager
def setting(model: nn.Module, kind: type[nn.Module], attr: str, value: object) -> Iterator[None]:
    """Within the block, every submodule of type ``kind`` has ``attr`` set to ``value``: how a pass
    switches a mode of plain modules without changing their code."""
    modules = [m for m in model.modules() if isinstance(m, kind)]
    old = [getattr(m, attr) for m in modules]
    for m in modules:
        setattr(m, attr, value)
    try:
        yield
    finally:
        for m, v in zip(modules, old, strict=True):
            setattr(m, attr, v)


def support_statistics(model: nn.Module, rows: int | None) -> contextlib.AbstractContextManager[None]:
    """Within the block, batch norms take statistics from the first ``rows`` rows only."""
    return setting(model, EpisodicBatchNorm2d, "stats_rows", rows)


@contextlib.contextmanager
def step_statistics(model: nn.Module, rows: dict[str, tuple[Tensor, Tensor]], mode: str) -> Iterator[None]:
    """Within the block, the batch norm named ``n`` normalises with the running statistics
    ``rows[n]`` (``mode="use"``), or with its support statistics while averaging them into
    ``rows[n]`` (``"collect"``): MAML++'s per-step batch-norm running statistics."""
    norms = {n: m for n, m in model.named_modules() if isinstance(m, EpisodicBatchNorm2d) and n in rows}
    for n, m in norms.items():
        m.step_stats, m.step_mode = rows[n], mode
    try:
        yield
    finally:
        for m in norms.values():
            m.step_stats, m.step_mode = None, None


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, forward: Callable[[], object]) -> None:
    """Set every batch norm's running statistics to those of the batch that ``forward`` runs."""
    norms = [m for m in model.modules() if isinstance(m, EpisodicBatchNorm2d)]
    if not norms:
        return
    hooks = []
    for m in norms:
        def hook(mod: EpisodicBatchNorm2d, inputs: tuple[Tensor, ...]) -> None:
            x = inputs[0]
            mean, var = channel_stats(x if mod.stats_rows is None else x[: mod.stats_rows])
            mod.running_mean.copy_(mean)  # type: ignore[union-attr]
            mod.running_var.copy_(var)  # type: ignore[union-attr]
        hooks.append(m.register_forward_pre_hook(hook))
    was_training = model.training
    model.train()
    try:
        forward()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)


def channels_last(x: Tensor) -> Tensor:
    """``x`` with NHWC strides. For one channel ``contiguous(memory_format=...)`` keeps the NCHW
    strides (both layouts are the same bytes), convolutions then pick NCHW and the whole network
    runs NCHW; the explicit strides (a view) make them pick NHWC."""
    if x.shape[1] != 1:
        return x.contiguous(memory_format=torch.channels_last)
    h, w = x.shape[2:]
    return x.contiguous().as_strided(x.shape, (h * w, 1, w, 1))


def nchw_for_double_backward(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Within the block, convolutional encoders run NCHW: the layout for a pass whose graph is
    differentiated twice (second-order MAML's support pass). On CPU such a pass runs 1.25-2x faster
    NCHW (batch norm's double backward above all), while channels-last makes a pass differentiated
    once 1.5-1.8x faster (docs/BENCHMARKS.md)."""
    return setting(model, ConvEncoder, "nhwc", False)


class ConvEncoder(nn.Module):
    """The Conv-4 of the MAML paper: blocks of 3x3 conv, batch norm, ReLU, 2x2 max-pool."""

    nhwc: bool = True  # channels-last activations (see :func:`nchw_for_double_backward`)

    def __init__(self, in_channels: int = 1, hidden: int = 64, depth: int = 4) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(depth):
            # no conv bias: the batch norm that follows has one. ReLU after the max-pool: the same
            # function (ReLU is monotone), with ReLU and its double backward on a quarter of the values
            layers += [nn.Conv2d(in_channels if i == 0 else hidden, hidden, 3, padding=1, bias=False),
                       EpisodicBatchNorm2d(hidden), nn.MaxPool2d(2, ceil_mode=i >= 4), nn.ReLU()]
        self.blocks = nn.Sequential(*layers)
        self.out_dim = hidden

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        if x.dim() == 3:
            x = x.unsqueeze(1)  # grayscale (N, H, W) -> (N, 1, H, W)
        elif x.dim() == 4 and x.shape[-1] == 3 and x.shape[1] != 3:
            x = x.permute(0, 3, 1, 2)
        x = channels_last(x) if self.nhwc else x.contiguous()  # NHWC: 2x faster conv and pooling on CPU
        h = self.blocks(x)
        return h.mean(dim=(2, 3))  # global average pool: any input size gives `hidden` features


class HeldState(nn.Module):
    """A module's tensors without its code: buffers nested under the same names, so the
    ``state_dict`` of a model holding it has the keys the real module would give."""

    def __init__(self, state: dict[str, Tensor]) -> None:
        super().__init__()
        for name, tensor in state.items():
            *path, leaf = name.split(".")
            module: nn.Module = self
            for part in path:
                if part not in module._modules:
                    module.add_module(part, nn.Module())
                module = module._modules[part]  # type: ignore[assignment]
            module.register_buffer(leaf, tensor)


class TextEncoder(nn.Module):
    """A pretrained transformer (all-MiniLM-L6-v2 by default) with mean pooling.

    Frozen by default: ``forward`` then accepts precomputed sentence embeddings (a float tensor),
    which training reads from a disk cache (:mod:`mtl.embeddings`). With ``trainable_layers = n``
    the top ``n`` transformer layers are trained in the outer loop and ``forward`` takes strings, or
    the cached :class:`TokenStates` that enter those layers (what training feeds it). A meta-learned
    encoder that adaptation leaves alone is ``hold``-ed: cached embeddings again, its weights kept.
    """

    def __init__(self, name: str = "minilm", trainable_layers: int = 0) -> None:
        super().__init__()
        self.name = name
        self.trainable_layers = trainable_layers
        self.out_dim = encoder_dim(name)
        self.transformer: nn.Module | None = None
        self.weights: EncoderWeights | None = None  # see `hold`
        self.dropout = False  # see `train`
        if trainable_layers > 0:
            self.set_trainable(trainable_layers)

    def hold(self, state: dict[str, Tensor], layers: int) -> None:
        """Keep a meta-learned encoder (``state``: its transformer's tensors, ``layers`` trained) as a
        fixed function of the text, without building it: for adaptation that leaves the encoder
        alone. Its sentence embeddings come from the disk cache, keyed by a digest of ``state``, so
        a warm cache skips importing transformers and running the layers (what makes ``adapt``
        fast); ``state_dict`` still holds every tensor, so the saved model is complete."""
        self.transformer = HeldState(state)
        self.weights = EncoderWeights.of(state)
        self.trainable_layers = layers

    @property
    def reads_embeddings(self) -> bool:
        """``forward`` maps texts to cached sentence embeddings (frozen or held encoder)."""
        return self.transformer is None or isinstance(self.transformer, HeldState)

    def embed(self, texts: Sequence[str]) -> Tensor:
        return embed_texts(list(texts), self.name, self.weights)

    def set_trainable(self, layers: int) -> None:
        """Train the top ``layers`` transformer layers; ``forward`` then takes strings."""
        if self.reads_embeddings:
            held = self.transformer.state_dict() if self.transformer is not None else None
            device = next(itertools.chain(self.parameters(), self.buffers()), torch.empty(0)).device
            shared, self.tokenizer = load_transformer(self.name)
            # a private copy: the shared instance stays frozen, so cached embeddings stay valid
            self.transformer = copy.deepcopy(shared).to(device)
            if held is not None:
                self.transformer.load_state_dict(held)
            self.weights = None
        assert self.transformer is not None
        n_layers = len(transformer_layers(self.transformer))
        if not 1 <= layers <= n_layers:
            raise MtlError(f"the text encoder has {n_layers} layers; {layers} cannot be trained",
                           f"train between 1 and {n_layers} layers")
        self.trainable_layers = layers
        for p in self.transformer.parameters():
            p.requires_grad_(False)
        for layer in transformer_layers(self.transformer)[-layers:]:
            for p in layer.parameters():
                p.requires_grad_(True)

    def _tokens(self, texts: Sequence[str]) -> dict[str, Tensor]:
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=128, return_tensors="pt")
        return {k: v.to(next(self.transformer.parameters()).device) for k, v in batch.items()}  # type: ignore[union-attr]

    @torch.no_grad()
    def lower_states(self, texts: Sequence[str], batch_size: int = 32) -> list[tuple[Tensor, Tensor, Tensor]]:
        """(row indices, hidden states entering the trainable layers, attention mask) of length-sorted
        batches: computed once, so that an epoch of fine-tuning runs the trainable layers only. From
        this encoder's own layers, unlike :func:`mtl.embeddings.token_states` (the pretrained ones)."""
        assert self.transformer is not None
        start = len(transformer_layers(self.transformer)) - self.trainable_layers
        arrays = lower_token_states(self.transformer, self.tokenizer, list(texts), start, np.float32)
        device = next(self.transformer.parameters()).device
        store = TokenStore(torch.from_numpy(arrays["tokens"]), torch.from_numpy(arrays["offsets"])).to(device)
        order = np.argsort([len(t) for t in texts], kind="stable")
        out = []
        for i in range(0, len(texts), batch_size):
            idx = torch.as_tensor(order[i:i + batch_size])
            states = store[idx.to(device)]
            out.append((idx, states.hidden, states.mask))
        return out

    def upper(self, hidden: Tensor, mask: Tensor) -> Tensor:
        """Sentence embeddings from :meth:`lower_states`: the trainable layers, then mean pooling."""
        assert self.transformer is not None
        additive = (1.0 - mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        for layer in transformer_layers(self.transformer)[-self.trainable_layers:]:
            hidden = layer(hidden, attention_mask=additive)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden  # older transformers return tuples
        return mean_pool(hidden, mask)

    def train(self, mode: bool = True) -> TextEncoder:
        """Meta-learning runs episodes, validation included, in training mode (for batch norm's
        episodic statistics); the transformer's dropout stays off unless ``dropout`` is set, so the
        same episode gives the same accuracy."""
        super().train(mode)
        if self.transformer is not None and not self.dropout:
            self.transformer.eval()
        return self

    def forward(self, x: Tensor | Sequence[str] | TokenStates) -> Tensor:
        if isinstance(x, TokenStates):
            return self.upper(x.hidden, x.mask)
        if isinstance(x, Tensor):
            if not self.reads_embeddings:
                raise ValueError("a text encoder with trainable layers takes strings, not embeddings")
            return x.float()
        if self.reads_embeddings:
            return self.embed(x)
        batch = self._tokens(x)
        out = self.transformer(**batch).last_hidden_state
        return mean_pool(out, batch["attention_mask"])


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
    text_encoder: str = "minilm"  # a registered name or a transformers model folder (made absolute)
    text_trainable_layers: int = 0
    projection: int | None = None  # per-modality linear map to a common width before the trunk
    trunk: list[int] = []  # hidden widths of the shared MLP trunk; [] = none
    normalize_text: bool = True

    @field_validator("text_encoder")
    @classmethod
    def _absolute_folder(cls, name: str) -> str:
        """A checkpoint must find the folder again from wherever it is adapted."""
        return name if name in ENCODERS or not Path(name).is_dir() else str(Path(name).resolve())


ENCODERS: dict[str, Callable[[ModelConfig], nn.Module]] = {
    "conv4": lambda c: ConvEncoder(c.image_channels, 64, 4),
    "conv4-wide": lambda c: ConvEncoder(c.image_channels, 128, 4),
    "conv6": lambda c: ConvEncoder(c.image_channels, 64, 6),
    "minilm": lambda c: TextEncoder("minilm", c.text_trainable_layers),
}


def build_encoder(name: str, config: ModelConfig, modality: str) -> nn.Module:
    """The encoder a recipe names: a registered one, or for text the folder of any transformers
    sentence encoder (saved with ``save_pretrained``; mean pooling), e.g. a larger model than MiniLM."""
    if name in ENCODERS:
        return ENCODERS[name](config)
    if modality == "text" and Path(name).is_dir():
        return TextEncoder(name, config.text_trainable_layers)
    other = " or the folder of a transformers model" if modality == "text" else ""
    raise MtlError(f"unknown {modality} encoder '{name}'", f"use one of {', '.join(ENCODERS)}{other}")


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

    def features(self, x: Tensor | Sequence[str] | TokenStates, modality: str) -> Tensor:
        return self.from_encoding(self.encoders[modality](x), modality)

    def from_encoding(self, h: Tensor, modality: str) -> Tensor:
        """The shared representation of an encoder's output."""
        if modality == "text" and self.config.normalize_text:
            h = F.normalize(h, dim=-1) * 10.0  # unit-norm sentence embeddings, scaled for a linear head
        if modality in self.projections:
            h = F.relu(self.projections[modality](h))
        return self.trunk(h)

    def forward(self, x: Tensor | Sequence[str] | TokenStates, modality: str, task: str | None = None,
                encoded: bool = False) -> Tensor:
        """``encoded``: ``x`` is already the encoder's output (an inner loop that leaves the encoder
        alone encodes an episode once)."""
        h = self.from_encoding(x, modality) if encoded else self.features(x, modality)  # type: ignore[arg-type]
        return h if task is None else self.heads[head_key(task)](h)

    def add_head(self, task: str, classes: int) -> nn.Linear:
        head = nn.Linear(self.feature_dim, classes)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        self.heads[head_key(task)] = head.to(next(self.parameters(), torch.empty(0)).device)
        return head


def head_key(task: str) -> str:
    """Module names cannot hold '.', task names can."""
    return task.replace(".", "__")
