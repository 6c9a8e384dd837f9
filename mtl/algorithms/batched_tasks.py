"""A meta-batch's tasks adapted side by side, in one pass batched with ``torch.func.vmap``.

The inner loop of :mod:`mtl.algorithms.inner` adapts one task at a time. On a GPU each task's
kernels are too small to fill the card, so the loop is bound by kernel launches: on an H200,
second-order MAML on Omniglot-shaped tasks ran at learn2learn's speed (docs/BENCHMARKS.md), while a
plain functional Conv-4 batched over the meta-batch's tasks ran 12x faster than its own loop
(``benchmarks/vmap_tasks.py --device cuda``).
``inner.batch_tasks: N`` adapts N tasks at once: the same fast weights, losses and meta-gradient as
the loop (tests/test_batched_tasks.py), from the same plain ``nn.Module`` (``functional_call``
under ``vmap``; the inner gradient is ``torch.func.grad``, and the outer one ordinary autograd
through it). Per-task fast weights turn convolutions into grouped convolutions, which a CPU runs
slower than the loop: leave it at 1 there. The batched tasks' graphs are alive together, so memory
grows with N (Conv-4, 32 tasks: about 7x the loop's; docs/BENCHMARKS.md).

Batch norm runs in plain tensor ops within the batched pass (``EpisodicBatchNorm2d.plain_ops``):
they vmap and differentiate twice exactly, where the native kernel's double backward under vmap
gave a wrong meta-gradient in torch 2.13 on a CPU, and its backward failed under bf16 autocast on
an H200 (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, vmap

from mtl.data.stream import TaskBatch
from mtl.models import EpisodicBatchNorm2d, setting

if TYPE_CHECKING:
    from mtl.algorithms.inner import Algorithm

_warned: set[str] = set()  # each reason not to batch is said once per process


def obstacle(alg: Algorithm, batches: Sequence[TaskBatch]) -> str | None:
    """Why these tasks cannot be adapted in one batched pass, or None when they can."""
    first = batches[0]
    if any(b.modality != first.modality for b in batches):
        return "the meta-batch mixes modalities"
    if any(not isinstance(b.xs, Tensor) or not isinstance(b.xq, Tensor) for b in batches):
        return "the tasks' inputs are not tensors (texts read by trainable transformer layers)"
    if alg.inner.per_step_bn_stats:
        return "per-step batch-norm statistics (inner.per_step_bn_stats) are collected one task at a time"
    if alg.inner.recompute:
        return "inner.recompute rebuilds one task's inner steps at a time"
    if alg.inner.query_chunks > 1:
        return "inner.query_chunks > 1 already splits the query set"
    if any(b.ways != first.ways or b.xs.shape != first.xs.shape or b.xq.shape != first.xq.shape for b in batches):
        return "the tasks differ in ways, shots or image size"
    return None


def _plain_layers(model: nn.Module) -> contextlib.ExitStack:
    """Within the block: batch norm in plain tensor ops, and NCHW activations (a strided NHWC view,
    see :func:`mtl.models.channels_last`, has no batched form)."""
    stack = contextlib.ExitStack()
    stack.enter_context(setting(model, EpisodicBatchNorm2d, "plain_ops", True))
    layouts = {type(m) for m in model.modules() if hasattr(m, "nhwc")}
    for kind in layouts:
        stack.enter_context(setting(model, kind, "nhwc", False))
    return stack


def meta_backward(alg: Algorithm, batches: Sequence[TaskBatch], iteration: int, n: int) -> tuple[float, float] | None:
    """:meth:`Algorithm.meta_backward` with ``inner.batch_tasks`` tasks per batched pass; None (and a
    warning, once) when these tasks cannot be batched, for the caller's loop."""
    if alg.inner.batch_tasks < 2:
        return None
    why = obstacle(alg, batches)
    if why is not None:
        if why not in _warned:
            _warned.add(why)
            warnings.warn(f"inner.batch_tasks: adapting one task at a time: {why}", stacklevel=3)
        return None
    total, correct, count = 0.0, 0, 0
    for start in range(0, len(batches), alg.inner.batch_tasks):
        loss, right, queries = batched_pass(alg, batches[start:start + alg.inner.batch_tasks], iteration, n)
        total, correct, count = total + loss, correct + right, count + queries
    return total, correct / max(count, 1)


def batched_pass(alg: Algorithm, batches: Sequence[TaskBatch], iteration: int, n: int) -> tuple[float, int, int]:
    """Accumulate the meta-gradient of ``batches`` (weighted 1/``n`` each) into ``.grad``, all in one
    batched pass; returns (summed last query loss / n, correct queries, queries)."""
    create_graph = alg.second_order(iteration)
    weights = alg.msl_weights(iteration).tolist()
    steps, transductive = alg.train_steps, alg.inner.bn == "transductive"
    first = batches[0]
    ways, shots, dim = first.ways, len(first.ys), alg.model.feature_dim
    params = dict(alg.model.named_parameters())
    body = {n_: params[n_] for n_ in alg.adapted_names(first.modality)}
    proto = alg.inner.head_init == "proto"
    if proto:
        nothing = torch.empty(len(batches), 0, device=first.ys.device)  # vmap needs an argument: unused
        heads: tuple[Tensor, Tensor] = (nothing, nothing)
    else:
        w, b = zip(*(alg.init_head(t, body) for t in batches), strict=True)
        heads = (torch.stack(w), torch.stack(b))

    def features(fast: dict[str, Tensor], x: Tensor, step: int, rows: int | None) -> Tensor:
        return alg.episode_features(fast, x, first.modality, step, rows)

    def task(xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor, head_w: Tensor, head_b: Tensor
             ) -> tuple[Tensor, Tensor, Tensor]:
        fast = dict(body)

        def proto_head(f: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
            """The support set's class means, as Algorithm.init_head, summed with a one-hot product."""
            feats = features(f, xs, 0, None)
            onehot = (ys.unsqueeze(1) == torch.arange(ways, device=ys.device)).to(feats.dtype)  # F.one_hot checks ys
            return alg.head_from_prototypes((onehot.T @ feats) / onehot.sum(0).clamp_min(1).unsqueeze(1))

        if proto:  # the head is its prototypes plus a zero step 0 adapts: the loop's gradient through both
            like = next(iter(params.values()))
            head_w, head_b = like.new_zeros(ways, dim), like.new_zeros(ways)
        fast["head.weight"], fast["head.bias"] = head_w, head_b
        losses = []
        for step in range(steps):
            def support_loss(f: dict[str, Tensor], step: int = step) -> tuple[Tensor, tuple[Tensor, ...]]:
                w, b = f["head.weight"], f["head.bias"]
                protos: tuple[Tensor, ...] = ()
                if proto and step == 0:
                    protos = proto_head(f)
                    w, b = w + protos[0], b + protos[1]
                return F.cross_entropy(alg.head_logits(features(f, xs, step, None), w, b), ys), protos
            g, protos = grad(support_loss, has_aux=True)(fast)
            fast = {k: v - alg.inner_lr(k, step) * (g[k] if create_graph else g[k].detach()) for k, v in fast.items()}
            if protos:
                fast["head.weight"], fast["head.bias"] = fast["head.weight"] + protos[0], fast["head.bias"] + protos[1]
            if alg.inner.msl or step == steps - 1:
                if transductive:
                    fq = features(fast, xq, step + 1, None)
                else:
                    fq = features(fast, torch.cat([xs, xq]), step + 1, shots)[shots:]
                out = alg.head_logits(fq, fast["head.weight"], fast["head.bias"])
                losses.append(F.cross_entropy(out, yq))
        loss = sum(w * lo for w, lo in zip(weights, losses, strict=True))
        return loss, losses[-1].detach(), out.detach()  # type: ignore[return-value]

    stack = lambda key: torch.stack([getattr(t, key) for t in batches])  # noqa: E731
    yq = stack("yq")
    with _plain_layers(alg.model):
        loss, last, out = vmap(task, randomness="different")(stack("xs"), stack("ys"), stack("xq"), yq, *heads)
    (loss.sum() / n).backward()
    return float(last.sum()) / n, int((out.argmax(-1) == yq).sum()), yq.numel()
