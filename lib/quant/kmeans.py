"""Codebooks for one layer's weights: 1-D k-means (Deep Compression, Han et al. ICLR 2016, Sec. 3;
HAQ's k-means quantization) and a uniform grid, both returned as (codebook, indices).

1-D k-means is exact and fast on sorted weights: every cluster is a contiguous run whose borders
are the midpoints between neighbouring centroids, so Lloyd's assignment step is one
`searchsorted` of the K-1 midpoints and its update step is K run means from prefix sums.
That is O(n log n) once for the sort and O(K log n) per iteration (scikit-learn's KMeans pays
O(nK) per iteration), which leaves time for two starts and for swaps that move Lloyd out of
poor local optima. bench/quant.py compares speed and error with scikit-learn.
"""
import hashlib
import math

import numpy as np
import torch
from torch.utils.weak import WeakIdKeyDictionary

from lib.threads import single_thread

METHODS = ("kmeans", "linear")
INITS = ("auto", "linear", "density", "kmeans++")
# Measured on Gaussian, Laplace, uniform, bimodal and outlier weights (1k-20k, 2-8 bits): 0.25
# keeps the error within 1% of trying every swap at half its time; 1.0 loses up to 6%.
SWAP_SLACK = 0.25


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
    with single_thread(weights.device):  # many small ops: threads only add hand-offs
        return _kmeans(weights.detach().reshape(-1).float(), 2 ** bits, init, n_init, max_iter,
                       max_swaps, seed)


def _kmeans(flat, k, init, n_init, max_iter, max_swaps, seed):
    if not bool(torch.isfinite(flat).all()):
        raise ValueError("kmeans.py: the weights contain NaN or inf")
    order = _argsort(flat)
    values = flat[order]  # (n,) ascending
    distinct = torch.unique_consecutive(values)
    if distinct.numel() <= k:
        # One centroid per distinct value: zero error, and no cluster can be empty.
        return distinct, torch.searchsorted(distinct, flat)
    data = SortedWeights(values)
    starts = []
    if init in ("auto", "linear"):
        starts.append(torch.unique(torch.linspace(data.x[0].item(), data.x[-1].item(), k,
                                                  dtype=data.x.dtype, device=data.x.device)))
    if init in ("auto", "density"):
        starts.append(_density_init(data, k))
    if init == "kmeans++":
        generator = torch.Generator().manual_seed(seed)  # CPU draws: same result on any device
        starts += [_kmeans_plus_plus(data, k, generator) for _ in range(n_init)]
    best_sse, bounds = float("inf"), None
    for centroids in starts:
        sse, found = _swap(data, _lloyd(data, centroids, k, max_iter), k, max_iter, max_swaps)
        if sse < best_sse:
            best_sse, bounds = sse, found
    means = data.means(bounds)
    run_ids = torch.repeat_interleave(torch.arange(means.numel(), device=flat.device),
                                      bounds.diff())
    indices = torch.empty_like(run_ids).scatter_(0, order, run_ids)  # back to the weights' order
    return means.float(), indices


def _argsort(flat):
    """Ascending order of a 1-D float tensor. On CPU numpy's vectorised sort is 10x faster than
    torch.sort (3 ms against 35 ms for 262k weights on one thread, measured here)."""
    if flat.device.type == "cpu":
        return torch.from_numpy(np.argsort(flat.numpy()))
    return torch.argsort(flat)


class SortedWeights:
    """Sorted weights (float64) with prefix sums of x and x^2, so that the count, sum and squared
    error of any run of consecutive weights costs O(1). A clustering is a bounds vector
    (..., K+1), 0 = b_0 <= b_1 <= ... <= b_K = n: cluster j is the run x[b_j : b_j+1]."""

    def __init__(self, values):
        self.x = values.double()  # float64 prefix sums keep run means exact to float32 precision
        self.x2 = 2 * self.x  # midpoint tests without halving: 2x < c_j + c_j+1
        zero = self.x.new_zeros(1)
        self.p1 = torch.cat([zero, self.x.cumsum(0)])  # (n+1,)
        self.p2 = torch.cat([zero, (self.x * self.x).cumsum(0)])  # (n+1,)
        self.n = self.x.numel()
        self.first = torch.zeros(1, dtype=torch.int64, device=self.x.device)
        self.last = torch.full((1,), self.n, dtype=torch.int64, device=self.x.device)

    def assign(self, centroids):
        """Bounds (..., K+1) of the nearest-centroid clusters of ascending centroids (..., K).
        A weight exactly on a midpoint goes to the right-hand centroid."""
        borders = torch.searchsorted(self.x2, centroids[..., :-1] + centroids[..., 1:])
        if borders.dim() == 1:  # Lloyd's hot loop: no new tensors for the ends
            return torch.cat([self.first, borders, self.last])
        shape = borders.shape[:-1] + (1,)
        return torch.cat([borders.new_zeros(shape), borders, borders.new_full(shape, self.n)], -1)

    def sums(self, bounds, prefix=None):
        return (self.p1 if prefix is None else prefix)[bounds].diff(dim=-1)

    def means(self, bounds):
        """Mean of each non-empty run, clamped into the run's value range, which float rounding
        could otherwise leave, so runs (which never share a value) give distinct centroids."""
        lo, hi = bounds[..., :-1], bounds[..., 1:]
        means = self.sums(bounds) / (hi - lo).clamp(min=1)
        return torch.minimum(torch.maximum(means, self.x[lo.clamp(max=self.n - 1)]),
                             self.x[(hi - 1).clamp(min=0)])

    def total_error(self, bounds):
        return float(self.error(bounds, self.means(bounds)).sum())

    def error(self, bounds, centres):
        """Squared error of each run about its centre: (..., K), clamped at 0 against rounding."""
        counts = bounds.diff(dim=-1)
        squares = self.sums(bounds, self.p2)
        return (squares - 2 * centres * self.sums(bounds) + centres * centres * counts).clamp(min=0)


def _lloyd(data, centroids, k, max_iter):
    """Lloyd iterations from ascending centroids -> bounds of the final clusters, all non-empty
    unless max_iter cut a repair short (those are dropped)."""
    bounds = data.assign(centroids)
    for _ in range(max_iter):
        counts = bounds.diff()
        if counts.numel() < k or not bool(counts.all()):
            centroids = _repair(data, bounds, k)
        else:
            centroids = data.p1[bounds].diff() / counts
        new_bounds = data.assign(centroids)
        if torch.equal(new_bounds, bounds):
            break
        bounds = new_bounds
    return torch.unique_consecutive(bounds)


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
        means = data.means(bounds)
        error = data.error(bounds, means)  # (K,)
        pairs = torch.stack([bounds[:-2], bounds[2:]], -1)  # (K-1, 2): neighbours merged
        merge_cost = data.error(pairs, data.means(pairs))[:, 0] - error[:-1] - error[1:]
        split_at = torch.searchsorted(data.x, means).clamp(min=bounds[:-1] + 1, max=bounds[1:] - 1)
        halves = torch.stack([bounds[:-1], split_at, bounds[1:]], -1)  # (K, 3)
        gain = torch.where(bounds[1:] - bounds[:-1] > 1,
                           error - data.error(halves, data.means(halves)).sum(-1), -1.0)
        split = int(torch.argmax(gain))
        merge_cost[max(split - 1, 0):split + 1] = float("inf")  # merges involving the split one
        merge = int(torch.argmin(merge_cost))
        if not gain[split] > SWAP_SLACK * merge_cost[merge]:
            break
        keep = torch.ones_like(means, dtype=torch.bool)
        keep[[split, merge, merge + 1]] = False
        centroids = torch.cat([means[keep], data.means(halves[split]), data.means(pairs[merge])])
        new_bounds = _lloyd(data, torch.sort(centroids).values, k, max_iter)
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
    bounds = torch.unique_consecutive(bounds)  # drops the empty runs
    means = data.means(bounds)
    missing = k - means.numel()
    # Only a run holding two or more distinct values can be split (one exists: the weights hold
    # more distinct values than k); its farther end from the mean is its worst-fitting weight.
    lo, hi = data.x[bounds[:-1]], data.x[bounds[1:] - 1]
    splittable = hi > lo
    score = torch.where(splittable, data.error(bounds, means), -1.0)
    donors = torch.topk(score, min(missing, int(splittable.sum()))).indices
    far_high = hi[donors] - means[donors] > means[donors] - lo[donors]
    seeds = torch.where(far_high, hi[donors], lo[donors])
    return torch.sort(torch.cat([means, seeds])).values


def _density_init(data, k):
    """Panter & Dite (1951): with many levels, the optimal quantizer places centroids with a
    density proportional to p(x)^(1/3). Its k mid-quantiles, from a histogram of the weights
    (4 sqrt(n) bins, at least k, at most 4096), start Lloyd near the optimum whatever the
    weights' shape; empty bins get no centroid."""
    x = data.x
    bins = max(k, min(4096, int(4 * math.sqrt(data.n))))
    edges = torch.linspace(x[0].item(), x[-1].item(), bins + 1, dtype=x.dtype, device=x.device)
    counts = torch.searchsorted(x, edges[1:-1], right=True)  # weights below each inner edge
    counts = torch.cat([counts, data.last]).diff(prepend=data.first)  # (bins,)
    mass = torch.cat([x.new_zeros(1), (counts.double() ** (1 / 3)).cumsum(0)])  # (bins+1,)
    mass = mass / mass[-1]
    target = (torch.arange(k, dtype=x.dtype, device=x.device) + 0.5) / k
    j = (torch.searchsorted(mass, target, right=True) - 1).clamp(0, bins - 1)
    within = (target - mass[j]) / (mass[j + 1] - mass[j])  # a target never falls in an empty bin
    return torch.unique(edges[j] + within * (edges[j + 1] - edges[j]))


def _kmeans_plus_plus(data, k, generator):
    """Greedy k-means++ (Arthur & Vassilvitskii 2007, with scikit-learn's 2 + ln k local
    trials): each next centroid is the best of a few candidates drawn with probability
    ~ D(x)^2. On sorted weights a draw picks a run by its D^2 mass (from prefix sums), then a
    weight inside that run, and a candidate's potential is K run errors, so seeding costs about
    O(n log k) instead of scikit-learn's O(nk)."""
    x, trials = data.x, 2 + int(math.log(k))
    first = int(torch.randint(data.n, (1,), generator=generator))
    centroids = x[first:first + 1]  # (1,)
    for _ in range(1, k):
        bounds = data.assign(centroids)
        mass = data.error(bounds, centroids).cpu()  # (m,) D^2 mass of each centroid's run
        if not mass.sum() > 0:
            break
        bounds = bounds.cpu()
        picks = []
        for run, u in zip(torch.multinomial(mass, trials, replacement=True, generator=generator),
                          torch.rand(trials, generator=generator, dtype=torch.float64)):
            lo, hi = int(bounds[run]), int(bounds[run + 1])
            cum = ((x[lo:hi] - centroids[run]) ** 2).cumsum(0)
            at = torch.searchsorted(cum, u.item() * cum[-1], right=True).clamp(max=hi - lo - 1)
            picks.append(lo + int(at))
        candidates = torch.sort(torch.cat([centroids.expand(trials, -1),
                                           x[picks].unsqueeze(1)], 1), dim=1).values  # (T, m+1)
        potential = data.error(data.assign(candidates), candidates).sum(1)  # (T,)
        centroids = candidates[int(torch.argmin(potential))]
    return torch.unique(centroids)


def uniform_codebook(weights, bits):
    """Linear (uniform, symmetric, per-layer) quantization as a codebook: the grid of 2^bits
    levels (j - (2^bits - 1)/2) * delta, j = 0 .. 2^bits - 1, spans [-max|w|, max|w|]
    (mid-rise: every code is used symmetrically, and 1 bit gives +-max|w|); each weight takes its
    nearest level. Returns (codebook (K,) float32 = the levels actually used, ascending;
    indices (n,) int64), like kmeans_1d, so every later step treats both methods alike."""
    w = weights.detach().reshape(-1).float()
    top = w.abs().max()
    if top == 0:
        return w.new_zeros(1), torch.zeros(w.numel(), dtype=torch.int64, device=w.device)
    half = (2 ** bits - 1) / 2
    delta = top / half
    codes = torch.clamp(torch.round(w / delta + half), 0, 2 ** bits - 1).long()  # (n,)
    used, indices = torch.unique(codes, return_inverse=True)
    return (used.float() - half) * delta, indices


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
