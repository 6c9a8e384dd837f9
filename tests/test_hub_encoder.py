"""A text encoder named by its Hugging Face hub id: resolved through huggingface_hub's cache (a local
folder in the cache's layout stands in for a download), safetensors only, one line when it cannot be had."""

from __future__ import annotations

import shutil

import pytest
import torch

from mtl.data import embeddings
from mtl.errors import MtlError

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("MTL_OFFLINE", "1")
    embeddings.hub_model.cache_clear()
    yield tmp_path
    embeddings.hub_model.cache_clear()


def publish(cache, repo: str, files: dict[str, bytes] | None = None) -> None:
    """The cache's layout: models--owner--name/{refs/main, snapshots/<commit>/<files>}."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)
    if files is None:
        src = embeddings.model_path("minilm")
        for f in src.iterdir():
            if f.is_file():
                shutil.copy(f, snap / f.name)
    else:
        for name, data in files.items():
            (snap / name).write_bytes(data)


def test_a_hub_id_loads_from_the_cache_offline_and_embeds_like_the_same_model(hub_cache):
    publish(hub_cache, "acme/minilm-copy")
    folder = embeddings.model_path("acme/minilm-copy")
    assert folder.name == COMMIT and (folder / "model.safetensors").exists()
    assert embeddings.encoder_dim("acme/minilm-copy") == 384
    texts = ["book a table for two", "what's my balance"]
    got = embeddings.embed_texts(texts, "acme/minilm-copy", cache=False)
    assert torch.allclose(got, embeddings.embed_texts(texts, "minilm", cache=False))
    assert embeddings.model_path(f"acme/minilm-copy@{COMMIT}") == folder  # a pinned revision


def test_a_hub_id_out_of_reach_or_pickled_is_one_line(hub_cache):
    with pytest.raises(MtlError, match=r"'acme/absent' cannot be had \(offline and not in the Hugging Face cache\)"):
        embeddings.model_path("acme/absent")
    publish(hub_cache, "acme/pickled", {"config.json": b"{}", "vocab.txt": b"a\n"})  # no *.safetensors
    with pytest.raises(MtlError, match="no safetensors weights"):
        embeddings.model_path("acme/pickled")
    with pytest.raises(MtlError, match="hub id"):
        embeddings.model_path("not a model")
