/* The whole Point Transformer layer's attention (paper Eq. 3 and 4) for inference, one point at
 * a time (lib/ops/attention.py wraps it; lib/ops/native.py builds and loads this file).
 *
 * For point i of cloud b and its K neighbours n_j = idx[b,i,j], with every BatchNorm in eval
 * mode folded into a per-channel scale and shift:
 *   t_j     = relu(ts * (T1 (p_i - p_nj) + tb1) + tt)                   theta's first half (3)
 *   delta_j = T2 t_j + tb2                                              theta (C)
 *   a_j     = relu(gs * (delta_j - key[n_j] + q_i) + gt)                gamma's BN-ReLU (C)
 *   h_j     = relu(hs * (G1 a_j + gb1) + ht)                            gamma's Linear-BN-ReLU (W)
 *   l_j     = G2 h_j + gb2                                              logits (W)
 *   w_j     = softmax over j of l_j                                     (per channel u of W)
 *   out_i   = sum_j w_j[c % W] * (v[n_j] + delta_j)                     (C)
 * The eager forward writes delta, the relation, gamma's hidden rows, the logits and the
 * weights as (B, N, K, *) tensors, a pass over memory each; here only the (B, N, C) rows
 * are read and written, and delta_j is computed twice (3 C products) rather than stored.
 *
 * theta's second weight arrives transposed (T2t (3, C): delta's loop runs over the outputs,
 * contiguous, and vectorises), gamma's both ways (product_rows and product_across below). Work
 * is split by point; each point's sums run in a fixed order, so results do not depend on the
 * thread count.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"
#include "softmax.h"
#include "parallel.h"

typedef struct {
    const void *xyz, *key, *q, *v;
    const void *T1, *tb1, *ts, *tt, *T2t, *tb2, *gs, *gt, *G1, *G1t, *gb1, *hs, *ht, *G2,
        *G2t, *gb2;
    void *out;
    const int64_t *idx;
    int *bad; /* raised by checked_index (parallel.h) */
    int64_t B, N, K, C, W;
} attention_args;

/* SIMD (parallel.h) marks loops whose iterations are independent (no sum across them), to be
 * vectorised as written: left alone, the compiler turned some around into per-output dot
 * products whose in-order (strict IEEE) sums ran one lane at a time (3.7x slower at 128
 * channels, measured). */

/* The bound on K C that keeps a point's rows on the stack (act, h, the logits and the wide
 * products' rows, K W <= K C values each, plus each neighbour's 3 hidden values and its checked
 * index: at most 1 MiB in float64); lib/ops/attention.py sends other shapes to the eager
 * layer. The presets need K C <= 16 x 512. */
enum { MAX_ROWS = 1 << 14 };

/* out = x Mt + b for K rows at once, row-major: out[j O + u] = b[u] + sum_i x[j I + i]
 * Mt[i O + u] for x (K, I), Mt (I, O) (the transposed weight), out (K, O); vectorised over
 * the outputs, for O of a vector or more (wide gamma products). The loop over the inputs i
 * is outermost, as in product_across below: every row's sums advance together. */
#define DEFINE_PRODUCT(T, S)                                                                  \
static inline __attribute__((always_inline)) void                                             \
product_rows_##S(const T *restrict x, const T *restrict Mt, const T *restrict b,              \
                 T *restrict out, const int64_t I, const int64_t O, const int64_t K) {        \
    /* rows at a time: as many as keep their sums within 16 vector registers */               \
    const int64_t sums = 16 * 64 / (int64_t)sizeof(T), span = O < sums ? sums / O : 1;        \
    for (int64_t j0 = 0; j0 < K; j0 += span) {                                                \
        const int64_t j1 = j0 + span < K ? j0 + span : K;                                     \
        for (int64_t j = j0; j < j1; ++j)                                                     \
            for (int64_t u = 0; u < O; ++u) out[j * O + u] = b[u];                            \
        for (int64_t i = 0; i < I; ++i) {                                                     \
            const T *restrict mi = Mt + i * O;                                                \
            for (int64_t j = j0; j < j1; ++j) {                                               \
                const T xj = x[j * I + i];                                                    \
                T *restrict oj = out + j * O;                                                 \
                SIMD for (int64_t u = 0; u < O; ++u) oj[u] += xj * mi[u];                     \
            }                                                                                 \
        }                                                                                     \
    }                                                                                         \
}                                                                                             \
                                                                                              \
/* The same product for K inputs at once, channel-major: out[u K + j] = b[u] + sum_i          \
 * M[u I + i] x[i K + j] for x (I, K), out (O, K); vectorised over the K columns, for O below \
 * a vector (narrow gamma products, where one input's products would fill no vector). The    \
 * loop over the inputs i is outermost, so that each step adds to all O K sums at once, held  \
 * in registers: with i innermost each sum waited on its previous addition (the same sums in \
 * the same order either way). */                                                             \
static inline __attribute__((always_inline)) void                                             \
product_across_##S(const T *restrict x, const T *restrict M, const T *restrict b,             \
                   T *restrict out, const int64_t I, const int64_t O, const int64_t K) {      \
    for (int64_t u = 0; u < O; ++u)                                                           \
        for (int64_t j = 0; j < K; ++j) out[u * K + j] = b[u];                                \
    for (int64_t i = 0; i < I; ++i) {                                                         \
        const T *restrict xi = x + i * K;                                                     \
        for (int64_t u = 0; u < O; ++u) {                                                     \
            const T m = M[u * I + i];                                                         \
            T *restrict ou = out + u * K;                                                     \
            SIMD for (int64_t j = 0; j < K; ++j) ou[j] += m * xi[j];                          \
        }                                                                                     \
    }                                                                                         \
}

#define DEFINE_BODY(T, R, S, SOFTMAX, LOAD, STORE)                                            \
/* theta's first half for neighbour p_j of p_i: t = relu(ts (T1 (p_i - p_j) + tb1) + tt) */   \
static inline __attribute__((always_inline)) void                                             \
theta_hidden_##S(const attention_args *a, const T *pi, const T *pj, T *restrict t) {         \
    const T *T1 = a->T1, *tb1 = a->tb1, *ts = a->ts, *tt = a->tt;                             \
    const T rel[3] = {pi[0] - pj[0], pi[1] - pj[1], pi[2] - pj[2]};                           \
    for (int e = 0; e < 3; ++e) {                                                             \
        T s = tb1[e] + T1[e * 3] * rel[0] + T1[e * 3 + 1] * rel[1] + T1[e * 3 + 2] * rel[2];  \
        s = ts[e] * s + tt[e];                                                                \
        t[e] = s > 0 ? s : 0;                                                                 \
    }                                                                                         \
}                                                                                             \
                                                                                              \
/* delta = T2 t + tb2 (C) */                                                                  \
static inline __attribute__((always_inline)) void                                             \
theta_out_##S(const attention_args *a, const T *t, T *restrict delta, const int64_t C) {     \
    const T *restrict T2t = a->T2t, *restrict tb2 = a->tb2;                                   \
    SIMD for (int64_t c = 0; c < C; ++c)                                                      \
        delta[c] = tb2[c] + T2t[c] * t[0] + T2t[C + c] * t[1] + T2t[2 * C + c] * t[2];        \
}                                                                                             \
                                                                                              \
static inline __attribute__((always_inline)) void                                             \
attention_##S(const attention_args *a, int64_t point, const int64_t K, const int64_t C,       \
              const int64_t W) {                                                              \
    const int64_t N = a->N;                                                                   \
    const int64_t cloud = point / N * N;                                                      \
    const T *xyz = (const T *)a->xyz + cloud * 3, *pi = (const T *)a->xyz + point * 3;        \
    const R *key = (const R *)a->key + cloud * C, *v = (const R *)a->v + cloud * C;           \
    const R *restrict qi = (const R *)a->q + point * C;                                       \
    const T *restrict gs = a->gs, *restrict gt = a->gt, *restrict hs = a->hs;                 \
    const T *restrict ht = a->ht;                                                             \
    const int64_t *given = a->idx + point * K;                                                \
    int64_t nb[K]; /* the neighbours, each checked (parallel.h) */                            \
    for (int64_t j = 0; j < K; ++j) nb[j] = checked_index(given[j], N, a->bad);               \
    /* act: gamma's input rows, neighbour-major (act[j C + c]) for the wide products, or */    \
    /* channel-major (act[c K + j]) for the narrow ones; logits channel-major (l[u K + j]) */    \
    T hidden[K][3], delta[C], act[K * C], h[K * W], logits[W * K], acc[C], tiled[C];          \
    const int narrow = W * (int64_t)sizeof(T) < 64; /* W below a vector */                    \
    /* the neighbours' rows are scattered over the cloud: ask for the next point's while */   \
    /* this one computes, rather than waiting on each row in turn (the last point of a */     \
    /* thread's span asks for a row it will not use: harmless) */                             \
    if (point + 1 < a->B * N) {                                                               \
        const int64_t next = (point + 1) / N * N, *nb_next = given + K;                       \
        for (int64_t j = 0; j < K; ++j) {                                                     \
            if ((uint64_t)nb_next[j] >= (uint64_t)N) continue; /* checked there, not here */  \
            __builtin_prefetch((const T *)a->xyz + (next + nb_next[j]) * 3);                  \
            for (int64_t c = 0; c < C; c += 64 / sizeof(R)) {                                 \
                __builtin_prefetch((const R *)a->key + (next + nb_next[j]) * C + c);          \
                __builtin_prefetch((const R *)a->v + (next + nb_next[j]) * C + c);            \
            }                                                                                 \
        }                                                                                     \
    }                                                                                         \
    /* one stage at a time over all K neighbours: their chains are independent, so the */     \
    /* core overlaps them (a neighbour's whole chain at a time left it waiting on each) */    \
    for (int64_t j = 0; j < K; ++j) theta_hidden_##S(a, pi, xyz + nb[j] * 3, hidden[j]);     \
    for (int64_t j = 0; j < K; ++j) {                                                         \
        const R *restrict kj = key + nb[j] * C;                                               \
        theta_out_##S(a, hidden[j], delta, C);                                                \
        SIMD for (int64_t c = 0; c < C; ++c) {                                                \
            T s = gs[c] * (delta[c] - LOAD(kj[c]) + LOAD(qi[c])) + gt[c];                     \
            delta[c] = s > 0 ? s : 0;                                                         \
        }                                                                                     \
        if (narrow)                                                                           \
            for (int64_t c = 0; c < C; ++c) act[c * K + j] = delta[c];                        \
        else                                                                                  \
            memcpy(act + j * C, delta, C * sizeof(T));                                        \
    }                                                                                         \
    if (narrow) {                                                                             \
        product_across_##S(act, a->G1, a->gb1, h, C, W, K);                                    \
        for (int64_t u = 0; u < W; ++u) {                                                     \
            T *restrict hu = h + u * K;                                                       \
            SIMD for (int64_t j = 0; j < K; ++j) {                                            \
                T s = hs[u] * hu[j] + ht[u];                                                  \
                hu[j] = s > 0 ? s : 0;                                                        \
            }                                                                                 \
        }                                                                                     \
        product_across_##S(h, a->G2, a->gb2, logits, W, W, K);                                 \
    } else {                                                                                  \
        T rows[K * W];                                                                        \
        product_rows_##S(act, a->G1t, a->gb1, h, C, W, K);                                    \
        for (int64_t j = 0; j < K; ++j) {                                                     \
            T *restrict hj = h + j * W;                                                       \
            for (int64_t u = 0; u < W; ++u) {                                                 \
                T s = hs[u] * hj[u] + ht[u];                                                  \
                hj[u] = s > 0 ? s : 0;                                                        \
            }                                                                                 \
        }                                                                                     \
        product_rows_##S(h, a->G2t, a->gb2, rows, W, W, K);                                   \
        for (int64_t j = 0; j < K; ++j)                                                       \
            for (int64_t u = 0; u < W; ++u) logits[u * K + j] = rows[j * W + u];              \
    }                                                                                         \
    /* softmax over the neighbours, per channel u */                                          \
    for (int64_t u = 0; u < W; ++u) SOFTMAX(logits + u * K, K);                               \
    for (int64_t c = 0; c < C; ++c) acc[c] = 0;                                               \
    for (int64_t j = 0; j < K; ++j) {                                                         \
        const R *restrict vj = v + nb[j] * C;                                                 \
        theta_out_##S(a, hidden[j], delta, C);                                                \
        for (int64_t g = 0; g < C; g += W)                                                    \
            for (int64_t u = 0; u < W; ++u) tiled[g + u] = logits[u * K + j];                 \
        SIMD for (int64_t c = 0; c < C; ++c) acc[c] += tiled[c] * (LOAD(vj[c]) + delta[c]);   \
    }                                                                                         \
    R *restrict out = (R *)a->out + point * C;                                                \
    SIMD for (int64_t c = 0; c < C; ++c) out[c] = STORE(acc[c]);                              \
}

DEFINE_PRODUCT(float, f32)
DEFINE_PRODUCT(double, f64)
DEFINE_PRODUCT(float, bf16)
DEFINE_BODY(float, float, f32, softmax_f32, SAME, SAME)
DEFINE_BODY(double, double, f64, softmax_f64, SAME, SAME)
DEFINE_BODY(float, uint16_t, bf16, softmax_f32, bf16_load, bf16_store)

#define ARGS(a) ((const attention_args *)(a))
/* Per-point functions for for_each: C and W constants for the presets' widths
 * (share_planes 8, models/point_transformer.py), and K too for the presets' 8 and 16
 * neighbours (so that every loop over the neighbours unrolls: 1.8-2.8x at 32 and 64
 * channels), read from the arguments otherwise. */
#define DEFINE_UNIT_FN(S, C, W)                                                               \
static void attention_##S##_##C(const void *a, int64_t u) {                                  \
    attention_##S(a, u, ARGS(a)->K, C, W);                                                    \
}                                                                                             \
static void attention_##S##_##C##_k8(const void *a, int64_t u) {                             \
    attention_##S(a, u, 8, C, W);                                                             \
}                                                                                             \
static void attention_##S##_##C##_k16(const void *a, int64_t u) {                            \
    attention_##S(a, u, 16, C, W);                                                            \
}
FOR_EACH_PRESET(DEFINE_UNIT_FN, f32)
FOR_EACH_PRESET(DEFINE_UNIT_FN, bf16)
#define UNIT_FN_NAME(S, C, W) attention_##S##_##C,
#define UNIT_FN_NAME_K8(S, C, W) attention_##S##_##C##_k8,
#define UNIT_FN_NAME_K16(S, C, W) attention_##S##_##C##_k16,
static void attention_f32_any(const void *a, int64_t u) {
    attention_f32(a, u, ARGS(a)->K, ARGS(a)->C, ARGS(a)->W);
}
static void attention_f64_any(const void *a, int64_t u) {
    attention_f64(a, u, ARGS(a)->K, ARGS(a)->C, ARGS(a)->W);
}
static void attention_bf16_any(const void *a, int64_t u) {
    attention_bf16(a, u, ARGS(a)->K, ARGS(a)->C, ARGS(a)->W);
}

static body_fn select_body(int dtype, int64_t K, int64_t C, int64_t W) {
    static const body_fn f32[3][PRESETS] = {{FOR_EACH_PRESET(UNIT_FN_NAME, f32)},
                                            {FOR_EACH_PRESET(UNIT_FN_NAME_K8, f32)},
                                            {FOR_EACH_PRESET(UNIT_FN_NAME_K16, f32)}};
    static const body_fn bf16[3][PRESETS] = {{FOR_EACH_PRESET(UNIT_FN_NAME, bf16)},
                                             {FOR_EACH_PRESET(UNIT_FN_NAME_K8, bf16)},
                                             {FOR_EACH_PRESET(UNIT_FN_NAME_K16, bf16)}};
    if (dtype == DTYPE_F64) return attention_f64_any;
    const int s = preset_index(C, W), k = K == 8 ? 1 : K == 16 ? 2 : 0;
    if (dtype == DTYPE_BF16) return s >= 0 ? bf16[k][s] : attention_bf16_any;
    return s >= 0 ? f32[k][s] : attention_f32_any;
}

/* dtype DTYPE_F32, DTYPE_F64 (every tensor) or DTYPE_BF16 (bfloat16 rows key, q, v and out;
 * xyz and the weights float32). Returns STATUS_OK, or STATUS_BAD_DTYPE or STATUS_BAD_SHAPE
 * without touching memory: 1 <= C <= MAX_CHANNELS, W dividing C (the group loop steps by W up
 * to C), K >= 1 and K C <= MAX_ROWS (the K rows of gamma's input live on the stack); or
 * STATUS_BAD_INDEX for a neighbour index outside [0, N) (out then holds nothing of use). */
int pt_attention_inference(int dtype, int threads, int64_t B, int64_t N, int64_t K, int64_t C,
                            int64_t W, const void *xyz, const int64_t *idx, const void *key,
                            const void *q, const void *v, const void *T1, const void *tb1,
                            const void *ts, const void *tt, const void *T2t, const void *tb2,
                            const void *gs, const void *gt, const void *G1, const void *G1t,
                            const void *gb1, const void *hs, const void *ht, const void *G2,
                            const void *G2t, const void *gb2, void *out) {
    int bad = 0;
    attention_args a = {.xyz = xyz, .key = key, .q = q, .v = v, .T1 = T1, .tb1 = tb1, .ts = ts,
                        .tt = tt, .T2t = T2t, .tb2 = tb2, .gs = gs, .gt = gt, .G1 = G1,
                        .G1t = G1t, .gb1 = gb1, .hs = hs, .ht = ht, .G2 = G2, .G2t = G2t,
                        .gb2 = gb2, .out = out, .idx = idx, .bad = &bad, .B = B, .N = N,
                        .K = K, .C = C, .W = W};
    if (bad_dtype(dtype)) return STATUS_BAD_DTYPE;
    if (C < 1 || C > MAX_CHANNELS || W < 1 || C % W != 0 || K < 1 || K * C > MAX_ROWS)
        return STATUS_BAD_SHAPE;
    for_each(select_body(dtype, K, C, W), &a, B * N, threads);
    return bad ? STATUS_BAD_INDEX : STATUS_OK;
}
