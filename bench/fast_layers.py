"""lib/ops/layers.py, lib/ops/fused.py and geometry.py's sparse gather backward against the
plain PyTorch forms, one operation at a time, forward + backward (eval-mode BatchNorm: forward
only), at the sizes of a B=16 x 2048 Point Transformer step. The thresholds in lib/ops/layers.py
and lib/ops/fused.py come from this table. The fused C kernels (lib/ops/csrc/: "relation",
"neighbour_sum", "norm_relu_linear", "neighbour_max", "position_encoding", "attention_weights")
are timed where they replace several PyTorch operations; without a C compiler their fast column times the PyTorch forms. Cases
named *_bf16 time bfloat16 rows under CPU autocast (`--amp`), both forms: the kernels' bf16
forms and the widened few-channel BatchNorm against the plain forms in bf16.

    python bench/fast_layers.py --json /tmp/fast_layers.json    # about 45 s on a 2-core CPU
"""
import argparse
import json
import os
import statistics
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import compare, machine_info, on_path  # noqa: E402
from lib import ops  # noqa: E402
from lib.ops import layers as fast_layers  # noqa: E402

# (rows M = B N k, channels): delta's BN(3), gamma's BN(C/8) and BN(C) of the tiny/default nets
BN_SHAPES = [(262144, 2), (262144, 3), (131072, 4), (262144, 8), (262144, 16), (131072, 32),
             (131072, 64)]
# (B, N, k, C) of the value tensor; the weights have C/8 channels
SUM_SHAPES = [(16, 2048, 8, 16), (16, 2048, 8, 32), (16, 512, 16, 32), (16, 512, 16, 64),
              (16, 128, 16, 128)]
# (M, in, out) of delta's last Linear
LINEAR_SHAPES = [(262144, 3, 16), (262144, 3, 32), (131072, 3, 64), (32768, 3, 128)]
# (B, N, k, C) of a neighbour gather
GATHER_SHAPES = [(16, 2048, 8, 16), (16, 2048, 8, 32), (16, 512, 16, 64), (16, 128, 16, 128)]
# (B, N, k, C) of a PT layer's relation (weights: C/8 channels), tiny and default stages 0-2
LAYER_SHAPES = [(16, 2048, 8, 16), (16, 512, 16, 32), (16, 128, 16, 64), (16, 2048, 8, 32),
                (16, 512, 16, 64)]
# (B, M, k, C) of TransitionDown's max-pool, tiny and default stages 1-2
POOL_SHAPES = [(16, 512, 16, 32), (16, 128, 16, 64), (16, 512, 16, 64), (16, 128, 16, 128)]


def batch_norm_case(rows, channels, training, dtype=torch.float32):
    bn = nn.BatchNorm1d(channels).train(training)
    x = torch.randn(rows, channels, dtype=dtype, requires_grad=training)
    grad = torch.randn(rows, channels)

    def run(_amp):
        if training:
            x.grad = None
            fast_layers.batch_norm_rows(x, bn).backward(grad)
        else:
            with torch.no_grad():
                fast_layers.batch_norm_rows(x, bn)
    return run


def shared_sum_case(b, n, k, c):
    value = torch.randn(b, n, k, c, requires_grad=True)
    weight = torch.randn(b, n, k, c // 8, requires_grad=True)
    grad = torch.randn(b, n, c)
    return lambda _amp: fast_layers.shared_weight_sum(value, weight, 8).backward(grad)


def linear_case(rows, inputs, outputs):
    layers = nn.Sequential(nn.Linear(inputs, outputs))
    x = torch.randn(rows, inputs)
    grad = torch.randn(rows, outputs)
    return lambda _amp: fast_layers.mlp(layers, x).backward(grad)


def gather_case(b, n, k, c):
    features = torch.randn(b, n, c, requires_grad=True)
    idx = torch.randint(0, n, (b, n, k))
    grad = torch.randn(b, n, k, c)
    return lambda _amp: ops.gather(features, idx).backward(grad)


def attention_case(b, n, k, c, dtype=torch.float32):
    """relation and neighbour_sum together, as a PT layer calls them (gamma left out)."""
    delta, weight = (torch.randn(b, n, k, w, dtype=dtype, requires_grad=True) for w in (c, c // 8))
    key, query, value = (torch.randn(b, n, c, dtype=dtype, requires_grad=True) for _ in range(3))
    idx = torch.randint(0, n, (b, n, k))
    grads = torch.randn(b, n, k, c, dtype=dtype), torch.randn(b, n, c, dtype=dtype)

    def run(_amp):
        relation = ops.relation(delta, key, query, idx)
        out = ops.neighbour_sum(weight, value, delta, idx, 8)
        torch.autograd.backward((relation, out), grads)
    return run


def norm_relu_linear_case(b, n, k, c, dtype=torch.float32):
    from models.point_transformer import PointBatchNorm
    norm, linear = PointBatchNorm(c), nn.Linear(c, c // 8)
    x = torch.randn(b, n, k, c, dtype=dtype, requires_grad=True)
    grad = torch.randn(b, n, k, c // 8, dtype=dtype)
    return lambda _amp: ops.norm_relu_linear(norm.bn, linear, x).backward(grad)


def position_encoding_case(b, n, k, c):
    """delta = theta(p_i - p_j) of a PT layer in training, from the points and neighbours."""
    from models.point_transformer import PointTransformerLayer
    theta = PointTransformerLayer(c).delta
    xyz, idx = torch.randn(b, n, 3), torch.randint(0, n, (b, n, k))
    grad = torch.randn(b, n, k, c)
    return lambda _amp: ops.position_encoding(theta, xyz, idx).backward(grad)


def attention_weights_case(b, n, k, c):
    """softmax_k gamma(relation) of a PT layer in training: gamma's first BatchNorm-ReLU-Linear
    (norm_relu_linear on both paths' forms), its tail and the softmax."""
    from models.point_transformer import PointTransformerLayer
    gamma = PointTransformerLayer(c).gamma
    relation = torch.randn(b, n, k, c, requires_grad=True)
    grad = torch.randn(b, n, k, c // 8)
    return lambda _amp: ops.attention_weights(gamma, relation).backward(grad)


def neighbour_max_case(b, m, k, c, dtype=torch.float32):
    x = torch.relu(torch.randn(b, m, k, c, dtype=dtype)).requires_grad_()
    grad = torch.randn(b, m, c, dtype=dtype)
    return lambda _amp: ops.neighbour_max(x).backward(grad)


def under_autocast(run):
    """run(amp) with bfloat16 autocast on the CPU, as training with `--amp` has it."""
    def autocast_run(amp):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return run(amp)
    return autocast_run


def bf16_cases():
    """(name, run) of the bf16 forms: the few-channel BatchNorms and the C kernels."""
    bf16 = torch.bfloat16
    for rows, channels in BN_SHAPES:
        if channels <= 8:
            yield (f"batch_norm_train_{rows}x{channels}_bf16",
                   under_autocast(batch_norm_case(rows, channels, True, bf16)))
    for shape in LAYER_SHAPES:
        name = "x".join(map(str, shape))
        yield (f"relation_and_neighbour_sum_{name}_bf16",
               under_autocast(attention_case(*shape, dtype=bf16)))
        yield f"norm_relu_linear_{name}_bf16", under_autocast(norm_relu_linear_case(*shape, bf16))
    for shape in POOL_SHAPES:
        yield ("neighbour_max_" + "x".join(map(str, shape)) + "_bf16",
               under_autocast(neighbour_max_case(*shape, bf16)))


def cases():
    for rows, channels in BN_SHAPES:
        yield f"batch_norm_train_{rows}x{channels}", batch_norm_case(rows, channels, True)
        yield f"batch_norm_eval_{rows}x{channels}", batch_norm_case(rows, channels, False)
    for shape in SUM_SHAPES:
        yield "shared_weight_sum_" + "x".join(map(str, shape)), shared_sum_case(*shape)
    for shape in LINEAR_SHAPES:
        yield "linear_few_inputs_" + "x".join(map(str, shape)), linear_case(*shape)
    for shape in GATHER_SHAPES:
        yield "gather_backward_" + "x".join(map(str, shape)), gather_case(*shape)
    for shape in LAYER_SHAPES:
        name = "x".join(map(str, shape))
        yield "relation_and_neighbour_sum_" + name, attention_case(*shape)
        yield "norm_relu_linear_" + name, norm_relu_linear_case(*shape)
        yield "position_encoding_" + name, position_encoding_case(*shape)
        yield "attention_weights_" + name, attention_weights_case(*shape)
    for shape in POOL_SHAPES:
        yield "neighbour_max_" + "x".join(map(str, shape)), neighbour_max_case(*shape)


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", metavar="OUT", required=True)
    parser.add_argument("--repeats", type=int, default=7)
    return parser


def main(args):
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    results = {}
    print(f"{'operation':<42} {'fast ms':>9} {'plain ms':>9} {'speedup':>8}")
    for name, run in [*cases(), *bf16_cases()]:
        runs = {path: (lambda path=path: on_path(path, run)) for path in ("fast", "reference")}
        samples = compare(runs, {path: args.repeats for path in runs}, cpu)
        fast, plain = (statistics.median(samples[path]) * 1e3 for path in ("fast", "reference"))
        results[name] = {"fast_ms": fast, "plain_ms": plain, "speedup": plain / fast}
        print(f"{name:<42} {fast:9.2f} {plain:9.2f} {plain / fast:7.2f}x", flush=True)
    with open(args.json, "w") as f:
        json.dump({"machine": machine_info(cpu), "results": results}, f, indent=1)
    print("wrote", args.json)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
