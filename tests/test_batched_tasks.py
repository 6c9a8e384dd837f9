"""``inner.batch_tasks``: a meta-batch's tasks adapted in one vmapped pass give the loop's meta-gradient,
loss and accuracy, for every inner-loop variant it takes; the others fall back to the loop, saying why."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from tests.test_maml import batch, float64, tiny_learner  # noqa: F401

VARIANTS = [("maml", {"steps": 1}), ("maml", {"steps": 3}), ("fomaml", {"steps": 2}), ("metasgd", {"steps": 1}),
            ("anil", {"steps": 2}), ("maml", {"steps": 2, "adapt": "trunk+head"}),
            ("maml++", {"steps": 2, "per_step_bn_stats": False}),
            ("maml", {"steps": 2, "head_init": "proto"}), ("maml", {"steps": 1, "bn": "transductive"})]


def outer(method: str, inner: dict, tasks: list, **extra) -> tuple[dict[str, torch.Tensor], tuple[float, float]]:
    learner = tiny_learner(method, **inner, **extra)
    learner.zero_grad(set_to_none=True)
    result = learner.meta_backward(tasks, 3)
    return {n: p.grad.clone() for n, p in learner.named_parameters() if p.grad is not None}, result


@pytest.mark.parametrize("method, inner", VARIANTS, ids=[f"{m}-{'-'.join(map(str, i.values()))}" for m, i in VARIANTS])
def test_batched_tasks_give_the_loops_meta_gradient(method, inner):
    tasks = [batch(seed) for seed in range(3)]
    want, (want_loss, want_acc) = outer(method, inner, tasks)
    got, (loss, acc) = outer(method, inner, tasks, batch_tasks=2)  # a pass of 2 tasks, then one of 1
    assert got.keys() == want.keys() and want
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-12, rtol=1e-9), name
    assert loss == pytest.approx(want_loss, abs=1e-12) and acc == want_acc


def test_a_learned_head_per_training_task_is_batched_too():
    tasks = [batch(0), batch(1)]
    tasks[1] = replace(tasks[1], task="other")

    def grads(**extra) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        learner = tiny_learner("maml", head_init="learned", **extra)
        for name in ("toy", "other"):
            torch.nn.init.normal_(learner.model.add_head(name, 3).weight, std=0.1)
        learner.meta_backward(tasks, 0)
        return {n: p.grad for n, p in learner.named_parameters() if p.grad is not None}

    want, got = grads(), grads(batch_tasks=4)
    assert {"model.heads.toy.weight", "model.heads.other.weight"} <= want.keys()
    assert all(torch.allclose(got[n], want[n], atol=1e-12) for n in want)


def test_what_cannot_be_batched_runs_one_task_at_a_time_and_says_why():
    tasks = [batch(0), batch(1, ways=4)]  # 3-way and 4-way tasks: no common shape
    want, _ = outer("maml", {}, tasks)
    with pytest.warns(UserWarning, match="differ in ways"):
        got, _ = outer("maml", {}, tasks, batch_tasks=2)
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_the_cli_says_a_warning_in_one_line():
    import warnings

    import mtl.cli.common  # noqa: F401  (sets the format)

    line = warnings.formatwarning(UserWarning("inner.batch_tasks: adapting one task at a time: why"), UserWarning,
                                  "/x/inner.py", 396, "loss, acc = self.meta_backward(...)")
    assert line == "warning: inner.batch_tasks: adapting one task at a time: why\n"


def test_batched_tasks_under_bf16_autocast_agree_with_the_loop():
    torch.set_default_dtype(torch.float32)
    tasks = [replace(t, xs=t.xs.float(), xq=t.xq.float()) for t in (batch(0), batch(1))]
    exact = outer_grads(tiny_learner("maml", steps=2).float(), tasks, autocast=False)
    loop = outer_grads(tiny_learner("maml", steps=2).float(), tasks, autocast=True)
    batched = outer_grads(tiny_learner("maml", steps=2, batch_tasks=2).float(), tasks, autocast=True)

    def flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([grads[n].flatten() for n in sorted(exact)])

    assert all(g.dtype == torch.float32 for g in batched.values()) and batched.keys() == exact.keys()
    off = lambda g: float((flat(g) - flat(exact)).norm() / flat(exact).norm())  # noqa: E731
    assert off(batched) < max(2 * off(loop), 0.05), (off(batched), off(loop))


def outer_grads(learner, tasks, autocast: bool) -> dict[str, torch.Tensor]:
    learner.zero_grad(set_to_none=True)
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        learner.meta_backward(tasks, 0)
    return {n: p.grad.clone() for n, p in learner.named_parameters() if p.grad is not None}


def test_train_with_batched_tasks_follows_the_loops_run(tmp_path, run_cli):
    """``--set inner.batch_tasks=4`` through the CLI: the same losses as one task at a time (later
    iterations drift apart in fp32, as Adam's first steps magnify rounding; the float64 tests above are exact)."""
    from tests.test_cuda import synthetic_tasks

    torch.set_default_dtype(torch.float32)
    (tmp_path / "tasks").mkdir()
    tasks = synthetic_tasks(tmp_path / "tasks")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: maml\ntasks: [synth-train]\nval_tasks: []\nways: 5\nshots: 1\nqueries: 3\n"
                      "meta_batch: 4\niterations: 4\nval_every: 100\ninner: {steps: 2, lr: 0.4}\n"
                      "model: {image_encoder: conv4}\nprecision: fp32\nthreads: 1\n")
    losses = {}
    for together in (1, 4):
        out = tmp_path / f"run{together}"
        code, _, err = run_cli("train", "--config", recipe, "--out", out, "--device", "cpu", "--tasks-dir", tasks,
                               "--set", f"inner.batch_tasks={together}")
        assert code == 0, err
        losses[together] = [json.loads(row)["loss"] for row in (out / "metrics.jsonl").read_text().splitlines()
                            if "loss" in json.loads(row)]
    assert len(losses[1]) == 4 and losses[4][:2] == pytest.approx(losses[1][:2], rel=1e-4)
    assert losses[4] == pytest.approx(losses[1], rel=0.1)


def test_text_tasks_on_sentence_embeddings_are_batched_too():
    """A frozen sentence encoder's embeddings (CLINC150's recipe: trunk and Proto-MAML head adapt)."""
    from mtl.algorithms import InnerConfig, build_algorithm
    from mtl.data.stream import TaskBatch
    from mtl.models import ModelConfig, MultiTaskModel

    torch.set_default_dtype(torch.float32)
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat_interleave(3)
    tasks = [TaskBatch(f"t{i}", "text", torch.randn(12, 384, generator=g), labels, torch.randn(12, 384, generator=g),
                       labels) for i in range(3)]

    def grads(together: int) -> tuple[dict[str, torch.Tensor], tuple[float, float]]:
        torch.manual_seed(0)
        model = MultiTaskModel(ModelConfig(trunk=[32]), ["text"])
        learner = build_algorithm("maml", model, InnerConfig(steps=2, lr=0.1, adapt="trunk+head", head_init="proto",
                                                             batch_tasks=together))
        result = learner.meta_backward(tasks, 0)
        return {n: p.grad for n, p in learner.named_parameters() if p.grad is not None}, result

    (want, (want_loss, want_acc)), (got, (loss, acc)) = grads(1), grads(3)
    assert want.keys() == got.keys() and want
    assert all(torch.allclose(got[n], want[n], rtol=1e-4, atol=1e-6) for n in want)
    assert loss == pytest.approx(want_loss, rel=1e-5) and acc == want_acc
