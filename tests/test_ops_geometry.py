"""lib/ops/geometry.py: the fast CPU forms give the reference's answers; the ops do what they say.

Random float clouds have no exact distance ties, so FPS sequences and kNN sets are unique.
"""
import os
import re

import pytest
import torch

from lib import ops
from lib.ops import geometry as po
from lib.ops import native


def cloud(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def require_native():
    """Skips the test without the C kernels (checked when it runs, not at collection: building
    them then would compile during collection)."""
    if native.library() is None:
        pytest.skip("no C compiler for lib/ops/csrc/geometry.c")


# The CPU fast path has two forms of each op: lib/ops/csrc/geometry.c's, and fpsample's FPS /
# pykdtree's kNN (float64, or no C compiler). Tests of the fast path run both.
CPU_FORMS = ["native", "python"]


def use_form(form, monkeypatch):
    if form == "python":
        monkeypatch.setattr(native, "_library", None)
    else:
        require_native()


# Farthest point sampling

@pytest.mark.parametrize("form", CPU_FORMS)
# 20000: a room-sized cloud, which fpsample's bucket FPS used to take
@pytest.mark.parametrize("b, n, m", [(4, 2048, 512), (1, 8192, 1024), (3, 100, 1), (2, 37, 37),
                                     (1, 20000, 300)])
def test_fps_fast_path_matches_reference(b, n, m, form, monkeypatch):
    use_form(form, monkeypatch)
    xyz = cloud(b, n, 3)
    fast = po.farthest_point_sample_cpu(xyz, m)
    assert fast.dtype == torch.long and fast.shape == (b, m)
    assert torch.equal(fast, po.farthest_point_sample_reference(xyz, m))
    assert torch.equal(fast[:, 0], po.start_index(xyz))


def test_fps_non_contiguous_float64_and_grad_inputs():
    xyz = cloud(2, 3, 1024).transpose(1, 2).requires_grad_()  # (B, N, 3), not contiguous
    assert not xyz.is_contiguous()
    idx = po.farthest_point_sample(xyz, 256)
    assert not idx.requires_grad
    assert torch.equal(idx, po.farthest_point_sample_reference(xyz, 256))
    xyz64 = cloud(2, 1024, 3, seed=1, dtype=torch.float64)
    assert torch.equal(po.farthest_point_sample(xyz64, 256),
                       po.farthest_point_sample_reference(xyz64, 256))


@pytest.mark.parametrize("form", CPU_FORMS)
def test_fps_on_duplicate_points_is_a_farthest_point_sample(form, monkeypatch):
    # Ties make the sample non-unique; it must still start at start_index, never repeat a
    # point, and pick points ever closer to those already picked.
    use_form(form, monkeypatch)
    xyz = (torch.rand(1, 4096, 3, generator=torch.Generator().manual_seed(0)) * 12).round() / 12
    idx = po.farthest_point_sample(xyz, 512)[0]
    if form == "native":  # the reference's steps: the reference's choice among ties as well
        assert torch.equal(idx, po.farthest_point_sample_reference(xyz, 512)[0])
    assert idx[0] == po.start_index(xyz)[0] and len(set(idx.tolist())) == 512
    picked = xyz[0, idx]  # (m, 3)
    gaps = torch.cdist(picked, picked, compute_mode="donot_use_mm_for_euclid_dist")
    earlier = torch.ones(512, 512).tril(-1).bool()  # [i, j]: j picked before i
    gap_to_earlier = gaps.masked_fill(~earlier, float("inf")).min(1).values
    assert (gap_to_earlier[2:] <= gap_to_earlier[1:-1] + 1e-6).all()


# Clouds of this many points or more take geometry.c's pruned FPS (fps_tree), smaller ones its
# plain loop; the tests below size their clouds by it.
TREE_POINTS = int(re.search(r"FPS_TREE_MIN_POINTS = (\d+)",
                            open(os.path.join(native.SOURCE_DIR, "geometry.c")).read()).group(1))


def room_surfaces(n, seed=0):
    """n points on the floor, ceiling and four walls of a 10 x 10 x 3 m room: flat leaves,
    many points sharing one coordinate exactly."""
    gen = torch.Generator().manual_seed(seed)
    xyz = torch.rand(n, 3, generator=gen) * torch.tensor([10.0, 10.0, 3.0])
    face = torch.randint(0, 6, (n,), generator=gen)
    for f, (axis, value) in enumerate([(2, 0.0), (2, 3.0), (0, 0.0), (0, 10.0), (1, 0.0),
                                       (1, 10.0)]):
        xyz[face == f, axis] = value
    return xyz.unsqueeze(0)


@pytest.mark.parametrize("xyz, m", [
    (cloud(2, 2 * TREE_POINTS, 3, seed=5), 1500),  # two clouds, over torch's threads
    (room_surfaces(3 * TREE_POINTS), 3000),
    (cloud(1, TREE_POINTS, 3, seed=6) * 1e-20, 500),  # squared distances near float32's floor
    (cloud(1, TREE_POINTS + 5, 3, seed=7), TREE_POINTS + 5)])  # every point, a ragged size
def test_fps_pruned_form_picks_the_references_points(xyz, m):
    require_native()
    assert torch.equal(po.farthest_point_sample_cpu(xyz, m),
                       po.farthest_point_sample_reference(xyz, m))


@pytest.mark.parametrize("spacing", [1 / 6, 1 / 2])
def test_fps_pruned_form_breaks_ties_as_the_reference(spacing):
    # points on a coarse lattice: each appears many times over, and most distances tie; the
    # first index of the largest distance wins, within a leaf and across leaves
    require_native()
    gen = torch.Generator().manual_seed(1)
    xyz = (torch.rand(1, 2 * TREE_POINTS, 3, generator=gen) * 3 / spacing).round() * spacing
    assert torch.equal(po.farthest_point_sample_cpu(xyz, 1500),
                       po.farthest_point_sample_reference(xyz, 1500))
    same = torch.full((1, TREE_POINTS, 3), 0.25)  # all one point: every distance ties at 0
    assert torch.equal(po.farthest_point_sample_cpu(same, 40),
                       po.farthest_point_sample_reference(same, 40))


def test_fps_pruned_form_takes_non_finite_clouds():
    # NaN and infinite coordinates leave no boxes to prune by: the plain loop takes the cloud,
    # and every pick is still a point of it
    require_native()
    xyz = cloud(2, TREE_POINTS, 3)
    xyz[0, 10, 1] = float("nan")
    xyz[1, 20, 2] = float("inf")
    idx = po.farthest_point_sample_cpu(xyz, 100)
    assert idx.shape == (2, 100) and idx.min() >= 0 and idx.max() < TREE_POINTS
    finite = cloud(1, TREE_POINTS, 3)
    assert torch.equal(po.farthest_point_sample_cpu(torch.cat([xyz, finite]), 100)[2],
                       po.farthest_point_sample_reference(finite, 100)[0])


def test_fps_without_the_c_library_runs_fpsample_from_start_index(monkeypatch):
    use_form("python", monkeypatch)
    calls = []
    plain_fps = po.fpsample.fps_sampling
    monkeypatch.setattr(po.fpsample, "fps_sampling",
                        lambda *args, **kwargs: calls.append(1) or plain_fps(*args, **kwargs))
    xyz = cloud(2, 600, 3)
    assert torch.equal(ops.farthest_point_sample(xyz, 50),
                       po.farthest_point_sample_reference(xyz, 50))
    assert len(calls) == 2  # one per cloud


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_fps_sample_does_not_depend_on_point_order(backend):
    ops.set_backend(backend)
    xyz = cloud(2, 1024, 3)
    perm = torch.randperm(1024, generator=torch.Generator().manual_seed(3))
    sampled = po.gather(xyz, po.farthest_point_sample(xyz, 200))  # (B, m, 3)
    shuffled = xyz[:, perm]
    sampled_shuffled = po.gather(shuffled, po.farthest_point_sample(shuffled, 200))
    assert torch.equal(sampled, sampled_shuffled)


def test_fps_shortfall_is_zero_for_fps_and_large_for_a_random_sample():
    xyz = cloud(2, 1000, 3)
    assert po.fps_shortfall(xyz, po.farthest_point_sample_reference(xyz, 200)) == 0
    random_pick = torch.stack([torch.randperm(1000, generator=torch.Generator().manual_seed(i))
                               for i in range(2)])[:, :200]
    assert po.fps_shortfall(xyz, random_pick) > 0.5


def test_fps_rejects_more_samples_than_points():
    with pytest.raises(ValueError, match="cannot sample 11 of 10 points"):
        po.farthest_point_sample(cloud(1, 10, 3), 11)


# Dispatch

def test_backend_picks_fast_path_only_for_auto_on_cpu(monkeypatch):
    def fast_path(*args):
        raise AssertionError("fast path called")
    monkeypatch.setattr(po, "farthest_point_sample_cpu", fast_path)
    monkeypatch.setattr(po, "knn_query_cpu", fast_path)
    xyz = cloud(1, 64, 3)
    with pytest.raises(AssertionError, match="fast path called"):
        po.farthest_point_sample(xyz, 8)
    with pytest.raises(AssertionError, match="fast path called"):
        po.knn_query(4, xyz, xyz)
    ops.set_backend("reference")
    assert ops.get_backend() == "reference"
    assert po.farthest_point_sample(xyz, 8).shape == (1, 8)
    assert po.knn_query(4, xyz, xyz)[0].shape == (1, 64, 4)
    with pytest.raises(ValueError, match="unknown lib.ops backend"):
        ops.set_backend("cuda")


def test_reference_backend_knn_is_the_gemm_form(monkeypatch):
    """The benchmarks' plain-PyTorch side takes the fastest plain kNN here, not cdist's exact
    mode (which stays the tests' oracle)."""
    calls = []
    matmul = po.knn_query_matmul
    monkeypatch.setattr(po, "knn_query_matmul", lambda *a: calls.append(1) or matmul(*a))
    ops.set_backend("reference")
    support, query = cloud(2, 300, 3), cloud(2, 50, 3, seed=1)
    assert_same_knn(ops.knn_query(8, support, query), po.knn_query_reference(8, support, query))
    assert calls == [1]


# k nearest neighbours

def assert_same_knn(fast, reference):
    (idx, dist2), (idx_ref, dist2_ref) = fast, reference
    assert idx.dtype == torch.long and idx.shape == idx_ref.shape
    assert dist2.dtype == dist2_ref.dtype
    assert torch.equal(idx.sort(-1).values, idx_ref.sort(-1).values)
    assert torch.allclose(dist2, dist2_ref, rtol=1e-5, atol=1e-6)
    assert (dist2.diff(dim=-1) >= 0).all()  # nearest first


@pytest.mark.parametrize("form", CPU_FORMS)
@pytest.mark.parametrize("b, n, m, k",
                         [(2, 2048, 2048, 16), (1, 20000, 1000, 16), (3, 500, 200, 3),
                          (2, 30, 50, 30), (1, 1, 4, 1)])
def test_knn_fast_path_matches_reference(b, n, m, k, form, monkeypatch):
    use_form(form, monkeypatch)
    support = cloud(b, n, 3)
    query = support[:, :m] if m == n else cloud(b, m, 3, seed=1)
    assert_same_knn(po.knn_query_cpu(k, support, query), po.knn_query_reference(k, support, query))


def test_knn_grid_search_on_awkward_clouds():
    """The grid search of lib/ops/csrc/geometry.c where its cells are awkward: a flat cloud (one
    cell thick), a stretched one, points on cell faces and duplicated, queries far outside the
    support's bounding box, and a point-like cloud."""
    require_native()
    gen = torch.Generator().manual_seed(0)
    flat = torch.rand(2, 700, 3, generator=gen)
    flat[..., 2] = 0.5
    stretched = torch.rand(2, 700, 3, generator=gen) * torch.tensor([100.0, 1.0, 0.01])
    lattice = (torch.rand(2, 700, 3, generator=gen) * 8).floor() / 8  # duplicates on faces
    for support in (flat, stretched, lattice):
        far = torch.randn(2, 90, 3, generator=gen) * 50
        for query in (support, far, lattice):
            for k in (1, 10):
                fast = po.knn_query_cpu(k, support, query)
                reference = po.knn_query_reference(k, support, query)
                # distances everywhere; index sets where neither duplicates nor float32
                # rounding of distances ~1e4 (the far queries) make near ties
                assert torch.allclose(fast[1], reference[1], rtol=1e-5, atol=1e-5)
                if support is not lattice and query is not far:
                    assert_same_knn(fast, reference)
    broken = torch.rand(2, 100, 3, generator=gen)
    broken[1, 7] = float("nan")  # no grid for it: the kd-tree answers, as without the C library
    fast = po.knn_query_cpu(4, broken, broken[:, :10])
    assert_same_knn([t[:1] for t in fast], po.knn_query_reference(4, broken[:1], broken[:1, :10]))
    crowded = torch.rand(1, 2000, 3, generator=gen)
    crowded[0, 500:] = 0.5  # 1,500 points in one cell: more than query_block ranks at once
    fast = po.knn_query_cpu(8, crowded, crowded)
    assert torch.allclose(fast[1], po.knn_query_reference(8, crowded, crowded)[1], atol=1e-6)
    point = torch.zeros(1, 20, 3)
    idx, dist2 = po.knn_query_cpu(20, point, torch.ones(1, 3, 3))
    assert torch.equal(idx.sort(-1).values, torch.arange(20).expand(1, 3, 20))
    assert torch.allclose(dist2, torch.full((1, 3, 20), 3.0))


@pytest.mark.parametrize("form", CPU_FORMS)
def test_knn_self_query_finds_each_point_first_at_distance_zero(form, monkeypatch):
    use_form(form, monkeypatch)
    xyz = cloud(2, 300, 3)
    for knn in (po.knn_query_cpu, po.knn_query_reference):
        idx, dist2 = knn(1, xyz, xyz)
        assert idx.shape == (2, 300, 1)
        assert torch.equal(idx[..., 0], torch.arange(300).expand(2, 300))
        assert (dist2 == 0).all()


def test_knn_non_contiguous_and_float64():
    support = cloud(2, 6, 400)[:, :3].transpose(1, 2)  # (B, N, 3), not contiguous
    query = cloud(2, 100, 3, seed=1)
    assert_same_knn(po.knn_query(8, support, query), po.knn_query_reference(8, support, query))
    support64, query64 = support.double(), query.double()
    fast = po.knn_query(8, support64, query64)
    assert fast[1].dtype == torch.float64
    assert_same_knn(fast, po.knn_query_reference(8, support64, query64))


def test_knn_rejects_more_neighbours_than_points():
    with pytest.raises(ValueError, match="cannot find 6 neighbours among 5 points"):
        po.knn_query(6, cloud(1, 5, 3), cloud(1, 2, 3))


# Gather, group, interpolate

def test_gather_picks_rows_per_batch_element_and_passes_gradients():
    features = cloud(2, 10, 4).requires_grad_()
    idx = torch.tensor([[[0, 9], [3, 3]], [[1, 2], [9, 0]]])  # (B, 2, 2)
    out = po.gather(features, idx)
    assert out.shape == (2, 2, 2, 4)
    for bi in range(2):
        assert torch.equal(out[bi], features[bi][idx[bi]])
    out.sum().backward()
    counts = torch.zeros(2, 10).scatter_add_(1, idx.view(2, -1), torch.ones(2, 4))
    assert torch.equal(features.grad, counts.unsqueeze(-1).expand(2, 10, 4))


def test_gather_refuses_indices_changed_before_its_backward():
    """The backward (the C kernel, or the sparse product without it) reads the indices the
    forward saved: changed in place in between, the gradient would go to other rows."""
    features = cloud(2, 10, 4).requires_grad_()
    idx = torch.tensor([[[0, 9], [3, 3]], [[1, 2], [9, 0]]])
    out = po.gather(features, idx)
    idx[0, 0, 0] = 5
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_gather_without_kernels_reuses_the_selection_of_an_index_tensor(monkeypatch):
    """Without the kernels the backward builds the transposed selection (CSR) once per index
    tensor: a stage's kNN serves all its blocks, a replayed tape every step."""
    monkeypatch.setattr(po.dispatch, "native_for", lambda *tensors, **kw: None)
    features = cloud(2, 10, 4).requires_grad_()
    idx = torch.tensor([[[0, 9], [3, 3]], [[1, 2], [9, 0]]])
    po.gather(features, idx).sum().backward()
    first = po._gather_transposes.get(idx)
    assert first is not None
    grad = features.grad.clone()
    features.grad = None
    po.gather(features, idx).sum().backward()
    assert po._gather_transposes.get(idx) is first
    assert torch.equal(features.grad, grad)


def test_group_puts_relative_xyz_before_features():
    xyz, features = cloud(2, 50, 3), cloud(2, 50, 5, seed=1)
    new_xyz = xyz[:, :7]
    idx, _ = po.knn_query(4, xyz, new_xyz)
    grouped = po.group(xyz, features, new_xyz, idx)
    assert grouped.shape == (2, 7, 4, 8)
    for bi in range(2):
        assert torch.allclose(grouped[bi, ..., :3], xyz[bi][idx[bi]] - new_xyz[bi].unsqueeze(1))
        assert torch.equal(grouped[bi, ..., 3:], features[bi][idx[bi]])
    assert torch.equal(grouped[:, :, 0, :3], torch.zeros(2, 7, 3))  # each point is its own nearest
    assert torch.equal(po.group(xyz, features, new_xyz, idx, with_xyz=False), grouped[..., 3:])


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_interpolate_is_exact_at_source_points_and_keeps_constants(backend):
    ops.set_backend(backend)
    src, features = cloud(2, 512, 3), cloud(2, 512, 6, seed=1)
    assert torch.allclose(po.interpolate(src, src, features), features, atol=1e-5)
    dst = cloud(2, 2048, 3, seed=2)
    constant = torch.full((2, 512, 6), 2.5)
    assert torch.allclose(po.interpolate(src, dst, constant), constant[:, :1].expand(2, 2048, 6))


def test_interpolate_linear_field_and_backends_agree():
    gen = torch.Generator().manual_seed(0)
    src, dst = torch.rand(1, 4096, 3, generator=gen), torch.rand(1, 500, 3, generator=gen)
    slope = torch.tensor([1.0, -2.0, 0.5])
    field = (src @ slope).unsqueeze(-1)  # (1, N, 1), range 3.5
    out = po.interpolate(src, dst, field)
    # a convex combination of the 3 nearest values, close to the field on a dense cloud
    idx, _ = po.knn_query(3, src, dst)
    near = po.gather(field, idx)[..., 0]  # (1, M, 3)
    assert (out[..., 0] >= near.min(-1).values - 1e-6).all()
    assert (out[..., 0] <= near.max(-1).values + 1e-6).all()
    assert (out[..., 0] - dst @ slope).abs().mean() < 0.05
    ops.set_backend("reference")
    assert torch.allclose(po.interpolate(src, dst, field), out, atol=1e-5)


# Geometry tape

def geometry(xyz):
    """FPS, then kNN and 3-NN interpolation between the cloud and its sample, as a network does."""
    new_xyz = po.gather(xyz, po.farthest_point_sample(xyz, 64))
    idx, _ = po.knn_query(8, xyz, new_xyz)
    return new_xyz, idx, po.interpolate(new_xyz, xyz, new_xyz)


def test_geometry_tape_replays_without_computing(monkeypatch):
    xyz = cloud(2, 256, 3)
    tape = ops.GeometryTape()
    with tape:
        recorded = geometry(xyz)
    assert tape.recorded and [s[0] for s, _ in tape.entries] == ["farthest_point_sample",
                                                               "knn_query", "knn_query"]

    def computed(*args):
        raise AssertionError("replay computed the geometry")
    for name in ("farthest_point_sample_cpu", "farthest_point_sample_reference",
                 "knn_query_cpu", "knn_query_reference"):
        monkeypatch.setattr(po, name, computed)
    for _ in range(2):
        with tape:
            replayed = geometry(xyz)
        for a, b in zip(recorded, replayed):
            assert torch.equal(a, b)
    with pytest.raises(AssertionError, match="replay computed"):
        geometry(xyz)  # outside the tape: computed again


def test_geometry_tape_rejects_another_call_sequence():
    xyz = cloud(1, 128, 3)
    tape = ops.GeometryTape()
    with tape:
        po.knn_query(8, xyz, xyz)
    with pytest.raises(ValueError, match="diverged at call 0"):
        with tape:
            po.knn_query(4, xyz, xyz)  # another k
    with pytest.raises(ValueError, match="replayed 0 of its 1 calls"):
        with tape:
            pass
    with pytest.raises(RuntimeError, match="do not nest"):
        with tape, ops.GeometryTape():
            pass


def test_geometry_tape_forgets_an_interrupted_recording():
    xyz = cloud(1, 128, 3)
    tape = ops.GeometryTape()
    with pytest.raises(KeyError):
        with tape:
            po.knn_query(8, xyz, xyz)
            raise KeyError("interrupted")
    assert not tape.recorded and tape.entries == []
    with tape:
        idx, _ = po.knn_query(8, xyz, xyz)
    assert tape.recorded and torch.equal(tape.entries[0][1][0], idx)


@pytest.mark.parametrize("b, n, m, k", [(2, 2048, 2048, 16), (1, 20000, 3000, 16),
                                        (3, 500, 200, 3), (2, 10, 7, 10)])
def test_knn_matmul_form_matches_reference(b, n, m, k):
    # The CUDA fast path's arithmetic, checked on the CPU: rooms in metres, offset from the
    # origin as S3DIS rooms are, so the GEMM ranking would lose neighbours without centring.
    support = cloud(b, n, 3).abs() * 4 + 30
    query = support[:, :m] if m == n else cloud(b, m, 3, seed=1).abs() * 4 + 30
    assert_same_knn(po.knn_query_matmul(k, support, query, chunk=1024),
                    po.knn_query_reference(k, support, query))


def test_knn_matmul_form_ignores_autocast():
    # Training runs the model (and so its kNN) under bf16 autocast, which would otherwise run
    # the ranking GEMM in bf16.
    support = cloud(2, 3000, 3).abs() * 4 + 30
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = po.knn_query_matmul(16, support, support)
    assert_same_knn(fast, po.knn_query_reference(16, support, support))
