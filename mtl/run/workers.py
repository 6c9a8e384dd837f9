"""Training in several processes from one command: ``workers: N`` in a recipe.

On a CPU, second-order MAML's operations are small (a support set of a few images), and one process
spreading each of them over all cores wastes much of its time synchronising its threads; processes
that each take a share of the meta-batch's tasks, with the cores divided among them, do not
(docs/BENCHMARKS.md, "Meta-training in several processes"). This is what ``torchrun`` does for the
same ``train``; here the calling process is rank 0 (it keeps the progress bar, the return value and
the errors) and starts the other ranks itself, on this machine only.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mtl.device import resolve_device
from mtl.errors import MtlError

if TYPE_CHECKING:
    from mtl.data.registry import Registry
    from mtl.run.recipe import Recipe

# train(recipe, out, resume, registry, on_step): a module-level function, which the workers unpickle
Run = Callable[["Recipe", Path, bool, "Registry | None", "Callable[[dict[str, Any]], None] | None"], dict[str, Any]]


def per_worker(recipe: Recipe) -> Recipe:
    """The recipe each process runs: the cores (``threads``, or all) divided among the workers."""
    threads = max(1, (recipe.threads or torch.get_num_threads()) // recipe.workers)
    return recipe.model_copy(update={"threads": threads})


def in_workers(run: Run, recipe: Recipe, out: Path, resume: bool, registry: Registry | None,
               on_step: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
    """``run(recipe, out, resume, registry, on_step)`` as rank 0 of ``recipe.workers`` processes on this machine;
    returns rank 0's result. A worker's failure surfaces here as a one-line error."""
    world = recipe.workers
    device = resolve_device(recipe.device)
    if device.type == "cuda" and world > torch.cuda.device_count():
        raise MtlError(f"workers: {world} asks for a GPU each, but {torch.cuda.device_count()} are visible",
                       f"set workers to at most {torch.cuda.device_count()}")
    recipe = per_worker(recipe)
    port = _free_port()
    context = torch.multiprocessing.get_context("spawn")
    errors = context.SimpleQueue()
    procs = [context.Process(target=_worker, args=(rank, world, port, run, recipe, out, resume, registry, errors),
                             daemon=True) for rank in range(1, world)]
    for p in procs:
        p.start()
    finished = False
    try:
        with _rank_environment(0, world, port):
            result = run(recipe, out, resume, registry, on_step)
        finished = True
        return result
    except MtlError:
        raise
    except Exception:
        for p in procs:  # a worker that failed first is the cause of this rank's broken collective
            p.join(timeout=5)
        if not errors.empty():
            rank, message = errors.get()
            raise MtlError(f"worker {rank} of {world} failed: {message}",
                           "fix what it names, or train with workers: 1 to see the whole error") from None
        dead = [(rank, p.exitcode) for rank, p in enumerate(procs, 1) if p.exitcode not in (None, 0)]
        if dead:  # killed (out of memory, a signal) before it could say why
            rank, code = dead[0]
            raise MtlError(f"worker {rank} of {world} ended with exit code {code} and training stopped",
                           "continue with --resume (the last checkpoint is kept); with less memory per "
                           "process, fewer workers") from None
        raise
    finally:  # after a failure or Ctrl-C, a worker may wait on this rank forever: stop it
        for p in procs:
            p.join(timeout=60 if finished else 2)
            if p.is_alive():
                p.terminate()


def _worker(rank: int, world: int, port: int, run: Run, recipe: Recipe, out: Path, resume: bool,
            registry: Registry | None, errors: Any) -> None:
    try:
        with _rank_environment(rank, world, port):
            run(recipe, out, resume, registry, None)
    except BaseException as e:
        errors.put((rank, str(e).splitlines()[0] if str(e) else type(e).__name__))
        raise SystemExit(1) from None


@contextlib.contextmanager
def _rank_environment(rank: int, world: int, port: int) -> Iterator[None]:
    """The variables ``torchrun`` sets, which :func:`mtl.device.init_distributed` reads."""
    names = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": world, "LOCAL_WORLD_SIZE": world,
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    old = {k: os.environ.get(k) for k in names}
    os.environ.update({k: str(v) for k, v in names.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
