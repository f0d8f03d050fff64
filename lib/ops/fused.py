"""The Point Transformer layer's fused operations: C kernels (lib/ops/csrc/, loaded by
lib/ops/native.py) wrapped in autograd Functions, each with its plain PyTorch form.

Eager PyTorch runs the layer's per-neighbour chains (gather, add, multiply, sum, BatchNorm,
ReLU, GEMM) one memory-bound pass per operation over (B, N, k, C) tensors; the kernels read
and write each tensor once: the relation and the aggregation of paper Eq. 3, gamma's
BatchNorm-ReLU-Linear, TransitionDown's max-pool. lib/ops/dispatch.py says when they run.
Shapes are checked here before any C call: channel counts against the attention weights' (a
kernel would otherwise write past a row); the kernels check their own shapes again, and each
neighbour index as they read it (csrc/parallel.h's checked_index), and return a status.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from lib.ops.dispatch import get_backend, native_for, run_kernel
from lib.ops.geometry import gather
from lib.ops.layers import _unhooked, _update_running_stats, batch_norm, shared_weight_sum


def _compute_dtype(dtype):
    """The arithmetic of the kernels' forms for rows of `dtype`: bfloat16 rows in float32."""
    return torch.float32 if dtype == torch.bfloat16 else dtype


def _bf16_rows(x, *parameters):
    """x holds bfloat16 rows that the kernels may compute on with these parameters: bf16
    parameters, or float32 ones under CPU bf16 autocast (which gives the plain forms the same
    mix: BatchNorm takes bf16 input with float32 parameters, a Linear casts its weight)."""
    autocast = (torch.is_autocast_enabled("cpu")
                and torch.get_autocast_dtype("cpu") == torch.bfloat16)
    return x.dtype == torch.bfloat16 and all(
        p.dtype == torch.bfloat16 or (autocast and p.dtype == torch.float32) for p in parameters)


class _Relation(torch.autograd.Function):
    """delta (B, N, k, C) - key[idx] + query (B, N, C) per neighbour, in one pass (C kernel)."""

    @staticmethod
    def forward(ctx, lib, delta, key, query, idx):
        delta, key, query, idx = (t.contiguous() for t in (delta, key, query, idx))
        out = torch.empty_like(delta)
        (b, n, k), c = idx.shape, delta.shape[-1]
        run_kernel(lib, "pt_relation_forward", dtype=delta.dtype, B=b, N=n, K=k, C=c, delta=delta,
                   key=key, q=query, idx=idx, rel=out)
        ctx.lib = lib
        ctx.save_for_backward(idx)
        return out

    @staticmethod
    @once_differentiable  # the gradients come from kernels or out= products: no graph
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        grad = grad.contiguous()
        b, n, k, c = grad.shape
        # the scatter-add into the key's rows: float32 for bf16 rows, rounded once after
        grad_key = (torch.zeros(b, n, c, dtype=_compute_dtype(grad.dtype))
                    if ctx.needs_input_grad[2] else None)
        grad_query = grad.new_empty(b, n, c) if ctx.needs_input_grad[3] else None
        if grad_key is not None or grad_query is not None:
            run_kernel(ctx.lib, "pt_relation_backward", dtype=grad.dtype, B=b, N=n, K=k, C=c,
                       grad_rel=grad, idx=idx, grad_key=grad_key, grad_q=grad_query)
        if grad_key is not None:
            grad_key = grad_key.to(grad.dtype)
        return None, grad, grad_key, grad_query, None


def _check_neighbours(rows, idx, neighbour_rows):
    """The shapes the PT layer's kernels assume: rows (B, N, C), idx (B, N, k), neighbour_rows
    (B, N, k, *). (The kernels check each index they read against N themselves.)"""
    b, n = rows.shape[:2]
    if idx.dim() != 3 or tuple(idx.shape[:2]) != (b, n) or \
            tuple(neighbour_rows.shape[:3]) != tuple(idx.shape):
        raise ValueError(f"lib/ops: neighbour shapes disagree: rows {tuple(rows.shape)}, idx "
                         f"{tuple(idx.shape)}, per-neighbour {tuple(neighbour_rows.shape)}")


def relation(delta, key, query, idx):
    """Paper Eq. 3's relation phi(x_i) - psi(x_j) + delta_ij for each point i and neighbour j:
    delta (B, N, k, C), key = psi(x) and query = phi(x) (B, N, C), idx (B, N, k) -> (B, N, k, C).
    The plain form negates the key on the N points before the gather (its sum's backward then
    passes the gradient on without a negated (B, N, k, C) copy)."""
    # on every path, so that a bad call is the same error with or without the kernels
    if query.shape != key.shape or delta.shape[-1] != key.shape[-1]:
        raise ValueError(f"lib/ops: relation of delta {tuple(delta.shape)} needs key and "
                         f"query of one shape (B, N, {delta.shape[-1]}), got "
                         f"{tuple(key.shape)} and {tuple(query.shape)}")
    lib = native_for(delta, key, query, bf16_rows=True)
    if lib is not None and idx.dtype == torch.int64:
        _check_neighbours(key, idx, delta)
        return _Relation.apply(lib, delta, key, query, idx)
    return delta + gather(-key, idx) + query.unsqueeze(2)


class _Aggregate(torch.autograd.Function):
    """sum_j w (tiled to C) * (value[idx] + delta) in one pass (C kernel)."""

    @staticmethod
    def forward(ctx, lib, weight, value, delta, idx):
        weight, value, delta, idx = (t.contiguous() for t in (weight, value, delta, idx))
        b, n, c = value.shape
        out = value.new_empty(b, n, c)
        run_kernel(lib, "pt_aggregate_forward", dtype=value.dtype, B=b, N=n, K=idx.shape[-1], C=c,
                   W=weight.shape[-1], w=weight, v=value, delta=delta, idx=idx, out=out)
        ctx.lib = lib
        ctx.save_for_backward(weight, value, delta, idx)
        return out

    @staticmethod
    @once_differentiable  # the gradients come from kernels or out= products: no graph
    def backward(ctx, grad):
        weight, value, delta, idx = ctx.saved_tensors
        grad = grad.contiguous()
        _, need_w, need_v, need_delta, _ = ctx.needs_input_grad
        grad_w = torch.empty_like(weight) if need_w else None
        # float32 for bf16 rows, as the relation's grad_key
        grad_v = torch.zeros(value.shape, dtype=_compute_dtype(value.dtype)) if need_v else None
        grad_delta = torch.empty_like(delta) if need_delta else None
        if need_w or need_v or need_delta:
            b, n, c = value.shape
            run_kernel(ctx.lib, "pt_aggregate_backward", dtype=value.dtype, B=b, N=n,
                       K=idx.shape[-1], C=c, W=weight.shape[-1], grad_out=grad, w=weight, v=value,
                       delta=delta, idx=idx, grad_w=grad_w, grad_delta=grad_delta, grad_v=grad_v)
        if grad_v is not None:
            grad_v = grad_v.to(value.dtype)
        return None, grad_w, grad_v, grad_delta, None


def neighbour_sum(weight, value, delta, idx, share_planes):
    """Paper Eq. 3's aggregation sum_j w_ij * (alpha(x_j) + delta_ij) with shared weights:
    weight (B, N, k, C/s), value = alpha(x) (B, N, C), delta (B, N, k, C), idx (B, N, k)
    -> (B, N, C); channel g C/s + c is weighted by weight[..., c] (shared_weight_sum)."""
    channels, width = value.shape[-1], weight.shape[-1]
    if width * share_planes != channels or delta.shape[-1] != channels:
        raise ValueError(f"lib/ops: neighbour_sum of {channels} channels needs {channels} delta "
                         f"channels and {channels} / {share_planes} attention weights, got "
                         f"{delta.shape[-1]} and {width}")
    lib = native_for(value, weight, delta, bf16_rows=True)
    if lib is not None and idx.dtype == torch.int64:
        _check_neighbours(value, idx, delta)
        _check_neighbours(value, idx, weight)
        return _Aggregate.apply(lib, weight, value, delta, idx)
    return shared_weight_sum(gather(value, idx) + delta, weight, share_planes)


class _NeighbourMax(torch.autograd.Function):
    """x.amax(dim=2) over (B, M, k, C), its gradient routed to the first maximum (C kernel)."""

    @staticmethod
    def forward(ctx, lib, x):
        x = x.contiguous()
        b, m, k, c = x.shape
        out = x.new_empty(b, m, c)
        arg = torch.empty(b, m, c, dtype=torch.int32)
        run_kernel(lib, "neighbour_max_forward", dtype=x.dtype, R=b * m, K=k, C=c, x=x, out=out,
                   arg=arg)
        ctx.lib, ctx.k = lib, k
        ctx.save_for_backward(arg)
        return out

    @staticmethod
    @once_differentiable  # the gradients come from kernels or out= products: no graph
    def backward(ctx, grad):
        (arg,) = ctx.saved_tensors
        grad = grad.contiguous()
        b, m, c = grad.shape
        grad_x = grad.new_empty(b, m, ctx.k, c)
        run_kernel(ctx.lib, "neighbour_max_backward", dtype=grad.dtype, R=b * m, K=ctx.k, C=c,
                   grad_out=grad, arg=arg, grad_x=grad_x)
        return None, grad_x


def neighbour_max(x):
    """Max-pooling over the neighbour axis, (B, M, k, C) -> (B, M, C) (paper Fig. 4b). The C
    kernel's backward sends the gradient to the first maximal neighbour where amax's would
    share it among ties: they differ only at ties, which follow a ReLU as zeros whose gradient
    the ReLU drops (lib/ops/csrc/neighbour_max.c)."""
    lib = native_for(x, bf16_rows=True)
    if lib is not None and x.dim() == 4 and x.shape[2] < 2 ** 31 and x.shape[-1] > 0:  # int32
        return _NeighbourMax.apply(lib, x)
    return x.amax(dim=2)


def _affine_statistics(lib, bn, rows, gamma, beta):
    """BatchNorm of contiguous (M, C) rows as one affine map per channel: (mean, rstd, scale,
    shift) in the rows' compute dtype, bn(x) = scale x + shift. Training: the rows' statistics (C
    kernel, float64 sums) and `bn`'s running statistics updated as bn(x) would; eval: the
    running statistics."""
    count, channels = rows.shape
    if bn.training:
        sums = torch.empty(2, channels, dtype=torch.float64)
        run_kernel(lib, "nrl_stats", dtype=rows.dtype, M=count, C=channels, x=rows, sums=sums)
        mean = sums[0] / count
        var = (sums[1] / count - mean * mean).clamp_min(0)  # float64: no cancellation here
        _update_running_stats(bn, mean, var, count)
    else:
        mean, var = bn.running_mean.double(), bn.running_var.double()
    compute = _compute_dtype(rows.dtype)
    return tuple(t.to(compute) for t in _affine(bn, mean, var, gamma, beta))


def _affine(bn, mean, var, gamma, beta):
    """(mean, rstd, scale, shift) in float64, bn(x) = scale x + shift, from a float64 mean and
    (biased) variance and the affine parameters gamma, beta (not differentiated)."""
    rstd = torch.rsqrt(var + bn.eps)
    scale = gamma.detach().double() * rstd
    return mean, rstd, scale, beta.detach().double() - mean * scale


def batch_norm_backward_terms(gamma, rstd, sum_gy, sum_gy_xhat, rows, training):
    """(k1, k2, k3) in float64 with BatchNorm's input gradient k1 gy - k2 - k3 x_hat per
    channel, from its output gradient gy's sums over the rows (sum gy, sum gy x_hat); in eval
    mode (fixed statistics) k1 gy alone. The kernels take them to write that gradient."""
    k1 = gamma.detach().double() * rstd.double()
    if not training:
        return k1, torch.zeros_like(k1), torch.zeros_like(k1)
    return k1, k1 * sum_gy / rows, k1 * sum_gy_xhat / rows  # the batch statistics' share


def running_affine(bn):
    """(scale, shift) in float64 of `bn` in eval mode: its running statistics folded."""
    return _affine(bn, bn.running_mean.double(), bn.running_var.double(), bn.weight, bn.bias)[2:]


def plain_norm(bn):
    """Whether the fused forms may compute `bn` from its parameters directly: a plain affine
    nn.BatchNorm1d with running statistics (not SyncBatchNorm) and no hooks (HAQ's recorder)."""
    return type(bn) is nn.BatchNorm1d and bn.affine and bn.track_running_stats and _unhooked(bn)


def fusable_norm(bn, x):
    """plain_norm(bn), on x of its parameters' dtype without autocast, or on bf16 rows
    (_bf16_rows)."""
    return plain_norm(bn) and (_bf16_rows(x, bn.weight, bn.bias) or (
        x.dtype == bn.weight.dtype and not torch.is_autocast_enabled(x.device.type)))


def relu_neighbour_max(x):
    """neighbour_max(relu(x)), (B, M, k, C) -> (B, M, C): an LBR then max-pooling. The "auto"
    backend takes the ReLU after the max, on k times fewer values, forward and backward:
    max_k relu(x_k) = relu(max_k x_k) (gradients differ only at ties, see neighbour_max). The
    reference keeps the order the layer is written in."""
    if get_backend() == "auto":
        return F.relu(neighbour_max(x))
    return neighbour_max(F.relu(x))


class _NormReluMax(torch.autograd.Function):
    """relu(bn(x)).amax(2) over (B, M, k, C), for a `bn` whose scales are all non-negative:
    per channel bn is then non-decreasing, so it and the ReLU commute with the max. The forward
    reads x twice in training (C kernels: the statistics, the maxima) and writes only (B, M, C);
    the backward writes BatchNorm's input gradient with the max's share added in one pass (C
    kernel). The plain chain writes bn(x) and a dense gradient of the max besides."""

    @staticmethod
    def forward(ctx, lib, bn, x, weight, bias):
        x = x.contiguous()
        b, m, k, c = x.shape
        mean, rstd, scale, shift = _affine_statistics(lib, bn, x.view(-1, c), weight, bias)
        top = x.new_empty(b, m, c)
        arg = torch.empty(b, m, c, dtype=torch.int32)
        run_kernel(lib, "neighbour_max_forward", dtype=x.dtype, R=b * m, K=k, C=c, x=x, out=top,
                   arg=arg)
        pre = torch.addcmul(shift, top, scale)  # bn of the maxima (B, M, C), compute dtype
        ctx.lib, ctx.training = lib, bn.training
        ctx.save_for_backward(x, arg, top, pre, weight, mean, rstd)
        return pre.clamp_min(0).to(x.dtype)

    @staticmethod
    @once_differentiable  # the gradients come from kernels or out= products: no graph
    def backward(ctx, grad):
        x, arg, top, pre, weight, mean, rstd = ctx.saved_tensors
        rows = x.numel() // x.shape[-1]
        # bn(x)'s gradient at the maxima, zero at every other row; bf16 rows' in float32
        grad_bn = grad.to(pre.dtype) * (pre > 0)
        grad_bias = grad_bn.sum((0, 1))
        grad_weight = (grad_bn * (top - mean) * rstd).sum((0, 1))
        a = weight.detach() * rstd
        k1 = k0 = None  # eval mode: fixed statistics, a g alone
        if ctx.training:
            # BatchNorm's input gradient a g - a / rows (grad_bias + x_hat grad_weight), its
            # x_hat term as k1 x + k0 so that one pass writes it
            k1 = -a * rstd * grad_weight / rows
            k0 = -a * grad_bias / rows - k1 * mean
        grad_x = torch.empty_like(x)  # (B, M, k, C): k1 x + k0, plus a g at the maxima
        b, m, k, c = x.shape
        run_kernel(ctx.lib, "norm_max_backward", dtype=x.dtype, R=b * m, K=k, C=c, x=x, arg=arg,
                   k1=k1, k0=k0, grad_out=(a * grad_bn).contiguous(), grad_x=grad_x)
        return None, None, grad_x, grad_weight.to(weight.dtype), grad_bias.to(weight.dtype)


def norm_relu_max(bn, x):
    """relu(bn(x)) max-pooled over the neighbours, (B, M, k, C) -> (B, M, C), `bn` an
    nn.BatchNorm1d over the last axis: an LBR's end and the max-pool. Fused where it can
    (CPU, fp32/fp64 without autocast or bf16 rows, every scale >= 0 as BatchNorm starts, plain
    unhooked module); elsewhere batch_norm, then relu_neighbour_max."""
    lib = native_for(x, bf16_rows=True)
    fused = (lib is not None and x.dim() == 4 and fusable_norm(bn, x)
             and bn.num_features == x.shape[-1] and x.shape[2] < 2 ** 31
             and x.numel() // x.shape[-1] >= 2
             and bool((bn.weight >= 0).all()))
    if not fused:
        return relu_neighbour_max(batch_norm(bn, x))
    return _NormReluMax.apply(lib, bn, x, bn.weight, bn.bias)


# norm_relu_linear's C kernels beat BatchNorm + ReLU + GEMM up to this many channels; above,
# the per-row products (C x C / share_planes) are better left to the GEMM: in float32, forward
# and backward, 2.7x at 64 channels, 1.5-1.9x at 128 (the preset body; 0.5x before it had one),
# 0.17x at 256 (bench/RESULTS.md). float64 has no preset bodies. On bf16 rows the plain chain's
# GEMM runs in bf16 (native on AVX512-BF16): there the kernel is 1.3-1.45x up to 32 channels
# and 0.95-0.98x at 64 (`python bench/fast_layers.py`).
_NORM_RELU_LINEAR_MAX_CHANNELS = {torch.float32: 128, torch.float64: 64, torch.bfloat16: 32}


class _NormReluLinear(torch.autograd.Function):
    """linear(relu(bn(x))) on (M, C) rows in two passes forward and two backward (C kernels,
    lib/ops/csrc/norm_relu_linear.c); keeps `bn`'s running statistics as bn(x) would."""

    @staticmethod
    def forward(ctx, lib, bn, x, gamma, beta, weight, bias):
        x = x.contiguous()
        ctx.dtypes = gamma.dtype, weight.dtype  # of the gradients to return
        compute = _compute_dtype(x.dtype)  # of the weights given to the kernels
        weight, bias = (t.detach().to(compute).contiguous() for t in (weight, bias))
        (rows, channels), outputs = x.shape, weight.shape[0]
        mean, rstd, scale, shift = _affine_statistics(lib, bn, x, gamma, beta)
        out = x.new_empty(rows, outputs)
        run_kernel(lib, "nrl_forward", dtype=x.dtype, M=rows, C=channels, O=outputs, x=x,
                   scale=scale, shift=shift, weight=weight, bias=bias, out=out)
        ctx.lib, ctx.training = lib, bn.training
        ctx.save_for_backward(x, gamma, weight, scale, shift, mean, rstd)
        return out

    @staticmethod
    @once_differentiable  # the gradients come from kernels or out= products: no graph
    def backward(ctx, grad_h):
        x, gamma, weight, scale, shift, mean, rstd = ctx.saved_tensors
        grad_h = grad_h.contiguous()
        (rows, channels), outputs = x.shape, weight.shape[0]
        given = dict(dtype=x.dtype, M=rows, C=channels, O=outputs, x=x, grad_h=grad_h,
                     scale=scale, shift=shift, mean=mean, rstd=rstd, weight=weight)
        sums = torch.empty(2 + outputs, channels, dtype=torch.float64)
        run_kernel(ctx.lib, "nrl_backward_sums", sums=sums, **given)
        grad_beta, grad_gamma = sums[0], sums[1]  # sum of dy, sum of dy x_hat
        grad_x = None
        if ctx.needs_input_grad[2]:
            k1, k2, k3 = (t.to(weight.dtype) for t in batch_norm_backward_terms(
                gamma, rstd, grad_beta, grad_gamma, rows, ctx.training))
            grad_x = torch.empty_like(x)
            run_kernel(ctx.lib, "nrl_backward_input", k1=k1, k2=k2, k3=k3, grad_x=grad_x, **given)
        norm_dtype, linear_dtype = ctx.dtypes
        return (None, None, grad_x, grad_gamma.to(norm_dtype), grad_beta.to(norm_dtype),
                sums[2:].to(linear_dtype),
                grad_h.sum(0, dtype=weight.dtype).to(linear_dtype))


def norm_relu_linear(bn, linear, x):
    """linear(relu(bn(x))) for `bn` an nn.BatchNorm1d over the last axis and `linear` an
    nn.Linear, on (..., C) -> (..., O): the start of the PT layer's gamma, on the (B, N, k, C)
    relation. Fused in C where it pays (CPU, C <= 128 in float32, 64 in float64, 32 for bf16
    rows, plain modules;
    fp32/fp64 without autocast, or bf16 rows: see fusable_norm); elsewhere batch_norm, ReLU and
    the Linear (and so the reference's plain forms)."""
    channels = x.shape[-1]
    lib = native_for(x, bf16_rows=True)
    fused = (lib is not None and channels <= _NORM_RELU_LINEAR_MAX_CHANNELS[x.dtype]
             and fusable_norm(bn, x) and bn.num_features == channels
             and type(linear) is nn.Linear and linear.in_features == channels
             and linear.bias is not None
             and _unhooked(linear) and x.numel() // channels >= 2
             and (x.dtype == linear.weight.dtype or _bf16_rows(x, linear.weight, linear.bias)))
    if not fused:
        return linear(F.relu(batch_norm(bn, x), inplace=True))
    rows = x.reshape(-1, channels)
    out = _NormReluLinear.apply(lib, bn, rows, bn.weight, bn.bias, linear.weight, linear.bias)
    return out.view(*x.shape[:-1], -1)
