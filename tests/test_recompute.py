"""Second-order inner steps rebuilt in the outer backward (``recompute``) give the meta-gradient of
the stored graph, for every inner-loop variant that takes second-order steps, and leave per-step
batch-norm statistics collected once."""

from __future__ import annotations

import pytest
import torch

from tests.test_maml import batch, check_against_fd, float64, meta_grads, tiny_learner  # noqa: F401

VARIANTS = [
    ("maml", {"steps": 3}),
    ("maml", {"steps": 2, "head_init": "proto", "bn": "transductive"}),
    ("maml", {"steps": 2, "adapt": "trunk+head"}),  # the encoder runs once; its output is an input of each step
    ("metasgd", {"steps": 2}),
    ("maml++", {"steps": 3}),  # multi-step loss, learned per-step rates, per-step batch norm and its statistics
    ("anil", {"steps": 2}),
]


@pytest.mark.parametrize("method, inner", VARIANTS, ids=[f"{m}-{i}" for m, i in VARIANTS])
def test_recompute_gives_the_stored_graphs_meta_gradient(method, inner):
    batches = [batch(0), batch(1)]
    stored = tiny_learner(method, **inner)
    recomputed = tiny_learner(method, **inner, recompute=True)
    want = meta_grads(stored, batches, it=5)
    got = meta_grads(recomputed, batches, it=5)
    assert want.keys() == got.keys() and want
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-10, rtol=1e-8), name
    for (name, a), b in zip(stored.named_buffers(), recomputed.buffers(), strict=True):
        assert torch.allclose(a, b, atol=1e-12), name  # collected once, not again when a step is re-run


def test_recompute_matches_finite_differences():
    check_against_fd(tiny_learner("maml", steps=2, recompute=True), [batch(0), batch(1)])
