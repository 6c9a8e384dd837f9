"""Second-order inner steps whose memory does not grow with their number.

Second-order MAML keeps, for every inner step, the support set's activations and the graph of its
gradient, so that the outer backward can differentiate through the update; memory grows linearly
with the steps (learn2learn #393, higher #6). :func:`recomputed_step` keeps only each step's inputs
(the fast weights) and rebuilds that step's graph when the outer backward reaches it, one step at a
time: at most one step's graph is alive, for one more forward and backward of the support set per
step. The meta-gradient is the same (tests/test_recompute.py checks it against the stored graph).

This is activation checkpointing (``torch.utils.checkpoint``, reentrant form) around a step that
takes a gradient itself: in the first pass (no grad recorded around it) the step runs first order
on detached copies; when the outer backward re-runs it, grad recording is on, and the step takes
its gradient with ``create_graph=True``, so the double backward flows through it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

# step(fast weights, extra inputs, create_graph) -> new fast weights
Step = Callable[[dict[str, Tensor], list[Tensor | None], bool], dict[str, Tensor]]


def recomputed_step(step: Step, fast: dict[str, Tensor], extras: list[Tensor | None]) -> dict[str, Tensor]:
    """``step(fast, extras, True)``'s result and meta-gradient, storing only ``fast`` and ``extras``.

    ``extras``: every non-leaf tensor with a gradient that the step reads besides the fast weights
    (the encoder's output when the inner loop starts above it; None where absent): their graphs must be reached once,
    through this step's inputs, not again from inside each recomputation. Leaf parameters the step
    reads (learned step sizes, per-step batch-norm weights) get their gradient accumulated directly."""
    keys = list(fast)
    n = len(keys)

    def run(*values: Tensor | None) -> tuple[Tensor, ...]:
        second = torch.is_grad_enabled()  # False on the first pass, True when re-run for the backward
        with torch.enable_grad():
            if not second:
                values = tuple(None if v is None else v.detach().requires_grad_(v.requires_grad) for v in values)
            new = step(dict(zip(keys, values[:n], strict=True)), list(values[n:]), second)  # type: ignore[arg-type]
        out = tuple(new[k] for k in keys)
        return out if second else tuple(t.detach() for t in out)

    result = checkpoint(run, *fast.values(), *extras, use_reentrant=True, preserve_rng_state=True)
    return dict(zip(keys, result, strict=True))
