"""The views of an image episode share the batch-norm statistics of its support set in all views, in `adapt`
and `evaluate` alike; each view's own statistics on request (`--own-norms`)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from mtl.data.stream import TaskBatch
from mtl.data.views import answered, turned
from mtl.models.batchnorm import EpisodicBatchNorm2d, calibrate_batchnorm
from mtl.run.adapt import fit
from mtl.run.adapted import AdaptedModel, model_inputs
from mtl.run.learner import build_learner
from mtl.run.recipe import load_recipe
from mtl.run.support import support_from_task
from mtl.run.view_norms import episode_shared, shares, view_statistics

ROOT = Path(__file__).parents[1]


def learner_for(**overrides):
    torch.manual_seed(0)
    return build_learner(load_recipe(ROOT / "configs" / "quickstart.yaml", overrides), ["image"], {})


def norms(model: torch.nn.Module) -> dict[str, EpisodicBatchNorm2d]:
    return {n: m for n, m in model.named_modules() if isinstance(m, EpisodicBatchNorm2d)}


def test_view_statistics_are_the_batch_statistics_of_all_views():
    """Each layer's statistics over the support images in all 8 turns, the layer below normalised with its own:
    what a training-mode pass over the 8 views together computes; the model is left as it was."""
    learner = learner_for()
    learner.model.eval()
    xs = torch.rand(6, 28, 28)
    rows = view_statistics(learner, xs, 8)
    whole = copy.deepcopy(learner.model)
    calibrate_batchnorm(whole, lambda: whole.encoders["image"](torch.cat([turned(xs, v) for v in range(8)])))
    assert rows.keys() == norms(whole).keys() and len(rows) >= 4
    for name, m in norms(whole).items():
        torch.testing.assert_close(rows[name][0], m.running_mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(rows[name][1], m.running_var, rtol=1e-4, atol=1e-5)
    alone = view_statistics(learner, xs, 1)
    last = list(rows)[-1]
    assert not torch.allclose(alone[last][0], rows[last][0])  # one view's statistics are not the pooled ones
    assert not learner.model.training
    assert all(m.step_stats is None and m.momentum_of_steps == 0.1 for m in norms(learner.model).values())


def test_views_of_images_that_are_not_square_pool_both_shapes():
    """Turned by 90 degrees, a 20 x 30 image is 30 x 20: each shape's four views pass apart, and the first batch
    norm's statistics are those of all eight views' inputs."""
    learner = learner_for()
    xs = torch.rand(4, 20, 30)
    rows = view_statistics(learner, xs, 8)
    first = next(iter(rows))
    inputs = []
    handle = norms(learner.model)[first].register_forward_pre_hook(lambda m, i: inputs.append(i[0].float()))
    with torch.no_grad():
        for views in ([0, 2, 4, 6], [1, 3, 5, 7]):
            learner.model.encoders["image"](torch.cat([turned(xs, v) for v in views]))
    handle.remove()
    pixels = torch.cat([x.permute(1, 0, 2, 3).flatten(1) for x in inputs], 1)
    torch.testing.assert_close(rows[first][0], pixels.mean(1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rows[first][1], pixels.var(1, unbiased=False), rtol=1e-3, atol=1e-5)


def test_adapted_views_share_the_statistics_and_answer_as_evaluate_does(registry):
    """`adapt`'s 8 adapted networks keep the support set's statistics in all views; the adapted model answers as
    `evaluate --views 8` answers an episode of the same support set; `--own-norms` keeps each view's own."""
    learner = learner_for()
    task = registry.load("digits")
    support = support_from_task(task, 2, 0)
    shared = fit(learner, support, views=8)
    own = fit(learner, support, views=8, shared_norms=False)
    assert shared.meta["shared_norms"] and not own.meta["shared_norms"]
    first = next(iter(norms(shared.model)))
    means = [norms(m)[first].running_mean for m in [shared.model, *shared.views]]
    assert all(torch.equal(means[0], m) for m in means[1:])
    own_means = [norms(m)[first].running_mean for m in [own.model, *own.views]]
    assert not torch.allclose(own_means[0], own_means[2])  # turned by 180 degrees: other statistics
    x = task.test.inputs[:12]
    z = shared.outputs(x)[0]
    s = shared.meta["selection"]
    xs = model_inputs(support.inputs, learner.model, "image", torch.device("cpu"))
    b = TaskBatch("digits", "image", xs, torch.as_tensor(support.labels), torch.as_tensor(x), torch.zeros(12))
    with episode_shared(learner, xs, 8, True):
        expected = answered(lambda e: learner.query_logits_after(e, s["steps"], s.get("lr"), s.get("head_init")), b, 8)
    np.testing.assert_allclose(z, expected.detach().numpy(), rtol=1e-3, atol=1e-3)
    assert not np.allclose(z, own.outputs(x)[0], atol=1e-3)


def test_saved_model_keeps_the_shared_statistics(registry, tmp_path):
    learner = learner_for()
    task = registry.load("digits")
    m = fit(learner, support_from_task(task, 1, 0), views=4)
    m.save(tmp_path / "m")
    loaded = AdaptedModel.load(tmp_path / "m")
    x = task.test.inputs[:8]
    np.testing.assert_allclose(loaded.outputs(x)[0], m.outputs(x)[0], rtol=1e-5, atol=1e-5)
    assert loaded.meta["shared_norms"]


@pytest.mark.parametrize("views", [1, 8])
def test_what_shares(views):
    assert shares(learner_for(), views) == (views > 1)
    per_step = learner_for(method="maml", inner={"steps": 1, "per_step_bn_stats": True})
    assert not shares(per_step, views)  # MAML++'s per-step running statistics stay theirs
    maml = learner_for(method="maml", inner={"steps": 1, "adapt": "all"})
    assert not shares(maml, views, steps=3)  # steps that change the encoder need its batch statistics
    assert shares(maml, views, steps=0) == (views > 1)
    head_only = learner_for(method="maml", inner={"steps": 1, "adapt": "trunk+head"})
    assert shares(head_only, views, steps=3) == (views > 1)
