import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

from lib.quant import list_quantizable, quantize_model
from lib.quant.pack import is_packed, load_packed, pack_bits, save_packed, unpack_bits
from lib.quant.size import (budget_bits, budget_ratio, fp32_size_bytes, honest_size_bytes,
                            size_report)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 16, 1)  # 48 weights + 16 bias
        self.bn = nn.BatchNorm1d(16)  # weight, bias, running mean / var (16 each) + int64 counter
        self.fc = nn.Linear(16, 32, bias=False)  # 512 weights
        self.out = nn.Linear(32, 5)  # 160 weights + 5 bias

    def forward(self, x):  # (B, 3, L)
        x = self.bn(self.conv(x)).relu().mean(-1)  # (B, 16)
        return self.out(self.fc(x).relu())


def net():
    torch.manual_seed(0)
    model = Net()
    model.bn.running_mean.uniform_(-1, 1)  # non-trivial buffers, so a lost one shows
    model.bn.running_var.uniform_(0.5, 2)
    model.bn.num_batches_tracked.fill_(7)
    return model.eval()


def build(meta):
    assert meta["model"] == "Net"
    return Net()


POLICY = {"conv": 3, "fc": 2, "out": None}
X = torch.randn(4, 3, 10, generator=torch.Generator().manual_seed(1))


def test_budget_counts_n_times_bits_with_fp32_as_32():
    layers = list_quantizable(net())
    assert budget_bits(layers, POLICY) == 48 * 3 + 512 * 2 + 160 * 32
    assert budget_ratio(layers, POLICY) == pytest.approx((48 * 3 + 512 * 2 + 160 * 32) / (32 * 720))
    model = quantize_model(net(), POLICY)
    # a quantized model carries its own policy
    assert budget_bits(model) == budget_bits(layers, POLICY)
    assert budget_ratio(model) == budget_ratio(layers, POLICY)
    assert budget_ratio(net()) == 1.0
    with pytest.raises(ValueError, match="nope"):
        budget_bits(layers, {"nope": 4})


def test_honest_size_counts_packed_indices_codebooks_and_every_fp32_entry():
    model = quantize_model(net(), POLICY)
    conv_k, fc_k = model.conv.codebook.numel(), model.fc.codebook.numel()
    assert conv_k == 8 and fc_k == 4
    expected = (math.ceil(48 * 3 / 8) + conv_k * 4 + 16 * 4  # conv: indices, codebook, bias
                + math.ceil(512 * 2 / 8) + fc_k * 4  # fc: no bias
                + (160 + 5) * 4  # out kept fp32
                + 4 * 16 * 4 + 8)  # bn: weight, bias, running mean, var; num_batches_tracked
    assert honest_size_bytes(model) == expected
    fp32 = (48 + 16 + 512 + 160 + 5 + 4 * 16) * 4 + 8
    assert fp32_size_bytes(model) == fp32 == fp32_size_bytes(net()) == honest_size_bytes(net())


def test_size_report_lists_each_layer_and_both_totals():
    model = quantize_model(net(), POLICY)
    report = size_report(model)
    rows = {line.split()[0]: line.split() for line in report.splitlines()[1:4]}
    assert rows["conv"][1:] == ["48", "3", "8", str(18 + 32)]
    assert rows["fc"][1:] == ["512", "2", "4", str(128 + 16)]
    assert rows["out"][1:] == ["160", "32", "-", str(640)]
    assert f"honest size {honest_size_bytes(model)} bytes" in report
    assert f"fp32 {fp32_size_bytes(model)} bytes" in report


@pytest.mark.parametrize("bits", [1, 2, 3, 5, 7, 8, 9, 13, 16])
def test_bit_packing_round_trips_at_exactly_b_bits(bits):
    rng = np.random.default_rng(bits)
    for n in (1, 7, 1001):
        values = rng.integers(0, 2 ** bits, n)
        packed = pack_bits(values, bits)
        assert packed.dtype == np.uint8 and packed.size == math.ceil(n * bits / 8)
        assert np.array_equal(unpack_bits(packed.tobytes(), n, bits), values)


@pytest.mark.parametrize("method", ["kmeans", "linear"])
def test_packed_file_has_the_honest_size_and_loads_to_identical_outputs(tmp_path, method):
    model = quantize_model(net(), POLICY, method=method)
    path = str(tmp_path / "model.qpack")
    meta = {"model": "Net", "metrics": {"oa": np.float32(0.5)}, "epoch": 3}
    header_bytes = save_packed(path, model, meta)
    assert os.path.getsize(path) == honest_size_bytes(model) + header_bytes
    assert header_bytes < 4096
    assert os.listdir(tmp_path) == ["model.qpack"]  # no temp file left behind
    assert is_packed(path)
    loaded_meta, loaded = load_packed(path, build)
    assert loaded_meta == {"model": "Net", "metrics": {"oa": 0.5}, "epoch": 3}
    loaded.eval()
    for name in ("conv", "fc"):
        a, b = model.get_submodule(name), loaded.get_submodule(name)
        assert b.bits == a.bits and b.method == method
        assert torch.equal(b.codebook, a.codebook) and torch.equal(b.indices, a.indices)
        assert b.indices.dtype == torch.uint8
    assert isinstance(loaded.out.weight, nn.Parameter)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with torch.no_grad():
        assert (loaded(X) - model(X)).abs().max().item() == 0


def one_line_error(path, build_fn=build):
    with pytest.raises(ValueError) as info:
        load_packed(path, build_fn)
    message = str(info.value)
    assert "\n" not in message and message.startswith(path)
    return message


def test_bad_files_give_one_line_errors(tmp_path):
    model = quantize_model(net(), POLICY)
    good = str(tmp_path / "good.qpack")
    save_packed(good, model, {"model": "Net"})
    data = open(good, "rb").read()

    def variant(name, content):
        path = str(tmp_path / name)
        with open(path, "wb") as f:
            f.write(content)
        return path

    foreign = variant("foreign.pt", b"PK\x03\x04" + data[4:])
    assert not is_packed(foreign) and "magic" in one_line_error(foreign)
    assert "truncated" in one_line_error(variant("cut.qpack", data[:-10]))
    assert "truncated" in one_line_error(variant("cut_header.qpack", data[:30]))
    assert "trailing" in one_line_error(variant("long.qpack", data + b"\0"))
    header_start = 20
    corrupt = data[:header_start] + b"{" * 5 + data[header_start + 5:]
    assert "header" in one_line_error(variant("corrupt.qpack", corrupt))
    assert "magic" in one_line_error(variant("empty.qpack", b""))
    with pytest.raises(FileNotFoundError, match="missing.qpack"):
        load_packed(str(tmp_path / "missing.qpack"), build)
    assert not is_packed(str(tmp_path / "missing.qpack"))


def test_a_model_of_another_shape_is_a_one_line_error(tmp_path):
    path = str(tmp_path / "model.qpack")
    save_packed(path, quantize_model(net(), POLICY), {"model": "Net"})

    def wider(meta):
        model = Net()
        model.fc = nn.Linear(16, 33, bias=False)
        return model

    def no_out(meta):
        model = Net()
        del model.out
        return model

    assert "do not fit" in one_line_error(path, wider)
    assert "do not fit" in one_line_error(path, no_out)


def test_meta_must_be_json(tmp_path):
    with pytest.raises(ValueError, match="JSON"):
        save_packed(str(tmp_path / "m.qpack"), quantize_model(net(), POLICY), {"f": object()})
    assert os.listdir(tmp_path) == []


def test_checksum_catches_a_flipped_bit_and_version_1_files_still_load(tmp_path):
    """Every byte is covered (a flip in the header's numbers or in the payload would otherwise
    load as another model); files written before the checksum (version 1, no trailer) load."""
    from lib.quant.pack import DIGEST, PREFIX
    model = quantize_model(net(), POLICY)
    path = str(tmp_path / "m.qpack")
    save_packed(path, model, {"model": "Net", "metric": 0.5})
    data = open(path, "rb").read()
    for position in (data.index(b"0.5") + 2, len(data) - DIGEST - 3):  # header digit, payload
        flipped = bytearray(data)
        flipped[position] ^= 0x01
        assert "checksum" in one_line_error(variant_file(tmp_path, "flipped.qpack", flipped))
    magic, _, header_len = PREFIX.unpack_from(data)
    version_1 = PREFIX.pack(magic, 1, header_len) + data[PREFIX.size:-DIGEST]
    _, loaded = load_packed(variant_file(tmp_path, "v1.qpack", version_1), build)
    torch.testing.assert_close(loaded.eval()(X), model(X), rtol=0, atol=0)


def variant_file(folder, name, content):
    path = str(folder / name)
    with open(path, "wb") as f:
        f.write(bytes(content))
    return path
