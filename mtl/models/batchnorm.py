"""Batch norm for episodes: statistics from the support set only, or MAML++'s per-step running
statistics, with exact (and fast) gradients for second-order meta-learning."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtl.models.batchnorm_twice import affine_kernel, affine_kernel_backward, batch_statistics_norm


class EpisodicBatchNorm2d(nn.BatchNorm2d):
    """Batch norm whose statistics come from the first ``stats_rows`` rows of the batch.

    Meta-learning puts ``[support; query]`` through one forward with ``stats_rows = len(support)``:
    queries are normalised with support statistics only, so no query sees another query's
    statistics (no transductive leak). With ``stats_rows = None`` it uses the whole batch (the
    transductive MAML default). In ``eval()`` it uses the running statistics, which
    :func:`calibrate_batchnorm` sets from an adapted model's support set. Gradients through the
    statistics are exact: the whole-batch mode is differentiable twice (MAML's support pass, with a
    fused double backward: :mod:`mtl.models.batchnorm_twice`); support statistics go through
    :class:`SupportBatchNorm`, differentiable once (the query pass); MAML++'s per-step statistics are
    plain tensor ops.
    """

    stats_rows: int | None = None
    # MAML++'s per-step running statistics (see :func:`step_statistics`): the (mean, var) rows of
    # the current inner step, and whether this forward "collect"s into them or "use"s them
    step_stats: tuple[Tensor, Tensor] | None = None
    step_mode: str | None = None
    momentum_of_steps: float = 0.1
    # plain tensor ops instead of the native kernels: what a pass batched over tasks with
    # torch.func.vmap needs (mtl/algorithms/batched_tasks.py), exact to any order of derivative
    plain_ops: bool = False

    def forward(self, x: Tensor) -> Tensor:
        if self.step_stats is not None and self.step_mode == "use":
            mean, var = self.step_stats
        elif self.training or self.running_mean is None:
            if self.plain_ops and self.step_stats is None:
                mean, var = channel_stats(x if self.stats_rows is None else x[: self.stats_rows])
                return _affine(x, mean, var, self.weight, self.bias, self.eps)
            if self.step_stats is None and self.stats_rows is None:
                # the whole batch's statistics: MAML's support pass (differentiated twice) and the
                # transductive query pass; one kernel each way, and a fused double backward
                return batch_statistics_norm(x, self.weight, self.bias, self.eps)
            if self.step_stats is None:
                return SupportBatchNorm.apply(x, self.weight, self.bias, self.stats_rows, self.eps)
            mean, var = channel_stats(x[: self.stats_rows])  # and collect them, MAML++'s per-step statistics
            with torch.no_grad():
                self.step_stats[0].lerp_(mean.detach().to(self.step_stats[0].dtype), self.momentum_of_steps)
                self.step_stats[1].lerp_(var.detach().to(self.step_stats[1].dtype), self.momentum_of_steps)
        else:
            mean, var = self.running_mean, self.running_var  # type: ignore[assignment]
        scale, shift = _scale_shift(mean, var, self.weight, self.bias, self.eps)
        # scale and shift are the kernel's affine parameters: differentiable, twice too, and its fused
        # backward and double backward are faster than addcmul's
        return affine_kernel(x, scale, shift, self.eps)

    def pooled(self, x: Tensor, pool: nn.Module) -> Tensor | None:
        """``pool(self(x))`` through :class:`SupportNormPool` where that is the same function and faster:
        support statistics, a 2 x 2 max-pool, every channel's scale positive, no hooks to bypass, on CPU
        (the signs' check would make a GPU wait). None where it is not: call the two modules."""
        fits = (x.device.type == "cpu" and x.dim() == 4 and (self.training or self.running_mean is None)
                and self.stats_rows is not None and self.step_stats is None and not self.plain_ops
                and not (self._forward_hooks or self._forward_pre_hooks) and plain_max_pool_2x2(pool)
                and (self.weight is None or bool((self.weight > 0).all())))
        return SupportNormPool.apply(x, self.weight, self.bias, self.stats_rows, self.eps) if fits else None


POOL_2X2 = {(2, 2, 0, 1, False), ((2, 2), (2, 2), (0, 0), (1, 1), False)}  # what SupportNormPool computes


def plain_max_pool_2x2(pool: nn.Module) -> bool:
    """Whether ``pool`` is a 2 x 2 max-pool of stride 2 without padding or hooks: what the fused passes
    (:class:`SupportNormPool`, the Conv-4's ``MaxPool2x2``) compute in its place."""
    return (isinstance(pool, nn.MaxPool2d) and not (pool._forward_hooks or pool._forward_pre_hooks)
            and (pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode) in POOL_2X2)


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
        mean, var, scale, shift = _support_affine(x, weight, bias, rows, eps)
        ctx.save_for_backward(x, weight, mean, var, scale)
        ctx.rows, ctx.eps, ctx.bias_dtype = rows, eps, None if bias is None else bias.dtype
        return affine_kernel(x, scale, shift, eps)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, gy: Tensor
                 ) -> tuple[Tensor, Tensor | None, Tensor | None, None, None]:
        x, weight, mean, var, scale = ctx.saved_tensors  # type: ignore[attr-defined]
        rows, eps = ctx.rows, ctx.eps  # type: ignore[attr-defined]
        gx, sum_gx, sum_g = affine_kernel_backward(gy, x, scale, eps)
        return _through_statistics(ctx, gx, sum_gx, sum_g, x[:rows], weight, mean, var, scale)


class SupportNormPool(torch.autograd.Function):
    """``max_pool2d(SupportBatchNorm(x), 2)`` with the normalisation after the pooling: the same function
    where every channel's scale is positive (an increasing affine map commutes with a maximum), with
    no batch-norm pass over the full-size tensor, forward or backward. On Omniglot's Conv-4 that tensor
    is the query pass's 80 x 64 x 28 x 28 first block; a meta-iteration is 14-16% faster on one CPU thread
    (docs/BENCHMARKS.md)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, weight: Tensor | None,
                bias: Tensor | None, rows: int, eps: float) -> Tensor:
        mean, var, scale, shift = _support_affine(x, weight, bias, rows, eps)
        pooled, where = torch.ops.aten.max_pool2d_with_indices(x, [2, 2], [2, 2])
        # the support rows only, not the whole of x, which can then be freed
        ctx.save_for_backward(x[:rows].clone(), pooled, where, weight, mean, var, scale)
        ctx.rows, ctx.eps, ctx.bias_dtype, ctx.size = rows, eps, None if bias is None else bias.dtype, x.shape[2:]
        return affine_kernel(pooled, scale, shift, eps)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, gy: Tensor
                 ) -> tuple[Tensor, Tensor | None, Tensor | None, None, None]:
        support, pooled, where, weight, mean, var, scale = ctx.saved_tensors  # type: ignore[attr-defined]
        # the parameter sums over the pooled values equal those over the maxima's places in x
        g_pooled, sum_gx, sum_g = affine_kernel_backward(gy, pooled, scale, ctx.eps)  # type: ignore[attr-defined]
        # max-pooling's backward as un-pooling: the same values, 2x faster on bf16 channels-last tensors.
        # Not under autocast, which would un-pool in fp32 (twice the bytes) and cast back
        with torch.autocast(gy.device.type, enabled=False):
            gx = F.max_unpool2d(g_pooled, where, 2, output_size=ctx.size)  # type: ignore[attr-defined]
        return _through_statistics(ctx, gx, sum_gx, sum_g, support, weight, mean, var, scale)


def _support_affine(x: Tensor, weight: Tensor | None, bias: Tensor | None, rows: int, eps: float
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The statistics of the first ``rows`` rows of ``x`` and the per-channel (scale, shift) that
    normalise with them."""
    mean, var = channel_stats(x[:rows])
    return mean, var, *_scale_shift(mean, var, weight, bias, eps)


def _scale_shift(mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
                 ) -> tuple[Tensor, Tensor]:
    """The per-channel (scale, shift) of batch norm with these statistics: ``x * scale + shift``."""
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    return scale, -mean * scale + (bias if bias is not None else 0.0)


def _through_statistics(ctx: torch.autograd.function.FunctionCtx, gx: Tensor, sum_gx: Tensor, sum_g: Tensor,
                        support: Tensor, weight: Tensor | None, mean: Tensor, var: Tensor, scale: Tensor
                        ) -> tuple[Tensor, Tensor | None, Tensor | None, None, None]:
    """The gradients of a support-statistics batch norm from those of its per-channel affine map
    (``gx``, and ``sum_gx``, ``sum_g`` for scale and shift): the statistics' share is added to the
    ``support`` rows' part of ``gx``, and the parameters' gradients follow from the sums."""
    rows, eps, bias_dtype = ctx.rows, ctx.eps, ctx.bias_dtype  # type: ignore[attr-defined]
    invstd = torch.rsqrt(var + eps)
    sum_gx, sum_g = _wide(sum_gx), _wide(sum_g)
    sum_g_centred = sum_gx - mean * sum_g  # sum(gy * (x - mean))
    w = weight if weight is not None else torch.ones_like(invstd)
    # through the statistics of the support rows: d mean / d x_i = 1/n, d var / d x_i = 2 (x_i - mean)/n
    n = rows * support.shape[2] * support.shape[3]
    d_mean = -sum_g * scale
    d_var = (sum_g_centred * w * -0.5 * invstd.pow(3)) * (var > 0)  # var is clamped at 0
    shape = (1, -1, 1, 1)
    centred = _wide(support) - mean.view(shape)
    gx[:rows] += (d_mean.view(shape) / n + centred * (2 * d_var / n).view(shape)).to(gx.dtype)
    needs = ctx.needs_input_grad  # type: ignore[attr-defined]
    g_weight = (sum_g_centred * invstd).to(weight.dtype) if weight is not None and needs[1] else None
    g_bias = sum_g.to(bias_dtype) if bias_dtype is not None and needs[2] else None
    return gx, g_weight, g_bias, None, None


def _affine(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """``x`` normalised with ``mean`` and ``var`` per channel, in plain tensor ops."""
    scale, shift = _scale_shift(mean, var, weight, bias, eps)
    return x * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype)


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
