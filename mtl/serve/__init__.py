"""An adapted model behind an HTTP JSON API (FastAPI + uvicorn, the ``serve`` extra)."""

from mtl.serve.app import create_app, serve

__all__ = ["create_app", "serve"]
