"""The Point Transformer's position encoding delta_ij = theta(p_i - p_j) (paper Eq. 4) over
every point's k neighbours, theta = Linear(3, 3), BatchNorm, ReLU, Linear(3, C).

In eager PyTorch that is a gather, a subtraction, a Linear, BatchNorm and ReLU on (B, N, k, 3)
tensors, whose 3-channel passes run far below memory speed, and a K = 3 GEMM; and as many passes
backward. The C kernel (lib/ops/csrc/position_encoding.c) reads the coordinates twice and
writes only delta forward, and reads delta's gradient once backward: every parameter's gradient
is a sum over the rows, which one pass gathers and which are combined here in float64.
`position_encoding` falls back to that eager chain wherever the kernel does not apply (see its
doc); both give the same values and gradients up to rounding (tests/test_ops_position.py).
"""
import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

from lib.ops.dispatch import MAX_CHANNELS, native_for, run_kernel
from lib.ops.fused import _affine, batch_norm_backward_terms, plain_norm
from lib.ops.geometry import gather
from lib.ops.layers import _unhooked, _update_running_stats, mlp

FIXED_SUMS = 30  # csrc/position_encoding.c: the backward's per-row sums before the C-wide ones


class _PositionEncoding(torch.autograd.Function):
    """theta(xyz_i - xyz_j) -> (B, N, k, C) rows of `rows_dtype` (xyz's, or bfloat16 under CPU
    bf16 autocast, computed in float32); gradients for theta's parameters only."""

    @staticmethod
    def forward(ctx, lib, bn, rows_dtype, xyz, idx, w1, b1, gamma, beta, w2, b2):
        xyz, idx = xyz.contiguous(), idx.contiguous()
        (b, n, k), channels = idx.shape, w2.shape[0]
        rows = b * n * k
        w1, b1, w2t, b2 = (t.detach().contiguous() for t in (w1, b1, w2.t(), b2))
        geometry = dict(B=b, N=n, K=k, xyz=xyz, idx=idx, w1=w1, b1=b1)
        if bn.training:
            sums = torch.empty(2, 3, dtype=torch.float64)
            run_kernel(lib, "pe_stats", dtype=xyz.dtype, sums=sums, **geometry)
            mean = sums[0] / rows
            var = (sums[1] / rows - mean * mean).clamp_min(0)  # float64: no cancellation here
            _update_running_stats(bn, mean, var, rows)
        else:
            mean, var = bn.running_mean.double(), bn.running_var.double()
        mean, rstd, scale, shift = (t.to(xyz.dtype) for t in _affine(bn, mean, var, gamma, beta))
        out = xyz.new_empty(b, n, k, channels, dtype=rows_dtype)
        run_kernel(lib, "pe_forward", dtype=rows_dtype, C=channels, scale=scale, shift=shift,
                   w2t=w2t, b2=b2, out=out, **geometry)
        ctx.lib, ctx.training = lib, bn.training
        ctx.save_for_backward(xyz, idx, w1, b1, w2t, gamma, scale, shift, mean, rstd)
        return out

    @staticmethod
    @once_differentiable  # the gradients come from kernels or out= products: no graph
    def backward(ctx, grad):
        xyz, idx, w1, b1, w2t, gamma, scale, shift, mean, rstd = ctx.saved_tensors
        grad = grad.contiguous()
        b, n, k, channels = grad.shape
        rows = b * n * k
        sums = torch.empty(FIXED_SUMS + 4 * channels, dtype=torch.float64)
        run_kernel(ctx.lib, "pe_backward_sums", dtype=grad.dtype, B=b, N=n, K=k, C=channels,
                   xyz=xyz, idx=idx, w1=w1, b1=b1, scale=scale, shift=shift, mean=mean, rstd=rstd,
                   w2t=w2t, grad=grad, sums=sums)
        # sums of gy (BatchNorm's output gradient), gy x_hat, x_hat, p; of gy p^T, x_hat p^T
        gy, gy_xhat, xhat, p = sums[0:3], sums[3:6], sums[6:9], sums[9:12]
        gy_p, xhat_p = sums[12:21].view(3, 3), sums[21:30].view(3, 3)
        # h's gradient is k1 gy - k2 - k3 x_hat per row (BatchNorm's backward), so W1's, a sum
        # of that times p^T over the rows, is this combination of the sums
        k1, k2, k3 = batch_norm_backward_terms(gamma, rstd, gy, gy_xhat, rows, ctx.training)
        grad_w1 = k1[:, None] * gy_p - k2[:, None] * p[None, :] - k3[:, None] * xhat_p
        grad_b1 = k1 * gy - k2 * rows - k3 * xhat
        grad_w2 = sums[FIXED_SUMS + channels:].view(3, channels).t()
        grad_b2 = sums[FIXED_SUMS:FIXED_SUMS + channels]
        dtype = w1.dtype
        return (None, None, None, None, None, grad_w1.to(dtype), grad_b1.to(dtype),
                gy_xhat.to(gamma.dtype), gy.to(gamma.dtype), grad_w2.to(dtype),
                grad_b2.to(dtype))


def _kernel_modules(theta, xyz, channels):
    """(Linear(3, 3), its BatchNorm1d, Linear(3, C)) when theta is the PT layer's usual plain,
    unhooked theta with parameters of xyz's dtype, else None."""
    if not (isinstance(theta, nn.Sequential) and len(theta) == 4):
        return None
    first, norm, relu, second = theta
    bn = getattr(norm, "bn", None)
    linears = (type(first) is nn.Linear and type(second) is nn.Linear
               and first.in_features == first.out_features == 3 and second.in_features == 3
               and second.out_features == channels
               and first.bias is not None and second.bias is not None)
    if not (linears and type(relu) is nn.ReLU and bn is not None and bn.num_features == 3
            and plain_norm(bn) and _unhooked(*theta)):
        return None
    parameters = (first.weight, first.bias, bn.weight, bn.bias, second.weight, second.bias)
    if any(p.dtype != xyz.dtype for p in parameters):
        return None
    return first, bn, second


def _rows_dtype(xyz):
    """The dtype of delta's rows that the modules would give: xyz's without autocast; under CPU
    bf16 autocast (`--amp`) bfloat16, for float32 points (the kernel computes in float32 and
    rounds once, where the modules round each of their outputs). None under other autocast."""
    if not torch.is_autocast_enabled("cpu"):
        return xyz.dtype
    bf16 = torch.get_autocast_dtype("cpu") == torch.bfloat16 and xyz.dtype == torch.float32
    return torch.bfloat16 if bf16 else None


def position_encoding(theta, xyz, idx):
    """theta(xyz_i - xyz_j) for xyz (B, N, 3) and each point's neighbours idx (B, N, k)
    -> (B, N, k, C). The C kernel where it applies: CPU, float32 or float64 (without autocast;
    float32 points under bf16 autocast give bf16 rows), xyz without a gradient, theta the usual
    plain unhooked modules (not quantized, no SyncBatchNorm), a training-mode BatchNorm given
    at least two rows. Elsewhere the modules run on the gathered differences
    (lib/ops/layers.mlp)."""
    channels = getattr(theta[-1], "out_features", 0) if isinstance(theta, nn.Sequential) else 0
    lib, rows_dtype = native_for(xyz), _rows_dtype(xyz)
    kernel = (lib is not None and rows_dtype is not None
              and xyz.dtype in (torch.float32, torch.float64)
              and not xyz.requires_grad and idx.dtype == torch.int64 and idx.dim() == 3
              and idx.numel() > 0
              and xyz.dim() == 3 and xyz.shape[2] == 3 and tuple(idx.shape[:2]) == xyz.shape[:2]
              and 0 < channels <= MAX_CHANNELS)
    modules = _kernel_modules(theta, xyz, channels) if kernel else None
    if modules is None or (modules[1].training and idx.numel() < 2):
        return mlp(theta, xyz.unsqueeze(2) - gather(xyz, idx))
    first, bn, second = modules
    return _PositionEncoding.apply(lib, bn, rows_dtype, xyz, idx, first.weight, first.bias,
                                   bn.weight, bn.bias, second.weight, second.bias)
