"""The Point Transformer layer's attention for training, as one autograd Function over C
kernels that keep its (B, N, k, C) tensors out of memory (lib/ops/csrc/pt_layer_train.c).

The modular forms (position_encoding, relation, norm_relu_linear, attention_weights,
neighbour_sum) each read and write (B, N, k, C) tensors: delta and the relation forward, their
gradients and their sum backward. On the first stages' clouds those tensors do not fit in the
cache, and a training step's kernels ran 3-8x slower than on warm inputs (bench/RESULTS.md,
"Where a pt_seg training step goes now"). Here each pass recomputes delta = theta(p_i - p_j)
and the relation from the points, the neighbour indices and the (B, N, C) rows, and only gamma's
(B, N, k, W) hidden rows and weights are stored; gamma's tail and the softmax are
attention_softmax's kernels, theta's parameter gradients position_encoding's sums.

`attention_training` returns None wherever this does not apply (see its doc), and the layer
runs the modular forms; both give the same values and gradients up to rounding
(tests/test_ops_layer_train.py).
"""
import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

from lib.ops.attention_softmax import MAX_POINT_VALUES, MAX_WEIGHTS, tail_backward, tail_forward
from lib.ops.dispatch import native_for, run_kernel
from lib.ops.fused import affine_from_sums, batch_norm_backward_terms, plain_norm
from lib.ops.layers import _unhooked
from lib.ops.position import FIXED_SUMS, _kernel_modules, theta_gradients, theta_statistics

# Rows of C values live on the kernels' stacks, a dozen of them per thread; gamma's first
# products (C x W per row) also stop paying above norm_relu_linear's float32 bound.
MAX_CHANNELS = 128


class _LayerTraining(torch.autograd.Function):
    """out_i = sum_j softmax_j(gamma(q_i - key_j + delta_ij)) * (v_j + delta_ij) with
    delta_ij = theta(xyz_i - xyz_j); gradients for q, key, v and every parameter of theta and
    gamma (xyz and idx get none). Keeps the four BatchNorms' running statistics as the modules
    would."""

    @staticmethod
    def forward(ctx, lib, norms, xyz, idx, query, key, value, w1, b1, t_gamma, t_beta, w2, b2,
                g_gamma, g_beta, g1w, g1b, h_gamma, h_beta, g2w, g2b):
        t_bn, g_bn, h_bn = norms
        xyz, idx, query, key, value = (t.contiguous() for t in (xyz, idx, query, key, value))
        (b, n, k), channels, width = idx.shape, value.shape[-1], g1w.shape[0]
        rows, dtype = b * n * k, value.dtype
        w1, b1, w2t, b2, g1w = (t.detach().contiguous() for t in (w1, b1, w2.t(), b2, g1w))
        g1b = g1b.detach()
        geometry = dict(B=b, N=n, K=k, xyz=xyz, idx=idx, w1=w1, b1=b1)
        t_mean, t_rstd, t_scale, t_shift = theta_statistics(lib, t_bn, geometry, t_gamma, t_beta)
        layer = dict(dtype=dtype, C=channels, W=width, t_scale=t_scale, t_shift=t_shift, w2t=w2t,
                     b2=b2, **geometry)
        sums = None
        if g_bn.training:
            sums = torch.empty(2, channels, dtype=torch.float64)
            run_kernel(lib, "lt_relation_stats", q=query, key=key, sums=sums, **layer)
        mean, rstd, scale, shift = affine_from_sums(g_bn, sums, rows, g_gamma, g_beta, dtype)
        hidden = value.new_empty(b, n, k, width)
        run_kernel(lib, "lt_hidden", q=query, key=key, scale=scale, shift=shift, g1w=g1w,
                   g1b=g1b, h=hidden, **layer)
        w, tail, ctx.tail_settings = tail_forward(lib, h_bn, hidden, h_gamma, h_beta, g2w, g2b)
        out = value.new_empty(b, n, channels)
        run_kernel(lib, "lt_aggregate", v=value, w=w, out=out, **layer)
        ctx.lib, ctx.training = lib, (t_bn.training, g_bn.training)
        ctx.dtypes = g1b.dtype, g_gamma.dtype
        ctx.tail_count = len(tail)
        ctx.save_for_backward(xyz, idx, query, key, value, w1, b1, w2t, b2, t_gamma, t_mean,
                              t_rstd, t_scale, t_shift, g_gamma, mean, rstd, scale, shift, g1w,
                              w, *tail)
        return out

    @staticmethod
    @once_differentiable  # the gradients come from kernels: no graph
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        (xyz, idx, query, key, value, w1, b1, w2t, b2, t_gamma, t_mean, t_rstd, t_scale,
         t_shift, g_gamma, mean, rstd, scale, shift, g1w, w) = saved[:-ctx.tail_count]
        tail = saved[-ctx.tail_count:]
        (b, n, k), channels, width = idx.shape, value.shape[-1], g1w.shape[0]
        rows, dtype = b * n * k, value.dtype
        t_training, g_training = ctx.training
        grad_out = grad_out.contiguous()
        layer = dict(dtype=dtype, B=b, N=n, K=k, C=channels, W=width, xyz=xyz, idx=idx, w1=w1,
                     b1=b1, t_scale=t_scale, t_shift=t_shift, w2t=w2t, b2=b2)
        grad_w = w.new_empty(w.shape)
        grad_value = torch.zeros_like(value)  # a scatter-add target
        run_kernel(ctx.lib, "lt_aggregate_backward", v=value, w=w, grad_out=grad_out,
                   grad_w=grad_w, grad_v=grad_value, **layer)
        grad_hidden, *tail_grads = tail_backward(ctx.tail_settings, tail, grad_w)
        norm_sums = torch.empty(2 + width, channels, dtype=torch.float64)
        run_kernel(ctx.lib, "lt_norm_sums", q=query, key=key, scale=scale, shift=shift,
                   mean=mean, rstd=rstd, g1w=g1w, grad_h=grad_hidden, sums=norm_sums, **layer)
        grad_g_beta, grad_g_gamma = norm_sums[0], norm_sums[1]  # sum of gy, gy x_hat
        k1, k2, k3 = (t.to(dtype) for t in batch_norm_backward_terms(
            g_gamma, rstd, grad_g_beta, grad_g_gamma, rows, g_training))
        grad_query = value.new_empty(value.shape)
        grad_key = torch.zeros_like(value)  # a scatter-add target
        theta_sums = torch.empty(FIXED_SUMS + 4 * channels, dtype=torch.float64)
        run_kernel(ctx.lib, "lt_relation_backward", t_mean=t_mean, t_rstd=t_rstd, q=query,
                   key=key, scale=scale, shift=shift, mean=mean, rstd=rstd, g1w=g1w, k1=k1,
                   k2=k2, k3=k3, grad_h=grad_hidden, w=w, grad_out=grad_out, grad_q=grad_query,
                   grad_key=grad_key, sums=theta_sums, **layer)
        theta_grads = theta_gradients(theta_sums, t_gamma, t_rstd, rows, t_training, w1.dtype)
        g1b_dtype, norm_dtype = ctx.dtypes
        return (None, None, None, None, grad_query, grad_key, grad_value, *theta_grads,
                grad_g_gamma.to(norm_dtype), grad_g_beta.to(norm_dtype),
                norm_sums[2:].to(g1w.dtype), grad_hidden.view(-1, width).sum(0).to(g1b_dtype),
                *tail_grads)


def _linear(m, inputs, outputs):
    """A plain nn.Linear with a bias, of this size."""
    return (type(m) is nn.Linear and m.in_features == inputs and m.out_features == outputs
            and m.bias is not None)


def _gamma_modules(gamma, channels, weights, dtype):
    """(BatchNorm(C), Linear(C, W), BatchNorm(W), Linear(W, W)) when gamma is the layer's usual
    [NormReluLinear(C, W), PointBatchNorm(W), ReLU, Linear(W, W)] of plain, unhooked modules
    with parameters of `dtype`, else None."""
    if not (isinstance(gamma, nn.Sequential) and len(gamma) == 4):
        return None
    first, norm, relu, last = gamma
    first_norm, g1 = getattr(first, "norm", None), getattr(first, "linear", None)
    g_bn, h_bn = getattr(first_norm, "bn", None), getattr(norm, "bn", None)
    modules = (g_bn, g1, h_bn, last)
    usual = (plain_norm(g_bn) and g_bn.num_features == channels and _linear(g1, channels, weights)
             and plain_norm(h_bn) and h_bn.num_features == weights and type(relu) is nn.ReLU
             and _linear(last, weights, weights)
             and _unhooked(gamma, *gamma, first_norm, *modules))
    if not usual or any(p.dtype != dtype for m in modules for p in m.parameters()):
        return None
    return modules


def attention_training(xyz, idx, query, key, value, theta, gamma, share_planes):
    """Paper Eq. 3 with delta = theta(p_i - p_j) for xyz (B, N, 3), idx (B, N, k), query, key,
    value (B, N, C) -> (B, N, C), as the layer's modular forms compute it; or None where the
    kernels do not apply: other than the CPU's "auto" backend, float32 or float64 without
    autocast (bfloat16 rows take the modular kernels), xyz wanting a gradient, theta and gamma
    other than the layer's usual plain unhooked modules (quantized, SyncBatchNorm, HAQ's
    recorder), more than 128 channels or 8 attention weights, k W > 4,096, a training-mode
    BatchNorm given fewer than two rows."""
    channels = value.shape[-1]
    weights = channels // share_planes
    lib = native_for(query, key, value, xyz)
    if (lib is None or torch.is_autocast_enabled("cpu") or idx.dtype != torch.int64
            or idx.dim() != 3 or xyz.requires_grad or channels > MAX_CHANNELS
            or channels % share_planes or not 0 < weights <= MAX_WEIGHTS):
        return None
    b, n, k = idx.shape
    if (tuple(xyz.shape) != (b, n, 3) or k * weights > MAX_POINT_VALUES or b * n * k < 2
            or any(tuple(t.shape) != (b, n, channels) for t in (query, key, value))):
        return None
    theta_modules = _kernel_modules(theta, xyz, channels)
    gamma_modules = _gamma_modules(gamma, channels, weights, value.dtype)
    if theta_modules is None or gamma_modules is None:
        return None
    t1, t_bn, t2 = theta_modules
    g_bn, g1, h_bn, g2 = gamma_modules
    return _LayerTraining.apply(lib, (t_bn, g_bn, h_bn), xyz, idx, query, key, value, t1.weight,
                                t1.bias, t_bn.weight, t_bn.bias, t2.weight, t2.bias, g_bn.weight,
                                g_bn.bias, g1.weight, g1.bias, h_bn.weight, h_bn.bias, g2.weight,
                                g2.bias)
