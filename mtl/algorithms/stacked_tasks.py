"""A meta-batch's tasks adapted side by side on a CPU: their inner loops as one pass, stacked along the channels.

On a CPU the loop of :mod:`mtl.algorithms.inner` pays each small operation's fixed cost once per task:
second-order MAML's support pass (5 images on Omniglot) runs dozens of convolutions, batch norms and
their first and second derivatives per inner step, each call far from filling the core. Here the
support passes of ``inner.stack_tasks`` tasks run as one: task t's images are channels
``t*C .. (t+1)*C - 1`` of one batch, every weight is the tasks' fast weights stacked along its first
(output-channel) dimension, convolutions are grouped by task and batch norm's per-channel statistics
are per task already. The same functions and derivatives, in a fraction of the calls: on Omniglot's
Conv-4 at 5 inner steps, second order, a meta-iteration runs 1.33x as fast (docs/BENCHMARKS.md). ``vmap``
(:mod:`mtl.algorithms.batched_tasks`) batches the same way in principle, but its batching rules for
the double backward run far slower on a CPU.

The query passes stay one task at a time (their 80 images fill the core, and stacked they ran
slower). Each reads detached copies of its task's fast weights and is differentiated into them at
once, freeing its graph; the stacked inner loop is then differentiated once, from all the tasks'
gradients together. The meta-gradient is the loop's (tests/test_stacked_tasks.py).

It takes an encoder with a ``stacked_input`` method and a ``tasks`` attribute (the Conv-4 family,
:class:`mtl.models.ConvEncoder`) adapted with the head (``adapt: all``), no shared trunk, and tasks
of one shape; anything else runs the loop. By default it stacks on a CPU only, where it was measured;
a number in the recipe stacks on any device.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtl.data.stream import TaskBatch
from mtl.models import channels_last_weight, setting
from mtl.models.heads import class_means

if TYPE_CHECKING:
    from mtl.algorithms.inner import Algorithm

_warned: set[str] = set()  # each reason not to stack is said once per process, when the recipe asked for it


def obstacle(alg: Algorithm, batches: Sequence[TaskBatch]) -> str | None:
    """Why these tasks cannot be stacked, or None when they can."""
    from mtl.algorithms import inner as shared  # at call time: inner imports this module

    first, model, inner = batches[0], alg.model, alg.inner
    if any(getattr(type(alg), hook) is not getattr(shared.Algorithm, hook) for hook in ("adapt", "inner_step")):
        return f"{type(alg).__name__} has an inner loop of its own"
    if any(b.modality != "image" for b in batches) or "image" not in model.encoders:
        return "the tasks are not all image tasks"
    if not hasattr(model.encoders["image"], "stacked_input"):
        return f"the {type(model.encoders['image']).__name__} encoder does not take tasks stacked along its channels"
    if any(not isinstance(b.xs, Tensor) for b in batches):
        return "the tasks' images are not tensors"
    names = alg.adapted_names("image")
    if not any(n.startswith("encoders.image.") for n in names):
        return "the encoder is not adapted in the inner loop (the loop encodes each episode once)"
    if (any(not n.startswith("encoders.image.") for n in names) or not isinstance(model.trunk, nn.Identity)
            or hasattr(model, "whitening")):
        return "a shared trunk, projection or feature whitening follows the encoder"
    if inner.per_step_bn or inner.per_step_bn_stats:
        return "per-step batch norm (MAML++) reads its own weights and statistics per step"
    if inner.recompute:
        return "inner.recompute rebuilds one task's inner steps at a time"
    if any(b.ways != first.ways or b.xs.shape != first.xs.shape for b in batches):
        return "the tasks differ in ways, shots or image size"
    return None


# The automatic size (``inner.stack_tasks: null``). One thread, 5 inner steps, ms per task against the loop
# (docs/BENCHMARKS.md): Omniglot 5-way 1-shot (a task's support pass: 0.25 M values per activation of the first
# block) 8 tasks 1.33x, 16 no more; 20-way 1-shot (1 M) 2 tasks 1.06x, 8 tasks 1.0x; 84 x 84 Conv-4-32 1-shot (1.1 M)
# 2 tasks 1.08x; 5-shot (5.6 M) 4 tasks 0.92x. So a stacked step holds at most STEP_VALUES; and since the stacked
# tasks' inner loops are stored together until the outer backward, all its steps at most GRAPH_VALUES (8 Omniglot
# tasks at 5 steps: 233 MB more peak memory than the loop), so that memory does not grow with the steps.
STEP_VALUES = 2_500_000
GRAPH_VALUES = 12_500_000
MOST_TASKS = 8


def tasks_per_pass(alg: Algorithm, batches: Sequence[TaskBatch]) -> int:
    """How many tasks each stacked pass takes: the recipe's number, or as many as pay."""
    if alg.inner.stack_tasks is not None:
        return alg.inner.stack_tasks
    if alg.inner.query_chunks > 1:  # a recipe that asks for memory before speed: the stacks' graphs are alive together
        return 1
    if batches[0].xs.device.type != "cpu":  # measured on CPUs only; on a GPU inner.batch_tasks batches tasks
        return 1
    encoder = alg.model.encoders["image"]
    _, _, height, width = encoder.stacked_input([batches[0].xs]).shape
    values = len(batches[0].xs) * height * width * encoder.out_dim
    return min(MOST_TASKS, STEP_VALUES // values, GRAPH_VALUES // (values * alg.train_steps))


def meta_backward(alg: Algorithm, batches: Sequence[TaskBatch], iteration: int, n: int) -> tuple[float, float] | None:
    """:meth:`Algorithm.meta_backward` with tasks stacked; None when the recipe says one at a time, the
    stacks would not pay, or these tasks cannot be stacked (a warning, once, if the recipe asked for them)."""
    if alg.inner.stack_tasks == 1 or len(batches) < 2:
        return None
    why = obstacle(alg, batches)
    if why is not None:
        if alg.inner.stack_tasks is not None and why not in _warned:
            _warned.add(why)
            warnings.warn(f"inner.stack_tasks: adapting one task at a time: {why}", stacklevel=3)
        return None
    together = tasks_per_pass(alg, batches)
    if together < 2:
        return None
    total, correct, count = 0.0, 0, 0
    for start in range(0, len(batches), together):
        loss, right, queries = stacked_pass(alg, batches[start:start + together], iteration, n)
        total, correct, count = total + loss, correct + right, count + queries
    return total, correct / max(count, 1)


def _stacked_lr(lr: Tensor | float, name: str, tasks: int) -> Tensor | float:
    """A step size for stacked weights: Meta-SGD's per-weight ones repeated like the weights."""
    if isinstance(lr, Tensor) and lr.dim() > 0 and not name.startswith("head."):
        return lr.repeat(tasks, *[1] * (lr.dim() - 1))
    return lr


def stacked_pass(alg: Algorithm, batches: Sequence[TaskBatch], iteration: int, n: int) -> tuple[float, int, int]:
    """Accumulate the meta-gradient of ``batches`` (weighted 1/``n`` each) into ``.grad``, their inner loops
    stacked; returns (summed last query loss / n, correct queries, queries)."""
    tasks, create_graph = len(batches), alg.second_order(iteration)
    weights = alg.msl_weights(iteration).tolist()
    encoder = alg.model.encoders["image"]
    params = dict(alg.model.named_parameters())
    fast = {k: channels_last_weight(params[k].repeat(tasks, *[1] * (params[k].dim() - 1)))
            for k in alg.adapted_names("image")}
    rows = {k: params[k].shape[0] for k in fast}  # each task's share of a stacked weight
    xs = encoder.stacked_input([b.xs for b in batches])
    ys = torch.stack([b.ys for b in batches])
    ways, dim = batches[0].ways, alg.model.feature_dim

    def features(f: dict[str, Tensor], step: int) -> Tensor:
        with setting(alg.model, type(encoder), "tasks", tasks):
            h = alg.episode_features(f, xs, "image", step, None)
        return h.view(len(xs), tasks, dim).transpose(0, 1)  # (tasks, support, dim)

    if alg.inner.head_init == "proto":  # each task's class means, differentiable like the loop's
        heads = [alg.head_from_prototypes(class_means(f, y, ways)) for f, y in zip(features(fast, 0), ys, strict=True)]
    else:
        heads = [alg.init_head(b, {}) for b in batches]
    fast["head.weight"], fast["head.bias"] = (torch.stack(h) for h in zip(*heads, strict=True))
    outputs: list[Tensor] = []
    grads: list[Tensor] = []
    total, correct, count, queried = 0.0, 0, 0, 0
    for step in range(alg.train_steps):
        logits = torch.vmap(alg.head_logits)(features(fast, step), fast["head.weight"], fast["head.bias"])
        loss = F.cross_entropy(logits.flatten(0, 1), ys.flatten(), reduction="sum") / ys.shape[1]
        keys = list(fast)
        # the graph is kept in first order too: the prototype head's, which the outer gradient goes through
        g = torch.autograd.grad(loss, [fast[k] for k in keys], create_graph=create_graph, retain_graph=True,
                                allow_unused=True)
        fast = {k: fast[k] if gk is None else
                fast[k] - _stacked_lr(alg.inner_lr(k, step), k, tasks) * (gk if create_graph else gk.detach())
                for k, gk in zip(keys, g, strict=True)}
        if not (alg.inner.msl or step == alg.train_steps - 1):
            continue
        weight, last, queried = weights[queried], step + 1, queried + 1
        piece = {k: [] for k in fast}
        for t, b in enumerate(batches):  # each task's query pass into detached copies of its fast weights
            mine = {k: (v[t] if k.startswith("head.") else v[t * rows[k]:(t + 1) * rows[k]]).detach().requires_grad_()
                    for k, v in fast.items()}
            q, out = alg.query_loss(b, mine, last, None, None)
            (weight * q / n).backward()
            for k, v in mine.items():
                piece[k].append(v.grad if v.grad is not None else torch.zeros_like(v))
            if step == alg.train_steps - 1:
                total += float(q.detach()) / n
                correct += int((out.detach().argmax(1) == b.yq).sum())
                count += len(b.yq)
        for k, v in fast.items():
            if v.requires_grad:
                outputs.append(v)
                grads.append(torch.stack(piece[k]) if k.startswith("head.") else torch.cat(piece[k]))
    torch.autograd.backward(outputs, grads)  # the stacked inner loops, differentiated once
    return total, correct, count
