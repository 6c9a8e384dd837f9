"""Which data files each task needs, whether they are here (and where), and fetching them:
``cli.py data status`` and ``cli.py data fetch``. Reads task files only, never the data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mtl import settings
from mtl.data.fetch import entries_under, fetch, urls_of
from mtl.data.registry import Registry
from mtl.data.schema import Download, TaskSpec


def files_of(spec: TaskSpec) -> list[tuple[str, Download | None]]:
    """The files (paths relative to the data directory) a task reads, each with its download entry;
    a folder with download entries is listed as the files below it."""
    out: list[tuple[str, Download | None]] = []
    for src in spec.sources:
        paths = [p for v in (src.files or {}).values() for p in ([v] if isinstance(v, str) else v)]
        paths += [src.path] if isinstance(src.path, str) else list(src.path or [])
        for p in paths:
            if Path(p).expanduser().is_absolute():
                out.append((p, None))
                continue
            entries = entries_under(p, src.download)
            out += list(entries.items()) if entries else [(p, None)]
    return list({rel: (rel, d) for rel, d in out}.values())


def where(rel: str) -> Path | None:
    """Where a data file is: the data directory, the download cache, or nowhere."""
    for base in (settings.data_dir(), settings.download_dir()):
        if (base / rel).exists():
            return base / rel
    p = Path(rel).expanduser()
    return p if p.is_absolute() and p.exists() else None


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def status(registry: Registry, names: list[str] | None = None) -> list[dict[str, Any]]:
    """One row per (task, file): present or missing, where, size, where it comes from."""
    rows = []
    for name in names or registry.names():
        spec = registry.spec(name)
        for src in spec.sources:
            if src.format in ("hub", "sklearn"):
                origin = f"{src.format}: {src.dataset}" + (f"@{src.revision}" if src.revision else "")
                rows.append({"task": name, "file": src.dataset, "present": src.format == "sklearn", "where": origin,
                             "size": None, "source": origin})
        for rel, d in files_of(spec):
            found = where(rel)
            rows.append({"task": name, "file": rel, "present": found is not None,
                         "where": str(found) if found else None,
                         "size": _size(found) if found else (d.size if d else None),
                         "source": urls_of(rel, d)[0] if d else None})
    return rows


def missing(spec: TaskSpec) -> list[str]:
    return [rel for rel, _ in files_of(spec) if where(rel) is None]


def fetch_tasks(registry: Registry, names: list[str]) -> list[dict[str, Any]]:
    """Download every missing file of the named tasks; returns what was fetched."""
    done = []
    for name in names:
        for rel, d in files_of(registry.spec(name)):
            if where(rel) is None and d is not None:
                path = fetch(rel, d)
                done.append({"task": name, "file": rel, "where": str(path), "size": path.stat().st_size})
    return done
