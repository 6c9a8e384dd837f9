"""The literature's benchmarks in the registry: CIFAR-FS and FC100 load from CIFAR-100's binary archive
(a generated fixture in the same layout) into the published class splits at 32x32; ResNet-12, the
backbone they are reported with, is a registered encoder that meta-learns like Conv-4."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mtl.data.registry import Registry
from mtl.data.task import load_task

ROOT = Path(__file__).parents[1]
PUBLISHED = {"cifar-fs": {"train": 64, "val": 16, "test": 20}, "fc100": {"train": 60, "val": 20, "test": 20}}


def cifar_archive(path: Path, names: list[str], per_class: int = 2) -> None:
    """CIFAR-100's binary layout: records (coarse, fine, 3x32x32 pixels); the pixels encode the class."""
    def batch(offset: int) -> bytes:
        rows = []
        for fine in range(len(names)):
            for _ in range(per_class):
                pixels = np.full(3 * 32 * 32, (fine + offset) % 256, np.uint8)
                rows.append(bytes([fine // 5, fine]) + pixels.tobytes())
        return b"".join(rows)

    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tf:
        for name, data in (("fine_label_names.txt", "\n".join(names).encode()), ("train.bin", batch(0)),
                           ("test.bin", batch(0))):
            info = tarfile.TarInfo(f"cifar-100-binary/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("name", ["cifar-fs", "fc100"])
def test_cifar_benchmarks_have_the_published_class_splits(tmp_path, monkeypatch, name):
    reg = Registry([ROOT / "tasks" / "benchmarks"], )
    spec = reg.spec(name)
    names = sorted(c for split in spec.splits.classes.values() for c in split)
    assert len(names) == len(set(names)) == 100
    assert {s: len(c) for s, c in spec.splits.classes.items()} == PUBLISHED[name]
    cifar_archive(tmp_path / "cifar100" / "cifar-100-binary.tar.gz", names)
    monkeypatch.setenv("MTL_CACHE_DIR", str(tmp_path / "cache"))
    task = load_task(spec, reg.entry(name).file, data_root=tmp_path)
    for split, n in PUBLISHED[name].items():
        s = task.split(split)
        assert len(s.class_ids()) == n and len(s) == 4 * n  # 2 images per class in each batch file
        assert s.inputs.shape[1:] == (32, 32, 3) and s.inputs.dtype == np.uint8
        wanted = set(spec.splits.classes[split])
        for img, y in zip(s.inputs, s.labels, strict=True):  # each image keeps its own class
            assert task.classes[y] in wanted and int(img[0, 0, 0]) == names.index(task.classes[y])


def test_resnet12_is_registered_and_meta_learns():
    from mtl.algorithms import InnerConfig, build_algorithm
    from mtl.data.stream import TaskBatch
    from mtl.models import ModelConfig, MultiTaskModel

    torch.manual_seed(0)
    model = MultiTaskModel(ModelConfig(image_encoder="resnet12-small", image_channels=3), ["image"])
    assert model.feature_dim == 160
    full = MultiTaskModel(ModelConfig(image_encoder="resnet12", image_channels=3), ["image"])
    assert full.feature_dim == 640 and 12.3e6 < sum(p.numel() for p in full.parameters()) < 12.5e6
    learner = build_algorithm("maml", model, InnerConfig(steps=1, lr=0.1))
    x = torch.randint(0, 255, (10, 84, 84, 3), dtype=torch.uint8)
    b = TaskBatch("t", "image", x[:5], torch.arange(5), x[5:], torch.arange(5))
    loss, _ = learner.meta_backward([b], 0)
    grads = [p.grad for p in learner.model.encoders["image"].parameters()]
    assert np.isfinite(loss) and all(g is not None and torch.isfinite(g).all() for g in grads)
