"""The standard multi-task baseline: the same architecture trained jointly on all tasks.

Hard parameter sharing, one head per task over all its classes, task-balanced batches (the same
number of examples from every task each step), loss = sum of the per-task mean losses. With the
default recipe it sees as many examples per step as a MAML meta-batch does
(``meta_batch * ways * (shots + queries)``), so equal iterations mean equal examples seen.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mtl.algorithms.base import MetaLearner
from mtl.data.inputs import SplitInputs
from mtl.data.task import Task
from mtl.models import head_key


class MultiTaskBatches:
    def __init__(self, tasks: Sequence[Task], examples_per_step: int, seed: int, device: torch.device,
                 text_encoder: str = "minilm", text_layers: int = 0) -> None:
        self.tasks = list(tasks)
        self.per_task = max(1, examples_per_step // len(self.tasks))
        self.seed = seed
        self.device = device
        self.inputs = [SplitInputs(t.train, t.modality, device, text_encoder, text_layers) for t in self.tasks]
        self.labels = [torch.as_tensor(t.train.labels, device=device) for t in self.tasks]

    def backward(self, learner: MetaLearner, iteration: int, rank: int = 0, world: int = 1
                 ) -> tuple[float, float, int]:
        """Accumulate the gradient of the summed per-task losses; returns (mean loss, accuracy,
        examples). With ``world`` processes, each takes every ``world``-th task."""
        model = learner.model
        total, correct, count = 0.0, 0, 0
        for pos, task in enumerate(self.tasks):
            if pos % world != rank:
                continue
            rng = np.random.default_rng([self.seed, iteration, pos])
            idx = rng.choice(len(self.labels[pos]), min(self.per_task, len(self.labels[pos])), replace=False)
            x, y = self.inputs[pos][idx], self.labels[pos][torch.as_tensor(idx, device=self.device)]
            logits = model(x, task.modality, task.name) if head_key(task.name) in model.heads else None
            assert logits is not None
            loss = F.cross_entropy(logits.float(), y)
            loss.backward()
            total += float(loss.detach()) / len(self.tasks)
            correct += int((logits.argmax(1) == y).sum())
            count += len(y)
        return total, correct / max(count, 1), count
