"""A transformer text encoder inside the inner loop (``inner.encoder_lr``): FOMAML, Reptile and
second-order MAML over its layers, exact with gradient checkpointing (``model.text_checkpointing``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mtl.algorithms import Algorithm, InnerConfig, build_algorithm
from mtl.data.embeddings import TokenStates, TokenStore, load_transformer, lower_token_states
from mtl.data.stream import TaskBatch
from mtl.models import ModelConfig, MultiTaskModel
from tests.conftest import needs_data, write
from tests.test_maml import check_against_fd, meta_grads

TEXTS = ["when is my card arriving", "my card has not come", "card still not here", "where is the card",
         "cancel my transfer", "stop that payment", "undo the transfer please", "reverse my payment",
         "what is my balance", "how much money do i have", "show my balance", "balance of my account"]


@pytest.fixture
def doubles():
    """Finite differences need double precision (restored for the tests that run the CLI)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT saved by transformers, with MiniLM's tokenizer."""
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    BertModel(BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
              ).save_pretrained(folder)
    load_transformer("minilm")[1].save_pretrained(folder)
    return folder


def text_learner(folder: Path, method: str, checkpointing: bool = False, **inner: object) -> Algorithm:
    torch.manual_seed(0)
    config = ModelConfig(text_encoder=str(folder), text_trainable_layers=2, text_checkpointing=checkpointing)
    cfg = InnerConfig(**{"steps": 2, "lr": 0.5, "head_init": "proto", **inner})
    return build_algorithm(method, MultiTaskModel(config, ["text"]), cfg).double()


def text_batch(folder: Path) -> TaskBatch:
    """3 ways, 2 shots, 2 queries: the token states entering the first layer, as training feeds them."""
    model, tok = load_transformer(str(folder))
    arrays = lower_token_states(model, tok, TEXTS, 0, np.float64)
    store = TokenStore(torch.from_numpy(arrays["tokens"]), torch.from_numpy(arrays["offsets"]))
    support, query = [0, 1, 4, 5, 8, 9], [2, 3, 6, 7, 10, 11]
    ys = torch.tensor([0, 0, 1, 1, 2, 2])

    def states(rows: list[int]) -> TokenStates:
        s = store[torch.tensor(rows)]
        return TokenStates(s.hidden.double(), s.mask)

    return TaskBatch("toy", "text", states(support), ys, states(query), ys)


def test_encoder_layers_adapt_in_the_inner_loop_only_given_an_encoder_lr(bert, doubles):
    assert text_learner(bert, "fomaml").adapted_names("text") == []  # default: the outer loop alone
    learner = text_learner(bert, "fomaml", encoder_lr=0.01)
    names = learner.adapted_names("text")
    assert names and all(n.startswith("encoders.text.transformer.encoder.layer.") for n in names)
    assert learner.inner_lr(names[0], 0) == 0.01 and learner.inner_lr("head.weight", 0) == 0.5
    b = text_batch(bert)
    _, fast, _ = learner.adapt(b, 1, create_graph=False, detach=True)
    before = dict(learner.model.named_parameters())
    assert all(not torch.equal(fast[n], before[n]) for n in names)  # every layer took an inner step


def test_second_order_through_checkpointed_layers_matches_finite_differences(bert, doubles):
    """Checkpointing recomputes each layer with the inner loop's fast weights, so second-order MAML
    over the whole encoder is exact, and equal to the stored-activation gradient."""
    b = text_batch(bert)
    grads = check_against_fd(text_learner(bert, "maml", checkpointing=True, encoder_lr=0.05), [b])
    stored = meta_grads(text_learner(bert, "maml", encoder_lr=0.05), [b])
    assert set(grads) == set(stored) and any(k.startswith("model.encoders.text.") for k in grads)
    for k in stored:
        assert torch.allclose(grads[k], stored[k], atol=1e-10), k


@pytest.mark.parametrize("method", ["fomaml", "reptile"])
def test_first_order_methods_train_every_layer_the_same_with_checkpointing(bert, method, doubles):
    b = text_batch(bert)
    grads = meta_grads(text_learner(bert, method, checkpointing=True, encoder_lr=0.05), [b])
    stored = meta_grads(text_learner(bert, method, encoder_lr=0.05), [b])
    layers = [k for k in stored if k.startswith("model.encoders.text.transformer.encoder.layer.")]
    assert len(layers) == sum(1 for n, p in text_learner(bert, method).model.named_parameters() if p.requires_grad
                              and n.startswith("encoders.text."))  # every trainable tensor
    for k in stored:
        assert torch.allclose(grads[k], stored[k], atol=1e-10), k


@needs_data
def test_a_recipe_meta_learns_and_adapts_the_whole_encoder_in_the_inner_loop(bert, tmp_path, run_cli):
    """Train (FOMAML, every layer in the inner loop, checkpointed), then ``adapt`` runs the same inner
    loop over the encoder on the new task's support set, and ``predict`` uses the adapted layers."""
    from mtl.run.checkpoint import load_checkpoint

    recipe = write(tmp_path / "r.yaml", f"""\
method: fomaml
tasks: [clinc150-banking, clinc150-home]
val_tasks: [clinc150-travel]
ways: 3
shots: 2
queries: 2
meta_batch: 2
iterations: 2
val_every: 2
val_episodes: 2
encoder_lr: 0.0001
inner: {{steps: 1, lr: 0.1, encoder_lr: 0.01, adapt: all, head_init: proto}}
model: {{trunk: [], text_encoder: '{bert}', text_trainable_layers: 2, text_checkpointing: true}}
threads: 2
device: cpu
""")
    code, _, err = run_cli("train", "--config", recipe, "--out", tmp_path / "run", "--json")
    assert code == 0, err
    code, _, err = run_cli("adapt", "--task", "clinc150-work", "--checkpoint", tmp_path / "run", "--shots", 2,
                             "--steps", 2, "--out", tmp_path / "m", "--json")
    assert code == 0, err
    trained, _ = load_checkpoint(tmp_path / "run")
    adapted, _ = load_checkpoint(tmp_path / "m")
    key = "encoders.text.transformer.encoder.layer.1.output.dense.weight"
    (saved,) = [k for k in adapted if k.endswith(key)]
    assert not torch.equal(adapted[saved], trained[f"learner.model.{key}"])  # the inner loop moved the layer
    code, out, err = run_cli("predict", "--model", tmp_path / "m", "--json", "book a meeting with my team")
    assert code == 0, err
    classes = json.loads((tmp_path / "m" / "model.json").read_text())["classes"]
    assert json.loads(out)["predictions"][0]["label"] in classes


def test_encoder_fine_tuning_lr_defaults_by_the_encoders_width(bert):
    """2e-4 for MiniLM (384 wide); a 16-wide encoder 24 times that; a given learning rate as given."""
    from mtl.run.text_finetune import encoder_lr_for

    assert encoder_lr_for("minilm") == pytest.approx(2e-4)
    assert encoder_lr_for(str(bert)) == pytest.approx(2e-4 * 384 / 16)
    assert encoder_lr_for(str(bert), 5e-5) == 5e-5
