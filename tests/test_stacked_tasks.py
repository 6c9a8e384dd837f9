"""``inner.stack_tasks``: tasks' inner loops stacked along a Conv-4's channels give the loop's meta-gradient,
loss and accuracy for every inner-loop variant they take; the others run the loop, saying why when asked."""

from __future__ import annotations

import warnings
from dataclasses import replace

import pytest
import torch

from mtl.algorithms import stacked_tasks
from mtl.data.stream import TaskBatch
from mtl.models import ConvEncoder, ModelConfig, MultiTaskModel, setting
from tests.test_batched_tasks import outer
from tests.test_maml import batch, float64, tiny_learner  # noqa: F401

VARIANTS = [("maml", {"steps": 1}), ("maml", {"steps": 3}), ("fomaml", {"steps": 2}), ("metasgd", {"steps": 2}),
            ("fomaml", {"steps": 2, "head_init": "proto"}),
            ("maml", {"steps": 2, "head_init": "proto"}), ("maml", {"steps": 1, "bn": "transductive"}),
            ("maml", {"steps": 2, "msl": True, "lslr": True}), ("maml", {"steps": 2, "query_chunks": 2}),
            ("maml++", {"steps": 2, "per_step_bn": False, "per_step_bn_stats": False})]


@pytest.mark.parametrize("method, inner", VARIANTS, ids=[f"{m}-{'-'.join(map(str, i.values()))}" for m, i in VARIANTS])
def test_stacked_tasks_give_the_loops_meta_gradient(method, inner):
    tasks = [batch(seed) for seed in range(5)]
    want, (want_loss, want_acc) = outer(method, inner, tasks, stack_tasks=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every variant here is stacked, not sent back to the loop
        got, (loss, acc) = outer(method, inner, tasks, stack_tasks=2)  # passes of 2, 2 and 1 tasks
    assert got.keys() == want.keys() and want
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-12, rtol=1e-9), name
    assert loss == pytest.approx(want_loss, abs=1e-12) and acc == want_acc


def test_a_learned_head_per_training_task_is_stacked_too():
    tasks = [batch(0), replace(batch(1), task="other"), batch(2)]

    def grads(stack: int) -> dict[str, torch.Tensor]:
        learner = tiny_learner("maml", head_init="learned", steps=2, stack_tasks=stack)
        for name in ("toy", "other"):
            torch.nn.init.normal_(learner.model.add_head(name, 3).weight, std=0.1)
        learner.meta_backward(tasks, 0)
        return {n: p.grad for n, p in learner.named_parameters() if p.grad is not None}

    want, got = grads(1), grads(3)
    assert {"model.heads.toy.weight", "model.heads.other.weight"} <= want.keys()
    assert all(torch.allclose(got[n], want[n], atol=1e-12) for n in want)


def test_the_encoder_with_tasks_on_its_channels_is_each_tasks_own_network():
    torch.manual_seed(0)
    nets = [ConvEncoder(1, hidden=4, depth=3).double() for _ in range(3)]
    xs = [torch.rand(5, 1, 12, 12, dtype=torch.float64) for _ in nets]
    stacked = {n: torch.cat([dict(net.named_parameters())[n] for net in nets]) for n, _ in nets[0].named_parameters()}
    with setting(nets[0], ConvEncoder, "tasks", 3):
        got = torch.func.functional_call(nets[0], stacked, (nets[0].stacked_input(xs),))
    want = torch.cat([net(x) for net, x in zip(nets, xs, strict=True)], 1)
    assert torch.allclose(got, want, atol=1e-12)


def test_under_bf16_autocast_stacking_stays_close_to_the_loop():
    tasks = [batch(seed) for seed in range(4)]
    torch.set_default_dtype(torch.float32)  # the float64 fixture restores it

    def grads(stack: int) -> torch.Tensor:
        learner = tiny_learner("maml", steps=2, stack_tasks=stack).float()
        floats = [replace(t, xs=t.xs.float(), xq=t.xq.float()) for t in tasks]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            learner.meta_backward(floats, 0)
        return torch.cat([p.grad.flatten() for p in learner.parameters() if p.grad is not None])

    want, got = grads(1), grads(4)
    assert torch.isfinite(got).all()
    assert (got - want).norm() <= 0.05 * want.norm()


def omniglot_like(ways: int, shots: int, size: int = 28, channels: int = 1) -> TaskBatch:
    ys = torch.arange(ways).repeat_interleave(shots)
    images = torch.zeros(len(ys), channels, size, size)
    return TaskBatch("t", "image", images, ys, images[:ways], torch.arange(ways))


@pytest.mark.parametrize("encoder, channels, ways, shots, size, steps, together", [
    ("conv4", 1, 5, 1, 28, 5, 8),  # Omniglot 5-way 1-shot: 8 tasks a pass
    ("conv4", 1, 5, 1, 28, 10, 4),  # as many tasks' inner loops stored together as 4 at 10 steps
    ("conv4", 1, 20, 1, 28, 1, 2),  # 20-way: 2
    ("conv4-32", 3, 5, 1, 84, 1, 2),  # mini-ImageNet-shaped 1-shot: 2
    ("conv4-32", 3, 5, 5, 84, 1, 0),  # 5-shot: the loop
])
def test_the_automatic_size_stacks_only_where_it_pays(encoder, channels, ways, shots, size, steps, together):
    learner = tiny_learner("maml", steps=steps)
    learner.model = MultiTaskModel(ModelConfig(image_encoder=encoder, image_channels=channels), ["image"])
    assert stacked_tasks.tasks_per_pass(learner, [omniglot_like(ways, shots, size, channels)] * 8) == together
    learner.inner = learner.inner.model_copy(update={"query_chunks": 3})  # memory first: the loop
    assert stacked_tasks.tasks_per_pass(learner, [omniglot_like(ways, shots, size, channels)] * 8) <= 1


def test_what_cannot_be_stacked_runs_the_loop_and_says_why_only_when_asked():
    tasks = [batch(0), batch(1, ways=4)]  # 3-way and 4-way tasks: no common shape
    want, _ = outer("maml", {}, tasks, stack_tasks=1)
    stacked_tasks._warned.clear()
    with pytest.warns(UserWarning, match="differ in ways"):
        got, _ = outer("maml", {}, tasks, stack_tasks=2)
    assert all(torch.equal(got[n], want[n]) for n in want)
    stacked_tasks._warned.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        learner = tiny_learner("maml")  # the automatic default: silent
        learner.meta_backward(tasks, 0)


def test_a_method_with_an_inner_step_of_its_own_keeps_it():
    tasks = [batch(0), batch(1)]
    learner = tiny_learner("maml", stack_tasks=2)
    seen = []

    class Own(type(learner)):
        def inner_step(self, *args, **kwargs):
            seen.append(1)
            return super().inner_step(*args, **kwargs)

    learner.__class__ = Own
    stacked_tasks._warned.clear()
    with pytest.warns(UserWarning, match="Own has an inner loop of its own"):
        learner.meta_backward(tasks, 0)
    assert len(seen) == 2
