"""The Point Transformer layer's attention weights: softmax over the k neighbours of
gamma(relation) (paper Eq. 3), gamma = [BatchNorm(C), ReLU, Linear(C, W)], BatchNorm(W), ReLU,
Linear(W, W) with W = C / share_planes.

gamma's first module (ops.norm_relu_linear) runs as itself; the rest and the softmax work on
(B, N, k, W) tensors of 2 to 64 channels, where eager PyTorch's passes run far below memory
speed. The C kernel (lib/ops/csrc/attention_softmax.c) writes only the weights forward and
reads them and their gradient once per backward pass. `attention_weights` falls back to the
modules and torch's softmax wherever the kernel does not apply (see its doc); both give the
same values and gradients up to rounding (tests/test_ops_attention_softmax.py).
"""
import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

from lib.ops.dispatch import native_for, run_kernel
from lib.ops.fused import (_affine_statistics, _bf16_rows, _compute_dtype,
                           batch_norm_backward_terms, fusable_norm)
from lib.ops.layers import _unhooked

MAX_POINT_VALUES = 4096  # csrc/attention_softmax.c: a point's k x W values on the stack
# The kernel beats the modules and torch's softmax up to this many weights (2.2x at the
# presets' 4 and 8, forward and backward); from 16 the modules' passes run near memory speed
# and the kernel's W x W products per point, vectorised over k only, lose (0.3-0.5x at 16-64;
# bench/RESULTS.md, "What bounds the CPU targets").
MAX_WEIGHTS = 8


class _AttentionWeights(torch.autograd.Function):
    """softmax_k(linear(relu(bn(h)))) over (B, N, k, W) rows (bfloat16 ones computed in
    float32); keeps `bn`'s running statistics as bn(h) would."""

    @staticmethod
    def forward(ctx, lib, bn, h, gamma, beta, weight, bias):
        h = h.contiguous()
        b, n, k, width = h.shape
        mean, rstd, scale, shift = _affine_statistics(lib, bn, h.view(-1, width), gamma, beta)
        ctx.dtypes = weight.dtype, bias.dtype  # of the gradients to return
        compute = _compute_dtype(h.dtype)
        weight, bias = (t.detach().to(compute).contiguous() for t in (weight, bias))
        out = torch.empty_like(h)
        run_kernel(lib, "aw_forward", dtype=h.dtype, P=b * n, K=k, W=width, h=h, scale=scale,
                   shift=shift, weight=weight, bias=bias, out=out)
        ctx.lib, ctx.training = lib, bn.training
        ctx.save_for_backward(h, out, gamma, weight, scale, shift, mean, rstd)
        return out

    @staticmethod
    @once_differentiable  # the gradients come from kernels or out= products: no graph
    def backward(ctx, grad_w):
        h, w, gamma, weight, scale, shift, mean, rstd = ctx.saved_tensors
        b, n, k, width = h.shape
        rows = b * n * k
        given = dict(dtype=h.dtype, P=b * n, K=k, W=width, h=h, mean=mean, rstd=rstd)
        sums = torch.empty(3 * width + width * width, dtype=torch.float64)
        gy = torch.empty(h.shape, dtype=weight.dtype)  # BatchNorm's output gradient
        run_kernel(ctx.lib, "aw_backward_sums", scale=scale, shift=shift, weight=weight, w=w,
                   grad_w=grad_w.contiguous(), sums=sums, gy=gy, **given)
        grad_beta, grad_gamma = sums[:width], sums[width:2 * width]  # sum of gy, gy x_hat
        grad_weight = sums[2 * width:2 * width + width * width].view(width, width)
        grad_bias = sums[2 * width + width * width:]
        k1, k2, k3 = (t.to(weight.dtype) for t in batch_norm_backward_terms(
            gamma, rstd, grad_beta, grad_gamma, rows, ctx.training))
        grad_h = torch.empty_like(h)
        run_kernel(ctx.lib, "aw_backward_input", k1=k1, k2=k2, k3=k3, gy=gy, grad_h=grad_h, **given)
        return (None, None, grad_h, grad_gamma.to(gamma.dtype), grad_beta.to(gamma.dtype),
                grad_weight.to(ctx.dtypes[0]), grad_bias.to(ctx.dtypes[1]))


def _tail(gamma, hidden):
    """(BatchNorm1d, Linear) of gamma's tail when it is the layer's usual plain, unhooked
    [PointBatchNorm(W), ReLU, Linear(W, W)] and the kernel takes `hidden`, else None."""
    _, norm, relu, linear = gamma
    bn = getattr(norm, "bn", None)
    width = hidden.shape[-1]
    usual = (bn is not None and bn.num_features == width and type(relu) is nn.ReLU
             and type(linear) is nn.Linear and linear.bias is not None
             and linear.in_features == linear.out_features == width
             and fusable_norm(bn, hidden) and _unhooked(norm, relu, linear, bn)
             and (linear.weight.dtype == hidden.dtype
                  or _bf16_rows(hidden, linear.weight, linear.bias)))
    return (bn, linear) if usual else None


def attention_weights(gamma, relation):
    """softmax over the k neighbours (dim 2) of gamma(relation), relation (B, N, k, C)
    -> (B, N, k, W). gamma's tail and the softmax in the C kernel where it applies: CPU,
    float32 or float64 without autocast, or bfloat16 rows under CPU bf16 autocast, the layer's
    usual plain unhooked modules (not quantized, no SyncBatchNorm), W <= MAX_WEIGHTS,
    k W <= 4,096, a training-mode BatchNorm given at least two rows. Elsewhere gamma's modules
    run and torch's softmax after them."""
    if not (isinstance(gamma, nn.Sequential) and len(gamma) == 4 and _unhooked(gamma)):
        return gamma(relation).softmax(dim=2)
    hidden = gamma[0](relation)
    lib = native_for(hidden, bf16_rows=True)
    tail = None
    if (lib is not None and hidden.dim() == 4
            and 0 < hidden.shape[3] <= MAX_WEIGHTS
            and 0 < hidden.shape[2] * hidden.shape[3] <= MAX_POINT_VALUES):
        tail = _tail(gamma, hidden)
    if tail is None or (tail[0].training and hidden.numel() // hidden.shape[-1] < 2):
        for module in list(gamma)[1:]:
            hidden = module(hidden)
        return hidden.softmax(dim=2)
    bn, linear = tail
    return _AttentionWeights.apply(lib, bn, hidden, bn.weight, bn.bias, linear.weight,
                                   linear.bias)
