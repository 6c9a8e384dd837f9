"""The ``mtl`` command line (also ``python cli.py``): Typer commands over the library, one module per
group of commands (``tasks``, ``data``, ``run``, ``listing``, ``serve``); each parses its arguments, calls one
library function and prints.

Every command turns :class:`~mtl.errors.MtlError` into one line on stderr and exit code 2;
``--json`` prints exactly one JSON object on stdout.
"""

from __future__ import annotations

import errno
import sys

import click

from mtl.cli import data, listing, run, serve, tasks  # noqa: F401  (each module adds its commands to the app)
from mtl.cli.common import app, err
from mtl.errors import MtlError


def _click(name: str) -> tuple[type[BaseException], ...]:
    """Click's exception class ``name`` and Typer's own: Typer 0.2x vendors click, so a usage error (an
    unknown option, a missing argument) raises a class that plain ``click`` does not know."""
    import typer

    classes = [getattr(click.exceptions, name), getattr(typer, name, None)]
    try:
        from typer._click import exceptions as vendored

        classes.append(getattr(vendored, name, None))
    except ImportError:
        pass
    return tuple(c for c in classes if c is not None)


EXIT, ABORT, USAGE = _click("Exit"), _click("Abort"), _click("ClickException")


MEMORY_FIX = ("ask for less at once: a smaller meta_batch, inner.batch_tasks or inner.steps in the recipe, "
              "inner.recompute: true or inner.query_chunks: 3 (the same meta-gradient in less memory), "
              "fewer shots or a smaller --encoder-layers when adapting; or use --device cpu")


def _out_of_memory(e: BaseException) -> bool:
    """A GPU's (torch.OutOfMemoryError) or the CPU allocator's failure: a setting to change, not a bug."""
    return type(e).__name__ == "OutOfMemoryError" or "can't allocate memory" in str(e)


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors become one line and exit code 2, never a traceback."""
    try:
        code = app(args=argv, standalone_mode=False)
    except MtlError as e:
        for line in str(e).splitlines():
            err.print(f"error: {line}", highlight=False, markup=False, soft_wrap=True)
        return 2
    except EXIT as e:
        return e.exit_code  # type: ignore[attr-defined]
    except ABORT:
        err.print("aborted", highlight=False)
        return 130
    except USAGE as e:
        e.show()  # type: ignore[attr-defined]
        return e.exit_code  # type: ignore[attr-defined]
    except KeyboardInterrupt:
        err.print("interrupted", highlight=False)
        return 130
    except Exception as e:  # a bug: still one line, with the way to see more
        import os

        if os.environ.get("MTL_DEBUG"):
            raise
        first = str(e).splitlines()[0] if str(e) else ""
        if isinstance(e, OSError) and (e.filename is not None or e.errno == errno.ENOSPC):  # the file system's
            name = str(e.filename)  # refusal (a path too long, no permission, a full disk): not a bug
            where = "" if e.filename is None else f": '{name if len(name) <= 80 else name[:77] + '...'}'"
            err.print(f"error: {e.strerror or first}{where}. Fix: check the path, its permissions and the free "
                      "disk space", highlight=False, markup=False, soft_wrap=True)
            return 2
        if _out_of_memory(e):
            err.print(f"error: out of memory ({first}). Fix: {MEMORY_FIX}", highlight=False, markup=False,
                      soft_wrap=True)
            return 2
        err.print(f"error: internal error {type(e).__name__}: {first}. Fix: run again with MTL_DEBUG=1 for the "
                  "traceback and report it", highlight=False, markup=False, soft_wrap=True)
        return 1
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
