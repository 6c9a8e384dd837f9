#!/usr/bin/env python3
"""Peak memory and speed of second-order MAML against the number of inner steps, with each step's
graph stored (the default) or rebuilt in the outer backward (``inner.recompute: true``).

Conv-4 on Omniglot-shaped synthetic tensors (data loading excluded), as benchmarks/speed_maml.py.
Every (steps, mode) runs in a fresh process; memory is that process's peak resident set minus its
resident set just before the first meta-iteration (model, optimizer and data already built), so
the import of torch (~300 MB) does not hide the difference. The meta-gradient is taken one task at
a time, so the peak is one task's graph and does not depend on the meta-batch.

    python benchmarks/memory_steps.py [--steps 1,5,10,20] [--ways 5] [--shots 1] [--query 15]
        [--precision fp32|bf16] [--query-chunks 3] [--interleave] [--peer ../shared/peer/l2l_bench.py]

``--query-chunks N``: mtl differentiates the query loss N pieces of the query set at a time
(``inner.query_chunks``). ``--interleave``: speed alone, every mode in one process, one
meta-iteration of each in turn (separate processes drift too much here to compare their speeds).

``--peer``: also learn2learn's MAML, run as ../shared/peer/l2l_bench.py runs it (its Conv-4, clone()
and adapt() per task), measured the same way; learn2learn must be importable (../shared/peer/INSTALL.md;
e.g. built into a folder on PYTHONPATH).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

from mtl.device import cpu_name


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def make_batches(a: argparse.Namespace) -> list:
    import torch

    from mtl.data.stream import TaskBatch

    n, k, q = a.ways, a.shots, a.query
    torch.manual_seed(0)
    batches = []
    for _ in range(a.meta_batch):
        shift = torch.randn(n, 1, 28, 28)
        batches.append(TaskBatch("omniglot", "image", torch.randn(n * k, 1, 28, 28) + shift.repeat_interleave(k, 0),
                                 torch.arange(n).repeat_interleave(k),
                                 torch.randn(n * q, 1, 28, 28) + shift.repeat_interleave(q, 0),
                                 torch.arange(n).repeat_interleave(q)))
    return batches


def child(a: argparse.Namespace) -> None:
    from mtl.device import set_threads

    set_threads(a.threads)
    batches = make_batches(a)
    step = peer(a, batches) if a.child_mode == "learn2learn" else ours(a, batches)
    base = rss_mb()
    times = []
    for _ in range(a.iterations):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) / len(batches))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"steps": a.child_steps, "mode": a.child_mode, "peak_rss_mb": round(peak),
                      "peak_above_start_mb": round(peak - base), "s_per_task": round(statistics.median(times[1:]), 4)}))


def interleaved(a: argparse.Namespace, steps: int) -> None:
    """Speed alone, in one process: one meta-iteration of each mode in turn, ``--iterations`` rounds,
    so that the machine's drift (10-20% from minute to minute here) hits every mode alike. Prints each
    mode's median seconds per task and its median per-round speed against learn2learn's."""
    import statistics

    from mtl.device import set_threads

    set_threads(a.threads)
    batches = make_batches(a)
    c = max(a.query_chunks, 2)
    modes = {"stored": ("stored", 1), f"stored, {c} query pieces": ("stored", c),
             f"recompute, {c} query pieces": ("recompute", c)}
    steps_of = {m: ours(argparse.Namespace(**{**vars(a), "child_steps": steps, "child_mode": mode,
                                             "query_chunks": chunks}), batches)
                for m, (mode, chunks) in modes.items()}
    if a.peer:
        steps_of["learn2learn"] = peer(argparse.Namespace(**{**vars(a), "child_steps": steps}), batches)
    for step in steps_of.values():  # warm-up
        step()
    times: dict[str, list[float]] = {m: [] for m in steps_of}
    for _ in range(a.iterations):
        for m, step in steps_of.items():
            t0 = time.perf_counter()
            step()
            times[m].append((time.perf_counter() - t0) / len(batches))
    print(f"\n{cpu_name()}, {a.threads} threads; Conv-4, {a.ways}-way {a.shots}-shot, {a.query} queries, {steps} "
          f"second-order steps, mtl in {a.precision}; {a.iterations} rounds, one meta-iteration of each mode per round")
    print("| mode | s/task (median) | speed / learn2learn (median of rounds) |\n|---|---|---|")
    for m, t in times.items():
        ratio = (f"{statistics.median(p / q for p, q in zip(times['learn2learn'], t, strict=True)):.2f}x"
                 if "learn2learn" in times else "")
        print(f"| {m} | {statistics.median(t):.4f} | {ratio} |")


def ours(a: argparse.Namespace, batches: list) -> Callable[[], None]:
    """One meta-iteration of mtl's second-order MAML, each step's graph stored or recomputed."""
    import torch

    from mtl.algorithms import InnerConfig, build_algorithm
    from mtl.device import autocast
    from mtl.models import ModelConfig, MultiTaskModel

    model = MultiTaskModel(ModelConfig(), ["image"])
    inner = InnerConfig(steps=a.child_steps, lr=0.4, head_init="learned", recompute=a.child_mode == "recompute",
                        query_chunks=a.query_chunks)
    learner = build_algorithm("maml", model, inner, heads={"omniglot": a.ways})
    opt = torch.optim.Adam(learner.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast(torch.device("cpu"), a.precision):  # as the trainer runs a recipe's precision
            learner.meta_backward(batches, 0)
        opt.step()
    return step


def peer(a: argparse.Namespace, batches: list) -> Callable[[], None]:
    """One meta-iteration of learn2learn's MAML as ``l2l_bench.py`` runs it, on the same tensors."""
    import importlib.util

    import torch
    import torch.nn.functional as F

    spec = importlib.util.spec_from_file_location("l2l_bench", a.peer)
    bench = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(bench)  # type: ignore[union-attr]
    maml = bench.load_learn2learn().algorithms.MAML(bench.conv4(a.ways), lr=0.4)
    opt = torch.optim.Adam(maml.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        for b in batches:
            learner = maml.clone()
            for _ in range(a.child_steps):
                learner.adapt(F.cross_entropy(learner(b.xs), b.ys))
            (F.cross_entropy(learner(b.xq), b.yq) / len(batches)).backward()
        opt.step()
    return step

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", default="1,5,10,20")
    ap.add_argument("--ways", type=int, default=5)
    ap.add_argument("--shots", type=int, default=1)
    ap.add_argument("--query", type=int, default=15)
    ap.add_argument("--meta-batch", type=int, default=4)
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                    help="mtl's precision (bf16 is a recipe's default); learn2learn stays fp32, as it runs")
    ap.add_argument("--query-chunks", type=int, default=1,
                    help="mtl differentiates the query loss this many pieces at a time (inner.query_chunks)")
    ap.add_argument("--peer", help="../shared/peer/l2l_bench.py: also measure learn2learn")
    ap.add_argument("--interleave", action="store_true",
                    help="speed alone: every mode in one process, iteration by iteration (see interleaved())")
    ap.add_argument("--child-steps", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child-mode", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child_steps:
        child(a)
        return
    if a.interleave:
        for steps in [int(s) for s in a.steps.split(",")]:
            interleaved(a, steps)
        return
    rows = []
    for steps in [int(s) for s in a.steps.split(",")]:
        for mode in ("stored", "recompute", *(("learn2learn",) if a.peer else ())):
            argv = [sys.executable, __file__, "--child-steps", str(steps), "--child-mode", mode,
                    *[f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items()
                      if k in ("ways", "shots", "query", "meta_batch", "iterations", "threads", "peer", "precision",
                              "query_chunks")
                      and v]]
            out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{cpu_name()}, {a.threads} threads; Conv-4, {a.ways}-way {a.shots}-shot, {a.query} queries, second order, "
          f"mtl in {a.precision}; "
          "peak resident memory above the start of training (MB), seconds per task")
    modes = [m for m in ("stored", "recompute", "learn2learn") if any(r["mode"] == m for r in rows)]
    print("| inner steps | " + " | ".join(f"{m} MB | {m} s/task" for m in modes) + " |")
    print("|---" * (1 + 2 * len(modes)) + "|")
    for steps in sorted({r["steps"] for r in rows}):
        got = {r["mode"]: r for r in rows if r["steps"] == steps}
        print(f"| {steps} | " + " | ".join(f"{got[m]['peak_above_start_mb']} | {got[m]['s_per_task']}" for m in modes)
              + " |")

if __name__ == "__main__":
    main()
