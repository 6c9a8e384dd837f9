"""Random distortions of training images, so that a few thousand characters look like many more.

``affine``: each image rotated, sheared, scaled and shifted at random, the distortions Koch et al.
(2015) trained their Siamese networks with for Omniglot's one-shot challenge. Only training episodes
are distorted (never validation, adaptation or prediction), and the draw depends only on the seed,
the iteration and the slot, so a resumed or a distributed run sees the very same images.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# name -> function(images N x C x H x W, generator) -> distorted images of the same shape
AUGMENTATIONS: dict[str, Callable[[Tensor, torch.Generator], Tensor]] = {}


def augmentation(name: str) -> Callable[[Callable[[Tensor, torch.Generator], Tensor]],
                                        Callable[[Tensor, torch.Generator], Tensor]]:
    def register(fn: Callable[[Tensor, torch.Generator], Tensor]) -> Callable[[Tensor, torch.Generator], Tensor]:
        AUGMENTATIONS[name] = fn
        return fn
    return register


@augmentation("affine")
def random_affine(x: Tensor, gen: torch.Generator, rotate: float = 10.0, shear: float = 0.3,
                  scale: tuple[float, float] = (0.8, 1.2), shift: float = 0.1) -> Tensor:
    """Rotation within +-``rotate`` degrees, shear within +-``shear``, scale in ``scale``, shift within
    +-``shift`` of the image size; the background (0 after Omniglot's inversion) fills the borders."""
    n = x.shape[0]

    def uniform(lo: float, hi: float) -> Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)

    angle = uniform(-rotate, rotate) * math.pi / 180
    sx, sy = uniform(-shear, shear), uniform(-shear, shear)
    zoom = uniform(*scale)
    tx, ty = uniform(-2 * shift, 2 * shift), uniform(-2 * shift, 2 * shift)  # grid units: the image spans 2
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)
    shr = torch.stack([torch.stack([torch.ones(n, dtype=torch.float64), sx], 1),
                       torch.stack([sy, torch.ones(n, dtype=torch.float64)], 1)], 1)
    a = (rot @ shr) / zoom.view(n, 1, 1)  # the grid maps output to input: dividing by the zoom enlarges
    theta = torch.cat([a, torch.stack([tx, ty], 1).unsqueeze(2)], 2).to(x.dtype).to(x.device)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def augment(name: str, x: Tensor, seed: tuple[int, ...]) -> Tensor:
    """``x`` (N x H x W or N x C x H x W) distorted by the augmentation ``name``, drawn from ``seed``
    alone; stored pixels (uint8) stay uint8."""
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence(list(seed)).generate_state(1, np.uint64)[0] >> 2))
    y = AUGMENTATIONS[name]((x if x.dim() == 4 else x.unsqueeze(1)).float(), gen)
    y = y if x.dim() == 4 else y.squeeze(1)
    return y.to(x.dtype) if x.is_floating_point() else y.round_().clamp_(0, 255).to(x.dtype)
