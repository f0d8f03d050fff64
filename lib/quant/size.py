"""Model size under a bit policy (DESIGN.md "Quantization"), in two ways:

- HAQ's budget: sum_l n_l * b_l bits over the quantizable layers, against 32 * sum_l n_l
  (layers kept fp32 count 32 bits); what `--preserve-ratio` constrains.
- The honest size: the bytes a packed file (pack.py) stores, i.e. ceil(n_l * b_l / 8) bytes of
  bit-packed indices plus a float32 codebook per quantized layer, plus every other state_dict
  entry in its own dtype (biases, layers kept fp32, norm parameters, running statistics and
  BatchNorm's int64 num_batches_tracked). A tied parameter is counted under each of its names,
  as the state_dict (and so the file) holds it.
"""
import math

import torch.nn as nn

from lib.checkpoint import unwrap
from lib.quant.layers import (FP32_BITS, check_policy, is_fp32, is_quantized_layer, n_weights,
                              named_quantizable, quantized_keys, state_key)

CODEBOOK_BYTES = 4  # centroids are stored as float32


def layer_bits(model_or_layers, policy=None):
    """[(name, n_weights, bits)] with fp32 as 32 bits: from `policy` when given, else from the
    model's quantized layers (a LayerInfo list without a policy is all fp32)."""
    if isinstance(model_or_layers, nn.Module):
        rows = [(name, n_weights(m), m.bits if is_quantized_layer(m) else FP32_BITS)
                for name, m in named_quantizable(model_or_layers)]
    else:
        rows = [(layer.name, layer.n_weights, FP32_BITS) for layer in model_or_layers]
    if policy is not None:
        check_policy(policy, [name for name, _, _ in rows], "size")
        rows = [(name, n, FP32_BITS if is_fp32(policy.get(name)) else int(policy[name]))
                for name, n, _ in rows]
    return rows


def budget_bits(model_or_layers, policy=None):
    """HAQ's size: sum_l n_l * b_l."""
    return sum(n * bits for _, n, bits in layer_bits(model_or_layers, policy))


def budget_ratio(model_or_layers, policy=None):
    """budget_bits / (32 * sum_l n_l): the fraction of the fp32 weights' size."""
    rows = layer_bits(model_or_layers, policy)
    return sum(n * bits for _, n, bits in rows) / (FP32_BITS * sum(n for _, n, _ in rows))


def stored_bytes(model):
    """{state_dict key: bytes it takes in a packed file}."""
    model = unwrap(model)
    index_bits, codebooks = quantized_keys(model)
    sizes = {}
    for key, tensor in model.state_dict().items():
        if key in index_bits:
            sizes[key] = math.ceil(tensor.numel() * index_bits[key] / 8)
        elif key in codebooks:
            sizes[key] = tensor.numel() * CODEBOOK_BYTES
        else:
            sizes[key] = tensor.numel() * tensor.element_size()
    return sizes


def honest_size_bytes(model):
    return sum(stored_bytes(model).values())


def fp32_size_bytes(model):
    """The same model's size with every quantized layer's weight dense in fp32."""
    model = unwrap(model)
    sizes = stored_bytes(model)
    for name, m in named_quantizable(model):
        if is_quantized_layer(m):
            for entry in ("codebook", "grid_scale", "grid_shift"):  # a grid has the last two
                sizes.pop(state_key(name, entry), None)
            sizes[state_key(name, "indices")] = n_weights(m) * 4
    return sum(sizes.values())


def size_report(model):
    """Per-layer table (name, n, bits, clusters, bytes) and the totals of both sizes."""
    model = unwrap(model)
    sizes = stored_bytes(model)
    rows, layer_bytes = [], 0
    for name, m in named_quantizable(model):
        if is_quantized_layer(m):
            stored = sizes[state_key(name, "indices")] + sizes[state_key(name, "codebook")]
            rows.append((name, n_weights(m), m.bits, m.codebook.numel(), stored))
        else:
            stored = sizes[state_key(name, "weight")]
            rows.append((name, n_weights(m), FP32_BITS, "-", stored))
        layer_bytes += stored
    honest, fp32 = sum(sizes.values()), fp32_size_bytes(model)
    width = max([len("layer")] + [len(r[0]) for r in rows])
    lines = [f"{'layer':<{width}} {'n':>10} {'bits':>4} {'clusters':>8} {'bytes':>12}"]
    lines += [f"{name:<{width}} {n:>10} {bits:>4} {clusters:>8} {stored:>12}"
              for name, n, bits, clusters, stored in rows]
    lines.append(f"{'other (biases, norms, buffers)':<{width + 26}}{honest - layer_bytes:>12}")
    lines.append(f"honest size {honest} bytes ({honest / 1024:.1f} KiB) = {honest / fp32:.4f} of "
                 f"fp32 {fp32} bytes; HAQ budget ratio {budget_ratio(model):.4f}")
    return "\n".join(lines)
