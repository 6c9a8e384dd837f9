"""The multi-task baseline learns; compare's outputs agree with each other; CIs match a reference."""

from __future__ import annotations

import csv
import json
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


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from mtl.cli import main

    folder = tmp_path_factory.mktemp("cmp")
    for method, iterations in (("maml", 6), ("multitask", 30)):
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
                             "--checkpoints", f"maml={runs / 'maml'},multitask={runs / 'multitask'}",
                             "--steps", 2, "--queries", 3, "--out", tmp_path / "cmp", "--json")
    assert code == 0, err
    doc = json.loads(out)
    results = doc["results"]
    assert {r["method"] for r in results} == {"maml", "multitask", "scratch", "linear_probe", "centroid"}
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


@needs_data
def test_compare_on_a_users_own_task_folder(runs, run_cli, tmp_path):
    text = (ROOT / "tasks" / "omniglot" / "alphabets" / "angelic.yaml").read_text()
    write(tmp_path / "mine" / "glyphs.yaml", text.replace("name: omniglot-angelic", "name: my-glyphs"))
    code, out, err = run_cli("compare", "--tasks", "my-glyphs", "--tasks-dir", tmp_path / "mine", "--shots", "1",
                             "--episodes", 4, "--checkpoints", f"maml={runs / 'maml'}", "--methods", "maml,centroid",
                             "--steps", 1, "--queries", 2, "--out", tmp_path / "cmp", "--json")
    assert code == 0, err
    rows = json.loads(out)["results"]
    assert {(r["task"], r["method"]) for r in rows} == {("my-glyphs", "maml"), ("my-glyphs", "centroid")}


@needs_data
def test_paired_episodes_are_identical_across_methods(registry):
    import torch

    from mtl.data.stream import EpisodeStream

    task = registry.load("omniglot-angelic")
    a = EpisodeStream([task], "test", 5, 1, 3, 0, torch.device("cpu"), cap_ways=False).fixed(5)
    b = EpisodeStream([task], "test", 5, 1, 3, 0, torch.device("cpu"), cap_ways=False).fixed(5)
    assert all(torch.equal(x.xs, y.xs) and torch.equal(x.xq, y.xq) for x, y in zip(a, b, strict=True))
