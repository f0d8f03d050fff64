/* The Point Transformer layer's attention (paper Eq. 3 and 4) for training, without its
 * (B, N, K, C) tensors in memory (lib/ops/layer_train.py drives these passes, keeps the
 * BatchNorms' running statistics and combines the sums; lib/ops/native.py builds this file).
 *
 * For point i of a cloud, its neighbour j = idx[i, n] (row m of the M = B N K rows):
 *   delta = theta(xyz_i - xyz_j)      theta = Linear(3, 3), BatchNorm(3), ReLU, Linear(3, C)
 *   rel   = delta - key_j + q_i       the relation, C channels
 *   h     = G1 relu(bn(rel)) + g1     gamma's first half, W = C / share_planes outputs
 *   w     = softmax_K(gamma's tail(h))        (attention_softmax.c, on the (B, N, K, W) h)
 *   out_i = sum_j w (tiled over the C channels) * (v_j + delta)
 *
 * The modular forms (position_encoding.c, pt_layer.c, norm_relu_linear.c) write delta and the
 * relation forward, and delta's, the relation's and their sum's gradients backward: about
 * fifteen passes over (B, N, K, C) tensors, which on a 2,048-point cloud are 16.8 MB each at 32
 * channels and come from memory, not cache (bench/RESULTS.md, "Where a pt_seg training step
 * goes now"). Here every pass recomputes delta and the relation from what is small (xyz, idx,
 * the (B, N, C) rows, theta's 3 x 3 and 3 x C weights): forward, the relation's statistics, h,
 * and out; backward, w's gradient (and v's), the relation BatchNorm's sums with G1's gradient,
 * and a last pass that turns the relation's gradient into q's and key's and, added to the
 * aggregation's share, into delta's, whose theta sums it gathers (position_encoding.c's layout).
 * Only h, w and their gradients, K W values a row, are stored.
 *
 * Each pass computes delta, the relation and its sums as the modular kernels do (the same
 * expressions, chunks of CHUNK rows and blocks of ROW_BLOCK rows): forward values and the
 * gradients of v, w, h and the relation BatchNorm equal theirs; theta's sums are gathered per
 * cloud here and per chunk there, so they and q's, key's gradients through theta differ in the
 * last bits. Results do not depend on the number of threads. float32 and float64 only: bf16
 * rows take the modular kernels.
 */
#include <stdint.h>

#include "parallel.h"

enum { CHUNK = 2048, ROW_BLOCK = 16, LANES = 16, BLOCK_VALUES = 4096 };
enum { SUM_GY = 0, SUM_GY_XHAT = 3, SUM_XHAT = 6, SUM_P = 9, SUM_GY_P = 12, SUM_XHAT_P = 21,
       FIXED_SUMS = 30 };
enum { TILED_BELOW = 8 };  /* pt_layer.c's: attention weights tiled over the channels below 8 */

typedef struct {
    const void *xyz, *w1, *b1, *t_scale, *t_shift, *t_mean, *t_rstd, *w2t, *b2;
    const void *q, *key, *v, *scale, *shift, *mean, *rstd, *g1w, *g1b, *k1, *k2, *k3;
    const void *w, *grad_h, *grad_out;
    const int64_t *idx;
    void *h, *out, *grad_w, *grad_v, *grad_q, *grad_key;
    double *partial;
    int *bad;
    int64_t N, K, C, W, M;
} lt_args;

/* Row m's point and its cloud's first point, kept up to date row by row (position_encoding.c) */
typedef struct { int64_t point, first, neighbour; } row_cursor;

static inline row_cursor cursor_at(const lt_args *a, int64_t m) {
    const int64_t point = m / a->K;
    return (row_cursor){.point = point, .first = point / a->N * a->N, .neighbour = m % a->K};
}

static inline void cursor_next(const lt_args *a, row_cursor *at) {
    if (++at->neighbour < a->K) return;
    at->neighbour = 0;
    if (++at->point - at->first == a->N) at->first = at->point;
}

static inline int64_t rows_per_block(int64_t C, int64_t W) {
    return (C + W) * ROW_BLOCK <= BLOCK_VALUES ? ROW_BLOCK : 1;
}

#define DEFINE_LT(T, S)                                                                       \
/* theta's p, h (before its BatchNorm) and act for row m; returns the neighbour's row in the  \
 * cloud. The expressions of position_encoding.c's hidden and activation. */                  \
static inline __attribute__((always_inline)) int64_t                                          \
theta_##S(const lt_args *a, int64_t m, const row_cursor *at, T p[3], T h[3], T act[3]) {      \
    const int64_t j = checked_index(a->idx[m], a->N, a->bad);                                 \
    const T *xi = (const T *)a->xyz + at->point * 3, *xj = (const T *)a->xyz + (at->first + j) * 3; \
    const T *w1 = a->w1, *b1 = a->b1, *scale = a->t_scale, *shift = a->t_shift;               \
    for (int i = 0; i < 3; ++i) p[i] = xi[i] - xj[i];                                         \
    for (int o = 0; o < 3; ++o) {                                                             \
        h[o] = p[0] * w1[3 * o] + p[1] * w1[3 * o + 1] + p[2] * w1[3 * o + 2] + b1[o];        \
        const T y = h[o] * scale[o] + shift[o];                                               \
        act[o] = y > 0 ? y : 0;                                                               \
    }                                                                                         \
    return j;                                                                                 \
}                                                                                             \
                                                                                              \
/* delta (C) of a row from theta's act, and the relation delta - key_j + q_i where rel is given */ \
static inline __attribute__((always_inline)) void                                             \
delta_##S(const lt_args *a, const T act[3], int64_t j, const row_cursor *at, T *restrict d,    \
          T *restrict rel, const int64_t C) {                                                 \
    const T *restrict w0 = a->w2t, *restrict w1 = w0 + C, *restrict w2 = w1 + C;              \
    const T *restrict b2 = a->b2;                                                             \
    SIMD                                                                                      \
    for (int64_t c = 0; c < C; ++c)                                                           \
        d[c] = act[0] * w0[c] + act[1] * w1[c] + act[2] * w2[c] + b2[c];                      \
    if (!rel) return;                                                                         \
    const T *restrict kj = (const T *)a->key + (at->first + j) * C;                           \
    const T *restrict qi = (const T *)a->q + at->point * C;                                   \
    SIMD                                                                                      \
    for (int64_t c = 0; c < C; ++c) rel[c] = d[c] - kj[c] + qi[c];                            \
}                                                                                             \
                                                                                              \
static inline __attribute__((always_inline)) void                                             \
relation_##S(const lt_args *a, int64_t m, const row_cursor *at, T *restrict rel,              \
             const int64_t C) {                                                               \
    T p[3], h[3], act[3], d[C];                                                               \
    const int64_t j = theta_##S(a, m, at, p, h, act);                                         \
    delta_##S(a, act, j, at, d, rel, C);                                                      \
}                                                                                             \
                                                                                              \
/* partial[chunk] = (sum rel, sum rel^2) per channel over the chunk's rows (nrl_stats') */    \
static inline __attribute__((always_inline)) void                                             \
stats_##S(const void *p, int64_t chunk, const int64_t C) {                                    \
    const lt_args *a = (const lt_args *)p;                                                    \
    const int64_t end = (chunk + 1) * CHUNK < a->M ? (chunk + 1) * CHUNK : a->M;              \
    double *restrict sum = a->partial + chunk * 2 * C, *restrict sq = sum + C;                \
    for (int64_t c = 0; c < 2 * C; ++c) sum[c] = 0;                                           \
    row_cursor at = cursor_at(a, chunk * CHUNK);                                              \
    T rel[C];                                                                                 \
    for (int64_t m = chunk * CHUNK; m < end; ++m, cursor_next(a, &at)) {                      \
        relation_##S(a, m, &at, rel, C);                                                      \
        SIMD                                                                                  \
        for (int64_t c = 0; c < C; ++c) {                                                     \
            sum[c] += rel[c];                                                                 \
            sq[c] += (double)rel[c] * rel[c];                                                 \
        }                                                                                     \
    }                                                                                         \
}                                                                                             \
                                                                                              \
/* h for the BR rows of block blk, as norm_relu_linear.c's forward (rows in vector lanes) */  \
typedef T rows_##S __attribute__((vector_size(sizeof(T) * ROW_BLOCK)));                        \
static inline __attribute__((always_inline)) void                                             \
hidden_##S(const void *p, int64_t blk, const int64_t C, const int64_t W, const int64_t BR) {   \
    const lt_args *a = (const lt_args *)p;                                                    \
    const int64_t m0 = blk * BR, rows = a->M - m0 < BR ? a->M - m0 : BR;                      \
    const T *restrict scale = a->scale, *restrict shift = a->shift;                           \
    const T *restrict weight = a->g1w, *restrict bias = a->g1b;                               \
    T *restrict h = (T *)a->h + m0 * W;                                                       \
    row_cursor at = cursor_at(a, m0);                                                         \
    T rel[C];                                                                                 \
    if (BR == ROW_BLOCK) {                                                                    \
        rows_##S act[C], acc[W];                                                              \
        for (int64_t r = 0; r < ROW_BLOCK; ++r) {                                             \
            if (r < rows) {                                                                   \
                relation_##S(a, m0 + r, &at, rel, C);                                         \
                cursor_next(a, &at);                                                          \
            }                                                                                 \
            for (int64_t c = 0; c < C; ++c) {                                                 \
                const T y = rel[c] * scale[c] + shift[c];                                     \
                act[c][r] = y > 0 ? y : 0;                                                    \
            }                                                                                 \
        }                                                                                     \
        for (int64_t o = 0; o < W; ++o) acc[o] = (rows_##S){0};                               \
        for (int64_t c = 0; c < C; ++c)                                                       \
            for (int64_t o = 0; o < W; ++o) acc[o] += weight[o * C + c] * act[c];             \
        for (int64_t r = 0; r < rows; ++r)                                                    \
            for (int64_t o = 0; o < W; ++o) h[r * W + o] = acc[o][r] + bias[o];               \
        return;                                                                               \
    }                                                                                         \
    for (int64_t r = 0; r < rows; ++r, cursor_next(a, &at)) {                                 \
        relation_##S(a, m0 + r, &at, rel, C);                                                 \
        for (int64_t o = 0; o < W; ++o) {                                                     \
            const T *restrict w = weight + o * C;                                             \
            T sum = 0;                                                                        \
            for (int64_t c = 0; c < C; ++c) {                                                 \
                const T y = rel[c] * scale[c] + shift[c];                                     \
                sum += w[c] * (y > 0 ? y : 0);                                                \
            }                                                                                 \
            h[r * W + o] = sum + bias[o];                                                     \
        }                                                                                     \
    }                                                                                         \
}                                                                                             \
                                                                                              \
/* out_i = sum_j w (tiled) * (v_j + delta), pt_layer.c's aggregate_fwd */                     \
static inline __attribute__((always_inline)) void                                             \
aggregate_##S(const void *p, int64_t point, const int64_t C, const int64_t W) {               \
    const lt_args *a = (const lt_args *)p;                                                    \
    const int64_t K = a->K;                                                                   \
    row_cursor at = cursor_at(a, point * K);                                                  \
    const T *v = (const T *)a->v + at.first * C;                                              \
    T acc[C], d[C];                                                                           \
    for (int64_t c = 0; c < C; ++c) acc[c] = 0;                                               \
    for (int64_t row = point * K; row < (point + 1) * K; ++row, cursor_next(a, &at)) {        \
        T pr[3], hr[3], act[3];                                                               \
        const int64_t j = theta_##S(a, row, &at, pr, hr, act);                                \
        delta_##S(a, act, j, &at, d, NULL, C);                                                \
        const T *restrict wj = (const T *)a->w + row * W, *restrict vj = v + j * C;           \
        if (W < TILED_BELOW) {                                                                \
            T wt[C];                                                                          \
            for (int64_t c = 0; c < C; ++c) wt[c] = wj[c % W];                                \
            SIMD                                                                              \
            for (int64_t c = 0; c < C; ++c) acc[c] += wt[c] * (vj[c] + d[c]);                 \
        } else {                                                                              \
            for (int64_t g = 0; g < C; g += W)                                                \
                for (int64_t u = 0; u < W; ++u) acc[g + u] += wj[u] * (vj[g + u] + d[g + u]); \
        }                                                                                     \
    }                                                                                         \
    T *restrict out = (T *)a->out + point * C;                                                \
    for (int64_t c = 0; c < C; ++c) out[c] = acc[c];                                          \
}                                                                                             \
                                                                                              \
/* By cloud b: grad_w = sum over the C / W groups of g_i (v_j + delta), grad_v[j] += g_i w    \
 * (tiled; zeroed by the caller): pt_layer.c's aggregate_bwd without delta's gradient, which  \
 * the last pass forms */                                                                     \
static inline __attribute__((always_inline)) void                                             \
aggregate_backward_##S(const void *p, int64_t b, const int64_t C, const int64_t W) {          \
    const lt_args *a = (const lt_args *)p;                                                    \
    const int64_t N = a->N, K = a->K;                                                         \
    const T *v = (const T *)a->v + b * N * C, *g = (const T *)a->grad_out + b * N * C;        \
    T *grad_v = (T *)a->grad_v + b * N * C;                                                   \
    row_cursor at = cursor_at(a, b * N * K);                                                  \
    T d[C], acc[W];                                                                           \
    for (int64_t i = 0; i < N; ++i) {                                                         \
        const T *restrict gi = g + i * C;                                                     \
        for (int64_t n = 0; n < K; ++n, cursor_next(a, &at)) {                                \
            const int64_t row = (b * N + i) * K + n;                                          \
            T pr[3], hr[3], act[3];                                                           \
            const int64_t j = theta_##S(a, row, &at, pr, hr, act);                            \
            delta_##S(a, act, j, &at, d, NULL, C);                                            \
            const T *restrict wj = (const T *)a->w + row * W;                                 \
            T *restrict gv = grad_v + j * C;                                                  \
            if (W < TILED_BELOW) {                                                            \
                T gw[C];                                                                      \
                for (int64_t c = 0; c < C; ++c) gw[c] = wj[c % W];                            \
                SIMD                                                                          \
                for (int64_t c = 0; c < C; ++c) gv[c] += gw[c] * gi[c];                       \
            } else {                                                                          \
                for (int64_t g0 = 0; g0 < C; g0 += W)                                         \
                    for (int64_t u = 0; u < W; ++u) gv[g0 + u] += gi[g0 + u] * wj[u];        \
            }                                                                                 \
            const T *restrict vj = v + j * C;                                                 \
            for (int64_t u = 0; u < W; ++u) acc[u] = gi[u] * (vj[u] + d[u]);                  \
            for (int64_t g0 = W; g0 < C; g0 += W)                                             \
                for (int64_t u = 0; u < W; ++u) acc[u] += gi[g0 + u] * (vj[g0 + u] + d[g0 + u]); \
            T *restrict grad_w = (T *)a->grad_w + row * W;                                    \
            for (int64_t u = 0; u < W; ++u) grad_w[u] = acc[u];                               \
        }                                                                                     \
    }                                                                                         \
}                                                                                             \
                                                                                              \
/* The gradient reaching bn(rel) in row m, (grad_h G1) where bn(rel) > 0, else 0; also        \
 * relu(bn(rel)) and rel's normalised value (norm_relu_linear.c's grad_y) */                  \
static inline __attribute__((always_inline)) void                                             \
grad_y_##S(const lt_args *a, int64_t m, const T *restrict rel, T *gy, T *act, T *xhat,        \
           const int64_t C, const int64_t W) {                                                \
    const T *restrict gh = (const T *)a->grad_h + m * W;                                      \
    const T *restrict scale = a->scale, *restrict shift = a->shift;                           \
    const T *restrict mean = a->mean, *restrict rstd = a->rstd;                               \
    SIMD                                                                                      \
    for (int64_t c = 0; c < C; ++c) gy[c] = 0;                                                \
    for (int64_t o = 0; o < W; ++o) {                                                         \
        const T *restrict w = (const T *)a->g1w + o * C;                                      \
        const T gho = gh[o];                                                                  \
        SIMD                                                                                  \
        for (int64_t c = 0; c < C; ++c) gy[c] += gho * w[c];                                  \
    }                                                                                         \
    SIMD                                                                                      \
    for (int64_t c = 0; c < C; ++c) {                                                         \
        const T y = rel[c] * scale[c] + shift[c];                                             \
        act[c] = y > 0 ? y : 0;                                                               \
        gy[c] = y > 0 ? gy[c] : 0;                                                            \
        xhat[c] = (rel[c] - mean[c]) * rstd[c];                                               \
    }                                                                                         \
}                                                                                             \
                                                                                              \
/* One row's terms of the sums ((2 + W) x C: sum gy, sum gy x_hat, then grad_h a^T), in A */  \
static inline __attribute__((always_inline)) void                                             \
add_row_sums_##S(double *restrict dsums, float *restrict fsums, const T *gy, const T *act,    \
                 const T *xhat, const T *restrict gh, const int64_t C, const int64_t W) {     \
    if (fsums) {                                                                              \
        SIMD                                                                                  \
        for (int64_t c = 0; c < C; ++c) {                                                     \
            fsums[c] += gy[c];                                                                \
            fsums[C + c] += (float)gy[c] * xhat[c];                                           \
        }                                                                                     \
        for (int64_t o = 0; o < W; ++o) {                                                     \
            float *restrict gw = fsums + (2 + o) * C;                                         \
            const float gho = gh[o];                                                          \
            SIMD                                                                              \
            for (int64_t c = 0; c < C; ++c) gw[c] += gho * act[c];                            \
        }                                                                                     \
        return;                                                                               \
    }                                                                                         \
    SIMD                                                                                      \
    for (int64_t c = 0; c < C; ++c) {                                                         \
        dsums[c] += gy[c];                                                                    \
        dsums[C + c] += (double)gy[c] * xhat[c];                                              \
    }                                                                                         \
    for (int64_t o = 0; o < W; ++o) {                                                         \
        double *restrict gw = dsums + (2 + o) * C;                                            \
        const double gho = gh[o];                                                             \
        SIMD                                                                                  \
        for (int64_t c = 0; c < C; ++c) gw[c] += gho * act[c];                                \
    }                                                                                         \
}                                                                                             \
                                                                                              \
/* partial[chunk] = the relation BatchNorm's backward sums and G1's gradient over the chunk's \
 * rows (norm_relu_linear.c's backward_sums: float32 forms sum blocks of ROW_BLOCK rows in    \
 * float32, then add them in double) */                                                       \
static inline __attribute__((always_inline)) void                                             \
norm_sums_##S(const void *p, int64_t chunk, const int64_t C, const int64_t W) {               \
    const lt_args *a = (const lt_args *)p;                                                    \
    const int64_t start = chunk * CHUNK, width = (2 + W) * C;                                 \
    const int64_t end = start + CHUNK < a->M ? start + CHUNK : a->M;                          \
    double *restrict sums = a->partial + chunk * width;                                       \
    for (int64_t c = 0; c < width; ++c) sums[c] = 0;                                          \
    T rel[C], gy[C], act[C], xhat[C];                                                         \
    row_cursor at = cursor_at(a, start);                                                      \
    if (sizeof(T) == sizeof(float) && width <= BLOCK_VALUES) {                                \
        float block[width];                                                                   \
        for (int64_t m0 = start; m0 < end; m0 += ROW_BLOCK) {                                 \
            for (int64_t c = 0; c < width; ++c) block[c] = 0;                                 \
            for (int64_t m = m0; m < end && m < m0 + ROW_BLOCK; ++m, cursor_next(a, &at)) {   \
                relation_##S(a, m, &at, rel, C);                                              \
                grad_y_##S(a, m, rel, gy, act, xhat, C, W);                                   \
                add_row_sums_##S(NULL, block, gy, act, xhat, (const T *)a->grad_h + m * W, C, W); \
            }                                                                                 \
            for (int64_t c = 0; c < width; ++c) sums[c] += block[c];                          \
        }                                                                                     \
        return;                                                                               \
    }                                                                                         \
    for (int64_t m = start; m < end; ++m, cursor_next(a, &at)) {                              \
        relation_##S(a, m, &at, rel, C);                                                      \
        grad_y_##S(a, m, rel, gy, act, xhat, C, W);                                           \
        add_row_sums_##S(sums, NULL, gy, act, xhat, (const T *)a->grad_h + m * W, C, W);      \
    }                                                                                         \
}                                                                                             \
                                                                                              \
/* The gradient reaching theta's act, (g W2)_o, in position_encoding.c's fixed order */       \
static inline __attribute__((always_inline)) void                                             \
grad_act_##S(const T *restrict g, const T *restrict w2t, T ga[3], const int64_t C) {          \
    for (int o = 0; o < 3; ++o) {                                                             \
        const T *restrict w = w2t + o * C;                                                    \
        T lane[LANES] = {0};                                                                  \
        int64_t c0 = 0;                                                                       \
        for (; c0 + LANES <= C; c0 += LANES)                                                  \
            for (int l = 0; l < LANES; ++l) lane[l] += g[c0 + l] * w[c0 + l];                 \
        for (int l = 0; c0 + l < C; ++l) lane[l] += g[c0 + l] * w[c0 + l];                    \
        for (int l = 0; l < 8; ++l) lane[l] += lane[l + 8];                                   \
        for (int l = 0; l < 4; ++l) lane[l] += lane[l + 4];                                   \
        for (int l = 0; l < 2; ++l) lane[l] += lane[l + 2];                                   \
        ga[o] = lane[0] + lane[1];                                                            \
    }                                                                                         \
}                                                                                             \
                                                                                              \
/* By cloud b: the relation's gradient k1 gy - k2 - k3 x_hat per row; q's (summed over the    \
 * neighbours) and key's (subtracted at idx; zeroed by the caller); delta's, that plus the    \
 * aggregation's g_i w; and theta's sums of delta's gradient (position_encoding.c's layout,   \
 * rows in blocks of LANES) into partial[b]. */                                               \
static inline __attribute__((always_inline)) void                                             \
relation_backward_##S(const void *p, int64_t b, const int64_t C, const int64_t W) {           \
    const lt_args *a = (const lt_args *)p;                                                    \
    const int64_t N = a->N, K = a->K, start = b * N * K, end = start + N * K;                 \
    const T *k1 = a->k1, *k2 = a->k2, *k3 = a->k3;                                            \
    const T *t_mean = a->t_mean, *t_rstd = a->t_rstd, *t_scale = a->t_scale;                  \
    const T *t_shift = a->t_shift;                                                            \
    T *grad_key = (T *)a->grad_key + b * N * C, *grad_q = (T *)a->grad_q;                     \
    double *restrict sums = a->partial + b * (FIXED_SUMS + 4 * C);                            \
    double *restrict wide = sums + FIXED_SUMS;                                                \
    double fixed[FIXED_SUMS][LANES];                                                          \
    for (int s = 0; s < FIXED_SUMS; ++s)                                                      \
        for (int l = 0; l < LANES; ++l) fixed[s][l] = 0;                                      \
    for (int64_t c = 0; c < 4 * C; ++c) wide[c] = 0;                                          \
    T block[4 * C], acc_q[C], gi_w[C], d[C], rel[C], gy[C], act[C], xhat[C], gd[C];           \
    double gy3[3][LANES], xhat3[3][LANES], p3[3][LANES];                                      \
    row_cursor at = cursor_at(a, start);                                                      \
    for (int64_t m0 = start; m0 < end; m0 += LANES) {                                         \
        for (int o = 0; o < 3; ++o)                                                           \
            for (int l = 0; l < LANES; ++l) gy3[o][l] = xhat3[o][l] = p3[o][l] = 0;           \
        SIMD                                                                                  \
        for (int64_t c = 0; c < 4 * C; ++c) block[c] = 0;                                     \
        for (int r = 0; r < LANES && m0 + r < end; ++r, cursor_next(a, &at)) {               \
            const int64_t m = m0 + r, point = at.point;                                       \
            if (at.neighbour == 0)                                                            \
                for (int64_t c = 0; c < C; ++c) acc_q[c] = 0;                                 \
            T pr[3], hr[3], ar[3], ga[3];                                                     \
            const int64_t j = theta_##S(a, m, &at, pr, hr, ar);                               \
            delta_##S(a, ar, j, &at, d, rel, C);                                              \
            grad_y_##S(a, m, rel, gy, act, xhat, C, W);                                       \
            const T *restrict wm = (const T *)a->w + m * W;                                   \
            const T *restrict gi = (const T *)a->grad_out + point * C;                        \
            T *restrict gk = grad_key + j * C;                                                \
            for (int64_t c = 0; c < C; ++c) gi_w[c] = wm[c % W];                              \
            SIMD                                                                              \
            for (int64_t c = 0; c < C; ++c) {                                                 \
                const T grad_rel = k1[c] * gy[c] - k2[c] - k3[c] * xhat[c];                   \
                acc_q[c] += grad_rel;                                                         \
                gk[c] -= grad_rel;                                                            \
                gd[c] = gi[c] * gi_w[c] + grad_rel;                                           \
            }                                                                                 \
            if (at.neighbour == K - 1)                                                        \
                for (int64_t c = 0; c < C; ++c) grad_q[point * C + c] = acc_q[c];             \
            grad_act_##S(gd, a->w2t, ga, C);                                                  \
            for (int o = 0; o < 3; ++o) {                                                     \
                gy3[o][r] = hr[o] * t_scale[o] + t_shift[o] > 0 ? ga[o] : 0;                  \
                xhat3[o][r] = (hr[o] - t_mean[o]) * t_rstd[o];                                \
                p3[o][r] = pr[o];                                                             \
            }                                                                                 \
            const T a0 = ar[0], a1 = ar[1], a2 = ar[2];                                       \
            T *restrict b0 = block + C, *restrict b1 = b0 + C, *restrict b2 = b1 + C;         \
            SIMD                                                                              \
            for (int64_t c = 0; c < C; ++c) {                                                 \
                block[c] += gd[c];                                                            \
                b0[c] += gd[c] * a0;                                                          \
                b1[c] += gd[c] * a1;                                                          \
                b2[c] += gd[c] * a2;                                                          \
            }                                                                                 \
        }                                                                                     \
        SIMD                                                                                  \
        for (int64_t c = 0; c < 4 * C; ++c) wide[c] += block[c];                              \
        for (int o = 0; o < 3; ++o) {                                                         \
            double *restrict s_gy = fixed[SUM_GY + o], *restrict s_gx = fixed[SUM_GY_XHAT + o]; \
            double *restrict s_x = fixed[SUM_XHAT + o], *restrict s_p = fixed[SUM_P + o];     \
            SIMD                                                                              \
            for (int l = 0; l < LANES; ++l) {                                                 \
                s_gy[l] += gy3[o][l];                                                         \
                s_gx[l] += gy3[o][l] * xhat3[o][l];                                           \
                s_x[l] += xhat3[o][l];                                                        \
                s_p[l] += p3[o][l];                                                           \
            }                                                                                 \
            for (int i = 0; i < 3; ++i) {                                                     \
                double *restrict s_gp = fixed[SUM_GY_P + 3 * o + i];                          \
                double *restrict s_xp = fixed[SUM_XHAT_P + 3 * o + i];                        \
                SIMD                                                                          \
                for (int l = 0; l < LANES; ++l) {                                             \
                    s_gp[l] += gy3[o][l] * p3[i][l];                                          \
                    s_xp[l] += xhat3[o][l] * p3[i][l];                                        \
                }                                                                             \
            }                                                                                 \
        }                                                                                     \
    }                                                                                         \
    for (int s = 0; s < FIXED_SUMS; ++s) {                                                    \
        double total = 0;                                                                     \
        for (int l = 0; l < LANES; ++l) total += fixed[s][l];                                 \
        sums[s] = total;                                                                      \
    }                                                                                         \
}

DEFINE_LT(float, f32)
DEFINE_LT(double, f64)

/* Unit functions with C and W constants for the presets whose gamma tail attention_softmax.c
 * takes (W <= 8: 16, 32 and 64 channels, float32), or read from the arguments. */
#define ARG(field) (((const lt_args *)a)->field)
#define DEFINE_UNITS(S, NAME, C, W)                                                           \
static void stats_##S##_##NAME(const void *a, int64_t u) { stats_##S(a, u, C); }              \
static void hidden_##S##_##NAME(const void *a, int64_t u) {                                   \
    hidden_##S(a, u, C, W, rows_per_block(C, W));                                             \
}                                                                                             \
static void aggregate_##S##_##NAME(const void *a, int64_t u) { aggregate_##S(a, u, C, W); }   \
static void aggregate_backward_##S##_##NAME(const void *a, int64_t u) {                       \
    aggregate_backward_##S(a, u, C, W);                                                       \
}                                                                                             \
static void norm_sums_##S##_##NAME(const void *a, int64_t u) { norm_sums_##S(a, u, C, W); }   \
static void relation_backward_##S##_##NAME(const void *a, int64_t u) {                        \
    relation_backward_##S(a, u, C, W);                                                        \
}
DEFINE_UNITS(f32, 16, 16, 2)
DEFINE_UNITS(f32, 32, 32, 4)
DEFINE_UNITS(f32, 64, 64, 8)
DEFINE_UNITS(f32, any, ARG(C), ARG(W))
DEFINE_UNITS(f64, any, ARG(C), ARG(W))

typedef struct {
    body_fn stats, hidden, aggregate, aggregate_backward, norm_sums, relation_backward;
} lt_kernels;

static lt_kernels select_kernels(int dtype, int64_t C, int64_t W) {
#define KERNELS(S, NAME) {stats_##S##_##NAME, hidden_##S##_##NAME, aggregate_##S##_##NAME, \
                          aggregate_backward_##S##_##NAME, norm_sums_##S##_##NAME,           \
                          relation_backward_##S##_##NAME}
    static const lt_kernels f64 = KERNELS(f64, any), f32 = KERNELS(f32, any);
    static const lt_kernels f32_c[] = {KERNELS(f32, 16), KERNELS(f32, 32), KERNELS(f32, 64)};
    if (dtype == DTYPE_F64) return f64;
    const int s = preset_index(C, W);
    return s >= 0 && s < 3 ? f32_c[s] : f32;
}

/* The shapes the bodies assume: rows of C channels on the stack, W dividing C. */
static int bad_shape(int dtype, int64_t B, int64_t N, int64_t K, int64_t C, int64_t W) {
    return dtype == DTYPE_BF16 || B < 1 || N < 1 || K < 1 || C < 1 || C > MAX_CHANNELS ||
           W < 1 || C % W != 0;
}

/* Exported: dtype DTYPE_F32 or DTYPE_F64, every tensor in it but idx (int64) and the double
 * sums. xyz (B, N, 3), idx (B, N, K); theta's w1 (3, 3), b1, t_scale, t_shift, t_mean, t_rstd
 * (3), w2t (3, C) (its second Linear's weight transposed), b2 (C); q, key, v (B, N, C); the
 * relation BatchNorm's scale, shift, mean, rstd, k1, k2, k3 (C); g1w (W, C), g1b (W); h, w and
 * their gradients (B, N, K, W); out, grad_out, grad_q, grad_key, grad_v (B, N, C). Each returns
 * STATUS_OK, STATUS_NO_MEMORY, STATUS_BAD_DTYPE, STATUS_BAD_SHAPE (nothing touched), or
 * STATUS_BAD_INDEX for a neighbour index outside [0, N). */
#define CHECKED(dtype, B, N, K, C, W)                                                         \
    if (bad_dtype(dtype)) return STATUS_BAD_DTYPE;                                            \
    if (bad_shape(dtype, B, N, K, C, W)) return STATUS_BAD_SHAPE

static int64_t chunks(int64_t M) { return (M + CHUNK - 1) / CHUNK; }

/* sums (2, C) double: the relation's sum and sum of squares per channel */
int lt_relation_stats(int dtype, int threads, int64_t B, int64_t N, int64_t K, int64_t C,
                      int64_t W, const void *xyz, const int64_t *idx, const void *w1,
                      const void *b1, const void *t_scale, const void *t_shift, const void *w2t,
                      const void *b2, const void *q, const void *key, double *sums) {
    int bad = 0;
    lt_args a = {.bad = &bad, .xyz = xyz, .idx = idx, .w1 = w1, .b1 = b1, .t_scale = t_scale,
                 .t_shift = t_shift, .w2t = w2t, .b2 = b2, .q = q, .key = key, .N = N, .K = K,
                 .C = C, .W = W, .M = B * N * K};
    CHECKED(dtype, B, N, K, C, W);
    const int status = chunked_sums(select_kernels(dtype, C, W).stats, &a, &a.partial,
                                    chunks(a.M), 2 * C, threads, sums);
    return status == STATUS_OK && bad ? STATUS_BAD_INDEX : status;
}

/* h (B, N, K, W) = G1 relu(rel scale + shift) + g1b */
int lt_hidden(int dtype, int threads, int64_t B, int64_t N, int64_t K, int64_t C, int64_t W,
              const void *xyz, const int64_t *idx, const void *w1, const void *b1,
              const void *t_scale, const void *t_shift, const void *w2t, const void *b2,
              const void *q, const void *key, const void *scale, const void *shift,
              const void *g1w, const void *g1b, void *h) {
    int bad = 0;
    lt_args a = {.bad = &bad, .xyz = xyz, .idx = idx, .w1 = w1, .b1 = b1, .t_scale = t_scale,
                 .t_shift = t_shift, .w2t = w2t, .b2 = b2, .q = q, .key = key, .scale = scale,
                 .shift = shift, .g1w = g1w, .g1b = g1b, .h = h, .N = N, .K = K, .C = C,
                 .W = W, .M = B * N * K};
    CHECKED(dtype, B, N, K, C, W);
    const int64_t rows = rows_per_block(C, W);
    for_each(select_kernels(dtype, C, W).hidden, &a, (a.M + rows - 1) / rows, threads);
    return bad ? STATUS_BAD_INDEX : STATUS_OK;
}

/* out (B, N, C) = sum_j w (tiled) * (v_j + delta) */
int lt_aggregate(int dtype, int threads, int64_t B, int64_t N, int64_t K, int64_t C, int64_t W,
                 const void *xyz, const int64_t *idx, const void *w1, const void *b1,
                 const void *t_scale, const void *t_shift, const void *w2t, const void *b2,
                 const void *v, const void *w, void *out) {
    int bad = 0;
    lt_args a = {.bad = &bad, .xyz = xyz, .idx = idx, .w1 = w1, .b1 = b1, .t_scale = t_scale,
                 .t_shift = t_shift, .w2t = w2t, .b2 = b2, .v = v, .w = w, .out = out, .N = N,
                 .K = K, .C = C, .W = W, .M = B * N * K};
    CHECKED(dtype, B, N, K, C, W);
    for_each(select_kernels(dtype, C, W).aggregate, &a, B * N, threads);
    return bad ? STATUS_BAD_INDEX : STATUS_OK;
}

/* grad_w (B, N, K, W) and grad_v (B, N, C, zeroed by the caller) from grad_out */
int lt_aggregate_backward(int dtype, int threads, int64_t B, int64_t N, int64_t K, int64_t C,
                          int64_t W, const void *xyz, const int64_t *idx, const void *w1,
                          const void *b1, const void *t_scale, const void *t_shift,
                          const void *w2t, const void *b2, const void *v, const void *w,
                          const void *grad_out, void *grad_w, void *grad_v) {
    int bad = 0;
    lt_args a = {.bad = &bad, .xyz = xyz, .idx = idx, .w1 = w1, .b1 = b1, .t_scale = t_scale,
                 .t_shift = t_shift, .w2t = w2t, .b2 = b2, .v = v, .w = w,
                 .grad_out = grad_out, .grad_w = grad_w, .grad_v = grad_v, .N = N, .K = K,
                 .C = C, .W = W, .M = B * N * K};
    CHECKED(dtype, B, N, K, C, W);
    for_each(select_kernels(dtype, C, W).aggregate_backward, &a, B, threads);
    return bad ? STATUS_BAD_INDEX : STATUS_OK;
}

/* sums (2 + W, C) double: sum gy, sum gy x_hat, then grad_h^T relu(bn(rel)) (G1's gradient) */
int lt_norm_sums(int dtype, int threads, int64_t B, int64_t N, int64_t K, int64_t C, int64_t W,
                 const void *xyz, const int64_t *idx, const void *w1, const void *b1,
                 const void *t_scale, const void *t_shift, const void *w2t, const void *b2,
                 const void *q, const void *key, const void *scale, const void *shift,
                 const void *mean, const void *rstd, const void *g1w, const void *grad_h,
                 double *sums) {
    int bad = 0;
    lt_args a = {.bad = &bad, .xyz = xyz, .idx = idx, .w1 = w1, .b1 = b1, .t_scale = t_scale,
                 .t_shift = t_shift, .w2t = w2t, .b2 = b2, .q = q, .key = key, .scale = scale,
                 .shift = shift, .mean = mean, .rstd = rstd, .g1w = g1w, .grad_h = grad_h,
                 .N = N, .K = K, .C = C, .W = W, .M = B * N * K};
    CHECKED(dtype, B, N, K, C, W);
    const int status = chunked_sums(select_kernels(dtype, C, W).norm_sums, &a, &a.partial,
                                    chunks(a.M), (2 + W) * C, threads, sums);
    return status == STATUS_OK && bad ? STATUS_BAD_INDEX : status;
}

/* grad_q, grad_key (B, N, C; grad_key zeroed by the caller) and theta's sums (30 + 4 C double,
 * position_encoding.c's layout) from grad_h (through the relation BatchNorm's k1, k2, k3) and
 * the aggregation's grad_out and w */
int lt_relation_backward(int dtype, int threads, int64_t B, int64_t N, int64_t K, int64_t C,
                         int64_t W, const void *xyz, const int64_t *idx, const void *w1,
                         const void *b1, const void *t_scale, const void *t_shift,
                         const void *t_mean, const void *t_rstd, const void *w2t,
                         const void *b2, const void *q, const void *key, const void *scale,
                         const void *shift, const void *mean, const void *rstd, const void *g1w,
                         const void *k1, const void *k2, const void *k3, const void *grad_h,
                         const void *w, const void *grad_out, void *grad_q, void *grad_key,
                         double *sums) {
    int bad = 0;
    lt_args a = {.bad = &bad, .xyz = xyz, .idx = idx, .w1 = w1, .b1 = b1, .t_scale = t_scale,
                 .t_shift = t_shift, .t_mean = t_mean, .t_rstd = t_rstd, .w2t = w2t, .b2 = b2,
                 .q = q, .key = key, .scale = scale, .shift = shift, .mean = mean,
                 .rstd = rstd, .g1w = g1w, .k1 = k1, .k2 = k2, .k3 = k3, .grad_h = grad_h,
                 .w = w, .grad_out = grad_out, .grad_q = grad_q, .grad_key = grad_key, .N = N,
                 .K = K, .C = C, .W = W, .M = B * N * K};
    CHECKED(dtype, B, N, K, C, W);
    const int status = chunked_sums(select_kernels(dtype, C, W).relation_backward, &a,
                                    &a.partial, B, FIXED_SUMS + 4 * C, threads, sums);
    return status == STATUS_OK && bad ? STATUS_BAD_INDEX : status;
}
