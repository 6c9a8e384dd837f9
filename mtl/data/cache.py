"""On-disk cache of decoded arrays, keyed by what produced them, written atomically."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np

from mtl import settings

CACHE_VERSION = 1


def key_of(parts: object) -> str:
    blob = json.dumps([CACHE_VERSION, parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def atomic_write_bytes(path: Path, data: bytes | Callable[[BinaryIO], object]) -> None:
    """Write ``data`` (bytes, or a function that writes to the open file) through a temporary file in
    the same folder and rename it over ``path``: readers see the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, bytes):
                f.write(data)
            else:
                data(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cached_arrays(kind: str, parts: object, build: Callable[[], dict[str, np.ndarray]],
                  valid: Callable[[dict[str, np.ndarray]], bool] | None = None) -> dict[str, np.ndarray]:
    """Return the arrays cached under ``parts``, building and storing them on a miss, or where ``valid``
    says the cached arrays are out of date (files they were built from that ``parts`` cannot name)."""
    path = settings.cache_dir() / kind / f"{key_of(parts)}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            if valid is None or valid(arrays):
                return arrays
        except (OSError, ValueError, EOFError):
            path.unlink(missing_ok=True)  # a damaged cache entry is rebuilt, never trusted
    arrays = build()
    with contextlib.suppress(OSError):  # a read-only or full cache folder only costs speed
        atomic_write_bytes(path, lambda f: np.savez(f, **arrays))
    return arrays
