/* BatchNorm, ReLU, Linear over (M, C) rows in few passes: the first half of the Point
 * Transformer's gamma (models/point_transformer.py), applied to the (B, N, k, C) relation.
 * lib/ops/layers.py's _NormReluLinear drives these steps and keeps BatchNorm's running
 * statistics; lib/ops/native.py builds this file with the others here.
 *
 *   y = x scale + shift (per channel: scale = gamma rstd, shift = beta - mean scale)
 *   a = max(y, 0)
 *   h = a W^T + b       (W: (O, C), O outputs, few: C / share_planes)
 *
 * PyTorch runs this as BatchNorm (a statistics pass and a normalising pass), an in-place ReLU
 * and a GEMM, and backward as a GEMM, ReLU's backward, BatchNorm's backward (two passes) and a
 * weight-gradient GEMM: about fifteen passes over (M, C), which is memory-bound work at these
 * sizes. Here: one pass for the statistics and one for h forward; backward, one pass for
 * every sum (BatchNorm's two, W's gradient) and one writing dx. Nothing (M, C) is stored but x.
 *
 * Sums over rows go by fixed chunks of CHUNK rows, each in double (float32 forms: each block of
 * ROW_BLOCK rows summed in float32 first), added up in chunk order: the results do not depend
 * on the number of threads. bfloat16 rows (CPU bf16 autocast) are computed in float32 with the
 * float32 weights, as the float32 form (bf16.h).
 */
#include <stdint.h>

#include "bf16.h"
#include "parallel.h"

enum { CHUNK = 2048 };

/* The forward takes rows in blocks of ROW_BLOCK (one vector of float32 lanes), its (C + O) x
 * ROW_BLOCK values on the stack, and the float32 backward sums a block's (2 + O) x C terms on
 * the stack; each only up to BLOCK_VALUES values (16 KiB), so rows wider than the presets' up to
 * 128 channels go one at a time (forward) or straight into double (backward). */
enum { ROW_BLOCK = 16, BLOCK_VALUES = 4096 };

static inline int64_t rows_per_block(int64_t C, int64_t O) {
    return (C + O) * ROW_BLOCK <= BLOCK_VALUES ? ROW_BLOCK : 1;
}

typedef struct {
    const void *x, *scale, *shift, *weight, *bias, *grad_h, *mean, *rstd, *k1, *k2, *k3;
    void *out, *grad_x;
    double *partial; /* per chunk: the sums of that chunk */
    int64_t M, C, O;
} nrl_args;

/* One row's terms of the backward's sums, added to `sums` ((2 + O) x C) in A: float for the
 * float32 forms' blocks of rows, double otherwise. */
#define DEFINE_ROW_SUMS(T, R, S, LOAD, A)                                                     \
static inline __attribute__((always_inline)) void                                             \
add_row_sums_##S##_##A(A *restrict sums, const T *gy, const T *act, const T *xhat,            \
                       const R *restrict gh, const int64_t C, const int64_t O) {              \
    SIMD                                                                                      \
    for (int64_t c = 0; c < C; ++c) {                                                         \
        sums[c] += gy[c];                                                                     \
        sums[C + c] += (A)gy[c] * xhat[c];                                                    \
    }                                                                                         \
    for (int64_t o = 0; o < O; ++o) {                                                         \
        A *restrict gw = sums + (2 + o) * C;                                                  \
        const A gho = LOAD(gh[o]);                                                            \
        SIMD                                                                                  \
        for (int64_t c = 0; c < C; ++c) gw[c] += gho * act[c];                                \
    }                                                                                         \
}

#define DEFINE_NRL(T, R, S, LOAD, STORE)                                                      \
/* partial[chunk] = (sum x, sum x^2) per channel over the chunk's rows */                     \
static void stats_##S(const void *p, int64_t chunk) {                                         \
    const nrl_args *a = (const nrl_args *)p;                                                  \
    const int64_t C = a->C, end = (chunk + 1) * CHUNK < a->M ? (chunk + 1) * CHUNK : a->M;    \
    double *restrict sum = a->partial + chunk * 2 * C, *restrict sq = sum + C;                \
    for (int64_t c = 0; c < 2 * C; ++c) sum[c] = 0;                                           \
    for (int64_t m = chunk * CHUNK; m < end; ++m) {                                           \
        const R *restrict x = (const R *)a->x + m * C;                                        \
        SIMD                                                                                  \
        for (int64_t c = 0; c < C; ++c) {                                                     \
            const T xc = LOAD(x[c]);                                                          \
            sum[c] += xc;                                                                     \
            sq[c] += (double)xc * xc;                                                         \
        }                                                                                     \
    }                                                                                         \
}                                                                                             \
                                                                                              \
/* h for the BR rows of block `blk` (fewer in the last). With BR = ROW_BLOCK the              \
 * activations are kept as one vector of the block's rows per channel, so that each           \
 * product runs over the rows in vector lanes: no dot product ends in a horizontal sum        \
 * across lanes, which cost a row more than its products. Each h sums its C products in       \
 * channel order, then adds the bias. */                                                      \
typedef T rows_##S __attribute__((vector_size(sizeof(T) * ROW_BLOCK)));                        \
static inline __attribute__((always_inline)) void                                             \
forward_##S(const void *p, int64_t blk, const int64_t C, const int64_t O, const int64_t BR) {  \
    const nrl_args *a = (const nrl_args *)p;                                                  \
    const int64_t m0 = blk * BR, rows = a->M - m0 < BR ? a->M - m0 : BR;                      \
    const T *restrict scale = a->scale, *restrict shift = a->shift;                           \
    const T *restrict weight = a->weight, *restrict bias = a->bias;                           \
    const R *restrict x = (const R *)a->x + m0 * C;                                           \
    R *restrict h = (R *)a->out + m0 * O;                                                     \
    if (BR == ROW_BLOCK) {                                                                    \
        rows_##S act[C], acc[O];                                                              \
        for (int64_t r = 0; r < ROW_BLOCK; ++r) {                                             \
            const R *restrict row = x + (r < rows ? r : 0) * C;                               \
            for (int64_t c = 0; c < C; ++c) {                                                 \
                const T y = LOAD(row[c]) * scale[c] + shift[c];                               \
                act[c][r] = y > 0 ? y : 0;                                                    \
            }                                                                                 \
        }                                                                                     \
        for (int64_t o = 0; o < O; ++o) acc[o] = (rows_##S){0};                               \
        for (int64_t c = 0; c < C; ++c)                                                       \
            for (int64_t o = 0; o < O; ++o) acc[o] += weight[o * C + c] * act[c];             \
        for (int64_t r = 0; r < rows; ++r)                                                    \
            for (int64_t o = 0; o < O; ++o) h[r * O + o] = STORE(acc[o][r] + bias[o]);        \
        return;                                                                               \
    }                                                                                         \
    for (int64_t r = 0; r < rows; ++r)                                                        \
        for (int64_t o = 0; o < O; ++o) {                                                     \
            const T *restrict w = weight + o * C;                                             \
            const R *restrict row = x + r * C;                                                \
            T sum = 0;                                                                        \
            for (int64_t c = 0; c < C; ++c) {                                                 \
                const T y = LOAD(row[c]) * scale[c] + shift[c];                               \
                sum += w[c] * (y > 0 ? y : 0);                                                \
            }                                                                                 \
            h[r * O + o] = STORE(sum + bias[o]);                                              \
        }                                                                                     \
}                                                                                             \
                                                                                              \
/* The gradient reaching y in row m: (grad_h W) where y > 0, else 0; also a and x_hat. */     \
static inline __attribute__((always_inline)) void                                             \
grad_y_##S(const nrl_args *a, int64_t m, T *gy, T *act, T *xhat, const int64_t C,             \
           const int64_t O) {                                                                 \
    const R *restrict x = (const R *)a->x + m * C, *restrict gh = (const R *)a->grad_h + m * O; \
    const T *restrict scale = a->scale, *restrict shift = a->shift;                           \
    const T *restrict mean = a->mean, *restrict rstd = a->rstd;                               \
    SIMD                                                                                      \
    for (int64_t c = 0; c < C; ++c) gy[c] = 0;                                                \
    for (int64_t o = 0; o < O; ++o) {                                                         \
        const T *restrict w = (const T *)a->weight + o * C;                                   \
        const T gho = LOAD(gh[o]);                                                            \
        SIMD                                                                                  \
        for (int64_t c = 0; c < C; ++c) gy[c] += gho * w[c];                                  \
    }                                                                                         \
    SIMD                                                                                      \
    for (int64_t c = 0; c < C; ++c) {                                                         \
        const T xc = LOAD(x[c]), y = xc * scale[c] + shift[c];                                \
        act[c] = y > 0 ? y : 0;                                                               \
        gy[c] = y > 0 ? gy[c] : 0;                                                            \
        xhat[c] = (xc - mean[c]) * rstd[c];                                                   \
    }                                                                                         \
}                                                                                             \
                                                                                              \
DEFINE_ROW_SUMS(T, R, S, LOAD, float)                                                         \
DEFINE_ROW_SUMS(T, R, S, LOAD, double)                                                        \
                                                                                              \
/* partial[chunk] = (sum gy, sum gy x_hat) per channel, then sum grad_h a^T (O, C).           \
 * float32 forms sum ROW_BLOCK rows at a time in float32 (vector lanes twice as wide as       \
 * double's), each block's sums then added in double; float64 sums in double throughout. */   \
static inline __attribute__((always_inline)) void                                             \
backward_sums_##S(const void *p, int64_t chunk, const int64_t C, const int64_t O) {           \
    const nrl_args *a = (const nrl_args *)p;                                                  \
    const int64_t start = chunk * CHUNK, width = (2 + O) * C;                                 \
    const int64_t end = start + CHUNK < a->M ? start + CHUNK : a->M;                          \
    double *restrict sums = a->partial + chunk * width;                                       \
    for (int64_t c = 0; c < width; ++c) sums[c] = 0;                                          \
    T gy[C], act[C], xhat[C];                                                                 \
    const R *restrict grad_h = (const R *)a->grad_h;                                          \
    if (sizeof(T) == sizeof(float) && width <= BLOCK_VALUES) {                                \
        float block[width];                                                                   \
        for (int64_t m0 = start; m0 < end; m0 += ROW_BLOCK) {                                 \
            for (int64_t c = 0; c < width; ++c) block[c] = 0;                                 \
            for (int64_t m = m0; m < end && m < m0 + ROW_BLOCK; ++m) {                        \
                grad_y_##S(a, m, gy, act, xhat, C, O);                                        \
                add_row_sums_##S##_float(block, gy, act, xhat, grad_h + m * O, C, O);         \
            }                                                                                 \
            for (int64_t c = 0; c < width; ++c) sums[c] += block[c];                          \
        }                                                                                     \
        return;                                                                               \
    }                                                                                         \
    for (int64_t m = start; m < end; ++m) {                                                   \
        grad_y_##S(a, m, gy, act, xhat, C, O);                                                \
        add_row_sums_##S##_double(sums, gy, act, xhat, grad_h + m * O, C, O);                 \
    }                                                                                         \
}                                                                                             \
                                                                                              \
/* dx = k1 gy - k2 - k3 x_hat, BatchNorm's backward with its sums folded into k1, k2, k3 */   \
static inline __attribute__((always_inline)) void                                             \
backward_input_##S(const void *p, int64_t m, const int64_t C, const int64_t O) {              \
    const nrl_args *a = (const nrl_args *)p;                                                  \
    const T *restrict k1 = a->k1, *restrict k2 = a->k2, *restrict k3 = a->k3;                 \
    T gy[C], act[C], xhat[C];                                                                 \
    grad_y_##S(a, m, gy, act, xhat, C, O);                                                    \
    R *restrict dx = (R *)a->grad_x + m * C;                                                  \
    SIMD                                                                                      \
    for (int64_t c = 0; c < C; ++c) dx[c] = STORE(k1[c] * gy[c] - k2[c] - k3[c] * xhat[c]);   \
}

DEFINE_NRL(float, float, f32, SAME, SAME)
DEFINE_NRL(double, double, f64, SAME, SAME)
DEFINE_NRL(float, uint16_t, bf16, bf16_load, bf16_store)

/* Unit functions: with C and O constants (the presets' C / 8 = O at 16, 32, 64 and 128 channels,
 * float32) so that the row loops unroll and vectorise, or read from the arguments. */
#define DEFINE_UNITS(S, NAME, C, O)                                                           \
static void forward_##S##_##NAME(const void *a, int64_t u) {                                  \
    forward_##S(a, u, C, O, rows_per_block(C, O));                                            \
}                                                                                             \
static void backward_sums_##S##_##NAME(const void *a, int64_t u) {                            \
    backward_sums_##S(a, u, C, O);                                                            \
}                                                                                             \
static void backward_input_##S##_##NAME(const void *a, int64_t u) {                           \
    backward_input_##S(a, u, C, O);                                                           \
}
#define ARG(field) (((const nrl_args *)a)->field)
DEFINE_UNITS(f32, 16, 16, 2)
DEFINE_UNITS(f32, 32, 32, 4)
DEFINE_UNITS(f32, 64, 64, 8)
DEFINE_UNITS(f32, 128, 128, 16)
DEFINE_UNITS(f32, any, ARG(C), ARG(O))
DEFINE_UNITS(f64, any, ARG(C), ARG(O))
DEFINE_UNITS(bf16, 16, 16, 2)
DEFINE_UNITS(bf16, 32, 32, 4)
DEFINE_UNITS(bf16, 64, 64, 8)
DEFINE_UNITS(bf16, any, ARG(C), ARG(O))

typedef struct { body_fn forward, backward_sums, backward_input; } nrl_kernels;

static nrl_kernels select_kernels(int dtype, int64_t C, int64_t O) {
#define KERNELS(S, NAME) {forward_##S##_##NAME, backward_sums_##S##_##NAME, \
                          backward_input_##S##_##NAME}
    static const nrl_kernels f64 = KERNELS(f64, any), f32 = KERNELS(f32, any),
                             bf16 = KERNELS(bf16, any);
    /* the first four presets in float32, three in bf16: lib/ops sends wider rows to the GEMM */
    static const nrl_kernels f32_c[] = {KERNELS(f32, 16), KERNELS(f32, 32), KERNELS(f32, 64),
                                        KERNELS(f32, 128)};
    static const nrl_kernels bf16_c[] = {KERNELS(bf16, 16), KERNELS(bf16, 32),
                                         KERNELS(bf16, 64)};
    if (dtype == DTYPE_F64) return f64;
    const int s = preset_index(C, O);
    if (dtype == DTYPE_BF16) return s >= 0 && s < 3 ? bf16_c[s] : bf16;
    return s >= 0 && s < 4 ? f32_c[s] : f32;
}

/* Exported: dtype DTYPE_F32 or DTYPE_F64, every tensor but the double sums in that type; or
 * DTYPE_BF16: the rows x, out, grad_h and grad_x bfloat16, the per-channel vectors and the
 * weight and bias float32. Each returns STATUS_OK, STATUS_NO_MEMORY, STATUS_BAD_DTYPE, or
 * STATUS_BAD_SHAPE (rows of C values live on the stack). */
static int64_t chunks(int64_t M) { return (M + CHUNK - 1) / CHUNK; }

static int bad_shape(int64_t C, int64_t O) {
    return C < 1 || C > MAX_CHANNELS || O < 1 || O > MAX_CHANNELS;
}

/* sums (2, C) double: sum x and sum x^2 per channel. */
int nrl_stats(int dtype, int threads, int64_t M, int64_t C, const void *x, double *sums) {
    nrl_args a = {.x = x, .M = M, .C = C};
    if (bad_dtype(dtype)) return STATUS_BAD_DTYPE;
    if (bad_shape(C, 1)) return STATUS_BAD_SHAPE;
    body_fn stats[] = {stats_f32, stats_f64, stats_bf16};
    return chunked_sums(stats[dtype], &a, &a.partial, chunks(M), 2 * C, threads, sums);
}

int nrl_forward(int dtype, int threads, int64_t M, int64_t C, int64_t O, const void *x,
                 const void *scale, const void *shift, const void *weight, const void *bias,
                 void *out) {
    nrl_args a = {.x = x, .scale = scale, .shift = shift, .weight = weight, .bias = bias,
                  .out = out, .M = M, .C = C, .O = O};
    if (bad_dtype(dtype)) return STATUS_BAD_DTYPE;
    if (bad_shape(C, O)) return STATUS_BAD_SHAPE;
    const int64_t rows = rows_per_block(C, O);
    for_each(select_kernels(dtype, C, O).forward, &a, (M + rows - 1) / rows, threads);
    return STATUS_OK;
}

/* sums (2 + O, C) double: sum gy, sum gy x_hat, then grad_h^T a (the weight's gradient). */
int nrl_backward_sums(int dtype, int threads, int64_t M, int64_t C, int64_t O, const void *x,
                      const void *grad_h, const void *scale, const void *shift,
                      const void *mean, const void *rstd, const void *weight, double *sums) {
    nrl_args a = {.x = x, .grad_h = grad_h, .scale = scale, .shift = shift, .mean = mean,
                  .rstd = rstd, .weight = weight, .M = M, .C = C, .O = O};
    if (bad_dtype(dtype)) return STATUS_BAD_DTYPE;
    if (bad_shape(C, O)) return STATUS_BAD_SHAPE;
    return chunked_sums(select_kernels(dtype, C, O).backward_sums, &a, &a.partial, chunks(M),
                        (2 + O) * C, threads, sums);
}

int nrl_backward_input(int dtype, int threads, int64_t M, int64_t C, int64_t O, const void *x,
                        const void *grad_h, const void *scale, const void *shift,
                        const void *mean, const void *rstd, const void *weight, const void *k1,
                        const void *k2, const void *k3, void *grad_x) {
    nrl_args a = {.x = x, .grad_h = grad_h, .scale = scale, .shift = shift, .mean = mean,
                  .rstd = rstd, .weight = weight, .k1 = k1, .k2 = k2, .k3 = k3,
                  .grad_x = grad_x, .M = M, .C = C, .O = O};
    if (bad_dtype(dtype)) return STATUS_BAD_DTYPE;
    if (bad_shape(C, O)) return STATUS_BAD_SHAPE;
    for_each(select_kernels(dtype, C, O).backward_input, &a, M, threads);
    return STATUS_OK;
}
