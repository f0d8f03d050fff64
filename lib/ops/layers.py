"""PyTorch re-formulations of the Point Transformer's small-channel operations.

A PT layer works on (B, N, k, C) tensors whose channel counts are often tiny (3 for the
relative positions, C / share_planes for the attention weights, 2 in the tiny config's first
stage), where PyTorch's broadcasting and BatchNorm kernels run 5-10x below memory speed
(bench/RESULTS.md). The forms here (BatchNorm over few channels, delta's Linear(3, C), the tiled
shared-weight sum) have wide inner loops instead; lib/ops/fused.py has the C-kernel forms.
lib/ops/dispatch.py says when each runs; elsewhere the plain modules run, which
tests/test_ops_layers.py checks these against, values and gradients.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from lib.ops import dispatch


def enabled(x):
    return dispatch.fast_cpu(x)


def _unhooked(*modules):
    """True when no forward hook would see these modules run: the fused forms compute with
    their weights directly, so a module with hooks (HAQ's input-size recorder,
    lib/quant/layers.py) runs as itself."""
    from torch.nn.modules import module as nn_module
    return not (nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks
                or any(m._forward_hooks or m._forward_pre_hooks for m in modules))


def no_gradient_wanted(*tensors):
    """True when autograd would record nothing computed from these tensors: the inference-only
    kernels (lib/ops/attention.py, edge.group_norm_relu_max) then may run."""
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


# Where the forms below beat PyTorch's (`python bench/fast_layers.py`, bench/RESULTS.md):
# training-mode BN is 4-14x faster up to 8 channels (with this limit lifted: as fast at 16-32,
# 1.5x slower at 64); eval-mode BN is faster on large inputs.
_FAST_TRAIN_CHANNELS = 8
_FAST_EVAL_ROWS = 4096
# bf16 rows with float32 parameters (CPU autocast) up to this many channels are widened to
# float32 for the form below: 2.9x PyTorch's mixed-dtype BatchNorm at 3 channels, 1.5x at 4,
# even at 8 (training, forward and backward, 128-256k rows; `python bench/fast_layers.py`)
_WIDEN_BF16_CHANNELS = 4
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
    @once_differentiable  # the gradients come from kernels or out= products: no graph
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


def eval_scale_shift(bn):
    """(scale, shift) with bn(x) = scale x + shift for `bn` (an affine nn.BatchNorm1d) in eval
    mode, in its parameters' dtype, differentiable in them."""
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


def batch_norm_rows(x, bn):
    """`bn` (an nn.BatchNorm1d) applied to (M, C) rows, as bn(x) computes it, running statistics
    included. Unusual set-ups (no affine, no running statistics, SyncBatchNorm, one row, mixed
    dtypes but few-channel bf16 rows in training) and the reference path go to `bn` itself."""
    usual = (enabled(x) and type(bn) is nn.BatchNorm1d and bn.affine and bn.track_running_stats
             and x.shape[0] >= 2)
    if (usual and bn.training and x.dtype == torch.bfloat16 and bn.weight.dtype == torch.float32
            and x.shape[1] <= _WIDEN_BF16_CHANNELS):
        return batch_norm_rows(x.float(), bn).to(x.dtype)
    if not usual or x.dtype != bn.weight.dtype:
        return bn(x)
    rows, channels = x.shape
    if not bn.training:
        if rows < _FAST_EVAL_ROWS:  # per-call overhead dominates small inputs
            return bn(x)
        scale, shift = eval_scale_shift(bn)
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
