"""PCT: Point Cloud Transformer for classification (Guo et al., CVM 2021), read bottom-up:
sample-and-group, offset-attention, the network, then the presets.

Channels-last like the rest of the repository: xyz (B, N, 3), features (B, N, C), every weight
an nn.Linear. The input embedding reads concat(xyz, feat).
"""
import torch
import torch.nn as nn

from lib import ops
from models.point_transformer import linear_bn_relu, mlp_head


class SampleAndGroup(nn.Module):
    """SG layer (paper Sec. 3.3): FPS to `num_points` centres, their k nearest points, each
    neighbour's feature minus its centre's concatenated with the centre's, two LBRs, max-pool."""

    def __init__(self, in_channels, out_channels, num_points, k):
        super().__init__()
        self.num_points, self.k = num_points, k
        self.mlp = nn.Sequential(linear_bn_relu(2 * in_channels, out_channels),
                                 linear_bn_relu(out_channels, out_channels))

    def forward(self, xyz, x):
        """xyz (B, N, 3), x (B, N, C) -> new_xyz (B, M, 3), features (B, M, C_out)."""
        if xyz.shape[1] < max(self.num_points, self.k):
            raise ValueError(f"pct.py: a cloud of {xyz.shape[1]} points is smaller than the "
                             f"{max(self.num_points, self.k)} a sample-and-group layer needs")
        centres = ops.farthest_point_sample(xyz, self.num_points)  # (B, M)
        new_xyz = ops.gather(xyz, centres)
        idx = ops.knn_query(self.k, xyz, new_xyz)[0]  # (B, M, k)
        (linear, norm, relu), (linear2, norm2, _) = self.mlp
        # linear(cat(x_j - x_i, x_i)) without building that (B, M, k, 2C) input (lib/ops/edge.py)
        h = ops.edge_linear(linear, x, ops.gather(x, centres), idx)  # (B, M, k, C_out)
        h = linear2(relu(norm(h)))
        # the second LBR's BatchNorm and ReLU with the max-pool: one operation (lib/ops/fused.py)
        return new_xyz, ops.norm_relu_max(norm2.bn, h)


class OffsetAttention(nn.Module):
    """Offset-attention (paper Eq. 9-10): F_out = LBR(F_in - F_sa) + F_in. Query and key share
    their weights (one `qk` Linear, so the energy is symmetric); softmax over the last axis, then
    l1 normalisation over the first, as the released code, so that each output point's weights
    over the input points sum to 1."""

    def __init__(self, channels):
        super().__init__()
        self.qk = nn.Linear(channels, channels // 4, bias=False)
        self.v = nn.Linear(channels, channels)
        self.lbr = linear_bn_relu(channels, channels, bias=True)

    def forward(self, x):
        """x (B, N, C) -> (B, N, C)."""
        q = self.qk(x)  # (B, N, C/4)
        attention = torch.bmm(q, q.transpose(1, 2)).softmax(dim=-1)  # (B, N, N)
        attention = attention / (1e-9 + attention.sum(dim=1, keepdim=True))
        x_sa = torch.bmm(attention.transpose(1, 2), self.v(x))  # (B, N, C)
        return x + self.lbr(x - x_sa)


class PCTCls(nn.Module):
    """Input embedding (two LBRs, then two SG layers), four stacked offset-attention layers,
    concat of their outputs and their input, LBR to `fuse_channels`, max + average pooling,
    classification MLP (paper Fig. 2)."""

    def __init__(self, in_channels, num_classes, *, embed_channels, sg_points, sg_channels, k,
                 attention_layers, fuse_channels, head, dropout=0.5):
        super().__init__()
        self.embed = nn.Sequential(linear_bn_relu(3 + in_channels, embed_channels),
                                   linear_bn_relu(embed_channels, embed_channels))
        self.sg = nn.ModuleList()
        prev = embed_channels
        for num_points, width in zip(sg_points, sg_channels):
            self.sg.append(SampleAndGroup(prev, width, num_points, k))
            prev = width
        self.attention = nn.ModuleList(OffsetAttention(prev) for _ in range(attention_layers))
        self.fuse = linear_bn_relu((attention_layers + 1) * prev, fuse_channels)
        self.head = mlp_head(2 * fuse_channels, head, num_classes, dropout)

    def forward(self, xyz, feat):
        """xyz (B, N, 3), feat (B, N, C_in) -> logits (B, num_classes)."""
        x = self.embed(torch.cat([xyz, feat], dim=-1))
        for sg in self.sg:
            xyz, x = sg(xyz, x)
        outputs = [x]
        for layer in self.attention:
            outputs.append(layer(outputs[-1]))
        x = self.fuse(torch.cat(outputs, dim=-1))  # (B, M, fuse_channels)
        return self.head(torch.cat([x.amax(dim=1), x.mean(dim=1)], dim=-1))


# Presets; parameter counts with in_channels=3, 40 classes (python -m models):
#   pct_cls 3,268,264 (the paper's 2.88M is the released code: max-pooling only, and two more
#   LBRs before the attention layers)   pct_cls_tiny 433,640
PAPER = dict(embed_channels=64, sg_points=(512, 256), sg_channels=(128, 256), k=32,
             attention_layers=4, fuse_channels=1024, head=(512, 256))
TINY = dict(embed_channels=32, sg_points=(256, 128), sg_channels=(64, 128), k=16,
            attention_layers=4, fuse_channels=256, head=(128, 64))
