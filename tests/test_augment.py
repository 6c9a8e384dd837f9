"""Training-image distortions: deterministic by seed, shape- and mass-preserving, training only."""

from __future__ import annotations

import pytest
import torch

from mtl.data.augment import augment
from mtl.errors import MtlError
from mtl.run.recipe import load_recipe
from tests.conftest import needs_data


def strokes() -> torch.Tensor:
    x = torch.zeros(6, 1, 28, 28)
    x[:, :, 8:20, 12:16] = 1.0  # a bar in the middle, the background 0 as after Omniglot's inversion
    return x


def test_affine_is_drawn_from_the_seed_alone_and_keeps_the_strokes():
    x = strokes()
    a, b, c = augment("affine", x, (0, 5, 1, 0)), augment("affine", x, (0, 5, 1, 0)), augment("affine", x, (0, 5, 2, 0))
    assert a.shape == x.shape
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.allclose(a[0], a[1])  # each image its own distortion
    mass = a.sum((1, 2, 3)) / x.sum((1, 2, 3))  # scaled by 0.8-1.2 in each direction, nothing pushed out
    assert ((mass > 0.6) & (mass < 1.5)).all()
    assert a.min() >= 0 and a.max() <= 1 + 1e-6


def test_recipe_names_an_unknown_augmentation():
    with pytest.raises(MtlError, match=r"augment.*unknown augmentation 'elastic'.*affine"):
        load_recipe({"tasks": ["omniglot"], "augment": "elastic"})


@needs_data
def test_only_drawn_training_episodes_are_distorted(registry):
    from mtl.data.stream import EpisodeStream

    task = registry.load("omniglot-angelic")
    plain = EpisodeStream([task], None, 5, 1, 2, 0, torch.device("cpu"))
    distorted = EpisodeStream([task], None, 5, 1, 2, 0, torch.device("cpu"), augment="affine")
    a, b = plain.slot(3, 0), distorted.slot(3, 0)
    assert torch.equal(a.ys, b.ys) and a.xs.shape == b.xs.shape and not torch.equal(a.xs, b.xs)
    assert torch.equal(distorted.slot(3, 0).xs, b.xs)  # a resumed run draws the same images
    assert torch.equal(plain.fixed(2)[0].xs, distorted.fixed(2)[0].xs)  # validation never distorted
