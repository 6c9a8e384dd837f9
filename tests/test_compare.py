"""The multi-task baseline learns; compare's outputs agree with each other; CIs match a reference."""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from mtl.run.evaluate import mean_ci
from tests.conftest import needs_data, write

RECIPE = """\
method: {method}
tasks: [omniglot-latin, omniglot-greek, omniglot-korean]
val_tasks: [omniglot-latin]
ways: 5
shots: 1
queries: 3
meta_batch: 4
iterations: {iterations}
val_every: {iterations}
val_episodes: 4
outer_lr: 0.003
inner: {{steps: 1, lr: 0.4}}
threads: 2
device: cpu
"""


def test_ci_matches_a_reference():
    rng = np.random.default_rng(0)
    values = rng.uniform(0.5, 1.0, 50)
    mean, half = mean_ci(values)
    lo, hi = stats.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=stats.sem(values))
    assert math.isclose(mean, values.mean()) and math.isclose(half, (hi - lo) / 2)
    big = rng.uniform(0, 1, 100_000)
    assert math.isclose(mean_ci(big)[1], 1.96 * big.std(ddof=1) / math.sqrt(len(big)), rel_tol=1e-3)


ROOT = Path(__file__).parents[1]
METHODS = ("maml", "multitask", "protonet", "baseline_pp")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from mtl.cli import main

    folder = tmp_path_factory.mktemp("cmp")
    for method, iterations in (("maml", 6), ("multitask", 30), ("protonet", 6), ("baseline_pp", 30)):
        cfg = write(folder / f"{method}.yaml", RECIPE.format(method=method, iterations=iterations))
        assert main(["train", "--config", str(cfg), "--out", str(folder / method), "--json"]) == 0
    return folder


@needs_data
def test_multitask_joint_loss_decreases(runs):
    rows = [json.loads(x) for x in (runs / "multitask" / "metrics.jsonl").read_text().splitlines()]
    first, last = np.mean([r["loss"] for r in rows[:5]]), np.mean([r["loss"] for r in rows[-5:]])
    assert last < first - 0.3, (first, last)


@needs_data
def test_compare_outputs_are_written_and_consistent(runs, run_cli, tmp_path):
    code, out, err = run_cli("compare", "--tasks", "omniglot-angelic", "--shots", "1,2", "--episodes", 6,
                             "--checkpoints", ",".join(f"{m}={runs / m}" for m in METHODS),
                             "--steps", 2, "--queries", 3, "--out", tmp_path / "cmp", "--json")
    assert code == 0, err
    doc = json.loads(out)
    results = doc["results"]
    assert {r["method"] for r in results} == {*METHODS, "scratch", "linear_probe", "centroid"}
    assert {r["shots"] for r in results} == {1, 2} and all(r["episodes"] == 6 for r in results)
    with open(tmp_path / "cmp" / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(results)
    for row, r in zip(table, results, strict=True):
        assert math.isclose(float(row["accuracy"]), r["accuracy"]) and row["method"] == r["method"]
        line = f"| {r['task']} | {r['shots']} | {r['method']} | {100 * r['accuracy']:.2f} |"
        assert line in (tmp_path / "cmp" / "results.md").read_text()
    assert (tmp_path / "cmp" / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert all(r["p_vs_maml"] is None for r in results if r["method"] == "maml")
    steps = {r["method"]: r["step_size"] for r in results}  # chosen on validation episodes, reported
    assert steps["linear_probe"] == steps["centroid"] == "-"
    assert steps["maml"] == "learned" or float(steps["maml"]) > 0
    assert float(steps["multitask"]) > 0 and float(steps["scratch"]) > 0
    assert table[0]["step_size"] == results[0]["step_size"]
    assert all(0 <= r["ece"] <= 1 for r in results)  # calibration beside accuracy, for every method
    assert all(math.isclose(float(row["ece"]), r["ece"]) for row, r in zip(table, results, strict=True))


@needs_data
def test_compare_answers_image_episodes_in_eight_views(runs, registry):
    """`--views 8` scores every method on the same episodes turned and mirrored, as `adapt` answers; the
    reports say how many views answered."""
    from mtl.errors import MtlError
    from mtl.run.compare import compare

    task = registry.load("omniglot-angelic")
    kw = {"ways": 5, "steps": 1, "queries": 3, "device": "cpu"}
    one, eight = (compare([task], [1], 4, {"maml": runs / "maml"}, ["maml", "centroid"], views=v, **kw)
                  for v in (1, 8))
    assert [r.views for r in one] == [1, 1] and [r.views for r in eight] == [8, 8]
    assert all(0 < r.accuracy <= 1 for r in eight) and [r.accuracy for r in one] != [r.accuracy for r in eight]
    with pytest.raises(MtlError, match="--views 3 is not a number of views"):
        compare([task], [1], 4, {"maml": runs / "maml"}, ["maml"], views=3, **kw)


@needs_data
def test_compare_on_a_users_own_task_folder(runs, run_cli, tmp_path, monkeypatch):
    text = (ROOT / "tasks" / "omniglot" / "alphabets" / "angelic.yaml").read_text()
    write(tmp_path / "mine" / "glyphs.yaml", text.replace("name: omniglot-angelic", "name: my-glyphs"))
    code, out, err = run_cli("compare", "--tasks", "my-glyphs", "--tasks-dir", tmp_path / "mine", "--shots", "1",
                             "--episodes", 4, "--checkpoints", f"maml={runs / 'maml'}", "--methods", "maml,centroid",
                             "--steps", 1, "--queries", 2, "--out", tmp_path / "cmp", "--json")
    assert code == 0, err
    rows = json.loads(out)["results"]
    assert {(r["task"], r["method"]) for r in rows} == {("my-glyphs", "maml"), ("my-glyphs", "centroid")}

    import mtl.run.compare as compare_module  # Ctrl-C after the first setting: said, with what the reports hold

    real = compare_module.compare

    def first_then_interrupted(*args, on_rows, **kwargs):
        def then_stop(rows):
            on_rows(rows)
            raise KeyboardInterrupt
        return real(*args, on_rows=then_stop, **kwargs)

    monkeypatch.setattr(compare_module, "compare", first_then_interrupted)
    code, _, err = run_cli("compare", "--tasks", "my-glyphs", "--tasks-dir", tmp_path / "mine", "--shots", "1,2",
                           "--episodes", 4, "--checkpoints", f"maml={runs / 'maml'}", "--methods", "maml",
                           "--steps", 1, "--queries", 2, "--out", tmp_path / "cmp2")
    assert code == 130 and f"interrupted: {tmp_path / 'cmp2'} holds the 1 result finished so far" in err, err
    assert len(json.loads((tmp_path / "cmp2" / "results.json").read_text())["results"]) == 1


@needs_data
def test_paired_episodes_are_identical_across_methods(registry):
    import torch

    from mtl.data.stream import EpisodeStream

    task = registry.load("omniglot-angelic")
    a = EpisodeStream([task], "test", 5, 1, 3, 0, torch.device("cpu"), cap_ways=False).fixed(5)
    b = EpisodeStream([task], "test", 5, 1, 3, 0, torch.device("cpu"), cap_ways=False).fixed(5)
    assert all(torch.equal(x.xs, y.xs) and torch.equal(x.xq, y.xq) for x, y in zip(a, b, strict=True))


def _shrunk(task, keep: int):
    """``task`` with its first class cut to ``keep`` test examples."""
    import dataclasses

    test = task.test
    first = np.flatnonzero(test.labels == 0)[keep:]
    mask = np.ones(len(test.labels), bool)
    mask[first] = False
    small = dataclasses.replace(test, inputs=test.inputs[mask], labels=test.labels[mask])
    spec = task.spec.model_copy(update={"name": f"{task.name}-small"})
    return dataclasses.replace(task, spec=spec, splits={**task.splits, task.spec.test_split: small})


@needs_data
def test_compare_leaves_out_small_classes_and_hands_over_each_setting(runs, registry, caplog):
    from mtl.run.compare import compare

    task = registry.load("omniglot-angelic")
    small = _shrunk(task, 3)
    seen: list[int] = []
    with caplog.at_level(logging.INFO, logger="mtl"):
        rows = compare([small, task], [1], 4, {"maml": runs / "maml"}, ["maml", "centroid"], ways=5, steps=1,
                       queries=3, on_rows=lambda rows: seen.append(len(rows)))
    assert seen == [2, 4]  # the reports can be written after every finished setting
    assert caplog.messages == [f"{t.name} 1-shot: {m} on 4 episodes"  # what is running, as it runs
                               for t in (small, task) for m in ("maml", "centroid")]
    assert rows[0].left_out == [task.classes[0]] and rows[2].left_out == []
    assert all(0 <= r.accuracy <= 1 for r in rows)


@needs_data
def test_compare_chooses_on_a_train_split_of_only_a_few_examples(runs, registry):
    """A user's task often has only the few examples to adapt from in its train split (and no validation
    split): step sizes are still chosen there, on fewer queries, or not at all where none are left."""
    import dataclasses

    from mtl.run.compare import compare, val_queries

    task = registry.load("omniglot-angelic")
    train = task.train
    keep = np.concatenate([np.flatnonzero(train.labels == c)[:3] for c in np.unique(train.labels)])
    few = dataclasses.replace(task, splits={**task.splits, "train": dataclasses.replace(
        train, inputs=train.inputs[keep], labels=train.labels[keep])})
    assert (val_queries(few, "train", 5, 1, 15), val_queries(few, "train", 5, 3, 15)) == (2, 0)
    rows = compare([few], [1, 3], 3, {"maml": runs / "maml"}, ["maml", "scratch"], ways=5, steps=1, queries=2)
    chosen = {(r.shots, r.method): r.step_size for r in rows}
    assert not any("no validation" in chosen[1, m] for m in ("maml", "scratch"))
    assert all(chosen[3, m].endswith("(no validation episodes)") for m in ("maml", "scratch"))
    assert all(0 <= r.accuracy <= 1 for r in rows)


@pytest.mark.parametrize("args, says", [
    (["evaluate", "--task", "omniglot-angelic", "--episodes", 0], "--episodes 0 leaves nothing to measure"),
    (["evaluate", "--task", "omniglot-angelic", "--queries", 0], "--queries 0 leaves nothing to measure"),
    (["evaluate", "--task", "omniglot-angelic", "--ways", 1], "--ways 1 leaves nothing to measure. Fix: use --ways 2"),
    (["compare", "--tasks", "omniglot-angelic", "--shots", "0,1"], "--shots 0 leaves nothing to measure"),
    (["compare", "--tasks", "omniglot-angelic", "--episodes", 0], "--episodes 0 leaves nothing to measure")])
def test_episodes_that_measure_nothing_are_refused_first(args, says, run_cli, tmp_path):
    flag = "--checkpoint" if args[0] == "evaluate" else "--checkpoints"  # refused before the checkpoint is read
    code, _, err = run_cli(*args, flag, tmp_path / "no-such-run" if flag == "--checkpoint" else "maml=nowhere")
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err


@needs_data
def test_compare_checks_every_setting_before_the_first_episode(runs, registry):
    from mtl.errors import MtlError
    from mtl.run.compare import compare

    task = registry.load("omniglot-angelic")
    called: list[int] = []
    with pytest.raises(MtlError, match="omniglot-angelic"):  # 5 test examples per class: 10-shot cannot be drawn
        compare([task], [1, 10], 4, {"maml": runs / "maml"}, ["maml"], ways=5, queries=3,
                on_rows=lambda rows: called.append(1))
    assert called == []


@needs_data
def test_a_late_failure_keeps_the_finished_settings(runs, run_cli, tmp_path, monkeypatch):
    import mtl.run.compare as cmp

    real, calls = cmp.centroid_scores, []

    def fail_on_second_setting(learner, b):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("disk full")
        return real(learner, b)

    monkeypatch.setattr(cmp, "centroid_scores", fail_on_second_setting)
    code, _, err = run_cli("compare", "--tasks", "omniglot-angelic", "--shots", "1,2", "--episodes", 3,
                           "--checkpoints", f"maml={runs / 'maml'}", "--methods", "maml,centroid", "--steps", 1,
                           "--queries", 3, "--out", tmp_path / "cmp")
    assert code == 1 and "disk full" in err
    kept = json.loads((tmp_path / "cmp" / "results.json").read_text())["results"]
    assert {(r["shots"], r["method"]) for r in kept} == {(1, "maml"), (1, "centroid")}
