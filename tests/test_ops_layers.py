"""lib/ops/layers.py, lib/ops/fused.py (and lib/ops/geometry.py's sparse gather backward): the
same values and gradients as the plain PyTorch compositions the reference path runs."""
import copy

import pytest
import torch
import torch.nn as nn

from lib import ops
from lib.ops import layers as fast_layers
from lib.ops import native
from models import build_model


def close(a, b, rtol=1e-4, atol=1e-5):
    return torch.allclose(a, b, rtol=rtol, atol=atol)


def bn_pair(channels, momentum=0.1):
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(channels, momentum=momentum)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.normal_()
    return bn, copy.deepcopy(bn)


@pytest.mark.parametrize("rows, channels", [(4096, 3), (4096 + 6, 2), (2048, 8), (33, 5)])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_batch_norm_rows_matches_batchnorm1d_in_training(rows, channels, momentum):
    fast, plain = bn_pair(channels, momentum)
    x = (torch.randn(rows, channels) * 3 + 5).requires_grad_()  # offset: tests the centring
    grad = torch.randn(rows, channels)
    for _ in range(2):  # the second call sees updated running statistics and batch count
        x.grad = None
        y = fast_layers.batch_norm_rows(x, fast)
        y.backward(grad)
        fast_grad = x.grad.clone()
        x.grad = None
        y_plain = plain(x)
        y_plain.backward(grad)
        assert close(y, y_plain)
        assert close(fast_grad, x.grad)
    # sums over thousands of rows: float32 rounding differs in the last digits
    assert close(fast.weight.grad, plain.weight.grad, atol=1e-3)
    assert close(fast.bias.grad, plain.bias.grad, atol=1e-3)
    assert close(fast.running_mean, plain.running_mean)
    assert close(fast.running_var, plain.running_var)
    assert fast.num_batches_tracked.item() == plain.num_batches_tracked.item() == 2


def test_batch_norm_rows_in_eval_mode_and_inplace_relu_after_it():
    fast, plain = bn_pair(3)
    fast.running_mean.fill_(0.5)
    plain.running_mean.fill_(0.5)
    fast.eval(), plain.eval()
    x = torch.randn(8192, 3, requires_grad=True)
    y = fast_layers.batch_norm_rows(x, fast)
    assert close(y, plain(x))
    torch.relu_(fast_layers.batch_norm_rows(x, fast.train())).sum().backward()  # no view error


def test_batch_norm_rows_leaves_unusual_set_ups_to_pytorch():
    bn = nn.BatchNorm1d(3, track_running_stats=False)
    x = torch.randn(64, 3)
    assert close(fast_layers.batch_norm_rows(x, bn), bn(x))
    with pytest.raises(ValueError, match="more than 1 value"):
        fast_layers.batch_norm_rows(torch.randn(1, 3), nn.BatchNorm1d(3))


@pytest.mark.parametrize("channels", [3, 4])
def test_batch_norm_rows_widens_few_bf16_channels(channels):
    """bf16 rows with float32 parameters (CPU autocast), training: BatchNorm in float32 on the
    widened rows, rounded back; outputs, the input's and parameters' gradients and the running
    statistics as the mixed-dtype nn.BatchNorm1d gives them, up to bf16 rounding."""
    fast, plain = bn_pair(channels)
    x = (torch.randn(4096, channels) * 3 + 2).bfloat16()
    grad = torch.randn(4096, channels).bfloat16()
    results = []
    for bn, forward in ((fast, lambda x: fast_layers.batch_norm_rows(x, fast)), (plain, plain)):
        rows = x.clone().requires_grad_()
        y = forward(rows)
        y.backward(grad)
        results.append([y, rows.grad, bn.weight.grad, bn.bias.grad, bn.running_mean,
                        bn.running_var])
    assert results[0][0].grad_fn.name() == "ToCopyBackward0"  # the widened form ran
    assert results[0][0].dtype == results[0][1].dtype == torch.bfloat16
    for i, (widened, mixed) in enumerate(zip(*results)):
        step = mixed.float().abs().max() * 2 ** -7  # two bf16 roundings at the largest value
        assert (widened.float() - mixed.float()).abs().max() <= step, i


@pytest.mark.parametrize("width", [2, 4, 8])
def test_shared_weight_sum_matches_the_broadcast_form(width):
    share = 8
    value = torch.randn(2, 50, 6, share * width, requires_grad=True)
    weight = torch.randn(2, 50, 6, width, requires_grad=True)
    grad = torch.randn(2, 50, share * width)
    results = []
    for backend in ("auto", "reference"):
        ops.set_backend(backend)
        value.grad = weight.grad = None
        out = fast_layers.shared_weight_sum(value, weight, share)
        out.backward(grad)
        results.append((out, value.grad.clone(), weight.grad.clone()))
    for fast, reference in zip(*results):
        assert close(fast, reference)
    # channel g * width + c is weighted by weight[..., c]
    by_hand = (value[..., width + 1] * weight[..., 1]).sum(2)
    assert close(results[0][0][..., width + 1], by_hand)


def attention_inputs(b, n, k, channels, share, dtype, seed=0):
    """delta, key, query, value, weight (all requiring grad) and idx of a PT layer."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(b, n, k, channels), (b, n, channels), (b, n, channels), (b, n, channels),
              (b, n, k, channels // share)]
    tensors = [torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_()
               for shape in shapes]
    return tensors + [torch.randint(0, n, (b, n, k), generator=gen)]


def attention_outputs(share, delta, key, query, value, weight, idx):
    """relation and neighbour_sum, and the gradients of a fixed random loss on both."""
    relation = ops.relation(delta, key, query, idx)
    out = ops.neighbour_sum(weight, value, delta, idx, share)
    gen = torch.Generator().manual_seed(1)
    loss = ((relation * torch.randn(relation.shape, generator=gen, dtype=relation.dtype)).sum()
            + (out * torch.randn(out.shape, generator=gen, dtype=out.dtype)).sum())
    return [relation, out, *torch.autograd.grad(loss, (delta, key, query, value, weight))]


@pytest.mark.usefixtures("needs_compiler")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("b, n, k, channels, share", [
    (3, 50, 8, 16, 8),   # compiled for (16, 2) in float32
    (2, 40, 16, 32, 8),  # (32, 4)
    (2, 7, 7, 24, 8),    # any C: the generic body
    (1, 30, 5, 16, 4),   # C = 16 with W = 4: not the (16, 2) body
])
def test_fused_attention_matches_the_plain_forms(dtype, b, n, k, channels, share):
    """lib/ops/csrc/pt_layer.c's relation and aggregation: values and every input's gradient as the
    plain gather-add-multiply-sum forms compute them."""
    inputs = attention_inputs(b, n, k, channels, share, dtype)
    results = []
    for backend in ("auto", "reference"):
        ops.set_backend(backend)
        results.append(attention_outputs(share, *inputs))
    assert results[0][0].grad_fn.name() == "_RelationBackward"
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    for name, fast, reference in zip(["relation", "out", "delta", "key", "query", "value",
                                      "weight"], *results):
        assert torch.allclose(fast, reference, **tol), name


@pytest.mark.usefixtures("needs_compiler")
def test_fused_attention_does_not_depend_on_the_thread_count():
    """Work is split by point and by cloud and every sum runs in a fixed order: one thread and
    three give the same bits (training runs reproduce on any machine)."""
    inputs = attention_inputs(5, 64, 8, 32, 8, torch.float32)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 3):
            torch.set_num_threads(count)
            results.append(attention_outputs(8, *inputs))
    finally:
        torch.set_num_threads(threads)
    for one, three in zip(*results):
        assert torch.equal(one, three)


RELU_MAX_FORMS = {"neighbour_max after relu": lambda x: ops.neighbour_max(torch.relu(x)),
                  "relu_neighbour_max": lambda x: ops.relu_neighbour_max(x)}


@pytest.mark.usefixtures("needs_compiler")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("form", list(RELU_MAX_FORMS))
def test_neighbour_max_matches_amax_and_its_gradient_after_a_relu(dtype, form):
    """Values as amax; gradients as amax's through the ReLU before it, although the zeros the
    ReLU leaves tie (amax shares their gradient, the kernel gives it to the first), also with
    the ReLU taken after the max (relu_neighbour_max)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, 16, 24, generator=gen, dtype=dtype).requires_grad_()
    grad = torch.randn(3, 40, 24, generator=gen, dtype=dtype)
    x.data[0, 0, :, 0] = -1.0  # a channel whose every neighbour the ReLU zeroes
    results = []
    for backend in ("auto", "reference"):
        ops.set_backend(backend)
        out = RELU_MAX_FORMS[form](x)
        results.append((out, *torch.autograd.grad(out, x, grad)))
    kernel = results[0][0].grad_fn
    kernel = kernel.next_functions[0][0] if form == "relu_neighbour_max" else kernel
    assert kernel.name() == "_NeighbourMaxBackward"
    for fast, reference in zip(*results):
        assert torch.equal(fast, reference)
    assert results[0][0][0, 0, 0] == 0 and (results[0][1][0, 0, :, 0] == 0).all()
    with_nan = torch.zeros(1, 1, 4, 2, dtype=dtype)
    with_nan[0, 0, 1, 0] = float("nan")
    assert torch.isnan(ops.neighbour_max(with_nan)[0, 0, 0])


@pytest.mark.usefixtures("needs_compiler")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels, outputs, momentum",
                         [(16, 2, 0.1), (32, 4, None), (24, 5, 0.1), (128, 16, 0.1),
                          (256, 32, None)])
def test_norm_relu_linear_matches_the_modules(dtype, channels, outputs, momentum, monkeypatch):
    """The fused BatchNorm-ReLU-Linear: outputs, the gradients of x and of all four parameters,
    and the running statistics as the PyTorch modules give them, in training (two steps, so
    that the second sees updated statistics) and in eval mode. 256 channels (which lib.ops
    leaves to the modules, and so is let through here, as 128 in float64) take the kernels'
    forms for rows too wide for their blocks of rows: one row at a time, sums in double."""
    from lib.ops import fused
    from models.point_transformer import PointBatchNorm
    monkeypatch.setitem(fused._NORM_RELU_LINEAR_MAX_CHANNELS, dtype, 256)
    torch.manual_seed(0)
    norm, linear = PointBatchNorm(channels).to(dtype), nn.Linear(channels, outputs).to(dtype)
    norm.bn.momentum = momentum
    with torch.no_grad():
        norm.bn.weight.uniform_(0.5, 2.0)
        norm.bn.bias.normal_()
    x = (torch.randn(3, 50, 7, channels, dtype=dtype) * 2 + 1).requires_grad_()
    grad = torch.randn(3, 50, 7, outputs, dtype=dtype)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    results = []
    for backend in ("auto", "reference"):
        ops.set_backend(backend)
        modules = copy.deepcopy(nn.ModuleList([norm, linear]))
        params = [x, modules[0].bn.weight, modules[0].bn.bias, modules[1].weight,
                  modules[1].bias]
        steps = []
        for training in (True, True, False):
            modules.train(training)
            out = ops.norm_relu_linear(modules[0].bn, modules[1], x)
            steps += [out, *torch.autograd.grad(out, params, grad)]
        steps += [modules[0].bn.running_mean, modules[0].bn.running_var]
        results.append(steps)
        if backend == "auto":
            assert out.grad_fn.next_functions[0][0].name() == "_NormReluLinearBackward"
    for i, (fast, reference) in enumerate(zip(*results)):
        # at 256 channels the weight gradient's entries span 1e-1 to 60 and the modules' float32
        # GEMM errs by ~1e-4 on the small ones (the kernel's one-row forms sum in double), so
        # there the absolute error is taken against the tensor's scale; elsewhere as it is
        scale = 1.0 if channels < 256 else max(1.0, float(reference.detach().abs().max()))
        assert torch.allclose(fast, reference, rtol=tol["rtol"], atol=tol["atol"] * scale), i


@pytest.mark.usefixtures("needs_compiler")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lowest_scale, momentum", [(0.0, 0.1), (0.5, None), (-1.0, 0.1)])
def test_norm_relu_max_matches_batch_norm_relu_amax(dtype, lowest_scale, momentum):
    """relu(bn(x)).amax(2): outputs, the gradients of x and of the BatchNorm's parameters, and
    the running statistics, in training (two steps) and eval mode; the C form runs when every
    scale is >= 0, the plain chain otherwise."""
    fast_bn, _ = bn_pair(24, momentum)
    with torch.no_grad():
        fast_bn.weight.uniform_(lowest_scale, 2.0)
    x = (torch.randn(3, 20, 9, 24, dtype=dtype) * 2 + 1).requires_grad_()
    grad = torch.randn(3, 20, 24, dtype=dtype)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    results = []
    for backend in ("auto", "reference"):
        ops.set_backend(backend)
        bn = copy.deepcopy(fast_bn).to(dtype)
        steps = []
        for training in (True, True, False):
            bn.train(training)
            out = ops.norm_relu_max(bn, x)
            steps += [out, *torch.autograd.grad(out, [x, bn.weight, bn.bias], grad)]
            if backend == "auto":
                fused = out.grad_fn.name() == "_NormReluMaxBackward"
                assert fused == (lowest_scale >= 0)
        results.append(steps + [bn.running_mean, bn.running_var])
    assert (results[0][0] == 0).any() and (results[0][0] > 0).any()  # the ReLU cuts
    for i, (fast, reference) in enumerate(zip(*results)):
        assert torch.allclose(fast, reference, **tol), i


def _run_bf16_and_float32(compute):
    """compute(dtype) -> tensors, once with bfloat16 rows (under CPU bf16 autocast) and once in
    float32 on the same values; the bf16 run's tensors and the float32 run's."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rows = compute(torch.bfloat16)
    return rows, compute(torch.float32)


def _assert_rounded_once(bf16_results, float32_results):
    """Each bf16 result is the float32 kernel's rounded once to bf16 (the kernels compute bf16
    rows in float32, in the float32 kernels' order); float32 results (parameter gradients,
    running statistics) are the float32 kernel's, bit for bit."""
    for i, (rows, reference) in enumerate(zip(bf16_results, float32_results)):
        assert torch.equal(rows, reference.to(rows.dtype)), i


@pytest.mark.usefixtures("needs_compiler")
@pytest.mark.parametrize("b, n, k, channels, share", [
    (3, 50, 8, 16, 8),    # a preset's body: (16, 2)
    (2, 20, 16, 64, 8),   # (64, 8)
    (2, 7, 7, 24, 8),     # the generic body
    (1, 30, 5, 16, 4),
])
def test_bf16_relation_and_aggregation(b, n, k, channels, share):
    """csrc/pt_layer.c on bfloat16 rows (`--amp` on the CPU): values and every gradient. The
    key's and value's gradients, scatter-added over the neighbours, are summed in float32 and
    rounded once (PyTorch's bf16 index_add rounds after every addition)."""
    inputs = attention_inputs(b, n, k, channels, share, torch.float32)
    gen = torch.Generator().manual_seed(1)
    grad_relation = torch.randn(b, n, k, channels, generator=gen).bfloat16()
    grad_out = torch.randn(b, n, channels, generator=gen).bfloat16()

    def compute(dtype):
        delta, key, query, value, weight = [t.detach().bfloat16().to(dtype).requires_grad_()
                                            for t in inputs[:5]]
        relation = ops.relation(delta, key, query, inputs[5])
        out = ops.neighbour_sum(weight, value, delta, inputs[5], share)
        assert relation.grad_fn.name() == "_RelationBackward"
        assert out.grad_fn.name() == "_AggregateBackward"
        return [relation, *torch.autograd.grad(relation, (delta, key, query),
                                               grad_relation.to(dtype)),
                out, *torch.autograd.grad(out, (weight, value, delta), grad_out.to(dtype))]
    rows, reference = _run_bf16_and_float32(compute)
    assert all(t.dtype == torch.bfloat16 for t in rows)
    _assert_rounded_once(rows, reference)


@pytest.mark.usefixtures("needs_compiler")
@pytest.mark.parametrize("channels, outputs", [(16, 2), (32, 4), (24, 5)])
def test_bf16_norm_relu_linear(channels, outputs):
    """gamma's BatchNorm-ReLU-Linear on bfloat16 rows with float32 modules, as CPU autocast
    runs it: output and input gradient rounded once; the four parameters' gradients and the
    running statistics those of float32 rows, in training (two steps) and eval mode."""
    from models.point_transformer import PointBatchNorm
    torch.manual_seed(0)
    norm, linear = PointBatchNorm(channels), nn.Linear(channels, outputs)
    with torch.no_grad():
        norm.bn.weight.uniform_(0.5, 2.0)
        norm.bn.bias.normal_()
    x = (torch.randn(3, 50, 7, channels) * 2 + 1).bfloat16()
    grad = torch.randn(3, 50, 7, outputs).bfloat16()

    def compute(dtype):
        modules = copy.deepcopy(nn.ModuleList([norm, linear]))
        rows = x.to(dtype).requires_grad_()
        params = [modules[0].bn.weight, modules[0].bn.bias, modules[1].weight, modules[1].bias]
        results = []
        for training in (True, True, False):
            modules.train(training)
            out = ops.norm_relu_linear(modules[0].bn, modules[1], rows)
            assert out.grad_fn.next_functions[0][0].name() == "_NormReluLinearBackward"
            results += [out, *torch.autograd.grad(out, [rows, *params], grad.to(dtype))]
        return results + [modules[0].bn.running_mean, modules[0].bn.running_var]
    rows, reference = _run_bf16_and_float32(compute)
    assert rows[0].dtype == rows[1].dtype == torch.bfloat16 and rows[2].dtype == torch.float32
    bias_grads = {5, 11, 17}  # summed by torch over bf16 rows, in its own order: not bitwise
    _assert_rounded_once([t for i, t in enumerate(rows) if i not in bias_grads],
                         [t for i, t in enumerate(reference) if i not in bias_grads])
    for i in bias_grads:
        assert torch.allclose(rows[i], reference[i], rtol=1e-6, atol=1e-6)


@pytest.mark.usefixtures("needs_compiler")
def test_bf16_neighbour_max_and_norm_relu_max():
    """TransitionDown's max-pool on bfloat16 rows: the maxima and their gradient exactly as in
    float32; BatchNorm-ReLU-max's output and input gradient rounded once, its parameters'
    gradients and running statistics as in float32 (training twice, then eval)."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 20, 9, 24, generator=gen) * 2 + 1).bfloat16()
    grad = torch.randn(3, 20, 24, generator=gen).bfloat16()
    bn, _ = bn_pair(24)

    def compute(dtype):
        rows = x.to(dtype).requires_grad_()
        top = ops.neighbour_max(rows)
        assert top.grad_fn.name() == "_NeighbourMaxBackward"
        results = [top, *torch.autograd.grad(top, rows, grad.to(dtype))]
        norm = copy.deepcopy(bn)
        for training in (True, True, False):
            norm.train(training)
            out = ops.norm_relu_max(norm, rows)
            assert out.grad_fn.name() == "_NormReluMaxBackward"
            results += [out, *torch.autograd.grad(out, [rows, norm.weight, norm.bias],
                                                  grad.to(dtype))]
        return results + [norm.running_mean, norm.running_var]
    rows, reference = _run_bf16_and_float32(compute)
    assert rows[2].dtype == rows[3].dtype == torch.bfloat16
    _assert_rounded_once(rows, reference)


@pytest.mark.usefixtures("needs_compiler")
def test_a_kernel_refuses_a_dtype_it_has_no_form_for():
    """A dtype code outside float32, float64 and bf16 rows: the kernel returns its status
    without touching memory, and lib/ops raises one line."""
    from lib.ops.dispatch import run_kernel
    x, out = torch.randn(4, 3, 8), torch.full((4, 8), 7.0)
    arg = torch.zeros(4, 8, dtype=torch.int32)
    status = native.library().call("neighbour_max_forward", dtype=3, R=4, K=3, C=8, x=x,
                                   out=out, arg=arg)
    assert status == -4 and (out == 7).all()
    codes = dict(ops.dispatch.KERNEL_DTYPE_CODES)
    try:
        ops.dispatch.KERNEL_DTYPE_CODES[torch.float16] = 3
        with pytest.raises(ValueError, match="neighbour_max_forward: no form for dtype code 3"):
            run_kernel(native.library(), "neighbour_max_forward", dtype=torch.float16, R=4, K=3,
                       C=8, x=x, out=out, arg=arg)
    finally:
        ops.dispatch.KERNEL_DTYPE_CODES.clear()
        ops.dispatch.KERNEL_DTYPE_CODES.update(codes)


def test_fused_forms_step_aside_for_modules_with_hooks():
    """A forward hook must see its module run (HAQ records layer inputs with one)."""
    from models.point_transformer import PointBatchNorm
    norm, linear = PointBatchNorm(16), nn.Linear(16, 2)
    seen = []
    linear.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))
    ops.norm_relu_linear(norm.bn, linear, torch.randn(2, 30, 8, 16))
    assert seen == [(2, 30, 8, 16)]
    few = nn.Sequential(nn.Linear(3, 32))
    few[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))
    fast_layers.mlp(few, torch.randn(2, 30, 8, 3, requires_grad=True))
    assert seen[-1] == (2, 30, 8, 3)


def test_native_kernels_can_be_switched_off(monkeypatch):
    """POINT_HAQ_NATIVE=0: no library, and the layer falls back to the PyTorch forms."""
    monkeypatch.setenv("POINT_HAQ_NATIVE", "0")
    monkeypatch.setattr(native, "_library", native._UNSET)
    assert native.library() is None
    delta, key, query, _, _, idx = attention_inputs(2, 20, 4, 16, 8, torch.float32)
    relation = ops.relation(delta, key, query, idx)
    assert relation.grad_fn.name() == "AddBackward0"


def test_a_failed_build_warns_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", "false")  # a "compiler" that fails
    monkeypatch.delenv("POINT_HAQ_NATIVE", raising=False)  # the suite may run with it at 0
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(native, "_library", native._UNSET)
    with pytest.warns(UserWarning, match="building the C kernels"):
        assert native.library() is None
    assert list(tmp_path.rglob("*.so")) == []  # no half-written library left behind


def test_mlp_few_input_linear_gradients():
    torch.manual_seed(0)
    layers = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 32))
    x = torch.randn(4, 100, 8, 3, requires_grad=True)
    grad = torch.randn(4, 100, 8, 32)
    grads = []
    for backend in ("auto", "reference"):
        ops.set_backend(backend)
        layers.zero_grad()
        x.grad = None
        fast_layers.mlp(layers, x).backward(grad)
        grads.append([x.grad.clone()] + [p.grad.clone() for p in layers.parameters()])
    for fast, reference in zip(*grads):
        assert close(fast, reference)


def test_mlp_under_cpu_autocast_matches_the_plain_layers():
    """An fp32 input under bf16 autocast: the plain layer runs (the custom backward would meet
    a bf16 gradient and fp32 weights), so both paths agree."""
    torch.manual_seed(0)
    layers = nn.Sequential(nn.Linear(3, 32))
    x = torch.randn(2, 64, 8, 3)
    outputs = []
    for backend in ("auto", "reference"):
        ops.set_backend(backend)
        layers.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fast_layers.mlp(layers, x)
        y.float().sum().backward()
        outputs.append((y, layers[0].weight.grad.clone()))
    assert outputs[0][0].dtype == torch.bfloat16
    assert torch.equal(outputs[0][0], outputs[1][0])
    assert torch.equal(outputs[0][1], outputs[1][1])


def _without_kernels(monkeypatch):
    """gather's backward takes its sparse-matrix form, as without a C compiler."""
    from lib.ops import dispatch
    monkeypatch.setattr(dispatch, "native_for", lambda *tensors, **kw: None)


@pytest.mark.parametrize("kernels", [True, False], ids=["kernel", "sparse"])
def test_gather_backward_sums_every_use_of_a_row(kernels, monkeypatch):
    if not kernels:
        _without_kernels(monkeypatch)
    features = torch.randn(3, 40, 5, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, 40, (3, 40, 7))
    assert torch.autograd.gradcheck(lambda f: ops.gather(f, idx), (features,))
    grad = torch.randn(3, 40, 7, 5, dtype=torch.float64)
    for _ in range(2):  # the second backward reuses the cached sparse matrix
        features.grad = None
        ops.gather(features, idx).backward(grad)
        expected = torch.zeros(3 * 40, 5, dtype=torch.float64).index_add_(
            0, (idx + torch.arange(3).view(3, 1, 1) * 40).reshape(-1), grad.reshape(-1, 5))
        assert torch.allclose(features.grad.reshape(-1, 5), expected)
    # the same index tensor into a cloud of another size (the cache checks the row count)
    other = torch.randn(3, 41, 5, dtype=torch.float64, requires_grad=True)
    ops.gather(other, idx).backward(grad)
    assert other.grad[:, 40].abs().sum() == 0


@pytest.mark.parametrize("kernels", [True, False], ids=["kernel", "sparse"])
@pytest.mark.parametrize("shape, idx_shape", [((0, 5, 4), (0, 3, 2)), ((2, 0, 4), (2, 0, 2)),
                                              ((2, 3, 4), (2, 3, 0))])
def test_an_empty_gathers_backward_is_zero(kernels, shape, idx_shape, monkeypatch):
    """An empty batch, cloud or neighbourhood gathers nothing and gets a zero gradient (the C
    kernel, which needs N >= 1, is not called for it)."""
    if not kernels:
        _without_kernels(monkeypatch)
    features = torch.randn(*shape, requires_grad=True)
    ops.gather(features, torch.zeros(idx_shape, dtype=torch.int64)).sum().backward()
    assert features.grad.shape == shape and not features.grad.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gather_backward_kernel_gives_the_sparse_forms_bits(dtype, needs_compiler, monkeypatch):
    """Both add a source row's gradients in increasing order of the gathered rows, so the C
    kernel (csrc/gather_rows.c, by cloud on each thread) and the sparse product agree to the
    bit, at one thread and at two, with rows gathered many times over (index_add in float64 is
    the reference for the values)."""
    torch.manual_seed(0)
    features = torch.randn(4, 300, 19, dtype=dtype, requires_grad=True)
    idx = torch.randint(0, 300, (4, 500, 6))
    grad = torch.randn(4, 500, 6, 19, dtype=dtype)

    def gradient():
        features.grad = None
        ops.gather(features, idx.clone()).backward(grad)
        return features.grad
    threads = torch.get_num_threads()
    try:
        by_thread_count = []
        for count in (1, 2):
            torch.set_num_threads(count)
            by_thread_count.append(gradient())
    finally:
        torch.set_num_threads(threads)
    with monkeypatch.context() as patch:
        _without_kernels(patch)
        sparse = gradient()
    assert torch.equal(by_thread_count[0], by_thread_count[1])
    assert torch.equal(by_thread_count[0], sparse)
    expected = torch.zeros(4 * 300, 19, dtype=torch.float64).index_add_(
        0, (idx + torch.arange(4).view(4, 1, 1) * 300).reshape(-1), grad.double().reshape(-1, 19))
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    assert torch.allclose(sparse.double().reshape(-1, 19), expected, atol=tolerance)


def test_point_transformer_training_step_same_on_both_paths():
    """Loss and every parameter gradient of a training step agree between the fast layers and
    the reference compositions, on the same geometry (replayed from a tape). 2048 points, so
    that the coarsest stage (32 points) has more points than neighbours: with all points as
    neighbours the relative positions cancel, the self-neighbour rows of delta's BatchNorm are
    exactly its mean, and rounding decides their ReLU on either path."""
    torch.manual_seed(0)
    model = build_model("pt_seg_tiny", in_channels=3, num_classes=6, num_categories=2).double()
    # float64: in float32 rounding alone flips a few ReLUs and moves early gradients by ~1%
    xyz, feat = torch.randn(2, 2048, 3).double(), torch.randn(2, 2048, 3).double()
    category = torch.tensor([0, 1])
    tape = ops.GeometryTape()
    results = []
    for backend in ("auto", "reference"):
        ops.set_backend(backend)
        replica = copy.deepcopy(model).train()
        with tape:
            loss = replica(xyz, feat, category).square().mean()
        loss.backward()
        results.append((loss, {n: p.grad for n, p in replica.named_parameters()},
                        {n: b for n, b in replica.named_buffers()}))
    (loss_fast, grads_fast, buffers_fast), (loss_ref, grads_ref, buffers_ref) = results
    assert torch.allclose(loss_fast, loss_ref, rtol=1e-10)
    # relative to each gradient, with a floor for those that are zero but for rounding (a
    # bias right before a BatchNorm)
    floor = 1e-8 * max(grad.abs().max() for grad in grads_ref.values())
    for name, grad in grads_fast.items():
        error = (grad - grads_ref[name]).abs().max()
        assert error <= 1e-7 * grads_ref[name].abs().max() + floor, name
    for name, buffer in buffers_fast.items():
        assert torch.allclose(buffer.double(), buffers_ref[name].double(), rtol=1e-10), name


def test_point_transformer_trains_under_cpu_bf16_autocast():
    """`--amp` on the CPU: the C kernels take the layer's bf16 rows (with a compiler), and a
    training step gives finite gradients for every parameter."""
    torch.manual_seed(0)
    model = build_model("pt_seg_tiny", in_channels=3, num_classes=6, num_categories=2).train()
    xyz, feat = torch.randn(2, 512, 3), torch.randn(2, 512, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(xyz, feat, torch.tensor([0, 1]))
    assert logits.dtype == torch.bfloat16
    if native.library() is not None:
        seen, stack = set(), [logits.grad_fn]
        while stack:
            node = stack.pop()
            if node is not None and node not in seen:
                seen.add(node)
                stack += [parent for parent, _ in node.next_functions]
        assert {"_RelationBackward", "_AggregateBackward", "_NormReluLinearBackward",
                "_NormReluMaxBackward"} <= {node.name() for node in seen}
    logits.float().square().mean().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
