import copy

import pytest
import torch
import torch.nn as nn

from lib.quant import (KMeansCache, called_layers, dequantize, is_quantized_layer,
                       keep_first_last, list_quantizable, quantize_model, uniform_policy)
from lib.quant.layers import prepare_quantized, quant_state


class Scaled(nn.Linear):
    """A user subclass: exact-type matching (HAQ's) would silently skip it."""


class ConvNet(nn.Module):
    """Children registered in another order than the forward calls them."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(16 * 6, 5)
        self.blocks = nn.ModuleList([nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)])
        self.stem = nn.Conv1d(3, 8, 1)
        self.mix = Scaled(8, 16)
        self.unused = nn.Linear(4, 4)

    def forward(self, x):  # (B, 3, 12)
        x = self.stem(x).relu()  # (B, 8, 12)
        x = self.blocks[1](self.blocks[0](x.reshape(-1, 8, 3, 4))).relu()  # (B, 8, 3, 4)
        x = self.mix(x.flatten(2).transpose(1, 2))  # (B, 12, 16)
        return self.head(x[:, :6].flatten(1))  # (B, 5)


def conv_net():
    torch.manual_seed(0)
    return ConvNet()


def example():
    return (torch.randn(4, 3, 12, generator=torch.Generator().manual_seed(1)),)


def shared_weights(layer):
    return layer.centroids()[layer.indices.long()]


def test_fewer_distinct_values_than_clusters_quantizes_and_finetunes_finite():
    layer = nn.Linear(16, 12)  # 192 weights
    values = torch.tensor([-0.4, -0.1, 0.0, 0.3, 0.5])
    with torch.no_grad():
        layer.weight.copy_(values[torch.randint(5, (12, 16))])
    model = quantize_model(nn.Sequential(layer), {"0": 8})
    assert torch.equal(model[0].codebook.detach(), values)
    optimizer = torch.optim.SGD([model[0].codebook], lr=0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        x, target = torch.randn(32, 16, generator=g), torch.randn(32, 12, generator=g)
        loss = (model(x) - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    assert torch.isfinite(model[0].codebook).all()
    assert model[0].weight.unique().numel() <= 5


POLICY = {"stem": 2, "blocks.0": 3, "mix": 8, "head": 4}  # "unused" stays fp32


@pytest.mark.parametrize("method", ["kmeans", "linear"])
def test_weights_take_at_most_2_to_the_b_codebook_values_also_after_finetuning(method):
    model = quantize_model(conv_net(), POLICY, method=method)
    indices_before = {name: model.get_submodule(name).indices.clone() for name in POLICY}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(5):
        loss = model(*example()).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for name, bits in POLICY.items():
        layer = model.get_submodule(name)
        assert is_quantized_layer(layer) and layer.bits == bits
        values = layer.weight.detach().unique()
        assert values.numel() <= 2 ** bits
        assert torch.isin(values, layer.centroids().detach()).all()
        assert torch.equal(layer.indices, indices_before[name])  # indices never train
    assert not is_quantized_layer(model.unused)
    assert isinstance(model.unused.weight, nn.Parameter)


def test_centroid_gradient_is_the_per_cluster_mean_of_weight_gradients():
    torch.manual_seed(0)
    dense = nn.Conv1d(6, 10, 3)
    quantized = quantize_model(nn.Sequential(copy.deepcopy(dense)), {"0": 3})[0]
    with torch.no_grad():
        dense.weight.copy_(shared_weights(quantized))
    x = torch.randn(4, 6, 20)
    dense(x).sin().sum().backward()
    quantized(x).sin().sum().backward()
    flat = quantized.indices.long().reshape(-1)
    sums = torch.zeros_like(quantized.codebook).index_add_(0, flat, dense.weight.grad.reshape(-1))
    counts = torch.bincount(flat, minlength=quantized.codebook.numel())
    torch.testing.assert_close(quantized.codebook.grad, sums / counts, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(quantized.bias.grad, dense.bias.grad)


def sgd_steps(params, model, x, steps=3):
    """HAQ's fine-tune optimizer (SGD, momentum 0.9, weight decay 4e-5) on sin(model(x)).sum()."""
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=4e-5)
    for _ in range(steps):
        optimizer.zero_grad()
        model(x).sin().sum().backward()
        optimizer.step()


def test_sgd_on_centroids_is_haqs_dense_step_then_cluster_mean():
    # HAQ's fine-tune: an SGD step on the dense weights, then every weight set to its cluster's
    # mean. With the mean convention SGD on the centroids lands on the same weights, so a
    # centroid moves no further than a dense weight would (the sum moved one by up to 27% of
    # its codebook's range in a step at lr 1e-4).
    torch.manual_seed(0)
    dense = nn.Linear(256, 128)  # 32,768 weights in 8 clusters
    quantized = quantize_model(nn.Sequential(copy.deepcopy(dense)), {"0": 3})[0]
    flat = quantized.indices.long().reshape(-1)
    counts = torch.bincount(flat, minlength=quantized.codebook.numel())
    with torch.no_grad():
        dense.weight.copy_(shared_weights(quantized))
    x = torch.randn(32, 256)
    optimizer = torch.optim.SGD(dense.parameters(), lr=1e-3, momentum=0.9, weight_decay=4e-5)
    before = quantized.codebook.detach().clone()
    for _ in range(3):
        optimizer.zero_grad()
        dense(x).sin().sum().backward()
        optimizer.step()
        with torch.no_grad():  # HAQ's kmeans_update_model
            means = torch.zeros_like(before).index_add_(0, flat, dense.weight.reshape(-1)) / counts
            dense.weight.copy_(means[flat].reshape(dense.weight.shape))
    sgd_steps([quantized.codebook, quantized.bias], quantized, x)
    torch.testing.assert_close(shared_weights(quantized), dense.weight, rtol=0, atol=1e-6)
    moved = (quantized.codebook.detach() - before).abs().max()
    assert 0 < moved < 0.05 * (before.max() - before.min())


def test_linear_grid_stays_uniform_through_finetuning():
    model = quantize_model(conv_net(), POLICY, method="linear")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(5):
        loss = model(*example()).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for name, bits in POLICY.items():
        layer = model.get_submodule(name)
        levels = layer.centroids().detach().double()
        assert layer.grid_scale.item() != 1 and layer.grid_shift.item() != 0  # it trained
        # the levels used are codes of one grid: every gap a whole number of one step (to
        # float32 rounding; a grid trained as free centroids misses by a third of a step)
        gaps = levels.diff()
        steps = gaps / gaps.min()
        torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-3)
        assert steps.max() <= 2 ** bits - 1


def test_centroid_gradient_of_a_large_layer_is_the_same_every_time():
    # From 32,768 weights advanced indexing's backward adds in parallel in a varying order,
    # which made fine-tuning differ from run to run; the sums must not depend on the run.
    torch.manual_seed(0)
    layer = quantize_model(nn.Sequential(nn.Linear(256, 256)), {"0": 4})[0]  # 65,536 weights
    x = torch.randn(64, 256)
    grads = []
    for _ in range(10):
        layer.codebook.grad = None
        layer(x).sin().sum().backward()
        grads.append(layer.codebook.grad.clone())
    assert all(torch.equal(grads[0], g) for g in grads[1:])


@pytest.fixture(scope="module")
def trained_mlp():
    """A small MLP fitted for a few hundred steps to a smooth 2-D -> 3 map."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(512, 2, generator=g) * 4 - 2
    y = torch.stack([torch.sin(x[:, 0] * 2), x[:, 0] * x[:, 1], torch.cos(x.sum(1))], 1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                          nn.Linear(64, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: two threads on a busy 2-core machine took 130x longer
    try:
        for _ in range(300):
            loss = (model(x) - y).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    assert loss < 0.05  # it did learn
    return model, x


@pytest.mark.parametrize("method", ["kmeans", "linear"])
def test_eight_bits_match_fp32_and_two_bits_do_not(method, trained_mlp):
    model, x = trained_mlp
    with torch.no_grad():
        reference = model(x)

        def relative_error(bits):
            policy = uniform_policy(list_quantizable(model), bits)
            quantized = quantize_model(copy.deepcopy(model), policy, method=method)
            return float((quantized(x) - reference).norm() / reference.norm())

        assert relative_error(8) < 1e-2
        assert relative_error(2) > 1e-2


def test_list_quantizable_covers_every_layer_once_in_forward_order():
    model = conv_net()
    bn = model.blocks[1]
    stats = (bn.running_mean.clone(), bn.num_batches_tracked.clone())
    model.train()
    layers = list_quantizable(model, example())
    expected = [n for n, m in model.named_modules()
                if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    assert sorted(layer.name for layer in layers) == sorted(expected)
    assert [layer.name for layer in layers] == ["stem", "blocks.0", "mix", "head", "unused"]
    by_name = {layer.name: layer for layer in layers}
    stem, conv, mix = by_name["stem"], by_name["blocks.0"], by_name["mix"]
    assert (stem.kind, stem.input_size, stem.n_weights) == ("conv1d", 12, 24)
    assert (conv.kind, conv.kernel_size, conv.input_size) == ("conv2d", 9, 12)
    assert (mix.kind, mix.in_features, mix.input_size) == ("linear", 8, 12)
    assert by_name["head"].input_size == 1 and by_name["unused"].input_size == 0
    # the measuring forward changed no statistic and left the training flags as they were
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.num_batches_tracked, stats[1])
    assert all(m.training for m in model.modules())
    # without inputs: named_modules order; after quantization: the same layers and sizes
    assert [layer.name for layer in list_quantizable(model)] == expected
    quantize_model(model, POLICY)
    assert list_quantizable(model, example()) == layers


def test_quantization_keeps_module_names_and_stores_indices_compactly():
    model = conv_net()
    names = [n for n, _ in model.named_modules()]
    quantize_model(model, {"stem": 8, "mix": 10})
    assert [n for n, _ in model.named_modules()] == names
    state = model.state_dict()
    assert "stem.weight" not in state and "stem.codebook" in state and "stem.bias" in state
    assert state["stem.indices"].dtype == torch.uint8
    assert state["mix.indices"].dtype == torch.int16
    assert isinstance(model.mix, Scaled) and isinstance(model.mix, nn.Linear)
    assert "bits=8, clusters=" in repr(model.stem)  # what print(model) shows


def test_policy_errors_name_the_problem():
    with pytest.raises(ValueError, match="fc9.*not quantizable|not quantizable.*fc9"):
        quantize_model(conv_net(), {"fc9": 4, "stem": 4})
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="bits"):
            quantize_model(conv_net(), {"stem": bad})
    with pytest.raises(ValueError, match="method"):
        quantize_model(conv_net(), {"stem": 4}, method="pq")


def test_none_and_32_bits_stay_fp32():
    model = quantize_model(conv_net(), {"stem": None, "head": 32, "mix": 4})
    quantized = [is_quantized_layer(m) for m in (model.stem, model.head, model.mix)]
    assert quantized == [False, False, True]


def test_dequantize_gives_plain_layers_with_the_quantized_weights():
    model = quantize_model(conv_net(), POLICY).eval()
    with torch.no_grad():
        expected = model(*example())
    weights = {name: model.get_submodule(name).weight.detach().clone() for name in POLICY}
    dequantize(model)
    assert type(model.stem) is nn.Conv1d and type(model.mix) is Scaled
    assert set(model.state_dict()) == set(conv_net().state_dict())
    for name, weight in weights.items():
        assert torch.equal(model.get_submodule(name).weight, weight)
    with torch.no_grad():
        assert torch.equal(model(*example()), expected)


@pytest.mark.parametrize("method", ["kmeans", "linear"])
def test_the_weight_read_without_gradients_is_kept_until_its_sources_change(method):
    model = quantize_model(conv_net(), POLICY, method=method)
    layer = model.mix
    with torch.no_grad():
        first = layer.weight
        assert layer.weight is first  # kept: not looked up again
        assert torch.equal(first, shared_weights(layer))
        trained = layer.codebook if method == "kmeans" else layer.grid_scale
        trained.mul_(1.5)  # an optimizer step or a loaded state_dict writes in place
        assert torch.equal(layer.weight, shared_weights(layer))
        assert not torch.equal(layer.weight, first)
        layer.weight.zero_()  # a caller writing into the weight it was given
        assert torch.equal(layer.weight, shared_weights(layer))
        layer.indices.copy_(layer.indices.flip(0))
        assert torch.equal(layer.weight, shared_weights(layer))
    # with gradients on, the lookup is the autograd graph back to the centroids, every time
    assert layer.weight.grad_fn is not None and layer.weight is not layer.weight
    (model(*example()).square().sum()).backward()
    assert trained.grad is not None and torch.isfinite(trained.grad).all()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.mix.codebook.add_(1.0)  # the copy's weight is its own sources'
        assert torch.equal(twin.mix.weight, shared_weights(twin.mix))


def test_a_weight_read_in_inference_mode_serves_a_later_training_step():
    model = quantize_model(conv_net(), POLICY)
    with torch.inference_mode():
        model(*example())
    x = example()[0].requires_grad_()
    with torch.no_grad():  # kept from inference mode, used where autograd saves it
        kept = model.mix.weight
    assert not kept.is_inference()
    torch.nn.functional.linear(x.flatten(1)[:, :8], kept).sum().backward()
    assert x.grad is not None
    dequantize(model)
    assert "_dense_weight" not in model.mix.__dict__


def test_requantizing_and_deepcopy_work():
    model = quantize_model(conv_net(), POLICY)
    twin = copy.deepcopy(model)
    assert torch.equal(twin.mix.indices, model.mix.indices)
    assert twin.mix.codebook is not model.mix.codebook
    quantize_model(model, {"mix": 2})
    assert model.mix.bits == 2 and model.mix.codebook.numel() <= 4


def test_quant_state_rebuilds_a_quantized_model_from_a_state_dict():
    model = quantize_model(conv_net(), POLICY).eval()
    rebuilt = prepare_quantized(ConvNet(), quant_state(model)).eval()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(rebuilt(*example()), model(*example()))


def test_a_linear_state_dict_without_grid_entries_loads_as_the_plain_grid():
    model = quantize_model(conv_net(), POLICY, method="linear").eval()
    old = {k: v for k, v in model.state_dict().items() if "grid_" not in k}  # an older file
    rebuilt = prepare_quantized(ConvNet(), quant_state(model)).eval()
    with torch.no_grad():
        rebuilt.stem.grid_scale.fill_(3.0)
    rebuilt.load_state_dict(old, strict=True)
    with torch.no_grad():
        assert torch.equal(rebuilt(*example()), model(*example()))


def test_cache_serves_repeated_bit_widths():
    cache = KMeansCache()
    fp32 = conv_net()
    quantize_model(copy.deepcopy(fp32), POLICY, cache=cache)
    assert (cache.hits, cache.misses) == (0, 4)
    again = quantize_model(copy.deepcopy(fp32), dict(POLICY, head=5), cache=cache)
    assert (cache.hits, cache.misses) == (3, 5)
    fresh = quantize_model(copy.deepcopy(fp32), dict(POLICY, head=5))
    for name in POLICY:
        assert torch.equal(again.get_submodule(name).codebook, fresh.get_submodule(name).codebook)


def test_keep_first_last_sets_exactly_the_first_and_last_layer_the_forward_calls():
    """ConvNet defines its head first and an unused Linear last: the layers kept are the stem
    and the head as the forward calls them (the unused one was kept as the "last" layer)."""
    layers = list_quantizable(conv_net(), example())
    policy = uniform_policy(layers, 4)
    assert policy == {layer.name: 4 for layer in layers}
    kept = keep_first_last(policy, layers, 8)
    assert kept == dict(policy, stem=8, head=8)
    assert policy["stem"] == 4  # the input policy is not modified
    assert keep_first_last({}, layers, None) == {"stem": None, "head": None}
    # HAQ searches the called layers alone, in call order
    assert [layer.name for layer in called_layers(layers)] == ["stem", "blocks.0", "mix", "head"]
    # without example inputs the order is named_modules' and every layer counts as called
    assert keep_first_last({}, list_quantizable(conv_net()), 8) == {"head": 8, "unused": 8}


def test_point_transformer_tiny_quantizes():
    models = pytest.importorskip("models")
    model = models.build_model("pt_seg_tiny", in_channels=3, num_classes=50, num_categories=16)
    model.eval()
    g = torch.Generator().manual_seed(0)
    inputs = (torch.rand(1, 64, 3, generator=g), torch.randn(1, 64, 3, generator=g),
              torch.tensor([3]))
    layers = list_quantizable(model, inputs)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert sorted(layer.name for layer in layers) == sorted(linears)
    assert all(layer.input_size > 0 for layer in layers)
    with torch.no_grad():
        reference = model(*inputs)
        quantize_model(model, keep_first_last(uniform_policy(layers, 8), layers, None))
        out = model(*inputs)
    assert torch.isfinite(out).all()
    assert float((out - reference).norm() / reference.norm()) < 0.05
