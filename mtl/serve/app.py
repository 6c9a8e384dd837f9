"""``cli.py serve``: an adapted model loaded once behind ``POST /predict``, ``GET /health`` and
``GET /info``.

Requests are validated by pydantic (a bad one is a 4xx with a one-line reason); inference runs on
one worker thread that batches whatever requests are waiting into one forward pass
(:mod:`mtl.serve.batcher`), so concurrent clients neither oversubscribe the cores nor queue for a
pass each. Any failure inside a request is a 4xx/5xx answer, never a dead server.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from mtl.errors import MtlError
from mtl.run.adapted import AdaptedModel
from mtl.run.given_inputs import first_blank

MAX_BATCH = 256  # inputs in one request
MAX_TEXT = 10_000  # characters of one text


class PredictRequest(BaseModel):
    """The body of ``POST /predict``: texts for a text model, base64-encoded image files for an image model."""

    model_config = ConfigDict(extra="forbid")
    texts: list[str] | None = Field(default=None, description="Texts to label (a text model).")
    images: list[str] | None = Field(default=None, description="Base64-encoded image files (an image model).")
    top: int = Field(default=1, ge=1, le=100, description="Labels to list per input.")


def _require_fastapi() -> Any:
    try:
        import fastapi
    except ImportError:
        raise MtlError("`serve` needs FastAPI and uvicorn", "pip install 'mtl-fewshot[serve]'") from None
    return fastapi


def model_card(model: AdaptedModel, folder: str) -> dict[str, Any]:
    """What a caller needs to trust the answers: the task and labels, how the model was adapted and
    from which checkpoint, its measured accuracy and calibration, and when it answers ``none``."""
    m = model.meta
    keys = ("task", "modality", "shots", "algorithm", "checkpoint", "selection", "views", "shared_norms",
            "calibration", "rejection", "test_accuracy", "test_ci95", "test_examples", "test_ece",
            "test_ece_uncalibrated", "open_set")
    return {"model": folder, "labels": model.classes, **{k: m.get(k) for k in keys}}


def create_app(model: AdaptedModel, folder: str = "", max_batch: int = MAX_BATCH) -> Any:
    """The FastAPI application serving ``model`` (already loaded)."""
    fastapi = _require_fastapi()
    from fastapi import HTTPException
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    from mtl.serve.batcher import Batcher

    batcher = Batcher(model, max_batch)

    @contextlib.asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        yield
        batcher.close()

    app = fastapi.FastAPI(title="mtl", description=f"An adapted model for task '{model.meta.get('task')}'.",
                          lifespan=lifespan)
    app.state.batcher = batcher
    card = model_card(model, folder)
    started = time.time()

    @app.exception_handler(RequestValidationError)
    async def one_line(_: Any, exc: RequestValidationError) -> JSONResponse:
        e = exc.errors()[0]
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        fix = ""
        if e.get("type") in ("extra_forbidden", "model_attributes_type", "json_invalid"):  # {"inputs": ...}, [...]
            want = "texts" if model.modality == "text" else "images"
            fix = f" (the body takes `{want}`, a list, and `top`: {{\"{want}\": [...], \"top\": 1}})"
        return JSONResponse(status_code=422, content={"detail": f"{where}: {e.get('msg', 'invalid')}{fix}"})

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "uptime_s": round(time.time() - started, 1)}

    @app.get("/info")
    def info() -> dict[str, Any]:
        return card

    @app.post("/predict")
    def predict(req: PredictRequest) -> dict[str, Any]:
        x, shown = _inputs(model, req.texts, req.images, max_batch, HTTPException)
        try:
            rows = batcher.rows(x, shown, req.top)
        except MtlError as e:
            raise HTTPException(422, str(e).splitlines()[0]) from None
        for r in rows:
            if model.modality == "image":
                r.pop("input")
        return {"predictions": rows}

    return app


def _inputs(model: AdaptedModel, texts: list[str] | None, images: list[str] | None, max_batch: int,
            http_error: Any) -> tuple[Any, list[str]]:
    import numpy as np

    from mtl.data.images import prepare_images
    from mtl.data.schema import ImageOptions

    want, other = ("texts", "images") if model.modality == "text" else ("images", "texts")
    given = texts if model.modality == "text" else images
    if (texts if other == "texts" else images) is not None:
        raise http_error(422, f"this model labels {model.modality}s: send `{want}`, not `{other}`")
    if not given:
        raise http_error(422, f"`{want}` is missing or empty: send a list of one or more")
    if len(given) > max_batch:
        raise http_error(413, f"{len(given)} inputs in one request; the limit is {max_batch}")
    if model.modality == "text":
        long = next((i for i, t in enumerate(given) if len(t) > MAX_TEXT), None)
        if long is not None:
            raise http_error(413, f"texts[{long}] has {len(given[long]):,} characters; the limit is {MAX_TEXT:,}")
        blank = first_blank(given)
        if blank is not None:
            raise http_error(422, f"texts[{blank}] is empty: send the text to label")
        return np.asarray(given, dtype=np.str_), list(given)
    blobs = []
    for i, b64 in enumerate(given):
        try:
            blobs.append(base64.b64decode(b64, validate=True))
        except (binascii.Error, ValueError):
            raise http_error(422, f"images[{i}] is not base64") from None
    try:
        arr = prepare_images(blobs, ImageOptions.model_validate(model.meta["image"]),
                             [f"images[{i}]" for i in range(len(blobs))])
    except MtlError as e:
        raise http_error(422, str(e).splitlines()[0]) from None
    return arr, [f"images[{i}]" for i in range(len(blobs))]


def serve(folder: Path | str, host: str = "127.0.0.1", port: int = 8000, device: str = "auto",
          ready: Callable[[], None] | None = None) -> None:
    """Load the adapted model in ``folder`` once and serve it until interrupted; ``ready`` is called once the
    address is free and the model loaded (the CLI says where it serves)."""
    _require_fastapi()
    import uvicorn

    from mtl.device import resolve_device

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:  # as uvicorn will bind
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            raise MtlError(f"cannot listen on {host}:{port} ({e.strerror})",
                           "use another --host or --port, or stop what listens there") from None
    model = AdaptedModel.load(folder, resolve_device(device))
    if ready:
        ready()
    uvicorn.run(create_app(model, str(folder)), host=host, port=port, log_level="warning")
