"""Which form of each operation runs, and why: the one place that decides.

operation                CPU, "auto" backend                 CUDA, "auto"     else
farthest_point_sample    C (csrc/geometry.c): the exact      Triton           torch loop
                         loop, pruned on a kd-split from     (fps_triton.py)
                         4,096 points a cloud (*);
                         no C compiler: fpsample's FPS
knn_query                float32: C grid; float64 or         GEMM-ranked      GEMM-ranked
                         no C compiler: pykdtree
gather with a gradient   backward by cloud in C (csrc/       index_select     index_select
                         gather_rows.c), fp32/fp64; no C
                         compiler: sparse-matrix backward
relation, neighbour_sum  C (csrc/pt_layer.c)                 plain            plain
norm_relu_linear         C (csrc/norm_relu_linear.c),        the modules      the modules
                         up to 128 channels (fp64: 64,
                         bf16 rows: 32)
attention_weights        C (csrc/attention_softmax.c):       the modules,     the modules,
                         gamma's tail and the softmax, up    then softmax     then softmax
                         to 8 weights, fp32/fp64 without
                         autocast, plain unhooked modules
neighbour_max            C (csrc/neighbour_max.c)            amax             amax
relu_neighbour_max       ReLU after the max                  as CPU           ReLU, then max
norm_relu_max            max before BatchNorm (C kernels)    batch_norm,      batch_norm,
                         when every scale is >= 0            then the above   then the above
edge_linear,             per-point products, gathered        as CPU           cat + Linear
group_linear             (lib/ops/edge.py; any Linear whose
                         forward is nn.Linear's, unhooked)
group_norm_relu_max      inference: max of the gathered      group_linear,    group_linear,
                         per-point products first (C, csrc/  then             then
                         neighbour_max.c), if every BN       norm_relu_max    norm_relu_max
                         scale >= 0; training: group_linear,
                         then norm_relu_max
attention_inference      C (csrc/attention_inference.c):     None: the        None
                         eval mode, no gradients, the        layer runs
                         layer's usual modules, unhooked;    eagerly
                         fp32, fp64, or bf16 autocast
                         (bf16 rows, float32 arithmetic)
batch_norm               folded form up to 8 channels        BatchNorm1d      BatchNorm1d
                         (training bf16 rows: up to 4,
                         widened to float32)
position_encoding        C (csrc/position_encoding.c):       mlp on the       mlp on the
                         fp32/fp64 without autocast, theta   gathered         gathered
                         the layer's plain unhooked modules, differences      differences
                         xyz without a gradient
mlp                      one-GEMM backward for Linear(3, C)  the modules      the modules

(*) Both C forms pick the reference's points, ties included; the kernel chooses by cloud size
(FPS_TREE_MIN_POINTS in csrc/geometry.c). Sampling N / 4, the two were even on 2,048-point
objects (the plain loop stays there) and about even on 4,096, the pruned one 2-4x faster on
8,192 and 12x on an 80k-point room (30 instead of 384 ms; bench/RESULTS.md, "FPS").

"else" is the "reference" backend (`set_backend("reference")`, the benchmarks' plain-PyTorch
side) and any other device. There kNN is the GEMM-ranked form too, the fastest plain-PyTorch
kNN here: cdist's exact mode (geometry.knn_query_reference) is the tests' oracle, and took 8 s
for an 80k-point room on an H100 (geometry.knn_query_matmul). The C kernels take float32 and
float64 CPU tensors of one dtype with at most MAX_CHANNELS channels, and bfloat16 rows where
their callers say so (native_for's bf16_rows: the PT layer's training kernels and
attention_inference, under CPU bf16 autocast): those compute in float32, with float32
per-channel vectors, weights and scatter sums, and round each result once, so that it is the
float32 kernel's rounded to bf16; group_norm_relu_max, position_encoding and attention_weights
keep to float32 and float64. Modules with forward hooks (HAQ's recorder) and non-plain modules
(quantized, SyncBatchNorm) get the plain forms; edge_linear's and group_linear's forms are
plain PyTorch and read a Linear's `.weight`, so they take quantized Linears and autocast too;
attention_inference and group_norm_relu_max take quantized Linears (each weight is read once
per call). Every fast form gives the plain form's values and gradients up to rounding
(tests/test_ops_layers.py, tests/test_ops_geometry.py, tests/test_ops_edge.py,
tests/test_ops_attention.py, tests/test_ops_position.py, tests/test_ops_attention_softmax.py);
FPS and kNN give the same indices up to ties. `python -m lib.ops` prints what runs on this
machine.
"""
import torch

from lib.ops import fps_triton, native

MAX_CHANNELS = 4096  # csrc/parallel.h: rows of C values live on the kernels' stacks
NATIVE_DTYPES = {torch.float32: 0, torch.float64: 1}
# the kernels' dtype argument (csrc/parallel.h): bfloat16 (code 2) means bf16 rows around
# float32 arithmetic, which the callers that pass it arrange (native_for's bf16_rows)
KERNEL_DTYPE_CODES = {**NATIVE_DTYPES, torch.bfloat16: 2}
_BACKEND = "auto"


def set_backend(name):
    """"auto": the fast forms above; "reference": pure PyTorch everywhere."""
    global _BACKEND
    if name not in ("auto", "reference"):
        raise ValueError(f"unknown lib.ops backend {name!r}; use 'auto' or 'reference'")
    _BACKEND = name


def get_backend():
    return _BACKEND


def fast_cpu(*tensors):
    """The "auto" backend and every tensor on the CPU."""
    return _BACKEND == "auto" and all(t.device.type == "cpu" for t in tensors)


def fast_cuda(*tensors):
    return _BACKEND == "auto" and all(t.is_cuda for t in tensors)


def native_for(*tensors, bf16_rows=False):
    """The C kernels when they can take these tensors (fast CPU path, one float dtype they
    know, few enough channels), else None. bf16_rows: the caller's kernels also take bfloat16
    rows (computed in float32, their per-channel vectors and scatter sums float32)."""
    x = tensors[0]
    known = x.dtype in NATIVE_DTYPES or (bf16_rows and x.dtype == torch.bfloat16)
    if (not fast_cpu(*tensors) or not known or x.shape[-1] > MAX_CHANNELS
            or any(t.dtype != x.dtype for t in tensors)):
        return None
    return native.library()


def run_kernel(lib, name, **arguments):
    """lib.call(name, ...) for a kernel of the library native_for gave, its `dtype` argument a
    torch dtype (sent as its code); its failure status (csrc/parallel.h) as a one-line error."""
    dtype = KERNEL_DTYPE_CODES[arguments.pop("dtype")]
    status = lib.call(name, dtype=dtype, **arguments)
    if status == -1:
        raise MemoryError(f"lib/ops/csrc: {name}: out of memory for its partial sums")
    if status == -4:
        raise ValueError(f"lib/ops/csrc: {name}: no form for dtype code {dtype}")
    if status == -5:  # csrc/parallel.h's checked_index met one
        idx = arguments.get("idx")
        found = "" if idx is None else ": [{}, {}]".format(*(int(v) for v in idx.aminmax()))
        raise ValueError(f"lib/ops: neighbour index out of range{found} for clouds of "
                         f"{arguments['N']} points (lib/ops/csrc: {name})")
    if status:
        sizes = ", ".join(f"{k}={v}" for k, v in arguments.items() if isinstance(v, int))
        raise ValueError(f"lib/ops/csrc: {name}: shapes outside what the kernel takes ({sizes})")


def fps_form(xyz):
    if fast_cpu(xyz):
        return "native" if native.library() is not None else "fpsample"
    if _BACKEND == "auto" and fps_triton.available(xyz):
        return "triton"
    return "reference"


def knn_form(support, query):
    if fast_cpu(support, query):
        dtype = torch.promote_types(support.dtype, query.dtype)
        return "native" if native.library() is not None and dtype == torch.float32 else "kdtree"
    return "matmul"
