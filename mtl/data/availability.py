"""Which data files each task needs, whether they are here (and where), and fetching them:
``cli.py data status`` and ``cli.py data fetch``. Reads task files only, never the data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mtl import settings
from mtl.data.fetch import entries_under, fetch, urls_of
from mtl.data.registry import Registry
from mtl.data.schema import Download, Source, TaskSpec


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
                rows.append({"task": name, "file": src.dataset, "present": hub_cached(src), "where": origin,
                             "size": None, "source": origin})
        for rel, d in files_of(spec):
            found = where(rel)
            rows.append({"task": name, "file": rel, "present": found is not None,
                         "where": str(found) if found else None,
                         "size": _size(found) if found else (d.size if d else None),
                         "source": urls_of(rel, d)[0] if d else None})
    return rows


def hub_cached(src: Source) -> bool:
    """Whether a hub data set loads without the network: a local folder, or already in `datasets`' cache
    (asked of `datasets` itself with the hub switched off, which answers in about a second)."""
    if src.format != "hub" or Path(str(src.dataset)).expanduser().is_dir():
        return True
    import datasets

    from mtl.data.formats import load_hub

    was = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        load_hub(src)
        return True
    except Exception:  # any failure means "not loadable offline"
        return False
    finally:
        datasets.config.HF_HUB_OFFLINE = was


def missing(spec: TaskSpec) -> list[str]:
    hub = [f"hub:{src.dataset}" for src in spec.sources if src.format == "hub" and not hub_cached(src)]
    return hub + [rel for rel, _ in files_of(spec) if where(rel) is None]


def fetch_tasks(registry: Registry, names: list[str]) -> list[dict[str, Any]]:
    """Download every missing file of the named tasks; returns what was fetched."""
    done = []
    for name in names:
        for src in registry.spec(name).sources:
            if src.format == "hub" and not hub_cached(src):
                from mtl.data.formats import load_hub

                load_hub(src)  # `datasets` downloads it into its own cache
                done.append({"task": name, "file": f"hub:{src.dataset}", "where": "HF_HOME", "size": None})
        for rel, d in files_of(registry.spec(name)):
            if where(rel) is None and d is not None:
                path = fetch(rel, d)
                done.append({"task": name, "file": rel, "where": str(path), "size": path.stat().st_size})
    return done
