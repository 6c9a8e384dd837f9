"""Convolutional image encoders: the MAML paper's Conv-4 and its wider and deeper variants."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtl.models.batchnorm import EpisodicBatchNorm2d, plain_max_pool_2x2
from mtl.models.encoders.registry import register_encoder

if TYPE_CHECKING:
    from mtl.models.multitask import ModelConfig


def channels_last(x: Tensor) -> Tensor:
    """``x`` with NHWC strides. For one channel ``contiguous(memory_format=...)`` keeps the NCHW
    strides (both layouts are the same bytes), convolutions then pick NCHW and the whole network
    runs NCHW; the explicit strides (a view) make them pick NHWC."""
    if x.shape[1] != 1:
        return x.contiguous(memory_format=torch.channels_last)
    h, w = x.shape[2:]
    return x.contiguous().as_strided(x.shape, (h * w, 1, w, 1))


def channels_last_weight(p: Tensor) -> Tensor:
    """A convolution's weight (any 4-D tensor) with NHWC strides, the layout of the activations it meets.
    oneDNN copies an NCHW weight into that layout at every call (forward, backward, double backward): 60
    of the 177 weight copies per task of second-order MAML at 5 inner steps, 1-3% of its time
    (docs/BENCHMARKS.md). The inner loop's fast weights start in this layout, and every step's keep it."""
    return p.contiguous(memory_format=torch.channels_last) if p.dim() == 4 else p


LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL's convert("L")


def pixels(x: Tensor, channels: int, nhwc: bool) -> Tensor:
    """A batch of images as the first convolution takes it: floats in [0, 1], (N, C, H, W) with the
    encoder's ``channels`` (colour images turned to luminance for a grayscale encoder, grayscale repeated
    for a colour one, so a task file's `grayscale` need not match the checkpoint's), NHWC strides if
    ``nhwc``."""
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    if x.dim() == 3:
        x = x.unsqueeze(1)  # grayscale (N, H, W) -> (N, 1, H, W)
    elif x.dim() == 4 and x.shape[-1] == 3 and x.shape[1] != 3:
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] == 3 and channels == 1:
        x = (x * x.new_tensor(LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)
    elif x.shape[1] == 1 and channels == 3:
        x = x.expand(-1, 3, -1, -1)
    return channels_last(x) if nhwc else x.contiguous()  # NHWC: 2x faster conv and pooling on CPU


class ConvEncoder(nn.Module):
    """The Conv-4 of the MAML paper: blocks of 3x3 conv, batch norm, ReLU, 2x2 max-pool."""

    nhwc: bool = True  # channels-last activations (NCHW in a pass batched over tasks with vmap)
    # tasks side by side along the channels, each with its own weights stacked along their first dimension:
    # every convolution grouped by task (mtl/algorithms/stacked_tasks.py); the input from `stacked_input`
    tasks: int = 1

    def __init__(self, in_channels: int = 1, hidden: int = 64, depth: int = 4) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(depth):
            # no conv bias: the batch norm that follows has one. ReLU after the max-pool: the same
            # function (ReLU is monotone), with ReLU and its double backward on a quarter of the values
            layers += [nn.Conv2d(in_channels if i == 0 else hidden, hidden, 3, padding=1, bias=False),
                       EpisodicBatchNorm2d(hidden), nn.MaxPool2d(2, ceil_mode=i >= 4), nn.ReLU()]
        self.blocks = nn.Sequential(*layers)
        self.in_channels = in_channels
        self.out_dim = hidden

    def stacked_input(self, xs: Sequence[Tensor]) -> Tensor:
        """Several tasks' images (as many of each) side by side along the channels, for ``tasks = len(xs)``."""
        return torch.cat([pixels(x, self.in_channels, False) for x in xs], 1)

    def forward(self, x: Tensor) -> Tensor:
        h = pixels(x, self.in_channels * self.tasks, self.nhwc)  # several tasks': already their channels
        layers = list(self.blocks)
        i = 0
        while i < len(layers):
            layer = layers[i]
            norm_then_pool = isinstance(layer, EpisodicBatchNorm2d) and i + 1 < len(layers)
            pooled = layer.pooled(h, layers[i + 1]) if norm_then_pool else None
            if pooled is not None:  # each batch norm and the max-pool after it in one pass where it can
                h, i = pooled, i + 2
            elif _pools_2x2(layer, h):
                h, i = MaxPool2x2.apply(h), i + 1
            elif isinstance(layer, nn.Conv2d) and self.tasks > 1:
                h, i = F.conv2d(h, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation,
                                layer.groups * self.tasks), i + 1
            else:
                h, i = layer(h), i + 1
        return h.mean(dim=(2, 3))  # global average pool: any input size gives `hidden` features


def _pools_2x2(layer: nn.Module, x: Tensor) -> bool:
    """Whether ``layer`` is a plain 2 x 2 max-pool of a CPU tensor with a backward to come, what
    :class:`MaxPool2x2` computes; not under ``torch.func`` transforms (the tasks batched with ``vmap``),
    which need a batching rule."""
    return (plain_max_pool_2x2(layer) and x.device.type == "cpu" and x.dim() == 4 and torch.is_grad_enabled()
            and not torch._C._functorch.is_functorch_wrapped_tensor(x))


class MaxPool2x2(torch.autograd.Function):
    """A 2 x 2 max-pool whose backward is max-pooling's, differentiable again with respect to the incoming
    gradient only. Autograd's double backward of the native pool also "differentiates" with respect to the
    pooled input, whose share is zero, by building a zero tensor of the input's size and adding it to that
    input's gradient: about 4% of second-order MAML's support pass on Omniglot's Conv-4 (docs/BENCHMARKS.md)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor) -> Tensor:
        pooled, where = torch.ops.aten.max_pool2d_with_indices(x, [2, 2], [2, 2])
        ctx.save_for_backward(x, where)
        return pooled

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, gy: Tensor) -> Tensor:
        x, where = ctx.saved_tensors  # type: ignore[attr-defined]
        return torch.ops.aten.max_pool2d_with_indices_backward(gy, x.detach(), [2, 2], [2, 2], [0, 0], [1, 1], False,
                                                               where)


@register_encoder("conv4", "image")
def conv4(config: ModelConfig) -> ConvEncoder:
    """The MAML paper's Conv-4: 4 blocks of 64 channels."""
    return ConvEncoder(config.image_channels, 64, 4)


@register_encoder("conv4-32", "image")
def conv4_32(config: ModelConfig) -> ConvEncoder:
    """Conv-4 with 32 channels: the MAML paper's mini-ImageNet network, narrower so that it overfits
    less on 84x84 colour images."""
    return ConvEncoder(config.image_channels, 32, 4)


@register_encoder("conv4-wide", "image")
def conv4_wide(config: ModelConfig) -> ConvEncoder:
    """Conv-4 with 128 channels per block."""
    return ConvEncoder(config.image_channels, 128, 4)


@register_encoder("conv6", "image")
def conv6(config: ModelConfig) -> ConvEncoder:
    """Six blocks of 64 channels (the last two without pooling below 1x1)."""
    return ConvEncoder(config.image_channels, 64, 6)
