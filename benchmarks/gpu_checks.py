#!/usr/bin/env python3
"""The GPU figures benchmarks/gpu.sh collects, on synthetic tensors (the device machine has no data):

- meta-training throughput of second-order MAML, Conv-4, 5-way 1-shot, 15 queries, meta-batch 32,
  Omniglot-shaped (1x28x28, 64 channels) and mini-ImageNet-shaped (3x84x84, 32 channels), 1 and 5
  inner steps, with the default (support-statistics) batch norm, one task at a time, all 32 in
  one vmapped pass (``inner.batch_tasks``) and all 32 stacked along the channels (``inner.stack_tasks``:
  grouped convolutions, the CPU's fastest way; on a GPU few large kernels instead of a few hundred
  small ones per task), in fp32 and under bf16 autocast (fp16 ran no faster than
  bf16 on an H200, and training in it would need loss scaling); and learn2learn's MAML on the same
  tensors and GPU, run as ../shared/peer/l2l_bench.py runs it, when learn2learn can be imported;
- ResNet-12 (first-order MAML, Proto-MAML heads, 5-way 5-shot, 84x84): throughput and peak memory,
  tasks looped and batched;
- peak GPU memory of second-order MAML against inner steps (1, 5, 10, 20), each step's graph stored
  or rebuilt in the outer backward (``inner.recompute``).

Prints one JSON line per figure, with the card's name (a setting that fails prints its error and
the rest still run); ``--quick`` shrinks every measurement (to
check the script on a CPU: ``--device cpu --quick``).

    python benchmarks/gpu_checks.py [--device cuda] [--peer ../shared/peer/l2l_bench.py] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import itertools
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from mtl.algorithms import InnerConfig, build_algorithm
from mtl.data.stream import TaskBatch
from mtl.models import ModelConfig, MultiTaskModel

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # fp16: timing only


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from mtl.device import cpu_name

    return cpu_name()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def episodes(device: torch.device, tasks: int, ways: int, shots: int, queries: int, shape: tuple[int, int, int]
             ) -> list[TaskBatch]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(tasks):
        shift = torch.randn(ways, *shape, generator=g)
        xs = torch.randn(ways * shots, *shape, generator=g) + shift.repeat_interleave(shots, 0)
        xq = torch.randn(ways * queries, *shape, generator=g) + shift.repeat_interleave(queries, 0)
        out.append(TaskBatch("bench", "image", xs.to(device), torch.arange(ways).repeat_interleave(shots).to(device),
                             xq.to(device), torch.arange(ways).repeat_interleave(queries).to(device)))
    return out


def rate(step: Callable[[], None], device: torch.device, warmup: int, windows: int) -> float:
    """Median iterations per second over ``windows`` timed iterations."""
    for _ in range(warmup):
        step()
    sync(device)
    rates = []
    for _ in range(windows):
        t0 = time.perf_counter()
        step()
        sync(device)
        rates.append(1.0 / (time.perf_counter() - t0))
    return statistics.median(rates)


def mtl_step(device: torch.device, batches: list[TaskBatch], encoder: str, channels: int, method: str,
             inner: dict[str, Any], precision: str) -> Callable[[], None]:
    torch.manual_seed(0)
    model = MultiTaskModel(ModelConfig(image_encoder=encoder, image_channels=channels), ["image"])
    learner = build_algorithm(method, model, InnerConfig(**inner), heads={"bench": batches[0].ways}).to(device)
    opt = torch.optim.Adam(learner.parameters(), lr=1e-3)
    dtype = AUTOCAST[precision]

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext():
            learner.meta_backward(batches, 0)
        opt.step()
    return step


def peer_step(device: torch.device, batches: list[TaskBatch], peer: str, channels: int, hidden: int, steps: int
              ) -> Callable[[], None] | None:
    """learn2learn's MAML as l2l_bench.py runs it (clone() and adapt() per task), or None without it."""
    try:
        spec = importlib.util.spec_from_file_location("l2l_bench", peer)
        bench = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        spec.loader.exec_module(bench)  # type: ignore[union-attr]
        l2l = bench.load_learn2learn()
    except Exception as e:  # not installed here: say so and go on
        print(json.dumps({"peer": "learn2learn", "skipped": f"{type(e).__name__}: {e}"[:200]}), flush=True)
        return None
    torch.manual_seed(0)
    ways = batches[0].ways
    layers = [bench.block(channels, hidden), bench.block(hidden, hidden), bench.block(hidden, hidden),
              bench.block(hidden, hidden), torch.nn.Flatten()]
    body = torch.nn.Sequential(*layers)
    with torch.no_grad():
        flat = body(batches[0].xs[:1].cpu()).shape[1]
    net = torch.nn.Sequential(*layers, torch.nn.Linear(flat, ways)).to(device)
    maml = l2l.algorithms.MAML(net, lr=0.4)
    opt = torch.optim.Adam(maml.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        for b in batches:
            learner = maml.clone()
            for _ in range(steps):
                learner.adapt(F.cross_entropy(learner(b.xs), b.ys))
            (F.cross_entropy(learner(b.xq), b.yq) / len(batches)).backward()
        opt.step()
    return step


def peak_memory(device: torch.device, step: Callable[[], None]) -> float | None:
    """MB of GPU memory at the peak of one more iteration (CPU: None; benchmarks/memory_steps.py measures it)."""
    if device.type != "cuda":
        step()
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    sync(device)
    return round((torch.cuda.max_memory_allocated(device) - base) / 2**20, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--peer", default="../shared/peer/l2l_bench.py")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    device = torch.device(a.device)
    card = device_name(device)
    quick = a.quick
    meta_batch, warmup, windows = (4, 1, 2) if quick else (32, 2, 5)

    def emit(row: dict[str, Any], measure: Callable[..., dict[str, Any]], *args: Any) -> None:
        """One figure's JSON line: ``row`` and what ``measure(*args)`` returns. A failure is printed as
        the row's error, and the next row runs: one setting must not cost a GPU lease's other figures."""
        try:
            row |= measure(*args)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        print(json.dumps({"device": card, **row}), flush=True)

    def throughput(batches: list[TaskBatch], encoder: str, channels: int, method: str, inner: dict[str, Any],
                   precision: str, peer_rate: float | None = None) -> dict[str, Any]:
        step = mtl_step(device, batches, encoder, channels, method, inner, precision)
        ours = rate(step, device, warmup, windows)
        peer = {"learn2learn_it_per_s": round(peer_rate, 3), "ratio": round(ours / peer_rate, 2)} if peer_rate else {}
        return {"it_per_s": round(ours, 3), **peer, "peak_mb": peak_memory(device, step)}

    def memory(batches: list[TaskBatch], inner: dict[str, Any]) -> dict[str, Any]:
        step = mtl_step(device, batches, "conv4", 1, "maml", inner, "fp32")
        step()
        return {"peak_mb": peak_memory(device, step)}

    grouping = {"loop": {"stack_tasks": 1}, "vmap": {"batch_tasks": meta_batch}, "stack": {"stack_tasks": meta_batch}}
    shapes = {"omniglot 1x28x28, conv4 (64)": ((1, 28, 28), "conv4", 64),
              "mini-imagenet 3x84x84, conv4-32": ((3, 84, 84), "conv4-32", 32)}
    for setting, (shape, encoder, hidden) in shapes.items():
        batches = episodes(device, meta_batch, 5, 1, 15, shape)
        for steps in (1, 5):
            theirs = peer_step(device, batches, a.peer, shape[0], hidden, steps)
            peer_rate = rate(theirs, device, warmup, windows) if theirs else None
            for precision, (how, together) in itertools.product(("fp32", "bf16"), grouping.items()):
                # the default, leak-free batch norm (support statistics); learn2learn's is transductive
                inner = {"steps": steps, "lr": 0.4, "head_init": "learned", **together}
                emit({"setting": setting, "method": "maml (second order)", "steps": steps, "meta_batch": meta_batch,
                      "tasks": how, "precision": precision},
                     throughput, batches, encoder, shape[0], "maml", inner, precision, peer_rate)

    batches = episodes(device, 1 if quick else 4, 5, 5, 15, (3, 84, 84))
    for precision, together in itertools.product(("fp32", "bf16"), (1, len(batches))):
        inner = {"steps": 5, "lr": 0.05, "head_init": "proto", "batch_tasks": together}
        emit({"setting": "resnet12 3x84x84, 5-way 5-shot, 15 queries", "method": "fomaml, proto heads", "steps": 5,
              "meta_batch": len(batches), "batch_tasks": together, "precision": precision},
             throughput, batches, "resnet12", 3, "fomaml", inner, precision)

    batches = episodes(device, 1, 20, 5, 5, (1, 28, 28))
    for steps in (1, 5) if quick else (1, 5, 10, 20):
        for recompute in (False, True):
            inner = {"steps": steps, "lr": 0.4, "head_init": "learned", "recompute": recompute}
            emit({"setting": "omniglot conv4, 20-way 5-shot, 5 queries, one task", "method": "maml (second order)",
                  "steps": steps, "recompute": recompute}, memory, batches, inner)


if __name__ == "__main__":
    main()
