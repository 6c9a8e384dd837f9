"""Training in several processes from one command: ``workers: N`` in a recipe.

On a CPU, second-order MAML's operations are small (a support set of a few images), and one process
spreading each of them over all cores wastes much of its time synchronising its threads; processes
that each take a share of the meta-batch's tasks, with the cores divided among them, do not
(docs/BENCHMARKS.md, "Distributed meta-training"). This is what ``torchrun`` does for the same
``train``; here the calling process is rank 0 (it keeps the progress bar, the return value and the
errors) and starts the other ranks itself, on this machine only, as ``python -m mtl.run.workers``:
a fresh interpreter, so that a script calling :func:`mtl.train` needs no ``__main__`` guard.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mtl.algorithms import get_algorithm
from mtl.device import resolve_device
from mtl.errors import MtlError

if TYPE_CHECKING:
    from mtl.data.registry import Registry
    from mtl.run.recipe import Recipe

Callback = Callable[[dict[str, Any]], None]
Run = Callable[["Recipe", Path, bool, "Registry | None", "Callback | None"], dict[str, Any]]


def per_worker(recipe: Recipe) -> Recipe:
    """The recipe each process runs: the cores (``threads``, or all) divided among the workers."""
    threads = max(1, (recipe.threads or torch.get_num_threads()) // recipe.workers)
    return recipe.model_copy(update={"threads": threads})


def in_workers(run: Run, recipe: Recipe, out: Path, resume: bool, registry: Registry | None,
               on_step: Callback | None) -> dict[str, Any]:
    """``run(recipe, out, resume, registry, on_step)`` as rank 0 of ``recipe.workers`` processes on
    this machine, whose other ranks run :func:`mtl.run.trainer.train`; returns rank 0's result. A
    worker's failure surfaces here as a one-line error."""
    world = recipe.workers
    # what a step shares out: whole episodes, or (joint training) whole tasks
    joint = get_algorithm(recipe.method).training_data == "classes"
    units, what = (len(recipe.tasks), "tasks") if joint else (recipe.meta_batch, "episodes of a meta-batch")
    if world > units:
        raise MtlError(f"workers: {world} is more than the {units} {what}, which the workers share out whole",
                       f"set workers to at most {units}" + ("" if joint else ", or raise meta_batch"))
    if resolve_device(recipe.device).type == "cuda" and world > torch.cuda.device_count():
        raise MtlError(f"workers: {world} asks for a GPU each, but {torch.cuda.device_count()} are visible",
                       f"set workers to at most {torch.cuda.device_count()}")
    recipe = per_worker(recipe)
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="mtl-workers-") as scratch:
        job = Path(scratch) / "job.pkl"
        job.write_bytes(pickle.dumps((recipe, out, resume, registry)))  # a registry pickles without its data
        procs, logs = [], []
        for rank in range(1, world):
            logs.append(Path(scratch) / f"rank{rank}.log")
            with logs[-1].open("w") as log:
                procs.append(subprocess.Popen([sys.executable, "-m", "mtl.run.workers", str(job)],
                                              env=_worker_environment(rank, world, port),
                                              stdout=subprocess.DEVNULL, stderr=log))
        finished = False
        try:
            with _rank_environment(0, world, port):
                result = run(recipe, out, resume, registry, on_step)
            finished = True
            return result
        except MtlError:
            raise
        except Exception:
            _explain_worker_failure(procs, logs, world)
            raise
        finally:  # after a failure or Ctrl-C, a worker may wait on this rank forever: stop it
            for p in procs:
                try:
                    p.wait(timeout=60 if finished else 2)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def _explain_worker_failure(procs: list[subprocess.Popen[bytes]], logs: list[Path], world: int) -> None:
    """Raise a worker's own error when one failed first, which broke this rank's collective."""
    for rank, (p, log) in enumerate(zip(procs, logs, strict=True), 1):
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=5)
        if p.returncode in (None, 0):
            continue
        lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
        said = next((x.removeprefix("error: ") for x in reversed(lines) if x.startswith("error: ")), None)
        if said:
            raise MtlError(f"worker {rank} of {world} failed: {said}",
                           "fix what it names, or train with workers: 1 to see the whole error") from None
        raise MtlError(f"worker {rank} of {world} ended with exit code {p.returncode} and training stopped",
                       "continue with --resume (the last checkpoint is kept); with less memory per process, "
                       "fewer workers") from None


def _rank_variables(rank: int, world: int, port: int) -> dict[str, str]:
    """The variables ``torchrun`` sets, which :func:`mtl.device.init_distributed` reads."""
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def _worker_environment(rank: int, world: int, port: int) -> dict[str, str]:
    """This process's environment, the rank's variables, and the folder this ``mtl`` was imported
    from first on the path: a worker runs the same code even from a source tree not installed."""
    here = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, **_rank_variables(rank, world, port), "PYTHONPATH": path}


def _rank_environment(rank: int, world: int, port: int) -> contextlib.AbstractContextManager[Any]:
    """This process's environment as a rank's, for the block; restored after it."""
    from unittest import mock

    return mock.patch.dict(os.environ, _rank_variables(rank, world, port))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(job: str) -> int:
    """A worker: rank ``$RANK`` of the run described in ``job``; a failure is one ``error:`` line."""
    from mtl.run.trainer import train

    recipe, out, resume, registry = pickle.loads(Path(job).read_bytes())
    try:
        train(recipe, out, resume=resume, registry=registry)
    except Exception as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
