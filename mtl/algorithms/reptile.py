"""Reptile (Nichol et al., 2018): the outer step moves the initialization towards adapted weights."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mtl.algorithms.inner import Algorithm
from mtl.algorithms.registry import algorithm
from mtl.data.inputs import concat
from mtl.data.stream import TaskBatch


@algorithm("reptile")
class Reptile(Algorithm):
    """Reptile: the outer 'gradient' is the mean of (initial - adapted) weights; no second order."""

    def meta_backward(self, batches: Sequence[TaskBatch], iteration: int, total_tasks: int | None = None
                      ) -> tuple[float, float]:
        """Adapts on support and query together; accuracy is the query's before adapting."""
        n = total_tasks or len(batches)
        params = dict(self.model.named_parameters())
        total, correct, count = 0.0, 0, 0
        for b in batches:
            joint = TaskBatch(b.task, b.modality, concat(b.xs, b.xq), torch.cat([b.ys, b.yq]), b.xq, b.yq)
            with torch.no_grad():
                w, bias = self.init_head(b, {})
                pred = self.query_logits(b, {"head.weight": w.detach(), "head.bias": bias.detach()}, 0).argmax(1)
            correct += int((pred == b.yq).sum())
            count += len(b.yq)
            losses, fast, _ = self.adapt(joint, self.train_steps, create_graph=False, detach=True)
            total += float(losses[-1].detach()) / n
            for name, v in fast.items():
                if name in params:
                    p = params[name]
                    delta = (p.detach() - v.detach()) / n
                    p.grad = delta if p.grad is None else p.grad + delta
        return total, correct / max(count, 1)
