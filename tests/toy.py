"""A toy point-labelling task and a BatchNorm-free pointwise model: small and fast enough to run
the shared loop for several epochs inside a test, and exactly reproducible across DDP ranks."""
import torch
from torch import nn


class ToyPoints(torch.utils.data.Dataset):
    """Label = which third of [-1, 1] the point's x falls in; `jitter` draws from the global
    torch RNG per sample, so a resume that loses the RNG state changes the result."""
    task = "semseg"
    class_names = ["left", "middle", "right"]
    num_classes = 3
    in_channels = 3

    def __init__(self, n, num_points=32, jitter=0.0, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.xyz = torch.rand(n, num_points, 3, generator=g) * 2 - 1
        self.labels = torch.bucketize(self.xyz[..., 0].contiguous(), torch.tensor([-1 / 3, 1 / 3]))
        self.jitter = jitter

    def __len__(self):
        return len(self.xyz)

    def __getitem__(self, i):
        xyz = self.xyz[i] + self.jitter * torch.randn(self.xyz[i].shape)
        return {"xyz": xyz, "feat": xyz.clone(), "label": self.labels[i]}


class PointMLP(nn.Module):
    """batchnorm=True puts a BatchNorm1d over the hidden features of all points of the batch,
    so the result depends on which samples share a batch (what SyncBatchNorm must keep)."""

    def __init__(self, hidden=16, num_classes=3, batchnorm=False):
        super().__init__()
        self.inner = nn.Linear(6, hidden)
        self.norm = nn.BatchNorm1d(hidden) if batchnorm else nn.Identity()
        self.outer = nn.Linear(hidden, num_classes)

    def forward(self, xyz, feat):
        x = self.inner(torch.cat([xyz, feat], -1))  # (B, N, H)
        x = self.norm(x.reshape(-1, x.shape[-1])).view(x.shape)
        return self.outer(torch.relu(x))  # (B, N, K)
