"""lib/ops/attention_softmax.py: the PT layer's attention weights softmax_k(gamma(relation))
through the C kernel give the modules' values, gradients and running statistics, and the
modules run wherever the kernel cannot compute what they would."""
import copy

import pytest
import torch
import torch.nn as nn

from kernel_checks import assert_matches
from lib import ops
from lib.ops import attention_softmax, native
from models.point_transformer import PointTransformerLayer


def gamma_of(channels, share_planes=8, dtype=torch.float32, momentum=0.1):
    """A PT layer's gamma, its second BatchNorm's parameters and statistics away from their
    defaults."""
    torch.manual_seed(0)
    gamma = PointTransformerLayer(channels, share_planes).gamma.to(dtype)
    bn = gamma[1].bn
    bn.momentum = momentum
    with torch.no_grad():
        bn.weight.uniform_(-1.0, 2.0)  # some negative scales
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    return gamma


def plain(gamma, relation):
    return gamma(relation).softmax(dim=2)


def steps(weights, gamma, relation, grad):
    """Weights and the gradients of the relation and every parameter, for two training calls
    and one in eval mode, then the second BatchNorm's running statistics."""
    results = []
    for training in (True, True, False):
        gamma.train(training)
        out = weights(gamma, relation)
        results += [out, *torch.autograd.grad(out, [relation, *gamma.parameters()], grad)]
    bn = gamma[1].bn
    return results + [bn.running_mean, bn.running_var, bn.num_batches_tracked]


@pytest.mark.usefixtures("needs_compiler")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("b, n, k, channels, share, momentum", [
    (3, 50, 8, 32, 8, 0.1),     # W = 4, k = 8: a compiled (k, W)
    (2, 40, 16, 64, 8, None),   # W = 8, k = 16; cumulative running averages
    (2, 30, 5, 24, 8, 0.1),     # W = 3, k = 5: the generic body
    (1, 37, 16, 16, 8, 0.1),    # 37 points: chunks of the sums, the last one short
])
def test_attention_weights_match_the_modules(dtype, b, n, k, channels, share, momentum):
    gamma = gamma_of(channels, share, dtype, momentum)
    gen = torch.Generator().manual_seed(1)
    relation = torch.randn(b, n, k, channels, generator=gen, dtype=dtype).requires_grad_()
    grad = torch.randn(b, n, k, channels // share, generator=gen, dtype=dtype)
    fast = steps(ops.attention_weights, copy.deepcopy(gamma), relation, grad)
    reference = steps(plain, copy.deepcopy(gamma), relation, grad)
    assert fast[0].grad_fn.name() == "_AttentionWeightsBackward"
    assert_matches(fast, reference, rtol=1e-11 if dtype == torch.float64 else 2e-5)


@pytest.mark.usefixtures("needs_compiler")
def test_attention_weights_do_not_depend_on_the_thread_count():
    gamma = gamma_of(32)
    gen = torch.Generator().manual_seed(1)
    relation = torch.randn(4, 300, 8, 32, generator=gen).requires_grad_()
    grad = torch.randn(4, 300, 8, 4, generator=gen)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 3):
            torch.set_num_threads(count)
            results.append(steps(ops.attention_weights, copy.deepcopy(gamma), relation, grad))
    finally:
        torch.set_num_threads(threads)
    for one, three in zip(*results):
        assert torch.equal(one, three)


@pytest.mark.usefixtures("needs_compiler")
def test_extreme_logits_give_the_softmax_of_torch():
    """Logits far apart (the largest dominates; the others' weights underflow) and equal."""
    gamma = gamma_of(32).eval()
    relation = torch.randn(2, 20, 8, 32, dtype=torch.float32)
    with torch.no_grad():
        gamma[3].weight.mul_(300.0)
    out = ops.attention_weights(gamma, relation)
    assert out.grad_fn is None or "Softmax" not in out.grad_fn.name()
    reference = plain(gamma, relation)
    assert torch.allclose(out, reference, rtol=1e-5, atol=1e-6)
    assert torch.allclose(out.sum(2), torch.ones(2, 20, 4))
    with torch.no_grad():
        gamma[3].weight.zero_()
    assert torch.allclose(ops.attention_weights(gamma, relation), torch.full((2, 20, 8, 4), 1 / 8))


class _ScaledLinear(nn.Linear):
    """A Linear of another kind (as a quantized one is): the kernel cannot know its forward."""

    def forward(self, x):
        return super().forward(x) * 2


@pytest.mark.parametrize("case", ["hooked tail", "hooked gamma", "another Linear",
                                  "16 weights", "k W above the bound", "float16 autocast",
                                  "reference backend"])
def test_attention_weights_step_aside_to_the_modules(case):
    """Where the kernel would not compute what the modules do, would be slower (16 weights),
    or cannot keep a point's rows on its stack (k W above MAX_POINT_VALUES), gamma's modules
    run and torch's softmax after them: the same bits."""
    gamma = gamma_of(128 if case == "16 weights" else 32)
    seen = []
    if case == "hooked tail":
        gamma[3].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))
    if case == "hooked gamma":
        gamma.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    if case == "another Linear":
        scaled = _ScaledLinear(4, 4)
        scaled.load_state_dict(gamma[3].state_dict())
        gamma[3] = scaled
    if case == "reference backend":
        ops.set_backend("reference")
    k = attention_softmax.MAX_POINT_VALUES // 4 + 1 if case == "k W above the bound" else 8
    relation = torch.randn(2, 30, k, gamma[0].linear.in_features, requires_grad=True)
    autocast = torch.autocast("cpu", dtype=torch.float16, enabled=case == "float16 autocast")
    outputs = []
    for weights in (ops.attention_weights, plain):
        replica = copy.deepcopy(gamma)
        with autocast:
            out = weights(replica, relation)
        outputs.append([out, *torch.autograd.grad(out.float().sum(), [relation,
                                                                     *replica.parameters()])])
    assert outputs[0][0].grad_fn.name() == "SoftmaxBackward0"
    for fast, reference in zip(*outputs):
        assert torch.equal(fast, reference)
    if case.startswith("hooked"):
        assert len(seen) == 2


@pytest.mark.usefixtures("needs_compiler")
def test_the_kernels_refuse_bad_shapes_before_touching_memory():
    """Null pointers everywhere: a kernel that read or wrote anything would crash the test."""
    lib = native.library()
    rows = dict(h=None, scale=None, shift=None, weight=None, bias=None, out=None)
    assert lib.call("aw_forward", dtype=0, P=4, K=8, W=0, **rows) == -3
    assert lib.call("aw_forward", dtype=0, P=4, K=64, W=128, **rows) == -3  # k W > 4,096
    assert lib.call("aw_forward", dtype=3, P=4, K=8, W=4, **rows) == -4  # no such dtype


@pytest.mark.usefixtures("needs_compiler")
@pytest.mark.parametrize("k, channels", [(8, 32), (16, 64), (5, 24)])
def test_bf16_rows(k, channels):
    """Under CPU bf16 autocast (`--amp`) the kernel reads gamma's bf16 rows and writes bf16
    weights computed in float32: the float32 kernel's weights rounded once. Its gradients come
    from the saved bf16 weights, as the modules' do; against a float64 computation on the same
    bf16 inputs they are as close as the modules' bf16 chain is (within 1.5x, in measurement
    at most 1.3x, mostly below)."""
    gamma = gamma_of(channels)
    gen = torch.Generator().manual_seed(1)
    relation = torch.randn(2, 60, k, channels, generator=gen).bfloat16()
    grad = torch.randn(2, 60, k, channels // 8, generator=gen).bfloat16()

    def run(weights, dtype, autocast):
        replica = copy.deepcopy(gamma).to(dtype if dtype == torch.float64 else torch.float32)
        rows = relation.to(dtype).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = weights(replica, rows)
        inputs = [rows, *replica.parameters()]
        return [out, *torch.autograd.grad(out, inputs, grad.to(out.dtype))]
    kernel = run(ops.attention_weights, torch.bfloat16, True)
    modules = run(plain, torch.bfloat16, True)
    exact = run(plain, torch.float64, False)
    assert kernel[0].dtype == torch.bfloat16
    assert kernel[0].grad_fn.name() == "_AttentionWeightsBackward"
    # the forward: the float32 kernel on the same bf16 rows of gamma's first module, rounded
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = copy.deepcopy(gamma)[0](relation)
    tail = nn.Sequential(nn.Identity(), *list(copy.deepcopy(gamma))[1:])
    expected = ops.attention_weights(tail, hidden.float())
    assert torch.equal(kernel[0], expected.bfloat16())
    for i, (got, chain, truth) in enumerate(zip(kernel, modules, exact)):
        if i == 5:  # gamma's first bias: BatchNorm follows it, its gradient is zero but rounding
            continue
        scale = truth.abs().max().clamp_min(1e-3)
        error = (got.double() - truth).abs().max() / scale
        chain_error = (chain.double() - truth).abs().max() / scale
        assert error <= 1.5 * chain_error + 1e-3, (i, float(error), float(chain_error))
