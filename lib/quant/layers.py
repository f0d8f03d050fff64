"""Weight-shared layers (Deep Compression, Han et al. ICLR 2016, Sec. 3): applying a per-layer
bit policy to any nn.Module, undoing it, and listing the layers a policy can address.

A quantized layer is the same nn.Linear / nn.Conv1d / nn.Conv2d object with its `weight`
Parameter replaced by a `codebook` (K,) and a fixed `indices` buffer shaped like the weight
(uint8 up to 8 bits). Its class becomes a subclass whose `weight` is the property
`centroids()[indices]`, the way torch.nn.utils.parametrize swaps classes, so:
- the layer's own forward, and any code that reads `.weight` (nn.MultiheadAttention reads
  `out_proj.weight`), runs unchanged, and isinstance(layer, nn.Linear) still holds;
- the indices stay fixed; the layer keeps its name in `named_modules()`, and its state_dict
  holds `codebook`, `indices` and, as before, `bias`;
- read without gradients (evaluation), the dense weight is kept and served again until the
  codebook, grid or indices change (version counters, checked on each read), so an eval
  forward costs what the fp32 model's does; with gradients it is looked up on every read.

What trains depends on the method. k-means ("kmeans"): the codebook itself is the Parameter,
each centroid free. Uniform grid ("linear"): the codebook is a fixed buffer and the Parameters
are a scale and a shift of it, `centroids = grid_scale * codebook + grid_shift`, so the levels
stay equally spaced through any optimizer (a grid trained as free centroids stopped being one).

Gradient convention: every shared parameter gets the *mean* of the gradients it would get per
weight it stands for (a centroid: the mean over its weights, HAQ's rule; the grid's scale and
shift: the mean over the layer's weights). With SGD a centroid then moves exactly as HAQ's
fine-tune moves it (a dense SGD step, then each weight set to its cluster's mean), and a
learning rate that suits dense weights suits centroids; the sum (the loss's true gradient,
Deep Compression's Eq. 3) scales a centroid's step with its cluster's size, which SGD turns
into jumps across the codebook. Adam(W) divides each parameter's gradient by its own running
magnitude, so for it the two conventions differ only through eps.
"""
from dataclasses import dataclass
from math import prod
from numbers import Integral

import torch
import torch.nn as nn

from lib import derived
from lib.checkpoint import unwrap
from lib.quant.kmeans import METHODS, cluster, index_dtype

KINDS = {nn.Linear: "linear", nn.Conv1d: "conv1d", nn.Conv2d: "conv2d"}
QUANTIZABLE = tuple(KINDS)
FP32_BITS = 32


class _CodebookLookup(torch.autograd.Function):
    """codebook[indices], whose backward gives each centroid the mean gradient of its weights
    (the module's docstring says why), or with mean=False their sum. The per-centroid sums use
    bincount on the CPU (in float64): advanced indexing's backward (index_put_ with accumulate)
    adds in parallel from 32,768 weights on, in a different order every time, and fine-tuning
    then differed from run to run. Elsewhere index_add_: bincount's output size would need a
    host sync on a GPU."""

    @staticmethod
    def forward(ctx, codebook, indices, mean):
        ctx.save_for_backward(indices)
        ctx.num_codes, ctx.mean = codebook.numel(), mean
        return codebook[indices]

    @staticmethod
    def backward(ctx, grad):
        (indices,) = ctx.saved_tensors
        flat_indices, flat_grad = indices.reshape(-1), grad.reshape(-1)
        if grad.device.type == "cpu":
            sums = torch.bincount(flat_indices, weights=flat_grad.double(),
                                  minlength=ctx.num_codes)
            if ctx.mean:
                sums /= torch.bincount(flat_indices, minlength=ctx.num_codes).clamp_min(1)
            return sums.to(grad.dtype), None, None
        sums = grad.new_zeros(ctx.num_codes).index_add_(0, flat_indices, flat_grad)
        if ctx.mean:
            counts = torch.zeros_like(sums, dtype=torch.int64).index_add_(
                0, flat_indices, torch.ones_like(flat_indices))  # exact integer counts
            sums /= counts.clamp_min(1)
        return sums, None, None


class _MeanOver(torch.autograd.Function):
    """Identity whose backward divides the gradient by `n`: a grid parameter's gradient as the
    mean over the n weights it moves."""

    @staticmethod
    def forward(ctx, x, n):
        ctx.n = n
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad / ctx.n, None


class WeightShared:
    """Mixin of the quantized classes: the weight is looked up from the codebook."""

    def centroids(self):
        """The K values the weights take: the codebook, or for a grid its scaled and shifted
        levels (gradients flow back to the grid's scale and shift)."""
        if self.method != "linear":
            return self.codebook
        n = self.indices.numel()
        return _MeanOver.apply(self.grid_scale, n) * self.codebook + _MeanOver.apply(self.grid_shift, n)

    @property
    def weight(self):
        """The dense weight. With gradients on, looked up afresh (the lookup is what carries
        them back to the centroids). Without (evaluation), looked up once and kept until the
        codebook, grid or indices change: every forward would otherwise widen the indices and
        gather the whole weight again (a quarter of pt_seg's eval forward at B=8)."""
        if torch.is_grad_enabled():
            return self._lookup()
        sources = self._sources()
        kept = self.__dict__.get("_dense_weight")
        # the weight itself among the sources: a caller writing into it must not change the
        # next read
        if kept is not None and derived.unchanged(kept[0], (*sources, kept[1])):
            return kept[1]
        # a normal tensor even if read in inference mode (leaving it turns gradients back on)
        with torch.inference_mode(False), torch.no_grad():
            weight = self._lookup()
        self.__dict__["_dense_weight"] = (derived.snapshot((*sources, weight)), weight)
        return weight

    def _lookup(self):
        # A grid's gradient is already a mean over weights (_MeanOver): sum it per level.
        return _CodebookLookup.apply(self.centroids(), self.indices.long(),
                                     self.method != "linear")

    def _sources(self):
        """The tensors the dense weight is computed from."""
        grid = (self.grid_scale, self.grid_shift) if self.method == "linear" else ()
        return (self.codebook, self.indices, *grid)

    def extra_repr(self):
        return f"{super().extra_repr()}, bits={self.bits}, clusters={self.codebook.numel()}"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.method == "linear":  # files from before the grid trained as one: not moved
            state_dict.setdefault(prefix + "grid_scale", self.grid_scale.new_ones(()))
            state_dict.setdefault(prefix + "grid_shift", self.grid_shift.new_zeros(()))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class WeightSharedLinear(WeightShared, nn.Linear):
    pass


class WeightSharedConv1d(WeightShared, nn.Conv1d):
    pass


class WeightSharedConv2d(WeightShared, nn.Conv2d):
    pass


_SHARED_CLASSES = {nn.Linear: WeightSharedLinear, nn.Conv1d: WeightSharedConv1d,
                   nn.Conv2d: WeightSharedConv2d}


def _shared_class(cls):
    """The weight-shared counterpart of a layer class; made on demand for user subclasses."""
    if cls not in _SHARED_CLASSES:
        _SHARED_CLASSES[cls] = type(f"WeightShared{cls.__name__}", (WeightShared, cls), {})
    return _SHARED_CLASSES[cls]


def is_quantized_layer(module):
    return isinstance(module, WeightShared)


def share_weights(layer, codebook, indices, bits, method):
    """Turn a dense quantizable layer, in place, into its weight-shared form."""
    weight = layer.weight
    del layer.weight
    trainable = weight.requires_grad
    codebook = codebook.to(weight.dtype)
    if method == "linear":  # the levels stay fixed; their scale and shift train
        layer.register_buffer("codebook", codebook)
        layer.grid_scale = nn.Parameter(codebook.new_ones(()), requires_grad=trainable)
        layer.grid_shift = nn.Parameter(codebook.new_zeros(()), requires_grad=trainable)
    else:
        layer.codebook = nn.Parameter(codebook, requires_grad=trainable)
    layer.register_buffer("indices", indices.reshape(weight.shape).to(index_dtype(bits)))
    layer.bits, layer.method = bits, method
    layer.__class__ = _shared_class(type(layer))
    return layer


def densify(layer):
    """Undo share_weights in place: a plain dense layer holding the quantized weights."""
    weight = layer.weight.detach().clone()
    requires_grad = (layer.grid_scale if layer.method == "linear" else layer.codebook).requires_grad
    dense_class = next(c for c in type(layer).__mro__[1:] if not issubclass(c, WeightShared))
    if layer.method == "linear":
        del layer.grid_scale, layer.grid_shift
    del layer.codebook, layer.indices, layer.bits, layer.method
    layer.__dict__.pop("_dense_weight", None)
    layer.__class__ = dense_class
    layer.weight = nn.Parameter(weight, requires_grad=requires_grad)
    return layer


def named_quantizable(model):
    """(name, layer) for every Linear / Conv1d / Conv2d (subclasses and quantized ones
    included), in named_modules order, names as in the unwrapped model."""
    return [(name, m) for name, m in unwrap(model).named_modules() if isinstance(m, QUANTIZABLE)]


def check_policy(policy, names, where="policy"):
    """ValueError on layer names the model does not have, or bits that are neither None nor a
    positive integer (32 and above mean fp32)."""
    unknown = sorted(set(policy) - set(names))
    if unknown:
        raise ValueError(f"{where}: {len(unknown)} layer(s) not quantizable in this model: "
                         f"{', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''}")
    for name, bits in policy.items():
        valid = isinstance(bits, Integral) and not isinstance(bits, bool) and bits >= 1
        if bits is not None and not valid:
            raise ValueError(f"{where}: layer {name}: bits must be a positive integer or None, "
                             f"got {bits!r}")


def is_fp32(bits):
    return bits is None or bits >= FP32_BITS


def quantize_model(model, policy, method="kmeans", cache=None):
    """Apply {layer name: bits or None} in place and return the model. Missing layers, None and
    bits >= 32 stay as they are (fp32); a layer that is already quantized and named with bits is
    re-clustered from its current shared weights. method: "kmeans" or "linear" (uniform grid).
    cache: a KMeansCache, to reuse clusterings across calls (HAQ episodes)."""
    if method not in METHODS:
        raise ValueError(f"quantize_model: unknown method {method!r}; use one of {METHODS}")
    layers = dict(named_quantizable(model))
    check_policy(policy, layers, "quantize_model")
    for name, bits in policy.items():
        if is_fp32(bits):
            continue
        layer = layers[name]
        if cache is not None:  # the parameter itself: the cache knows it if it saw it before
            codebook, indices = cache.cluster(name, layer.weight, int(bits), method)
        else:
            codebook, indices = cluster(layer.weight.detach(), int(bits), method)
        if is_quantized_layer(layer):
            densify(layer)
        share_weights(layer, codebook, indices, int(bits), method)
    return model


def dequantize(model):
    """Every quantized layer back to a dense fp32 layer holding its quantized weights."""
    for _, layer in named_quantizable(model):
        if is_quantized_layer(layer):
            densify(layer)
    return model


def quant_state(model):
    """{layer name: {"bits", "method", "clusters"}} of the quantized layers: with the state_dict,
    all a file needs to rebuild them (prepare_quantized)."""
    return {name: {"bits": m.bits, "method": m.method, "clusters": m.codebook.numel()}
            for name, m in named_quantizable(model) if is_quantized_layer(m)}


def state_key(layer_name, entry):
    """state_dict key of a layer's entry ("codebook", "indices", "weight"); the root has no
    prefix."""
    return f"{layer_name}.{entry}" if layer_name else entry


def quantized_keys(model):
    """({indices key: bits}, {codebook keys}) of the model's quantized layers in its state_dict."""
    state = quant_state(model)
    return ({state_key(name, "indices"): entry["bits"] for name, entry in state.items()},
            {state_key(name, "codebook") for name in state})


def layer_renames(model):
    """{old name: current name} of the model's renamed quantizable layers, so that policy files
    and quantized checkpoints written before a rename still load: a module lists its renamed
    children in a RENAMED_LAYERS dict of relative names (models/point_transformer.py's layer)."""
    renames = {}
    for path, module in unwrap(model).named_modules():
        for old, new in getattr(module, "RENAMED_LAYERS", {}).items():
            renames[f"{path}.{old}" if path else old] = f"{path}.{new}" if path else new
    return renames


def prepare_quantized(model, state):
    """Give a freshly built fp32 model the quantized layers described by `state` (quant_state,
    layers under current or old names: layer_renames), with placeholder codebooks and indices,
    so that load_state_dict(strict=True) fills them."""
    renames = layer_renames(model)
    state = {renames.get(name, name): entry for name, entry in state.items()}
    layers = dict(named_quantizable(model))
    check_policy({name: entry["bits"] for name, entry in state.items()}, layers, "quant state")
    for name, entry in state.items():
        layer = layers[name]
        if is_quantized_layer(layer):
            densify(layer)
        weight = layer.weight.detach()
        share_weights(layer, weight.new_zeros(entry["clusters"]),
                      torch.zeros(weight.shape, dtype=torch.int64, device=weight.device),
                      entry["bits"], entry["method"])
    return model


@dataclass(frozen=True)
class LayerInfo:
    """One quantizable layer, with the fields HAQ's state embedding uses."""
    name: str  # from named_modules() of the unwrapped model
    kind: str  # "linear" | "conv1d" | "conv2d"
    in_features: int  # in_channels for a conv
    out_features: int  # out_channels for a conv
    kernel_size: int  # product of the kernel's sides; 1 for linear
    stride: int  # product of the strides; 1 for linear
    n_weights: int
    input_size: int  # positions per sample the layer sees: input.numel() / (in_features * batch)


def list_quantizable(model, example_inputs=None):
    """Every Linear / Conv1d / Conv2d once (isinstance, so subclasses and quantized layers count).

    With example_inputs (a tuple of forward arguments) one no-grad forward in eval mode (the
    training flags are restored, so no BatchNorm statistic moves) measures each layer's input
    size and orders the layers by first call; layers the forward never calls follow, with
    input_size 0. Without it the order is named_modules order and input_size is 1.
    """
    layers = named_quantizable(model)
    seen = {}  # name -> input_size, in order of first call

    def recorder(name, in_features):
        def hook(module, args):
            if name not in seen:
                x = args[0]
                batch = x.shape[0] if x.dim() > 1 else 1
                seen[name] = x.numel() // (in_features * batch)
        return hook

    if example_inputs is not None:
        root = unwrap(model)
        modes = {m: m.training for m in root.modules()}
        handles = [m.register_forward_pre_hook(recorder(name, _in_features(m)))
                   for name, m in layers]
        try:
            root.eval()
            with torch.no_grad():
                root(*example_inputs)
        finally:
            for h in handles:
                h.remove()
            for m, training in modes.items():
                m.training = training
        rank = {name: i for i, name in enumerate(seen)}
        layers = sorted(layers, key=lambda item: rank.get(item[0], len(rank)))
    return [_info(name, m, seen.get(name, 0) if example_inputs is not None else 1)
            for name, m in layers]


def _in_features(layer):
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


def _info(name, layer, input_size):
    kind = next(kind for cls, kind in KINDS.items() if isinstance(layer, cls))
    conv = kind != "linear"
    return LayerInfo(name=name, kind=kind, in_features=_in_features(layer),
                     out_features=layer.out_channels if conv else layer.out_features,
                     kernel_size=prod(layer.kernel_size) if conv else 1,
                     stride=prod(layer.stride) if conv else 1,
                     n_weights=n_weights(layer), input_size=int(input_size))


def n_weights(layer):
    """Number of weights of a quantizable layer, without materialising a shared weight."""
    return (layer.indices if is_quantized_layer(layer) else layer.weight).numel()
