"""The public Python API: every example in docs/API.md runs, in order, as a user would paste it;
experiment tracking writes TensorBoard files; the CLI's closing lines."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import needs_data, write

ROOT = Path(__file__).parents[1]


def test_import_mtl_is_light_and_exposes_the_api():
    code = ("import sys, mtl; assert 'torch' not in sys.modules; "
            "names = ['Registry', 'train', 'adapt', 'AdaptedModel', 'evaluate', 'compare', 'whiten', "
            "'FewShotClassifier', 'shipped_recipes']; "
            "assert all(callable(getattr(mtl, n)) for n in names); print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.stdout.strip() == "ok", proc.stderr


@needs_data
def test_every_example_in_docs_api_runs(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "API.md").read_text(), flags=re.S)
    assert len(blocks) >= 6
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    script = write(tmp_path / "api.py", "\n".join(blocks))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    cv = float(next(x for x in lines if re.fullmatch(r"0\.\d+", x.strip())))
    assert cv > 0.3  # 10-way MNIST from 8 examples per class, adapted from a 30-iteration Omniglot model
    assert (tmp_path / "models" / "mnist-5shot" / "model.safetensors").exists()
    assert any(line.startswith("fomaml-2x fomaml-2x") for line in lines)


SMALL = """\
tasks: [omniglot]
ways: 5
shots: 1
queries: 3
meta_batch: 2
iterations: 3
val_every: 3
threads: 2
device: cpu
"""


@needs_data
def test_tensorboard_logging_and_closing_lines_without_validation(tmp_path, run_cli):
    pytest.importorskip("tensorboard")
    cfg = write(tmp_path / "r.yaml", SMALL)  # no val_tasks
    code, out, err = run_cli("train", "--config", cfg, "--out", tmp_path / "run", "--log", "tensorboard")
    assert code == 0, err
    assert out.startswith("trained 3 iterations in ") and "validation" not in out
    events = list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [0, 1, 2]


def test_an_untrained_learner_with_nothing_to_train_adapts():
    """The pretrained sentence encoder, frozen, and a prototype head: no parameter at all until adapted
    (``compare``'s ``scratch`` for a recipe without a trunk)."""
    from mtl import adapt
    from mtl.models import ModelConfig
    from mtl.run.learner import build_learner
    from mtl.run.recipe import Recipe

    recipe = Recipe(method="maml", tasks=["clinc150-work"], model=ModelConfig(text_encoder="minilm", trunk=[]))
    learner = build_learner(recipe, ["text"], {})
    assert not list(learner.parameters())
    model = adapt(learner, "clinc150-work", shots=2)
    assert model.meta["test_accuracy"] > 0.5  # 15 intents: chance is 0.07


def test_a_head_lands_on_the_device_of_a_model_without_parameters():
    """A frozen encoder with no trunk (the probe's body) has no parameters; its head must still follow
    ``.to()`` (on a GPU it did not, and ``--select``'s probe answered from the CPU: a device mismatch)."""
    from mtl.run.adapted import plain_model

    model = plain_model("minilm", "cpu")
    assert not list(model.parameters())
    assert model.to("meta").add_head("new", 3).weight.device.type == "meta"
