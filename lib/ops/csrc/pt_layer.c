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
 * would dominate: float32 and bfloat16 bodies are compiled once for each (C, W) of the Point
 * Transformer presets, with both as constants, so the compiler unrolls and vectorises the row
 * loops. bfloat16 rows (under CPU bf16 autocast) are computed in float32 (bf16.h).
 */
#include <stddef.h>
#include <stdint.h>

#include "bf16.h"
#include "parallel.h"

typedef struct {
    const void *delta, *key, *q, *w, *v, *grad_out;
    void *out, *grad_key, *grad_q, *grad_w, *grad_delta, *grad_v;
    const int64_t *idx;
    int *bad; /* raised by checked_index (parallel.h) */
    int64_t N, K, C, W;
} pt_args;

/* Attention weights per row below this many: the aggregation tiles them over the C channels,
 * so that its loops run over c in vector lanes; from 8 the loops over the weight groups
 * vectorise well as they are (and were 1.3-1.8x faster than the tiled form at 64 channels). */
enum { TILED_BELOW = 8 };

/* The four bodies for rows of type R (read by LOAD, written by STORE) and arithmetic in T, C
 * and W passed in (constants where inlined). The scatter targets grad_key and grad_v are T:
 * bf16 rows add their gradients up in float32 buffers (lib/ops converts them after), where
 * PyTorch's bf16 index_add rounds after every addition. */
#define DEFINE_BODIES(T, R, S, LOAD, STORE)                                                   \
static inline __attribute__((always_inline)) void                                             \
relation_fwd_##S(const pt_args *a, int64_t point, const int64_t C) {                          \
    const int64_t N = a->N, K = a->K;                                                         \
    const R *key = (const R *)a->key + point / N * N * C;                                     \
    const R *restrict qi = (const R *)a->q + point * C;                                       \
    for (int64_t row = point * K; row < (point + 1) * K; ++row) {                             \
        const R *restrict kj = key + checked_index(a->idx[row], N, a->bad) * C;               \
        const R *restrict d = (const R *)a->delta + row * C;                                  \
        R *restrict r = (R *)a->out + row * C;                                                \
        SIMD                                                                                  \
        for (int64_t c = 0; c < C; ++c)                                                       \
            r[c] = STORE(LOAD(d[c]) - LOAD(kj[c]) + LOAD(qi[c]));                             \
    }                                                                                         \
}                                                                                             \
                                                                                              \
/* grad_key[idx] -= g (zeroed by the caller), grad_q = sum_j g; grad_delta is g itself. */    \
static inline __attribute__((always_inline)) void                                             \
relation_bwd_##S(const pt_args *a, int64_t b, const int64_t C) {                              \
    const int64_t N = a->N, K = a->K;                                                         \
    const int64_t *idx = a->idx + b * N * K;                                                  \
    const R *g = (const R *)a->grad_out + b * N * K * C;                                      \
    T *grad_key = a->grad_key ? (T *)a->grad_key + b * N * C : NULL;                          \
    R *grad_q = a->grad_q ? (R *)a->grad_q + b * N * C : NULL;                                \
    for (int64_t i = 0; i < N; ++i) {                                                         \
        T acc[C];                                                                             \
        for (int64_t c = 0; c < C; ++c) acc[c] = 0;                                           \
        for (int64_t row = i * K; row < (i + 1) * K; ++row) {                                 \
            const R *restrict gr = g + row * C;                                               \
            SIMD                                                                              \
            for (int64_t c = 0; c < C; ++c) acc[c] += LOAD(gr[c]);                            \
            if (grad_key) {                                                                   \
                T *restrict gk = grad_key + checked_index(idx[row], N, a->bad) * C;          \
                SIMD                                                                          \
                for (int64_t c = 0; c < C; ++c) gk[c] -= LOAD(gr[c]);                         \
            }                                                                                 \
        }                                                                                     \
        if (grad_q)                                                                           \
            for (int64_t c = 0; c < C; ++c) grad_q[i * C + c] = STORE(acc[c]);                \
    }                                                                                         \
}                                                                                             \
                                                                                              \
static inline __attribute__((always_inline)) void                                             \
aggregate_fwd_##S(const pt_args *a, int64_t point, const int64_t C, const int64_t W) {        \
    const int64_t N = a->N, K = a->K;                                                         \
    const R *v = (const R *)a->v + point / N * N * C;                                         \
    T acc[C];                                                                                 \
    for (int64_t c = 0; c < C; ++c) acc[c] = 0;                                               \
    for (int64_t row = point * K; row < (point + 1) * K; ++row) {                             \
        const R *restrict wj = (const R *)a->w + row * W;                                     \
        const R *restrict vj = v + checked_index(a->idx[row], N, a->bad) * C;                \
        const R *restrict d = (const R *)a->delta + row * C;                                  \
        if (W < TILED_BELOW) { /* the W weights tiled over the C channels */                 \
            T wt[C];                                                                          \
            for (int64_t c = 0; c < C; ++c) wt[c] = LOAD(wj[c % W]);                          \
            SIMD                                                                              \
            for (int64_t c = 0; c < C; ++c) acc[c] += wt[c] * (LOAD(vj[c]) + LOAD(d[c]));     \
        } else {                                                                              \
            for (int64_t g = 0; g < C; g += W)                                                \
                for (int64_t u = 0; u < W; ++u)                                               \
                    acc[g + u] += LOAD(wj[u]) * (LOAD(vj[g + u]) + LOAD(d[g + u]));           \
        }                                                                                     \
    }                                                                                         \
    R *restrict out = (R *)a->out + point * C;                                                \
    for (int64_t c = 0; c < C; ++c) out[c] = STORE(acc[c]);                                   \
}                                                                                             \
                                                                                              \
/* grad_delta = g_i w (tiled), grad_v[idx] += the same (zeroed by the caller),                \
 * grad_w = sum over the C / W groups of g_i (v[idx] + delta). */                             \
static inline __attribute__((always_inline)) void                                             \
aggregate_bwd_##S(const pt_args *a, int64_t b, const int64_t C, const int64_t W) {            \
    const int64_t N = a->N, K = a->K;                                                         \
    const int64_t *idx = a->idx + b * N * K;                                                  \
    const R *delta = (const R *)a->delta + b * N * K * C;                                     \
    const R *w = (const R *)a->w + b * N * K * W, *v = (const R *)a->v + b * N * C;           \
    const R *g = (const R *)a->grad_out + b * N * C;                                          \
    R *grad_w = a->grad_w ? (R *)a->grad_w + b * N * K * W : NULL;                            \
    R *grad_delta = a->grad_delta ? (R *)a->grad_delta + b * N * K * C : NULL;                \
    T *grad_v = a->grad_v ? (T *)a->grad_v + b * N * C : NULL;                                \
    for (int64_t i = 0; i < N; ++i) {                                                         \
        T gi[C];                                                                              \
        for (int64_t c = 0; c < C; ++c) gi[c] = LOAD(g[i * C + c]);                           \
        for (int64_t row = i * K; row < (i + 1) * K; ++row) {                                 \
            const int64_t j = checked_index(idx[row], N, a->bad);                             \
            T wj[W];                                                                          \
            for (int64_t u = 0; u < W; ++u) wj[u] = LOAD(w[row * W + u]);                     \
            if (W < TILED_BELOW) { /* g_i times the weights tiled over the C channels */      \
                T gw[C];                                                                      \
                for (int64_t c = 0; c < C; ++c) gw[c] = wj[c % W];                            \
                SIMD                                                                          \
                for (int64_t c = 0; c < C; ++c) gw[c] *= gi[c];                               \
                if (grad_delta) {                                                             \
                    R *restrict gd = grad_delta + row * C;                                    \
                    SIMD                                                                      \
                    for (int64_t c = 0; c < C; ++c) gd[c] = STORE(gw[c]);                     \
                }                                                                             \
                if (grad_v) {                                                                 \
                    T *restrict gv = grad_v + j * C;                                          \
                    SIMD                                                                      \
                    for (int64_t c = 0; c < C; ++c) gv[c] += gw[c];                           \
                }                                                                             \
            } else {                                                                          \
                if (grad_delta) {                                                             \
                    R *restrict gd = grad_delta + row * C;                                    \
                    for (int64_t g0 = 0; g0 < C; g0 += W)                                     \
                        for (int64_t u = 0; u < W; ++u)                                       \
                            gd[g0 + u] = STORE(gi[g0 + u] * wj[u]);                           \
                }                                                                             \
                if (grad_v) {                                                                 \
                    T *restrict gv = grad_v + j * C;                                          \
                    for (int64_t g0 = 0; g0 < C; g0 += W)                                     \
                        for (int64_t u = 0; u < W; ++u) gv[g0 + u] += gi[g0 + u] * wj[u];    \
                }                                                                             \
            }                                                                                 \
            if (grad_w) {                                                                     \
                const R *restrict vj = v + j * C;                                             \
                const R *restrict d = delta + row * C;                                        \
                T acc[W];                                                                     \
                for (int64_t u = 0; u < W; ++u) acc[u] = gi[u] * (LOAD(vj[u]) + LOAD(d[u]));  \
                for (int64_t g0 = W; g0 < C; g0 += W)                                         \
                    for (int64_t u = 0; u < W; ++u)                                           \
                        acc[u] += gi[g0 + u] * (LOAD(vj[g0 + u]) + LOAD(d[g0 + u]));          \
                for (int64_t u = 0; u < W; ++u) grad_w[row * W + u] = STORE(acc[u]);          \
            }                                                                                 \
        }                                                                                     \
    }                                                                                         \
}

DEFINE_BODIES(float, float, f32, SAME, SAME)
DEFINE_BODIES(double, double, f64, SAME, SAME)
DEFINE_BODIES(float, uint16_t, bf16, bf16_load, bf16_store)

/* Per-unit functions for for_each: <kernel>_<S>_<C> with C and W constants, or <kernel>_<S>_any
 * reading them from the arguments. */
#define DEFINE_UNIT_FNS(S, C, W)                                                              \
static void relation_fwd_##S##_##C(const void *a, int64_t u) { relation_fwd_##S(a, u, C); }   \
static void relation_bwd_##S##_##C(const void *a, int64_t u) { relation_bwd_##S(a, u, C); }   \
static void aggregate_fwd_##S##_##C(const void *a, int64_t u) { aggregate_fwd_##S(a, u, C, W); } \
static void aggregate_bwd_##S##_##C(const void *a, int64_t u) { aggregate_bwd_##S(a, u, C, W); }

/* share_planes = 8, the channel widths of the presets in models/point_transformer.py */
FOR_EACH_PRESET(DEFINE_UNIT_FNS, f32)
FOR_EACH_PRESET(DEFINE_UNIT_FNS, bf16)

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
DEFINE_GENERIC(bf16)

typedef struct { body_fn relation_fwd, relation_bwd, aggregate_fwd, aggregate_bwd; } kernels_t;

#define KERNELS(S, C) {relation_fwd_##S##_##C, relation_bwd_##S##_##C, \
                       aggregate_fwd_##S##_##C, aggregate_bwd_##S##_##C}

static kernels_t select_kernels(int dtype, int64_t C, int64_t W) {
    static const kernels_t f64 = KERNELS(f64, any), f32 = KERNELS(f32, any),
                           bf16 = KERNELS(bf16, any);
#define PRESET_KERNELS(S, C, W) KERNELS(S, C),
    static const kernels_t f32_c[PRESETS] = {FOR_EACH_PRESET(PRESET_KERNELS, f32)};
    static const kernels_t bf16_c[PRESETS] = {FOR_EACH_PRESET(PRESET_KERNELS, bf16)};
    if (dtype == DTYPE_F64) return f64;
    const int s = preset_index(C, W ? W : C / 8); /* W = 0: a kernel without weights */
    if (dtype == DTYPE_BF16) return s >= 0 ? bf16_c[s] : bf16;
    return s >= 0 ? f32_c[s] : f32;
}

/* The shapes the bodies assume: 1 <= C <= MAX_CHANNELS, and W dividing C (the group loops step
 * by W up to C, so a W that does not divide C would write past the stack row). */
static int bad_shape(int64_t C, int64_t W) {
    return C < 1 || C > MAX_CHANNELS || W < 0 || (W > 0 && C % W != 0);
}

/* Exported entry points: dtype DTYPE_F32, DTYPE_F64 (every tensor), or DTYPE_BF16: every tensor
 * bfloat16 but grad_key and grad_v, float32; W = 0 where a kernel has no w. Each returns
 * STATUS_OK, STATUS_BAD_DTYPE or STATUS_BAD_SHAPE without touching memory, or STATUS_BAD_INDEX
 * when a neighbour index lies outside [0, N) (its outputs then hold nothing of use). */
int pt_relation_forward(int dtype, int threads, int64_t B, int64_t N, int64_t K, int64_t C,
                         const void *delta, const void *key, const void *q,
                         const int64_t *idx, void *rel) {
    int bad = 0;
    pt_args a = {.bad = &bad, .delta = delta, .key = key, .q = q, .idx = idx, .out = rel,
                 .N = N, .K = K, .C = C};
    if (bad_dtype(dtype)) return STATUS_BAD_DTYPE;
    if (bad_shape(C, 0)) return STATUS_BAD_SHAPE;
    for_each(select_kernels(dtype, C, 0).relation_fwd, &a, B * N, threads);
    return bad ? STATUS_BAD_INDEX : STATUS_OK;
}

int pt_relation_backward(int dtype, int threads, int64_t B, int64_t N, int64_t K, int64_t C,
                          const void *grad_rel, const int64_t *idx, void *grad_key,
                          void *grad_q) {
    int bad = 0;
    pt_args a = {.bad = &bad, .grad_out = grad_rel, .idx = idx, .grad_key = grad_key,
                 .grad_q = grad_q, .N = N, .K = K, .C = C};
    if (bad_dtype(dtype)) return STATUS_BAD_DTYPE;
    if (bad_shape(C, 0)) return STATUS_BAD_SHAPE;
    for_each(select_kernels(dtype, C, 0).relation_bwd, &a, B, threads);
    return bad ? STATUS_BAD_INDEX : STATUS_OK;
}

int pt_aggregate_forward(int dtype, int threads, int64_t B, int64_t N, int64_t K, int64_t C,
                          int64_t W, const void *w, const void *v, const void *delta,
                          const int64_t *idx, void *out) {
    int bad = 0;
    pt_args a = {.bad = &bad, .w = w, .v = v, .delta = delta, .idx = idx, .out = out,
                 .N = N, .K = K, .C = C, .W = W};
    if (bad_dtype(dtype)) return STATUS_BAD_DTYPE;
    if (W < 1 || bad_shape(C, W)) return STATUS_BAD_SHAPE;
    for_each(select_kernels(dtype, C, W).aggregate_fwd, &a, B * N, threads);
    return bad ? STATUS_BAD_INDEX : STATUS_OK;
}

int pt_aggregate_backward(int dtype, int threads, int64_t B, int64_t N, int64_t K, int64_t C,
                           int64_t W, const void *grad_out, const void *w, const void *v,
                           const void *delta, const int64_t *idx, void *grad_w,
                           void *grad_delta, void *grad_v) {
    int bad = 0;
    pt_args a = {.bad = &bad, .grad_out = grad_out, .w = w, .v = v, .delta = delta, .idx = idx,
                 .grad_w = grad_w, .grad_delta = grad_delta, .grad_v = grad_v,
                 .N = N, .K = K, .C = C, .W = W};
    if (bad_dtype(dtype)) return STATUS_BAD_DTYPE;
    if (W < 1 || bad_shape(C, W)) return STATUS_BAD_SHAPE;
    for_each(select_kernels(dtype, C, W).aggregate_bwd, &a, B, threads);
    return bad ? STATUS_BAD_INDEX : STATUS_OK;
}
