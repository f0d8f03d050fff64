"""Values derived from tensors that are kept until those tensors change: a quantized layer's
dense weight (lib/quant/layers.py), the inference kernel's folded BatchNorm and transposed
weights (lib/ops/attention.py). An evaluation reads them on every forward pass, and computing
them afresh each time was a measurable part of one (bench/RESULTS.md).

A tensor counts as changed when it is another object, when its version counter moved (every
in-place write: an optimizer step, load_state_dict, a `.copy_`), or when its storage moved
(`.data` assigned, `.to()`/`.cuda()` on the module)."""


def snapshot(tensors):
    """What `unchanged` compares: each tensor with its version and storage address."""
    return [(t, t._version, t.data_ptr()) for t in tensors]


def unchanged(old, tensors):
    """Whether `tensors` are the same, unmodified tensors that `old` (a snapshot) recorded."""
    return len(old) == len(tensors) and all(
        a is t and version == t._version and pointer == t.data_ptr()
        for (a, version, pointer), t in zip(old, tensors))
