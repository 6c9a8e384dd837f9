"""Prototypical networks (Snell et al., 2017): episodic training of the encoder for a nearest-prototype
classifier; no inner loop."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mtl.algorithms.inner import Algorithm, InnerConfig
from mtl.algorithms.registry import algorithm
from mtl.data.stream import TaskBatch
from mtl.errors import MtlError


@algorithm("protonet")
class ProtoNet(Algorithm):
    """Prototypical networks: query logits are -squared distances to the support-set class means.

    With ``inner.cycle_support`` each example of a class takes its turn in the support set, the others
    being the queries, and training minimises the turns' mean loss: the episode's images are encoded once
    and compared (shots + queries) times as often. On Lake's one-shot challenge it lowered the error of
    models trained on the same episodes (docs/BENCHMARKS.md)."""

    compare_steps = 0  # its own adaptation is the prototypes themselves
    cycles_support = True

    @classmethod
    def configure(cls, inner: InnerConfig) -> InnerConfig:
        # the head is the prototypes; with `eval_steps` > 0 adaptation then fine-tunes it as a linear head
        update = {"adapt": "head", "head_init": "proto", "msl": False, "lslr": False}
        if "eval_steps" not in inner.model_fields_set:
            update["eval_steps"] = 0
        return inner.model_copy(update=update)

    @property
    def train_steps(self) -> int:
        return 0  # the loss of the prototypes themselves; gradients reach the encoder through them

    def meta_backward(self, batches: Sequence[TaskBatch], iteration: int, total_tasks: int | None = None
                      ) -> tuple[float, float]:
        if not self.inner.cycle_support:
            return super().meta_backward(batches, iteration, total_tasks)
        n = total_tasks or len(batches)
        total, correct, count = 0.0, 0, 0
        for b in batches:
            losses, logits, yq = self.turn_losses(b)
            (torch.stack(losses).mean() / n).backward()
            total += float(losses[0].detach()) / n  # the first turn's: the plain loss, comparable across recipes
            correct += int((logits.detach().argmax(1) == yq).sum())
            count += len(yq)
        return total, correct / max(count, 1)

    def turn_losses(self, b: TaskBatch) -> tuple[list[Tensor], Tensor, Tensor]:
        """The query loss of each turn of ``b``'s examples in the support set (the first turn: the support
        set as drawn), and the first turn's logits and labels. Every example is normalised with the drawn
        support set's statistics, as the queries are at test time."""
        es, eq = self.encode(b)
        feats = torch.cat([self.episode_features({}, e, b.modality, 0, None, encoded=True) for e in (es, eq)])
        labels = torch.cat([b.ys, b.yq])
        ways, shots = b.ways, len(b.ys) // b.ways
        if any(len(set(torch.bincount(y, minlength=ways).tolist())) > 1 for y in (b.ys, b.yq)):
            raise MtlError(f"inner.cycle_support needs as many examples of every class in an episode ({b.task})",
                           "leave inner.cycle_support out for this task")
        per = feats[torch.argsort(labels, stable=True)].view(ways, -1, feats.shape[1])  # class, example, feature
        m = per.shape[1]
        turns = []
        for turn in range(m):
            held = [(turn + j) % m for j in range(shots)]
            rest = [i for i in range(m) if i not in held]
            weight, bias = self.head_from_prototypes(per[:, held].float().mean(1))
            logits = self.head_logits(per[:, rest].reshape(-1, per.shape[2]), weight, bias)
            turns.append((logits, torch.arange(ways, device=logits.device).repeat_interleave(len(rest))))
        return [F.cross_entropy(logits, y) for logits, y in turns], *turns[0]
