import copy
import functools

import pytest
import torch
import torch.nn as nn

from lib import ops
from lib.ops import geometry
from lib.quant import list_quantizable
from models import MODELS, build_model
from models.pct import OffsetAttention, SampleAndGroup
from models.point_transformer import PointBatchNorm, PointTransformerLayer

LABEL_SPACE = {"pt_seg": dict(num_classes=50, num_categories=16), "pt_semseg": dict(num_classes=13),
               "pt_cls": dict(num_classes=40), "pct_cls": dict(num_classes=40)}


def make(name, in_channels=3):
    torch.manual_seed(0)
    return build_model(name, in_channels=in_channels, **LABEL_SPACE[name.removesuffix("_tiny")])


def inputs(name, b, n, in_channels=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    xyz, feat = torch.rand(b, n, 3, generator=g), torch.randn(b, n, in_channels, generator=g)
    if name.startswith("pt_seg"):
        return xyz, feat, torch.randint(16, (b,), generator=g)
    return xyz, feat


def is_segmentation(name):
    return "seg" in name


# PCT's sample-and-group layers take fixed point counts (512 in the paper's configuration)
POINTS = {"pct_cls": 1024}


@pytest.mark.parametrize("name", list(MODELS))
def test_output_shapes(name):
    n = POINTS.get(name, 256)
    model = make(name)
    out = model(*inputs(name, 2, n))
    num_classes = LABEL_SPACE[name.removesuffix("_tiny")]["num_classes"]
    assert out.shape == ((2, n, num_classes) if is_segmentation(name) else (2, num_classes))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", [m for m in MODELS if m.endswith("_tiny")])
def test_inference_mode_gives_the_no_grad_outputs(name):
    """torch.inference_mode, which serving code uses: its tensors have no version counter, which
    the neighbour-index check used to read (every model raised)."""
    n = POINTS.get(name.removesuffix("_tiny"), 256)
    model, x = make(name).eval(), inputs(name, 2, n)
    with torch.no_grad():
        expected = model(*x)
    with torch.inference_mode():
        torch.testing.assert_close(model(*x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", [m for m in MODELS if m.endswith("_tiny")])
def test_permuting_points_permutes_segmentation_and_keeps_classification(name):
    model = make(name)
    args = inputs(name, 2, 256)
    with torch.no_grad():  # non-trivial BatchNorm running statistics
        for _ in range(3):
            model(*args)
    model.eval()
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(3))
    permuted = (args[0][:, perm], args[1][:, perm]) + args[2:]
    with torch.no_grad():
        out, out_perm = model(*args), model(*permuted)
    expected = out[:, perm] if is_segmentation(name) else out
    torch.testing.assert_close(out_perm, expected, atol=1e-4, rtol=1e-4)


def biases_before_batchnorm(model):
    """Names of the biases whose output a training-mode BatchNorm takes next (in a Sequential:
    a Linear's, or a NormReluLinear's Linear's): the BatchNorm subtracts the batch mean, so
    their gradient is zero but for rounding."""
    names = set()
    for prefix, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (name, first), (_, second) in zip(children, children[1:]):
            norm = isinstance(second, (PointBatchNorm, nn.modules.batchnorm._BatchNorm))
            linear = first if isinstance(first, nn.Linear) else getattr(first, "linear", None)
            if norm and isinstance(linear, nn.Linear) and linear.bias is not None:
                path = f"{prefix}.{name}" if prefix else name
                names.add(path + (".bias" if linear is first else ".linear.bias"))
    return names


@pytest.mark.parametrize("name", [m for m in MODELS if m.endswith("_tiny")])
def test_every_parameter_gets_a_gradient_on_cpu(name):
    """Every parameter gets a finite gradient, nonzero but for the biases right before a
    BatchNorm, whose gradient is zero but for rounding (it came out exactly 0.0 in one)."""
    model = make(name)
    model(*inputs(name, 2, 256)).square().mean().backward()
    cancelled = biases_before_batchnorm(model)
    assert name.startswith("pct") or any(n.endswith("gamma.0.linear.bias") for n in cancelled)
    largest = max(float(p.grad.abs().max()) for p in model.parameters())
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        if pname in cancelled:
            assert p.grad.abs().max() <= 1e-5 * largest, pname
        else:
            assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", list(MODELS))
def test_every_weight_lives_in_a_linear_or_conv_module(name):
    """k-means quantization replaces nn.Linear / nn.Conv modules: no weight may hide elsewhere."""
    allowed = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.BatchNorm1d)
    for module_name, module in make(name).named_modules():
        if list(module.parameters(recurse=False)):
            assert isinstance(module, allowed), module_name


def test_point_transformer_layer_matches_the_paper_equation_point_by_point():
    """y_i = sum_j softmax_j(gamma(phi(x_i) - psi(x_j) + delta_ij)) * (alpha(x_j) + delta_ij),
    delta_ij = theta(p_i - p_j); weight c' of gamma's C/s outputs scales channels c' + g C/s."""
    torch.manual_seed(0)
    c, s, n, k = 16, 4, 12, 5
    layer = PointTransformerLayer(c, share_planes=s).eval()
    for bn in (m for m in layer.modules() if isinstance(m, nn.BatchNorm1d)):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    xyz, x = torch.rand(1, n, 3), torch.randn(1, n, c)
    idx = ops.knn_query(k, xyz, xyz)[0]
    with torch.no_grad():
        y = layer(xyz, x, idx)[0]
        for i in range(n):
            neighbours = idx[0, i].tolist()
            deltas = [layer.delta(xyz[:, i] - xyz[:, j])[0] for j in neighbours]  # (C,)
            logits = torch.stack([layer.gamma(layer.phi(x[:, i]) - layer.psi(x[:, j]) + d)[0]
                                  for j, d in zip(neighbours, deltas)])  # (k, C/s)
            weights = logits.softmax(dim=0)
            expected = torch.zeros(c)
            for w, j, d in zip(weights, neighbours, deltas):
                expected += w.repeat(s) * (layer.alpha(x[:, j])[0] + d)
            torch.testing.assert_close(y[i], expected, atol=1e-5, rtol=1e-5)


def sample_and_group_by_definition(sg, xyz, x):
    """Paper Sec. 3.3 as written: the (B, M, k, 2C) concatenation through the LBRs, then max."""
    centres = ops.farthest_point_sample(xyz, sg.num_points)
    new_xyz = ops.gather(xyz, centres)
    idx = ops.knn_query(sg.k, xyz, new_xyz)[0]
    batch = torch.arange(x.shape[0]).view(-1, 1, 1)
    neighbours, centre = x[batch, idx], x[batch[..., 0], centres].unsqueeze(2)  # (B, M, k | 1, C)
    grouped = torch.cat([neighbours - centre, centre.expand_as(neighbours)], dim=-1)
    return new_xyz, sg.mlp(grouped).amax(dim=2)


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("lowest_scale", [0.0, -1.0])  # ops.norm_relu_max's C form needs >= 0
def test_sample_and_group_matches_its_definition_in_float64(backend, lowest_scale):
    """Values, gradients and BatchNorm statistics of the fast forms (the decomposed first Linear,
    BatchNorm and ReLU through the max) against the concatenation the paper describes, training
    mode."""
    torch.manual_seed(0)
    sg = SampleAndGroup(6, 10, num_points=12, k=5).double()
    for bn in (m for m in sg.modules() if isinstance(m, nn.BatchNorm1d)):
        with torch.no_grad():
            bn.weight.uniform_(lowest_scale, 2.0)
            bn.bias.uniform_(-0.5, 0.5)
    reference = copy.deepcopy(sg)
    g = torch.Generator().manual_seed(1)
    xyz = torch.rand(2, 40, 3, generator=g, dtype=torch.float64)
    x = torch.randn(2, 40, 6, generator=g, dtype=torch.float64, requires_grad=True)
    ops.set_backend(backend)
    try:
        results = []
        for module, form in ((sg, sg.forward), (reference, functools.partial(
                sample_and_group_by_definition, reference))):
            x.grad = None
            new_xyz, y = form(xyz, x)
            y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y))
            results.append([new_xyz, y.detach(), x.grad.clone()]
                           + [p.grad for p in module.parameters()] + list(module.buffers()))
    finally:
        ops.set_backend("auto")
    assert (results[0][1] > 0).any() and (results[0][2] != 0).any()
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_haq_measures_the_sample_and_group_linears_on_their_grouped_inputs():
    """HAQ's state holds each layer's input size (lib/quant/layers.py list_quantizable): the
    first Linear of a sample-and-group layer sees M k positions per cloud, whatever form runs."""
    model = make("pct_cls_tiny")
    sizes = {layer.name: layer.input_size
             for layer in list_quantizable(model, inputs("pct_cls_tiny", 2, 512))}
    for i, sg in enumerate(model.sg):
        assert sizes[f"sg.{i}.mlp.0.0"] == sizes[f"sg.{i}.mlp.1.0"] == sg.num_points * sg.k


def test_offset_attention_weights_of_each_output_point_sum_to_one():
    """With a constant value map, attention(x) is that constant at every point exactly when each
    output point's weights over the input points sum to 1 (softmax, then l1 over the other axis)."""
    torch.manual_seed(0)
    layer = OffsetAttention(16).eval()
    with torch.no_grad():
        layer.v.weight.zero_()
        layer.v.bias.uniform_(-1, 1)
        x = torch.randn(2, 50, 16) * 3
        torch.testing.assert_close(layer(x), x + layer.lbr(x - layer.v.bias))


def test_knn_runs_once_per_stage_however_deep_the_stages(monkeypatch):
    calls = []

    def counting_knn(k, support, query):
        calls.append(k)
        return geometry.knn_query_reference(k, support, query)

    monkeypatch.setattr(ops, "knn_query", counting_knn)  # the model's own calls
    monkeypatch.setattr(geometry, "knn_query", counting_knn)  # interpolate's
    counts = []
    for depth in (1, 3):
        calls.clear()
        model = build_model("pt_semseg_tiny", in_channels=3, num_classes=4,
                            enc_blocks=(depth,) * 4, dec_blocks=(depth,) * 4)
        model(*inputs("pt_semseg", 1, 256))
        counts.append(len(calls))
    # per stage one kNN within the stage; per downsampling one for TransitionDown's grouping and
    # one for TransitionUp's interpolation
    assert counts == [4 + 3 + 3, 4 + 3 + 3]


def test_part_segmentation_depends_on_the_category():
    model = make("pt_seg_tiny").eval()
    xyz, feat, _ = inputs("pt_seg", 2, 256)
    with torch.no_grad():
        a = model(xyz, feat, torch.tensor([0, 0]))
        b = model(xyz, feat, torch.tensor([5, 0]))
    assert not torch.allclose(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])


def test_build_model_rejects_unknown_names_and_misplaced_categories():
    with pytest.raises(ValueError, match="pt_seg, pt_semseg, pt_cls, pct_cls"):
        build_model("pointnet", in_channels=3, num_classes=2)
    with pytest.raises(ValueError, match="num_categories"):
        build_model("pt_seg", in_channels=3, num_classes=50)
    with pytest.raises(ValueError, match="num_categories"):
        build_model("pt_semseg_tiny", in_channels=3, num_classes=13, num_categories=16)


def test_explicit_kwargs_override_the_preset():
    model = build_model("pt_cls_tiny", in_channels=0, num_classes=7, widths=(8, 16, 16, 32),
                        share_planes=4)
    assert model.encoder.down[0].mlp[0].in_features == 3  # xyz only
    assert model.encoder.down[3].mlp[0].out_features == 32
    assert model.head[-1].out_features == 7
    xyz = torch.rand(2, 128, 3)
    assert model(xyz, xyz[..., :0]).shape == (2, 7)


# Parameter counts derived from the architectures, independently of the model code.

def linear(i, o, bias=True):
    return i * o + (o if bias else 0)


def bn(c):
    return 2 * c


def lbr(i, o, bias=False):
    return linear(i, o, bias) + bn(o)


def pt_layer(c, share):
    r = c // share
    phi_psi_alpha = 3 * linear(c, c)
    delta = linear(3, 3) + bn(3) + linear(3, c)
    gamma = bn(c) + linear(c, r) + bn(r) + linear(r, r)
    return phi_psi_alpha + delta + gamma


def pt_block(c, share):
    return lbr(c, c) + pt_layer(c, share) + bn(c) + linear(c, c, bias=False) + bn(c)


def pt_encoder(in_channels, widths, strides, blocks, share):
    total, prev = 0, 3 + in_channels
    for width, stride, depth in zip(widths, strides, blocks):
        total += lbr(prev + (3 if stride > 1 else 0), width) + depth * pt_block(width, share)
        prev = width
    return total


PAPER = dict(widths=[32, 64, 128, 256, 512], strides=[1, 4, 4, 4, 4], blocks=[1, 2, 3, 5, 2],
             share=8)


def test_pt_seg_parameter_count_matches_the_architecture():
    widths, share, categories, parts = PAPER["widths"], PAPER["share"], 16, 50
    top = lbr(2 * widths[-1], widths[-1], bias=True) + linear(widths[-1] + categories, widths[-1])
    ups = sum(lbr(widths[s], widths[s], bias=True) + lbr(widths[s + 1], widths[s], bias=True)
              for s in range(4))
    decoder_blocks = sum(pt_block(w, share) for w in widths)
    head = lbr(widths[0], widths[0], bias=True) + linear(widths[0], parts)
    expected = pt_encoder(3, **PAPER) + top + ups + decoder_blocks + head
    assert sum(p.numel() for p in make("pt_seg").parameters()) == expected


def test_pt_cls_parameter_count_matches_the_architecture():
    head = lbr(512, 256) + lbr(256, 128) + linear(128, 40)
    expected = pt_encoder(3, **PAPER) + head
    assert sum(p.numel() for p in make("pt_cls").parameters()) == expected


def test_pct_cls_parameter_count_matches_the_architecture():
    embed = lbr(6, 64) + lbr(64, 64)
    # two sample-and-group layers: input = neighbour minus centre, concatenated with centre
    neighbour_embedding = lbr(2 * 64, 128) + lbr(128, 128) + lbr(2 * 128, 256) + lbr(256, 256)
    offset_attention = linear(256, 64, bias=False) + linear(256, 256) + lbr(256, 256, bias=True)
    fuse = lbr(5 * 256, 1024)
    head = lbr(2 * 1024, 512) + lbr(512, 256) + linear(256, 40)
    expected = embed + neighbour_embedding + 4 * offset_attention + fuse + head
    assert sum(p.numel() for p in make("pct_cls").parameters()) == expected


def test_point_transformer_loads_checkpoints_with_the_old_gamma_names():
    """State dicts written before gamma's first BatchNorm-ReLU-Linear became a named module
    (gamma.0 BatchNorm, gamma.2 Linear, gamma.3 BatchNorm, gamma.5 Linear) load strictly."""
    torch.manual_seed(0)
    model = build_model("pt_seg_tiny", in_channels=3, num_classes=6, num_categories=2)
    new_names = {".gamma.0.norm.": ".gamma.0.", ".gamma.0.linear.": ".gamma.2.",
                 ".gamma.1.": ".gamma.3.", ".gamma.3.": ".gamma.5."}
    old_state = {}
    for key, value in model.state_dict().items():
        for new, old in new_names.items():
            if new in key:
                key = key.replace(new, old)
                break
        old_state[key] = value + 1 if value.is_floating_point() else value
    assert any(".gamma.2.weight" in key for key in old_state)
    fresh = build_model("pt_seg_tiny", in_channels=3, num_classes=6, num_categories=2)
    fresh.load_state_dict(old_state, strict=True)
    for key, value in model.state_dict().items():
        expected = value + 1 if value.is_floating_point() else value
        assert torch.equal(fresh.state_dict()[key], expected), key


def _with_the_old_gamma_layout(model):
    """`model` with each PT layer's gamma laid out as before gamma.0 became a NormReluLinear:
    Sequential(BatchNorm, ReLU, Linear, BatchNorm, ReLU, Linear), the same modules."""
    from models.point_transformer import PointTransformerLayer
    for layer in model.modules():
        if isinstance(layer, PointTransformerLayer):
            first, norm, _, last = layer.gamma
            layer.gamma = nn.Sequential(first.norm, nn.ReLU(inplace=True), first.linear, norm,
                                        nn.ReLU(inplace=True), last)
    return model


@pytest.mark.parametrize("packed", [True, False])
def test_quantized_checkpoints_and_policies_with_the_old_gamma_names_load(tmp_path, packed):
    """A quantized checkpoint (packed, or with a resume state) and a policy file that name
    gamma's Linears gamma.2 and gamma.5 load into today's layer, with the same outputs."""
    from lib.checkpoint import load_checkpoint, save_checkpoint
    from lib.policy_file import PolicyFile, write_policy
    from lib.quant import list_quantizable, quantize_model
    from lib.quant.layers import layer_renames
    kwargs = dict(in_channels=3, num_classes=6, num_categories=2)
    torch.manual_seed(0)
    old = _with_the_old_gamma_layout(build_model("pt_seg_tiny", **kwargs)).eval()
    old_names = [layer.name for layer in list_quantizable(old)]
    assert any(name.endswith("gamma.5") for name in old_names)
    quantize_model(old, {name: 4 for name in old_names})
    path = str(tmp_path / "old.pt")
    meta = {"model": {"name": "pt_seg_tiny", "kwargs": kwargs}, "quant": {"bits": 4}}
    save_checkpoint(path, old, meta, resume_state=None if packed else {"epoch": 1})
    _, loaded, _ = load_checkpoint(path)
    xyz, feat, category = torch.randn(2, 256, 3), torch.randn(2, 256, 3), torch.tensor([0, 1])
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(xyz, feat, category), old(xyz, feat, category),
                              rtol=1e-4, atol=1e-5)
    fresh = build_model("pt_seg_tiny", **kwargs)
    names = [layer.name for layer in list_quantizable(fresh)]
    write_policy(str(tmp_path / "policy.json"), {"bits": {name: 4 for name in old_names}})
    policy = PolicyFile(str(tmp_path / "policy.json")).bits(names, layer_renames(fresh))
    assert sorted(policy) == sorted(names)
