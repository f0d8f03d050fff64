"""Point Transformer (Zhao, Jiang, Jia, Torr, Koltun, ICCV 2021), read bottom-up: layer, block,
transitions, encoder, the segmentation and classification networks, then the presets.

Layout follows the official code (POSTECH-CVLab/point-transformer, PointTransformerSeg50) on
dense batches: xyz (B, N, 3), features (B, N, C) channels last, so every weight is an nn.Linear
on the last axis (all of them are what k-means quantization replaces). The first stage's input
is concat(xyz, feat), as the official code feeds concat(p, x) to its first layer.
"""
import torch
import torch.nn as nn

from lib import ops


class PointBatchNorm(nn.Module):
    """BatchNorm over the last (channel) axis of (..., C) tensors: (B, N, C), (B, N, k, C), (B, C).
    The BatchNorm1d is a child (not a base class) so `convert_sync_batchnorm` can swap it under
    DDP."""

    def __init__(self, channels):
        super().__init__()
        self.bn = nn.BatchNorm1d(channels)

    def forward(self, x):
        return ops.batch_norm(self.bn, x)


class NormReluLinear(nn.Module):
    """BatchNorm, ReLU, Linear on (..., C) -> (..., O), as one operation: on the PT layer's
    (B, N, k, C) relation, ops.norm_relu_linear keeps none of the intermediates."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.norm = PointBatchNorm(in_channels)
        self.linear = nn.Linear(in_channels, out_channels)

    def forward(self, x):
        return ops.norm_relu_linear(self.norm.bn, self.linear, x)


def linear_bn_relu(in_channels, out_channels, bias=False):
    """The LBR unit (Linear, BatchNorm, ReLU) that both Point Transformer and PCT are built of."""
    return nn.Sequential(nn.Linear(in_channels, out_channels, bias=bias),
                         PointBatchNorm(out_channels), nn.ReLU(inplace=True))


def mlp_head(in_channels, hidden, num_classes, dropout):
    """Classifier on a global feature (B, C): LBR + dropout per hidden width, then a Linear."""
    layers = []
    for width in hidden:
        layers += [linear_bn_relu(in_channels, width), nn.Dropout(dropout)]
        in_channels = width
    return nn.Sequential(*layers, nn.Linear(in_channels, num_classes))


def knn(k, support, query):
    """Neighbour indices (B, M, min(k, N)): a stage with fewer than k points uses all of them."""
    return ops.knn_query(min(k, support.shape[1]), support, query)[0]


class PointTransformerLayer(nn.Module):
    """Vector self-attention over the k nearest neighbours (paper Eq. 3):
    y_i = sum_j softmax_j(gamma(phi(x_i) - psi(x_j) + delta_ij)) * (alpha(x_j) + delta_ij),
    delta_ij = theta(p_i - p_j) (Eq. 4). As in the official code, gamma outputs C / share_planes
    weights, each shared by the share_planes channel groups of the value."""

    def __init__(self, channels, share_planes=8):
        super().__init__()
        if channels % share_planes:
            raise ValueError(f"point_transformer.py: channels {channels} not divisible by "
                             f"share_planes {share_planes}")
        self.share_planes = share_planes
        self.phi = nn.Linear(channels, channels)
        self.psi = nn.Linear(channels, channels)
        self.alpha = nn.Linear(channels, channels)
        # theta in Eq. 4: two linear layers with BN + ReLU between
        self.delta = nn.Sequential(nn.Linear(3, 3), PointBatchNorm(3), nn.ReLU(inplace=True),
                                   nn.Linear(3, channels))
        # gamma: BN-ReLU on the relation, then an MLP that reduces to C / share_planes weights
        weights = channels // share_planes
        self.gamma = nn.Sequential(NormReluLinear(channels, weights), PointBatchNorm(weights),
                                   nn.ReLU(inplace=True), nn.Linear(weights, weights))
        self.register_load_state_dict_pre_hook(_rename_gamma_keys)

    # gamma's Linears as policy files and quantized checkpoints written before gamma.0 became a
    # NormReluLinear name them (lib/quant/layers.py's layer_renames reads this)
    RENAMED_LAYERS = {"gamma.2": "gamma.0.linear", "gamma.5": "gamma.3"}

    def forward(self, xyz, x, idx):
        """xyz (B, N, 3), x (B, N, C), idx (B, N, k) neighbours of each point -> (B, N, C)."""
        # phi, psi and alpha project the N points, and the neighbours' rows are gathered
        # after: k times cheaper than projecting the neighbours.
        query, key, value = self.phi(x), self.psi(x), self.alpha(x)
        # Inference (eval mode, no gradients) can run all of what follows per point in one
        # pass, without the (B, N, k, *) tensors; None where it cannot (lib/ops/attention.py).
        out = ops.attention_inference(xyz, idx, query, key, value, self.delta, self.gamma,
                                      self.share_planes)
        if out is not None:
            return out
        delta = ops.position_encoding(self.delta, xyz, idx)  # (B, N, k, C)
        relation = ops.relation(delta, key, query, idx)  # (B, N, k, C)
        w = ops.attention_weights(self.gamma, relation)  # softmax_k gamma(.): (B, N, k, C/s)
        return ops.neighbour_sum(w, value, delta, idx, self.share_planes)


# gamma's parameters as checkpoints written before gamma.0 became a NormReluLinear name them:
# its BatchNorms, and its Linears (RENAMED_LAYERS)
_OLD_LINEAR_KEYS = {old + ".": new + "." for old, new in
                    PointTransformerLayer.RENAMED_LAYERS.items()}
_OLD_GAMMA_KEYS = {"gamma.0.": "gamma.0.norm.", "gamma.3.": "gamma.1.", **_OLD_LINEAR_KEYS}


def _rename_gamma_keys(module, state_dict, prefix, *_):
    """Loads such checkpoints, fp32 or quantized (their gamma.2 and gamma.5 are the Linears, with
    a weight or a codebook and indices; here gamma.2 is the ReLU, with no keys, and there is no
    gamma.5)."""
    old = tuple(prefix + key for key in _OLD_LINEAR_KEYS)
    if not any(key.startswith(old) for key in state_dict):
        return
    for key in [k for k in state_dict if k.startswith(prefix + "gamma.")]:
        rest = key[len(prefix):]
        old = next(o for o in _OLD_GAMMA_KEYS if rest.startswith(o))
        state_dict[prefix + _OLD_GAMMA_KEYS[old] + rest[len(old):]] = state_dict.pop(key)


class PointTransformerBlock(nn.Module):
    """Residual block (paper Fig. 4): linear-BN-ReLU, PT layer-BN-ReLU, linear-BN, + x, ReLU."""

    def __init__(self, channels, share_planes=8):
        super().__init__()
        self.linear1 = linear_bn_relu(channels, channels)
        self.transformer = PointTransformerLayer(channels, share_planes)
        self.bn2 = PointBatchNorm(channels)
        self.linear3 = nn.Linear(channels, channels, bias=False)
        self.bn3 = PointBatchNorm(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, xyz, x, idx):
        y = self.relu(self.bn2(self.transformer(xyz, self.linear1(x), idx)))
        return self.relu(self.bn3(self.linear3(y)) + x)


class TransitionDown(nn.Module):
    """FPS to N / stride points, group the k nearest input points with relative xyz, LBR, local
    max-pool (paper Fig. 4b). Stride 1 (first stage): an LBR on each point."""

    def __init__(self, in_channels, out_channels, stride, k):
        super().__init__()
        self.stride, self.k = stride, k
        extra = 3 if stride > 1 else 0  # relative xyz of the neighbours
        self.mlp = linear_bn_relu(in_channels + extra, out_channels)

    def forward(self, xyz, x):
        """xyz (B, N, 3), x (B, N, C) -> new_xyz (B, M, 3), features (B, M, C_out)."""
        if self.stride == 1:
            return xyz, self.mlp(x)
        m = max(1, xyz.shape[1] // self.stride)
        new_xyz = ops.gather(xyz, ops.farthest_point_sample(xyz, m))
        linear, norm, _ = self.mlp
        # mlp(group(xyz, x, new_xyz, idx)).amax(2) without building the (B, M, k, 3 + C) input
        # (lib/ops/edge.py)
        idx = knn(self.k, xyz, new_xyz)
        return new_xyz, ops.group_norm_relu_max(linear, norm.bn, xyz, x, new_xyz, idx)


class TransitionUp(nn.Module):
    """Decoder fusion (paper Fig. 4c): the coarse features through LBR, trilinearly (3-NN,
    inverse distance) interpolated onto the fine points, plus the skip features through LBR."""

    def __init__(self, coarse_channels, out_channels):
        super().__init__()
        self.skip = linear_bn_relu(out_channels, out_channels, bias=True)
        self.coarse = linear_bn_relu(coarse_channels, out_channels, bias=True)

    def forward(self, xyz, x, coarse_xyz, coarse_x):
        k = min(3, coarse_xyz.shape[1])  # the coarsest level of a small cloud may hold < 3
        up = ops.interpolate(coarse_xyz, xyz, self.coarse(coarse_x), k=k)  # (B, N, C_out)
        return self.skip(x) + up


class GlobalTransitionUp(nn.Module):
    """Top of the decoder (official code's head TransitionUp): each point's feature concatenated
    with a transform of the cloud's mean feature. `context_channels` extra per-cloud inputs (the
    part-segmentation category one-hot) join the mean feature: a per-shape quantity, like the
    mean, that the decoder then carries down to every point at every level."""

    def __init__(self, channels, context_channels=0):
        super().__init__()
        self.fuse = linear_bn_relu(2 * channels, channels, bias=True)
        # no BN: it would normalise over only B global vectors
        self.global_mlp = nn.Sequential(nn.Linear(channels + context_channels, channels),
                                        nn.ReLU(inplace=True))

    def forward(self, x, context=None):
        g = x.mean(dim=1)  # (B, C)
        if context is not None:
            g = torch.cat([g, context.to(g.dtype)], dim=-1)
        g = self.global_mlp(g).unsqueeze(1).expand_as(x)  # (B, N, C)
        return self.fuse(torch.cat([x, g], dim=-1))


class PointTransformerEncoder(nn.Module):
    """Stages of TransitionDown + PT blocks. The kNN of a stage depends only on its xyz, so it is
    computed once per stage and shared by all its blocks (and the decoder blocks at that level)."""

    def __init__(self, in_channels, widths, strides, ks, blocks, share_planes):
        super().__init__()
        if not len(widths) == len(strides) == len(ks) == len(blocks):
            raise ValueError("point_transformer.py: widths, strides, ks and blocks need one "
                             "entry per stage")
        self.ks = list(ks)
        self.down = nn.ModuleList()
        self.blocks = nn.ModuleList()
        prev = 3 + in_channels  # concat(xyz, feat)
        for width, stride, k, depth in zip(widths, strides, ks, blocks):
            self.down.append(TransitionDown(prev, width, stride, k))
            self.blocks.append(nn.ModuleList(
                PointTransformerBlock(width, share_planes) for _ in range(depth)))
            prev = width

    def forward(self, xyz, feat):
        """-> per stage (xyz (B, N_s, 3), features (B, N_s, C_s), kNN idx (B, N_s, k_s))."""
        x = torch.cat([xyz, feat], dim=-1)
        stages = []
        for down, blocks, k in zip(self.down, self.blocks, self.ks):
            xyz, x = down(xyz, x)
            idx = knn(k, xyz, xyz)
            for block in blocks:
                x = block(xyz, x, idx)
            stages.append((xyz, x, idx))
        return stages


class PointTransformerSeg(nn.Module):
    """U-Net of PT stages for per-point labels (paper Fig. 3, top). Semantic segmentation with
    num_categories = 0; part segmentation with the shape category's one-hot, which joins the
    global feature at the top of the decoder (GlobalTransitionUp)."""

    def __init__(self, in_channels, num_classes, *, widths, strides, ks, enc_blocks, dec_blocks,
                 share_planes, num_categories=0):
        super().__init__()
        if len(dec_blocks) != len(widths):
            raise ValueError("point_transformer.py: dec_blocks needs one entry per stage")
        self.num_categories = num_categories
        self.encoder = PointTransformerEncoder(in_channels, widths, strides, ks, enc_blocks,
                                               share_planes)
        self.top = GlobalTransitionUp(widths[-1], num_categories)
        # decoder stages listed fine to coarse, like the encoder; run coarse to fine
        self.up = nn.ModuleList(TransitionUp(widths[s + 1], widths[s])
                                for s in range(len(widths) - 1))
        self.dec_blocks = nn.ModuleList(
            nn.ModuleList(PointTransformerBlock(width, share_planes) for _ in range(depth))
            for width, depth in zip(widths, dec_blocks))
        self.head = nn.Sequential(linear_bn_relu(widths[0], widths[0], bias=True),
                                  nn.Linear(widths[0], num_classes))

    def forward(self, xyz, feat, category=None):
        """xyz (B, N, 3), feat (B, N, C_in), category (B,) int64 for part segmentation
        -> logits (B, N, num_classes)."""
        if (category is None) != (self.num_categories == 0):
            raise ValueError("point_transformer.py: pass `category` exactly when the model was "
                             "built with num_categories > 0")
        context = None
        if category is not None:
            context = nn.functional.one_hot(category, self.num_categories).float()  # (B, K)
        stages = self.encoder(xyz, feat)
        xyz_s, x, idx = stages[-1]
        x = self.top(x, context)
        for s in reversed(range(len(stages))):
            if s < len(stages) - 1:
                xyz_s, skip, idx = stages[s]
                x = self.up[s](xyz_s, skip, stages[s + 1][0], x)
            for block in self.dec_blocks[s]:
                x = block(xyz_s, x, idx)
        return self.head(x)


class PointTransformerCls(nn.Module):
    """Encoder, global average pooling, MLP head with dropout (paper Fig. 3, bottom)."""

    def __init__(self, in_channels, num_classes, *, widths, strides, ks, enc_blocks, share_planes,
                 head, dropout=0.5):
        super().__init__()
        self.encoder = PointTransformerEncoder(in_channels, widths, strides, ks, enc_blocks,
                                               share_planes)
        self.head = mlp_head(widths[-1], head, num_classes, dropout)

    def forward(self, xyz, feat):
        """xyz (B, N, 3), feat (B, N, C_in) -> logits (B, num_classes)."""
        x = self.encoder(xyz, feat)[-1][1]  # (B, N_last, C_last)
        return self.head(x.mean(dim=1))


# Presets (the networks take every size explicitly). `enc_blocks` counts PT blocks after each
# stage's TransitionDown: the official PointTransformerSeg50 depths [2, 3, 4, 6, 3] count the
# TransitionDown as the first unit.
# Parameter counts with in_channels=3 (python -m models; tests/test_models.py derives the
# paper ones by hand):
#   pt_seg (50 parts, 16 categories)  7,777,142    pt_seg_tiny     312,970
#   pt_semseg (13 classes)            7,767,729    pt_semseg_tiny  310,293
#   pt_cls (40 classes)               5,072,978    pt_cls_tiny     138,572
PAPER = dict(widths=(32, 64, 128, 256, 512), strides=(1, 4, 4, 4, 4), ks=(8, 16, 16, 16, 16),
             enc_blocks=(1, 2, 3, 5, 2), share_planes=8)
# trains on a 2-core CPU in minutes with 2048-point clouds
TINY = dict(widths=(16, 32, 64, 128), strides=(1, 4, 4, 4), ks=(8, 16, 16, 16),
            enc_blocks=(1, 1, 1, 1), share_planes=8)
SEG_PAPER = dict(PAPER, dec_blocks=(1, 1, 1, 1, 1))
SEG_TINY = dict(TINY, dec_blocks=(1, 1, 1, 1))
CLS_PAPER = dict(PAPER, head=(256, 128))
CLS_TINY = dict(TINY, head=(64,))
