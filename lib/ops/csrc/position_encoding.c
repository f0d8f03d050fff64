/* The Point Transformer's position encoding (paper Eq. 4, theta in models/point_transformer.py)
 * for every point i and each of its k neighbours j = idx[i, n]:
 *
 *   p     = xyz_i - xyz_j                  (3)
 *   h     = W1 p + b1                      (3: theta's Linear(3, 3))
 *   act   = max(h scale + shift, 0)        (BatchNorm(3) as a per-channel affine map, ReLU)
 *   delta = W2 act + b2                    (C: theta's Linear(3, C))
 *
 * PyTorch writes p, h, BatchNorm's output and act as (M, 3) tensors (M = B N k), a pass each at
 * 3 channels, where its elementwise kernels run far below memory speed, and forms delta with a
 * K = 3 GEMM; its backward takes as many passes again. Here the forward reads xyz and idx twice
 * (BatchNorm's statistics, then delta) and writes only delta. The backward reads delta's
 * gradient once: each parameter's gradient is a sum over rows of that gradient times values
 * recomputed from xyz, BatchNorm's included once its input gradient k1 gy - k2 - k3 x_hat is
 * expanded, so one pass gathers every sum and lib/ops/position.py combines them. xyz itself
 * gets no gradient (lib/ops sends coordinates that want one to the PyTorch forms).
 *
 * Sums over rows go by fixed chunks of CHUNK rows, each in double, added up in chunk order: the
 * results do not depend on the number of threads. float32 and float64 forms, and bfloat16 rows
 * of delta and its gradient around float32 arithmetic (CPU bf16 autocast, bf16.h).
 */
#include <stdint.h>

#include "bf16.h"
#include "parallel.h"

enum { CHUNK = 2048, LANES = 16 };  /* grad_act_ adds 16 lanes in a tree written out */

/* The backward's sums, per chunk: the fixed block (offsets below, each 3 or 3 x 3 values),
 * then sum g (C), then sum g act_o for o = 0, 1, 2 (3 x C). */
enum { SUM_GY = 0, SUM_GY_XHAT = 3, SUM_XHAT = 6, SUM_P = 9, SUM_GY_P = 12, SUM_XHAT_P = 21,
       FIXED_SUMS = 30 };

typedef struct {
    const void *xyz, *w1, *b1, *scale, *shift, *mean, *rstd, *w2t, *b2, *grad;
    const int64_t *idx;
    int *bad; /* raised by checked_index (parallel.h) */
    void *out;
    double *partial; /* per chunk: the sums of that chunk */
    int64_t N, K, C, M;
} pe_args;

/* Row m's point (m / K) and its cloud's first point, kept up to date row by row: two integer
 * divisions per row cost as much as the rest of a row's work. */
typedef struct { int64_t point, first, neighbour; } row_cursor;

static inline row_cursor cursor_at(const pe_args *a, int64_t m) {
    const int64_t point = m / a->K;
    return (row_cursor){.point = point, .first = point / a->N * a->N, .neighbour = m % a->K};
}

static inline void cursor_next(const pe_args *a, row_cursor *at) {
    if (++at->neighbour < a->K) return;
    at->neighbour = 0;
    if (++at->point - at->first == a->N) at->first = at->point;
}

#define DEFINE_PE(T, R, S, LOAD, STORE)                                                       \
/* p and h of row m (at: its point; its neighbour is idx[m]); h sums its products in input    \
 * order, then adds the bias */                                                               \
static inline __attribute__((always_inline)) void                                             \
hidden_##S(const pe_args *a, int64_t m, const row_cursor *at, T p[3], T h[3]) {               \
    const T *xi = (const T *)a->xyz + at->point * 3;                                          \
    const T *xj = (const T *)a->xyz + (at->first + checked_index(a->idx[m], a->N, a->bad)) * 3; \
    const T *w1 = a->w1, *b1 = a->b1;                                                         \
    for (int i = 0; i < 3; ++i) p[i] = xi[i] - xj[i];                                         \
    for (int o = 0; o < 3; ++o)                                                               \
        h[o] = p[0] * w1[3 * o] + p[1] * w1[3 * o + 1] + p[2] * w1[3 * o + 2] + b1[o];        \
}                                                                                             \
                                                                                              \
/* partial[chunk] = (sum h, sum h^2) per channel over the chunk's rows */                     \
static __attribute__((unused)) void stats_##S(const void *v, int64_t chunk) {                  \
    const pe_args *a = (const pe_args *)v;                                                    \
    const int64_t end = (chunk + 1) * CHUNK < a->M ? (chunk + 1) * CHUNK : a->M;              \
    double *restrict sums = a->partial + chunk * 6;                                           \
    for (int c = 0; c < 6; ++c) sums[c] = 0;                                                  \
    row_cursor at = cursor_at(a, chunk * CHUNK);                                              \
    for (int64_t m = chunk * CHUNK; m < end; ++m, cursor_next(a, &at)) {                      \
        T p[3], h[3];                                                                         \
        hidden_##S(a, m, &at, p, h);                                                          \
        for (int o = 0; o < 3; ++o) {                                                         \
            sums[o] += h[o];                                                                  \
            sums[3 + o] += (double)h[o] * h[o];                                               \
        }                                                                                     \
    }                                                                                         \
}                                                                                             \
                                                                                              \
/* act of row m from its h */                                                                 \
static inline __attribute__((always_inline)) void                                             \
activation_##S(const pe_args *a, const T h[3], T act[3]) {                                    \
    const T *scale = a->scale, *shift = a->shift;                                             \
    for (int o = 0; o < 3; ++o) {                                                             \
        const T y = h[o] * scale[o] + shift[o];                                               \
        act[o] = y > 0 ? y : 0;                                                               \
    }                                                                                         \
}                                                                                             \
                                                                                              \
/* delta for the chunk's rows: W2 (given transposed, (3, C)) times act, plus b2 */            \
static inline __attribute__((always_inline)) void                                             \
forward_##S(const void *v, int64_t chunk, const int64_t C) {                                  \
    const pe_args *a = (const pe_args *)v;                                                    \
    const int64_t end = (chunk + 1) * CHUNK < a->M ? (chunk + 1) * CHUNK : a->M;              \
    const T *restrict w0 = a->w2t, *restrict w1 = w0 + C, *restrict w2 = w1 + C;              \
    const T *restrict b2 = a->b2;                                                             \
    row_cursor at = cursor_at(a, chunk * CHUNK);                                              \
    for (int64_t m = chunk * CHUNK; m < end; ++m, cursor_next(a, &at)) {                      \
        T p[3], h[3], act[3];                                                                 \
        hidden_##S(a, m, &at, p, h);                                                          \
        activation_##S(a, h, act);                                                            \
        R *restrict out = (R *)a->out + m * C;                                                \
        SIMD                                                                                  \
        for (int64_t c = 0; c < C; ++c)                                                       \
            out[c] = STORE(act[0] * w0[c] + act[1] * w1[c] + act[2] * w2[c] + b2[c]);         \
    }                                                                                         \
}                                                                                             \
                                                                                              \
/* The gradient reaching act in row m, (g W2)_o: C products summed in LANES running sums      \
 * (c mod LANES), which are then added pairwise in a fixed tree, so that every build (with   \
 * or without OpenMP's simd) sums in the same order */                                        \
static inline __attribute__((always_inline)) void                                             \
grad_act_##S(const R *restrict g, const T *restrict w2t, T ga[3], const int64_t C) {          \
    for (int o = 0; o < 3; ++o) {                                                             \
        const T *restrict w = w2t + o * C;                                                    \
        T lane[LANES] = {0};                                                                  \
        int64_t c0 = 0;                                                                       \
        for (; c0 + LANES <= C; c0 += LANES)                                                  \
            for (int l = 0; l < LANES; ++l) lane[l] += LOAD(g[c0 + l]) * w[c0 + l];           \
        for (int l = 0; c0 + l < C; ++l) lane[l] += LOAD(g[c0 + l]) * w[c0 + l];              \
        for (int l = 0; l < 8; ++l) lane[l] += lane[l + 8];                                   \
        for (int l = 0; l < 4; ++l) lane[l] += lane[l + 4];                                   \
        for (int l = 0; l < 2; ++l) lane[l] += lane[l + 2];                                   \
        ga[o] = lane[0] + lane[1];                                                            \
    }                                                                                         \
}                                                                                             \
                                                                                              \
/* partial[chunk] = the backward's sums (layout above) over the chunk's rows. Rows go in      \
 * blocks of LANES: the block's per-row values (gy, x_hat, p) are kept by row, and each fixed \
 * sum gathers them LANES rows at a time into per-lane double sums (vector lanes, where one   \
 * row at a time they were scalar operations: half of the pass); the C-wide sums of a block   \
 * are summed in float32 (float32 forms), then added in double. At the chunk's end the lanes  \
 * are added in order. */                                                                     \
static inline __attribute__((always_inline)) void                                             \
backward_sums_##S(const void *v, int64_t chunk, const int64_t C) {                            \
    const pe_args *a = (const pe_args *)v;                                                    \
    const int64_t end = (chunk + 1) * CHUNK < a->M ? (chunk + 1) * CHUNK : a->M;              \
    double *restrict sums = a->partial + chunk * (FIXED_SUMS + 4 * C);                        \
    double *restrict wide = sums + FIXED_SUMS;                                                \
    const T *mean = a->mean, *rstd = a->rstd, *scale = a->scale, *shift = a->shift;           \
    double fixed[FIXED_SUMS][LANES];                                                          \
    for (int s = 0; s < FIXED_SUMS; ++s)                                                      \
        for (int l = 0; l < LANES; ++l) fixed[s][l] = 0;                                      \
    for (int64_t c = 0; c < 4 * C; ++c) wide[c] = 0;                                          \
    T block[4 * C];                                                                           \
    row_cursor at = cursor_at(a, chunk * CHUNK);                                              \
    for (int64_t m0 = chunk * CHUNK; m0 < end; m0 += LANES) {                                 \
        double gy[3][LANES] = {{0}}, xhat[3][LANES] = {{0}}, p[3][LANES] = {{0}};             \
        SIMD                                                                                  \
        for (int64_t c = 0; c < 4 * C; ++c) block[c] = 0;                                     \
        for (int r = 0; r < LANES && m0 + r < end; ++r, cursor_next(a, &at)) {               \
            const int64_t m = m0 + r;                                                         \
            T pr[3], h[3], act[3], ga[3];                                                     \
            hidden_##S(a, m, &at, pr, h);                                                     \
            activation_##S(a, h, act);                                                        \
            const R *restrict g = (const R *)a->grad + m * C;                                 \
            grad_act_##S(g, a->w2t, ga, C);                                                   \
            for (int o = 0; o < 3; ++o) {                                                     \
                gy[o][r] = h[o] * scale[o] + shift[o] > 0 ? ga[o] : 0;                        \
                xhat[o][r] = (h[o] - mean[o]) * rstd[o];                                      \
                p[o][r] = pr[o];                                                              \
            }                                                                                 \
            const T a0 = act[0], a1 = act[1], a2 = act[2];                                    \
            T *restrict b0 = block + C, *restrict b1 = b0 + C, *restrict b2 = b1 + C;         \
            SIMD                                                                              \
            for (int64_t c = 0; c < C; ++c) {                                                 \
                const T gc = LOAD(g[c]);                                                      \
                block[c] += gc;                                                               \
                b0[c] += gc * a0;                                                             \
                b1[c] += gc * a1;                                                             \
                b2[c] += gc * a2;                                                             \
            }                                                                                 \
        }                                                                                     \
        SIMD                                                                                  \
        for (int64_t c = 0; c < 4 * C; ++c) wide[c] += block[c];                              \
        for (int o = 0; o < 3; ++o) {                                                         \
            double *restrict s_gy = fixed[SUM_GY + o], *restrict s_gx = fixed[SUM_GY_XHAT + o]; \
            double *restrict s_x = fixed[SUM_XHAT + o], *restrict s_p = fixed[SUM_P + o];     \
            SIMD                                                                              \
            for (int l = 0; l < LANES; ++l) {                                                 \
                s_gy[l] += gy[o][l];                                                          \
                s_gx[l] += gy[o][l] * xhat[o][l];                                             \
                s_x[l] += xhat[o][l];                                                         \
                s_p[l] += p[o][l];                                                            \
            }                                                                                 \
            for (int i = 0; i < 3; ++i) {                                                     \
                double *restrict s_gp = fixed[SUM_GY_P + 3 * o + i];                          \
                double *restrict s_xp = fixed[SUM_XHAT_P + 3 * o + i];                        \
                SIMD                                                                          \
                for (int l = 0; l < LANES; ++l) {                                             \
                    s_gp[l] += gy[o][l] * p[i][l];                                            \
                    s_xp[l] += xhat[o][l] * p[i][l];                                          \
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

DEFINE_PE(float, float, f32, SAME, SAME)
DEFINE_PE(double, double, f64, SAME, SAME)
/* bf16 rows (delta and its gradient) around float32 arithmetic (stats_bf16, unused, would be
 * stats_f32: the points stay float32) */
DEFINE_PE(float, uint16_t, bf16, bf16_load, bf16_store)

/* Unit functions with C constant for the presets' widths (so that the row loops unroll and
 * vectorise), or read from the arguments. */
#define DEFINE_UNITS(S, NAME, C)                                                              \
static void forward_##S##_##NAME(const void *a, int64_t u) { forward_##S(a, u, C); }          \
static void backward_sums_##S##_##NAME(const void *a, int64_t u) { backward_sums_##S(a, u, C); }
#define PRESET_UNITS(S, C, W) DEFINE_UNITS(S, C, C)
#define ARG(field) (((const pe_args *)a)->field)
FOR_EACH_PRESET(PRESET_UNITS, f32)
FOR_EACH_PRESET(PRESET_UNITS, bf16)
DEFINE_UNITS(f32, any, ARG(C))
DEFINE_UNITS(f64, any, ARG(C))
DEFINE_UNITS(bf16, any, ARG(C))

typedef struct { body_fn forward, backward_sums; } pe_kernels;

static pe_kernels select_kernels(int dtype, int64_t C) {
#define KERNELS(S, NAME) {forward_##S##_##NAME, backward_sums_##S##_##NAME}
#define PRESET_KERNELS(S, C, W) KERNELS(S, C),
    static const pe_kernels f64 = KERNELS(f64, any), f32 = KERNELS(f32, any),
                            bf16 = KERNELS(bf16, any);
    static const pe_kernels f32_c[] = {FOR_EACH_PRESET(PRESET_KERNELS, f32)};
    static const pe_kernels bf16_c[] = {FOR_EACH_PRESET(PRESET_KERNELS, bf16)};
    if (dtype == DTYPE_F64) return f64;
    const int s = preset_index(C, C / 8);
    if (dtype == DTYPE_BF16) return s >= 0 ? bf16_c[s] : bf16;
    return s >= 0 ? f32_c[s] : f32;
}

/* Exported: dtype DTYPE_F32 or DTYPE_F64, every tensor but idx (int64, each within [0, N)) and
 * the double sums in that type; or DTYPE_BF16: out and grad bfloat16 rows, the rest float32
 * (CPU bf16 autocast). xyz (B, N, 3), idx (B, N, K), w1 (3, 3), b1, scale, shift, mean, rstd
 * (3), w2t (3, C), b2 (C), out and grad (B, N, K, C). Each returns STATUS_OK, STATUS_NO_MEMORY,
 * STATUS_BAD_DTYPE, STATUS_BAD_SHAPE, or STATUS_BAD_INDEX for an index outside [0, N). */
static int bad_shape(int64_t B, int64_t N, int64_t K, int64_t C) {
    return B < 0 || N < 1 || K < 1 || C < 1 || C > MAX_CHANNELS;
}

/* sums (2, 3) double: sum h and sum h^2 per channel. */
int pe_stats(int dtype, int threads, int64_t B, int64_t N, int64_t K, const void *xyz,
             const int64_t *idx, const void *w1, const void *b1, double *sums) {
    int bad = 0;
    pe_args a = {.bad = &bad, .xyz = xyz, .idx = idx, .w1 = w1, .b1 = b1, .N = N, .K = K,
                 .M = B * N * K};
    if (bad_dtype(dtype)) return STATUS_BAD_DTYPE;
    if (bad_shape(B, N, K, 1)) return STATUS_BAD_SHAPE;
    const int status = chunked_sums(dtype == DTYPE_F64 ? stats_f64 : stats_f32, &a, &a.partial,
                                    (a.M + CHUNK - 1) / CHUNK, 6, threads, sums);
    return status == STATUS_OK && bad ? STATUS_BAD_INDEX : status;
}

int pe_forward(int dtype, int threads, int64_t B, int64_t N, int64_t K, int64_t C,
               const void *xyz, const int64_t *idx, const void *w1, const void *b1,
               const void *scale, const void *shift, const void *w2t, const void *b2,
               void *out) {
    int bad = 0;
    pe_args a = {.bad = &bad, .xyz = xyz, .idx = idx, .w1 = w1, .b1 = b1, .scale = scale,
                 .shift = shift, .w2t = w2t, .b2 = b2, .out = out, .N = N, .K = K, .C = C,
                 .M = B * N * K};
    if (bad_dtype(dtype)) return STATUS_BAD_DTYPE;
    if (bad_shape(B, N, K, C)) return STATUS_BAD_SHAPE;
    for_each(select_kernels(dtype, C).forward, &a, (a.M + CHUNK - 1) / CHUNK, threads);
    return bad ? STATUS_BAD_INDEX : STATUS_OK;
}

/* sums (30 + 4 C) double, the layout above. */
int pe_backward_sums(int dtype, int threads, int64_t B, int64_t N, int64_t K, int64_t C,
                     const void *xyz, const int64_t *idx, const void *w1, const void *b1,
                     const void *scale, const void *shift, const void *mean, const void *rstd,
                     const void *w2t, const void *grad, double *sums) {
    int bad = 0;
    pe_args a = {.bad = &bad, .xyz = xyz, .idx = idx, .w1 = w1, .b1 = b1, .scale = scale,
                 .shift = shift, .mean = mean, .rstd = rstd, .w2t = w2t, .grad = grad, .N = N,
                 .K = K, .C = C, .M = B * N * K};
    if (bad_dtype(dtype)) return STATUS_BAD_DTYPE;
    if (bad_shape(B, N, K, C)) return STATUS_BAD_SHAPE;
    const int status = chunked_sums(select_kernels(dtype, C).backward_sums, &a, &a.partial,
                                    (a.M + CHUNK - 1) / CHUNK, FIXED_SUMS + 4 * C, threads, sums);
    return status == STATUS_OK && bad ? STATUS_BAD_INDEX : status;
}
