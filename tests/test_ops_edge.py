"""lib/ops/edge.py: edge_linear gives Linear(cat(x_j - x_i, x_i))'s values and gradients, for
plain and quantized Linears, and steps aside for hooked ones."""
import pytest
import torch
import torch.nn as nn

from lib import ops
from lib.quant import quantize_model

B, N, M, K, C, O = 2, 20, 6, 4, 5, 7


def problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, C, generator=g, dtype=torch.float64, requires_grad=True)
    centres = torch.stack([torch.randperm(N, generator=g)[:M] for _ in range(B)])  # (B, M)
    idx = torch.randint(N, (B, M, K), generator=g)
    return x, centres, idx


def cat_then_linear(linear, x, centres, idx):
    """The definition, with advanced indexing instead of lib.ops' gathers."""
    batch = torch.arange(B).view(B, 1, 1)
    neighbours = x[batch, idx]  # (B, M, k, C)
    centre = x[batch.view(B, 1), centres].unsqueeze(2).expand_as(neighbours)
    return linear(torch.cat([neighbours - centre, centre], dim=-1))


def outputs_and_grads(linear, x, centres, idx, form):
    x.grad = None
    linear.zero_grad()
    y = form(linear, x, centres, idx)
    y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y))
    return [y.detach(), x.grad.clone()] + [p.grad.clone() for p in linear.parameters()]


def edge(linear, x, centres, idx):
    return ops.edge_linear(linear, x, ops.gather(x, centres), idx)


@pytest.mark.parametrize("bias", [False, True])
def test_decomposed_form_matches_the_definition_in_float64(bias, monkeypatch):
    torch.manual_seed(0)
    linear = nn.Linear(2 * C, O, bias=bias).double()
    x, centres, idx = problem()
    expected = outputs_and_grads(linear, x, centres, idx, cat_then_linear)

    def grouped_forward(*args):
        raise AssertionError("the decomposed form must not run the Linear on the grouped input")
    monkeypatch.setattr(nn.Linear, "forward", grouped_forward)
    got = outputs_and_grads(linear, x, centres, idx, edge)
    for value, reference in zip(got, expected):
        torch.testing.assert_close(value, reference, rtol=1e-12, atol=1e-12)


def test_quantized_linear_gives_the_plain_forms_centroid_gradients():
    torch.manual_seed(0)
    layer = quantize_model(nn.Sequential(nn.Linear(2 * C, O).double()), {"0": 3})[0]
    x, centres, idx = problem(1)
    got = outputs_and_grads(layer, x, centres, idx, edge)
    ops.set_backend("reference")  # the plain cat + Linear, through the layer's own forward
    expected = outputs_and_grads(layer, x, centres, idx, edge)
    assert layer.codebook.grad is not None and layer.codebook.grad.abs().sum() > 0
    for value, reference in zip(got, expected):
        torch.testing.assert_close(value, reference, rtol=1e-12, atol=1e-12)


def test_a_hooked_linear_sees_the_grouped_input():
    """HAQ's recorder (lib/quant/layers.py list_quantizable) measures the (B, M, k, 2C) input."""
    linear = nn.Linear(2 * C, O).double()
    seen = []
    linear.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    x, centres, idx = problem(2)
    y = edge(linear, x, centres, idx)
    assert seen == [(B, M, K, 2 * C)]
    torch.testing.assert_close(y, cat_then_linear(linear, x, centres, idx))


def test_wrong_widths_are_one_line_errors():
    x, centres, idx = problem()
    with pytest.raises(ValueError, match="needs a Linear of 10 inputs, got 8"):
        edge(nn.Linear(8, O).double(), x, centres, idx)
