"""Episodes: shapes, support/query disjointness, seeded reproducibility, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from mtl.data.episodes import EpisodeSampler
from mtl.data.schema import TaskSpec
from mtl.data.task import Split, Task
from mtl.errors import MtlError
from tests.conftest import needs_data


def toy_task(name: str = "toy", per_class: list[int] | None = None, modality: str = "image") -> Task:
    per_class = per_class or [10] * 8
    labels = np.repeat(np.arange(len(per_class)), per_class)
    if modality == "image":
        inputs = np.stack([np.full((4, 4), i, np.uint8) for i in range(len(labels))])
    else:
        inputs = np.asarray([f"example {i}" for i in range(len(labels))])
    spec = TaskSpec.model_validate({
        "name": name, "modality": modality, "description": "toy", "role": "meta_train",
        "source": {"format": "npz", "path": "x.npz"}, "input_field": "image", "label_field": "label"})
    split = Split(name, "train", inputs, labels)
    return Task(spec=spec, classes=[f"c{i}" for i in range(len(per_class))], splits={"train": split, "test": split})


def test_shapes_labels_and_disjointness():
    ep = EpisodeSampler(toy_task(), ways=5, shots=2, queries=3, seed=1).sample(0)
    assert ep.support_x.shape == (10, 4, 4) and ep.query_x.shape == (15, 4, 4)
    assert ep.support_y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert np.bincount(ep.query_y).tolist() == [3] * 5
    assert not set(ep.support_src[:, 1].tolist()) & set(ep.query_src[:, 1].tolist())
    # inputs encode their own index: check the gather and the label remapping agree
    labels = np.repeat(np.arange(8), 10)
    for x, y in zip(ep.support_x, ep.support_y, strict=True):
        assert ep.classes[y] == f"c{labels[x[0, 0]]}"


def test_same_seed_same_episode_different_seed_different():
    a = EpisodeSampler(toy_task(), ways=5, shots=1, queries=2, seed=7)
    b = EpisodeSampler(toy_task(), ways=5, shots=1, queries=2, seed=7)
    c = EpisodeSampler(toy_task(), ways=5, shots=1, queries=2, seed=8)
    for i in range(5):
        ea, eb = a.sample(i), b.sample(i)
        assert ea.classes == eb.classes and np.array_equal(ea.support_src, eb.support_src)
        assert np.array_equal(ea.query_x, eb.query_x)
    assert any(a.sample(i).classes != c.sample(i).classes for i in range(5))
    # episode i does not depend on the order in which episodes are drawn
    assert np.array_equal(a.sample(3).query_src, a.take(4)[3].query_src)


def test_pool_of_classes_across_tasks():
    pool = EpisodeSampler([toy_task("a", [6] * 3), toy_task("b", [6] * 3)], ways=6, shots=1, queries=1, seed=0)
    assert pool.num_classes == 6
    ep = pool.sample(0)
    assert set(ep.support_src[:, 0].tolist()) == {0, 1} and ep.tasks == ("a", "b")


def test_episodes_within_groups_draw_one_group_of_classes_at_a_time():
    """``within_groups``: that share of episodes takes its classes from one group (the name before "/",
    Omniglot's alphabet); groups too small for the ways are never drawn alone; at 0 the episodes are
    exactly those drawn before the option existed."""
    from mtl.data.episodes import class_groups

    task = toy_task(per_class=[4] * 12)
    task.classes[:] = [f"{a}/c{i}" for a, n in (("A", 5), ("B", 4), ("C", 3)) for i in range(n)]
    assert [g.tolist() for g in class_groups(task.classes)] == [[0, 1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11]]
    assert [g.tolist() for g in class_groups(["x", "y/1", "y/2", "z"])] == [[0], [1, 2], [3]]
    within = EpisodeSampler(task, ways=4, shots=1, queries=1, seed=3, within_groups=1.0)
    groups = [{c.split("/")[0] for c in within.sample(i).classes} for i in range(40)]
    assert all(len(g) == 1 for g in groups) and {g.pop() for g in groups} == {"A", "B"}  # C has 3 < 4 classes
    mixed = EpisodeSampler(task, ways=4, shots=1, queries=1, seed=3, within_groups=0.5)
    spread = [len({c.split("/")[0] for c in mixed.sample(i).classes}) for i in range(60)]
    assert 10 < spread.count(1) < 50 and max(spread) > 1
    off = EpisodeSampler(task, ways=4, shots=1, queries=1, seed=3, within_groups=0.0)
    before = EpisodeSampler(task, ways=4, shots=1, queries=1, seed=3)
    assert all(off.sample(i).classes == before.sample(i).classes for i in range(10))


def test_text_episode_inputs_are_strings():
    ep = EpisodeSampler(toy_task(modality="text"), ways=3, shots=2, queries=1).sample(0)
    assert ep.support_x.dtype.kind == "U" and ep.support_x[0].startswith("example")


def test_too_many_ways_names_task_and_counts():
    with pytest.raises(MtlError, match=r"task 'toy' split 'train' has 8 classes, fewer than the 9 ways"):
        EpisodeSampler(toy_task(), ways=9)


def test_too_many_shots_names_class_and_counts():
    with pytest.raises(MtlError, match=r"class 'c2' of task 'toy' split 'train' has 3 examples.*1 \+ 5.*"
                       r"e\.g\. --queries 2 \(in a recipe, `queries: 2`\)"):
        EpisodeSampler(toy_task(per_class=[10, 10, 3]), ways=2, shots=1, queries=5)


def test_small_classes_left_out_and_the_fix_that_would_fit():
    """With ``skip_small`` (training, evaluate, compare) too small a class is left out and listed; when too few
    remain for the ways, the fix names the shots + queries that ``ways`` classes all have."""
    sampler = EpisodeSampler(toy_task(per_class=[10, 10, 10, 3]), ways=3, shots=1, queries=5, skip_small=True)
    assert sampler.left_out == ["c3"] and sampler.num_classes == 3
    with pytest.raises(MtlError, match=r"has 0 classes with at least 12 examples, fewer than the 3 ways asked\. "
                                       r"Fix: ask for at most 10 shots \+ queries, e\.g\. --queries 9"):
        EpisodeSampler(toy_task(per_class=[10, 10, 10, 3]), ways=3, shots=1, queries=11, skip_small=True)


def test_pool_refuses_mixed_modalities():
    with pytest.raises(MtlError, match="cannot mix text and image"):
        EpisodeSampler([toy_task("a"), toy_task("b", modality="text")])


@needs_data
def test_real_omniglot_and_clinc_episodes(registry):
    omni = EpisodeSampler(registry.load("omniglot"), split="test", ways=20, shots=1, queries=5, seed=0).sample(0)
    assert omni.support_x.shape == (20, 28, 28) and omni.query_x.shape == (100, 28, 28)
    text = EpisodeSampler(registry.load("clinc150-travel"), ways=15, shots=5, queries=10, seed=0).sample(3)
    assert text.support_x.shape == (75,) and len(set(text.classes)) == 15
