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
    half = MultiTaskModel(ModelConfig(image_encoder="resnet12-half", image_channels=3), ["image"])
    assert half.feature_dim == 320 and 3.0e6 < sum(p.numel() for p in half.parameters()) < 3.2e6
    full = MultiTaskModel(ModelConfig(image_encoder="resnet12", image_channels=3), ["image"])
    assert full.feature_dim == 640 and 12.3e6 < sum(p.numel() for p in full.parameters()) < 12.5e6
    maml_paper = MultiTaskModel(ModelConfig(image_encoder="conv4-32", image_channels=3), ["image"])
    assert maml_paper.feature_dim == 32  # the MAML paper's mini-ImageNet network
    learner = build_algorithm("maml", model, InnerConfig(steps=1, lr=0.1))
    x = torch.randint(0, 255, (10, 84, 84, 3), dtype=torch.uint8)
    b = TaskBatch("t", "image", x[:5], torch.arange(5), x[5:], torch.arange(5))
    loss, _ = learner.meta_backward([b], 0)
    grads = [p.grad for p in learner.model.encoders["image"].parameters()]
    assert np.isfinite(loss) and all(g is not None and torch.isfinite(g).all() for g in grads)


def _jpeg(value: int, size: tuple[int, int]) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", size, (value, value, value)).save(out, format="JPEG", quality=95)
    return out.getvalue()


def test_cub_loads_chen_et_al_split_from_the_caltech_archive(tmp_path, monkeypatch):
    """CUB-200-2011's archive layout (CUB_200_2011/images/<species>/<photo>.jpg, beside its text files):
    every species, photos of any size, at 84x84, in the 100/50/50 split of Chen et al."""
    reg = Registry([ROOT / "tasks" / "benchmarks"])
    spec = reg.spec("cub")
    species = sorted(c for split in spec.splits.classes.values() for c in split)
    assert len(species) == len(set(species)) == 200 and species[0].startswith("001.")
    assert spec.splits.classes["train"] == species[0::2]  # Chen et al.: i % 2 == 0, 1 mod 4, 3 mod 4
    assert spec.splits.classes["val"] == species[1::4] and spec.splits.classes["test"] == species[3::4]
    path = tmp_path / "cub" / "CUB_200_2011.tgz"
    path.parent.mkdir()
    with tarfile.open(path, "w:gz") as tf:
        files = {"CUB_200_2011/classes.txt": b"1 001.Black_footed_Albatross\n", "attributes.txt": b"1 x\n"}
        for i, s in enumerate(species):
            for j in range(2):
                files[f"CUB_200_2011/images/{s}/{s[4:]}_{j:04d}.jpg"] = _jpeg(i, (120 + 7 * j, 90))
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    monkeypatch.setenv("MTL_CACHE_DIR", str(tmp_path / "cache"))
    task = load_task(spec, reg.entry("cub").file, data_root=tmp_path)
    for split, n in {"train": 100, "val": 50, "test": 50}.items():
        s = task.split(split)
        assert len(s.class_ids()) == n and len(s) == 2 * n and s.inputs.shape[1:] == (84, 84, 3)
        for img, y in zip(s.inputs, s.labels, strict=True):  # each photo keeps its species
            assert abs(int(img[40, 40, 0]) - species.index(task.classes[y])) <= 2  # JPEG rounds


def test_mini_imagenet_takes_ravi_split_from_a_hub_dataset(tmp_path, monkeypatch):
    """The shipped file names timm's hub data set; here a local folder in the hub's layout (parquet
    shards, the images as an Image feature, the labels as a ClassLabel of WordNet ids) stands in."""
    import datasets
    import yaml

    reg = Registry([ROOT / "tasks" / "benchmarks"])
    spec = reg.spec("mini-imagenet")
    assert spec.sources[0].dataset == "timm/mini-imagenet" and len(spec.sources[0].revision or "") == 40
    wnids = sorted(c for split in spec.splits.classes.values() for c in split)
    assert len(wnids) == len(set(wnids)) == 100
    assert {s: len(c) for s, c in spec.splits.classes.items()} == {"train": 64, "val": 16, "test": 20}
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=wnids)})
    hub = tmp_path / "hub"
    for split in ("train", "validation", "test"):  # timm's splits hold every class; the task re-splits them
        rows = {"image": [{"bytes": _jpeg(i, (100, 90 + i % 7)), "path": f"{w}_{split}.JPEG"}
                          for i, w in enumerate(wnids)], "label": list(range(100))}
        (hub / "data").mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_dict(rows, features=features).to_parquet(hub / "data" / f"{split}-00000-of-00001.parquet")
    raw = yaml.safe_load((ROOT / "tasks" / "benchmarks" / "mini_imagenet.yaml").read_text())
    raw["source"] = {"format": "hub", "dataset": str(hub)}
    local = tmp_path / "tasks" / "mini_imagenet.yaml"
    local.parent.mkdir()
    local.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("MTL_CACHE_DIR", str(tmp_path / "cache"))
    reg = Registry([local.parent])
    task = load_task(reg.spec("mini-imagenet"), local, data_root=tmp_path)
    for split, n in {"train": 64, "val": 16, "test": 20}.items():
        s = task.split(split)
        assert len(s.class_ids()) == n and len(s) == 3 * n and s.inputs.shape[1:] == (84, 84, 3)
        assert {task.classes[y] for y in s.labels} == set(spec.splits.classes[split])
        for img, y in zip(s.inputs, s.labels, strict=True):
            assert abs(int(img[40, 40, 1]) - wnids.index(task.classes[y])) <= 2


def test_a_hub_data_set_out_of_reach_is_one_line(tmp_path, monkeypatch):
    from mtl.errors import TaskFileError

    monkeypatch.setenv("MTL_OFFLINE", "1")
    monkeypatch.setenv("MTL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    reg = Registry([ROOT / "tasks" / "benchmarks"])
    with pytest.raises(TaskFileError, match=r"could not fetch the hub data set timm/mini-imagenet@\w+ .*MTL_OFFLINE"):
        load_task(reg.spec("mini-imagenet"), reg.entry("mini-imagenet").file, data_root=tmp_path)
