"""Errors that reach the user as one line: what is wrong and how to fix it.

The CLI catches :class:`MtlError` and prints ``str(error)``; anything else is a bug.
"""

from __future__ import annotations

from pathlib import Path


class MtlError(Exception):
    """A problem the user can fix; ``str()`` is a single line with the fix."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem.rstrip(".")
        self.fix = fix
        super().__init__(self._line())

    def _line(self) -> str:
        text = self.problem + ("" if self.problem.endswith("?") else ".")
        if self.fix:
            fix = self.fix.rstrip(".")
            text += f" Fix: {fix}" + ("" if fix.endswith(("?", "!")) else ".")
        return " ".join(text.split())

    def __reduce__(self) -> tuple[object, ...]:  # to another process (a training worker) as it was made
        return type(self), (self.problem, self.fix)


class TaskFileError(MtlError):
    """A problem in one task file, located by file and field."""

    def __init__(self, file: str | Path | None, field: str | None, problem: str, fix: str | None = None):
        self.file = str(file) if file is not None else None
        self.field = field
        where = ": ".join(p for p in (self.file, field) if p)
        super().__init__(f"{where}: {problem}" if where else problem, fix)
        self.problem = problem.rstrip(".")  # unlocated, so that the error can be re-raised with a file

    def __reduce__(self) -> tuple[object, ...]:
        return type(self), (self.file, self.field, self.problem, self.fix)


class TaskFileErrors(MtlError):
    """Several task-file problems at once (one line each), so a user fixes them in one pass."""

    def __init__(self, errors: list[TaskFileError]) -> None:
        self.errors = errors
        Exception.__init__(self, "\n".join(str(e) for e in errors))
        self.problem, self.fix = str(self), None

    def __reduce__(self) -> tuple[object, ...]:
        return type(self), (self.errors,)

    def _line(self) -> str:  # pragma: no cover - str() is set directly
        return str(self)
