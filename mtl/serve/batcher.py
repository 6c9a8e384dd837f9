"""Dynamic batching: requests that arrive while the model is busy are answered by one forward pass.

Sixteen clients each sending one text would otherwise cost sixteen passes of the encoder, one after
another; one worker thread takes everything waiting (up to ``max_batch`` inputs), runs it at once,
and hands each request its own rows. A request alone is run at once, so single-request latency is
unchanged.

``close`` ends the worker when the server shuts down: a live thread that has run torch's parallel
kernels keeps a second OpenMP thread team, and on a 2-core machine that halves the speed of whatever
the process runs next (measured: training after an in-process server took twice as long).
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Any

import numpy as np

from mtl.run.adapted import AdaptedModel


class Batcher:
    def __init__(self, model: AdaptedModel, max_batch: int = 256) -> None:
        self.model, self.max_batch = model, max_batch
        self.pending: queue.Queue[tuple[np.ndarray, list[str], int, Future[list[dict[str, Any]]]] | None] = (
            queue.Queue())
        self.worker = threading.Thread(target=self._run, name="mtl-batcher", daemon=True)
        self.worker.start()

    def rows(self, x: np.ndarray, shown: list[str], top: int) -> list[dict[str, Any]]:
        """The model's rows for one request, computed with whatever else is waiting."""
        done: Future[list[dict[str, Any]]] = Future()
        self.pending.put((x, shown, top, done))
        return done.result()

    def close(self) -> None:
        """Let the worker finish what is waiting, then end."""
        self.pending.put(None)
        self.worker.join(timeout=30)

    def _run(self) -> None:
        while (first := self.pending.get()) is not None:
            jobs = [first]
            size = len(first[0])
            while size < self.max_batch:
                try:
                    job = self.pending.get_nowait()
                except queue.Empty:
                    break
                if job is None:  # closing: answer these first, then end
                    self.pending.put(None)
                    break
                jobs.append(job)
                size += len(job[0])
            try:
                x = np.concatenate([j[0] for j in jobs])
                rows = self.model.rows(x, [s for j in jobs for s in j[1]], max(j[2] for j in jobs))
            except Exception as e:  # every waiting request gets the error; the worker lives on
                for j in jobs:
                    j[3].set_exception(e)
                continue
            start = 0
            for x_j, _, top, done in jobs:
                mine = rows[start:start + len(x_j)]
                start += len(x_j)
                for r in mine:
                    r["top"] = r["top"][:top]
                done.set_result(mine)
