"""The Point Transformer layer's attention run whole, per point, for inference (C kernel,
lib/ops/csrc/attention_inference.c).

In eval mode without gradients, the layer's eager forward (models/point_transformer.py) writes
five (B, N, k, *) tensors (delta, the relation, gamma's hidden rows, logits, weights) and reads
each back, where its inputs and output are (B, N, C) rows: on a 2,048-point cloud that traffic
is most of the network's inference time (HAQ scores every policy by such a forward pass). The
kernel keeps each point's k rows on its stack instead. BatchNorm in eval mode is a per-channel
affine map, folded here (in float64) into a scale and shift.

`attention_inference` returns None wherever the kernel does not apply (gradients wanted, any
module training or hooked, not the layer's usual structure, autocast other than CPU bf16, CUDA,
the reference backend, shapes beyond the kernel's bounds), and the layer runs eagerly; the
values agree with the eager forward up to rounding (tests/test_ops_attention.py). Under bf16
autocast the kernel reads and writes the bf16 rows autocast gives it and computes in float32,
where the eager layer would round every intermediate tensor to bf16.
"""
import weakref

import torch
import torch.nn as nn

from lib import derived
from lib.ops import native
from lib.ops.dispatch import MAX_CHANNELS, fast_cpu, native_for, run_kernel
from lib.ops.fused import running_affine
from lib.ops.layers import _unhooked, no_gradient_wanted

MAX_ROWS = 1 << 14  # csrc/attention_inference.c: k rows of C channels on the stack


def _plain_linear(m, inputs, outputs):
    """A Linear computing F.linear with its `.weight` (plain, or quantized: lib/quant/layers.py,
    whose weight property builds the dense weight) of the given size."""
    return (isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward
            and m.in_features == inputs and m.out_features == outputs)


def _eval_norm(m, channels):
    """The nn.BatchNorm1d inside a models.point_transformer.PointBatchNorm, in eval mode."""
    bn = getattr(m, "bn", None)
    return (type(bn) is nn.BatchNorm1d and not bn.training and bn.affine
            and bn.track_running_stats and bn.num_features == channels)


def _structure(theta, gamma, channels, weights):
    """(theta's modules, gamma's modules) when they are the layer's usual
    theta = Linear(3, 3), BN, ReLU, Linear(3, C) and
    gamma = [BN(C), ReLU, Linear(C, W)], BN(W), ReLU, Linear(W, W), else None."""
    if not (isinstance(theta, nn.Sequential) and isinstance(gamma, nn.Sequential)
            and len(theta) == 4 and len(gamma) == 4):
        return None
    first = gamma[0]
    first_norm, first_linear = getattr(first, "norm", None), getattr(first, "linear", None)
    usual = (_plain_linear(theta[0], 3, 3) and _eval_norm(theta[1], 3)
             and type(theta[2]) is nn.ReLU and _plain_linear(theta[3], 3, channels)
             and _eval_norm(first_norm, channels) and _plain_linear(first_linear, channels, weights)
             and _eval_norm(gamma[1], weights) and type(gamma[2]) is nn.ReLU
             and _plain_linear(gamma[3], weights, weights))
    if not usual:
        return None
    modules = [theta[0], theta[1].bn, theta[3], first_norm.bn, first_linear, gamma[1].bn,
               gamma[3]]
    return modules if _unhooked(*theta, *gamma, *modules) else None


def _bias(linear):
    return linear.bias if linear.bias is not None else linear.weight.new_zeros(linear.out_features)


# a layer's gamma -> (snapshot of its modules' tensors, (dtype, their eps), the kernel's weights)
_KEPT = weakref.WeakKeyDictionary()


def _kept_parameters(gamma, modules, dtype):
    """_parameters(modules, dtype), kept per layer until one of the modules' parameters or
    buffers changes: an evaluation (eval.py's split, a HAQ policy's ~13 batches) folds the same
    BatchNorms on every forward pass (4.5 ms of pt_seg's at B=8; the check costs 1.1)."""
    sources = [t for m in modules for t in (*m.parameters(recurse=False),
                                             *m.buffers(recurse=False))]
    settings = (dtype, *(getattr(m, "eps", None) for m in modules))
    kept = _KEPT.get(gamma)
    if kept is not None and kept[1] == settings and derived.unchanged(kept[0], sources):
        return kept[2]
    parameters = _parameters(modules, dtype)
    _KEPT[gamma] = (derived.snapshot(sources), settings, parameters)
    return parameters


@torch.no_grad()
def _parameters(modules, dtype):
    """The kernel's weights in `dtype`, contiguous; theta's second transposed, gamma's given
    as they are and transposed (csrc/attention_inference.c says why)."""
    t1, t_norm, t2, g_norm, g1, h_norm, g2 = modules
    ts, tt = running_affine(t_norm)
    gs, gt = running_affine(g_norm)
    hs, ht = running_affine(h_norm)
    named = dict(T1=t1.weight, tb1=_bias(t1), ts=ts, tt=tt, T2t=t2.weight.t(), tb2=_bias(t2),
                 gs=gs, gt=gt, G1=g1.weight, G1t=g1.weight.t(), gb1=_bias(g1), hs=hs, ht=ht,
                 G2=g2.weight, G2t=g2.weight.t(), gb2=_bias(g2))
    return {k: v.detach().to(dtype).contiguous() for k, v in named.items()}


def attention_inference(xyz, idx, query, key, value, theta, gamma, share_planes):
    """Paper Eq. 3 with delta = theta(p_i - p_j) (Eq. 4) and gamma's softmax over the k
    neighbours, for xyz (B, N, 3), idx (B, N, k), query = phi(x), key = psi(x), value = alpha(x)
    (B, N, C) -> (B, N, C); or None where the kernel does not apply (see the module's doc)."""
    channels = value.shape[-1]
    weights = channels // share_planes
    tensors = (xyz, query, key, value)
    lib, weight_dtype = _kernel_for(xyz, query, key, value)
    if (lib is None or weights < 1 or channels % share_planes or idx.dtype != torch.int64
            or idx.dim() != 3 or idx.shape[2] * channels > MAX_ROWS or channels > MAX_CHANNELS):
        return None
    b, n, k = idx.shape
    if (tuple(xyz.shape) != (b, n, 3) or any(tuple(t.shape) != (b, n, channels)
                                              for t in (query, key, value))):
        return None
    modules = _structure(theta, gamma, channels, weights)
    if modules is None:
        return None
    parameters = [p for m in modules for p in m.parameters(recurse=False)]
    if not no_gradient_wanted(*tensors, *parameters):
        return None
    out = value.new_empty(b, n, channels)
    run_kernel(lib, "pt_attention_inference", dtype=value.dtype, B=b, N=n, K=k, C=channels,
               W=weights, xyz=xyz.contiguous(), idx=idx.contiguous(), key=key.contiguous(),
               q=query.contiguous(), v=value.contiguous(), out=out,
               **_kept_parameters(gamma, modules, weight_dtype))
    return out


def _kernel_for(xyz, *rows):
    """(the C kernels, the dtype its weights are given in) for these tensors, or (None, None).
    Under CPU autocast in bfloat16 (`--amp`): q, k, v and the output in bf16, xyz, the weights
    and all arithmetic in float32. Otherwise: one dtype the kernels know, no autocast."""
    if torch.is_autocast_enabled("cpu"):
        bf16 = (torch.get_autocast_dtype("cpu") == torch.bfloat16 and fast_cpu(xyz, *rows)
                and xyz.dtype == torch.float32 and all(r.dtype == torch.bfloat16 for r in rows))
        return (native.library(), torch.float32) if bf16 else (None, None)
    lib = native_for(xyz, *rows)
    return lib, rows[0].dtype
