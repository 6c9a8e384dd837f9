"""The algorithm registry: every method is listed and named by recipes; ProtoNet and Baseline++
compute what their papers define; an algorithm registered from a test file trains and adapts
without touching library code; adaptation never changes the loaded model."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

import mtl
from mtl.algorithms import ALGORITHMS, Algorithm, InnerConfig, algorithm, build_algorithm
from mtl.data.stream import TaskBatch
from mtl.errors import MtlError
from mtl.models import ConvEncoder, ModelConfig, MultiTaskModel
from mtl.run.compare import centroid_scores
from mtl.run.recipe import load_recipe
from tests.conftest import needs_data, write

EXPECTED = {"maml", "fomaml", "anil", "metasgd", "reptile", "maml++", "protonet", "baseline_pp", "multitask"}


def tiny(method: str, **inner) -> Algorithm:
    torch.manual_seed(0)
    model = MultiTaskModel(ModelConfig(), ["image"])
    model.encoders["image"] = ConvEncoder(1, hidden=8, depth=2)
    model.feature_dim = 8
    return build_algorithm(method, model, InnerConfig(**{"steps": 1, "lr": 0.5, **inner}))


def episode(seed: int = 0, ways: int = 4, shots: int = 3, queries: int = 5) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    means = torch.rand(ways, 1, 1, 1, generator=g)
    xs = (means.repeat_interleave(shots, 0) + 0.3 * torch.rand(ways * shots, 1, 12, 12, generator=g))
    xq = (means.repeat_interleave(queries, 0) + 0.3 * torch.rand(ways * queries, 1, 12, 12, generator=g))
    return TaskBatch("toy", "image", xs, torch.arange(ways).repeat_interleave(shots), xq,
                     torch.arange(ways).repeat_interleave(queries))


def test_every_method_is_registered_and_listed(run_cli):
    assert set(ALGORITHMS) >= EXPECTED
    code, out, _ = run_cli("algorithms")
    assert code == 0
    assert {line.split()[0] for line in out.splitlines()} >= EXPECTED


def test_a_recipe_naming_an_unknown_algorithm_is_one_line(tmp_path, run_cli):
    cfg = write(tmp_path / "r.yaml", "method: mamml\ntasks: [omniglot]\n")
    code, _, err = run_cli("train", "--config", cfg, "--out", tmp_path / "run")
    assert code == 2 and "unknown algorithm 'mamml'" in err and "protonet" in err
    assert len(err.strip().splitlines()) == 1


def test_protonet_classifies_by_the_nearest_prototype():
    learner = tiny("protonet")
    assert learner.inner.adapt == "head" and learner.inner.head_init == "proto" and learner.eval_steps == 0
    for seed in range(5):  # with no fine-tuning, its accuracy is exactly the nearest-centroid rule's
        b = episode(seed)
        assert learner.evaluate(b) == pytest.approx(centroid_scores(learner, b)[0])
    # training: the query loss of the prototypes, its gradient reaching the encoder
    learner.zero_grad()
    loss, _ = learner.meta_backward([episode(0)], 0)
    assert loss > 0 and learner.model.encoders["image"].blocks[0].weight.grad.abs().sum() > 0


def test_protonet_cycle_support_trains_on_every_turn_of_the_support_set():
    ways, shots, queries = 4, 2, 3
    b = episode(3, ways, shots, queries)
    plain, cycled = tiny("protonet"), tiny("protonet", cycle_support=True)
    # the loss it reports is the plain one, of the support set as drawn; its gradient, every turn's
    assert cycled.meta_backward([b], 0)[0] == pytest.approx(plain.meta_backward([b], 0)[0], rel=1e-5)
    cycled.zero_grad()
    cycled.meta_backward([b], 0)
    # by hand: each class's 5 examples in turn, 2 of them the support and 3 the queries, the distances
    # measured in features normalised with the drawn support set's statistics
    feats = cycled.episode_features({}, torch.cat([b.xs, b.xq]), "image", 0, len(b.ys))
    per = feats[torch.argsort(torch.cat([b.ys, b.yq]), stable=True)].view(ways, shots + queries, -1)
    losses = []
    for turn in range(shots + queries):
        held = [turn, (turn + 1) % (shots + queries)]
        rest = [i for i in range(shots + queries) if i not in held]
        q = per[:, rest].reshape(ways * queries, -1)
        logits = -torch.cdist(q, per[:, held].mean(1)) ** 2
        losses.append(torch.nn.functional.cross_entropy(logits, torch.arange(ways).repeat_interleave(queries)))
    w = cycled.model.encoders["image"].blocks[0].weight
    expected = torch.autograd.grad(torch.stack(losses).mean(), w, retain_graph=True)[0]
    assert w.grad is not None and torch.allclose(w.grad, expected, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(w.grad, torch.autograd.grad(losses[0], w)[0], rtol=1e-2)
    # episodes without as many examples of every class, and methods without prototypes, are refused
    with pytest.raises(MtlError, match="as many examples of every class"):
        cycled.meta_backward([dataclasses.replace(b, xq=b.xq[1:], yq=b.yq[1:])], 0)
    with pytest.raises(MtlError, match=r"does not train with inner\.cycle_support"):
        load_recipe({"method": "maml", "tasks": ["omniglot"], "inner": {"cycle_support": True}})


def test_a_prototype_head_answers_in_float32_under_bf16_autocast():
    # features far from the origin, classes close together: 2 f.c - |c|^2 rounded to bf16's 8-bit mantissa
    # picks the wrong class for 6 of these 20 queries; the head computes in float32 and picks the nearest
    g = torch.Generator().manual_seed(0)
    protos = (3 * torch.rand(1, 160, generator=g) + 0.1 * torch.randn(20, 160, generator=g)).bfloat16()
    queries = (protos.float() + 0.05 * torch.randn(20, 160, generator=g)).bfloat16()
    nearest = torch.cdist(queries.float(), protos.float()).argmin(1)
    learner = tiny("protonet")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rounded = queries @ (2 * protos).T - (protos * protos).sum(1)  # the head in bf16, as it was
        logits = learner.head_logits(queries, *learner.head_from_prototypes(protos))
    assert not torch.equal(rounded.argmax(1), nearest)
    assert logits.dtype == torch.float32 and torch.equal(logits.argmax(1), nearest)
    # float64 stays float64, for the finite-difference checks of the meta-gradient
    assert learner.head_logits(queries.double(), *learner.head_from_prototypes(protos.double())).dtype == torch.float64


def test_baseline_pp_heads_are_cosine_classifiers():
    learner = tiny("baseline_pp", adapt="head")
    b = episode(1)
    _, fast, logits = learner.adapt(b, 0, create_graph=False, detach=True)
    assert logits is not None and float(logits.detach().abs().max()) <= learner.scale + 1e-5  # scale * cosine
    feats = learner.episode_features({}, torch.cat([b.xs, b.xq]), "image", 0, len(b.ys))[len(b.ys):]
    expected = learner.scale * torch.nn.functional.cosine_similarity(feats[:, None], fast["head.weight"][None], dim=-1)
    assert torch.allclose(logits, expected, atol=1e-5)


def test_adapting_never_changes_the_loaded_model():
    learner = tiny("metasgd", steps=2)
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    inner = learner.inner.model_copy()
    for lr in (None, 0.1):
        learner.evaluate(episode(2), steps=3, lr=lr, head_init="zero")
    assert learner.inner == inner and set(learner.lrs) and all(
        torch.equal(v, before[k]) for k, v in learner.state_dict().items())


@algorithm("test-fixed-step")
class FixedStep(Algorithm):
    """A toy first-order method defined in this test file: one fixed inner step size, whatever the recipe."""

    def inner_lr(self, name: str, step: int, lr: float | None = None) -> float:
        return 0.05 if lr is None else lr


@needs_data
def test_an_algorithm_registered_from_a_test_file_trains_and_adapts(tmp_path, registry):
    run = mtl.train({"tasks": ["omniglot"], "val_tasks": ["omniglot"], "queries": 3, "meta_batch": 2,
                     "val_episodes": 4, "threads": 2, "device": "cpu"}, tmp_path / "run", method="test-fixed-step",
                    iterations=4, val_every=4, registry=registry)
    assert run["algorithm"] == "test-fixed-step" and run["best_val_accuracy"] > 0
    meta = json.loads((tmp_path / "run" / "best.json").read_text())
    assert meta["recipe"]["method"] == "test-fixed-step"
    model = mtl.adapt(tmp_path / "run", task="omniglot-angelic", shots=1, registry=registry)
    assert model.meta["algorithm"] == "test-fixed-step" and model.meta["test_accuracy"] is not None
    assert np.isfinite(model.predict_proba(registry.load("omniglot-angelic").test.inputs[:3])).all()


def test_choosing_the_adaptation_setting_stops_at_its_time_budget():
    """After training, only the method's own setting is scored once the time for the choice is spent
    (an inner loop through a whole transformer makes every candidate cost minutes)."""
    from mtl.run.select import candidates, choose

    learner = tiny("maml")
    options = candidates(learner)
    assert len(options) > 1
    best, scores = choose(learner, [episode(0)], options, seconds=0.0)
    assert best == options[0] and len(scores) == 1
    assert len(choose(learner, [episode(0)], options)[1]) == len(options)
