"""Meta-gradients: second order matches finite differences; first order, ANIL, Meta-SGD, Reptile and
MAML++ behave as they should; batch norm does not leak between queries."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mtl.algorithms import Algorithm, InnerConfig, build_algorithm
from mtl.data.stream import TaskBatch
from mtl.models import ConvEncoder, ModelConfig, MultiTaskModel, SupportBatchNorm, channel_stats, support_statistics


@pytest.fixture(autouse=True)
def float64():
    """Finite differences need double precision; restored so other test modules are unaffected."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def tiny_learner(method: str = "maml", **inner) -> Algorithm:
    torch.manual_seed(0)
    model = MultiTaskModel(ModelConfig(), ["image"])
    model.encoders["image"] = ConvEncoder(1, hidden=3, depth=2)
    model.feature_dim = 3
    cfg = InnerConfig(**{"steps": 1, "lr": 0.5, "head_init": "zero", **inner})
    learner = build_algorithm(method, model, cfg).double()
    with torch.no_grad():  # non-trivial batch-norm affine parameters
        for n, p in learner.model.named_parameters():
            if "blocks.1." in n or "blocks.5." in n:
                p.add_(0.3 * torch.randn_like(p))
    return learner


def batch(seed: int = 0, ways: int = 3, shots: int = 2, queries: int = 3) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    xs = torch.rand(ways * shots, 1, 8, 8, generator=g, dtype=torch.float64)
    xq = torch.rand(ways * queries, 1, 8, 8, generator=g, dtype=torch.float64)
    return TaskBatch("toy", "image", xs, torch.arange(ways).repeat_interleave(shots), xq,
                     torch.arange(ways).repeat_interleave(queries))


def meta_grads(learner: Algorithm, batches: list[TaskBatch], it: int = 0) -> dict[str, torch.Tensor]:
    learner.zero_grad(set_to_none=True)
    learner.meta_backward(batches, it)
    return {n: p.grad.clone() for n, p in learner.named_parameters() if p.grad is not None}


def outer_loss(learner: Algorithm, batches: list[TaskBatch]) -> float:
    total = 0.0
    for b in batches:
        losses, _, _ = learner.adapt(b, learner.inner.steps, create_graph=False)
        total += float(losses[-1].detach()) / len(batches)
    return total


def directional_fd(learner: Algorithm, batches: list[TaskBatch], direction: dict[str, torch.Tensor],
                   eps: float = 1e-6) -> float:
    params = dict(learner.named_parameters())
    with torch.no_grad():
        for n, d in direction.items():
            params[n].add_(eps * d)
    up = outer_loss(learner, batches)
    with torch.no_grad():
        for n, d in direction.items():
            params[n].sub_(2 * eps * d)
    down = outer_loss(learner, batches)
    with torch.no_grad():
        for n, d in direction.items():
            params[n].add_(eps * d)
    return (up - down) / (2 * eps)


def check_against_fd(learner: Algorithm, batches: list[TaskBatch]) -> dict[str, torch.Tensor]:
    grads = meta_grads(learner, batches)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        direction = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in learner.named_parameters()
                     if p.requires_grad}
        analytic = sum(float((grads.get(n, torch.zeros_like(d)) * d).sum()) for n, d in direction.items())
        numeric = directional_fd(learner, batches, direction)
        assert abs(analytic - numeric) < 1e-6 * max(1.0, abs(numeric)), (analytic, numeric)
    return grads


def test_second_order_matches_finite_differences():
    check_against_fd(tiny_learner(steps=2), [batch(0), batch(1)])


def test_second_order_with_transductive_native_batchnorm_matches_finite_differences():
    check_against_fd(tiny_learner(bn="transductive"), [batch(0)])


def test_metasgd_and_lslr_gradients_match_finite_differences():
    learner = check_against_fd(tiny_learner("metasgd"), [batch(0)])
    assert any(n.startswith("lrs.") for n in learner)
    lslr = tiny_learner(steps=2, lslr=True)
    assert all(p.shape == (2,) for p in lslr.lrs.values())
    check_against_fd(lslr, [batch(2)])


def test_anil_matches_finite_differences_and_adapts_only_the_head():
    learner = tiny_learner("anil")
    assert learner.adapted_names("image") == []
    check_against_fd(learner, [batch(0)])


def test_first_order_is_the_query_gradient_at_the_fast_weights():
    learner = tiny_learner("fomaml")
    b = batch(0)
    grads = meta_grads(learner, [b])
    _, fast, _ = learner.adapt(b, 1, create_graph=False, detach=True)
    fast = {k: v.detach().requires_grad_() for k, v in fast.items()}
    loss = F.cross_entropy(learner.query_logits(b, fast, 1), b.yq)
    body = [k for k in fast if not k.startswith("head.")]
    ref = torch.autograd.grad(loss, [fast[k] for k in body])
    for k, r in zip(body, ref, strict=True):
        assert torch.allclose(grads[f"model.{k}"], r, atol=1e-10)
    second = meta_grads(tiny_learner("maml"), [b])
    diff = max(float((grads[k] - second[k]).abs().max()) for k in grads)
    assert diff > 1e-4  # first order drops the second-order term


def test_anil_and_maml_gradients_differ():
    b = batch(3)  # two steps: with a zero head the first step moves only the head, in both methods
    anil, maml = meta_grads(tiny_learner("anil", steps=2), [b]), meta_grads(tiny_learner("maml", steps=2), [b])
    conv = "model.encoders.image.blocks.0.weight"
    assert not torch.allclose(anil[conv], maml[conv])


def test_reptile_gradient_is_the_weight_difference():
    learner = tiny_learner("reptile", steps=3)
    b = batch(0)
    before = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
    grads = meta_grads(learner, [b])
    joint = TaskBatch(b.task, b.modality, torch.cat([b.xs, b.xq]), torch.cat([b.ys, b.yq]), b.xq, b.yq)
    _, fast, _ = learner.adapt(joint, 3, create_graph=False, detach=True)
    for n, v in fast.items():
        if not n.startswith("head."):
            assert torch.allclose(grads[f"model.{n}"], before[n] - v.detach(), atol=1e-12)


def test_msl_weights_anneal_to_the_last_step():
    learner = tiny_learner(steps=4, msl=True, msl_iterations=100)
    w0, w_end = learner.msl_weights(0), learner.msl_weights(10_000)
    assert torch.allclose(w0, torch.full((4,), 0.25)) and abs(float(w_end.sum()) - 1) < 1e-9
    assert w_end[-1] > 0.9 and (w_end[:-1] > 0).all()
    assert len(learner.adapt(batch(0), 4, create_graph=False)[0]) == 4


def test_per_step_batchnorm_params_are_used_and_learned():
    learner = tiny_learner(steps=2, per_step_bn=True)
    assert all(p.shape[0] == 3 for p in learner.bn_steps.values())
    grads = meta_grads(learner, [batch(0)])
    assert any(n.startswith("bn_steps.") and g.abs().sum() > 0 for n, g in grads.items())
    check_against_fd(learner, [batch(1)])


def test_per_step_batchnorm_statistics_are_collected_in_training_and_used_when_evaluating():
    learner = tiny_learner(steps=2, per_step_bn_stats=True).train()
    for seed in range(3):
        meta_grads(learner, [batch(seed)])
    norms = list(learner.norms())
    rows = learner.step_stats(0)[norms[1]][0], learner.step_stats(2)[norms[1]][0]  # (zero head: step 1 = 0)
    assert rows[0].abs().sum() > 0 and not torch.allclose(*rows)  # one row per inner step, each learned
    check_against_fd(learner, [batch(4)])  # the statistics are not parameters: exact meta-gradients still
    before = {k: v.clone() for k, v in learner.named_buffers() if k.startswith("bn_")}
    b = batch(5)
    learner.evaluate(b)
    assert all(torch.equal(before[k], v) for k, v in learner.named_buffers() if k.startswith("bn_"))
    with learner.evaluation():  # queries are normalised with step 0's running statistics, no support's
        feats = learner.episode_features({}, b.xq, "image", 0, None)
    for name, (mean, var) in learner.step_stats(0).items():
        learner.norms()[name].running_mean.copy_(mean)
        learner.norms()[name].running_var.copy_(var)
    with torch.no_grad():
        assert torch.allclose(feats, learner.model.eval().features(b.xq, "image"), atol=1e-10)


def test_derivative_order_annealing():
    learner = tiny_learner(second_order_from=10)
    assert not learner.second_order(9) and learner.second_order(10)


def test_support_statistics_keep_queries_independent():
    learner = tiny_learner()
    b = batch(0)
    _, fast, _ = learner.adapt(b, 1, create_graph=False, detach=True)
    full = learner.query_logits(b, fast, 1)
    half = TaskBatch(b.task, b.modality, b.xs, b.ys, b.xq[:4], b.yq[:4])
    assert torch.allclose(learner.query_logits(half, fast, 1), full[:4], atol=1e-12)
    trans = tiny_learner(bn="transductive")
    _, fast, _ = trans.adapt(b, 1, create_graph=False, detach=True)
    assert not torch.allclose(trans.query_logits(half, fast, 1), trans.query_logits(b, fast, 1)[:4])


@pytest.mark.parametrize("channels", [1, 3])
def test_conv4_runs_channels_last_throughout(channels):
    """Grayscale input is ambiguous between layouts; unless made explicit, every layer ran NCHW
    (about 4x slower max-pooling and batch norm on CPU)."""
    from mtl.device import keep_freed_memory

    encoder = ConvEncoder(channels)
    layouts = []
    for module in encoder.blocks:
        module.register_forward_pre_hook(
            lambda m, inp: layouts.append(inp[0].is_contiguous(memory_format=torch.channels_last)))
    encoder(torch.rand(4, channels, 28, 28))
    assert len(layouts) == 16 and all(layouts[1:])  # the first conv's input may be either
    assert keep_freed_memory()  # glibc's allocator tuned (Linux)


def test_support_pass_runs_channels_last_and_layout_does_not_change_the_meta_gradient(monkeypatch):
    """Both passes run channels-last (since batch norm's double backward is written out, NCHW no longer
    pays for the pass differentiated twice), with the fast weights in that layout too (oneDNN would copy
    them into it at every call), and NCHW activations or weights give the same meta-gradient."""
    from mtl.algorithms import inner
    from mtl.models import setting

    learner, b = tiny_learner(), batch()
    layouts: list[tuple[int, bool, bool]] = []
    learner.model.encoders["image"].blocks[4].register_forward_pre_hook(  # the second conv
        lambda m, inp: layouts.append((len(inp[0]), inp[0].is_contiguous(memory_format=torch.channels_last),
                                       m.weight.is_contiguous(memory_format=torch.channels_last))))
    nhwc = meta_grads(learner, [b])
    assert layouts == [(6, True, True), (15, True, True)]  # support alone; then [support; query]
    assert learner.model.encoders["image"].blocks[4].weight.is_contiguous()  # the parameter itself is left as it is
    with setting(learner.model, ConvEncoder, "nhwc", False):
        nchw = meta_grads(learner, [b])
    assert [x[:2] for x in layouts[2:]] == [(6, False), (15, False)]
    assert all(torch.allclose(nchw[n], nhwc[n], atol=1e-12) for n in nchw)
    monkeypatch.setattr(inner, "channels_last_weight", lambda p: p)
    nchw_weights = meta_grads(learner, [b])
    assert layouts[4:] == [(6, True, False), (15, True, False)]
    assert all(torch.allclose(nchw_weights[n], nhwc[n], atol=1e-12) for n in nhwc)


@pytest.mark.parametrize("affine", [True, False])
def test_support_batchnorm_gradient_is_exact(affine):
    """The fused backward of support-statistics batch norm against autograd through its definition;
    differentiating it twice raises rather than giving a wrong answer."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, 4, 5, generator=g).requires_grad_()
    w, b = (torch.randn(3, generator=g).requires_grad_() for _ in range(2)) if affine else (None, None)
    assert torch.autograd.gradcheck(lambda *t: SupportBatchNorm.apply(*t, 2, 1e-5), (x, w, b))
    mean, var = channel_stats(x[:2])
    scale = torch.rsqrt(var + 1e-5) * (w if affine else 1)
    shift = -mean * scale + (b if affine else 0)
    reference = x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    out = SupportBatchNorm.apply(x, w, b, 2, 1e-5)
    gy = torch.randn(out.shape, generator=g)
    inputs = (x, w, b) if affine else (x,)
    for ours, theirs in zip(torch.autograd.grad(out, inputs, gy, retain_graph=True),
                            torch.autograd.grad(reference, inputs, gy), strict=True):
        assert torch.allclose(ours, theirs, atol=1e-12)
    (gx,) = torch.autograd.grad((out * out).sum(), x, create_graph=True)  # as an inner loop would
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gx.sum().backward()


@pytest.mark.parametrize("affine", [True, False])
def test_support_batchnorm_and_max_pool_in_one_pass_are_exact(affine):
    """Normalising after the max-pool (:class:`SupportNormPool`) gives the values and gradients of
    batch norm then max-pool, odd sizes included; a negative scale or hooks take the two modules
    instead, and a Conv-4 with support statistics gives what its modules give one by one."""
    from mtl.models.batchnorm import EpisodicBatchNorm2d, SupportNormPool

    g = torch.Generator().manual_seed(0)
    for shape in ((7, 3, 4, 6), (7, 3, 5, 5)):
        x = torch.randn(*shape, generator=g).requires_grad_()
        w, b = (torch.rand(3, generator=g).add(0.1).requires_grad_(), torch.randn(3, generator=g).requires_grad_()
                ) if affine else (None, None)
        assert torch.autograd.gradcheck(lambda *t: SupportNormPool.apply(*t, 2, 1e-5), (x, w, b))
        ours = SupportNormPool.apply(x, w, b, 2, 1e-5)
        theirs = F.max_pool2d(SupportBatchNorm.apply(x, w, b, 2, 1e-5), 2)
        torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=0)
        gy = torch.randn(ours.shape, generator=g)
        inputs = (x, w, b) if affine else (x,)
        for a, c in zip(torch.autograd.grad(ours, inputs, gy), torch.autograd.grad(theirs, inputs, gy), strict=True):
            torch.testing.assert_close(a, c, atol=1e-12, rtol=0)
    norm, pool, x = EpisodicBatchNorm2d(3), torch.nn.MaxPool2d(2), torch.randn(7, 3, 4, 4)
    norm.stats_rows = 2
    assert norm.pooled(x, pool) is not None
    with torch.no_grad():
        norm.weight[1] = -0.5  # max-pool and a decreasing map do not commute
    assert norm.pooled(x, pool) is None
    torch.manual_seed(0)
    encoder = ConvEncoder(in_channels=1)
    images = torch.rand(9, 28, 28)
    layers = list(encoder.blocks)
    with support_statistics(encoder, 3):
        fused = encoder(images)
        handle = layers[1].register_forward_pre_hook(lambda *_: None)
        assert layers[1].pooled(torch.randn(9, 64, 28, 28), layers[2]) is None
        handle.remove()
        h = images.unsqueeze(1)
        for layer in layers:
            h = layer(h)
    torch.testing.assert_close(fused, h.mean(dim=(2, 3)), atol=1e-12, rtol=0)


def test_image_encoders_take_images_of_the_other_channel_count():
    """A colour task on a grayscale checkpoint (or the reverse) is converted, not refused: luminance as
    PIL computes it for one input channel, the gray image repeated for three."""
    from PIL import Image

    from mtl.models.encoders.resnet import ResNet12

    rgb = torch.randint(0, 256, (4, 28, 28, 3), dtype=torch.uint8)
    gray = torch.stack([torch.from_numpy(__import__("numpy").array(Image.fromarray(x.numpy()).convert("L")))
                        for x in rgb])
    torch.manual_seed(0)
    conv = ConvEncoder(in_channels=1).float().eval()  # this module runs in float64 by default
    torch.testing.assert_close(conv(rgb), conv(gray), atol=0.02, rtol=0.02)  # PIL rounds to whole grey levels
    res = ResNet12(3, (4, 4, 4, 4)).float().eval()
    torch.testing.assert_close(res(gray), res(gray.unsqueeze(-1).expand(-1, -1, -1, 3).contiguous()))


def test_episode_views_are_the_eight_symmetries_of_the_square():
    from mtl.data.stream import TaskBatch
    from mtl.data.views import episode_view, turned

    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    seen = {tuple(turned(x, v).flatten().tolist()) for v in range(8)}
    assert len(seen) == 8 and torch.equal(turned(x, 0), x)
    assert torch.equal(turned(turned(x, 1), 3), x) and torch.equal(turned(x, 4), x.flip(-1))
    b = TaskBatch("t", "image", x, torch.tensor([0, 1]), x[:1], torch.tensor([1]))
    v = episode_view(b, 2)  # support and queries turned alike, labels untouched
    assert torch.equal(v.xs, turned(x, 2)) and torch.equal(v.xq, turned(x[:1], 2)) and torch.equal(v.yq, b.yq)
    rgb = torch.arange(2 * 3 * 4 * 5, dtype=torch.uint8).reshape(2, 3, 4, 5)  # (N, C, H, W)
    hwc = rgb.permute(0, 2, 3, 1).contiguous()  # colour as decoded: the same images, channels last
    gray = rgb[:, 0]  # (N, H, W)
    for view in range(8):  # whatever the layout, the same turn of the same pictures
        assert torch.equal(turned(hwc, view), turned(rgb, view).permute(0, 2, 3, 1))
        assert torch.equal(turned(gray, view), turned(rgb, view)[:, 0])


@pytest.mark.parametrize("affine", [True, False])
def test_batch_statistics_norm_is_the_native_kernel_to_the_second_derivative(affine):
    """:class:`BatchStatisticsNorm`'s hand-written double backward gives the native kernel's second
    derivatives (as second-order MAML takes them) to 1e-12 in float64, odd sizes included, and on bf16
    activations comes as close to float64 as the native kernel does; a Conv-4's batch norms take it with
    whole-batch statistics."""
    from mtl.models.batchnorm import EpisodicBatchNorm2d
    from mtl.models.batchnorm_twice import BatchStatisticsNorm

    g = torch.Generator().manual_seed(0)
    ours = lambda x, *p: BatchStatisticsNorm.apply(x, *(p or (None, None)), 1e-5)  # noqa: E731
    native = lambda x, *p: F.batch_norm(x, None, None, *(p or (None, None)), True, 0.0, 1e-5)  # noqa: E731

    def second(norm, x, params):
        inputs = (x.requires_grad_(), *(p.requires_grad_() for p in params))
        y = norm(*inputs)
        loss = (y.float().pow(2) * torch.linspace(-1, 1, y.numel()).view_as(y)).sum()
        grads = torch.autograd.grad(loss, inputs, create_graph=True)
        return torch.autograd.grad(sum(gr.float().pow(2).sum() for gr in grads), inputs)

    for shape in ((5, 3, 4, 4), (2, 2, 3, 1), (5, 8, 6, 6)):
        x = torch.randn(*shape, generator=g, dtype=torch.float64)
        params = (torch.rand(shape[1], generator=g, dtype=torch.float64).add(0.5),
                  torch.randn(shape[1], generator=g, dtype=torch.float64)) if affine else ()
        assert torch.autograd.gradgradcheck(ours, (x.requires_grad_(), *(p.requires_grad_() for p in params)))
        copies = lambda x=x, params=params: (x.detach().clone(), [p.detach().clone() for p in params])  # noqa: E731
        for a, c in zip(second(ours, *copies()), second(native, *copies()), strict=True):
            torch.testing.assert_close(a, c, atol=1e-12, rtol=0)
        # bf16 activations with fp32 parameters, as under autocast: as close to float64 as the native kernel
        low, wide = x.detach().bfloat16(), [p.detach().float() for p in params]
        truth = second(native, low.double(), [p.double() for p in wide])
        errors = [[float((a.double() - t).norm() / t.norm()) for a, t in zip(second(norm, low.clone(), wide), truth,
                                                                             strict=True)] for norm in (ours, native)]
        assert all(e <= max(1.5 * n, 0.01) for e, n in zip(*errors, strict=True)), errors  # bf16: 2^-8
    seen = []
    encoder = ConvEncoder(in_channels=1)
    for norm in (m for m in encoder.modules() if isinstance(m, EpisodicBatchNorm2d)):
        norm.register_forward_hook(lambda m, i, out: seen.append(out.grad_fn.name()))
    encoder(torch.rand(5, 28, 28, dtype=torch.float64))
    assert seen == ["BatchStatisticsNormBackward"] * 4


def test_max_pool_2x2_is_max_pool_to_the_second_derivative_without_a_zero_gradient():
    """:class:`MaxPool2x2` gives max-pooling's values, gradients and second derivatives, odd sizes and both
    layouts included; its double backward leaves the pooled input's values out (the native one adds a zero
    tensor for them), and the Conv-4 pools through it."""
    from mtl.models.encoders.conv import MaxPool2x2

    g = torch.Generator().manual_seed(0)
    for shape in ((3, 4, 6, 6), (2, 3, 7, 5)):
        for x in (torch.randn(*shape, generator=g, dtype=torch.float64),
                  torch.randn(*shape, generator=g, dtype=torch.float64).contiguous(memory_format=torch.channels_last)):
            x.requires_grad_()
            assert torch.autograd.gradgradcheck(MaxPool2x2.apply, (x,))
            torch.testing.assert_close(MaxPool2x2.apply(x), F.max_pool2d(x, 2), atol=0, rtol=0)
            gy = torch.randn(MaxPool2x2.apply(x).shape, dtype=torch.float64, requires_grad=True)
            (gx,) = torch.autograd.grad(MaxPool2x2.apply(x), x, gy, create_graph=True)
            assert torch.autograd.grad(gx.pow(2).sum(), x, allow_unused=True)[0] is None
    encoder, seen = ConvEncoder(in_channels=1), []
    out = encoder(torch.rand(5, 28, 28, dtype=torch.float64))
    stack = [out.grad_fn]
    while stack:
        node = stack.pop()
        seen.append(node.name())
        stack += [n for n, _ in node.next_functions if n is not None]
    assert seen.count("MaxPool2x2Backward") == 4

