"""Faster CPU forms of the Point Transformer's per-neighbour tensor operations.

A PT layer works on (B, N, k, C) tensors: memory-bound elementwise chains that eager PyTorch runs
one pass per operation, and whose channel counts are often tiny (3 for the relative positions,
C / share_planes for the attention weights, 2 in the tiny config's first stage), where
PyTorch's broadcasting and BatchNorm kernels run 5-10x below memory speed (bench/RESULTS.md).
Two kinds of forms here:
- fused C kernels (lib/ops/csrc/, loaded by lib/ops/native.py): the relation and the
  aggregation of paper Eq. 3, gamma's BatchNorm-ReLU-Linear, TransitionDown's max-pool;
- PyTorch re-formulations with wide inner loops (BatchNorm over few channels, delta's
  Linear(3, C), the tiled shared-weight sum), used where the C kernels are not.
lib/ops/dispatch.py says when each runs; elsewhere the plain compositions run, which
tests/test_ops_layers.py checks these against, values and gradients. Shapes are checked here,
before any C call: neighbour indices against the cloud size (geometry.check_index), the channel
count against the attention weights' (a C kernel would otherwise write past a row).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from lib.ops import dispatch
from lib.ops.dispatch import NATIVE_DTYPES, native_for
from lib.ops.geometry import check_index, gather


def enabled(x):
    return dispatch.fast_cpu(x)


def _unhooked(*modules):
    """True when no forward hook would see these modules run: the fused forms compute with
    their weights directly, so a module with hooks (HAQ's input-size recorder,
    lib/quant/layers.py) runs as itself."""
    from torch.nn.modules import module as nn_module
    return not (nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks
                or any(m._forward_hooks or m._forward_pre_hooks for m in modules))


def _run(lib, name, **arguments):
    """A C kernel's call; its failure status as a one-line error."""
    status = lib.call(name, dtype=NATIVE_DTYPES[arguments.pop("dtype")], **arguments)
    if status == -1:
        raise MemoryError(f"lib/ops/csrc: {name}: out of memory for its partial sums")
    if status:
        raise ValueError(f"lib/ops/csrc: {name}: shapes outside what the kernel takes "
                         f"({', '.join(f'{k}={v}' for k, v in arguments.items() if isinstance(v, int))})")


# Where the forms below beat PyTorch's (`python bench/fast_layers.py`, bench/RESULTS.md):
# training-mode BN is 4-14x faster up to 8 channels (with this limit lifted: as fast at 16-32,
# 1.5x slower at 64); eval-mode BN is faster on large inputs.
_FAST_TRAIN_CHANNELS = 8
_FAST_EVAL_ROWS = 4096
# shared_weight_sum tiles the weights when they have at most this many channels: 1.5-3x faster
# at 2 and 4, the plain broadcast is as fast from 8.
_MAX_TILED_WIDTH = 4


def _fold(rows, channels):
    """How many rows of an (M, C) tensor to view as one, so that a per-channel vector repeated
    that many times spans at least 128 elements: M must divide by it (M = B N k usually has
    many factors of 2; otherwise fewer rows are folded, down to one)."""
    fold = 1
    while fold * channels < 128 and rows % (2 * fold) == 0:
        fold *= 2
    return fold


def _channel_sum(x_folded, fold):
    """(M / fold, fold C) -> per-channel sums (C,)."""
    return x_folded.sum(0).view(fold, -1).sum(0)


class _BatchNormRows(torch.autograd.Function):
    """Training-mode batch normalisation of (M, C) rows, statistics over M (biased variance,
    two-pass for accuracy, as PyTorch's kernel). Returns y and the batch mean and variance."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        rows, channels = x.shape
        fold = _fold(rows, channels)
        xf = x.reshape(rows // fold, fold * channels)
        mean = _channel_sum(xf, fold) / rows
        centred = xf - mean.repeat(fold)
        var = _channel_sum(centred * centred, fold) / rows
        rstd = torch.rsqrt(var + eps)
        y = x.new_empty(rows, channels)  # written through a folded view: y itself is no view
        torch.addcmul(bias.repeat(fold), centred, (weight * rstd).repeat(fold),
                      out=y.view(xf.shape))
        ctx.fold = fold
        ctx.save_for_backward(centred, rstd, weight)
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, grad_y, _grad_mean, _grad_var):
        centred, rstd, weight = ctx.saved_tensors
        fold = ctx.fold
        rows = centred.shape[0] * fold
        gf = grad_y.reshape(centred.shape)
        grad_bias = _channel_sum(gf, fold)
        grad_centred_dot = _channel_sum(gf * centred, fold)  # sum_m g (x - mean), per channel
        grad_weight = grad_centred_dot * rstd
        grad_x = None
        if ctx.needs_input_grad[0]:
            # dx = a g + b (x - mean) + c, the usual BN backward gathered per channel
            a = weight * rstd
            b = -a * rstd * rstd * grad_centred_dot / rows
            c = -a * grad_bias / rows
            grad_x = grad_y.new_empty(rows, grad_y.shape[1])
            folded = grad_x.view(centred.shape)
            torch.addcmul(c.repeat(fold), centred, b.repeat(fold), out=folded)
            folded.addcmul_(gf, a.repeat(fold))
        return grad_x, grad_weight, grad_bias, None


def batch_norm_rows(x, bn):
    """`bn` (an nn.BatchNorm1d) applied to (M, C) rows, as bn(x) computes it, running statistics
    included. Unusual set-ups (no affine, no running statistics, SyncBatchNorm, one row, mixed
    dtypes) and the reference path go to `bn` itself."""
    plain = (not enabled(x) or type(bn) is not nn.BatchNorm1d or not bn.affine
             or not bn.track_running_stats or x.dtype != bn.weight.dtype or x.shape[0] < 2)
    if plain:
        return bn(x)
    rows, channels = x.shape
    if not bn.training:
        if rows < _FAST_EVAL_ROWS:  # per-call overhead dominates small inputs
            return bn(x)
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        shift = bn.bias - bn.running_mean * scale
        fold = _fold(rows, channels)
        y = torch.addcmul(shift.repeat(fold), x.reshape(rows // fold, fold * channels),
                          scale.repeat(fold))
        return y.view(rows, channels)
    if channels > _FAST_TRAIN_CHANNELS:
        return bn(x)
    y, mean, var = _BatchNormRows.apply(x, bn.weight, bn.bias, bn.eps)
    _update_running_stats(bn, mean, var, rows)
    return y


def batch_norm(bn, x):
    """`bn` (an nn.BatchNorm1d) over the last axis of (..., C): (B, N, C), (B, N, k, C), (B, C).
    Flattening to (M, C) hits PyTorch's channels-last BN kernel without a transpose copy."""
    y = batch_norm_rows(x.reshape(-1, x.shape[-1]), bn)
    # Not a view of y: an in-place ReLU on a view makes autograd copy the whole base in the
    # backward (CopySlices), and BatchNorm's backward does not need its output.
    return torch.ops.aten._unsafe_view(y, x.shape)


@torch.no_grad()
def _update_running_stats(bn, mean, var, rows):
    """What a training-mode nn.BatchNorm1d does to its buffers, given the batch's mean and
    biased variance over `rows` rows."""
    bn.num_batches_tracked.add_(1)
    momentum = bn.momentum if bn.momentum is not None else 1.0 / bn.num_batches_tracked.item()
    bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), momentum)
    # unbiased, as PyTorch keeps
    bn.running_var.lerp_((var * (rows / (rows - 1))).to(bn.running_var.dtype), momentum)


class _LinearFewInputs(torch.autograd.Function):
    """F.linear for inputs with few features (delta's Linear(3, C) on M = B N k rows), with a
    backward 2x faster than PyTorch's (bench/fast_layers.py): grad x = g W is formed as
    F.linear(g, W^T), whose transposed operand takes a faster GEMM path than g.mm(W) when W has
    3 columns, and grad W and grad b come from one product [x 1]^T g, which reads g once instead
    of twice and beats g^T x, an (O, M) by (M, 3) product that runs far below speed."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        inputs = weight.shape[1]
        rows = grad_y.reshape(-1, grad_y.shape[-1])
        grad_x = F.linear(grad_y, weight.t().contiguous()) if ctx.needs_input_grad[0] else None
        x_rows = x.reshape(-1, inputs)
        if ctx.has_bias:
            x_rows = torch.cat([x_rows, x_rows.new_ones(x_rows.shape[0], 1)], dim=1)
        grads = x_rows.t() @ rows  # (I [+ 1], O)
        grad_bias = grads[inputs] if ctx.has_bias else None
        return grad_x, grads[:inputs].t(), grad_bias


def mlp(layers, x):
    """nn.Sequential `layers` applied to x, its plain nn.Linear layers with few inputs (fewer
    than a quarter of their outputs) through _LinearFewInputs. Other layers (quantized ones
    included), and every layer under autocast, run as they are."""
    for layer in layers:
        few_inputs = (type(layer) is nn.Linear and 4 * layer.in_features < layer.out_features
                      and enabled(x) and torch.is_grad_enabled() and x.dtype == layer.weight.dtype
                      and not torch.is_autocast_enabled(x.device.type) and _unhooked(layer))
        x = _LinearFewInputs.apply(x, layer.weight, layer.bias) if few_inputs else layer(x)
    return x


def shared_weight_sum(value, weight, share_planes):
    """Paper Eq. 3's aggregation with the official code's weight sharing: value (B, N, k, C) and
    attention weights (B, N, k, C/s) -> (B, N, C), channel g C/s + c weighted by weight[..., c].
    The plain form broadcasts the weights over the s groups with a C/s-element inner loop, slow
    for C/s <= _MAX_TILED_WIDTH: there they are first tiled to C channels by a product with
    [I I ... I] (C/s, C)."""
    if not enabled(value) or weight.shape[-1] > _MAX_TILED_WIDTH:
        grouped = value.unflatten(-1, (share_planes, -1))  # (B, N, k, s, C/s)
        return (grouped * weight.unsqueeze(3)).sum(2).flatten(-2)
    width = weight.shape[-1]
    tile = torch.eye(width, dtype=weight.dtype, device=weight.device).repeat(1, share_planes)
    return (value * (weight @ tile)).sum(2)  # tiled weights (B, N, k, C)


class _Relation(torch.autograd.Function):
    """delta (B, N, k, C) - key[idx] + query (B, N, C) per neighbour, in one pass (C kernel)."""

    @staticmethod
    def forward(ctx, lib, delta, key, query, idx):
        delta, key, query, idx = (t.contiguous() for t in (delta, key, query, idx))
        out = torch.empty_like(delta)
        (b, n, k), c = idx.shape, delta.shape[-1]
        _run(lib, "pt_relation_forward", dtype=delta.dtype, B=b, N=n, K=k, C=c, delta=delta,
             key=key, q=query, idx=idx, rel=out)
        ctx.lib = lib
        ctx.save_for_backward(idx)
        return out

    @staticmethod
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        grad = grad.contiguous()
        b, n, k, c = grad.shape
        grad_key = grad.new_zeros(b, n, c) if ctx.needs_input_grad[2] else None
        grad_query = grad.new_empty(b, n, c) if ctx.needs_input_grad[3] else None
        if grad_key is not None or grad_query is not None:
            _run(ctx.lib, "pt_relation_backward", dtype=grad.dtype, B=b, N=n, K=k, C=c,
                 grad_rel=grad, idx=idx, grad_key=grad_key, grad_q=grad_query)
        return None, grad, grad_key, grad_query, None


def _check_neighbours(rows, idx, neighbour_rows):
    """The shapes the PT layer's kernels assume: rows (B, N, C), idx (B, N, k) within [0, N),
    neighbour_rows (B, N, k, *)."""
    b, n = rows.shape[:2]
    if idx.dim() != 3 or tuple(idx.shape[:2]) != (b, n) or \
            tuple(neighbour_rows.shape[:3]) != tuple(idx.shape):
        raise ValueError(f"lib/ops: neighbour shapes disagree: rows {tuple(rows.shape)}, idx "
                         f"{tuple(idx.shape)}, per-neighbour {tuple(neighbour_rows.shape)}")
    check_index(idx, n)


def relation(delta, key, query, idx):
    """Paper Eq. 3's relation phi(x_i) - psi(x_j) + delta_ij for each point i and neighbour j:
    delta (B, N, k, C), key = psi(x) and query = phi(x) (B, N, C), idx (B, N, k) -> (B, N, k, C).
    The plain form negates the key on the N points before the gather (its sum's backward then
    passes the gradient on without a negated (B, N, k, C) copy)."""
    lib = native_for(delta, key, query)
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
        _run(lib, "pt_aggregate_forward", dtype=value.dtype, B=b, N=n, K=idx.shape[-1], C=c,
             W=weight.shape[-1], w=weight, v=value, delta=delta, idx=idx, out=out)
        ctx.lib = lib
        ctx.save_for_backward(weight, value, delta, idx)
        return out

    @staticmethod
    def backward(ctx, grad):
        weight, value, delta, idx = ctx.saved_tensors
        grad = grad.contiguous()
        _, need_w, need_v, need_delta, _ = ctx.needs_input_grad
        grad_w = torch.empty_like(weight) if need_w else None
        grad_v = torch.zeros_like(value) if need_v else None
        grad_delta = torch.empty_like(delta) if need_delta else None
        if need_w or need_v or need_delta:
            b, n, c = value.shape
            _run(ctx.lib, "pt_aggregate_backward", dtype=value.dtype, B=b, N=n,
                 K=idx.shape[-1], C=c, W=weight.shape[-1], grad_out=grad, w=weight, v=value,
                 delta=delta, idx=idx, grad_w=grad_w, grad_delta=grad_delta, grad_v=grad_v)
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
    lib = native_for(value, weight, delta)
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
        _run(lib, "neighbour_max_forward", dtype=x.dtype, R=b * m, K=k, C=c, x=x, out=out,
             arg=arg)
        ctx.lib, ctx.k = lib, k
        ctx.save_for_backward(arg)
        return out

    @staticmethod
    def backward(ctx, grad):
        (arg,) = ctx.saved_tensors
        grad = grad.contiguous()
        b, m, c = grad.shape
        grad_x = grad.new_empty(b, m, ctx.k, c)
        _run(ctx.lib, "neighbour_max_backward", dtype=grad.dtype, R=b * m, K=ctx.k, C=c,
             grad_out=grad, arg=arg, grad_x=grad_x)
        return None, grad_x


def neighbour_max(x):
    """Max-pooling over the neighbour axis, (B, M, k, C) -> (B, M, C) (paper Fig. 4b). The C
    kernel's backward sends the gradient to the first maximal neighbour where amax's would
    share it among ties: they differ only at ties, which follow a ReLU as zeros whose gradient
    the ReLU drops (lib/ops/csrc/neighbour_max.c)."""
    lib = native_for(x)
    if lib is not None and x.dim() == 4 and x.shape[2] < 2 ** 31:  # int32 argmax
        return _NeighbourMax.apply(lib, x)
    return x.amax(dim=2)


# norm_relu_linear's C kernels beat BatchNorm + ReLU + GEMM up to this many channels; above,
# the per-row products (C x C / share_planes) are better left to the GEMM.
_NORM_RELU_LINEAR_MAX_CHANNELS = 64


class _NormReluLinear(torch.autograd.Function):
    """linear(relu(bn(x))) on (M, C) rows in two passes forward and two backward (C kernels,
    lib/ops/csrc/norm_relu_linear.c); keeps `bn`'s running statistics as bn(x) would."""

    @staticmethod
    def forward(ctx, lib, bn, x, gamma, beta, weight, bias):
        x, weight = x.contiguous(), weight.contiguous()
        (rows, channels), outputs = x.shape, weight.shape[0]
        if bn.training:
            sums = torch.empty(2, channels, dtype=torch.float64)
            _run(lib, "nrl_stats", dtype=x.dtype, M=rows, C=channels, x=x, sums=sums)
            mean = sums[0] / rows
            var = (sums[1] / rows - mean * mean).clamp_min(0)  # float64: no cancellation here
            _update_running_stats(bn, mean, var, rows)
        else:
            mean, var = bn.running_mean.double(), bn.running_var.double()
        rstd = torch.rsqrt(var + bn.eps)
        scale = gamma.detach().double() * rstd
        shift = beta.detach().double() - mean * scale
        mean, rstd, scale, shift = (t.to(x.dtype) for t in (mean, rstd, scale, shift))
        out = x.new_empty(rows, outputs)
        _run(lib, "nrl_forward", dtype=x.dtype, M=rows, C=channels, O=outputs, x=x, scale=scale,
             shift=shift, weight=weight, bias=bias.contiguous(), out=out)
        ctx.lib, ctx.training = lib, bn.training
        ctx.save_for_backward(x, gamma, weight, scale, shift, mean, rstd)
        return out

    @staticmethod
    def backward(ctx, grad_h):
        x, gamma, weight, scale, shift, mean, rstd = ctx.saved_tensors
        grad_h = grad_h.contiguous()
        (rows, channels), outputs = x.shape, weight.shape[0]
        given = dict(dtype=x.dtype, M=rows, C=channels, O=outputs, x=x, grad_h=grad_h,
                     scale=scale, shift=shift, mean=mean, rstd=rstd, weight=weight)
        sums = torch.empty(2 + outputs, channels, dtype=torch.float64)
        _run(ctx.lib, "nrl_backward_sums", sums=sums, **given)
        grad_beta, grad_gamma = sums[0], sums[1]  # sum of dy, sum of dy x_hat
        grad_x = None
        if ctx.needs_input_grad[2]:
            k1 = gamma.detach().double() * rstd.double()
            if ctx.training:  # the batch statistics' share of the gradient
                k2, k3 = k1 * grad_beta / rows, k1 * grad_gamma / rows
            else:
                k2 = k3 = torch.zeros_like(k1)
            k1, k2, k3 = (t.to(x.dtype) for t in (k1, k2, k3))
            grad_x = torch.empty_like(x)
            _run(ctx.lib, "nrl_backward_input", k1=k1, k2=k2, k3=k3, grad_x=grad_x, **given)
        return (None, None, grad_x, grad_gamma.to(x.dtype), grad_beta.to(x.dtype),
                sums[2:].to(x.dtype), grad_h.sum(0))


def norm_relu_linear(bn, linear, x):
    """linear(relu(bn(x))) for `bn` an nn.BatchNorm1d over the last axis and `linear` an
    nn.Linear, on (..., C) -> (..., O): the start of the PT layer's gamma, on the (B, N, k, C)
    relation. Fused in C where it pays (CPU, fp32/fp64, C <= 64, plain modules, no autocast);
    elsewhere batch_norm, ReLU and the Linear (and so the reference's plain forms)."""
    channels = x.shape[-1]
    lib = native_for(x)
    fused = (lib is not None and channels <= _NORM_RELU_LINEAR_MAX_CHANNELS
             and type(bn) is nn.BatchNorm1d and bn.affine and bn.track_running_stats
             and type(linear) is nn.Linear and linear.bias is not None
             and _unhooked(bn, linear)
             and x.dtype == bn.weight.dtype == linear.weight.dtype
             and not torch.is_autocast_enabled(x.device.type)
             and x.numel() // channels >= 2)
    if not fused:
        return linear(F.relu(batch_norm(bn, x), inplace=True))
    rows = x.reshape(-1, channels)
    out = _NormReluLinear.apply(lib, bn, rows, bn.weight, bn.bias, linear.weight, linear.bias)
    return out.view(*x.shape[:-1], -1)
