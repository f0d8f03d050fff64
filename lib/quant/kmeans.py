"""Codebooks for one layer's weights: 1-D k-means (Deep Compression, Han et al. ICLR 2016, Sec. 3;
HAQ's k-means quantization) and a uniform grid, both returned as (codebook, indices).

1-D k-means is exact and fast on sorted weights: every cluster is a contiguous run whose borders
are the midpoints between neighbouring centroids, so Lloyd's assignment step is one
`searchsorted` of the K-1 midpoints and its update step is K run means from prefix sums.
That is O(n log n) once for the sort and O(K log n) per iteration (scikit-learn's KMeans pays
O(nK) per iteration), which leaves time for two starts and for swaps that move Lloyd out of
poor local optima. The clustering runs in numpy float64 on the CPU whatever the weights' device:
it is hundreds of calls on a few dozen values per layer, and such a numpy call costs 0.6-1 us
against 2-3 us for torch's (measured here, one thread; a GPU's kernel launches cost more).
bench/quant.py compares speed and error with scikit-learn.
"""
import hashlib
import math

import numpy as np
import torch
from torch.utils.weak import WeakIdKeyDictionary

METHODS = ("kmeans", "linear")
INITS = ("auto", "linear", "density", "kmeans++")
# Measured on Gaussian, Laplace, uniform, bimodal and outlier weights (1k-20k, 2-8 bits): 0.25
# keeps the error within 1% of trying every swap at half its time; 1.0 loses up to 6%.
SWAP_SLACK = 0.25
# Above this many weights a radix sort beats np.argsort (see _argsort).
RADIX_MIN = 1024


def kmeans_1d(weights, bits, init="auto", n_init=1, max_iter=50, max_swaps=32, seed=0):
    """Lloyd's k-means of the weights into at most 2^bits centroids.

    init: "linear" (evenly spaced between min and max, Deep Compression's choice, which keeps
    the rare large weights), "density" (quantiles of the cube-root density, the asymptotically
    optimal spacing), "kmeans++" (n_init greedy D^2 seedings, as scikit-learn seeds), or "auto"
    (linear and density; the lower squared error wins: linear on near-uniform weights, density
    on peaked ones, where linear leaves centroids stranded in the tails). All but k-means++
    are deterministic.
    Each start iterates until the assignment stops changing or `max_iter`, then tries up to
    `max_swaps` centroid swaps (_swap), each kept only if it lowers the error.
    Returns (codebook (K,) float32 ascending, without NaN or duplicates, K <= min(2^bits,
    distinct values); indices (n,) int64 into the codebook, in the weights' flattened order),
    on the weights' device.
    """
    if init not in INITS:
        raise ValueError(f"kmeans.py: unknown init {init!r}; use one of {INITS}")
    flat = weights.detach().reshape(-1).float()
    values = flat.cpu().numpy()  # (n,) float32, shares memory on the CPU: read only
    order = _argsort(values)
    x = values[order].astype(np.float64)  # (n,) ascending
    if not (np.isfinite(x[0]) and np.isfinite(x[-1])):  # NaN and inf sort to the ends
        raise ValueError("kmeans.py: the weights contain NaN or inf")
    codebook, bounds = _kmeans(x, 2 ** bits, init, n_init, max_iter, max_swaps, seed)
    indices = np.empty(values.size, dtype=np.int64)
    indices[order] = np.repeat(np.arange(codebook.size), np.diff(bounds))  # the weights' order
    return (torch.from_numpy(codebook.astype(np.float32)).to(flat.device),
            torch.from_numpy(indices).to(flat.device))


def _kmeans(x, k, init, n_init, max_iter, max_swaps, seed):
    """Best clustering of ascending float64 weights x -> (centroids (K,), bounds (K+1,))."""
    run_starts = np.flatnonzero(x[1:] != x[:-1]) + 1
    if run_starts.size < k:
        # One centroid per distinct value: zero error, and no cluster can be empty.
        bounds = np.concatenate([[0], run_starts, [x.size]])
        return x[bounds[:-1]], bounds
    data = SortedWeights(x)
    starts = []
    if init in ("auto", "linear"):
        starts.append(np.unique(np.linspace(x[0], x[-1], k)))
    if init in ("auto", "density"):
        starts.append(_density_init(data, k))
    if init == "kmeans++":
        generator = torch.Generator().manual_seed(seed)
        starts += [_kmeans_plus_plus(data, k, generator) for _ in range(n_init)]
    best_sse, bounds = float("inf"), None
    for centroids in starts:
        sse, found = _swap(data, _lloyd(data, centroids, k, max_iter), k, max_iter, max_swaps)
        if sse < best_sse:
            best_sse, bounds = sse, found
    centroids = data.means(bounds)
    # Each weight indexes its nearest centroid: Lloyd cut short by max_iter left a few nearer
    # another centroid than their cluster's mean (the same bounds once it has converged; never
    # more error; a centroid left without weights stays in the codebook, unused)
    return centroids, data.assign(centroids)


def _argsort(values):
    """Ascending order of float32 values, NaN first or last. np.argsort is a comparison sort;
    an LSD radix sort of the order-preserving uint32 key, as two stable 16-bit passes (numpy
    sorts 16-bit keys by radix), is faster from about 1k weights on (measured here, one thread:
    16 against 21 us at 1k weights, 0.2 against 0.95 ms at 16k, 0.9 against 3.4 ms at 64k)."""
    if values.size < RADIX_MIN:
        return np.argsort(values)
    # Negative floats: flip all bits (larger magnitude sorts first); positive: set the sign bit.
    # In place: two temporaries of n values fewer.
    key = (values.view(np.int32) >> 31).view(np.uint32)
    key |= np.uint32(1 << 31)
    key ^= values.view(np.uint32)
    order = np.argsort(key.astype(np.uint16), kind="stable")  # by the low 16 bits
    key >>= 16
    return order[np.argsort(key.astype(np.uint16)[order], kind="stable")]


class SortedWeights:
    """Sorted weights (float64) with prefix sums of x and x^2, so that the count, sum and squared
    error of any run of consecutive weights costs O(1). A clustering is a bounds vector
    (..., K+1), 0 = b_0 <= b_1 <= ... <= b_K = n: cluster j is the run x[b_j : b_j+1]; the run
    methods take its starts and ends, lo = bounds[..., :-1] and hi = bounds[..., 1:]."""

    def __init__(self, x):
        self.x = x  # float64 prefix sums keep run means exact to float32 precision
        self.p1 = _prefix_sums(x)  # (n+1,)
        self.p2 = _prefix_sums(x, square=True)  # (n+1,)
        self.n = x.size
        self.first, self.last = np.zeros(1, dtype=np.int64), np.full(1, self.n, dtype=np.int64)

    def assign(self, centroids):
        """Bounds (..., K+1) of the nearest-centroid clusters of ascending centroids (..., K).
        A weight exactly on a midpoint goes to the right-hand centroid. Halving is exact: the
        centroids are means of float32 weights, far above float64's subnormal range."""
        if centroids.ndim == 1:  # Lloyd's hot loop: as few numpy calls as can be
            borders = self.x.searchsorted((centroids[:-1] + centroids[1:]) * 0.5)
            return np.concatenate((self.first, borders, self.last))
        borders = self.x.searchsorted((centroids[..., :-1] + centroids[..., 1:]) * 0.5)
        bounds = np.empty(borders.shape[:-1] + (borders.shape[-1] + 2,), dtype=np.int64)
        bounds[..., 0], bounds[..., 1:-1], bounds[..., -1] = 0, borders, self.n
        return bounds

    def means(self, bounds):
        return self.run_means(bounds[..., :-1], bounds[..., 1:])

    def run_means(self, lo, hi):
        """Mean of each non-empty run, clamped into the run's value range, which float rounding
        could otherwise leave, so runs (which never share a value) give distinct centroids."""
        means = (self.p1[hi] - self.p1[lo]) / np.maximum(hi - lo, 1)
        return np.minimum(np.maximum(means, self.x[np.minimum(lo, self.n - 1)]),
                          self.x[np.maximum(hi - 1, 0)])

    def total_error(self, bounds):
        lo, hi = bounds[:-1], bounds[1:]
        return float(self.run_errors(lo, hi, self.run_means(lo, hi)).sum())

    def run_errors(self, lo, hi, centres):
        """Squared error of each run about its centre, clamped at 0 against rounding."""
        sums = self.p1[hi] - self.p1[lo]
        squares = self.p2[hi] - self.p2[lo]
        return np.maximum(squares - 2 * centres * sums + centres * centres * (hi - lo), 0.0)


def _prefix_sums(values, square=False):
    """(n+1,) 0, v_0, v_0 + v_1, ... of the values or their squares, in one new array. torch's
    cumsum adds in the same order as np.cumsum, so gives the same bits, 7x faster (numpy's
    accumulate takes about 8 ns a value, measured here)."""
    sums = np.empty(values.size + 1)
    sums[0] = 0.0
    tail = torch.from_numpy(sums[1:])
    if square:
        np.square(values, out=sums[1:])
        tail.cumsum_(0)
    else:
        torch.cumsum(torch.from_numpy(values), 0, out=tail)
    return sums


def _lloyd(data, centroids, k, max_iter):
    """Lloyd iterations from ascending centroids -> bounds of the final clusters, all non-empty
    unless max_iter cut a repair short (those are dropped)."""
    bounds = data.assign(centroids)
    for _ in range(max_iter):  # each numpy call here costs about a microsecond: few of them
        counts = bounds[1:] - bounds[:-1]
        if np.count_nonzero(counts) < k:  # clusters empty or missing
            centroids = _repair(data, bounds, k)
        else:
            sums = data.p1[bounds]
            centroids = (sums[1:] - sums[:-1]) / counts
        new_bounds = data.assign(centroids)
        # Equal bytes: same length and values, ten times cheaper than (a == b).all() on K+1 ints.
        if new_bounds.tobytes() == bounds.tobytes():
            break
        bounds = new_bounds
    return _drop_repeats(bounds)


def _drop_repeats(bounds):
    """np.unique of ascending bounds (the empty runs dropped) without its sort: 2.5 against
    8 us on 17 values (measured here)."""
    keep = np.empty(bounds.size, dtype=bool)
    keep[0] = True
    np.not_equal(bounds[1:], bounds[:-1], out=keep[1:])
    return bounds[keep]


def _swap(data, bounds, k, max_iter, max_swaps):
    """Lloyd stops at a local optimum, often with centroids stranded where few weights are.
    A swap moves one centroid from where it is cheapest to lose (the merge of two neighbouring
    clusters that adds the least error) to where it gains most (splitting a cluster at its
    mean), then runs Lloyd again; it is kept if the total error drops, and the first swap that
    does not help ends the search (the swap heuristic of Kanungo et al. 2004, restricted to the
    most promising pair). A swap is only tried when the split gains more than SWAP_SLACK times
    what the merge costs: Lloyd's re-balancing rarely makes up for more. Returns (total error,
    bounds)."""
    sse = data.total_error(bounds)
    for _ in range(max_swaps):
        lo, hi = bounds[:-1], bounds[1:]  # (K,) each
        means = data.run_means(lo, hi)
        error = data.run_errors(lo, hi, means)
        merged_lo, merged_hi = lo[:-1], hi[1:]  # (K-1,): neighbours merged
        merge_cost = (data.run_errors(merged_lo, merged_hi, data.run_means(merged_lo, merged_hi))
                      - error[:-1] - error[1:])
        split_at = np.minimum(np.maximum(np.searchsorted(data.x, means), lo + 1), hi - 1)
        halves = (data.run_errors(lo, split_at, data.run_means(lo, split_at))
                  + data.run_errors(split_at, hi, data.run_means(split_at, hi)))
        gain = np.where(hi - lo > 1, error - halves, -1.0)
        split = int(gain.argmax())
        merge_cost[max(split - 1, 0):split + 1] = np.inf  # merges involving the split one
        merge = int(merge_cost.argmin())
        if not gain[split] > SWAP_SLACK * merge_cost[merge]:
            break
        keep = np.ones(means.size, dtype=bool)
        keep[[split, merge, merge + 1]] = False
        moved = data.run_means(np.array([lo[split], split_at[split], lo[merge]]),
                               np.array([split_at[split], hi[split], hi[merge + 1]]))
        new_bounds = _lloyd(data, np.sort(np.concatenate([means[keep], moved])), k, max_iter)
        new_sse = data.total_error(new_bounds)
        if not new_sse < sse:
            break
        bounds, sse = new_bounds, new_sse
    return sse, bounds


def _repair(data, bounds, k):
    """Lloyd's update when clusters are empty or missing: the means of the non-empty runs, plus,
    for each of the missing clusters up to k, a re-seed at the worst-fitting weight of one of
    the clusters with the largest squared error (splitting it), so no centroid is ever 0/0 or a
    duplicate."""
    bounds = _drop_repeats(bounds)
    lo, hi = bounds[:-1], bounds[1:]
    means = data.run_means(lo, hi)
    missing = k - means.size
    # Only a run holding two or more distinct values can be split (one exists: the weights hold
    # more distinct values than k); its farther end from the mean is its worst-fitting weight.
    low, high = data.x[lo], data.x[hi - 1]
    splittable = high > low
    score = np.where(splittable, data.run_errors(lo, hi, means), -1.0)
    donors = np.argsort(-score, kind="stable")[:min(missing, int(splittable.sum()))]
    far_high = high[donors] - means[donors] > means[donors] - low[donors]
    seeds = np.where(far_high, high[donors], low[donors])
    return np.sort(np.concatenate([means, seeds]))


def _density_init(data, k):
    """Panter & Dite (1951): with many levels, the optimal quantizer places centroids with a
    density proportional to p(x)^(1/3). Its k mid-quantiles, from a histogram of the weights
    (4 sqrt(n) bins, at least k, at most 4096), start Lloyd near the optimum whatever the
    weights' shape; empty bins get no centroid."""
    x = data.x
    bins = max(k, min(4096, int(4 * math.sqrt(data.n))))
    edges = np.linspace(x[0], x[-1], bins + 1)
    below = np.searchsorted(x, edges[1:-1], side="right")  # weights below each inner edge
    counts = np.diff(np.concatenate([[0], below, [data.n]]))  # (bins,)
    mass = np.concatenate([[0.0], np.cumsum(np.cbrt(counts))])  # (bins+1,)
    mass = mass / mass[-1]
    target = (np.arange(k) + 0.5) / k
    j = np.clip(np.searchsorted(mass, target, side="right") - 1, 0, bins - 1)
    within = (target - mass[j]) / (mass[j + 1] - mass[j])  # a target never falls in an empty bin
    return np.unique(edges[j] + within * (edges[j + 1] - edges[j]))


def _kmeans_plus_plus(data, k, generator):
    """Greedy k-means++ (Arthur & Vassilvitskii 2007, with scikit-learn's 2 + ln k local
    trials): each next centroid is the best of a few candidates drawn with probability
    ~ D(x)^2. On sorted weights a draw picks a run by its D^2 mass (from prefix sums), then a
    weight inside that run, and a candidate's potential is K run errors, so seeding costs about
    O(n log k) instead of scikit-learn's O(nk). The draws come from torch's seeded generator."""
    x, trials = data.x, 2 + int(math.log(k))
    first = int(torch.randint(data.n, (1,), generator=generator))
    centroids = x[first:first + 1]  # (1,)
    for _ in range(1, k):
        bounds = data.assign(centroids)
        mass = data.run_errors(bounds[:-1], bounds[1:], centroids)  # (m,) D^2 mass of each run
        if not mass.sum() > 0:
            break
        runs = torch.multinomial(torch.from_numpy(mass), trials, replacement=True,
                                 generator=generator).numpy()
        draws = torch.rand(trials, generator=generator, dtype=torch.float64).numpy()
        picks = []
        for run, u in zip(runs, draws):
            lo, hi = bounds[run], bounds[run + 1]
            cum = np.cumsum((x[lo:hi] - centroids[run]) ** 2)
            picks.append(lo + min(np.searchsorted(cum, u * cum[-1], side="right"), hi - lo - 1))
        candidates = np.sort(np.concatenate([np.broadcast_to(centroids, (trials, centroids.size)),
                                             x[picks][:, None]], 1), axis=1)  # (T, m+1)
        spans = data.assign(candidates)
        potential = data.run_errors(spans[:, :-1], spans[:, 1:], candidates).sum(1)  # (T,)
        centroids = candidates[int(np.argmin(potential))]
    return np.unique(centroids)


def uniform_codebook(weights, bits):
    """Linear (uniform, symmetric, per-layer) quantization as a codebook: the grid of 2^bits
    levels (j - (2^bits - 1)/2) * delta, j = 0 .. 2^bits - 1, spans [-max|w|, max|w|]
    (mid-rise: every code is used symmetrically, and 1 bit gives +-max|w|); each weight takes its
    nearest level. Returns (codebook (K,) float32 = the levels actually used, ascending;
    indices (n,) int64), like kmeans_1d, so every later step treats both methods alike."""
    w = weights.detach().reshape(-1).float()
    top = w.abs().max()
    if not torch.isfinite(top):
        raise ValueError("kmeans.py: the weights contain NaN or inf")
    if top == 0:
        return w.new_zeros(1), torch.zeros(w.numel(), dtype=torch.int64, device=w.device)
    levels, indices = _grid(w, top, bits)
    if torch.isfinite(levels).all() and (levels.numel() == 1 or (levels.diff() > 0).all()):
        return levels, indices
    # Only at float32's ends: a grid step that overflows (|w| near 3e38) or levels that round
    # together (subnormal weights). The grid again in float64, its levels rounded to float32
    # and merged where they coincide, so the codebook stays finite and strictly ascending.
    levels, indices = _grid(w.double(), top.double(), bits)
    levels, merged = torch.unique(levels.float(), return_inverse=True)
    return levels, merged[indices]


def _grid(w, top, bits):
    """uniform_codebook's levels in use (in w's dtype) and each weight's index among them."""
    half = (2 ** bits - 1) / 2
    delta = top / half
    codes = torch.clamp(torch.round(w / delta + half), 0, 2 ** bits - 1).long()  # (n,)
    used, indices = torch.unique(codes, return_inverse=True)
    return (used.to(w.dtype) - half) * delta, indices


def cluster(weights, bits, method="kmeans"):
    """(codebook, indices) of one layer's weights by `method` in METHODS."""
    if method == "kmeans":
        return kmeans_1d(weights, bits)
    if method == "linear":
        return uniform_codebook(weights, bits)
    raise ValueError(f"kmeans.py: unknown quantization method {method!r}; use one of {METHODS}")


class KMeansCache:
    """Clustering results reused across HAQ episodes, where a layer's bit width often repeats.

    The key is (layer name, bits, method, content hash of the weight tensor): a model whose
    weights changed (fine-tuned, another checkpoint) gets fresh entries, never stale ones, so one
    cache may serve any number of model copies. Entries stay on the weights' device; indices are
    kept in the compact storage dtype. Hashing costs a copy of the weights to the CPU, far less
    than the clustering it saves, and is done once per weight tensor while it is unchanged (its
    version counter): HAQ's episodes pass the fp32 model's own parameters, so after the first
    episode no weights leave the device.
    """

    def __init__(self):
        self._entries = {}
        self._fingerprints = WeakIdKeyDictionary()  # weight tensor -> (version, fingerprint)
        self.hits = 0
        self.misses = 0
        self.hashed = 0  # weight tensors hashed (each a copy to the CPU)

    def cluster(self, name, weights, bits, method="kmeans"):
        key = (name, bits, method, self._fingerprint(weights))
        if key in self._entries:
            self.hits += 1
        else:
            self.misses += 1
            codebook, indices = cluster(weights.detach(), bits, method)
            self._entries[key] = (codebook, indices.to(index_dtype(bits)))
        codebook, indices = self._entries[key]
        # Copies: the caller trains the codebook in place, which must not reach the cache.
        return codebook.clone(), indices.long()

    def __len__(self):
        return len(self._entries)

    def _fingerprint(self, weights):
        known = self._fingerprints.get(weights)
        if known is not None and known[0] == weights._version:
            return known[1]
        data = weights.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        digest = hashlib.blake2b(data, digest_size=16).hexdigest()
        fingerprint = (tuple(weights.shape), str(weights.dtype), digest)
        self._fingerprints[weights] = (weights._version, fingerprint)
        self.hashed += 1
        return fingerprint


def index_dtype(bits):
    """Smallest integer dtype holding indices below 2^bits (uint8 up to 8 bits)."""
    if bits <= 8:
        return torch.uint8
    if bits <= 15:
        return torch.int16
    return torch.int32
