"""Batch norm with the batch's own statistics, differentiated twice in a few fused passes.

Second-order MAML differentiates the support pass's gradient again in the outer backward. PyTorch's
double backward of batch norm (``NativeBatchNormBackwardBackward0``) is a composite of dozens of
element-wise products and sums over the whole activation: on Omniglot's Conv-4 it was 31% of a
5-step second-order meta-iteration on a CPU (docs/BENCHMARKS.md). Here the gradient of batch norm's
backward is written out by hand: every term is a per-channel coefficient times one of ``ggx``,
``gy`` or ``x``, so it takes three per-channel sums (two fused passes) and three element-wise passes.
Exact: values, gradients and second derivatives equal the native kernel's to 1e-12 in float64
(tests/test_maml.py). The eval-mode kernel as a per-channel affine map (:func:`affine_kernel` and its
backward) lives here too; the support-statistics passes of :mod:`mtl.models.batchnorm` use it as well.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_CHANNEL = (1, -1, 1, 1)


class BatchStatisticsNorm(torch.autograd.Function):
    """Training-mode batch norm of a 4-D ``x`` (statistics over all its rows), whose backward is
    :class:`BatchStatisticsNormBackward`: differentiable again, with a fused double backward."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, weight: Tensor | None, bias: Tensor | None,
                eps: float) -> Tensor:
        y, mean, invstd = torch.ops.aten.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps, ctx.has_bias = eps, bias is not None
        return y

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, gy: Tensor
                 ) -> tuple[Tensor, Tensor | None, Tensor | None, None]:
        x, weight, mean, invstd = ctx.saved_tensors  # type: ignore[attr-defined]
        eps, has_bias = ctx.eps, ctx.has_bias  # type: ignore[attr-defined]
        # the outer backward of a channels-last pass brings some gradients in NCHW, and in mixed layouts the
        # kernels take a slow path: a Conv-4 pass differentiated twice channels-last, 15.3 -> 13.6 ms with the copy
        nhwc = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        gy = gy.contiguous(memory_format=torch.channels_last if nhwc else torch.contiguous_format)
        gx, g_weight, g_bias = BatchStatisticsNormBackward.apply(gy, x, weight, mean, invstd, eps)
        return gx, g_weight if weight is not None else None, g_bias if has_bias else None, None


class BatchStatisticsNormBackward(torch.autograd.Function):
    """Batch norm's backward ``(gy, x, weight) -> (gx, g_weight, g_bias)`` as the native kernel computes
    it, and its own backward written out.

    With ``xh = (x - mean) * invstd`` and per-channel means over the ``m`` values of a channel:
    ``g_bias = sum(gy)``, ``g_weight = sum(gy * xh)`` and ``gx = weight * invstd * (gy - mean(gy) - xh *
    g_weight / m)``. Given the incoming ``ggx``, ``gg_weight`` and ``gg_bias``, the gradients for ``gy``,
    ``x`` and ``weight`` (``x`` through ``xh`` and ``invstd`` alike) are affine in ``ggx``, ``gy`` and
    ``x`` with per-channel coefficients built from ``sum(ggx)``, ``sum(ggx * x)`` and ``sum(ggx * gy)``."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, gy: Tensor, x: Tensor, weight: Tensor | None,
                mean: Tensor, invstd: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
        gx, g_weight, g_bias = torch.ops.aten.native_batch_norm_backward(
            gy, x, weight, None, None, mean, invstd, True, eps, [True, True, True])
        ctx.save_for_backward(gy, x, weight, mean, invstd, g_weight, g_bias)
        return gx, g_weight, g_bias

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, ggx: Tensor | None, gg_weight: Tensor | None,
                 gg_bias: Tensor | None) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None, None]:
        gy, x, weight, mean, invstd, g_weight, g_bias = ctx.saved_tensors  # type: ignore[attr-defined]
        m = x.numel() // x.shape[1]
        zero = torch.zeros_like(invstd)
        w = weight if weight is not None else torch.ones_like(invstd)
        gg_weight = zero if gg_weight is None else gg_weight
        gg_bias = zero if gg_bias is None else gg_bias
        if ggx is None:
            s_gg_gy = s_gg = s_gg_x = zero
        else:  # sum(ggx * gy), sum(ggx), sum(ggx * x): the eval-mode backward's sums with a unit scale
            one = torch.ones_like(invstd)
            _, s_gg_gy, s_gg = affine_kernel_backward(ggx, gy, one, 0.0, scaled=False)
            _, s_gg_x, _ = affine_kernel_backward(ggx, x, one, 0.0, scaled=False)
        s_gg_xh = invstd * (s_gg_x - mean * s_gg)  # sum(ggx * xh)
        mean_gy, mean_gg = g_bias / m, s_gg / m
        # the gradient for xh (direct) is a1 * ggx + a2 * gy, the one for invstd (direct) is through_invstd
        wi = w * invstd
        a1, a2 = -wi * g_weight / m, gg_weight - wi * s_gg_xh / m
        centred = s_gg_gy - s_gg * mean_gy - s_gg_xh * g_weight / m  # sum(ggx * (gy - mean(gy) - xh * ...))
        through_invstd = w * centred
        # d xh / d x = invstd * (1 - 1/m - xh xh^T / m), d invstd / d x = -invstd^2 xh / m
        c_xh = -invstd * (a1 * s_gg_xh + a2 * g_weight) / m - invstd * invstd * through_invstd / m
        c_one = -invstd * (a1 * mean_gg + a2 * mean_gy)
        needs = ctx.needs_input_grad  # type: ignore[attr-defined]
        g_gy = g_x = g_w = None
        a2_invstd = a2 * invstd  # also the coefficient of x in gy's gradient below
        with torch.autocast(x.device.type, enabled=False):  # the dtypes below are chosen, not autocast's
            if needs[1]:  # c_xh * xh + c_one + invstd * (a1 * ggx + a2 * gy), xh written through x
                g_x = affine_kernel(x, c_xh * invstd, c_one - c_xh * invstd * mean, 0.0)
                if ggx is not None:
                    g_x.addcmul_(ggx, (invstd * a1).view(_CHANNEL).to(g_x.dtype))
                g_x.addcmul_(gy, a2_invstd.view(_CHANNEL).to(g_x.dtype))
            if needs[0]:  # gg_bias + gg_weight * xh + w * invstd * (ggx - mean(ggx) - xh * mean(ggx * xh))
                g_gy = affine_kernel(x, a2_invstd, gg_bias - wi * mean_gg - a2_invstd * mean, 0.0).to(gy.dtype)
                if ggx is not None:
                    g_gy.addcmul_(ggx, wi.view(_CHANNEL).to(g_gy.dtype))
        if weight is not None and needs[2]:
            g_w = invstd * centred
        return g_gy, g_x, g_w, None, None, None


def batch_statistics_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """Training-mode batch norm without running statistics: :class:`BatchStatisticsNorm` on a CPU, where
    its double backward was measured faster; the native kernel elsewhere."""
    if x.device.type == "cpu" and x.dim() == 4:
        return BatchStatisticsNorm.apply(x, weight, bias, eps)
    return F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)


def affine_kernel(x: Tensor, scale: Tensor, shift: Tensor, eps: float) -> Tensor:
    """``x * scale + shift`` per channel, in ``x``'s dtype, as an eval-mode batch norm with mean 0 and variance
    1 - eps: the native kernel, ~20% faster per meta-iteration than addcmul."""
    return F.batch_norm(x, torch.zeros_like(scale), torch.full_like(scale, 1.0 - eps), scale, shift, False, 0.0, eps)


def affine_kernel_backward(gy: Tensor, x: Tensor, scale: Tensor, eps: float, scaled: bool = True
                           ) -> tuple[Tensor | None, Tensor, Tensor]:
    """``gy * scale`` for every row (None unless ``scaled``), sum(gy * x) and sum(gy) per channel, in one
    pass. The saved mean and inverse std (0 and 1) must be given: CUDA's kernel reduces with them even in
    eval mode."""
    zero, unit = torch.zeros_like(scale), torch.full_like(scale, 1.0 - eps)
    return torch.ops.aten.native_batch_norm_backward(
        gy, x, scale, zero, unit, zero, torch.ones_like(scale), False, eps, [scaled, True, True])
