"""Run as a script by tests/test_ops_native.py: each C kernel that reads neighbour indices is
given one written behind torch's back (through numpy, which torch's version counter does not
see, so lib/ops' cached Python check cannot), 2^40 rows past the tensor, where a read or a
scatter-write would crash the process. Prints one line per kernel: its error, or "no error".
A separate process, so that a kernel that lost its check fails the test instead of killing
pytest."""
import torch

from lib import ops
from lib.ops import native
from models.point_transformer import PointTransformerLayer, linear_bn_relu

B, N, K, C = 2, 20, 4, 16
FAR = 1 << 40


def behind(t):
    """t with its first entry set to FAR through numpy (torch does not see the write)."""
    t.numpy().reshape(-1)[0] = FAR
    return t


def inputs(grad=False):
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, N, (B, N, K), generator=gen)
    rows = [torch.randn(B, N, C, generator=gen, requires_grad=grad) for _ in range(3)]
    return idx, rows, torch.randn(B, N, K, C, generator=gen), torch.rand(B, N, K, C // 8)


def relation(backward):
    idx, (key, query, _), delta, _ = inputs(grad=backward)
    out = ops.relation(delta, key, query, idx)  # the Python check (if any) remembers idx
    if backward:
        behind(idx)
        out.sum().backward()
    else:
        ops.relation(delta, key, query, behind(idx))


def aggregate(backward):
    idx, (_, _, value), delta, weight = inputs(grad=backward)
    out = ops.neighbour_sum(weight, value, delta, idx, 8)
    if backward:
        behind(idx)
        out.sum().backward()
    else:
        ops.neighbour_sum(weight, value, delta, behind(idx), 8)


def position(mode):
    """mode: "train" (statistics, then the forward), "eval" (the forward only), "backward"."""
    idx, _, _, _ = inputs()
    xyz, theta = torch.rand(B, N, 3), PointTransformerLayer(C).delta.train(mode != "eval")
    out = ops.position_encoding(theta, xyz, idx)
    if mode == "backward":
        behind(idx)
        out.sum().backward()
    else:
        ops.position_encoding(theta, xyz, behind(idx))


def attention_inference():
    idx, (query, key, value), _, _ = inputs()
    xyz, layer = torch.rand(B, N, 3), PointTransformerLayer(C).eval()
    with torch.no_grad():
        args = (query, key, value, layer.delta, layer.gamma, 8)
        assert ops.attention_inference(xyz, idx, *args) is not None  # the kernel applies
        ops.attention_inference(xyz, behind(idx), *args)


def grouped_max():
    idx, (x, _, _), _, _ = inputs()
    xyz, linear, norm = torch.rand(B, N, 3), *linear_bn_relu(3 + C, 32)[:2]
    norm.eval()
    centres, idx = xyz[:, :5], idx[:, :5].clone()
    with torch.no_grad():
        ops.group_norm_relu_max(linear, norm.bn, xyz, x, centres, idx)
        ops.group_norm_relu_max(linear, norm.bn, xyz, x, centres, behind(idx))


def gather_backward():
    idx, (features, _, _), _, _ = inputs(grad=True)
    out = ops.gather(features, idx)  # its backward's kernel reads idx, as the forward saved it
    behind(idx)
    out.sum().backward()


CASES = {
    "pt_relation_forward": lambda: relation(False),
    "pt_relation_backward": lambda: relation(True),
    "pt_aggregate_forward": lambda: aggregate(False),
    "pt_aggregate_backward": lambda: aggregate(True),
    "pe_stats": lambda: position("train"),
    "pe_forward": lambda: position("eval"),
    "pe_backward_sums": lambda: position("backward"),
    "pt_attention_inference": attention_inference,
    "gathered_max_forward": grouped_max,
    "gather_rows_backward": gather_backward,
}

if __name__ == "__main__":
    assert native.library() is not None, "no C kernels"
    for kernel, case in CASES.items():
        try:
            case()
            print(f"{kernel}: no error", flush=True)
        except ValueError as err:
            print(f"{kernel}: {err}", flush=True)
