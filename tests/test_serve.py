"""``serve``: the HTTP API started on 127.0.0.1 inside the test, answering what ``predict`` answers,
refusing bad requests with a 4xx and a one-line reason, and surviving bounded concurrent clients."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import needs_data

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
ROOT = Path(__file__).parents[1]


def adapted(config: str, task: str, shots: int, out: Path):
    """A ProtoNet model (no meta-training needed for a frozen sentence encoder) adapted and saved."""
    from mtl.data.registry import Registry
    from mtl.run.adapt import fit, views_for
    from mtl.run.adapted import AdaptedModel
    from mtl.run.learner import build_learner
    from mtl.run.recipe import load_recipe
    from mtl.run.support import support_from_task

    recipe = load_recipe(ROOT / "configs" / config, {"method": "protonet"})
    t = Registry().load(task)
    learner = build_learner(recipe, [t.modality], {})
    fit(learner, support_from_task(t, shots, 0), views=views_for(None, t.modality)).save(out)  # as adapt does
    return AdaptedModel.load(out), t


class Server:
    """uvicorn in a thread on 127.0.0.1, an OS-chosen port; stopped (bounded) when the test ends."""

    def __init__(self, app) -> None:
        import uvicorn

        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started and time.time() < deadline:
            time.sleep(0.05)
        assert self.server.started, "server did not start"
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def call(self, path: str, body: bytes | dict | list | None = None) -> tuple[int, dict]:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def text_server(tmp_path_factory):
    from mtl.serve import create_app

    folder = tmp_path_factory.mktemp("served")
    model, task = adapted("clinc150_protonet.yaml", "clinc150-work", 5, folder / "m")
    server = Server(create_app(model, str(folder / "m")))
    yield server, model, task
    server.stop()


@needs_data
def test_health_info_and_predict_answer_as_the_model_does(text_server):
    server, model, task = text_server
    assert server.call("/health") == (200, server.call("/health")[1]) and server.call("/health")[1]["status"] == "ok"
    code, info = server.call("/info")
    assert code == 200 and info["labels"] == model.classes and info["task"] == "clinc150-work"
    assert info["calibration"]["temperature"] > 0 and info["rejection"]["score"] == "distance"
    assert info["test_accuracy"] is None or 0 <= info["test_accuracy"] <= 1
    texts = [*task.test.inputs[:40].tolist(), "what's the weather like in paris", "play some jazz"]
    code, body = server.call("/predict", {"texts": texts, "top": 3})
    assert code == 200
    rows = body["predictions"]
    # as the model answers in this thread: the same numbers up to the last bits that another thread's
    # OpenMP team may round differently, so the same label wherever the decision is not on a knife's edge
    probs, scores, _ = model.decide(texts)
    assert np.allclose([r["probability"] for r in rows], probs.max(1), atol=1e-4)
    assert np.allclose([r["score"] for r in rows], scores, atol=1e-3)
    top2 = np.sort(probs, 1)[:, -2:]
    clear = (np.abs(scores - model.rejection.threshold) > 1e-3) & (top2[:, 1] - top2[:, 0] > 1e-4)
    assert clear.sum() >= len(texts) - 2
    assert [r["label"] for r, c in zip(rows, clear, strict=True) if c] == model.predict(texts)[clear].tolist()
    assert all(len(r["top"]) == 3 and 0 <= r["probability"] <= 1 for r in rows)
    assert any(r["label"] == "none" and r["rejected"] for r in rows)  # refused by the support-set threshold


@needs_data
@pytest.mark.parametrize("body, status, says", [
    ({}, 422, "`texts` is missing"),
    ({"texts": []}, 422, "`texts` is missing or empty"),
    ({"images": ["aGk="]}, 422, "send `texts`, not `images`"),
    ({"texts": "one text"}, 422, "texts: Input should be a valid list"),
    ({"texts": [1, 2]}, 422, "texts.0: Input should be a valid string"),
    ({"texts": ["x"], "top": 0}, 422, "top: Input should be greater than or equal to 1"),
    ({"texts": ["x"], "shots": 3}, 422, "shots: Extra inputs are not permitted"),
    ({"inputs": ["x"]}, 422, 'inputs: Extra inputs are not permitted (the body takes `texts`, a list, and `top`'),
    ({"texts": ["x"] * 300}, 413, "300 inputs in one request; the limit is 256"),
    ({"texts": ["x" * 20_000]}, 413, "texts[0] has 20,000 characters"),
    ({"texts": ["book a table", "  "]}, 422, "texts[1] is empty"),
    (b"{not json", 422, "JSON decode error (the body takes `texts`, a list"),
    (["book a table"], 422, "body: Input should be a valid dictionary or object to extract fields from (the body "
                            'takes `texts`, a list, and `top`: {"texts": [...], "top": 1})'),
])
def test_bad_requests_get_a_4xx_with_one_line(text_server, body, status, says):
    server, _, _ = text_server
    code, answer = server.call("/predict", body)
    assert code == status and says in answer["detail"] and "\n" not in answer["detail"], answer
    assert server.call("/health")[0] == 200  # the server lives on


@needs_data
def test_concurrent_clients_all_answered_the_same(text_server):
    server, model, task = text_server
    texts = task.test.inputs[:32].tolist()
    expected = model.predict(texts).tolist()

    def client(i: int) -> list[str]:
        batch = texts[i % 32: i % 32 + 1] if i % 2 else texts
        code, body = server.call("/predict", {"texts": batch})
        assert code == 200
        return [r["label"] for r in body["predictions"]]

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(client, range(64)))
    for i, got in enumerate(answers):
        assert got == (expected[i % 32: i % 32 + 1] if i % 2 else expected)


@needs_data
def test_an_image_model_takes_base64_images_and_refuses_a_corrupt_one(tmp_path):
    from PIL import Image

    from mtl.serve import create_app

    model, task = adapted("quickstart.yaml", "olivetti", 3, tmp_path / "m")
    server = Server(create_app(model, str(tmp_path / "m")))
    try:
        blobs = []
        for img in task.test.inputs[:6]:
            buf = io.BytesIO()
            Image.fromarray(np.asarray(img)).save(buf, format="PNG")
            blobs.append(base64.b64encode(buf.getvalue()).decode())
        code, body = server.call("/predict", {"images": blobs})
        assert code == 200 and len(body["predictions"]) == 6
        labels = [r["label"] for r in body["predictions"]]
        assert labels == model.predict(task.test.inputs[:6]).tolist()
        assert server.call("/info")[1]["views"] == 8  # images: the 8 views answer together (adapt's default)
        code, body = server.call("/predict", {"images": [base64.b64encode(b"not an image").decode()]})
        assert code == 422 and "images[0]" in body["detail"]
        code, body = server.call("/predict", {"images": ["***"]})
        assert code == 422 and "not base64" in body["detail"]
    finally:
        server.stop()
    # the inference thread ends with the server: left alive, its OpenMP team would halve later training's speed
    assert not server.app.state.batcher.worker.is_alive()


def test_a_port_already_in_use_is_one_line_before_the_model_loads(tmp_path, run_cli):
    import socket

    with socket.socket() as taken:  # a listener of this test's own, on 127.0.0.1
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = run_cli("serve", "--model", tmp_path / "not-loaded-yet", "--port", port)
    assert code == 2 and f"cannot listen on 127.0.0.1:{port}" in err and len(err.strip().splitlines()) == 1, err
