"""Every shipped task file loads against the real data with the right counts."""

from __future__ import annotations

import pytest

from tests.conftest import needs_data

pytestmark = needs_data

# name: (classes, {split: examples})
EXPECTED = {
    "omniglot": (1028 * 4 + 172 + 423, {"train": 1028 * 4 * 20, "val": 172 * 20, "test": 423 * 20}),
    "omniglot-lake": (964 * 4 + 659, {"train": 964 * 4 * 20, "test": 13180}),  # background rotated
    "clinc150": (150, {"train": 15000, "val": 3000, "test": 4500}),
    "clinc150-oos": (1, {"train": 100, "val": 100, "test": 1000}),
    "banking77": (77, {"train": 10003, "test": 3080}),
    "snips": (7, {"train": 13084, "val": 700, "test": 700}),
    "sst2": (2, {"train": 6920, "val": 872, "test": 1821}),
    "sst5": (5, {"train": 8544, "val": 1101, "test": 2210}),
    "trec": (6, {"train": 5452, "test": 500}),
    "agnews": (4, {"train": 6080, "test": 1520}),
    "mnist": (10, {"train": 8000, "test": 2000}),
    "olivetti": (40, {"train": 200, "test": 200}),
    "digits": (10, {"train": 1347, "test": 450}),
}
CLINC_DOMAINS = ["auto-and-commute", "banking", "credit-cards", "home", "kitchen-and-dining", "meta",
                 "small-talk", "travel", "utility", "work"]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shipped_task_counts(registry, name):
    task = registry.load(name)
    n_classes, sizes = EXPECTED[name]
    assert len(task.classes) == n_classes
    assert {s: len(v) for s, v in task.splits.items()} == pytest.approx(sizes, abs=8)
    for split in task.splits.values():
        assert split.labels.min() >= 0 and split.labels.max() < n_classes
        assert len(split.inputs) == len(split.labels)


def test_stratified_fraction_splits_are_exact_per_class(registry):
    mnist = registry.load("mnist")
    train, test = mnist.train.counts(), mnist.test.counts()
    for c in train:
        assert abs(train[c] / (train[c] + test[c]) - 0.8) < 0.01


@pytest.mark.parametrize("domain", CLINC_DOMAINS)
def test_clinc_domains(registry, domain):
    task = registry.load(f"clinc150-{domain}")
    assert len(task.classes) == 15
    assert {s: len(v) for s, v in task.splits.items()} == {"train": 1500, "val": 300, "test": 450}


def test_clinc_roles_seven_train_three_held_out(registry):
    roles = [registry.spec(f"clinc150-{d}").role for d in CLINC_DOMAINS]
    assert roles.count("meta_train") == 7 and roles.count("held_out") == 3


def test_omniglot_alphabets_cover_all_characters(registry):
    alphabets = [n for n in registry.names() if n.startswith("omniglot-") and n != "omniglot-lake"]
    assert len(alphabets) == 50
    by_role = {"meta_train": 0, "held_out": 0}
    for name in alphabets:
        task = registry.load(name)
        assert set(task.train.counts().values()) == {15} and set(task.test.counts().values()) == {5}
        by_role[task.spec.role] += len(task.classes)
    assert by_role == {"meta_train": 964, "held_out": 659}


def test_omniglot_splits_are_class_disjoint_and_images_are_ink_on_black(registry):
    task = registry.load("omniglot")
    base = lambda s: {task.classes[c].split("@")[0] for c in task.split(s).class_ids()}  # noqa: E731
    train, val, test = base("train"), base("val"), base("test")
    assert len(train) == 1028 and not train & test and not val & test and not train & val
    img = task.test.inputs[0]
    assert img.shape == (28, 28) and img.dtype.name == "uint8"
    assert img.mean() < 80  # inverted: mostly black background, white strokes


def test_every_shipped_file_parses_with_a_role(registry):
    assert len(registry) == 77  # 72 + CLINC150's out-of-scope queries + CIFAR-FS, FC100, mini-ImageNet, CUB
    for entry in registry:
        assert entry.spec.role in ("meta_train", "meta_val", "held_out")


def test_a_pickled_registry_carries_its_task_files_not_their_data(registry):
    """What a training worker receives: the same tasks, which it loads itself."""
    import pickle

    registry.load("omniglot-angelic")
    copy = pickle.loads(pickle.dumps(registry))
    assert copy.names() == registry.names() and not copy._loaded and ("omniglot-angelic",) in registry._loaded
    assert len(copy.load("omniglot-angelic").classes) == len(registry.load("omniglot-angelic").classes)
