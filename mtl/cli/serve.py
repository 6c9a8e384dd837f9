"""``serve``: an adapted model behind an HTTP JSON API."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mtl.cli.common import Device, app, err


@app.command("serve")
def serve(model: Annotated[Path, typer.Option("--model", help="Folder written by `adapt`.")],
          host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
          port: Annotated[int, typer.Option(help="Port to listen on.", min=1, max=65535)] = 8000,
          device: Device = "auto") -> None:
    """Serve an adapted model: POST /predict, GET /health, GET /info (needs the `serve` extra)."""
    from mtl.serve import serve as run_server

    run_server(model, host, port, device, ready=lambda: err.print(
        f"serving {model} on http://{host}:{port} (POST /predict with {{\"texts\": [...]}}, or {{\"images\": "
        "[base64 files]} for an image model; GET /health, GET /info); Ctrl-C stops", highlight=False, markup=False))
