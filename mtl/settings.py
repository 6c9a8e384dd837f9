"""Where data, caches and task folders live: one place, overridable by environment variables.

``MTL_DATA_DIR``   root that relative ``source`` paths in task files resolve against
                   (default: ``../shared/datasets`` when it exists, else ``~/.cache/mtl/data``).
``MTL_CACHE_DIR``  decoded-example and embedding caches, and downloaded data files under ``data/``
                   (default ``~/.cache/mtl``).
``MTL_DATA_MIRROR`` fetch data files from ``URL/<path>`` instead of their original hosts.
``MTL_OFFLINE``    never download; a missing file is one line saying where to put it.
``MTL_TASKS_DIRS`` extra registry folders, separated by ``os.pathsep``.
``MTL_SAFE``       when set, task files cannot point outside ``MTL_DATA_DIR`` nor at the hub.
``MTL_MAX_THREADS`` at most this many CPU threads per process, whatever a recipe's ``threads`` asks
                   (several jobs sharing a machine; the test suite's parallel workers).
"""

from __future__ import annotations

import os
from pathlib import Path

from mtl.errors import MtlError

PACKAGE_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_ROOT.parent
# a checkout keeps them at its top level; an installed wheel carries them as mtl/_shipped/ (setup.py)
SHIPPED = REPO_ROOT if (REPO_ROOT / "tasks").is_dir() else PACKAGE_ROOT / "_shipped"
BUILTIN_TASKS_DIR = SHIPPED / "tasks"
BUILTIN_CONFIGS_DIR = SHIPPED / "configs"


def _user_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mtl"


def data_dir() -> Path:
    """The data root; ``../shared/datasets`` beside the checkout or the working directory wins."""
    if env := os.environ.get("MTL_DATA_DIR"):
        return Path(env).expanduser().resolve()
    for base in (Path.cwd(), REPO_ROOT):
        candidate = (base / ".." / "shared" / "datasets").resolve()
        if candidate.is_dir():
            return candidate
    return _user_cache() / "data"


def safe_mode() -> bool:
    """``MTL_SAFE=1`` (or ``cli.py --safe``): task files may only name files inside the data directory."""
    return os.environ.get("MTL_SAFE", "") not in ("", "0", "false")


def max_threads() -> int | None:
    """A cap on CPU threads: processes sharing cores each spinning up all of them run several times slower."""
    env = os.environ.get("MTL_MAX_THREADS", "").strip()
    if not env.isdigit():
        if env:
            raise MtlError(f"MTL_MAX_THREADS={env!r} is not a number of threads. Fix: set it to a whole number "
                           "such as 1 or 2, or unset it (0 or unset: no cap).")
        return None
    return int(env) or None


def cache_dir() -> Path:
    if env := os.environ.get("MTL_CACHE_DIR"):
        return Path(env).expanduser().resolve()
    return _user_cache()


def download_dir() -> Path:
    """Where data files missing from the data directory are downloaded (:mod:`mtl.data.fetch`)."""
    return cache_dir() / "data"


def tasks_dirs(extra: list[Path] | None = None, include_builtin: bool = True) -> list[Path]:
    """Registry folders: the shipped ``tasks/``, then ``MTL_TASKS_DIRS``, then ``--tasks-dir`` ones."""
    dirs: list[Path] = [BUILTIN_TASKS_DIR] if include_builtin and BUILTIN_TASKS_DIR.is_dir() else []
    if env := os.environ.get("MTL_TASKS_DIRS"):
        dirs += [Path(p).expanduser() for p in env.split(os.pathsep) if p]
    dirs += [Path(p).expanduser() for p in extra or []]
    seen: set[Path] = set()
    unique = []
    for d in dirs:
        key = d.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(d)
    return unique
