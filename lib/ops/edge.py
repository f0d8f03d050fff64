"""Linears on grouped neighbourhoods, without building the grouped input: PCT's neighbour
embedding (paper Sec. 3.3) and the Point Transformer's TransitionDown (paper Fig. 4b).

Linear([x_j - x_i, x_i]) = W_a x_j + (W_b - W_a) x_i + b for W = [W_a W_b] (edge_linear), and
Linear([p_j - p_i, x_j]) = (W_p p_j + W_x x_j + b) - W_p p_i for W = [W_p W_x] (group_linear):
the products run on the N points and the M centres, k times fewer rows than the grouped input
has, and the neighbours' products are gathered and combined with their centre's. The values
are the plain form's up to rounding, and so are the gradients (autograd carries them through
the same weight, which for a quantized layer is its codebook lookup). lib/ops/dispatch.py says
when these forms run.

group_norm_relu_max is TransitionDown's whole LBR and max-pool. In inference, with BatchNorm's
scales >= 0 (as they start), BatchNorm, ReLU and the subtraction of the centre's product are
non-decreasing per channel and so commute with the max: max_j of the gathered per-point
products is taken first (C kernel), and no (B, M, k, O) tensor is written at all.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from lib.ops import dispatch
from lib.ops.dispatch import run_kernel
from lib.ops.fused import fusable_norm, norm_relu_max
from lib.ops.geometry import gather, group
from lib.ops.layers import _unhooked, eval_scale_shift, no_gradient_wanted


def decomposes(linear):
    """The "auto" backend and a Linear that computes F.linear with its `.weight` (plain or
    quantized, lib/quant/layers.py) and that no hook watches: HAQ's recorder must see the
    grouped input it was built to measure."""
    return (dispatch.get_backend() == "auto" and isinstance(linear, nn.Linear)
            and type(linear).forward is nn.Linear.forward and _unhooked(linear))


def edge_linear(linear, x, centre_x, idx):
    """linear(cat([x[idx] - centre, centre])) for each centre and its k neighbours.
    x (B, N, C), centre_x (B, M, C) (the centres' own features), idx (B, M, k) into the N
    points -> (B, M, k, O), `linear` an nn.Linear(2 C, O)."""
    channels = x.shape[-1]
    if linear.in_features != 2 * channels or centre_x.shape[-1] != channels:
        raise ValueError(f"lib/ops: edge_linear of {channels} and {centre_x.shape[-1]} channels "
                         f"needs a Linear of {2 * channels} inputs, got {linear.in_features}")
    if not decomposes(linear):
        neighbours = gather(x, idx)  # (B, M, k, C)
        centre = centre_x.unsqueeze(2).expand_as(neighbours)
        return linear(torch.cat([neighbours - centre, centre], dim=-1))
    weight = linear.weight  # (O, 2 C); a quantized layer builds it once here
    w_neighbour, w_centre = weight[:, :channels], weight[:, channels:]
    per_point = F.linear(x, w_neighbour)  # (B, N, O)
    per_centre = F.linear(centre_x, w_centre - w_neighbour, linear.bias)  # (B, M, O)
    return gather(per_point, idx) + per_centre.unsqueeze(2)


def group_linear(linear, xyz, x, new_xyz, idx):
    """linear(group(xyz, x, new_xyz, idx)): the Linear on each neighbour's [p_j - p_i, x_j].
    xyz (B, N, 3), x (B, N, C), new_xyz (B, M, 3) the centres, idx (B, M, k) into the N points
    -> (B, M, k, O), `linear` an nn.Linear(3 + C, O)."""
    channels = x.shape[-1]
    if linear.in_features != 3 + channels:
        raise ValueError(f"lib/ops: group_linear of {channels} channels needs a Linear of "
                         f"{3 + channels} inputs, got {linear.in_features}")
    if not decomposes(linear):
        return linear(group(xyz, x, new_xyz, idx))
    per_point, per_centre = _point_and_centre_products(linear, xyz, x, new_xyz)
    # + (-centre), the same values as - centre: a subtraction's backward would negate the whole
    # (B, M, k, O) gradient before summing it over k; this way only the (B, M, O) sum is negated
    return gather(per_point, idx) + (-per_centre).unsqueeze(2)


def _point_and_centre_products(linear, xyz, x, new_xyz):
    """W_p p_j + W_x x_j + b on the N points (B, N, O) and W_p p_i on the M centres (B, M, O),
    for linear's W = [W_p W_x] and bias b: their difference is linear([p_j - p_i, x_j])."""
    weight = linear.weight  # (O, 3 + C); a quantized layer builds it once here
    per_point = F.linear(torch.cat([xyz, x], dim=-1), weight, linear.bias)
    per_centre = F.linear(new_xyz, weight[:, :3])
    return per_point, per_centre


def _gathered_max(lib, rows, idx):
    """max_j rows[b, idx[b, i, j]] per channel: rows (B, N, C), idx (B, M, k) -> (B, M, C)."""
    rows, idx = rows.contiguous(), idx.contiguous()
    (b, m, k), (n, c) = idx.shape, rows.shape[1:]
    out = rows.new_empty(b, m, c)
    run_kernel(lib, "gathered_max_forward", dtype=rows.dtype, B=b, N=n, M=m, K=k, C=c, x=rows,
               idx=idx, out=out)
    return out


def group_norm_relu_max(linear, bn, xyz, x, new_xyz, idx):
    """relu(bn(linear(group(xyz, x, new_xyz, idx)))) max-pooled over the k neighbours,
    (B, M, C_out): TransitionDown's LBR and max-pool, `bn` an nn.BatchNorm1d over the last axis.
    In inference (no gradients, `bn` in eval mode with every scale >= 0, the C kernels at hand)
    the max comes before everything but the per-point product (the module's doc); elsewhere
    group_linear, then norm_relu_max."""
    lib = dispatch.native_for(xyz, x, new_xyz)
    inference = (lib is not None and decomposes(linear) and fusable_norm(bn, x)
                 and not bn.training and idx.dtype == torch.int64 and idx.dim() == 3
                 and idx.numel() > 0 and xyz.shape[0] == x.shape[0] == new_xyz.shape[0]
                 == idx.shape[0] and new_xyz.shape[1] == idx.shape[1]
                 and linear.in_features == 3 + x.shape[-1]
                 and bn.num_features == linear.out_features and x.dtype == linear.weight.dtype)
    if inference:
        parameters = [*linear.parameters(), *bn.parameters()]
        inference = (no_gradient_wanted(xyz, x, new_xyz, *parameters)
                     and bool((bn.weight >= 0).all()))
    if not inference:
        return norm_relu_max(bn, group_linear(linear, xyz, x, new_xyz, idx))
    per_point, per_centre = _point_and_centre_products(linear, xyz, x, new_xyz)
    scale, shift = eval_scale_shift(bn)
    top = _gathered_max(lib, per_point, idx) - per_centre  # max_j of the grouped products
    return torch.addcmul(shift, top, scale).clamp_min_(0)
