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


def assert_same_meta_gradient(method: str, inner: dict, change: dict, batches: list) -> None:
    """``change`` to the inner loop leaves the meta-gradient, the loss, the accuracy and the per-step
    batch-norm statistics (collected once, however the graph is rebuilt or cut) as they were."""
    plain = tiny_learner(method, **inner)
    changed = tiny_learner(method, **inner, **change)
    want = meta_grads(plain, batches, it=5)
    got = meta_grads(changed, batches, it=5)
    assert want.keys() == got.keys() and want
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-10, rtol=1e-8), name
    for (name, a), b in zip(plain.named_buffers(), changed.buffers(), strict=True):
        assert torch.allclose(a, b, atol=1e-12), name
    (loss_a, acc_a), (loss_b, acc_b) = plain.meta_backward(batches, 5), changed.meta_backward(batches, 5)
    assert loss_b == pytest.approx(loss_a, rel=1e-10) and acc_b == acc_a


@pytest.mark.parametrize("method, inner", VARIANTS, ids=[f"{m}-{i}" for m, i in VARIANTS])
def test_recompute_gives_the_stored_graphs_meta_gradient(method, inner):
    assert_same_meta_gradient(method, inner, {"recompute": True}, [batch(0), batch(1)])


def test_recompute_matches_finite_differences():
    check_against_fd(tiny_learner("maml", steps=2, recompute=True), [batch(0), batch(1)])
