"""The recipe's ``inner`` section: how a task is adapted, in meta-training and for a new task."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class InnerConfig(BaseModel):
    """How a task is adapted, during meta-training and when a user adapts to a new task."""

    model_config = ConfigDict(extra="forbid")
    steps: int = Field(default=1, ge=1, le=100)
    lr: float = Field(default=0.4, gt=0)
    eval_steps: int | None = Field(default=None, ge=0, le=1000)  # steps when adapting a new task; None: `steps`
    adapt: Literal["all", "trunk+head", "head"] = "all"
    head_init: Literal["learned", "zero", "proto"] = "zero"
    bn: Literal["support", "transductive"] = "support"
    # MAML++ (Antoniou et al., 2019)
    msl: bool = False  # multi-step loss: query loss after every inner step, annealed to the last
    msl_iterations: int = 1000
    lslr: bool = False  # learned per-layer, per-step inner learning rates
    per_step_bn: bool = False  # per-step batch-norm weights and biases
    per_step_bn_stats: bool = False  # per-step batch-norm running statistics, used when evaluating
    second_order_from: int = 0  # derivative-order annealing: first order before this iteration
    # second order: rebuild each inner step's graph in the outer backward instead of storing it, so
    # memory does not grow with the steps (mtl/algorithms/recompute.py)
    recompute: bool = False
    # differentiate the query loss this many pieces of the query set at a time: the query set's graph,
    # most of the memory of few-shot image MAML, is alive a piece at a time (mtl/algorithms/query_chunks.py)
    query_chunks: int = Field(default=1, ge=1, le=1000)
    # adapt this many tasks of a meta-batch at once, in one pass batched with torch.func.vmap: much
    # faster on a GPU, slower on a CPU (mtl/algorithms/batched_tasks.py); 1: one task at a time
    batch_tasks: int = Field(default=1, ge=1, le=4096)
    # on a CPU, run this many tasks' inner loops as one pass, stacked along the channels of a Conv-4
    # (mtl/algorithms/stacked_tasks.py): the loop's meta-gradient in fewer, larger calls. None: as many
    # as pay (up to 8 tasks of small support sets); 1: one task at a time
    stack_tasks: int | None = Field(default=None, ge=1, le=4096)
    # a text encoder's trainable layers: None, they learn in the outer loop only; a step size, they
    # adapt in the inner loop too (with ``adapt: all``): FOMAML, Reptile or MAML over the whole encoder
    encoder_lr: float | None = Field(default=None, gt=0)
    # method protonet: every example of a class takes its turn as the support set, the others as the
    # queries, and the loss is the turns' mean: more comparisons from the same encoded episode
    cycle_support: bool = False

    @model_validator(mode="after")
    def _independent_queries(self) -> InnerConfig:
        if self.query_chunks > 1 and self.bn == "transductive":
            raise ValueError("query_chunks > 1 needs bn: support (transductive batch norm makes queries depend "
                             "on each other); set inner.query_chunks: 1 or inner.bn: support")
        return self
