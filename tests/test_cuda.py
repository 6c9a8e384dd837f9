"""On a CUDA GPU (skipped elsewhere; benchmarks/gpu.sh runs them on the device machine): every
meta-gradient agrees with the CPU's, and train -> adapt -> predict run end to end with ``--device
cuda`` on synthetic image tasks (the machine has no data sets), giving the CPU's predictions."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_maml import batch, float64, meta_grads, tiny_learner  # noqa: F401

# MTL_TEST_DEVICE=cpu runs the same checks on the CPU (to check the tests themselves without a GPU)
DEVICE = os.environ.get("MTL_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="no CUDA GPU")

METHODS = [("maml", {"steps": 2}), ("maml", {"steps": 3, "recompute": True}), ("maml++", {"steps": 2}),
           ("metasgd", {"steps": 1}), ("anil", {"steps": 2}), ("fomaml", {"steps": 2}),
           ("maml", {"steps": 2, "head_init": "proto", "bn": "transductive"}),
           ("maml", {"steps": 2, "head_init": "proto", "batch_tasks": 2})]


@pytest.mark.parametrize("method, inner", METHODS, ids=[f"{m}-{i}" for m, i in METHODS])
def test_meta_gradient_on_cuda_matches_cpu(method, inner):
    batches = [batch(0), batch(1)]
    want = meta_grads(tiny_learner(method, **inner), batches, it=3)
    on_gpu = [replace(b, xs=b.xs.to(DEVICE), ys=b.ys.to(DEVICE), xq=b.xq.to(DEVICE), yq=b.yq.to(DEVICE))
              for b in batches]
    got = meta_grads(tiny_learner(method, **inner).to(DEVICE), on_gpu, it=3)
    assert want.keys() == got.keys()
    for name, g in got.items():
        assert g.device.type == DEVICE and torch.allclose(g.cpu(), want[name], atol=1e-9, rtol=1e-6), name


def synthetic_tasks(folder: Path) -> Path:
    """Two npz image tasks: 12 training classes and 5 new ones, each a noisy copy of its own pattern."""
    rng = np.random.default_rng(0)
    for name, classes, role in (("synth-train", 12, "meta_train"), ("synth-new", 5, "held_out")):
        patterns = rng.integers(0, 256, (classes, 1, 28, 28))
        images = np.clip(patterns + rng.normal(0, 40, (classes, 10, 28, 28)), 0, 255).astype(np.uint8)
        np.savez(folder / f"{name}.npz", images=images)
        (folder / f"{name}.yaml").write_text(
            f"name: {name}\nmodality: image\ndescription: synthetic patterns for the CUDA test\nrole: {role}\n"
            f"source: {{format: npz, path: {folder / name}.npz, images_key: images}}\n"
            "input_field: image\nlabel_field: label\n"
            "splits: {by: examples, sizes: {train: 6, test: 4}, seed: 0}\nimage: {size: 28, grayscale: true}\n")
    return folder


def test_train_adapt_predict_on_cuda(tmp_path, run_cli):
    from mtl.data.registry import Registry
    from mtl.run.adapted import AdaptedModel

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        (tmp_path / "tasks").mkdir()
        tasks = synthetic_tasks(tmp_path / "tasks")
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text("method: maml\ntasks: [synth-train]\nval_tasks: [synth-train]\nways: 5\nshots: 1\n"
                          "queries: 3\nmeta_batch: 4\niterations: 6\nval_every: 3\nval_episodes: 4\n"
                          "inner: {steps: 2, lr: 0.4, recompute: true}\nmodel: {image_encoder: conv4}\n"
                          "precision: bf16\n")
        code, _, err = run_cli("train", "--config", recipe, "--out", tmp_path / "run", "--device", DEVICE,
                               "--tasks-dir", tasks)
        assert code == 0, err
        code, _, err = run_cli("adapt", "--task", "synth-new", "--checkpoint", tmp_path / "run", "--shots", 3,
                               "--device", DEVICE, "--tasks-dir", tasks, "--out", tmp_path / "m")
        assert code == 0, err
        gpu, cpu = AdaptedModel.load(tmp_path / "m", DEVICE), AdaptedModel.load(tmp_path / "m", "cpu")
        test = Registry(dirs=[tasks]).load("synth-new")
        x, truth = test.test.inputs, np.asarray(test.classes)[test.test.labels]
        assert gpu.device.type == DEVICE and (gpu.predict(x) == cpu.predict(x)).mean() > 0.95
        assert (gpu.predict(x) == truth).mean() > 0.5  # 5-way: chance is 0.2
    finally:
        torch.set_default_dtype(old)
