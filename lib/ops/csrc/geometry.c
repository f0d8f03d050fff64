/* Farthest point sampling and k-nearest-neighbour search on the CPU, float32, for the clouds
 * of a training batch and for rooms (lib/ops/dispatch.py says when these run). Built with the
 * other kernels here by lib/ops/native.py.
 *
 * Clouds are (B, N, 3) float32, contiguous; indices int64 within a cloud.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "parallel.h"

/* Failures of a parallel loop: bits set by any thread (atomically). */
enum { FAILED_MEMORY = 1, FAILED_NOT_FINITE = 2 };

static void fail(int *flags, int bit) { __atomic_fetch_or(flags, bit, __ATOMIC_RELAXED); }

/* ---- farthest point sampling ------------------------------------------------------------ */

/* Two forms with the same picks: the reference's O(N m) loop (fps_plain), and for clouds of
 * FPS_TREE_MIN_POINTS points or more the same loop pruned on a kd-split of the cloud
 * (fps_tree), which updates only the leaves that the new pick can reach. The two took the same
 * time on 2,048-point clouds and about the same on 4,096, the pruned one 2-4x less on 8,192 and
 * 12x less on 80,000 (bench/RESULTS.md, "FPS"). */
enum { FPS_TREE_MIN_POINTS = 4096 };

typedef struct {
    const float *xyz;
    const int64_t *start;
    int64_t *out;
    int64_t N, m;
    int failed; /* set by any thread (atomically) when its memory runs out */
} fps_args;

/* LANES floats as one vector (GCC / Clang vector extensions: one AVX-512 register, or two or
 * four narrower ones), and as many int32 lane indices. */
enum { LANES = 16 };
typedef float vfloat __attribute__((vector_size(4 * LANES)));
typedef int32_t vint __attribute__((vector_size(4 * LANES)));

static inline vfloat load(const float *p) {
    vfloat v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline vint load_int(const int32_t *p) {
    vint v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline vfloat pick(vint mask, vfloat yes, vfloat no) {
    return (vfloat)(((vint)yes & mask) | ((vint)no & ~mask));
}

static inline vint pick_int(vint mask, vint yes, vint no) { return (yes & mask) | (no & ~mask); }

static inline vint lane_numbers(void) {
    vint iota;
    for (int l = 0; l < LANES; ++l) iota[l] = l;
    return iota;
}

/* The number of the lane holding the largest value (into *best), the lowest among equals. */
static inline int32_t best_lane(vfloat value, vint number, float *best) {
    int32_t at = INT32_MAX;
    *best = -1.0f;
    for (int l = 0; l < LANES; ++l)
        if (value[l] > *best || (value[l] == *best && number[l] < at)) {
            *best = value[l];
            at = number[l];
        }
    return at;
}

/* Both forms take the steps of geometry.farthest_point_sample_reference, so they make the same
 * picks: squared distances summed as ((dx dx + dy dy) + dz dz) in float32 without fused
 * multiply-adds (this file is compiled with -ffp-contract=off), dist = min(dist, d), and the
 * first index of the largest dist. The search for it keeps, per lane, the largest value and its
 * first index. Returns 0 when out of memory. */
static int fps_plain(const fps_args *a, int64_t b) {
    const int64_t N = a->N;
    const float *src = a->xyz + b * N * 3;
    float *x = malloc(sizeof(float) * 4 * N), *y = x + N, *z = y + N, *dist = z + N;
    if (!x) return 0;
    for (int64_t i = 0; i < N; ++i) {
        x[i] = src[3 * i];
        y[i] = src[3 * i + 1];
        z[i] = src[3 * i + 2];
        dist[i] = INFINITY;
    }
    int64_t *out = a->out + b * a->m;
    int64_t farthest = a->start[b];
    const int64_t body = N - N % LANES;
    const vint iota = lane_numbers();
    for (int64_t s = 0; s < a->m; ++s) {
        out[s] = farthest;
        const float cx = x[farthest], cy = y[farthest], cz = z[farthest];
        vfloat lane_max = {0};
        lane_max -= 1.0f;
        vint lane_idx = {0};
        for (int64_t i = 0; i < body; i += LANES) {
            const vfloat dx = load(x + i) - cx, dy = load(y + i) - cy, dz = load(z + i) - cz;
            const vfloat d = dx * dx + dy * dy + dz * dz, old = load(dist + i);
            const vfloat kept = pick(old < d, old, d);
            memcpy(dist + i, &kept, sizeof kept);
            const vint better = kept > lane_max;
            lane_max = pick(better, kept, lane_max);
            lane_idx = pick_int(better, iota + (int32_t)i, lane_idx);
        }
        /* lane_max only takes values above it (never NaN), so this is a lane's index, 0
         * where no lane holds a value above -1 */
        float best;
        farthest = best_lane(lane_max, lane_idx, &best);
        for (int64_t i = body; i < N; ++i) { /* the tail: indices above every lane's */
            const float dx = x[i] - cx, dy = y[i] - cy, dz = z[i] - cz;
            const float d = dx * dx + dy * dy + dz * dz;
            if (d < dist[i]) dist[i] = d;
            if (dist[i] > best) {
                best = dist[i];
                farthest = i;
            }
        }
    }
    free(x);
    return 1;
}

/* The pruned form (after QuickFPS, Han et al. 2023). The cloud is split at the median of its
 * widest axis, recursively, into leaves of at most leaf_points(N) points; each leaf keeps its
 * points' bounding box, the largest dist among them and the first index holding it. After a
 * pick c, a leaf is updated only if the squared distance from c to its box is below that
 * largest dist; the next pick is the largest over the leaves, the first index among equals.
 *
 * Skipping a leaf changes nothing, in float32 too: per axis the gap from c to the box is
 * rounded from an exact difference no larger than |x - c| for any point x in the box, and
 * rounding is monotonic, so the gap's squares and sums, rounded in the same order as a point's,
 * give at most that point's computed distance d. A leaf whose gap is at least its largest dist
 * has d >= dist for every point, and min(dist, d) keeps dist. */
/* Points a leaf holds at most: a multiple of 2 LANES near 1.5 sqrt(N), which evens out the two
 * costs of a step, the box test of all N / leaf leaves and the update of the few leaves
 * reached (1 to 3 sqrt(N) timed within 10% of each other on 8k-80k-point clouds). */
enum { LEAF_SCALE_PERCENT = 150 };

static int64_t leaf_points(int64_t N) {
    const int64_t quantum = 2 * LANES, leaf = (int64_t)(sqrt((double)N) * LEAF_SCALE_PERCENT / 100);
    return leaf < quantum ? quantum : leaf / quantum * quantum;
}

/* A point and its index, moved about together while the cloud is split. */
typedef struct {
    float c[3];
    int32_t i;
} indexed_point;

/* p[lo..hi] (inclusive) reordered so that p[k] holds the point whose coordinate `axis` ranks
 * k-th, none after it lower and none before it higher (Wirth's selection). The coordinates are
 * finite. */
static void select_rank(indexed_point *p, int axis, int64_t lo, int64_t hi, int64_t k) {
    while (lo < hi) {
        const float pivot = p[k].c[axis];
        int64_t i = lo, j = hi;
        do {
            while (p[i].c[axis] < pivot) ++i;
            while (pivot < p[j].c[axis]) --j;
            if (i <= j) {
                const indexed_point t = p[i];
                p[i++] = p[j];
                p[j--] = t;
            }
        } while (i <= j);
        if (j < k) lo = i;
        if (k < i) hi = j;
    }
}

/* Splits p[lo, hi) into leaves, appending each leaf's end to leaf_end. A split falls on a
 * multiple of LANES from lo, so that leaves fill whole vectors; both halves are non-empty
 * (hi - lo > leaf >= 2 LANES), hence at most N leaves. Depth: log2(N / leaf) + 1. */
static void split(indexed_point *p, int64_t leaf, int64_t lo, int64_t hi, int64_t *leaf_end,
                  int64_t *leaves) {
    const int64_t n = hi - lo;
    if (n <= leaf) {
        leaf_end[(*leaves)++] = hi;
        return;
    }
    float low[3] = {INFINITY, INFINITY, INFINITY}, high[3] = {-INFINITY, -INFINITY, -INFINITY};
    for (int64_t i = lo; i < hi; ++i)
        for (int d = 0; d < 3; ++d) {
            low[d] = p[i].c[d] < low[d] ? p[i].c[d] : low[d];
            high[d] = p[i].c[d] > high[d] ? p[i].c[d] : high[d];
        }
    int axis = 0;
    for (int d = 1; d < 3; ++d)
        if (high[d] - low[d] > high[axis] - low[axis]) axis = d;
    const int64_t k = lo + (n / 2 + LANES / 2) / LANES * LANES;
    select_rank(p, axis, lo, hi - 1, k);
    split(p, leaf, lo, k, leaf_end, leaves);
    split(p, leaf, k, hi, leaf_end, leaves);
}

/* A cloud in leaves. Leaf j's points fill slots [slot_start[j], slot_start[j + 1]), in
 * increasing index order, padded to whole vectors with copies of its first point whose dist is
 * -1 (never the largest, never lowered). Leaves are padded to whole vectors too, with
 * leaf_max -1. */
typedef struct {
    int64_t leaves, padded_leaves, *slot_start, *idx;
    float *x, *y, *z, *dist;                       /* per slot */
    float *lo[3], *hi[3], *leaf_max;               /* per leaf */
    int32_t *leaf_arg;                             /* per leaf: the first index at leaf_max */
    void *floats, *ints;                           /* the allocations */
} fps_tree_t;

static int build_fps_tree(const float *pts, int64_t N, fps_tree_t *t) {
    indexed_point *perm = malloc(sizeof(indexed_point) * N);
    int64_t *leaf_end = malloc(sizeof(int64_t) * N), *leaf_of = malloc(sizeof(int64_t) * N);
    t->floats = t->ints = NULL;
    if (!perm || !leaf_end || !leaf_of) goto fail;
    for (int64_t i = 0; i < N; ++i) {
        perm[i] = (indexed_point){{pts[3 * i], pts[3 * i + 1], pts[3 * i + 2]}, (int32_t)i};
    }
    t->leaves = 0;
    split(perm, leaf_points(N), 0, N, leaf_end, &t->leaves);
    const int64_t L = t->leaves, PL = (L + LANES - 1) / LANES * LANES;
    t->padded_leaves = PL;
    int64_t slots = 0;
    for (int64_t j = 0; j < L; ++j)
        slots += (leaf_end[j] - (j ? leaf_end[j - 1] : 0) + LANES - 1) / LANES * LANES;
    t->floats = malloc(sizeof(float) * (4 * slots + 7 * PL));
    t->ints = malloc(sizeof(int64_t) * (PL + 1 + slots) + sizeof(int32_t) * PL);
    if (!t->floats || !t->ints) goto fail;
    t->x = t->floats;
    t->y = t->x + slots;
    t->z = t->y + slots;
    t->dist = t->z + slots;
    for (int d = 0; d < 3; ++d) {
        t->lo[d] = t->dist + slots + 2 * d * PL;
        t->hi[d] = t->lo[d] + PL;
    }
    t->leaf_max = t->hi[2] + PL;
    t->slot_start = t->ints;
    t->idx = t->slot_start + PL + 1;
    t->leaf_arg = (int32_t *)(t->idx + slots);
    t->slot_start[0] = 0;
    for (int64_t j = 0; j < PL; ++j) {
        const int64_t n = j < L ? leaf_end[j] - (j ? leaf_end[j - 1] : 0) : 0;
        t->slot_start[j + 1] = t->slot_start[j] + (n + LANES - 1) / LANES * LANES;
    }
    /* the points go to their leaves in increasing index order (a counting sort by leaf:
     * leaf_of holds each point's leaf, leaf_end then each leaf's next free slot) */
    for (int64_t j = 0, i = 0; j < L; ++j)
        for (; i < leaf_end[j]; ++i) leaf_of[perm[i].i] = j;
    for (int64_t j = 0; j < L; ++j) leaf_end[j] = t->slot_start[j];
    for (int64_t p = 0; p < N; ++p) {
        const int64_t s = leaf_end[leaf_of[p]]++;
        t->x[s] = pts[3 * p];
        t->y[s] = pts[3 * p + 1];
        t->z[s] = pts[3 * p + 2];
        t->idx[s] = p;
        t->dist[s] = INFINITY;
    }
    for (int64_t j = 0; j < PL; ++j) {
        const int64_t first = t->slot_start[j];
        t->leaf_max[j] = j < L ? INFINITY : -1.0f;
        t->leaf_arg[j] = j < L ? (int32_t)t->idx[first] : INT32_MAX;
        for (int d = 0; d < 3; ++d) t->lo[d][j] = t->hi[d][j] = 0.0f;
        if (j >= L) continue;
        for (int64_t s = leaf_end[j]; s < t->slot_start[j + 1]; ++s) { /* padding */
            t->x[s] = t->x[first];
            t->y[s] = t->y[first];
            t->z[s] = t->z[first];
            t->idx[s] = t->idx[first];
            t->dist[s] = -1.0f;
        }
        const float *axes[3] = {t->x, t->y, t->z};
        for (int d = 0; d < 3; ++d) {
            float low = axes[d][first], high = low;
            for (int64_t s = first; s < t->slot_start[j + 1]; ++s) {
                low = axes[d][s] < low ? axes[d][s] : low;
                high = axes[d][s] > high ? axes[d][s] : high;
            }
            t->lo[d][j] = low;
            t->hi[d][j] = high;
        }
    }
    free(perm);
    free(leaf_end);
    free(leaf_of);
    return 1;
fail:
    free(perm);
    free(leaf_end);
    free(leaf_of);
    free(t->floats);
    free(t->ints);
    return 0;
}

/* dist = min(dist, d) over leaf j's slots, then its largest dist and first index holding it. */
static void update_leaf(fps_tree_t *t, int64_t j, float cx, float cy, float cz, vint iota) {
    const int64_t from = t->slot_start[j], to = t->slot_start[j + 1];
    vfloat lane_max = {0};
    lane_max -= 1.0f;
    vint lane_slot = {0};
    for (int64_t i = from; i < to; i += LANES) {
        const vfloat dx = load(t->x + i) - cx, dy = load(t->y + i) - cy, dz = load(t->z + i) - cz;
        const vfloat d = dx * dx + dy * dy + dz * dz, old = load(t->dist + i);
        const vfloat kept = pick(old < d, old, d);
        memcpy(t->dist + i, &kept, sizeof kept);
        const vint better = kept > lane_max;
        lane_max = pick(better, kept, lane_max);
        lane_slot = pick_int(better, iota + (int32_t)(i - from), lane_slot);
    }
    /* the slots' order is the indices' order: the first slot at the largest is the first index */
    t->leaf_arg[j] = (int32_t)t->idx[from + best_lane(lane_max, lane_slot, &t->leaf_max[j])];
}

/* Returns 0 when out of memory. */
static int fps_tree(const fps_args *a, int64_t b) {
    const int64_t N = a->N;
    const float *pts = a->xyz + b * N * 3;
    fps_tree_t t;
    if (!build_fps_tree(pts, N, &t)) return 0;
    int64_t *out = a->out + b * a->m;
    int64_t farthest = a->start[b];
    const vint iota = lane_numbers();
    for (int64_t s = 0; s < a->m; ++s) {
        out[s] = farthest;
        const float cx = pts[3 * farthest], cy = pts[3 * farthest + 1], cz = pts[3 * farthest + 2];
        vfloat lane_max = {0};
        lane_max -= 1.0f;
        vint lane_arg = {0};
        lane_arg += INT32_MAX;
        for (int64_t j = 0; j < t.padded_leaves; j += LANES) {
            /* per axis: the gap from c to the box, 0 inside it */
            const vfloat below_x = load(t.lo[0] + j) - cx, above_x = cx - load(t.hi[0] + j);
            const vfloat below_y = load(t.lo[1] + j) - cy, above_y = cy - load(t.hi[1] + j);
            const vfloat below_z = load(t.lo[2] + j) - cz, above_z = cz - load(t.hi[2] + j);
            const vfloat zero = {0};
            vfloat gx = pick(below_x > above_x, below_x, above_x);
            vfloat gy = pick(below_y > above_y, below_y, above_y);
            vfloat gz = pick(below_z > above_z, below_z, above_z);
            gx = pick(gx > zero, gx, zero);
            gy = pick(gy > zero, gy, zero);
            gz = pick(gz > zero, gz, zero);
            const vint reached = gx * gx + gy * gy + gz * gz < load(t.leaf_max + j);
            uint32_t bits = 0; /* of the reached leaves, visited lowest first */
            for (int l = 0; l < LANES; ++l) bits |= (uint32_t)(reached[l] & 1) << l;
            for (; bits; bits &= bits - 1)
                update_leaf(&t, j + __builtin_ctz(bits), cx, cy, cz, iota);
            const vfloat value = load(t.leaf_max + j);
            const vint arg = load_int(t.leaf_arg + j);
            const vint better = (value > lane_max) | ((value == lane_max) & (arg < lane_arg));
            lane_max = pick(better, value, lane_max);
            lane_arg = pick_int(better, arg, lane_arg);
        }
        /* a real leaf's: each block of LANES leaves holds one, with leaf_max >= 0 */
        float best;
        farthest = best_lane(lane_max, lane_arg, &best);
    }
    free(t.floats);
    free(t.ints);
    return 1;
}

static int all_finite(const float *p, int64_t n) {
    for (int64_t i = 0; i < n; ++i)
        if (!isfinite(p[i])) return 0;
    return 1;
}

static void fps_cloud(const void *p, int64_t b) {
    fps_args *a = (fps_args *)p;
    /* NaN or infinite coordinates: the reference's steps as they come (no boxes to prune by) */
    const int tree = a->N >= FPS_TREE_MIN_POINTS && all_finite(a->xyz + b * a->N * 3, a->N * 3);
    if (!(tree ? fps_tree(a, b) : fps_plain(a, b))) fail(&a->failed, FAILED_MEMORY);
}

/* Returns STATUS_OK, STATUS_NO_MEMORY, or STATUS_BAD_SHAPE for clouds of 2^31 points or more
 * (the lanes above carry int32 indices) and m outside [1, N]. */
int fps(int threads, int64_t B, int64_t N, int64_t m, const float *xyz, const int64_t *start,
        int64_t *out) {
    if (N > INT32_MAX || m < 1 || m > N) return STATUS_BAD_SHAPE;
    for (int64_t b = 0; b < B; ++b)
        if (start[b] < 0 || start[b] >= N) return STATUS_BAD_SHAPE;
    fps_args a = {xyz, start, out, N, m, 0};
    for_each(fps_cloud, &a, B, threads);
    return a.failed ? STATUS_NO_MEMORY : STATUS_OK; /* read after the loop has joined */
}

/* ---- k nearest neighbours on a uniform grid --------------------------------------------- */

/* Each cloud's support points are bucketed into cubic cells (a counting sort by cell). The
 * queries, sorted by cell too, rank the points of the 27 cells around their own at once
 * (query_block); a query whose k-th distance reaches past those cells, or whose cells hold too
 * few or too many points, visits the cells in shells of growing Chebyshev radius r around its
 * own (query_point) and stops once it holds k points and no point outside the shells searched
 * can be closer than its k-th. Both are exact, like the reference's brute force, and read a few
 * dozen points a query. */

typedef struct {
    float lo[3], inv_h, h;
    int64_t g[3];
    int64_t *cell_start; /* g0 g1 g2 + 1 offsets into the sorted points */
    float *sorted;       /* (N, 3) support points in cell order */
    int64_t *sorted_idx; /* their indices in the cloud */
} grid_t;

typedef struct {
    const float *support, *query;
    int64_t *idx;
    float *dist2;
    int64_t N, M, k;
    grid_t *grids;
    int failed; /* bits, set by any thread (atomically): FAILED_MEMORY, FAILED_NOT_FINITE */
} knn_args;

/* Cells hold about k / 4 support points (at least one) per cell of the bounding box, so that
 * the 27 cells around a query hold its k nearest in most cases (query_block). Object clouds
 * lie on surfaces, which leaves most cells empty and a few times more points in the others.
 * Chosen by timing 1 to 10 points a cell for k = 3, 8 and 16 on synthetic part clouds and an
 * 80k-point room (bench/RESULTS.md). */
static double points_per_cell(int64_t k) { return k < 4 ? 1.0 : 0.25 * (double)k; }

/* The cell of p along one axis, clamped to the grid (a query may lie outside it; a NaN query
 * goes to cell 0 and finds NaN distances, as the reference does). */
static int64_t cell_of(const grid_t *g, const float *p, int axis) {
    const float at = (p[axis] - g->lo[axis]) * g->inv_h;
    if (!(at > 0)) return 0;
    return at >= (float)g->g[axis] ? g->g[axis] - 1 : (int64_t)at;
}

static void build_grid(const void *p, int64_t b) {
    knn_args *a = (knn_args *)p;
    const int64_t N = a->N;
    const float *pts = a->support + b * N * 3;
    grid_t *g = &a->grids[b];
    float lo[3] = {FLT_MAX, FLT_MAX, FLT_MAX}, hi[3] = {-FLT_MAX, -FLT_MAX, -FLT_MAX};
    for (int64_t i = 0; i < N; ++i)
        for (int d = 0; d < 3; ++d) {
            lo[d] = pts[3 * i + d] < lo[d] ? pts[3 * i + d] : lo[d];
            hi[d] = pts[3 * i + d] > hi[d] ? pts[3 * i + d] : hi[d];
        }
    double extent[3], volume = 1.0, largest = 0.0;
    for (int d = 0; d < 3; ++d) {
        extent[d] = (double)hi[d] - lo[d];
        if (!isfinite(extent[d])) { /* NaN or infinite coordinates: no grid to be had */
            fail(&a->failed, FAILED_NOT_FINITE);
            return;
        }
        largest = extent[d] > largest ? extent[d] : largest;
    }
    /* flat or collinear clouds: a thin axis counts as 1 / 1000 of the largest one */
    for (int d = 0; d < 3; ++d) volume *= extent[d] > largest * 1e-3 ? extent[d] : largest * 1e-3;
    double h = cbrt(volume * points_per_cell(a->k) / (double)N);
    if (!(h > 0)) h = 1.0; /* all points equal */
    int64_t cells = 1;
    for (int d = 0; d < 3; ++d) {
        g->lo[d] = lo[d];
        g->g[d] = (int64_t)(extent[d] / h) + 1;
        cells *= g->g[d];
    }
    g->h = (float)h;
    g->inv_h = (float)(1.0 / h);
    g->cell_start = calloc(cells + 1, sizeof(int64_t));
    g->sorted = malloc(sizeof(float) * 3 * N);
    g->sorted_idx = malloc(sizeof(int64_t) * N);
    int64_t *cell = malloc(sizeof(int64_t) * N);
    if (!g->cell_start || !g->sorted || !g->sorted_idx || !cell) {
        fail(&a->failed, FAILED_MEMORY);
        free(cell);
        return;
    }
    for (int64_t i = 0; i < N; ++i) {
        const float *q = pts + 3 * i;
        cell[i] = (cell_of(g, q, 0) * g->g[1] + cell_of(g, q, 1)) * g->g[2] + cell_of(g, q, 2);
        g->cell_start[cell[i] + 1]++;
    }
    for (int64_t c = 0; c < cells; ++c) g->cell_start[c + 1] += g->cell_start[c];
    for (int64_t i = 0; i < N; ++i) { /* stable: a cell keeps its points in index order */
        const int64_t slot = g->cell_start[cell[i]]++;
        memcpy(g->sorted + 3 * slot, pts + 3 * i, 3 * sizeof(float));
        g->sorted_idx[slot] = i;
    }
    for (int64_t c = cells; c > 0; --c) g->cell_start[c] = g->cell_start[c - 1];
    g->cell_start[0] = 0;
    free(cell);
}

/* Inserts (d, i) into the k best so far, kept sorted by distance; ties keep the earlier one
 * first. */
static void keep(float *best_d, int64_t *best_i, int64_t *count, int64_t k, float d, int64_t i) {
    int64_t pos = *count < k ? (*count)++ : k - 1;
    while (pos > 0 && best_d[pos - 1] > d) {
        best_d[pos] = best_d[pos - 1];
        best_i[pos] = best_i[pos - 1];
        --pos;
    }
    best_d[pos] = d;
    best_i[pos] = i;
}

/* Offers the points of cell (i, j, l) to the k best, unless the cell lies farther from q than
 * the k-th best already is. */
static void scan_cell(const grid_t *g, int64_t i, int64_t j, int64_t l, const float *q,
                      int64_t k, float *best_d, int64_t *best_i, int64_t *count) {
    const int64_t cell = (i * g->g[1] + j) * g->g[2] + l;
    if (g->cell_start[cell] == g->cell_start[cell + 1]) return;
    if (*count == k) {
        const int64_t at[3] = {i, j, l};
        double gap2 = 0.0;
        for (int d = 0; d < 3; ++d) {
            const double below = (double)g->lo[d] + (double)at[d] * g->h - q[d];
            const double above = q[d] - ((double)g->lo[d] + (double)(at[d] + 1) * g->h);
            /* less a hundredth of a cell: a point on a face may round into the next cell */
            const double gap = (below > above ? below : above) - 0.01 * g->h;
            if (gap > 0) gap2 += gap * gap;
        }
        if (gap2 > best_d[k - 1]) return;
    }
    for (int64_t s = g->cell_start[cell]; s < g->cell_start[cell + 1]; ++s) {
        const float *sp = g->sorted + 3 * s;
        const float dx = sp[0] - q[0], dy = sp[1] - q[1], dz = sp[2] - q[2];
        const float d = dx * dx + dy * dy + dz * dz;
        if (*count < k || d < best_d[k - 1]) keep(best_d, best_i, count, k, d, g->sorted_idx[s]);
    }
}

/* Whether the k best held (count of them, best_d sorted) are final once the cells of the block
 * [lo, hi] (per axis, clipped to the grid) have been searched: the block covers the grid, or
 * no point beyond it can be closer than the k-th. The nearest such a point can be is the
 * distance from q to the nearest face of the block with cells beyond it, less a hundredth of a
 * cell (a point on a face may round into the cell beyond). */
static int block_settles(const grid_t *g, const float *q, const int64_t lo[3],
                         const int64_t hi[3], const float *best_d, int64_t count, int64_t k) {
    double bound = INFINITY;
    for (int d = 0; d < 3; ++d) {
        if (lo[d] > 0) {
            const double gap = q[d] - ((double)g->lo[d] + (double)lo[d] * g->h);
            bound = gap < bound ? gap : bound;
        }
        if (hi[d] < g->g[d] - 1) {
            const double gap = ((double)g->lo[d] + (double)(hi[d] + 1) * g->h) - q[d];
            bound = gap < bound ? gap : bound;
        }
    }
    if (bound == INFINITY) return 1;
    bound -= 0.01 * g->h;
    return count == k && bound > 0 && (double)best_d[k - 1] < bound * bound;
}

static void query_point(const void *p, int64_t unit) {
    const knn_args *a = (const knn_args *)p;
    const int64_t b = unit / a->M, k = a->k;
    const grid_t *g = &a->grids[b];
    const float *q = a->query + unit * 3;
    float *best_d = a->dist2 + unit * k;
    int64_t *best_i = a->idx + unit * k, count = 0;
    const int64_t c[3] = {cell_of(g, q, 0), cell_of(g, q, 1), cell_of(g, q, 2)};
    for (int64_t r = 0;; ++r) {
        const int64_t lo[3] = {c[0] - r, c[1] - r, c[2] - r}, hi[3] = {c[0] + r, c[1] + r,
                                                                       c[2] + r};
        for (int64_t i = lo[0] > 0 ? lo[0] : 0; i <= hi[0] && i < g->g[0]; ++i)
            for (int64_t j = lo[1] > 0 ? lo[1] : 0; j <= hi[1] && j < g->g[1]; ++j) {
                /* the cells at Chebyshev distance exactly r: the whole column on the block's
                 * i and j faces, else its two ends */
                if (i == lo[0] || i == hi[0] || j == lo[1] || j == hi[1]) {
                    for (int64_t l = lo[2] > 0 ? lo[2] : 0; l <= hi[2] && l < g->g[2]; ++l)
                        scan_cell(g, i, j, l, q, k, best_d, best_i, &count);
                } else {
                    if (lo[2] >= 0) scan_cell(g, i, j, lo[2], q, k, best_d, best_i, &count);
                    if (hi[2] < g->g[2]) scan_cell(g, i, j, hi[2], q, k, best_d, best_i, &count);
                }
            }
        if (block_settles(g, q, lo, hi, best_d, count, k)) break;
    }
}

/* The queries of a cloud sorted by cell: for each cloud b, order[b M + i] is the i-th query in
 * cell order and cell[b M + i] its cell. */
typedef struct {
    const knn_args *knn;
    int64_t *order, *cell;
    int failed;
} query_cells;

static void sort_queries(const void *p, int64_t b) {
    query_cells *qc = (query_cells *)p;
    const knn_args *a = qc->knn;
    const grid_t *g = &a->grids[b];
    const int64_t M = a->M, cells = g->g[0] * g->g[1] * g->g[2];
    int64_t *count = calloc(cells + 1, sizeof(int64_t)), *own = malloc(sizeof(int64_t) * M);
    if (!count || !own) {
        fail(&qc->failed, FAILED_MEMORY);
        free(count);
        free(own);
        return;
    }
    for (int64_t i = 0; i < M; ++i) {
        const float *q = a->query + (b * M + i) * 3;
        own[i] = (cell_of(g, q, 0) * g->g[1] + cell_of(g, q, 1)) * g->g[2] + cell_of(g, q, 2);
        count[own[i] + 1]++;
    }
    for (int64_t c = 0; c < cells; ++c) count[c + 1] += count[c];
    for (int64_t i = 0; i < M; ++i) {
        const int64_t slot = b * M + count[own[i]]++;
        qc->order[slot] = i;
        qc->cell[slot] = own[i];
    }
    free(count);
    free(own);
}

/* Queries are taken in blocks of QUERY_BLOCK, in cell order. The support points of the 27
 * cells around a query's cell (at most CANDIDATES of them) are gathered once for each run of
 * queries in one cell; each query then ranks them in one vectorisable loop. Its answer stands
 * if its k-th distance is within the block of 27 cells (the shell test of query_point, r = 1);
 * otherwise, and when the cells hold too few or too many points, query_point searches. */
enum { QUERY_BLOCK = 64, CANDIDATES = 1024 };

/* Appends the points of cells [from, to) (consecutive in the grid's order) to the candidate
 * arrays; 0 if they would not fit. */
static int gather_cells(const grid_t *g, int64_t from, int64_t to, float *cx, float *cy,
                        float *cz, int64_t *cidx, int64_t *count) {
    const int64_t first = g->cell_start[from], last = g->cell_start[to];
    if (*count + (last - first) > CANDIDATES) return 0;
    for (int64_t s = first; s < last; ++s, ++*count) {
        cx[*count] = g->sorted[3 * s];
        cy[*count] = g->sorted[3 * s + 1];
        cz[*count] = g->sorted[3 * s + 2];
        cidx[*count] = g->sorted_idx[s];
    }
    return 1;
}

static void query_block(const void *p, int64_t unit) {
    const query_cells *qc = (const query_cells *)p;
    const knn_args *a = qc->knn;
    const int64_t M = a->M, k = a->k, blocks = (M + QUERY_BLOCK - 1) / QUERY_BLOCK;
    const int64_t b = unit / blocks, begin = b * M + unit % blocks * QUERY_BLOCK;
    const int64_t end = begin + QUERY_BLOCK < (b + 1) * M ? begin + QUERY_BLOCK : (b + 1) * M;
    const grid_t *g = &a->grids[b];
    float cx[CANDIDATES], cy[CANDIDATES], cz[CANDIDATES], d2[CANDIDATES];
    int64_t cidx[CANDIDATES], count = 0, current = -1;
    int usable = 0;
    int64_t c[3] = {0, 0, 0};
    for (int64_t slot = begin; slot < end; ++slot) {
        const int64_t unit_q = b * M + qc->order[slot];
        if (qc->cell[slot] != current) { /* gather the 27 cells around this cell */
            current = qc->cell[slot];
            c[2] = current % g->g[2];
            c[1] = current / g->g[2] % g->g[1];
            c[0] = current / g->g[2] / g->g[1];
            count = 0;
            /* the query's own cell first: its points are the likeliest neighbours, so the k
             * best fill with near points and most later candidates fail the first test */
            usable = gather_cells(g, current, current + 1, cx, cy, cz, cidx, &count);
            for (int64_t i = c[0] > 0 ? c[0] - 1 : 0; i <= c[0] + 1 && i < g->g[0]; ++i)
                for (int64_t j = c[1] > 0 ? c[1] - 1 : 0; j <= c[1] + 1 && j < g->g[1]; ++j) {
                    const int64_t column = (i * g->g[1] + j) * g->g[2];
                    const int64_t from = column + (c[2] > 0 ? c[2] - 1 : 0);
                    const int64_t to = column + (c[2] + 2 < g->g[2] ? c[2] + 2 : g->g[2]);
                    if (i == c[0] && j == c[1]) { /* around the own cell */
                        usable = usable && gather_cells(g, from, current, cx, cy, cz, cidx,
                                                        &count);
                        usable = usable && gather_cells(g, current + 1, to, cx, cy, cz, cidx,
                                                        &count);
                    } else {
                        usable = usable && gather_cells(g, from, to, cx, cy, cz, cidx, &count);
                    }
                }
            usable = usable && count >= k;
        }
        if (!usable) {
            query_point(a, unit_q);
            continue;
        }
        const float *q = a->query + unit_q * 3;
        const float qx = q[0], qy = q[1], qz = q[2];
        for (int64_t s = 0; s < count; ++s) {
            const float dx = cx[s] - qx, dy = cy[s] - qy, dz = cz[s] - qz;
            d2[s] = dx * dx + dy * dy + dz * dz;
        }
        float *best_d = a->dist2 + unit_q * k;
        int64_t *best_i = a->idx + unit_q * k, kept = 0;
        for (int64_t s = 0; s < count; ++s)
            if (kept < k || d2[s] < best_d[k - 1]) keep(best_d, best_i, &kept, k, d2[s], cidx[s]);
        /* the 27 cells: query_point's block after shell 1 */
        const int64_t lo[3] = {c[0] - 1, c[1] - 1, c[2] - 1}, hi[3] = {c[0] + 1, c[1] + 1,
                                                                       c[2] + 1};
        if (!block_settles(g, q, lo, hi, best_d, kept, k)) query_point(a, unit_q);
    }
}

/* k <= N nearest support points of each query point, nearest first: idx (B, M, k) int64 and
 * squared distances (B, M, k) float32. Returns STATUS_OK; STATUS_NO_MEMORY; STATUS_NOT_FINITE
 * when a support coordinate is NaN or infinite; STATUS_BAD_SHAPE for k outside [1, N]. */
int knn(int threads, int64_t B, int64_t N, int64_t M, int64_t k, const float *support,
        const float *query, int64_t *idx, float *dist2) {
    if (k < 1 || k > N) return STATUS_BAD_SHAPE;
    knn_args a = {support, query, idx, dist2, N, M, k, calloc(B, sizeof(grid_t)), 0};
    query_cells qc = {&a, malloc(sizeof(int64_t) * B * M), malloc(sizeof(int64_t) * B * M), 0};
    if (a.grids && qc.order && qc.cell) {
        for_each(build_grid, &a, B, threads);
        if (!a.failed) for_each(sort_queries, &qc, B, threads);
        if (!a.failed && !qc.failed)
            for_each(query_block, &qc, B * ((M + QUERY_BLOCK - 1) / QUERY_BLOCK), threads);
    }
    /* read after the parallel loops have joined */
    const int failed = a.failed & FAILED_NOT_FINITE ? STATUS_NOT_FINITE
                       : (!a.grids || !qc.order || !qc.cell || a.failed || qc.failed)
                       ? STATUS_NO_MEMORY : STATUS_OK;
    for (int64_t b = 0; a.grids && b < B; ++b) {
        free(a.grids[b].cell_start);
        free(a.grids[b].sorted);
        free(a.grids[b].sorted_idx);
    }
    free(a.grids);
    free(qc.order);
    free(qc.cell);
    return failed;
}
