import numpy as np
import pytest
import torch

from lib.quant import kmeans
from lib.quant.kmeans import KMeansCache, cluster, index_dtype, kmeans_1d, uniform_codebook


def sse(weights, codebook, indices):
    w = weights.reshape(-1).double()
    return float(((w - codebook.double()[indices.reshape(-1).long()]) ** 2).sum())


def hard_inputs():
    g = torch.Generator().manual_seed(0)
    return {
        "gaussian": torch.randn(3000, generator=g),
        "duplicates": torch.round(torch.randn(3000, generator=g) * 4) / 4,  # ~35 distinct values
        "outlier": torch.cat([torch.randn(2000, generator=g) * 0.01, torch.tensor([10.0])]),
        "five_values": torch.tensor([-1.0, -0.5, 0.0, 0.25, 2.0]).repeat(40),
        "two_values": torch.tensor([0.5, -0.5]).repeat(100),
        "constant": torch.full((64,), 0.3),
    }


@pytest.mark.parametrize("init", ["auto", "linear", "density", "kmeans++"])
@pytest.mark.parametrize("bits", [1, 2, 4, 6])
def test_codebook_is_finite_distinct_and_every_cluster_used(init, bits):
    for name, w in hard_inputs().items():
        codebook, indices = kmeans_1d(w, bits, init=init)
        distinct = w.unique().numel()
        assert codebook.dtype == torch.float32 and torch.isfinite(codebook).all(), name
        assert (codebook.diff() > 0).all(), name  # ascending, hence no duplicates
        # At most 2^b clusters and never more than distinct values; empty clusters are repaired
        # (the outlier leaves linear init's centroids empty), so all of them are filled.
        assert codebook.numel() == min(2 ** bits, distinct), name
        assert indices.shape == w.shape and indices.dtype == torch.int64
        assert torch.equal(indices.unique(), torch.arange(codebook.numel())), name


@pytest.mark.parametrize("init", ["auto", "linear", "density", "kmeans++"])
def test_result_is_a_lloyd_fixed_point(init):
    """Every weight sits in its nearest centroid's cluster; every centroid is its cluster's mean."""
    w = hard_inputs()["gaussian"]
    codebook, indices = kmeans_1d(w, 4, init=init)
    distance = (w[:, None] - codebook[None, :]).abs()  # (n, K)
    assert (distance[torch.arange(w.numel()), indices] <= distance.min(1).values + 1e-6).all()
    sums = torch.zeros(codebook.numel(), dtype=torch.float64).index_add_(0, indices, w.double())
    counts = torch.bincount(indices, minlength=codebook.numel())
    torch.testing.assert_close(codebook.double(), sums / counts, rtol=0, atol=1e-6)


def test_fewer_distinct_values_than_clusters_gives_exactly_those_values():
    values = torch.tensor([-0.3, -0.1, 0.0, 0.2, 0.7])
    w = values[torch.randint(5, (192,), generator=torch.Generator().manual_seed(0))]
    codebook, indices = kmeans_1d(w, 8)
    assert torch.equal(codebook, values)
    assert torch.equal(codebook[indices], w)


@pytest.mark.parametrize("distribution", ["gaussian", "laplace", "uniform"])
@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_sse_no_worse_than_sklearn(distribution, bits):
    KMeans = pytest.importorskip("sklearn.cluster").KMeans
    g = torch.Generator().manual_seed(bits)
    w = {"gaussian": lambda: torch.randn(4000, generator=g) * 0.05,
         "laplace": lambda: torch.distributions.Laplace(0, 0.05).sample((4000,)),
         "uniform": lambda: torch.rand(4000, generator=g) - 0.5}[distribution]()
    ours = sse(w, *kmeans_1d(w, bits))
    x = w.numpy()[:, None]
    for n_init in (1, 3):
        km = KMeans(2 ** bits, n_init=n_init, random_state=0).fit(x)
        theirs = sse(w, torch.from_numpy(km.cluster_centers_[:, 0]), torch.from_numpy(km.labels_))
        assert ours <= theirs * 1.02, (n_init, ours, theirs)


def plain_kmeans(w, bits, max_iter=50, max_swaps=32, slack=0.25):
    """kmeans_1d(init="linear") written plainly, as an independent check of the sorted-run
    bookkeeping: dense nearest-centroid labels from an (n, K) distance table, cluster statistics
    from the members themselves. Returns (centroids float64, labels)."""
    x = w.reshape(-1).double()
    k = 2 ** bits

    def label(centroids):
        return (x[:, None] - centroids[None, :]).abs().argmin(1)  # no exact midpoints here

    def error(members):
        return float(((members - members.mean()) ** 2).sum())

    def clusters(labels):  # non-empty clusters, ascending: (means, member lists)
        members = [x[labels == j] for j in labels.unique()]
        return torch.stack([m.mean() for m in members]), members

    def lloyd(centroids):
        labels = label(centroids)
        for _ in range(max_iter):
            means, members = clusters(labels)
            if len(members) < k or len(members) < len(centroids):  # empty clusters: re-seed
                fits = [(error(m), m) for m in members if m.max() > m.min()]
                fits.sort(key=lambda fit: -fit[0])
                seeds = [m.max() if m.max() - m.mean() > m.mean() - m.min() else m.min()
                         for _, m in fits[:k - len(members)]]
                means = torch.sort(torch.cat([means, torch.stack(seeds)])).values
            new_labels = label(means)
            if len(means) == len(centroids) and torch.equal(new_labels, labels):
                break
            centroids, labels = means, new_labels
        return clusters(labels)[1]

    def halves(m):
        m = torch.sort(m).values
        at = min(max(int((m < m.mean()).sum()), 1), len(m) - 1)
        return m[:at], m[at:]

    members = lloyd(torch.unique(torch.linspace(float(x.min()), float(x.max()), k,
                                                dtype=torch.float64)))
    sse = sum(error(m) for m in members)
    for _ in range(max_swaps):
        errors = [error(m) for m in members]
        merge_cost = [error(torch.cat([a, b])) - ea - eb
                      for a, b, ea, eb in zip(members, members[1:], errors, errors[1:])]
        gain = [e - sum(error(h) for h in halves(m)) if len(m) > 1 else -1.0
                for m, e in zip(members, errors)]
        split = max(range(len(gain)), key=lambda j: gain[j])
        for j in (split - 1, split):
            if 0 <= j < len(merge_cost):
                merge_cost[j] = float("inf")
        merge = min(range(len(merge_cost)), key=lambda j: merge_cost[j])
        if not gain[split] > slack * merge_cost[merge]:
            break
        kept = [m.mean() for j, m in enumerate(members) if j not in (split, merge, merge + 1)]
        moved = [h.mean() for h in halves(members[split])]
        moved.append(torch.cat([members[merge], members[merge + 1]]).mean())
        found = lloyd(torch.sort(torch.stack(kept + moved)).values)
        found_sse = sum(error(m) for m in found)
        if not found_sse < sse:
            break
        members, sse = found, found_sse
    centroids = torch.stack([m.mean() for m in members])
    return centroids, label(centroids)


def laplace(n, scale, generator):
    """n Laplace(0, scale) draws by the inverse CDF of uniforms from `generator`."""
    u = torch.rand(n, generator=generator, dtype=torch.float64) - 0.5
    return (-scale * torch.sign(u) * torch.log1p(-2 * u.abs())).float()


def test_each_weight_indexes_its_nearest_centroid_when_lloyd_is_cut_short():
    """Lloyd stopped by max_iter before it converged: the indices were the last assignment's,
    so some weights indexed a farther centroid than the nearest of the codebook returned (5 of
    1,500 Laplace weights at 2 bits, 0.0001 nearer another, with the default 50 iterations; 18
    of pt_seg_tiny's 688 layer-and-width pairs). Each now indexes its nearest, as plain_kmeans
    relabels at its end, which can only lower the error."""
    g = torch.Generator().manual_seed(25)
    for max_iter in (1, 2, 3, 50):
        for bits in (2, 3):
            w = laplace(1500, 0.05, g)
            codebook, indices = kmeans_1d(w, bits, init="linear", max_iter=max_iter)
            distance = (w.double()[:, None] - codebook.double()[None, :]).abs()
            chosen = distance.gather(1, indices[:, None]).squeeze(1)
            assert torch.equal(chosen, distance.min(1).values), (max_iter, bits)


@pytest.mark.parametrize("bits", [2, 4, 6])
def test_matches_plain_lloyd_with_swaps(bits):
    """Same clusters as the plain form on layer-like weights, including an outlier that leaves
    linear init's centroids empty (the repair path) and swaps that move stranded centroids."""
    g = torch.Generator().manual_seed(bits)
    layers = {"kaiming_uniform": (torch.rand(1500, generator=g) - 0.5) * 0.1,
              "gaussian": torch.randn(1500, generator=g) * 0.05,
              # drawn from g, as the others (Laplace's sample() took torch's global generator,
              # so the weights depended on the tests run before)
              "laplace": laplace(1500, 0.05, g),
              "outlier": torch.cat([torch.randn(1500, generator=g) * 0.01, torch.tensor([1.0])])}
    for name, w in layers.items():
        codebook, indices = kmeans_1d(w, bits, init="linear")
        centroids, labels = plain_kmeans(w, bits)
        assert torch.equal(indices, labels), name
        torch.testing.assert_close(codebook.double(), centroids, rtol=1e-6, atol=0)


def test_same_seed_same_codebook():
    w = hard_inputs()["gaussian"]
    a, b = kmeans_1d(w, 5, init="kmeans++", seed=3), kmeans_1d(w, 5, init="kmeans++", seed=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("n", [500, 5000])  # np.argsort and the radix sort
@pytest.mark.parametrize("bad", [float("nan"), -float("nan"), float("inf"), -float("inf")])
def test_nan_and_inf_are_errors(n, bad):
    w = torch.randn(n, generator=torch.Generator().manual_seed(0))
    w[n // 2] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        kmeans_1d(w, 4)


def test_radix_sort_orders_like_argsort():
    g = torch.Generator().manual_seed(0)
    w = torch.cat([torch.randn(5000, generator=g), torch.tensor([0.0, -0.0, 1e-40, -1e-40,
                                                                  3e38, -3e38])])
    w = w[torch.randperm(w.numel(), generator=g)].numpy()
    assert np.array_equal(w[kmeans._argsort(w)], np.sort(w))


def test_prefix_sums_are_numpys_sequential_sums():
    x = np.random.default_rng(0).normal(size=100000)
    assert np.array_equal(kmeans._prefix_sums(x), np.concatenate([[0.0], np.cumsum(x)]))
    assert np.array_equal(kmeans._prefix_sums(x, square=True),
                          np.concatenate([[0.0], np.cumsum(x * x)]))


def test_unknown_init_and_method_are_errors():
    with pytest.raises(ValueError, match="init"):
        kmeans_1d(torch.randn(100), 2, init="random")
    with pytest.raises(ValueError, match="method"):
        cluster(torch.randn(100), 2, method="pq")


@pytest.mark.parametrize("bits", [1, 2, 3, 8])
def test_linear_levels_are_a_symmetric_uniform_grid(bits):
    w = torch.randn(5000, generator=torch.Generator().manual_seed(bits))
    codebook, indices = uniform_codebook(w, bits)
    top = w.abs().max()
    delta = 2 * top / (2 ** bits - 1)
    steps = codebook / delta + (2 ** bits - 1) / 2  # grid positions 0 .. 2^b - 1
    torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-4)
    assert steps.min() >= -1e-4 and steps.max() <= 2 ** bits - 1 + 1e-4
    assert codebook.numel() <= 2 ** bits and (codebook.diff() > 0).all()
    # the extreme weight keeps its value; every weight takes its nearest grid level
    torch.testing.assert_close(codebook.abs().max(), top)
    assert ((w - codebook[indices]).abs() <= delta / 2 + 1e-6).all()
    # symmetric: negating the weights mirrors the levels
    mirrored, _ = uniform_codebook(-w, bits)
    torch.testing.assert_close(mirrored, -codebook.flip(0))


def test_linear_of_all_zero_weights_is_one_zero_level():
    codebook, indices = uniform_codebook(torch.zeros(10), 4)
    assert torch.equal(codebook, torch.zeros(1)) and torch.equal(indices, torch.zeros(10).long())


def test_cache_reuses_results_and_never_serves_stale_ones():
    cache = KMeansCache()
    w = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    first = cache.cluster("fc", w, 3)
    first[0].add_(1.0)  # a caller training its codebook in place must not change the cache
    again = cache.cluster("fc", w.clone(), 3)
    assert (cache.hits, cache.misses) == (1, 1)
    expected = kmeans_1d(w, 3)
    assert torch.equal(again[0], expected[0]) and torch.equal(again[1], expected[1])
    cache.cluster("fc", w, 4)
    cache.cluster("fc", w, 3, method="linear")
    changed = w.clone()
    changed[0, 0] += 0.5
    assert torch.equal(cache.cluster("fc", changed, 3)[1], kmeans_1d(changed, 3)[1])
    assert (cache.hits, cache.misses, len(cache)) == (1, 4, 4)
    # a tensor is hashed once while unchanged; an in-place change (version bump) rehashes it
    hashed = cache.hashed
    cache.cluster("fc", w, 3)
    assert cache.hashed == hashed
    w.add_(0.5)
    assert torch.equal(cache.cluster("fc", w, 3)[1], kmeans_1d(w, 3)[1])
    assert cache.hashed == hashed + 1 and cache.misses == 5


def test_index_dtype_is_compact():
    assert index_dtype(1) == index_dtype(8) == torch.uint8
    assert index_dtype(9) == index_dtype(15) == torch.int16
    assert index_dtype(16) == torch.int32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    w = torch.randn(20000, generator=torch.Generator().manual_seed(0))
    for bits in (2, 4, 8):
        cpu = kmeans_1d(w, bits)
        gpu = kmeans_1d(w.cuda(), bits)
        assert gpu[0].is_cuda and gpu[1].is_cuda
        assert np.isclose(sse(w, *cpu), sse(w, gpu[0].cpu(), gpu[1].cpu()), rtol=1e-5)


@pytest.mark.parametrize("values, bits", [([3e38, -3e38, 1.0, -1.0], 1),  # the step overflowed
                                          ([1e-45, 0.0, -1e-45], 8),  # levels rounded together
                                          ([3.4e38, -1e-45, 2.0], 4)])
def test_uniform_codebook_stays_finite_and_ascending_at_float32s_ends(values, bits):
    w = torch.tensor(values)
    codebook, indices = uniform_codebook(w, bits)
    assert torch.isfinite(codebook).all() and (codebook.diff() > 0).all(), codebook
    assert torch.isfinite(codebook[indices]).all()
    assert (codebook[indices] - w).abs().max() <= w.abs().max()  # each weight on the grid
    with pytest.raises(ValueError, match="NaN or inf"):
        uniform_codebook(torch.tensor([1.0, float("nan")]), bits)
