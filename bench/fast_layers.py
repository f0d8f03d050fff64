"""lib/fast_layers.py and pointops' sparse gather backward against the plain PyTorch forms, one
operation at a time, forward + backward (eval-mode BatchNorm: forward only), at the sizes of a
B=16 x 2048 Point Transformer step. The thresholds in lib/fast_layers.py come from this table.

    python bench/fast_layers.py --json /tmp/fast_layers.json    # about 30 s on a 2-core CPU
"""
import argparse
import copy
import json
import os
import statistics
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import compare, machine_info, on_path  # noqa: E402
from lib import fast_layers, pointops  # noqa: E402

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


def batch_norm_case(rows, channels, training):
    bn = nn.BatchNorm1d(channels).train(training)
    x = torch.randn(rows, channels, requires_grad=training)
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
    return lambda _amp: pointops.gather(features, idx).backward(grad)


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


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="OUT", required=True)
    parser.add_argument("--repeats", type=int, default=7)
    return parser


def main(args):
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    results = {}
    print(f"{'operation':<42} {'fast ms':>9} {'plain ms':>9} {'speedup':>8}")
    for name, run in cases():
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
