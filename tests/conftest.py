"""Shared fixtures. Tests that need the real data skip when ``MTL_DATA_DIR`` has none of it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded while testing
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MTL_OFFLINE", "1")  # a data file missing here is an error, never a download
if os.environ.get("PYTEST_XDIST_WORKER"):  # parallel workers share the cores: one thread each, subprocesses too
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MTL_MAX_THREADS", "1")

from mtl import settings
from mtl.cli import main
from mtl.data.registry import Registry

HAS_DATA = (settings.data_dir() / "MANIFEST.md").exists()
needs_data = pytest.mark.skipif(not HAS_DATA, reason="real datasets not found (set MTL_DATA_DIR)")


@pytest.fixture(scope="session")
def registry() -> Registry:
    return Registry()


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]):
    """Run the CLI in-process: returns (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
