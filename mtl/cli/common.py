"""What every command shares: the Typer apps, the consoles, common options, JSON output."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import numpy as np
import typer
from rich.console import Console

from mtl import settings

if TYPE_CHECKING:
    from rich.status import Status

app = typer.Typer(help="Multi-task learning with a MAML initialization.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
tasks_app = typer.Typer(help="List, inspect and validate the task registry.", no_args_is_help=True)
data_app = typer.Typer(help="Where each task's data files are, and fetching them.", no_args_is_help=True)
app.add_typer(tasks_app, name="tasks")
app.add_typer(data_app, name="data")

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def _one_line(message: Warning | str, category: type[Warning], filename: str, lineno: int,
              line: str | None = None) -> str:
    """A warning as one line on stderr, as the commands' errors are, without the source line."""
    return f"warning: {message}\n"


warnings.formatwarning = _one_line


@app.callback()
def _root(safe: Annotated[bool, typer.Option("--safe", help="Task files may only read files inside MTL_DATA_DIR.")]
          = False) -> None:
    """Multi-task learning with a MAML initialization."""
    if safe:
        import os

        os.environ["MTL_SAFE"] = "1"


TasksDir = Annotated[list[Path] | None, typer.Option(
    "--tasks-dir", help="Extra folder of task YAML files (repeatable; also MTL_TASKS_DIRS).")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]


def _registry(tasks_dir: list[Path] | None):
    from mtl.data.registry import Registry

    return Registry(settings.tasks_dirs(tasks_dir))


def _print_json(obj: object) -> None:
    sys.stdout.write(json.dumps(obj, sort_keys=True, default=_jsonable) + "\n")


def _jsonable(o: object) -> object:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


Device = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")]
SharedNorms = Annotated[bool, typer.Option(
    "--shared-norms/--own-norms", help="Images with views: normalise every view with the batch-norm statistics of "
    "the support set in all views (default), or each view with its own.")]


class _StatusHandler(logging.Handler):
    """Shows each progress message of the library (logger ``mtl``, level INFO) on a rich spinner."""

    def __init__(self, status: Status) -> None:
        super().__init__(logging.INFO)
        self.status = status

    def emit(self, record: logging.LogRecord) -> None:
        self.status.update(f"{record.getMessage()}...")


@contextlib.contextmanager
def progress(first: str, quiet: bool = False) -> Iterator[None]:
    """Within the block, what the library is doing, on a spinner on stderr (a terminal only, not with
    ``quiet``): an ``adapt --select`` of a 77-class task runs for minutes."""
    if quiet or not err.is_terminal:
        yield
        return
    logger = logging.getLogger("mtl")
    with err.status(f"{first}...") as status:
        handler, level = _StatusHandler(status), logger.level
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        try:
            yield
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
