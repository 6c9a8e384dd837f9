"""Feature whitening (`cli.py whiten`): the matrix's algebra, and a checkpoint whitened end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from mtl.run.evaluate import evaluate
from mtl.run.learner import load_learner
from mtl.run.recipe import load_recipe
from mtl.run.trainer import Trainer
from mtl.run.whitening import whiten, whitening_matrix
from tests.conftest import needs_data

ROOT = Path(__file__).parents[1]


def test_whitening_matrix_makes_the_covariance_isotropic_at_its_mean_variance():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=g, dtype=torch.float64)
    cov = a @ a.T + 0.1 * torch.eye(6, dtype=torch.float64)
    scale = torch.trace(cov) / 6
    w = whitening_matrix(cov, 0.0).double()
    assert torch.allclose(w, w.T, atol=1e-6)
    assert torch.allclose(w @ cov @ w, scale * torch.eye(6, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(whitening_matrix(cov, 1.0), torch.eye(6), atol=1e-6)  # features left as they are
    half = whitening_matrix(cov, 0.5).double()  # in between: less spread than `cov`, more than isotropic
    spread = torch.linalg.eigvalsh(half @ cov @ half)
    assert torch.linalg.eigvalsh(cov)[-1] / torch.linalg.eigvalsh(cov)[0] > spread[-1] / spread[0] > 1.01


@needs_data
def test_a_whitened_checkpoint_answers_through_whitened_features(tmp_path, registry, run_cli):
    doc = {"method": "protonet", "tasks": ["digits"], "val_tasks": [], "ways": 5, "shots": 1, "queries": 5,
           "meta_batch": 2, "iterations": 4, "threads": 2, "device": "cpu", "choose_adaptation": False}
    run = tmp_path / "run"
    Trainer(load_recipe(None, doc), run, registry).run()
    before = evaluate(run, "digits", ways=5, shots=1, episodes=6, registry=registry)

    code, out, _ = run_cli("whiten", "--checkpoint", run, "--shrink", "1", "--episodes", "4", "--views", "1", "--json")
    assert code == 0 and '"shrink": 1.0' in out
    assert evaluate(run, "digits", ways=5, shots=1, episodes=6, registry=registry)["accuracy"] == before["accuracy"]

    info = whiten(run, shrink=0.3, episodes=6, views=4, registry=registry)
    learner, meta = load_learner(Path(info["checkpoint"]), torch.device("cpu"))
    assert meta["recipe"]["model"]["feature_whitening"] == 0.3
    assert meta["whitening"] == {"tasks": ["digits"], "shrink": 0.3, "episodes": 6, "views": 4, "within_groups": 0.0}
    w = learner.model.whitening.clone()
    assert not torch.allclose(w, torch.eye(len(w)), atol=1e-3) and torch.allclose(w, w.T, atol=1e-5)
    x = torch.as_tensor(registry.load("digits").test.inputs[:10])
    params = dict(learner.model.named_parameters())
    with torch.no_grad():
        whitened = learner.episode_features(params, x, "image", 0, len(x))
        learner.model.whitening.copy_(torch.eye(len(w)))
        plain = learner.episode_features(params, x, "image", 0, len(x))
    assert torch.allclose(whitened, plain @ w, atol=1e-4)

    again = whiten(run, shrink=0.3, episodes=6, views=4, registry=registry)  # from the unwhitened features again
    assert torch.allclose(load_learner(Path(again["checkpoint"]), torch.device("cpu"))[0].model.whitening, w)
    assert 0.2 < evaluate(run, "digits", ways=5, shots=1, episodes=6, registry=registry)["accuracy"] <= 1.0

    for bad in (("--shrink", "2"), ("--within-groups", "-1"), ("--views", "3"), ("--episodes", "0")):
        code, _, err = run_cli("whiten", "--checkpoint", run, *bad)
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, (bad, err)


def test_a_checkpoint_trained_on_a_users_task_folder_finds_its_tasks_there(tmp_path, run_cli):
    """`train --tasks-dir` records the folder (absolute) in the checkpoint's recipe; `whiten`, `evaluate`, `adapt`
    and `compare` look there too, so a user's own tasks need not be named again."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "task.yaml").write_text((ROOT / "tasks" / "vision" / "digits.yaml").read_text().replace(
        "name: digits", "name: my-digits").replace("role: held_out", "role: meta_train"))
    (folder / "recipe.yaml").write_text("method: protonet\ntasks: [my-digits]\nval_tasks: []\nways: 5\nshots: 1\n"
                                        "queries: 5\nmeta_batch: 2\niterations: 2\nchoose_adaptation: false\n")
    code, _, err = run_cli("train", "--config", folder / "recipe.yaml", "--tasks-dir", folder, "--out", tmp_path / "r")
    assert code == 0, err
    code, out, err = run_cli("whiten", "--checkpoint", tmp_path / "r", "--episodes", "2", "--views", "1", "--json")
    assert code == 0 and '"tasks": ["my-digits"]' in out, err
    code, out, err = run_cli("evaluate", "--checkpoint", tmp_path / "r", "--task", "my-digits", "--episodes", "2")
    assert code == 0 and "my-digits (test) 5-way 1-shot over 2 episodes" in out, err
    code, out, err = run_cli("adapt", "--checkpoint", tmp_path / "r", "--task", "my-digits", "--shots", "1",
                             "--views", "1", "--out", tmp_path / "m")
    assert code == 0 and "adapted to my-digits" in out, err
    code, out, err = run_cli("compare", "--checkpoints", f"protonet={tmp_path / 'r'}", "--tasks", "my-digits",
                             "--shots", "1", "--episodes", "2", "--methods", "protonet", "--out", tmp_path / "c")
    assert code == 0 and "my-digits" in out, err
    import mtl  # the same from Python: one folder as a str

    mtl.train(folder / "recipe.yaml", tmp_path / "r2", tasks_dirs=str(folder), iterations=1)
    assert mtl.evaluate(tmp_path / "r2", "my-digits", ways=5, shots=1, episodes=2)["episodes"] == 2


@pytest.mark.parametrize("shrink", [0.0, 0.5])
def test_whitening_keeps_the_mean_variance(shrink):
    cov = torch.diag(torch.tensor([4.0, 1.0, 0.25], dtype=torch.float64))
    w = whitening_matrix(cov, shrink).double()
    assert torch.trace(w @ cov @ w) == pytest.approx(float(torch.trace(cov)), rel=0.35)


@needs_data
def test_a_recipe_that_whitens_ends_with_the_checkpoint_whiten_would_write(tmp_path, registry, run_cli):
    doc = {"method": "protonet", "tasks": ["digits"], "val_tasks": [], "ways": 5, "shots": 1, "queries": 5,
           "meta_batch": 2, "iterations": 3, "threads": 2, "device": "cpu", "choose_adaptation": False,
           "whiten": {"shrink": 0.3, "episodes": 6, "views": 4}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(doc))
    run = tmp_path / "run"
    code, out, err = run_cli("train", "--config", tmp_path / "r.yaml", "--out", run,
                             "--set", "whiten.within_groups=0.5")
    assert code == 0, err
    assert "whitened" in out and "within-class covariance of 6 episodes of digits, shrunk 0.3" in out
    learner, meta = load_learner(run / "best.safetensors", torch.device("cpu"))
    assert meta["whitening"] == {"tasks": ["digits"], "shrink": 0.3, "episodes": 6, "views": 4, "within_groups": 0.5}
    w = learner.model.whitening.clone()
    assert not torch.allclose(w, torch.eye(len(w)), atol=1e-3)
    whiten(run, shrink=0.3, episodes=6, views=4, within_groups=0.5, registry=registry)  # by hand, once more
    assert torch.allclose(load_learner(run / "best.safetensors", torch.device("cpu"))[0].model.whitening, w)


@pytest.mark.parametrize(("change", "says"), [
    ({"whiten": {"views": 3}}, "whiten.views"),
    ({"whiten": {"shrink": 2}}, "whiten.shrink"),
    ({"method": "maml", "whiten": {}}, "prototypes"),
])
def test_a_recipe_whose_whitening_cannot_run_is_refused_before_training(change, says):
    from mtl.errors import MtlError

    with pytest.raises(MtlError, match=says):
        load_recipe(None, {"method": "protonet", "tasks": ["digits"], **change})


def test_a_recipes_whitening_is_switched_on_and_off_from_the_command_line():
    lake = Path(__file__).parents[1] / "configs" / "omniglot_lake_50min.yaml"
    assert load_recipe(lake).whiten.within_groups == 1
    assert load_recipe(lake, {"whiten": False}).whiten is None
    assert load_recipe(lake, {"whiten.shrink": 0.3}).whiten.shrink == 0.3
    assert load_recipe(None, {"method": "protonet", "tasks": ["digits"], "whiten": True}).whiten.views == 8
