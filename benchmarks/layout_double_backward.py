#!/usr/bin/env python3
"""Which memory layout a Conv-4 pass should use on this CPU, by how often its graph is differentiated.

For each batch size, times one pass of the Conv-4 (bf16 autocast, 2 threads) with its parameter
gradient, once (``first``: forward + backward, as for MAML's query pass) and twice (``second``:
the gradient taken with ``create_graph`` and a loss of it differentiated again, as for the support
pass of second-order MAML), in channels-last (NHWC) and in NCHW. Prints one JSON line per case; the
ratio ``nchw_over_nhwc`` below 1 means NCHW is faster. Until stop 46 the pass differentiated twice ran
NCHW, 1.4-2.5x faster then; since batch norm's double backward is written out
(:mod:`mtl.models.batchnorm_twice`) the two layouts are even there, and every pass runs channels-last
(docs/BENCHMARKS.md).

    python benchmarks/layout_double_backward.py [--batches 5,10,20,25,40,80] [--repeats 15]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch
from torch.func import functional_call

from mtl.device import set_threads
from mtl.models import ConvEncoder, setting


def one_pass(encoder: ConvEncoder, params: dict[str, torch.Tensor], x: torch.Tensor, twice: bool) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = functional_call(encoder, params, (x,)).float().pow(2).mean()
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=twice)
        if twice:
            sum((g.float() ** 2).sum() for g in grads).backward()


def seconds(encoder: ConvEncoder, x: torch.Tensor, twice: bool, nchw: bool, repeats: int) -> float:
    params = dict(encoder.named_parameters())
    with setting(encoder, ConvEncoder, "nhwc", False) if nchw else contextlib.nullcontext():
        for _ in range(3):
            one_pass(encoder, params, x, twice)
        t0 = time.perf_counter()
        for _ in range(repeats):
            one_pass(encoder, params, x, twice)
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="5,10,20,25,40,80")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    set_threads(a.threads)
    torch.manual_seed(0)
    encoder = ConvEncoder()
    for twice in (True, False):
        for batch in map(int, a.batches.split(",")):
            x = torch.randn(batch, 1, 28, 28)
            nhwc = seconds(encoder, x, twice, False, a.repeats)
            nchw = seconds(encoder, x, twice, True, a.repeats)
            print(json.dumps({"differentiated": "twice" if twice else "once", "batch": batch,
                              "nhwc_ms": round(nhwc * 1e3, 2), "nchw_ms": round(nchw * 1e3, 2),
                              "nchw_over_nhwc": round(nchw / nhwc, 2)}), flush=True)


if __name__ == "__main__":
    main()
