"""lib/ops/layer_train.py's whole-layer training Function against the layer's modular forms:
the same output, gradients and running statistics up to rounding."""
import copy
from unittest import mock

import pytest
import torch

import lib.ops as ops
from lib.ops import native
from models.point_transformer import PointTransformerLayer


def _run(layer, xyz, x, idx, grad, fused):
    x = x.clone().requires_grad_(True)
    if fused:
        out = layer(xyz, x, idx)
    else:
        with mock.patch.object(ops, "attention_training", lambda *args: None):
            out = layer(xyz, x, idx)
    (out * grad).sum().backward()
    grads = {name: p.grad for name, p in layer.named_parameters()}
    return out.detach(), {**grads, "x": x.grad}, dict(layer.named_buffers())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels,share,k,clouds,points", [
    (32, 8, 16, 2, 64), (16, 8, 8, 3, 50), (64, 8, 16, 2, 40), (24, 4, 5, 1, 30)])
def test_the_whole_layer_function_equals_the_modular_forms(dtype, channels, share, k, clouds,
                                                          points):
    if native.library() is None:
        pytest.skip("no C kernels")
    torch.manual_seed(0)
    layer = PointTransformerLayer(channels, share_planes=share).to(dtype).train()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    xyz = torch.rand(clouds, points, 3, dtype=dtype)
    x = torch.randn(clouds, points, channels, dtype=dtype)
    idx = torch.randint(0, points, (clouds, points, k))
    grad = torch.randn(clouds, points, channels, dtype=dtype)
    assert ops.attention_training(xyz, idx, x, x, x, layer.delta, layer.gamma, share) is not None
    fused = _run(copy.deepcopy(layer), xyz, x, idx, grad, True)
    modular = _run(copy.deepcopy(layer), xyz, x, idx, grad, False)
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(fused[0], modular[0], rtol=tol, atol=tol)
    for name, g in modular[1].items():
        # theta's first bias feeds a training-mode BatchNorm: its gradient is rounding noise
        scale = max(g.abs().max().item(), 1.0)
        assert (fused[1][name] - g).abs().max().item() <= tol * scale, name
    for name, b in modular[2].items():
        torch.testing.assert_close(fused[2][name], b, rtol=tol, atol=tol)
