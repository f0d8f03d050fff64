/* Fused CPU kernels for the Point Transformer layer's per-neighbour tensors (lib/ops/native.py
 * builds this file and loads it with ctypes; lib/ops/layers.py wraps it in autograd Functions).
 *
 * Shapes, all contiguous, per cloud b of B, point i of N, neighbour j of K, channel c of C:
 *   idx (B, N, K) int64, neighbour indices within the cloud;
 *   per-point rows (B, N, C): query q, key, value v, the output and their gradients;
 *   per-neighbour rows (B, N, K, C): delta, relation and their gradients;
 *   attention weights w (B, N, K, W) with W = C / share_planes: channel g W + u uses w[u].
 *
 * relation  rel[b,i,j,:] = delta[b,i,j,:] - key[b, idx[b,i,j], :] + q[b,i,:]
 * aggregate out[b,i,:]   = sum_j w[b,i,j, c % W] * (v[b, idx[b,i,j], :] + delta[b,i,j,:])
 *
 * The plain PyTorch forms pass over the (B, N, K, C) tensors once per elementwise operation
 * (gather, add, add, tile, multiply, sum, and as many again backward); these read and write
 * each of them once. The forward kernels split their work over threads by point, the backward
 * ones by cloud, so that a scatter-add into a cloud's rows has one writer; every sum runs in a
 * fixed order, so results do not depend on the thread count.
 *
 * A row of C channels is short (16 in the tiny model's first stage), so loop overhead per row
 * would dominate: float32 bodies are compiled once for each (C, W) of the Point Transformer
 * presets, with both as constants, so the compiler unrolls and vectorises the row loops.
 */
#include <stdint.h>
#include <string.h>

#include "parallel.h"

typedef struct {
    const void *delta, *key, *q, *w, *v, *grad_out;
    void *out, *grad_key, *grad_q, *grad_w, *grad_delta, *grad_v;
    const int64_t *idx;
    int64_t N, K, C, W;
} pt_args;

/* The four bodies for element type T, C and W passed in (constants where inlined). */
#define DEFINE_BODIES(T, S)                                                                   \
static inline __attribute__((always_inline)) void                                             \
relation_fwd_##S(const pt_args *a, int64_t point, const int64_t C) {                          \
    const int64_t N = a->N, K = a->K;                                                         \
    const T *key = (const T *)a->key + point / N * N * C;                                     \
    const T *restrict qi = (const T *)a->q + point * C;                                       \
    for (int64_t row = point * K; row < (point + 1) * K; ++row) {                             \
        const T *restrict kj = key + a->idx[row] * C;                                         \
        const T *restrict d = (const T *)a->delta + row * C;                                  \
        T *restrict r = (T *)a->out + row * C;                                                \
        for (int64_t c = 0; c < C; ++c) r[c] = d[c] - kj[c] + qi[c];                          \
    }                                                                                         \
}                                                                                             \
                                                                                              \
/* grad_key[idx] -= g (zeroed by the caller), grad_q = sum_j g; grad_delta is g itself. */    \
static inline __attribute__((always_inline)) void                                             \
relation_bwd_##S(const pt_args *a, int64_t b, const int64_t C) {                              \
    const int64_t N = a->N, K = a->K;                                                         \
    const int64_t *idx = a->idx + b * N * K;                                                  \
    const T *g = (const T *)a->grad_out + b * N * K * C;                                      \
    T *grad_key = a->grad_key ? (T *)a->grad_key + b * N * C : NULL;                          \
    T *grad_q = a->grad_q ? (T *)a->grad_q + b * N * C : NULL;                                \
    for (int64_t i = 0; i < N; ++i) {                                                         \
        T acc[C];                                                                             \
        for (int64_t c = 0; c < C; ++c) acc[c] = 0;                                           \
        for (int64_t row = i * K; row < (i + 1) * K; ++row) {                                 \
            const T *restrict gr = g + row * C;                                               \
            for (int64_t c = 0; c < C; ++c) acc[c] += gr[c];                                  \
            if (grad_key) {                                                                   \
                T *restrict gk = grad_key + idx[row] * C;                                     \
                for (int64_t c = 0; c < C; ++c) gk[c] -= gr[c];                               \
            }                                                                                 \
        }                                                                                     \
        if (grad_q) memcpy(grad_q + i * C, acc, C * sizeof(T));                               \
    }                                                                                         \
}                                                                                             \
                                                                                              \
static inline __attribute__((always_inline)) void                                             \
aggregate_fwd_##S(const pt_args *a, int64_t point, const int64_t C, const int64_t W) {        \
    const int64_t N = a->N, K = a->K;                                                         \
    const T *v = (const T *)a->v + point / N * N * C;                                         \
    T acc[C];                                                                                 \
    for (int64_t c = 0; c < C; ++c) acc[c] = 0;                                               \
    for (int64_t row = point * K; row < (point + 1) * K; ++row) {                             \
        const T *restrict wj = (const T *)a->w + row * W;                                     \
        const T *restrict vj = v + a->idx[row] * C;                                           \
        const T *restrict d = (const T *)a->delta + row * C;                                  \
        for (int64_t g = 0; g < C; g += W)                                                    \
            for (int64_t u = 0; u < W; ++u) acc[g + u] += wj[u] * (vj[g + u] + d[g + u]);    \
    }                                                                                         \
    memcpy((T *)a->out + point * C, acc, C * sizeof(T));                                      \
}                                                                                             \
                                                                                              \
/* grad_delta = g_i w (tiled), grad_v[idx] += the same (zeroed by the caller),                \
 * grad_w = sum over the C / W groups of g_i (v[idx] + delta). */                             \
static inline __attribute__((always_inline)) void                                             \
aggregate_bwd_##S(const pt_args *a, int64_t b, const int64_t C, const int64_t W) {            \
    const int64_t N = a->N, K = a->K;                                                         \
    const int64_t *idx = a->idx + b * N * K;                                                  \
    const T *delta = (const T *)a->delta + b * N * K * C;                                     \
    const T *w = (const T *)a->w + b * N * K * W, *v = (const T *)a->v + b * N * C;           \
    const T *g = (const T *)a->grad_out + b * N * C;                                          \
    T *grad_w = a->grad_w ? (T *)a->grad_w + b * N * K * W : NULL;                            \
    T *grad_delta = a->grad_delta ? (T *)a->grad_delta + b * N * K * C : NULL;                \
    T *grad_v = a->grad_v ? (T *)a->grad_v + b * N * C : NULL;                                \
    for (int64_t i = 0; i < N; ++i) {                                                         \
        const T *restrict gi = g + i * C;                                                     \
        for (int64_t row = i * K; row < (i + 1) * K; ++row) {                                 \
            const T *restrict wj = w + row * W;                                               \
            if (grad_delta) {                                                                 \
                T *restrict gd = grad_delta + row * C;                                        \
                for (int64_t g0 = 0; g0 < C; g0 += W)                                         \
                    for (int64_t u = 0; u < W; ++u) gd[g0 + u] = gi[g0 + u] * wj[u];          \
            }                                                                                 \
            if (grad_v) {                                                                     \
                T *restrict gv = grad_v + idx[row] * C;                                       \
                for (int64_t g0 = 0; g0 < C; g0 += W)                                         \
                    for (int64_t u = 0; u < W; ++u) gv[g0 + u] += gi[g0 + u] * wj[u];        \
            }                                                                                 \
            if (grad_w) {                                                                     \
                const T *restrict vj = v + idx[row] * C;                                      \
                const T *restrict d = delta + row * C;                                        \
                T acc[W];                                                                     \
                for (int64_t u = 0; u < W; ++u) acc[u] = gi[u] * (vj[u] + d[u]);             \
                for (int64_t g0 = W; g0 < C; g0 += W)                                         \
                    for (int64_t u = 0; u < W; ++u)                                           \
                        acc[u] += gi[g0 + u] * (vj[g0 + u] + d[g0 + u]);                      \
                memcpy(grad_w + row * W, acc, W * sizeof(T));                                 \
            }                                                                                 \
        }                                                                                     \
    }                                                                                         \
}

DEFINE_BODIES(float, f32)
DEFINE_BODIES(double, f64)

/* Per-unit functions for for_each: <kernel>_<S>_<C> with C and W constants, or <kernel>_<S>_any
 * reading them from the arguments. */
#define DEFINE_UNIT_FNS(S, C, W)                                                              \
static void relation_fwd_##S##_##C(const void *a, int64_t u) { relation_fwd_##S(a, u, C); }   \
static void relation_bwd_##S##_##C(const void *a, int64_t u) { relation_bwd_##S(a, u, C); }   \
static void aggregate_fwd_##S##_##C(const void *a, int64_t u) { aggregate_fwd_##S(a, u, C, W); } \
static void aggregate_bwd_##S##_##C(const void *a, int64_t u) { aggregate_bwd_##S(a, u, C, W); }

/* share_planes = 8, the channel widths of the presets in models/point_transformer.py */
FOR_EACH_PRESET(DEFINE_UNIT_FNS, f32)

#define P(a) ((const pt_args *)(a))
#define DEFINE_GENERIC(S)                                                                     \
static void relation_fwd_##S##_any(const void *a, int64_t u) { relation_fwd_##S(a, u, P(a)->C); } \
static void relation_bwd_##S##_any(const void *a, int64_t u) { relation_bwd_##S(a, u, P(a)->C); } \
static void aggregate_fwd_##S##_any(const void *a, int64_t u) {                               \
    aggregate_fwd_##S(a, u, P(a)->C, P(a)->W);                                                \
}                                                                                             \
static void aggregate_bwd_##S##_any(const void *a, int64_t u) {                               \
    aggregate_bwd_##S(a, u, P(a)->C, P(a)->W);                                                \
}
DEFINE_GENERIC(f32)
DEFINE_GENERIC(f64)

typedef struct { body_fn relation_fwd, relation_bwd, aggregate_fwd, aggregate_bwd; } kernels_t;

#define KERNELS(S, C) {relation_fwd_##S##_##C, relation_bwd_##S##_##C, \
                       aggregate_fwd_##S##_##C, aggregate_bwd_##S##_##C}

static kernels_t select_kernels(int dtype, int64_t C, int64_t W) {
    static const kernels_t f64 = KERNELS(f64, any), f32 = KERNELS(f32, any);
#define PRESET_KERNELS(S, C, W) KERNELS(S, C),
    static const kernels_t f32_c[PRESETS] = {FOR_EACH_PRESET(PRESET_KERNELS, f32)};
    if (dtype) return f64;
    const int s = preset_index(C, W ? W : C / 8); /* W = 0: a kernel without weights */
    return s >= 0 ? f32_c[s] : f32;
}

/* The shapes the bodies assume: 1 <= C <= MAX_CHANNELS, and W dividing C (the group loops step
 * by W up to C, so a W that does not divide C would write past the stack row). */
static int bad_shape(int64_t C, int64_t W) {
    return C < 1 || C > MAX_CHANNELS || W < 0 || (W > 0 && C % W != 0);
}

/* Exported entry points: dtype 0 = float32, 1 = float64; W = 0 where a kernel has no w.
 * Each returns STATUS_OK, or STATUS_BAD_SHAPE without touching memory. Neighbour indices must
 * lie in [0, N): lib/ops checks them before the call. */
int pt_relation_forward(int dtype, int threads, int64_t B, int64_t N, int64_t K, int64_t C,
                         const void *delta, const void *key, const void *q,
                         const int64_t *idx, void *rel) {
    pt_args a = {.delta = delta, .key = key, .q = q, .idx = idx, .out = rel,
                 .N = N, .K = K, .C = C};
    if (bad_shape(C, 0)) return STATUS_BAD_SHAPE;
    for_each(select_kernels(dtype, C, 0).relation_fwd, &a, B * N, threads);
    return STATUS_OK;
}

int pt_relation_backward(int dtype, int threads, int64_t B, int64_t N, int64_t K, int64_t C,
                          const void *grad_rel, const int64_t *idx, void *grad_key,
                          void *grad_q) {
    pt_args a = {.grad_out = grad_rel, .idx = idx, .grad_key = grad_key, .grad_q = grad_q,
                 .N = N, .K = K, .C = C};
    if (bad_shape(C, 0)) return STATUS_BAD_SHAPE;
    for_each(select_kernels(dtype, C, 0).relation_bwd, &a, B, threads);
    return STATUS_OK;
}

int pt_aggregate_forward(int dtype, int threads, int64_t B, int64_t N, int64_t K, int64_t C,
                          int64_t W, const void *w, const void *v, const void *delta,
                          const int64_t *idx, void *out) {
    pt_args a = {.w = w, .v = v, .delta = delta, .idx = idx, .out = out,
                 .N = N, .K = K, .C = C, .W = W};
    if (W < 1 || bad_shape(C, W)) return STATUS_BAD_SHAPE;
    for_each(select_kernels(dtype, C, W).aggregate_fwd, &a, B * N, threads);
    return STATUS_OK;
}

int pt_aggregate_backward(int dtype, int threads, int64_t B, int64_t N, int64_t K, int64_t C,
                           int64_t W, const void *grad_out, const void *w, const void *v,
                           const void *delta, const int64_t *idx, void *grad_w,
                           void *grad_delta, void *grad_v) {
    pt_args a = {.grad_out = grad_out, .w = w, .v = v, .delta = delta, .idx = idx,
                 .grad_w = grad_w, .grad_delta = grad_delta, .grad_v = grad_v,
                 .N = N, .K = K, .C = C, .W = W};
    if (W < 1 || bad_shape(C, W)) return STATUS_BAD_SHAPE;
    for_each(select_kernels(dtype, C, W).aggregate_bwd, &a, B, threads);
    return STATUS_OK;
}
