#!/usr/bin/env python3
"""Meta-training throughput on the Omniglot Conv-4 setting of ../shared/peer/l2l_bench.py.

5-way 1-shot, 15 queries per class, meta-batch 32, 1 inner step, second order, synthetic tensors
(data loading excluded), outer Adam. Prints one JSON line per variant; compare with
``python ../shared/peer/l2l_bench.py`` run in the same session (see ../shared/peer/INSTALL.md).

    python benchmarks/speed_maml.py [--variants fp32-support,bf16-support,bf16-transductive] [--windows 5]
    python benchmarks/speed_maml.py --variants bf16-support --steps 5 --stack-tasks 1   # tasks one at a time
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch

from mtl.algorithms import Algorithm, InnerConfig, build_algorithm
from mtl.data.stream import TaskBatch
from mtl.device import set_threads
from mtl.models import ModelConfig, MultiTaskModel


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="fp32-support,bf16-support,fp32-transductive,bf16-transductive")
    ap.add_argument("--ways", type=int, default=5)
    ap.add_argument("--shots", type=int, default=1)
    ap.add_argument("--query", type=int, default=15)
    ap.add_argument("--meta-batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--order", choices=["first", "second"], default="second")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--windows", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--stack-tasks", type=int, help="inner.stack_tasks (default: the automatic size)")
    a = ap.parse_args()
    set_threads(a.threads)  # as `cli.py train` does
    T, N, K, Q = a.meta_batch, a.ways, a.shots, a.query
    torch.manual_seed(0)
    shift = torch.randn(T, N, 1, 28, 28)
    xs = torch.randn(T, N * K, 1, 28, 28) + shift.repeat_interleave(K, 1)
    xq = torch.randn(T, N * Q, 1, 28, 28) + shift.repeat_interleave(Q, 1)
    ys, yq = torch.arange(N).repeat_interleave(K), torch.arange(N).repeat_interleave(Q)
    batches = [TaskBatch("omniglot", "image", xs[t], ys, xq[t], yq) for t in range(T)]
    for variant in a.variants.split(","):
        precision, bn = variant.split("-")
        torch.manual_seed(0)
        model = MultiTaskModel(ModelConfig(), ["image"])
        method = "maml" if a.order == "second" else "fomaml"
        inner = InnerConfig(steps=a.steps, lr=0.4, head_init="learned", bn=bn, stack_tasks=a.stack_tasks)
        learner = build_algorithm(method, model, inner, heads={"omniglot": N})
        opt = torch.optim.Adam(learner.parameters(), lr=1e-3)

        def step(learner: Algorithm = learner, opt: torch.optim.Optimizer = opt, bf16: bool = precision == "bf16"
                 ) -> None:
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                learner.meta_backward(batches, 0)
            opt.step()

        for _ in range(a.warmup):
            step()
        rates = []
        for _ in range(a.windows):
            t0 = time.perf_counter()
            step()
            rates.append(1.0 / (time.perf_counter() - t0))
        print(json.dumps({"impl": "mtl", "variant": variant, "ways": N, "shots": K, "query": Q, "meta_batch": T,
                          "steps": a.steps, "order": a.order, "threads": a.threads, "stack_tasks": a.stack_tasks,
                          "it_per_s": round(statistics.median(rates), 4),
                          "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                          "torch": torch.__version__}), flush=True)


if __name__ == "__main__":
    main()
