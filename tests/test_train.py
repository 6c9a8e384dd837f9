"""Training end to end on real data: learns, checkpoints round-trip, resume equals an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from mtl.errors import MtlError
from mtl.run.checkpoint import load_checkpoint
from mtl.run.learner import load_learner
from mtl.run.recipe import load_recipe
from mtl.run.run_control import RunInterrupted, RunLock
from mtl.run.trainer import Trainer, train
from tests.conftest import needs_data

pytestmark = needs_data

SMALL = {"tasks": ["omniglot"], "val_tasks": ["omniglot"], "ways": 5, "shots": 1, "queries": 5, "meta_batch": 4,
         "outer_lr": 0.003, "inner": {"steps": 1, "lr": 0.4}, "val_episodes": 40, "threads": 2, "device": "cpu",
         "choose_adaptation": False}  # tested once, on the `trained` run


def recipe(**over):
    doc = json.loads(json.dumps(SMALL))
    doc.update(over)
    return load_recipe(None, doc)


def params(path: Path) -> dict[str, torch.Tensor]:
    tensors, _ = load_checkpoint(path)
    return {k: v for k, v in tensors.items() if k.startswith("learner.")}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, registry) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("run")
    result = Trainer(recipe(iterations=60, val_every=30, choose_adaptation=True), out, registry).run()
    return out, result


def test_short_meta_training_beats_chance_by_a_wide_margin(trained, registry):
    out, result = trained
    assert result["best_val_accuracy"] > 0.4  # 5-way: chance is 0.2
    learner, _ = load_learner(out, torch.device("cpu"))
    from mtl.data.stream import EpisodeStream

    stream = EpisodeStream([registry.load("omniglot")], "test", 5, 1, 5, 123, torch.device("cpu"))
    accs = [learner.evaluate(b) for b in stream.fixed(40)]
    assert sum(accs) / len(accs) > 0.4  # held-out characters
    for name in ("best.safetensors", "last.safetensors", "best.json", "metrics.jsonl", "curve.png", "recipe.yaml"):
        assert (out / name).exists(), name
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 60 and "val_accuracy" in rows[29] and "val_accuracy" in rows[59]


def test_checkpoint_round_trips_exactly(trained, tmp_path):
    out, _ = trained
    learner, meta = load_learner(out / "last.safetensors", torch.device("cpu"))
    saved = params(out / "last.safetensors")
    for k, v in learner.state_dict().items():
        assert torch.equal(saved[f"learner.{k}"], v)
    assert meta["tasks"]["omniglot"]["classes"][0] == "Alphabet_of_the_Magi/character01"
    assert "torch" in meta["versions"] and meta["recipe"]["method"] == "maml"


def test_resume_after_interruption_equals_an_uninterrupted_run(tmp_path, registry):
    full = tmp_path / "full"
    Trainer(recipe(iterations=6, val_every=3, val_episodes=4), full, registry).run()
    part = tmp_path / "part"
    Trainer(recipe(iterations=3, val_every=3, val_episodes=4), part, registry).run()
    Trainer(recipe(iterations=6, val_every=3, val_episodes=4), part, registry).run(resume=True)
    a, b = params(full / "last.safetensors"), params(part / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = (part / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["iteration"] for r in rows] == list(range(6))


def test_a_run_killed_between_validations_resumes_from_its_timed_checkpoint(tmp_path, registry):
    """`save_every_minutes` writes last.safetensors between validations (here after every iteration), so a run
    killed long before its first validation resumes where it was, as if never stopped."""
    over = {"val_every": 1000, "val_episodes": 4, "save_every_minutes": 1e-9}
    Trainer(recipe(iterations=6, **over), tmp_path / "full", registry).run()

    def kill(row: dict) -> None:
        if row["iteration"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(recipe(iterations=6, **over), tmp_path / "part", registry).run(on_step=kill)
    assert load_checkpoint(tmp_path / "part" / "last.safetensors")[1]["iteration"] == 3
    Trainer(recipe(iterations=6, **over), tmp_path / "part", registry).run(resume=True)
    a, b = params(tmp_path / "full" / "last.safetensors"), params(tmp_path / "part" / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_stops_at_the_iterations_end_saved_for_resume(tmp_path, registry, signum, run_cli,
                                                                         monkeypatch):
    """The first Ctrl-C (or a cluster's SIGTERM) ends the run after the iteration it lands in, with that
    iteration saved and its metrics row written, long before any validation or timed save; --resume then goes
    on as if never stopped. The command line says where it saved, and exits with 130."""
    over, before = {"val_every": 1000, "val_episodes": 4}, signal.getsignal(signum)
    Trainer(recipe(iterations=6, **over), tmp_path / "full", registry).run()

    def signal_at_3(row: dict) -> None:
        if row["iteration"] == 2:  # after the third iteration's check: the fourth is the last
            os.kill(os.getpid(), signum)

    with pytest.raises(RunInterrupted, match=r"interrupted after iteration 4 of 6: saved .*--resume"):
        Trainer(recipe(iterations=6, **over), tmp_path / "part", registry).run(on_step=signal_at_3)
    assert load_checkpoint(tmp_path / "part" / "last.safetensors")[1]["iteration"] == 3
    assert signal.getsignal(signum) == before and not (tmp_path / "part" / ".lock").exists()  # handler given back
    Trainer(recipe(iterations=6, **over), tmp_path / "part", registry).run(resume=True)
    a, b = params(tmp_path / "full" / "last.safetensors"), params(tmp_path / "part" / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["iteration"] for r in rows] == list(range(6))
    step = Trainer.step

    def step_then_signal(self: Trainer, it: int) -> tuple[float, float]:
        if it == 1:
            os.kill(os.getpid(), signum)
        return step(self, it)

    monkeypatch.setattr(Trainer, "step", step_then_signal)
    (tmp_path / "recipe.yaml").write_text(json.dumps({**SMALL, "iterations": 6, **over}))
    code, _, err = run_cli("train", "--config", tmp_path / "recipe.yaml", "--out", tmp_path / "cli")
    assert code == 130 and "interrupted after iteration 2 of 6: saved" in err, err


def test_same_seed_same_result(tmp_path, registry):
    runs = []
    for name in ("a", "b"):
        Trainer(recipe(iterations=2, val_every=2, val_episodes=2), tmp_path / name, registry).run()
        runs.append(params(tmp_path / name / "last.safetensors"))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_refuses_to_overwrite_or_share_a_run_folder(tmp_path, registry, trained):
    out, _ = trained
    with pytest.raises(MtlError, match="already holds a run"):
        Trainer(recipe(iterations=2), out, registry).run()
    with RunLock(tmp_path / "locked"), pytest.raises(MtlError, match="another run"):
        Trainer(recipe(iterations=2), tmp_path / "locked", registry).run()
    (tmp_path / "a_file").write_text("")
    with pytest.raises(MtlError, match=r"is a file\. Fix: give a folder for the run"):
        train(recipe(iterations=2), tmp_path / "a_file", registry=registry)


def test_resuming_a_run_killed_before_its_first_save_begins_it_again(tmp_path, registry):
    """Killed before it saved anything (its metrics logged, no checkpoint): without --resume the folder "holds a
    run", so --resume begins it again instead of saying there is nothing to resume."""
    out = tmp_path / "killed"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"iteration": 0, "loss": 1.0}\n{"iteration": 1, "loss": 0.9}\n')
    with pytest.raises(MtlError, match="already holds a run"):
        Trainer(recipe(iterations=2, val_every=2, val_episodes=2), out, registry).run()
    with pytest.warns(UserWarning, match="stopped before it saved anything: starting from the first iteration"):
        Trainer(recipe(iterations=2, val_every=2, val_episodes=2), out, registry).run(resume=True)
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1] and "accuracy" in rows[0]


def test_nan_loss_stops_with_the_step_and_keeps_the_checkpoint(tmp_path, registry):
    out = tmp_path / "nan"
    Trainer(recipe(iterations=2, val_every=2, val_episodes=2), out, registry).run()
    before = (out / "last.safetensors").read_bytes()
    with pytest.raises(MtlError, match=r"became (nan|inf) at iteration [23].*lower outer_lr or inner.lr"):
        _resume_with_lr(out, registry)
    assert (out / "last.safetensors").read_bytes() == before


def _resume_with_lr(out: Path, registry) -> None:
    trainer = Trainer(recipe(iterations=4, val_every=2, val_episodes=2), out, registry).setup()
    trainer.learner.inner = trainer.learner.inner.model_copy(update={"lr": 1e30})
    trainer.run(resume=True)


@pytest.mark.parametrize("method,inner", [("fomaml", {}), ("fomaml", {"head_init": "proto"}), ("anil", {}),
                                          ("metasgd", {}), ("reptile", {"steps": 2}), ("protonet", {}),
                                          ("protonet", {"cycle_support": True}), ("baseline_pp", {}),
                                          ("multitask", {}), ("maml++", {"steps": 2}),
                                          ("maml", {"steps": 2, "msl": True, "lslr": True, "per_step_bn": True,
                                                    "per_step_bn_stats": True, "second_order_from": 1})])
def test_every_method_trains_and_improves(tmp_path, registry, method, inner):
    """Every registered method trains, its validation accuracy rises above the same untrained model's
    on the same episodes, and its checkpoint adapts to a new task."""
    out = tmp_path / method
    joint: dict = {"iterations": 16, "val_every": 16}
    if method in ("multitask", "baseline_pp"):  # joint training over tens of classes, not thousands
        joint = {"tasks": [n for n in registry.names(role="meta_train") if n.startswith("omniglot-")][:6],
                 "iterations": 40, "val_every": 40}
    if method == "maml++":  # per-step batch norm to learn as well: +0.02-0.03 after 16 iterations, +0.04 after 24
        joint = {"iterations": 24, "val_every": 24}
    r = recipe(method=method, val_episodes=20, cosine=True,
               inner={"steps": 1, "lr": 0.4, **inner}, **joint)
    untrained = Trainer(r, tmp_path / "untrained", registry).setup()
    before = untrained.validate()[0]
    result = Trainer(r, out, registry).run()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] == r["loss"] for r in rows)  # finite
    assert rows[-1]["lr"] < rows[0]["lr"]  # cosine annealing
    assert result["best_val_accuracy"] > before + 0.02, (before, result["best_val_accuracy"])
    learner, _ = load_learner(out, torch.device("cpu"))
    from mtl.run.adapt import adapt
    from mtl.run.adapted import AdaptedModel

    res = adapt(learner, registry.load("omniglot-angelic"), out=tmp_path / "m", shots=1)
    model = AdaptedModel.load(tmp_path / "m")
    assert model.meta["algorithm"] == method
    # a held-out alphabet, 20-way 1-shot: well above chance (0.05; n = 100)
    assert res.meta["test_accuracy"] is not None and res.meta["test_accuracy"] > 0.15
    if inner.get("per_step_bn_stats"):  # an adapted model keeps the last step's statistics; predict uses them
        norm = next(m for n, m in model.model.named_modules() if n.endswith("blocks.1"))
        last = learner.step_stats(res.meta["steps"])["encoders.image.blocks.1"][0]  # 0: the logistic head's
        assert torch.equal(norm.running_mean, last)


def test_mixed_text_and_image_meta_batches(tmp_path, registry):
    from pathlib import Path as _P

    # two of the recipe's text tasks: embedding SNIPS and TREC on a cold cache took most of a minute
    r = load_recipe(_P(__file__).parents[1] / "configs" / "mixed.yaml",
                    {"iterations": 4, "val_every": 2, "val_episodes": 4, "device": "cpu",
                     "tasks": ["omniglot", "clinc150-banking", "clinc150-home"]})
    trainer = Trainer(r, tmp_path / "mixed", registry).setup()
    assert set(trainer.learner.model.encoders) == {"image", "text"}
    modalities = {b.modality for it in range(4) for b in trainer.source.meta_batch(it, r.meta_batch)}
    assert modalities == {"image", "text"}
    result = trainer.run()
    assert result["best_val_accuracy"] > 0.2


def test_adapt_chooses_its_steps_and_step_size_without_test_data(trained, registry):
    """Training stores the settings chosen on validation episodes; adapt uses them for 1 shot and
    chooses by cross-validation on the support set from 2 shots (for images a logistic-regression head
    unless beaten beyond the noise), and says which and why."""
    from mtl.run.adapt import adapt

    out, _ = trained
    stored = json.loads((out / "best.json").read_text())["adaptation"]
    assert stored["by"] == "meta-validation" and stored["steps"] >= 1 and len(stored["scores"]) >= 2
    one = adapt(out, "omniglot-angelic", shots=1, registry=registry)  # for images, a logistic-regression head
    assert one.meta["selection"]["by"] == "the image default at 1 shot per class"
    assert one.meta["selection"]["head_init"] == "logistic"  # at the temperature fitted for it on validation
    assert one.meta["calibration"]["temperature"] == stored["logistic_temperature"] != stored["temperature"]
    five = adapt(out, "mnist", shots=5, registry=registry)
    sel = five.meta["selection"]
    assert sel["by"] == "3-fold cross-validation on the support set" and len(sel["scores"]) >= 4
    scores = sel["scores"]
    if sel["head_init"] == "logistic":  # the image default, kept unless beaten beyond the folds' noise
        p = scores["0@logistic"]
        assert max(scores.values()) - p <= (max(p * (1 - p), 1e-4) / 50) ** 0.5  # 50 held-out examples
    else:
        chosen = f"{sel['steps']}@{'learned' if sel['lr'] is None else format(sel['lr'], 'g')}"
        assert max(scores.values()) == scores[chosen]
    given = adapt(out, "mnist", shots=5, steps=2, lr=0.1, registry=registry)
    assert given.meta["selection"]["by"] == "given" and (given.meta["steps"], given.meta["lr"]) == (2, 0.1)


def test_a_model_reads_every_image_task_as_it_was_trained(tmp_path, registry, monkeypatch):
    """`model.image_size` and `model.image_fit_content` decode the training tasks so, and the checkpoint
    meets every task (evaluate, adapt, and predict through the adapted model) so too, whatever the task
    file says."""
    from PIL import Image

    import mtl.data.registry as registry_module
    from mtl.data.images import fit_to_content
    from mtl.data.registry import Registry
    from mtl.data.task import read_as
    from mtl.run.adapt import adapt
    from mtl.run.compare import compare
    from mtl.run.evaluate import evaluate

    assert registry.load("digits").train.inputs.shape[1:] == (28, 28)  # the task file's size
    r = recipe(method="protonet", tasks=["digits"], val_tasks=["digits"], iterations=2, val_every=2, val_episodes=2,
               model={"image_size": 16, "image_fit_content": True})
    trainer = Trainer(r, tmp_path / "run", registry).setup()
    assert {t.train.inputs.shape[1:] for t in trainer.source.tasks} == {(16, 16)}
    assert trainer.source.tasks[0].spec.image_options.fit_content
    assert trainer.val is not None and trainer.val.tasks[0].test.inputs.shape[1:] == (16, 16)
    trainer.run()
    seen = []
    real = registry_module.read_as
    monkeypatch.setattr(registry_module, "read_as", lambda t, r: seen.append(real(t, r)) or seen[-1])
    result = evaluate(tmp_path / "run", registry.load("digits"), ways=5, shots=1, episodes=2)  # a Task
    assert seen[0].test.inputs.shape[1:] == (16, 16) and result["accuracy"] > 0.2
    fresh = Registry()
    evaluate(tmp_path / "run", "digits", ways=5, shots=1, episodes=2, registry=fresh)  # a name
    assert list(fresh._loaded) == [("digits", ("fit_content", True), ("size", 16))]
    model = adapt(tmp_path / "run", "digits", shots=2, registry=registry, out=tmp_path / "adapted")
    assert model.meta["image"]["size"] == 16 and model.meta["image"]["fit_content"]  # how predict reads files
    png = tmp_path / "digit.png"
    digit = registry.load("digits").test.inputs[0]
    Image.fromarray(digit).save(png)
    images, _, _ = model.load_inputs([str(png)])
    expected = np.asarray(fit_to_content(Image.fromarray(digit), (16, 16)).resize((16, 16), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(images[0], expected)
    assert model.predict(images).shape == (1,)
    test = read_as(registry.load("digits"), {"size": 20}).test  # arrays are taken as they are: files too
    mine = adapt(tmp_path / "run", (list(test.inputs[:40]), [str(v) for v in test.labels[:40]]))
    assert mine.meta["image"]["size"] == 20 and mine.load_inputs([str(png)])[0].shape[1:] == (20, 20)
    Trainer(recipe(method="protonet", tasks=["digits"], iterations=1, val_tasks=[]), tmp_path / "at28", registry).run()
    with pytest.raises(MtlError, match="read images differently"):  # one set of episodes serves them all
        compare(["digits"], [1], 2, {"a": tmp_path / "run", "b": tmp_path / "at28"}, methods=["a", "b"],
                registry=registry)


def test_cosine_anneals_over_the_time_budget_when_it_ends_first(tmp_path):
    """A time-limited run must still end at the low learning rate, whatever its iteration count."""
    trainer = Trainer(recipe(cosine=True, outer_lr=0.01, min_outer_lr=0.0, iterations=100_000, time_limit_minutes=1),
                      tmp_path)
    assert trainer.lr_at(0) == pytest.approx(0.01)
    trainer.elapsed = 30.0  # half the budget, a tiny fraction of the iterations
    assert trainer.lr_at(10) == pytest.approx(0.005)
    trainer.elapsed = 75.0
    assert trainer.lr_at(20) == pytest.approx(0.0)
    trainer.elapsed = 0.0  # iterations still count when they run out first
    assert trainer.lr_at(50_000) == pytest.approx(0.005)


def test_a_recipe_draws_its_share_of_episodes_within_one_alphabet(registry, tmp_path):
    """``within_groups`` reaches the training episodes (the omniglot task's classes are ``Alphabet/character``)
    and nothing else; a share outside [0, 1] is refused with the field's name."""
    trainer = Trainer(recipe(within_groups=1.0), tmp_path / "run", registry).setup()
    sampler = trainer.source.samplers[0]
    assert sampler.within_groups == 1.0 and len(sampler._groups) > 20  # Omniglot's training alphabets
    assert all(len({c.split("/")[0] for c in sampler.sample(i).classes}) == 1 for i in range(5))
    assert trainer.val is not None and trainer.val.samplers[0].within_groups == 0.0
    with pytest.raises(MtlError, match="within_groups"):
        recipe(within_groups=1.5)


def test_classes_too_small_for_an_episode_are_left_out_with_a_warning(tmp_path, run_cli):
    """A user's uneven task (a few classes with 3 examples) trains on the classes that fill an episode and says
    which it left out, where the first episode stopped the run; nothing to train is said before training."""
    from mtl.data.registry import Registry

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(8), [12] * 6 + [3, 3])
    np.savez(tmp_path / "uneven.npz", images=rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8),
             labels=labels)
    (tmp_path / "uneven.yaml").write_text(
        "name: uneven\nmodality: image\nrole: meta_train\nsource: {format: npz, path: uneven.npz, labels_key: labels}"
        "\nsplits: {by: examples, sizes: {train: 0.75, test: 0.25}}\nimage: {size: 28}\n")
    with pytest.warns(UserWarning, match=r"task 'uneven': 2 classes with fewer than 6 examples in split 'train' "
                                         r"\(shots \+ queries\) left out of the training episodes \(6, 7\)"):
        trainer = Trainer(recipe(tasks=["uneven"], val_tasks=[], shots=1, iterations=2, ways=5),
                          tmp_path / "run", Registry([tmp_path])).setup()
    assert trainer.source.samplers[0].num_classes == 6
    trainer.run()
    code, out, err = run_cli("evaluate", "--checkpoint", tmp_path / "run", "--task", "uneven", "--tasks-dir",
                             tmp_path, "--split", "train", "--shots", 1, "--queries", 5, "--episodes", 2)
    assert code == 0 and "2 classes with fewer than 6 examples (shots + queries) left out (6, 7)" in out, err
    with pytest.raises(MtlError, match=r"protonet has no weights to train .* Fix: give it a trunk"):
        Trainer(recipe(method="protonet", tasks=["clinc150-home"], val_tasks=[], ways=3, iterations=1),
                tmp_path / "text").setup()
