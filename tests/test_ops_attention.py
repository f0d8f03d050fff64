"""lib/ops/attention.py and lib/ops/edge.py's TransitionDown forms: the Point Transformer layer's
inference kernel and the grouped LBR + max-pool give the eager forms' values, step aside where
they do not apply, and reject bad input with one line."""
import copy

import pytest
import torch
import torch.nn as nn

from lib import ops
from lib.ops import native
from lib.quant import quantize_model
from models import build_model
from models.point_transformer import PointTransformerLayer, TransitionDown



@pytest.fixture
def kernels():
    """Skips a test about the C kernels themselves where there is no C compiler (checked when
    the test runs: collecting the tests compiles nothing)."""
    if native.library() is None:
        pytest.skip("no C compiler for lib/ops/csrc/")
    return native.library()


needs_kernels = pytest.mark.usefixtures("kernels")


def trained_statistics(module, *inputs, steps=2):
    """Non-trivial BatchNorm statistics and affine parameters (scales >= 0, as trained ones
    mostly are), then eval mode."""
    module.train()
    with torch.no_grad():
        for _ in range(steps):
            module(*inputs)
        for m in module.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.weight.uniform_(0.2, 1.5)
                m.bias.normal_()
    return module.eval()


def layer_problem(channels, k, n=40, b=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    xyz = torch.rand(b, n, 3, generator=g, dtype=dtype)
    x = torch.randn(b, n, channels, generator=g, dtype=dtype)
    idx = torch.randint(n, (b, n, k), generator=g)
    return xyz, x, idx


def eager(module, *inputs):
    """The module's output on the reference backend: the plain PyTorch forms, no kernel."""
    ops.set_backend("reference")
    try:
        with torch.no_grad():
            return module(*inputs)
    finally:
        ops.set_backend("auto")


def kernel_runs(layer, xyz, x, idx):
    return ops.attention_inference(xyz, idx, layer.phi(x), layer.psi(x), layer.alpha(x),
                                   layer.delta, layer.gamma, layer.share_planes) is not None


@needs_kernels
@pytest.mark.parametrize("channels,share_planes,k", [(16, 8, 8), (32, 8, 16), (24, 8, 5),
                                                     (12, 4, 1), (64, 8, 3)])
def test_layer_inference_matches_the_eager_layer_in_float64(channels, share_planes, k):
    torch.manual_seed(channels + k)
    xyz, x, idx = layer_problem(channels, k)
    layer = trained_statistics(PointTransformerLayer(channels, share_planes).double(), xyz, x,
                               idx)
    with torch.no_grad():
        assert kernel_runs(layer, xyz, x, idx)
        got = layer(xyz, x, idx)
    torch.testing.assert_close(got, eager(layer, xyz, x, idx), rtol=1e-12, atol=1e-12)


@needs_kernels
def test_layer_inference_in_float32_is_within_rounding_and_thread_count_free():
    torch.manual_seed(0)
    xyz, x, idx = layer_problem(32, 16, n=300, dtype=torch.float32)
    layer = trained_statistics(PointTransformerLayer(32), xyz, x, idx)
    threads = torch.get_num_threads()
    with torch.no_grad():
        got = layer(xyz, x, idx)
        torch.set_num_threads(1)
        try:
            one_thread = layer(xyz, x, idx)
        finally:
            torch.set_num_threads(threads)
    assert torch.equal(got, one_thread)
    torch.testing.assert_close(got, eager(layer, xyz, x, idx), rtol=1e-5, atol=1e-5)


@needs_kernels
def test_layer_inference_softmax_holds_at_extreme_logits():
    """Logits hundreds apart (the kernel's own float32 exp clamps its argument at -87): the
    weights still match torch's softmax, to float32 rounding."""
    torch.manual_seed(1)
    xyz, x, idx = layer_problem(16, 8, n=100, dtype=torch.float32)
    layer = trained_statistics(PointTransformerLayer(16), xyz, x, idx)
    with torch.no_grad():
        layer.gamma[3].weight.mul_(300.0)
        got = layer(xyz, x, idx)
    expected = eager(layer, xyz, x, idx)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@needs_kernels
def test_layer_inference_under_bf16_autocast_reads_and_writes_bf16_rows():
    """q, k, v and the output in bf16 as autocast has them, float32 inside: within bf16
    rounding of the float32 layer, and no further from it than the eager bf16 layer (which
    rounds every intermediate) plus one bf16 step."""
    torch.manual_seed(0)
    xyz, x, idx = layer_problem(32, 16, n=200, dtype=torch.float32)
    layer = trained_statistics(PointTransformerLayer(32), xyz, x, idx)
    with torch.no_grad():
        exact = layer(xyz, x, idx)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            q, k, v = layer.phi(x), layer.psi(x), layer.alpha(x)
            assert ops.attention_inference(xyz, idx, q, k, v, layer.delta, layer.gamma,
                                           8) is not None
            assert ops.attention_inference(xyz.bfloat16(), idx, q, k, v, layer.delta,
                                           layer.gamma, 8) is None  # not autocast's mix
            got = layer(xyz, x, idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager_bf16 = eager(layer, xyz, x, idx)
    assert got.dtype == eager_bf16.dtype == torch.bfloat16
    step = exact.abs().max().item() * 2 ** -8  # one bf16 rounding step at the largest value
    assert (got.float() - exact).abs().max() <= (eager_bf16.float() - exact).abs().max() + step
    torch.testing.assert_close(got.float(), exact, rtol=2e-2, atol=2e-2)


@needs_kernels
def test_the_kernel_steps_aside_for_training_gradients_hooks_and_the_reference_backend():
    torch.manual_seed(0)
    xyz, x, idx = layer_problem(16, 4)
    layer = trained_statistics(PointTransformerLayer(16).double(), xyz, x, idx)
    with torch.no_grad():
        assert kernel_runs(layer, xyz, x, idx)
        layer.gamma[1].train()  # one BatchNorm using batch statistics
        assert not kernel_runs(layer, xyz, x, idx)
        layer.gamma[1].eval()
        handle = layer.gamma[3].register_forward_hook(lambda *_: None)
        assert not kernel_runs(layer, xyz, x, idx)
        handle.remove()
        ops.set_backend("reference")
        assert not kernel_runs(layer, xyz, x, idx)
        ops.set_backend("auto")
    assert not kernel_runs(layer, xyz, x, idx)  # parameters want gradients
    # and the eager layer then gives gradients as before
    out = layer(xyz, x.requires_grad_(), idx)
    out.sum().backward()
    assert x.grad is not None and layer.gamma[3].weight.grad is not None


@needs_kernels
def test_a_corrupt_neighbour_index_is_one_line_error():
    xyz, x, idx = layer_problem(16, 4)
    layer = trained_statistics(PointTransformerLayer(16).double(), xyz, x, idx)
    idx[1, 3, 2] = x.shape[1]
    with torch.no_grad(), pytest.raises(ValueError, match="out of range") as err:
        layer(xyz, x, idx)
    assert "\n" not in str(err.value)


def test_the_kernel_refuses_shapes_it_cannot_hold(kernels):
    """C not divisible by W, no neighbours, too many rows for the stack, too many channels: a
    status, no memory touched."""
    lib = kernels
    dummy = torch.zeros(1)
    tensors = dict(xyz=dummy, idx=torch.zeros(1, dtype=torch.int64), key=dummy, q=dummy,
                   v=dummy, out=dummy, **{name: dummy for name in (
                       "T1", "tb1", "ts", "tt", "T2t", "tb2", "gs", "gt", "G1", "G1t", "gb1",
                       "hs", "ht", "G2", "G2t", "gb2")})
    for b, n, k, c, w in [(1, 1, 1, 10, 3), (1, 1, 0, 8, 1), (1, 1, 1 << 12, 8, 2),
                          (1, 1, 1, 8192, 1)]:
        status = lib.call("pt_attention_inference", dtype=0, B=b, N=n, K=k, C=c, W=w, **tensors)
        assert status == -3, (k, c, w)


@pytest.mark.parametrize("name", ["pt_seg_tiny", "pt_seg"])
def test_whole_networks_evaluate_as_on_the_reference_backend(name):
    torch.manual_seed(0)
    model = build_model(name, in_channels=6, num_classes=10, num_categories=3).double()
    xyz = torch.rand(2, 256, 3, dtype=torch.float64)
    features = torch.randn(2, 256, 6, dtype=torch.float64)
    category = torch.tensor([0, 2])
    trained_statistics(model, xyz, features, category)
    with torch.no_grad():
        got = model(xyz, features, category)
    torch.testing.assert_close(got, eager(model, xyz, features, category), rtol=1e-10,
                               atol=1e-10)


@needs_kernels
def test_the_kernels_kept_weights_follow_every_change_between_evaluations():
    """The folded BatchNorms and transposed weights are kept per layer between forward passes
    (lib/ops/attention.py): a training step, a changed statistic, a loaded state_dict, a
    re-quantized Linear, another dtype or eps must each reach the next evaluation."""
    torch.manual_seed(3)
    xyz, x, idx = layer_problem(16, 8)
    layer = trained_statistics(PointTransformerLayer(16).double(), xyz, x, idx)

    def evaluates_as_eager():
        with torch.no_grad():
            assert kernel_runs(layer, xyz, x, idx)
            got = layer(xyz, x, idx)
        torch.testing.assert_close(got, eager(layer, xyz, x, idx), rtol=1e-12, atol=1e-12)
        return got

    first = evaluates_as_eager()
    layer.train()  # a training step moves the statistics and the weights
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(xyz, x, idx).square().mean().backward()
    optimizer.step()
    layer.eval()
    assert not torch.equal(evaluates_as_eager(), first)
    with torch.no_grad():
        layer.gamma[1].bn.running_var.mul_(2.0)
    evaluates_as_eager()
    other = PointTransformerLayer(16).double()
    layer.load_state_dict(trained_statistics(other, xyz, x, idx).state_dict())
    evaluates_as_eager()
    layer.gamma[0].norm.bn.eps = 0.5
    evaluates_as_eager()
    quantize_model(layer, {"gamma.3": 2, "delta.3": 3})
    evaluates_as_eager()
    with torch.no_grad():
        layer.gamma[3].codebook.mul_(-1.0)
    evaluates_as_eager()
    layer.float()
    xyz, x = xyz.float(), x.float()
    with torch.no_grad():
        assert kernel_runs(layer, xyz, x, idx)
        torch.testing.assert_close(layer(xyz, x, idx), eager(layer, xyz, x, idx), rtol=1e-5,
                                   atol=1e-5)


def test_a_quantized_network_evaluates_as_on_the_reference_backend():
    """Weight-shared Linears (codebook lookups) are read by the kernels as dense weights."""
    torch.manual_seed(0)
    model = build_model("pt_seg_tiny", in_channels=6, num_classes=10, num_categories=3).double()
    xyz = torch.rand(2, 128, 3, dtype=torch.float64)
    features = torch.randn(2, 128, 6, dtype=torch.float64)
    category = torch.tensor([1, 2])
    trained_statistics(model, xyz, features, category)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    quantized = quantize_model(copy.deepcopy(model), {n: 3 for n in names}).eval()
    with torch.no_grad():
        got = quantized(xyz, features, category)
    torch.testing.assert_close(got, eager(quantized, xyz, features, category), rtol=1e-10,
                               atol=1e-10)


def transition_problem(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    xyz = torch.rand(2, 64, 3, generator=g, dtype=dtype)
    x = torch.randn(2, 64, 8, generator=g, dtype=dtype)
    return xyz, x


def outputs_and_grads(module, xyz, x):
    x = x.clone().requires_grad_()
    module.zero_grad()
    _, y = module(xyz, x)
    y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y))
    return [y.detach(), x.grad] + [p.grad for p in module.parameters()]


@pytest.mark.parametrize("bias", [False, True])
def test_group_linear_is_the_linear_on_the_grouped_input(bias):
    """Values and gradients, the bias counted once (TransitionDown's Linear has none; other
    users' may)."""
    torch.manual_seed(0)
    xyz, x = transition_problem()
    new_xyz, idx = xyz[:, :10], torch.randint(64, (2, 10, 5))
    linear = nn.Linear(3 + 8, 6, bias=bias).double()
    expected, got = [], []
    for form, out in ((lambda: linear(ops.group(xyz, x_, new_xyz, idx)), expected),
                      (lambda: ops.group_linear(linear, xyz, x_, new_xyz, idx), got)):
        x_ = x.clone().requires_grad_()
        linear.zero_grad()
        y = form()
        y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y))
        out += [y.detach(), x_.grad] + [p.grad for p in linear.parameters()]
    for value, wanted in zip(got, expected):
        torch.testing.assert_close(value, wanted, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("negative_scale", [False, True])
def test_transition_down_trains_and_evaluates_as_the_eager_composition(negative_scale):
    torch.manual_seed(0)
    xyz, x = transition_problem()
    module = trained_statistics(TransitionDown(8, 16, stride=4, k=6).double(), xyz, x)
    if negative_scale:  # the max no longer commutes with BatchNorm: the plain forms serve
        module.mlp[1].bn.weight.data[3] = -0.5
    for mode in ("eval", "train"):
        getattr(module, mode)()
        reference = copy.deepcopy(module)
        ops.set_backend("reference")
        expected = outputs_and_grads(reference, xyz, x)
        ops.set_backend("auto")
        got = outputs_and_grads(module, xyz, x)
        for value, wanted in zip(got, expected):
            torch.testing.assert_close(value, wanted, rtol=1e-10, atol=1e-10)
        with torch.no_grad():
            torch.testing.assert_close(module(xyz, x)[1], eager(module, xyz, x)[1], rtol=1e-10,
                                       atol=1e-10)


@needs_kernels
def test_transition_down_inference_never_groups_and_keeps_nan():
    """No (B, M, k, C) tensor in inference: the gather of the grouped rows is never called;
    and a NaN feature reaches the output as the eager max-pool lets it."""
    torch.manual_seed(0)
    xyz, x = transition_problem()
    module = trained_statistics(TransitionDown(8, 16, stride=4, k=6).double(), xyz, x)
    x[0, :, 2] = float("nan")
    expected = eager(module, xyz, x)[1]
    with torch.no_grad():
        original = ops.edge.gather
        ops.edge.gather = None  # group_linear's gather: must not run
        try:
            got = module(xyz, x)[1]
        finally:
            ops.edge.gather = original
    assert torch.isnan(got[0]).all() and not torch.isnan(got[1]).any()
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10, equal_nan=True)


@needs_kernels
def test_transition_down_inference_rejects_a_corrupt_index_in_one_line():
    torch.manual_seed(0)
    xyz, x = transition_problem()
    module = trained_statistics(TransitionDown(8, 16, stride=4, k=6).double(), xyz, x)
    linear, norm, _ = module.mlp
    idx = torch.randint(64, (2, 16, 6))
    idx[1, 4, 0] = -1
    with torch.no_grad(), pytest.raises(ValueError, match="out of range") as err:
        ops.group_norm_relu_max(linear, norm.bn, xyz, x, xyz[:, :16], idx)
    assert "\n" not in str(err.value)
