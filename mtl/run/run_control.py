"""What keeps a training run safe to stop: a lock file so that two runs never write one folder, and a stop
asked for by Ctrl-C or SIGTERM (a cluster's preemption) that ends the run at the next iteration's end, with its
checkpoint saved for ``--resume``, instead of wherever the signal lands."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from mtl.errors import MtlError


class RunLock:
    """An exclusive lock file in the run folder; a stale lock (dead process) is taken over."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / ".lock"

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                return self
            except FileExistsError:
                try:
                    pid = int(self.path.read_text() or 0)
                    os.kill(pid, 0)
                except (ValueError, ProcessLookupError, FileNotFoundError):
                    self.path.unlink(missing_ok=True)  # stale
                    continue
                except PermissionError:
                    pass
                raise MtlError(f"another run (pid {pid}) is writing to {self.path.parent}",
                               "wait for it, or use another --out folder") from None
        raise MtlError(f"cannot lock {self.path.parent}", "use another --out folder")

    def __exit__(self, *exc: object) -> None:
        self.path.unlink(missing_ok=True)


class RunInterrupted(KeyboardInterrupt):
    """The run stopped where it was asked to, its last checkpoint saved; the message says how to go on."""


class StopSignals:
    """Within the block, the first SIGINT or SIGTERM only sets :attr:`requested` (the loop stops at the end of
    its iteration); a second one interrupts at once, as it would have without the block. Outside the main
    thread (where signals cannot be caught) the block changes nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self._before: dict[int, Any] = {}

    def _first(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        self._restore()  # the second signal: default handling (KeyboardInterrupt, or the end)

    def _restore(self) -> None:
        for signum, handler in self._before.items():
            signal.signal(signum, handler)
        self._before = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._before[signum] = signal.signal(signum, self._first)
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()
