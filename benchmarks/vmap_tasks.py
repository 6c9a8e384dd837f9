#!/usr/bin/env python3
"""Whether batching a meta-batch's tasks with ``torch.func.vmap`` speeds second-order MAML up on a CPU.

Issue 3's setting (Conv-4, 5-way 1-shot, 15 queries, meta-batch 32, one inner step, second order,
batch statistics), written twice over the same functional Conv-4: a loop over the tasks (the support
pass differentiated with ``create_graph``, as ``mtl.algorithms.inner`` does) and ``vmap(grad(task
loss))`` over chunks of 32, 8 or 4 tasks, whose fast weights differ per task (so the query pass runs
as grouped convolutions). Both give the same meta-gradient (printed); meta-iterations/s are printed
for each, three rounds, synthetic images.

    python benchmarks/vmap_tasks.py [--precision fp32|bf16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import grad, vmap

from mtl.device import cpu_name

WAYS, QUERIES, TASKS, WIDTH, INNER_LR = 5, 15, 32, 64, 0.4
Params = dict[str, Tensor]


def conv4(params: Params, x: Tensor) -> Tensor:
    for i in range(4):
        x = F.conv2d(x, params[f"w{i}"], params[f"b{i}"], padding=1)
        x = F.batch_norm(x, None, None, params[f"g{i}"], params[f"h{i}"], training=True)
        x = F.relu(F.max_pool2d(x, 2))
    return x.mean((2, 3)) @ params["fw"].T + params["fb"]


def loss(params: Params, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(conv4(params, x), y)


def task_loss(params: Params, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Tensor:
    g = grad(loss)(params, xs, ys)
    return loss({k: params[k] - INNER_LR * g[k] for k in params}, xq, yq)


def init(device: torch.device) -> Params:
    torch.manual_seed(0)
    params, cin = {}, 1
    for i in range(4):
        params |= {f"w{i}": torch.randn(WIDTH, cin, 3, 3) * (2 / (cin * 9)) ** 0.5, f"b{i}": torch.zeros(WIDTH),
                   f"g{i}": torch.ones(WIDTH), f"h{i}": torch.zeros(WIDTH)}
        cin = WIDTH
    params |= {"fw": torch.zeros(WAYS, WIDTH), "fb": torch.zeros(WAYS)}
    return {k: v.to(device) for k, v in params.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    a = p.parse_args()
    torch.set_num_threads(2)
    device = torch.device(a.device)
    params = init(device)
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    xs = torch.randn(TASKS, WAYS, 1, 28, 28, device=device)
    ys = torch.arange(WAYS, device=device).repeat(TASKS, 1)
    xq = torch.randn(TASKS, WAYS * QUERIES, 1, 28, 28, device=device)
    yq = torch.arange(WAYS, device=device).repeat_interleave(QUERIES).repeat(TASKS, 1)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def loop() -> Params:
        for v in leaves.values():
            v.grad = None
        for t in range(TASKS):
            g = torch.autograd.grad(loss(leaves, xs[t], ys[t]), list(leaves.values()), create_graph=True)
            fast = {k: v - INNER_LR * gk for (k, v), gk in zip(leaves.items(), g, strict=True)}
            (loss(fast, xq[t], yq[t]) / TASKS).backward()
        return {k: v.grad for k, v in leaves.items()}  # type: ignore[misc]

    def batched(chunk: int) -> Params:
        per_task = vmap(grad(task_loss), in_dims=(None, 0, 0, 0, 0))
        total: Params = {k: torch.zeros_like(v) for k, v in params.items()}
        for s in range(0, TASKS, chunk):
            g = per_task(params, xs[s:s + chunk], ys[s:s + chunk], xq[s:s + chunk], yq[s:s + chunk])
            total = {k: total[k] + g[k].sum(0) for k in total}
        return {k: v / TASKS for k, v in total.items()}

    ways: dict[str, Callable[[], Params]] = {"loop": loop}
    ways |= {f"vmap {c}": (lambda c=c: batched(c)) for c in (32, 8, 4)}
    reference = loop()
    print(f"{name}, {a.precision}; max |meta-gradient difference| from the loop, fp32: "
          f"{max(float((reference[k] - batched(8)[k]).abs().max()) for k in reference):.1e}")
    context = (lambda: torch.autocast(device.type, torch.bfloat16)) if a.precision == "bf16" else contextlib.nullcontext
    for r in range(a.rounds):
        for name, fn in ways.items():
            try:
                with context():
                    fn()
                    sync()
                    t0 = time.perf_counter()
                    fn()
                    fn()
                    sync()
                print(f"round {r} {name}: {2 / (time.perf_counter() - t0):.3f} meta-iterations/s", flush=True)
            except RuntimeError as e:
                print(f"round {r} {name}: fails: {str(e).splitlines()[0]}", flush=True)


if __name__ == "__main__":
    main()
