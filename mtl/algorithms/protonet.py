"""Prototypical networks (Snell et al., 2017): episodic training of the encoder for a nearest-prototype
classifier; no inner loop."""

from __future__ import annotations

from mtl.algorithms.inner import Algorithm, InnerConfig
from mtl.algorithms.registry import algorithm


@algorithm("protonet")
class ProtoNet(Algorithm):
    """Prototypical networks: query logits are -squared distances to the support-set class means."""

    compare_steps = 0  # its own adaptation is the prototypes themselves

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
