"""ResNet-12, the backbone mini-ImageNet, CIFAR-FS, FC100 and CUB results are reported with
(MetaOptNet, Lee et al. 2019; TADAM, Oreshkin et al. 2018): four residual blocks of three 3x3
convolutions with batch norm and leaky ReLU, a 1x1 projection shortcut, and 2x2 max-pooling."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor, nn

from mtl.models.batchnorm import EpisodicBatchNorm2d
from mtl.models.encoders.conv import pixels
from mtl.models.encoders.registry import register_encoder

if TYPE_CHECKING:
    from mtl.models.multitask import ModelConfig


class Block(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn1 = EpisodicBatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = EpisodicBatchNorm2d(cout)
        self.conv3 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn3 = EpisodicBatchNorm2d(cout)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), EpisodicBatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        h = F.leaky_relu(self.bn1(self.conv1(x)), 0.1)
        h = F.leaky_relu(self.bn2(self.conv2(h)), 0.1)
        h = self.bn3(self.conv3(h))
        return F.max_pool2d(F.leaky_relu(h + self.shortcut(x), 0.1), 2, ceil_mode=True)


class ResNet12(nn.Module):
    """Any input size gives ``widths[-1]`` features (global average pooling)."""

    nhwc: bool = True

    def __init__(self, in_channels: int = 3, widths: tuple[int, ...] = (64, 160, 320, 640)) -> None:
        super().__init__()
        self.in_channels = in_channels
        chans = (in_channels, *widths)
        self.blocks = nn.Sequential(*[Block(a, b) for a, b in itertools.pairwise(chans)])
        self.out_dim = widths[-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(pixels(x, self.in_channels, self.nhwc)).mean(dim=(2, 3))


@register_encoder("resnet12", "image")
def resnet12(config: ModelConfig) -> ResNet12:
    """ResNet-12 (64-160-320-640), the backbone of the mini-ImageNet / CIFAR-FS / FC100 literature."""
    return ResNet12(config.image_channels)


@register_encoder("resnet12-small", "image")
def resnet12_small(config: ModelConfig) -> ResNet12:
    """ResNet-12 at a quarter of the width (16-40-80-160): the same shape for CPU runs and tests."""
    return ResNet12(config.image_channels, (16, 40, 80, 160))


@register_encoder("resnet12-half", "image")
def resnet12_half(config: ModelConfig) -> ResNet12:
    """ResNet-12 at half the width (32-80-160-320): four times the quarter width's work per image."""
    return ResNet12(config.image_channels, (32, 80, 160, 320))
