"""lib/ops/position.py: the PT layer's position encoding delta = theta(p_i - p_j) through the C
kernel gives the modules' values, gradients and running statistics, and steps aside wherever
it cannot compute what the modules would."""
import copy

import pytest
import torch
import torch.nn as nn

from kernel_checks import assert_matches
from lib import ops
from lib.ops import native
from models.point_transformer import PointTransformerLayer


def theta_of(channels, dtype=torch.float32, momentum=0.1):
    """A PT layer's theta with BatchNorm parameters and statistics away from their defaults."""
    torch.manual_seed(0)
    theta = PointTransformerLayer(channels).delta.to(dtype)
    bn = theta[1].bn
    bn.momentum = momentum
    with torch.no_grad():
        bn.weight.uniform_(-1.0, 2.0)  # some negative scales: ReLU then keeps the low side
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    return theta


def geometry(b, n, k, dtype=torch.float32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    xyz = torch.randn(b, n, 3, generator=gen, dtype=dtype) * 2 + 3  # offset: tests the centring
    return xyz, torch.randint(0, n, (b, n, k), generator=gen)


def plain(theta, xyz, idx):
    return theta(xyz.unsqueeze(2) - ops.gather(xyz, idx))


def modules_on_differences(theta, xyz, idx):
    """What position_encoding runs where its kernel does not apply."""
    return ops.mlp(theta, xyz.unsqueeze(2) - ops.gather(xyz, idx))


def steps(encode, theta, xyz, idx, grad):
    """Outputs and parameter gradients of two training calls and one in eval mode, then the
    running statistics."""
    results = []
    for training in (True, True, False):
        theta.train(training)
        out = encode(theta, xyz, idx)
        results += [out, *torch.autograd.grad(out, list(theta.parameters()), grad)]
    bn = theta[1].bn
    return results + [bn.running_mean, bn.running_var, bn.num_batches_tracked]


@pytest.mark.usefixtures("needs_compiler")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("b, n, k, channels, momentum", [
    (3, 50, 8, 32, 0.1),     # a preset width (compiled for C = 32 in float32)
    (2, 40, 16, 24, None),   # any C: the generic body; cumulative running averages
    (2, 700, 4, 16, 0.1),    # 5,600 rows: several chunks of the kernel's sums
    (1, 9, 9, 512, 0.1),
])
def test_position_encoding_matches_the_modules(dtype, b, n, k, channels, momentum):
    theta = theta_of(channels, dtype, momentum)
    xyz, idx = geometry(b, n, k, dtype)
    grad = torch.randn(b, n, k, channels, dtype=dtype, generator=torch.Generator().manual_seed(2))
    fast = steps(ops.position_encoding, copy.deepcopy(theta), xyz, idx, grad)
    reference = steps(plain, copy.deepcopy(theta), xyz, idx, grad)
    assert fast[0].grad_fn.name() == "_PositionEncodingBackward"
    assert_matches(fast, reference, rtol=1e-11 if dtype == torch.float64 else 2e-5)


@pytest.mark.usefixtures("needs_compiler")
def test_position_encoding_does_not_depend_on_the_thread_count():
    """Rows split by fixed chunks, each chunk's sums added in order: one thread and three give
    the same bits."""
    theta = theta_of(32)
    xyz, idx = geometry(4, 300, 8)
    grad = torch.randn(4, 300, 8, 32, generator=torch.Generator().manual_seed(2))
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 3):
            torch.set_num_threads(count)
            results.append(steps(ops.position_encoding, copy.deepcopy(theta), xyz, idx, grad))
    finally:
        torch.set_num_threads(threads)
    for one, three in zip(*results):
        assert torch.equal(one, three)


def _hooked(theta):
    seen = []
    theta[3].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))
    return theta, seen


class _ScaledLinear(nn.Linear):
    """A Linear of another kind (as a quantized one is): the kernel cannot know its forward."""

    def forward(self, x):
        return super().forward(x) * 2


@pytest.mark.parametrize("case", ["xyz wants a gradient", "hooked", "another Linear",
                                  "float16 autocast", "reference backend"])
def test_position_encoding_steps_aside_to_the_modules(case):
    """Where the kernel would not compute what the modules do, the modules run on the gathered
    differences (through ops.mlp): the same bits."""
    theta = theta_of(16)
    xyz, idx = geometry(2, 30, 4)
    seen = None
    if case == "xyz wants a gradient":
        xyz.requires_grad_()
    if case == "hooked":
        theta, seen = _hooked(theta)
    if case == "another Linear":
        scaled = _ScaledLinear(3, 16)
        scaled.load_state_dict(theta[3].state_dict())
        theta[3] = scaled
    if case == "reference backend":
        ops.set_backend("reference")
    autocast = torch.autocast("cpu", dtype=torch.float16, enabled=case == "float16 autocast")
    outputs = []
    for encode in (ops.position_encoding, modules_on_differences):
        replica = copy.deepcopy(theta)
        with autocast:
            out = encode(replica, xyz, idx)
        inputs = list(replica.parameters()) + ([xyz] if xyz.requires_grad else [])
        outputs.append([out, *torch.autograd.grad(out.float().sum(), inputs)])
    assert "PositionEncoding" not in outputs[0][0].grad_fn.name()
    for fast, reference in zip(*outputs):
        assert torch.equal(fast, reference)
    if case == "hooked":
        assert seen == [(2, 30, 4, 3)] * 2


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("bad", [30, -1, 59])  # 59: inside the batch's rows, not the cloud's
def test_a_corrupt_neighbour_index_is_a_one_line_error(backend, bad):
    ops.set_backend(backend)
    xyz, idx = geometry(2, 30, 4)
    idx[1, 3, 2] = bad
    with pytest.raises(ValueError, match="neighbour index out of range") as err:
        ops.position_encoding(theta_of(16), xyz, idx)
    assert "\n" not in str(err.value)


@pytest.mark.usefixtures("needs_compiler")
def test_the_kernels_refuse_bad_shapes_before_touching_memory():
    """Null pointers everywhere: a kernel that read or wrote anything would crash the test."""
    lib = native.library()
    nulls = dict(xyz=None, idx=None, w1=None, b1=None)
    forward = dict(nulls, scale=None, shift=None, w2t=None, b2=None, out=None)
    assert lib.call("pe_forward", dtype=0, B=1, N=4, K=2, C=0, **forward) == -3
    assert lib.call("pe_forward", dtype=0, B=1, N=4, K=2, C=5000, **forward) == -3
    assert lib.call("pe_forward", dtype=3, B=1, N=4, K=2, C=16, **forward) == -4  # no such dtype
    assert lib.call("pe_stats", dtype=0, B=1, N=0, K=2, sums=None, **nulls) == -3


@pytest.mark.usefixtures("needs_compiler")
@pytest.mark.parametrize("channels", [32, 24])
def test_bf16_rows_are_the_float32_kernels_rounded_once(channels):
    """Under CPU bf16 autocast (`--amp`) the kernel writes delta as bf16 rows computed in
    float32: the float32 kernel's output rounded once, and from a bf16 gradient the float32
    kernel's parameter gradients and running statistics, bit for bit."""
    theta = theta_of(channels)
    xyz, idx = geometry(2, 100, 8)
    grad = torch.randn(2, 100, 8, channels, generator=torch.Generator().manual_seed(2))
    grad = grad.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rows = steps(ops.position_encoding, copy.deepcopy(theta), xyz, idx, grad)
    reference = steps(ops.position_encoding, copy.deepcopy(theta), xyz, idx, grad.float())
    assert rows[0].dtype == torch.bfloat16 and rows[0].grad_fn.name() == "_PositionEncodingBackward"
    for i, (got, expected) in enumerate(zip(rows, reference)):
        assert torch.equal(got, expected.to(got.dtype)), i
