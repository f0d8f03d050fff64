"""PCT's neighbour embedding (paper Sec. 3.3): a Linear on each neighbour's feature minus its
centre's, concatenated with the centre's, without building that (B, M, k, 2C) input.

Linear([x_j - x_i, x_i]) = W_a x_j + (W_b - W_a) x_i + b for W = [W_a W_b]: the two products
run on the N points and the M centres, k times fewer rows than the grouped input has, and the
neighbours' products are gathered and added to their centre's. The values are the plain form's
up to rounding, and so are the gradients (autograd carries them through the same weight, which
for a quantized layer is its codebook lookup). lib/ops/dispatch.py says when this form runs.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from lib.ops import dispatch
from lib.ops.geometry import gather
from lib.ops.layers import _unhooked


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
