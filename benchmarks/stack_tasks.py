#!/usr/bin/env python3
"""Tasks' inner loops one at a time or stacked along the channels (``inner.stack_tasks``), side by side.

Second-order MAML on synthetic tasks of the given shape, bf16 autocast, support-statistics batch norm, a zero
head, outer Adam; the variants alternate meta-iteration by meta-iteration in one process, so the machine's
drift touches them alike. Prints milliseconds per task for each number of tasks a stack (1: the loop), and
the automatic size's choice for this shape. docs/BENCHMARKS.md ("Meta-training speed", stop 49) holds the
figures the automatic size was chosen from.

    python benchmarks/stack_tasks.py                                   # Omniglot 5-way 1-shot, 5 steps, 1,4,8,16
    python benchmarks/stack_tasks.py --ways 20 --query 5 --variants 1,2,4,8
    python benchmarks/stack_tasks.py --size 84 --channels 3 --encoder conv4-32 --shots 5 --tasks 8 --variants 1,2,4
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mtl.algorithms import InnerConfig, build_algorithm, stacked_tasks
from mtl.data.stream import TaskBatch
from mtl.device import cpu_name, set_threads
from mtl.models import ModelConfig, MultiTaskModel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="1,4,8,16", help="tasks a stack, comma-separated (1: one at a time)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--order", choices=["first", "second"], default="second")
    ap.add_argument("--ways", type=int, default=5)
    ap.add_argument("--shots", type=int, default=1)
    ap.add_argument("--query", type=int, default=15)
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--encoder", default="conv4")
    ap.add_argument("--tasks", type=int, default=16, help="tasks a meta-iteration")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="1: one `workers: 2` rank's share of 2 cores")
    a = ap.parse_args()
    set_threads(a.threads)
    torch.manual_seed(0)
    shape = (a.channels, a.size, a.size)
    shift = torch.randn(a.tasks, a.ways, *shape)
    xs = torch.randn(a.tasks, a.ways * a.shots, *shape) + shift.repeat_interleave(a.shots, 1)
    xq = torch.randn(a.tasks, a.ways * a.query, *shape) + shift.repeat_interleave(a.query, 1)
    ys, yq = torch.arange(a.ways).repeat_interleave(a.shots), torch.arange(a.ways).repeat_interleave(a.query)
    batches = [TaskBatch("synthetic", "image", xs[t], ys, xq[t], yq) for t in range(a.tasks)]
    model = MultiTaskModel(ModelConfig(image_encoder=a.encoder, image_channels=a.channels), ["image"])
    method = "maml" if a.order == "second" else "fomaml"
    variants = [int(v) for v in a.variants.split(",")]
    learners = {v: build_algorithm(method, model, InnerConfig(steps=a.steps, lr=0.4, stack_tasks=v)) for v in variants}
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step(v: int) -> float:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            learners[v].meta_backward(batches, 0)
        opt.step()
        return (time.perf_counter() - t0) / a.tasks * 1000

    for v in variants:  # warm-up
        step(v)
        step(v)
    ms: dict[int, list[float]] = {v: [] for v in variants}
    for _ in range(a.rounds):
        for v in variants:
            ms[v].append(step(v))
    auto = build_algorithm(method, model, InnerConfig(steps=a.steps, lr=0.4))
    base = statistics.median(ms[variants[0]])
    for v in variants:
        med = statistics.median(ms[v])
        print(json.dumps({"stack_tasks": v, "ms_per_task": round(med, 1), f"vs_{variants[0]}": round(base / med, 2),
                          "rounds": [round(x, 1) for x in ms[v]]}))
    print(json.dumps({"cpu": cpu_name(), "threads": a.threads, "encoder": a.encoder, "ways": a.ways, "shots": a.shots,
                      "query": a.query, "size": a.size, "steps": a.steps, "order": a.order, "tasks": a.tasks,
                      "automatic_size": stacked_tasks.tasks_per_pass(auto, batches)}))


if __name__ == "__main__":
    main()
