"""``data status`` and ``data fetch``: where each task's data files are, and downloading them."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Column, Table

from mtl import settings
from mtl.cli.common import Json, TasksDir, _print_json, _registry, data_app, out
from mtl.errors import MtlError


@data_app.command("status")
def data_status(names: Annotated[list[str] | None, typer.Argument(help="Tasks (default: all).")] = None,
                tasks_dir: TasksDir = None, as_json: Json = False) -> None:
    """Every file each task reads: present or missing, where, size, and where it comes from."""
    from mtl.data.availability import status

    rows = status(_registry(tasks_dir), names)
    if as_json:
        _print_json({"files": rows, "data_dir": str(settings.data_dir()), "cache": str(settings.download_dir())})
        return
    table = Table(Column("task", overflow="fold", min_width=min(32, max((len(r["task"]) for r in rows), default=4))),
                  *(Column(h, overflow="fold") for h in ("file", "status", "where", "size", "source")),
                  title=f"data: {settings.data_dir()}, then {settings.download_dir()}")
    for r in rows:
        size = f"{r['size'] / 2**20:.1f} MB" if r["size"] else "-"
        table.add_row(escape(r["task"]), escape(str(r["file"])), "present" if r["present"] else "[red]missing[/red]",
                      escape(r["where"] or "-"), size, escape(r["source"] or "-"))
    out.print(table)


@data_app.command("fetch")
def data_fetch(names: Annotated[list[str] | None, typer.Argument(help="Tasks whose data to download.")] = None,
               every: Annotated[bool, typer.Option("--all", help="Every task of the registry.")] = False,
               tasks_dir: TasksDir = None, as_json: Json = False) -> None:
    """Download the missing data files of the named tasks (or --all) into the cache, checksummed."""
    from mtl.data.availability import fetch_tasks

    reg = _registry(tasks_dir)
    if not names and not every:
        raise MtlError("no task named", "give task names, or --all")
    done = fetch_tasks(reg, reg.names() if every else list(names or []))
    if as_json:
        _print_json({"fetched": done})
        return
    for d in done:
        out.print(f"fetched {d['file']} -> {d['where']} ({d['size']:,} bytes)", highlight=False)
    out.print(f"{len(done)} files fetched; every file of {'all tasks' if every else ', '.join(names or [])} is here",
              highlight=False)
