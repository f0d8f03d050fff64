/* The end of the Point Transformer layer's gamma and its softmax over the neighbours (paper
 * Eq. 3, models/point_transformer.py; lib/ops/attention_softmax.py drives these steps and keeps
 * BatchNorm's running statistics). For each point's K rows h_j of W = C / share_planes values
 * (the outputs of gamma's first Linear):
 *
 *   act_j = max(h_j scale + shift, 0)        (BatchNorm(W) as a per-channel affine map, ReLU)
 *   z_j   = G act_j + b                      (gamma's last Linear(W, W))
 *   w_j   = softmax over j of z_j            (per channel)
 *
 * PyTorch runs these as a pass each over (B, N, K, W) tensors (BatchNorm's statistics and
 * normalisation, ReLU, the GEMM, softmax), and more backward, at 2 to 64 channels, where its
 * elementwise kernels and its W x W GEMMs run far below memory speed. Here the statistics are
 * norm_relu_linear.c's nrl_stats and one pass writes w; backward, one pass recomputes act,
 * and z's gradient from w and w's gradient, gathers every sum (BatchNorm's two, G's and b's
 * gradients) and writes BatchNorm's output gradient gy, which a second pass turns into h's.
 * Nothing but w is stored.
 *
 * Work goes by point, its rows kept channel-major on the stack (x[c K + j]) so that the loops
 * over its K neighbours vectorise. Sums over points go by fixed chunks of CHUNK points, each in
 * double (a point's K terms summed first, in an order fixed at compile time), added up in chunk
 * order: the results do not depend on the number of threads. float32 and float64 forms, and
 * bfloat16 rows around float32 arithmetic (CPU bf16 autocast, bf16.h; gy stays float32).
 */
#include <math.h>
#include <stdint.h>

#include "bf16.h"
#include "softmax.h"
#include "parallel.h"

enum { CHUNK = 16 };
/* The bound on K W that keeps a point's rows on the stack (five arrays of K W values: at most
 * 160 KiB in float64); lib/ops sends other shapes to the modules. The presets need 16 x 64. */
enum { MAX_POINT_VALUES = 4096 };

typedef struct {
    const void *h, *scale, *shift, *mean, *rstd, *weight, *bias, *w, *grad_w, *k1, *k2, *k3;
    void *out, *gy, *grad_h;
    double *partial; /* per chunk: the sums of that chunk */
    int64_t P, K, W;
} aw_args;

#define DEFINE_AW(T, R, S, SOFTMAX, LOAD, STORE)                                              \
/* act of point i's rows and, where xhat is given, BatchNorm's normalised input, both         \
 * channel-major */                                                                           \
static inline __attribute__((always_inline)) void                                             \
activation_##S(const aw_args *a, int64_t i, T *restrict act, T *restrict xhat,                \
               const int64_t K, const int64_t W) {                                            \
    const R *restrict h = (const R *)a->h + i * K * W;                                        \
    const T *scale = a->scale, *shift = a->shift, *mean = a->mean, *rstd = a->rstd;           \
    for (int64_t j = 0; j < K; ++j)                                                           \
        for (int64_t c = 0; c < W; ++c) {                                                     \
            const T x = LOAD(h[j * W + c]), y = x * scale[c] + shift[c];                      \
            act[c * K + j] = y > 0 ? y : 0;                                                   \
            if (xhat) xhat[c * K + j] = (x - mean[c]) * rstd[c];                              \
        }                                                                                     \
}                                                                                             \
                                                                                              \
/* w for point i: z = b + G act (bias first, inputs in order), softmax over the neighbours    \
 * per channel, shifted by the maximum as torch's is */                                       \
static inline __attribute__((always_inline)) void                                             \
forward_##S(const void *v, int64_t i, const int64_t K, const int64_t W) {                     \
    const aw_args *a = (const aw_args *)v;                                                    \
    const T *restrict G = a->weight, *restrict b = a->bias;                                   \
    T act[W * K], z[W * K];                                                                   \
    activation_##S(a, i, act, NULL, K, W);                                                    \
    for (int64_t u = 0; u < W; ++u) {                                                         \
        T *restrict zu = z + u * K;                                                           \
        for (int64_t j = 0; j < K; ++j) zu[j] = b[u];                                         \
        for (int64_t c = 0; c < W; ++c) {                                                     \
            const T g = G[u * W + c];                                                         \
            SIMD for (int64_t j = 0; j < K; ++j) zu[j] += g * act[c * K + j];                 \
        }                                                                                     \
        SOFTMAX(zu, K);                                                                       \
    }                                                                                         \
    R *restrict out = (R *)a->out + i * K * W;                                                \
    for (int64_t j = 0; j < K; ++j)                                                           \
        for (int64_t u = 0; u < W; ++u) out[j * W + u] = STORE(z[u * K + j]);                 \
}                                                                                             \
                                                                                              \
/* For point i: z's gradient gz = w (gw - sum_j gw w) (softmax's backward), then act's        \
 * gradient through G, kept where act > 0 (ReLU's backward): gy; both channel-major */        \
static inline __attribute__((always_inline)) void                                             \
grad_y_##S(const aw_args *a, int64_t i, const T *restrict act, T *restrict gz,                \
           T *restrict gy, const int64_t K, const int64_t W) {                                \
    const R *restrict w = (const R *)a->w + i * K * W;                                        \
    const R *restrict gw = (const R *)a->grad_w + i * K * W;                                  \
    const T *restrict G = a->weight;                                                          \
    for (int64_t u = 0; u < W; ++u) {                                                         \
        T *restrict gu = gz + u * K, wu[K], dot = 0;                                          \
        for (int64_t j = 0; j < K; ++j) {                                                     \
            wu[j] = LOAD(w[j * W + u]);                                                       \
            gu[j] = LOAD(gw[j * W + u]);                                                      \
        }                                                                                     \
        _Pragma("omp simd reduction(+:dot)")                                                  \
        for (int64_t j = 0; j < K; ++j) dot += gu[j] * wu[j];                                 \
        SIMD for (int64_t j = 0; j < K; ++j) gu[j] = wu[j] * (gu[j] - dot);                   \
    }                                                                                         \
    for (int64_t c = 0; c < W; ++c) {                                                         \
        T *restrict gc = gy + c * K;                                                          \
        for (int64_t j = 0; j < K; ++j) gc[j] = 0;                                            \
        for (int64_t u = 0; u < W; ++u) {                                                     \
            const T g = G[u * W + c];                                                         \
            SIMD for (int64_t j = 0; j < K; ++j) gc[j] += gz[u * K + j] * g;                  \
        }                                                                                     \
        SIMD for (int64_t j = 0; j < K; ++j) gc[j] = act[c * K + j] > 0 ? gc[j] : 0;          \
    }                                                                                         \
}                                                                                             \
                                                                                              \
/* partial[chunk] = (sum gy, sum gy x_hat) per channel, G's gradient sum gz act^T (W, W),     \
 * b's sum gz, over the chunk's points; gy itself written to a->gy's rows */                 \
static inline __attribute__((always_inline)) void                                             \
backward_sums_##S(const void *v, int64_t chunk, const int64_t K, const int64_t W) {           \
    const aw_args *a = (const aw_args *)v;                                                    \
    const int64_t width = 3 * W + W * W;                                                      \
    const int64_t end = (chunk + 1) * CHUNK < a->P ? (chunk + 1) * CHUNK : a->P;              \
    double *restrict sums = a->partial + chunk * width;                                       \
    double *restrict grad_G = sums + 2 * W, *restrict grad_b = grad_G + W * W;                \
    for (int64_t s = 0; s < width; ++s) sums[s] = 0;                                          \
    for (int64_t i = chunk * CHUNK; i < end; ++i) {                                           \
        T act[W * K], xhat[W * K], gz[W * K], gy[W * K];                                      \
        activation_##S(a, i, act, xhat, K, W);                                                \
        grad_y_##S(a, i, act, gz, gy, K, W);                                                  \
        T *restrict gy_rows = (T *)a->gy + i * K * W;                                         \
        for (int64_t j = 0; j < K; ++j)                                                       \
            for (int64_t c = 0; c < W; ++c) gy_rows[j * W + c] = gy[c * K + j];               \
        for (int64_t c = 0; c < W; ++c) {                                                     \
            T s1 = 0, s2 = 0;                                                                 \
            _Pragma("omp simd reduction(+:s1, s2)")                                           \
            for (int64_t j = 0; j < K; ++j) {                                                 \
                s1 += gy[c * K + j];                                                          \
                s2 += gy[c * K + j] * xhat[c * K + j];                                        \
            }                                                                                 \
            sums[c] += s1;                                                                    \
            sums[W + c] += s2;                                                                \
        }                                                                                     \
        for (int64_t u = 0; u < W; ++u) {                                                     \
            const T *restrict gu = gz + u * K;                                                \
            T sb = 0;                                                                         \
            _Pragma("omp simd reduction(+:sb)")                                               \
            for (int64_t j = 0; j < K; ++j) sb += gu[j];                                      \
            grad_b[u] += sb;                                                                  \
            for (int64_t c = 0; c < W; ++c) {                                                 \
                T s = 0;                                                                      \
                _Pragma("omp simd reduction(+:s)")                                            \
                for (int64_t j = 0; j < K; ++j) s += gu[j] * act[c * K + j];                  \
                grad_G[u * W + c] += s;                                                       \
            }                                                                                 \
        }                                                                                     \
    }                                                                                         \
}                                                                                             \
                                                                                              \
/* h's gradient for point i from its gy (backward_sums_): k1 gy - k2 - k3 x_hat, BatchNorm's   \
 * backward with its sums folded into k1, k2, k3 */                                           \
static inline __attribute__((always_inline)) void                                             \
backward_input_##S(const void *v, int64_t i, const int64_t K, const int64_t W) {              \
    const aw_args *a = (const aw_args *)v;                                                    \
    const T *restrict k1 = a->k1, *restrict k2 = a->k2, *restrict k3 = a->k3;                 \
    const T *restrict mean = a->mean, *restrict rstd = a->rstd;                               \
    const R *restrict h = (const R *)a->h + i * K * W;                                        \
    const T *restrict gy = (const T *)a->gy + i * K * W;                                      \
    R *restrict dh = (R *)a->grad_h + i * K * W;                                              \
    for (int64_t j = 0; j < K; ++j) {                                                         \
        SIMD                                                                                  \
        for (int64_t c = 0; c < W; ++c) {                                                     \
            const T xhat = (LOAD(h[j * W + c]) - mean[c]) * rstd[c];                          \
            dh[j * W + c] = STORE(k1[c] * gy[j * W + c] - k2[c] - k3[c] * xhat);              \
        }                                                                                     \
    }                                                                                         \
}

DEFINE_AW(float, float, f32, softmax_f32, SAME, SAME)
DEFINE_AW(double, double, f64, softmax_f64, SAME, SAME)
DEFINE_AW(float, uint16_t, bf16, softmax_f32, bf16_load, bf16_store)

/* Unit functions with K and W constant for the presets' widths up to 8 weights and their 8 or
 * 16 neighbours (so that every loop unrolls: at these sizes loop overhead is the cost), or
 * read from the arguments. */
#define DEFINE_UNITS(S, NAME, K, W)                                                           \
static void forward_##S##_##NAME(const void *a, int64_t u) { forward_##S(a, u, K, W); }       \
static void backward_sums_##S##_##NAME(const void *a, int64_t u) {                            \
    backward_sums_##S(a, u, K, W);                                                            \
}                                                                                             \
static void backward_input_##S##_##NAME(const void *a, int64_t u) {                           \
    backward_input_##S(a, u, K, W);                                                           \
}
#define ARG(field) (((const aw_args *)a)->field)
#define FOR_EACH_SMALL(M, S) M(S, 8, 2) M(S, 8, 4) M(S, 8, 8) M(S, 16, 2) M(S, 16, 4) M(S, 16, 8)
#define SMALL_UNITS(S, K, W) DEFINE_UNITS(S, K##_##W, K, W)
FOR_EACH_SMALL(SMALL_UNITS, f32)
FOR_EACH_SMALL(SMALL_UNITS, bf16)
DEFINE_UNITS(f32, any, ARG(K), ARG(W))
DEFINE_UNITS(f64, any, ARG(K), ARG(W))
DEFINE_UNITS(bf16, any, ARG(K), ARG(W))

typedef struct { body_fn forward, backward_sums, backward_input; } aw_kernels;

static aw_kernels select_kernels(int dtype, int64_t K, int64_t W) {
#define KERNELS(S, NAME) {forward_##S##_##NAME, backward_sums_##S##_##NAME, \
                          backward_input_##S##_##NAME}
#define SMALL_KERNELS(S, K, W) KERNELS(S, K##_##W),
    static const aw_kernels f64 = KERNELS(f64, any), f32 = KERNELS(f32, any),
                            bf16 = KERNELS(bf16, any);
    static const aw_kernels f32_small[] = {FOR_EACH_SMALL(SMALL_KERNELS, f32)};
    static const aw_kernels bf16_small[] = {FOR_EACH_SMALL(SMALL_KERNELS, bf16)};
    if (dtype == DTYPE_F64) return f64;
    const int w = W == 2 ? 0 : W == 4 ? 1 : W == 8 ? 2 : -1, k = K == 8 ? 0 : K == 16 ? 1 : -1;
    if (w < 0 || k < 0) return dtype == DTYPE_BF16 ? bf16 : f32;
    return dtype == DTYPE_BF16 ? bf16_small[3 * k + w] : f32_small[3 * k + w];
}

/* Exported: dtype DTYPE_F32 or DTYPE_F64, every tensor in that type but the double sums; or
 * DTYPE_BF16: the rows h, w, out, grad_w and grad_h bfloat16, the rest float32 (CPU bf16
 * autocast). h, w, out, grad_w, gy, grad_h (P, K, W): P points' K rows; scale, shift, mean,
 * rstd, b, k1, k2, k3 (W); weight G (W, W). Each returns STATUS_OK, STATUS_NO_MEMORY,
 * STATUS_BAD_DTYPE or STATUS_BAD_SHAPE (a point's rows live on the stack). */
static int bad_shape(int64_t P, int64_t K, int64_t W) {
    return P < 0 || K < 1 || W < 1 || K > MAX_POINT_VALUES || W > MAX_POINT_VALUES
        || K * W > MAX_POINT_VALUES;
}

int aw_forward(int dtype, int threads, int64_t P, int64_t K, int64_t W, const void *h,
               const void *scale, const void *shift, const void *weight, const void *bias,
               void *out) {
    aw_args a = {.h = h, .scale = scale, .shift = shift, .weight = weight, .bias = bias,
                 .out = out, .P = P, .K = K, .W = W};
    if (bad_dtype(dtype)) return STATUS_BAD_DTYPE;
    if (bad_shape(P, K, W)) return STATUS_BAD_SHAPE;
    for_each(select_kernels(dtype, K, W).forward, &a, P, threads);
    return STATUS_OK;
}

/* sums (3 W + W W) double: sum gy, sum gy x_hat, G's gradient (W, W), b's gradient; gy
 * (P, K, W, in the arithmetic's type) gets BatchNorm's output gradient, for aw_backward_input. */
int aw_backward_sums(int dtype, int threads, int64_t P, int64_t K, int64_t W, const void *h,
                     const void *scale, const void *shift, const void *mean, const void *rstd,
                     const void *weight, const void *w, const void *grad_w, double *sums,
                     void *gy) {
    aw_args a = {.h = h, .scale = scale, .shift = shift, .mean = mean, .rstd = rstd,
                 .weight = weight, .w = w, .grad_w = grad_w, .gy = gy, .P = P, .K = K, .W = W};
    if (bad_dtype(dtype)) return STATUS_BAD_DTYPE;
    if (bad_shape(P, K, W)) return STATUS_BAD_SHAPE;
    return chunked_sums(select_kernels(dtype, K, W).backward_sums, &a, &a.partial,
                        (P + CHUNK - 1) / CHUNK, 3 * W + W * W, threads, sums);
}

/* grad_h from gy (aw_backward_sums). */
int aw_backward_input(int dtype, int threads, int64_t P, int64_t K, int64_t W, const void *h,
                      const void *mean, const void *rstd, const void *k1, const void *k2,
                      const void *k3, void *gy, void *grad_h) {
    aw_args a = {.h = h, .mean = mean, .rstd = rstd, .k1 = k1, .k2 = k2, .k3 = k3, .gy = gy,
                 .grad_h = grad_h, .P = P, .K = K, .W = W};
    if (bad_dtype(dtype)) return STATUS_BAD_DTYPE;
    if (bad_shape(P, K, W)) return STATUS_BAD_SHAPE;
    for_each(select_kernels(dtype, K, W).backward_input, &a, P, threads);
    return STATUS_OK;
}
