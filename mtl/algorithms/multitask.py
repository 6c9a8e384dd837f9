"""The standard multi-task baseline: the same architecture trained jointly on all tasks.

Hard parameter sharing, one head per task over all its classes, task-balanced batches (the same
number of examples from every task each step, :class:`~mtl.data.stream.ClassBatches`), loss = sum of
the per-task mean losses. With the default recipe it sees as many examples per step as a MAML
meta-batch does (``meta_batch * ways * (shots + queries)``), so equal iterations mean equal examples
seen. A new task is then fine-tuned from it with the same inner loop as every method.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from mtl.algorithms.inner import Algorithm, InnerConfig
from mtl.algorithms.registry import algorithm
from mtl.data.inputs import Inputs
from mtl.data.stream import ClassBatches
from mtl.models import MultiTaskModel, head_key


@algorithm("multitask")
class MultiTask(Algorithm):
    """Multi-task baseline: joint training of the shared model with one head per task, then fine-tuning."""

    training_data = "classes"

    def __init__(self, model: MultiTaskModel, inner: InnerConfig, heads: dict[str, int] | None = None) -> None:
        super().__init__(model, inner, heads)
        for task, n in (heads or {}).items():
            nn.init.normal_(model.add_head(task, n).weight, std=0.01)

    def class_logits(self, x: Inputs, modality: str, task: str) -> Tensor:
        """Logits of training task ``task``'s own head over all its classes."""
        return self.model(x, modality, task)

    def outer_backward(self, source: Any, iteration: int, meta_batch: int, rank: int = 0, world: int = 1
                       ) -> tuple[float, float, int]:
        """The summed per-task losses; with ``world`` processes, each takes every ``world``-th task."""
        batches: ClassBatches = source
        total, correct, count = 0.0, 0, 0
        for pos, task in enumerate(batches.tasks):
            if pos % world != rank or head_key(task.name) not in self.model.heads:
                continue
            x, y = batches.batch(iteration, pos)
            logits = self.class_logits(x, task.modality, task.name)
            loss = F.cross_entropy(logits.float(), y)
            loss.backward()
            total += float(loss.detach()) / len(batches.tasks)
            correct += int((logits.argmax(1) == y).sum())
            count += len(y)
        return total, correct / max(count, 1), count
