"""On a CUDA GPU (skipped elsewhere; benchmarks/gpu.sh runs them on the device machine): every
meta-gradient agrees with the CPU's, and train -> adapt -> predict run end to end with ``--device
cuda`` on synthetic image and text tasks (the machine has no data sets and no MiniLM), giving the CPU's
predictions."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
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
           ("maml", {"steps": 2, "head_init": "proto", "batch_tasks": 2}), ("maml", {"steps": 2, "stack_tasks": 2})]


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


@contextlib.contextmanager
def float32() -> Iterator[None]:
    """The product's default precision (the gradient tests above run in float64)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def train_adapt_predict(tmp_path: Path, run_cli, tasks: Path, recipe: str, new: str, *adapt: object) -> None:
    """``train`` and ``adapt`` (with ``adapt``'s extra options) with ``--device`` DEVICE; the saved model,
    loaded on DEVICE and on the CPU, answers the same, and above chance."""
    from mtl.data.registry import Registry
    from mtl.run.adapted import AdaptedModel

    (tmp_path / "recipe.yaml").write_text(recipe)
    code, _, err = run_cli("train", "--config", tmp_path / "recipe.yaml", "--out", tmp_path / "run", "--device",
                           DEVICE, "--tasks-dir", tasks)
    assert code == 0, err
    code, _, err = run_cli("adapt", "--task", new, "--checkpoint", tmp_path / "run", *adapt, "--device", DEVICE,
                           "--tasks-dir", tasks, "--out", tmp_path / "m")
    assert code == 0, err
    gpu, cpu = AdaptedModel.load(tmp_path / "m", DEVICE), AdaptedModel.load(tmp_path / "m", "cpu")
    task = Registry(dirs=[tasks]).load(new)
    x, truth = task.test.inputs, np.asarray(task.classes)[task.test.labels]
    assert gpu.device.type == DEVICE and (gpu.predict(x) == cpu.predict(x)).mean() > 0.95
    assert (gpu.predict(x) == truth).mean() > 0.5  # 4 or 5 classes: chance is 0.25 or less


def test_train_adapt_predict_on_cuda(tmp_path, run_cli):
    (tmp_path / "tasks").mkdir()
    with float32():
        train_adapt_predict(tmp_path, run_cli, synthetic_tasks(tmp_path / "tasks"),
                            "method: maml\ntasks: [synth-train]\nval_tasks: [synth-train]\nways: 5\nshots: 1\n"
                            "queries: 3\nmeta_batch: 4\niterations: 6\nval_every: 3\nval_episodes: 4\n"
                            "inner: {steps: 2, lr: 0.4, recompute: true}\nmodel: {image_encoder: conv4}\n"
                            "precision: bf16\n", "synth-new", "--shots", 3)


WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo", "lima"]
FILLER = ["the", "a", "my", "is", "to", "of", "and", "please", "now", "when", "what", "how"]


def tiny_text_encoder(folder: Path) -> Path:
    """A random two-layer BERT and a word-level tokenizer of its own (the device machine has no MiniLM),
    built with ``tokenizers`` directly: the same files under transformers 4 and 5."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *FILLER])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[
        ("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(folder)
    return folder


def synthetic_text_tasks(folder: Path) -> Path:
    """Two csv text tasks whose classes are each a keyword among filler words: 8 training, 4 new."""
    rng = np.random.default_rng(0)
    for name, words, role in (("synth-text-train", WORDS[:8], "meta_train"), ("synth-text-new", WORDS[8:], "held_out")):
        rows = ["text,label"] + [" ".join([*rng.choice(FILLER, 3), w, *rng.choice(FILLER, 2)]) + f",{w}"
                                 for w in words for _ in range(12)]
        (folder / f"{name}.csv").write_text("\n".join(rows) + "\n")
        (folder / f"{name}.yaml").write_text(
            f"name: {name}\nmodality: text\ndescription: keywords among filler words, for the CUDA test\n"
            f"role: {role}\nsource: {{format: csv, path: {folder / name}.csv}}\ninput_field: text\n"
            "label_field: label\nsplits: {by: examples, sizes: {train: 6, test: 6}, seed: 0}\n")
    return folder


def test_text_train_and_select_on_cuda(tmp_path, run_cli):
    """The text path on the GPU: meta-training over a frozen transformer's embeddings, then ``adapt
    --select`` with every layer fine-tuned and token matching, saved and answering as on the CPU."""
    (tmp_path / "tasks").mkdir()
    with float32():
        encoder = tiny_text_encoder(tmp_path / "bert")
        train_adapt_predict(tmp_path, run_cli, synthetic_text_tasks(tmp_path / "tasks"),
                            "method: maml\ntasks: [synth-text-train]\nval_tasks: [synth-text-train]\nways: 4\n"
                            "shots: 2\nqueries: 2\nmeta_batch: 2\niterations: 4\nval_every: 2\nval_episodes: 2\n"
                            "inner: {steps: 1, head_init: proto}\n"
                            f"model: {{trunk: [16], text_encoder: '{encoder}'}}\n", "synth-text-new",
                            "--shots", 4, "--select", "--encoder-layers", "all", "--encoder-epochs", 2)
