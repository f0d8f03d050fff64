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
 * Sums over rows go by fixed chunks of CHUNK rows, each in double, added up in chunk order:
 * the results do not depend on the number of threads. bfloat16 rows (CPU bf16 autocast) are
 * computed in float32 with the float32 weights, as the float32 form (bf16.h).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "parallel.h"

enum { CHUNK = 2048 };

typedef struct {
    const void *x, *scale, *shift, *weight, *bias, *grad_h, *mean, *rstd, *k1, *k2, *k3;
    void *out, *grad_x;
    double *partial; /* per chunk: the sums of that chunk */
    int64_t M, C, O;
} nrl_args;

/* One row's dot product of length C: LANES-wide partial sums, then the lanes and the tail in a
 * fixed order (a float sum is not vectorised by the compiler otherwise). */
#define DEFINE_DOT(T, S, LANES)                                                               \
typedef T vec_##S __attribute__((vector_size(sizeof(T) * LANES)));                            \
static inline T dot_##S(const T *a, const T *b, int64_t C) {                                  \
    vec_##S acc = {0};                                                                        \
    int64_t c = 0;                                                                            \
    for (; c + LANES <= C; c += LANES) {                                                      \
        vec_##S va, vb;                                                                       \
        memcpy(&va, a + c, sizeof va);                                                        \
        memcpy(&vb, b + c, sizeof vb);                                                        \
        acc += va * vb;                                                                       \
    }                                                                                         \
    T sum = 0;                                                                                \
    for (int l = 0; l < LANES; ++l) sum += acc[l];                                            \
    for (; c < C; ++c) sum += a[c] * b[c];                                                    \
    return sum;                                                                               \
}

DEFINE_DOT(float, f32, 16)
DEFINE_DOT(double, f64, 8)
DEFINE_DOT(float, bf16, 16)

#define DEFINE_NRL(T, R, S, LOAD, STORE)                                                      \
/* partial[chunk] = (sum x, sum x^2) per channel over the chunk's rows */                     \
static void stats_##S(const void *p, int64_t chunk) {                                         \
    const nrl_args *a = (const nrl_args *)p;                                                  \
    const int64_t C = a->C, end = (chunk + 1) * CHUNK < a->M ? (chunk + 1) * CHUNK : a->M;    \
    double *restrict sum = a->partial + chunk * 2 * C, *restrict sq = sum + C;                \
    for (int64_t c = 0; c < 2 * C; ++c) sum[c] = 0;                                           \
    for (int64_t m = chunk * CHUNK; m < end; ++m) {                                           \
        const R *restrict x = (const R *)a->x + m * C;                                        \
        for (int64_t c = 0; c < C; ++c) {                                                     \
            const T xc = LOAD(x[c]);                                                          \
            sum[c] += xc;                                                                     \
            sq[c] += (double)xc * xc;                                                         \
        }                                                                                     \
    }                                                                                         \
}                                                                                             \
                                                                                              \
static inline __attribute__((always_inline)) void                                             \
forward_##S(const void *p, int64_t m, const int64_t C, const int64_t O) {                     \
    const nrl_args *a = (const nrl_args *)p;                                                  \
    const R *restrict x = (const R *)a->x + m * C;                                            \
    const T *restrict scale = a->scale, *restrict shift = a->shift;                           \
    T act[C];                                                                                 \
    for (int64_t c = 0; c < C; ++c) {                                                         \
        const T y = LOAD(x[c]) * scale[c] + shift[c];                                         \
        act[c] = y > 0 ? y : 0;                                                               \
    }                                                                                         \
    R *restrict h = (R *)a->out + m * O;                                                      \
    for (int64_t o = 0; o < O; ++o)                                                           \
        h[o] = STORE(dot_##S(act, (const T *)a->weight + o * C, C) + ((const T *)a->bias)[o]); \
}                                                                                             \
                                                                                              \
/* The gradient reaching y in row m: (grad_h W) where y > 0, else 0; also a and x_hat. */     \
static inline __attribute__((always_inline)) void                                             \
grad_y_##S(const nrl_args *a, int64_t m, T *gy, T *act, T *xhat, const int64_t C,             \
           const int64_t O) {                                                                 \
    const R *restrict x = (const R *)a->x + m * C, *restrict gh = (const R *)a->grad_h + m * O; \
    const T *restrict scale = a->scale, *restrict shift = a->shift;                           \
    const T *restrict mean = a->mean, *restrict rstd = a->rstd;                               \
    for (int64_t c = 0; c < C; ++c) gy[c] = 0;                                                \
    for (int64_t o = 0; o < O; ++o) {                                                         \
        const T *restrict w = (const T *)a->weight + o * C;                                   \
        const T gho = LOAD(gh[o]);                                                            \
        for (int64_t c = 0; c < C; ++c) gy[c] += gho * w[c];                                  \
    }                                                                                         \
    for (int64_t c = 0; c < C; ++c) {                                                         \
        const T xc = LOAD(x[c]), y = xc * scale[c] + shift[c];                                \
        act[c] = y > 0 ? y : 0;                                                               \
        gy[c] = y > 0 ? gy[c] : 0;                                                            \
        xhat[c] = (xc - mean[c]) * rstd[c];                                                   \
    }                                                                                         \
}                                                                                             \
                                                                                              \
/* partial[chunk] = (sum gy, sum gy x_hat) per channel, then sum grad_h a^T (O, C) */         \
static inline __attribute__((always_inline)) void                                             \
backward_sums_##S(const void *p, int64_t chunk, const int64_t C, const int64_t O) {           \
    const nrl_args *a = (const nrl_args *)p;                                                  \
    const int64_t end = (chunk + 1) * CHUNK < a->M ? (chunk + 1) * CHUNK : a->M;              \
    double *restrict sums = a->partial + chunk * (2 + O) * C;                                 \
    for (int64_t c = 0; c < (2 + O) * C; ++c) sums[c] = 0;                                    \
    T gy[C], act[C], xhat[C];                                                                 \
    for (int64_t m = chunk * CHUNK; m < end; ++m) {                                           \
        grad_y_##S(a, m, gy, act, xhat, C, O);                                                \
        for (int64_t c = 0; c < C; ++c) {                                                     \
            sums[c] += gy[c];                                                                 \
            sums[C + c] += (double)gy[c] * xhat[c];                                           \
        }                                                                                     \
        const R *restrict gh = (const R *)a->grad_h + m * O;                                  \
        for (int64_t o = 0; o < O; ++o) {                                                     \
            double *restrict gw = sums + (2 + o) * C;                                         \
            const double gho = LOAD(gh[o]);                                                   \
            for (int64_t c = 0; c < C; ++c) gw[c] += gho * act[c];                            \
        }                                                                                     \
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
    for (int64_t c = 0; c < C; ++c) dx[c] = STORE(k1[c] * gy[c] - k2[c] - k3[c] * xhat[c]);   \
}

DEFINE_NRL(float, float, f32, SAME, SAME)
DEFINE_NRL(double, double, f64, SAME, SAME)
DEFINE_NRL(float, uint16_t, bf16, bf16_load, bf16_store)

/* Unit functions: with C and O constants (the presets' C / 8 = O at 16, 32 and 64 channels,
 * float32) so that the row loops unroll and vectorise, or read from the arguments. */
#define DEFINE_UNITS(S, NAME, C, O)                                                           \
static void forward_##S##_##NAME(const void *a, int64_t u) { forward_##S(a, u, C, O); }       \
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
    /* the first three presets: lib/ops sends wider rows to the GEMM */
    static const nrl_kernels f32_c[] = {KERNELS(f32, 16), KERNELS(f32, 32), KERNELS(f32, 64)};
    static const nrl_kernels bf16_c[] = {KERNELS(bf16, 16), KERNELS(bf16, 32),
                                         KERNELS(bf16, 64)};
    if (dtype == DTYPE_F64) return f64;
    const int s = preset_index(C, O);
    if (dtype == DTYPE_BF16) return s >= 0 && s < 3 ? bf16_c[s] : bf16;
    return s >= 0 && s < 3 ? f32_c[s] : f32;
}

/* Runs `body` over the chunks, then adds their `width` sums up in chunk order into `out`.
 * Returns 0, or -1 without memory for the partial sums. */
static int chunked_sums(body_fn body, nrl_args *a, int64_t width, int threads, double *out) {
    const int64_t chunks = (a->M + CHUNK - 1) / CHUNK;
    a->partial = malloc(sizeof(double) * (chunks > 0 ? chunks : 1) * width);
    if (!a->partial) return -1;
    for_each(body, a, chunks, threads);
    for (int64_t c = 0; c < width; ++c) out[c] = 0;
    for (int64_t k = 0; k < chunks; ++k)
        for (int64_t c = 0; c < width; ++c) out[c] += a->partial[k * width + c];
    free(a->partial);
    return 0;
}

/* Exported: dtype DTYPE_F32 or DTYPE_F64, every tensor but the double sums in that type; or
 * DTYPE_BF16: the rows x, out, grad_h and grad_x bfloat16, the per-channel vectors and the
 * weight and bias float32. Each returns STATUS_OK, STATUS_NO_MEMORY, STATUS_BAD_DTYPE, or
 * STATUS_BAD_SHAPE (rows of C values live on the stack). */
static int bad_shape(int64_t C, int64_t O) { return C < 1 || C > MAX_CHANNELS || O < 1; }

/* sums (2, C) double: sum x and sum x^2 per channel. */
int nrl_stats(int dtype, int threads, int64_t M, int64_t C, const void *x, double *sums) {
    nrl_args a = {.x = x, .M = M, .C = C};
    if (bad_dtype(dtype)) return STATUS_BAD_DTYPE;
    if (bad_shape(C, 1)) return STATUS_BAD_SHAPE;
    body_fn stats[] = {stats_f32, stats_f64, stats_bf16};
    return chunked_sums(stats[dtype], &a, 2 * C, threads, sums);
}

int nrl_forward(int dtype, int threads, int64_t M, int64_t C, int64_t O, const void *x,
                 const void *scale, const void *shift, const void *weight, const void *bias,
                 void *out) {
    nrl_args a = {.x = x, .scale = scale, .shift = shift, .weight = weight, .bias = bias,
                  .out = out, .M = M, .C = C, .O = O};
    if (bad_dtype(dtype)) return STATUS_BAD_DTYPE;
    if (bad_shape(C, O)) return STATUS_BAD_SHAPE;
    for_each(select_kernels(dtype, C, O).forward, &a, M, threads);
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
    return chunked_sums(select_kernels(dtype, C, O).backward_sums, &a, (2 + O) * C, threads,
                        sums);
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
