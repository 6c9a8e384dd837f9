"""The shared functional inner loop, and the base class every algorithm subclasses.

One inner loop serves every gradient-based method: ``functional_call`` over a dict of fast weights,
so any ``nn.Module`` is adapted unchanged. An algorithm module (``maml.py``, ``anil.py``, ...) holds
only what differs between methods, through the hooks of :class:`Algorithm`: which parameters adapt
(:meth:`Algorithm.configure`), whether the outer gradient flows through the inner updates
(:meth:`Algorithm.second_order`), where inner step sizes come from (``learned_lrs``), how logits are
made from features (:meth:`Algorithm.head_logits`), how a new task's head starts, and how the outer
gradient is formed (:meth:`Algorithm.meta_backward`). Adapting is a pure function of the initial
state and a support set (:meth:`Algorithm.adapt`): nothing it does changes the algorithm's state, so
training, ``adapt``, ``evaluate`` and ``compare`` share one loaded model.

Batch norm: by default (``bn: support``) the query set is normalised with statistics of the support
set, computed with the current fast weights, so query examples never share statistics with each
other and accuracy is not inflated by transduction. ``bn: transductive`` reproduces the original
MAML code (batch statistics of whichever set is forwarded).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from mtl.algorithms import batched_tasks, stacked_tasks
from mtl.algorithms.inner_config import InnerConfig
from mtl.algorithms.query_chunks import query_loss_in_pieces
from mtl.algorithms.recompute import recomputed_step
from mtl.data.inputs import Inputs, concat
from mtl.data.stream import TaskBatch
from mtl.models import (
    EpisodicBatchNorm2d,
    MultiTaskModel,
    channels_last_weight,
    head_key,
    logistic_head,
    step_statistics,
    support_statistics,
)
from mtl.models.heads import class_means, linear_logits, widened

if TYPE_CHECKING:
    from mtl.data.stream import EpisodeStream


def _key(name: str) -> str:
    return name.replace(".", "__")


class Algorithm(nn.Module):
    """The meta-learned state (the model, learned inner step sizes, per-step batch-norm parameters)
    and the shared inner loop. Subclasses, one module each, register with ``@algorithm("name")``.

    Class attributes a subclass may set: ``training_data`` (``"episodes"``: N-way K-shot meta-batches;
    ``"classes"``: task-balanced batches over all of a task's classes, as joint training uses),
    ``learned_lrs`` (``"per_parameter"``: Meta-SGD's learned step size per weight), ``compare_steps`` (the
    adaptation steps ``compare`` gives the method's own settings; ``None``: its ``--steps``) and
    ``cycles_support`` (it honours ``inner.cycle_support``)."""

    name: ClassVar[str] = ""
    training_data: ClassVar[Literal["episodes", "classes"]] = "episodes"
    learned_lrs: ClassVar[Literal["none", "per_parameter"]] = "none"
    compare_steps: ClassVar[int | None] = None
    cycles_support: ClassVar[bool] = False
    head_kind: ClassVar[str] = "linear"  # what :meth:`head_logits` computes, for the saved model's head

    @classmethod
    def configure(cls, inner: InnerConfig) -> InnerConfig:
        """The method's own inner-loop choices (ANIL: only the head adapts); fields the recipe set
        explicitly are in ``inner.model_fields_set``."""
        return inner

    def __init__(self, model: MultiTaskModel, inner: InnerConfig, heads: dict[str, int] | None = None) -> None:
        """``heads``: task -> outputs, for methods that keep a head per training task."""
        super().__init__()
        self.model = model
        self.inner = inner = self.configure(inner)
        if inner.head_init == "learned":
            for task, ways in (heads or {}).items():
                head = model.add_head(task, ways)
                nn.init.normal_(head.weight, std=0.01)
        self.lrs = nn.ParameterDict()
        self.bn_steps = nn.ParameterDict()
        if inner.per_step_bn:
            for name, p in self.bn_params().items():
                self.bn_steps[_key(name)] = nn.Parameter(p.detach().clone().unsqueeze(0).repeat(inner.steps + 1, 1))
        self.evaluating = False  # per-step running statistics: collected in training, used when evaluating
        self.replaying = False  # an inner step re-run for the outer backward (recompute): collects nothing
        if inner.per_step_bn_stats:
            for name, m in self.norms().items():
                self.register_buffer(f"bn_mean__{_key(name)}", torch.zeros(inner.steps + 1, m.num_features))
                self.register_buffer(f"bn_var__{_key(name)}", torch.ones(inner.steps + 1, m.num_features))
        if self.learned_lrs == "per_parameter" or inner.lslr:
            for name, p in self._lr_shapes().items():
                shape = p if self.learned_lrs == "per_parameter" else (inner.steps,)
                self.lrs[_key(name)] = nn.Parameter(torch.full(shape, inner.lr))

    # --- hooks a method overrides ----------------------------------------------------------------

    def second_order(self, iteration: int) -> bool:
        """Whether the outer gradient flows through the inner updates at ``iteration``."""
        return False

    def head_logits(self, feats: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        """Logits of an episode head (``weight``, ``bias``) on features: linear by default, in float32."""
        return linear_logits(feats, weight, bias)

    @property
    def train_steps(self) -> int:
        """Inner steps per episode in meta-training."""
        return self.inner.steps

    @property
    def eval_steps(self) -> int:
        return self.inner.steps if self.inner.eval_steps is None else self.inner.eval_steps

    # --- which parameters adapt ----------------------------------------------------------------

    def norms(self) -> dict[str, EpisodicBatchNorm2d]:
        return {n: m for n, m in self.model.named_modules() if isinstance(m, EpisodicBatchNorm2d)}

    def step_stats(self, step: int) -> dict[str, tuple[Tensor, Tensor]]:
        """Each batch norm's running (mean, var) for inner step ``step`` (views: updates land in place)."""
        s = min(step, self.inner.steps)
        return {n: (getattr(self, f"bn_mean__{_key(n)}")[s], getattr(self, f"bn_var__{_key(n)}")[s])
                for n in self.norms()}

    @contextlib.contextmanager
    def evaluation(self) -> Iterator[None]:
        """Adapting a task to evaluate it (not to meta-train): per-step running statistics are used."""
        old, self.evaluating = self.evaluating, True
        try:
            yield
        finally:
            self.evaluating = old

    def bn_params(self) -> dict[str, Tensor]:
        names = {f"{n}.{p}" for n in self.norms() for p in ("weight", "bias")}
        return {n: p for n, p in self.model.named_parameters() if n in names}

    def adapted_names(self, modality: str) -> list[str]:
        """Body parameters updated by the inner loop (the episode head is handled apart)."""
        if self.inner.adapt == "head":
            return []
        skip = set(self.bn_params()) if self.inner.per_step_bn else set()
        out = []
        for n, p in self.model.named_parameters():
            if not p.requires_grad or n in skip or n.startswith("heads."):
                continue
            if n.startswith("encoders."):
                # a text encoder's trainable layers adapt only given `inner.encoder_lr`
                if self.inner.adapt != "all" or not n.startswith(f"encoders.{modality}.") or (
                        modality == "text" and self.inner.encoder_lr is None):
                    continue
            elif n.startswith("projections.") and not n.startswith(f"projections.{modality}."):
                continue
            out.append(n)
        return out

    def _lr_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        for m in self.model.encoders:
            for n in self.adapted_names(m):
                if n.startswith("encoders.text."):  # a transformer's weights take `encoder_lr`
                    continue
                shapes[n] = tuple(dict(self.model.named_parameters())[n].shape)
        shapes["head.weight"] = (1, self.model.feature_dim)  # shared by rows: heads differ in width
        shapes["head.bias"] = (1,)
        return shapes

    def inner_lr(self, name: str, step: int, lr: float | None = None) -> Tensor | float:
        """The step size of parameter ``name`` at ``step``: ``inner.encoder_lr`` for a text encoder's
        layers, else ``lr`` if given (a user's choice replaces the learned ones), else the learned
        one, else the recipe's."""
        k = _key(name)
        if self.inner.encoder_lr is not None and name.startswith("encoders.text."):
            return self.inner.encoder_lr
        if lr is not None:
            return lr
        if k not in self.lrs:
            return self.inner.lr
        learned = self.lrs[k]
        return learned if self.learned_lrs == "per_parameter" else learned[min(step, learned.shape[0] - 1)]

    # --- the inner loop ------------------------------------------------------------------------

    def episode_features(self, params: dict[str, Tensor], x: Inputs, modality: str, step: int,
                         stats_rows: int | None, encoded: bool = False) -> Tensor:
        """Features of ``x`` under ``params``; ``encoded``: ``x`` is the encoder's output already."""
        params = {k: v for k, v in params.items() if not k.startswith("head.")}
        if self.inner.per_step_bn:
            s = min(step, self.inner.steps)
            params = {**params, **{n: self.bn_steps[_key(n)][s] for n in self.bn_params()}}
        stats = contextlib.nullcontext()
        if self.inner.per_step_bn_stats and not encoded and not self.replaying:
            mode = "collect" if self.training and not self.evaluating else "use"
            stats = step_statistics(self.model, self.step_stats(step), mode)  # type: ignore[assignment]
        with support_statistics(self.model, stats_rows), stats:
            return functional_call(self.model, params, (x,), {"modality": modality, "encoded": encoded},
                                   strict=False)

    def encode(self, b: TaskBatch) -> tuple[Tensor, Tensor]:
        """The encoder's outputs for support and query, queries normalised with support statistics
        (or their own, ``bn: transductive``). Gradients reach the encoder through them."""
        encoder = self.model.encoders[b.modality]
        if self.inner.bn == "transductive":
            with support_statistics(self.model, None):
                return encoder(b.xs), encoder(b.xq)
        ns = len(b.ys)
        with support_statistics(self.model, ns):
            both = encoder(concat(b.xs, b.xq))
        return both[:ns], both[ns:]

    def init_head(self, b: TaskBatch, params: dict[str, Tensor], encoded: Tensor | None = None,
                  head_init: str | None = None) -> tuple[Tensor, Tensor]:
        """A new task's head: a training task's learned one, the support set's prototypes (Proto-MAML),
        logistic regression on its features (``logistic``, adaptation only: no gradient through it), or zero."""
        ways = b.ways
        dim = self.model.feature_dim
        key = head_key(b.task)
        head_init = head_init or self.inner.head_init
        if head_init == "learned" and key in self.model.heads and self.model.heads[key].out_features == ways:
            head = self.model.heads[key]
            return head.weight, head.bias
        if head_init in ("proto", "logistic"):
            if encoded is None:
                feats = self.episode_features(params, b.xs, b.modality, 0, None)
            else:
                feats = self.episode_features(params, encoded, b.modality, 0, None, encoded=True)
            if head_init == "logistic":  # fitted, not differentiated: ``adapt`` copies it for any steps after
                return logistic_head(feats, b.ys, ways)
            return self.head_from_prototypes(class_means(feats, b.ys, ways))
        device = b.ys.device
        return (torch.zeros(ways, dim, device=device, requires_grad=True),
                torch.zeros(ways, device=device, requires_grad=True))

    def head_from_prototypes(self, protos: Tensor) -> tuple[Tensor, Tensor]:
        """A linear head, logits -|f - c|^2 + const, in float32 (:func:`linear_logits`; Proto-MAML, ProtoNets)."""
        protos = widened(protos)
        return 2 * protos, -(protos * protos).sum(1)

    def adapt(self, b: TaskBatch, steps: int, create_graph: bool, track_query: bool = True, detach: bool = False,
              lr: float | None = None, head_init: str | None = None
              ) -> tuple[list[Tensor], dict[str, Tensor], Tensor | None]:
        """Run the inner loop. Returns the query losses after each tracked step, the fast weights and
        the last query logits. ``detach`` starts from a copy of the weights (evaluation, Reptile).
        ``lr`` and ``head_init`` replace the learned step sizes and the head's start for this call
        only: the algorithm's state is never changed.

        When the inner loop leaves the encoder alone (``adapt: trunk+head`` or ``head``, and always
        for a pretrained text encoder), the episode is encoded once and every step runs the trunk and
        head only."""
        names = self.adapted_names(b.modality)
        all_params = dict(self.model.named_parameters())
        fast = {n: channels_last_weight(all_params[n]) for n in names}  # the activations' layout
        encoded = None
        per_step = self.inner.per_step_bn or self.inner.per_step_bn_stats
        if not (per_step and self.norms()) and not any(n.startswith("encoders.") for n in names):
            with torch.no_grad() if detach else contextlib.nullcontext():  # no outer gradient to keep
                encoded = self.encode(b)
        w, bias = self.init_head(b, fast, encoded[0] if encoded else None, head_init)
        fast["head.weight"], fast["head.bias"] = w, bias
        if detach:
            fast = {k: v.detach().requires_grad_() for k, v in fast.items()}
        query_losses: list[Tensor] = []
        logits: Tensor | None = None
        fs = fq = None
        if encoded is not None and not names:  # ANIL: the body's features are shared by every step
            fs = self.episode_features({}, encoded[0], b.modality, 0, None, encoded=True)
            fq = self.episode_features({}, encoded[1], b.modality, 0, None, encoded=True)
        for step in range(steps):
            # a prototype head is a function of the body's weights, which step 0 differentiates through
            if create_graph and self.inner.recompute and (step or (head_init or self.inner.head_init) != "proto"):
                fast = recomputed_step(lambda f, e, second, step=step: self.inner_step(  # type: ignore[misc]
                    b, f, step, e[0], e[1], second, lr, replay=second), fast, [encoded[0] if encoded else None, fs])
            else:
                fast = self.inner_step(b, fast, step, encoded[0] if encoded else None, fs, create_graph, lr,
                                       retain=not detach)
            if track_query and (self.inner.msl or step == steps - 1):
                loss, logits = self.query_loss(b, fast, step + 1, fq, encoded[1] if encoded else None)
                query_losses.append(loss)
        if steps == 0 and track_query:
            loss, logits = self.query_loss(b, fast, 0, fq, encoded[1] if encoded else None)
            query_losses.append(loss)
        return query_losses, fast, logits

    def inner_step(self, b: TaskBatch, fast: dict[str, Tensor], step: int, encoded: Tensor | None,
                   fs: Tensor | None, create_graph: bool, lr: float | None, retain: bool = True, replay: bool = False
                   ) -> dict[str, Tensor]:
        """One step on the support loss. ``retain``: keep the graph that made the head (Proto-MAML), which
        the outer gradient still needs; ``replay``: the step re-run by the outer backward (``recompute``)."""
        self.replaying = replay
        try:
            if fs is not None:
                feats = fs
            elif encoded is not None:
                feats = self.episode_features(fast, encoded, b.modality, step, None, encoded=True)
            else:
                feats = self.episode_features(fast, b.xs, b.modality, step, None)
        finally:
            self.replaying = False
        loss = F.cross_entropy(self.head_logits(feats, fast["head.weight"], fast["head.bias"]), b.ys)
        keys = [k for k, v in fast.items() if v.requires_grad]
        grads = torch.autograd.grad(loss, [fast[k] for k in keys], create_graph=create_graph,
                                    retain_graph=retain or create_graph, allow_unused=True)
        new = dict(fast)
        for k, g in zip(keys, grads, strict=True):
            if g is not None:
                new[k] = fast[k] - self.inner_lr(k, step, lr) * (g if create_graph else g.detach())
        return new

    def query_logits(self, b: TaskBatch, fast: dict[str, Tensor], step: int, fq: Tensor | None = None,
                     encoded_query: Tensor | None = None) -> Tensor:
        """Query logits under ``fast``, from the query's features ``fq``, its encoding, or its inputs."""
        if fq is None:
            body = {k: v for k, v in fast.items() if not k.startswith("head.")}
            if encoded_query is not None:
                fq = self.episode_features(body, encoded_query, b.modality, step, None, encoded=True)
            elif self.inner.bn == "transductive":
                fq = self.episode_features(body, b.xq, b.modality, step, None)
            else:
                fq = self.episode_features(body, concat(b.xs, b.xq), b.modality, step, len(b.ys))[len(b.ys):]
        return self.head_logits(fq, fast["head.weight"], fast["head.bias"])

    def query_loss(self, b: TaskBatch, fast: dict[str, Tensor], step: int, fq: Tensor | None,
                   encoded_query: Tensor | None) -> tuple[Tensor, Tensor]:
        """The query loss under ``fast`` and its logits; in ``inner.query_chunks`` pieces when it is
        to be differentiated, for memory (:mod:`mtl.algorithms.query_chunks`)."""
        if self.inner.query_chunks > 1 and torch.is_grad_enabled():
            return query_loss_in_pieces(self, b, fast, step, fq, encoded_query, self.inner.query_chunks)
        logits = self.query_logits(b, fast, step, fq, encoded_query)
        return F.cross_entropy(logits, b.yq), logits

    # --- the outer step ------------------------------------------------------------------------

    def msl_weights(self, iteration: int) -> Tensor:
        """MAML++'s importance of each step's query loss: uniform at first, the last step's later."""
        s = self.inner.steps
        if not self.inner.msl:
            return torch.ones(1)
        decay = 1.0 / s / self.inner.msl_iterations
        floor = 0.03 / s
        w = torch.full((s,), max(1.0 / s - iteration * decay, floor))
        w[-1] = min(1.0 / s + iteration * (s - 1) * decay, 1.0 - (s - 1) * floor)
        return w

    def meta_backward(self, batches: Sequence[TaskBatch], iteration: int, total_tasks: int | None = None
                      ) -> tuple[float, float]:
        """Accumulate the meta-gradient of a meta-batch into ``.grad``; returns (loss, query accuracy).

        ``total_tasks``: the whole meta-batch when ``batches`` is one process's share of it, so that
        gradients summed over processes equal the single-process mean."""
        n = total_tasks or len(batches)
        for together in (batched_tasks, stacked_tasks):  # several tasks in one pass, where asked and they fit
            if (done := together.meta_backward(self, batches, iteration, n)) is not None:
                return done
        weights = self.msl_weights(iteration)
        create_graph = self.second_order(iteration)
        total, correct, count = 0.0, 0, 0
        for b in batches:
            losses, _, logits = self.adapt(b, self.train_steps, create_graph)
            loss = sum(w * lo for w, lo in zip(weights.tolist(), losses, strict=True)) / n
            loss.backward()  # one task at a time: its graph is freed before the next
            total += float(losses[-1].detach()) / n
            assert logits is not None
            correct += int((logits.detach().argmax(1) == b.yq).sum())
            count += len(b.yq)
        return total, correct / max(count, 1)

    def query_logits_after(self, b: TaskBatch, steps: int | None = None, lr: float | None = None,
                           head_init: str | None = None) -> Tensor:
        """Query logits after adapting to the support set (no meta-gradient): what accuracy, calibration
        and out-of-fold scores are computed from."""
        steps = self.eval_steps if steps is None else steps
        with self.evaluation():
            with torch.enable_grad():
                _, fast, _ = self.adapt(b, steps, create_graph=False, track_query=False, detach=True, lr=lr,
                                        head_init=head_init)
            with torch.no_grad():
                return self.query_logits(b, {k: v.detach() for k, v in fast.items()}, steps).float()

    def evaluate(self, b: TaskBatch, steps: int | None = None, lr: float | None = None,
                 head_init: str | None = None) -> float:
        """Query accuracy after adapting to the support set (no meta-gradient)."""
        return float((self.query_logits_after(b, steps, lr, head_init).argmax(1) == b.yq).float().mean())

    def outer_backward(self, source: Any, iteration: int, meta_batch: int, rank: int = 0, world: int = 1
                       ) -> tuple[float, float, int]:
        """This process's share of one outer step's gradient, accumulated into ``.grad``; returns
        (loss, accuracy, examples). ``source``: the :class:`EpisodeStream` (``training_data:
        episodes``), or the task-balanced batches of :mod:`mtl.algorithms.multitask` (``classes``)."""
        stream: EpisodeStream = source
        batches = stream.meta_batch(iteration, meta_batch, range(rank, meta_batch, world))
        loss, acc = self.meta_backward(batches, iteration, total_tasks=meta_batch)
        return loss, acc, sum(len(b.yq) for b in batches)
