/* Max-pooling over neighbours, TransitionDown's local max (models/point_transformer.py), for
 * (R, K, C) rows (R = B M points, K neighbours, C channels, contiguous): out[r, c] =
 * max_j x[r, j, c], with the first j reaching it kept in `arg` (int32) for the backward, which
 * writes the whole (R, K, C) gradient in one pass: g[r, c] at (r, arg[r, c], c), 0 elsewhere.
 *
 * torch's amax backward spreads the gradient over tied maxima instead, through a float copy of
 * an equality mask and a sum over it: several passes over (R, K, C). The two differ only at
 * ties; after the ReLU that precedes the pooling the ties are zeros, whose gradient the
 * ReLU's backward drops either way. A NaN is the maximum, as in torch.max.
 *
 * norm_max_backward is that backward with BatchNorm's before it (BatchNorm, ReLU, max fused):
 * the dense share of the batch statistics and the max's share in the same one pass.
 *
 * gathered_max is the same maximum over rows picked by index, out[b, i, c] = max_j
 * x[b, idx[b, i, j], c] for x (B, N, C) and idx (B, M, K), without the (B, M, K, C) copy that
 * gathering them first writes (inference only: no backward).
 * bfloat16 rows are compared, and their gradients computed, in float32 (bf16.h).
 * Built with the other kernels here by lib/ops/native.py. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"
#include "parallel.h"

typedef struct {
    const void *x, *grad_out, *k1, *k0;
    void *out, *grad_x;
    int32_t *arg;
    const int64_t *idx;
    int *bad; /* raised by checked_index (parallel.h) */
    int64_t N, M, K, C;
} max_args;

#define DEFINE_MAX(T, R, S, LOAD, STORE, FMA)                                                 \
static void max_fwd_##S(const void *p, int64_t r) {                                           \
    const max_args *a = (const max_args *)p;                                                  \
    const int64_t K = a->K, C = a->C;                                                         \
    const R *x = (const R *)a->x + r * K * C;                                                 \
    T best[C];                                                                                \
    int32_t *restrict arg = a->arg + r * C;                                                   \
    for (int64_t c = 0; c < C; ++c) best[c] = LOAD(x[c]);                                     \
    memset(arg, 0, C * sizeof(int32_t));                                                      \
    for (int64_t j = 1; j < K; ++j) {                                                         \
        const R *restrict row = x + j * C;                                                    \
        for (int64_t c = 0; c < C; ++c) {                                                     \
            const T value = LOAD(row[c]);                                                     \
            const int take = value > best[c] || (value != value && best[c] == best[c]);       \
            best[c] = take ? value : best[c];                                                 \
            arg[c] = take ? (int32_t)j : arg[c];                                              \
        }                                                                                     \
    }                                                                                         \
    R *restrict out = (R *)a->out + r * C;                                                    \
    for (int64_t c = 0; c < C; ++c) out[c] = STORE(best[c]);                                  \
}                                                                                             \
                                                                                              \
static void max_bwd_##S(const void *p, int64_t r) {                                           \
    const max_args *a = (const max_args *)p;                                                  \
    const int64_t K = a->K, C = a->C;                                                         \
    const R *restrict g = (const R *)a->grad_out + r * C;                                     \
    const int32_t *restrict arg = a->arg + r * C;                                             \
    R *restrict gx = (R *)a->grad_x + r * K * C;                                              \
    for (int64_t j = 0; j < K; ++j)                                                           \
        for (int64_t c = 0; c < C; ++c) gx[j * C + c] = arg[c] == j ? g[c] : (R)0;            \
}                                                                                             \
                                                                                              \
/* BatchNorm's input gradient through the max (lib/ops/fused.py's _NormReluMax):             \
 * grad_x[r, j, c] = k1[c] x[r, j, c] + k0[c] (the batch statistics' dense share; none when  \
 * k1 is NULL), plus grad_out[r, c] where j = arg[r, c]. To the bits of torch.addcmul (whose \
 * vectorised CPU kernel fuses the multiply-add) then scatter_add_. k1, k0 and grad_out are T \
 * (float32 for bf16 rows). */                                                                \
static void norm_max_bwd_##S(const void *p, int64_t r) {                                      \
    const max_args *a = (const max_args *)p;                                                  \
    const int64_t K = a->K, C = a->C;                                                         \
    const R *restrict x = (const R *)a->x + r * K * C;                                        \
    const T *restrict g = (const T *)a->grad_out + r * C;                                     \
    const T *restrict k1 = a->k1, *restrict k0 = a->k0;                                       \
    const int32_t *restrict arg = a->arg + r * C;                                             \
    R *restrict gx = (R *)a->grad_x + r * K * C;                                              \
    for (int64_t j = 0; j < K; ++j)                                                           \
        for (int64_t c = 0; c < C; ++c) {                                                     \
            const T dense = k1 ? FMA(LOAD(x[j * C + c]), k1[c], k0[c]) : 0;                   \
            gx[j * C + c] = STORE(arg[c] == j ? dense + g[c] : dense);                        \
        }                                                                                     \
}                                                                                             \
                                                                                              \
static void gathered_max_##S(const void *p, int64_t r) {                                      \
    const max_args *a = (const max_args *)p;                                                  \
    const int64_t K = a->K, C = a->C;                                                         \
    const R *x = (const R *)a->x + r / a->M * a->N * C;                                       \
    const int64_t *nb = a->idx + r * K;                                                       \
    T best[C];                                                                                \
    const R *restrict first = x + checked_index(nb[0], a->N, a->bad) * C;                     \
    for (int64_t c = 0; c < C; ++c) best[c] = LOAD(first[c]);                                 \
    for (int64_t j = 1; j < K; ++j) {                                                         \
        const R *restrict row = x + checked_index(nb[j], a->N, a->bad) * C;                   \
        for (int64_t c = 0; c < C; ++c) {                                                     \
            const T value = LOAD(row[c]);                                                     \
            const int take = value > best[c] || (value != value && best[c] == best[c]);       \
            best[c] = take ? value : best[c];                                                 \
        }                                                                                     \
    }                                                                                         \
    R *restrict out = (R *)a->out + r * C;                                                    \
    for (int64_t c = 0; c < C; ++c) out[c] = STORE(best[c]);                                  \
}

DEFINE_MAX(float, float, f32, SAME, SAME, fmaf)
DEFINE_MAX(double, double, f64, SAME, SAME, fma)
DEFINE_MAX(float, uint16_t, bf16, bf16_load, bf16_store, fmaf)

static const body_fn max_fwd[] = {max_fwd_f32, max_fwd_f64, max_fwd_bf16};
static const body_fn max_bwd[] = {max_bwd_f32, max_bwd_f64, max_bwd_bf16};
static const body_fn norm_max_bwd[] = {norm_max_bwd_f32, norm_max_bwd_f64, norm_max_bwd_bf16};
static const body_fn gathered_max[] = {gathered_max_f32, gathered_max_f64, gathered_max_bf16};

/* dtype DTYPE_F32, DTYPE_F64 or DTYPE_BF16 (x, out, grad_out, grad_x all of it; the maxima
 * are compared exactly, bf16 read as float32). STATUS_BAD_SHAPE where the neighbour index would
 * not fit the int32 `arg`; STATUS_BAD_DTYPE for another dtype. */
int neighbour_max_forward(int dtype, int threads, int64_t R, int64_t K, int64_t C,
                           const void *x, void *out, int32_t *arg) {
    max_args a = {.x = x, .out = out, .arg = arg, .K = K, .C = C};
    if (bad_dtype(dtype)) return STATUS_BAD_DTYPE;
    if (K < 1 || K > INT32_MAX || C < 1 || C > MAX_CHANNELS) return STATUS_BAD_SHAPE;
    for_each(max_fwd[dtype], &a, R, threads);
    return STATUS_OK;
}

int neighbour_max_backward(int dtype, int threads, int64_t R, int64_t K, int64_t C,
                            const void *grad_out, const int32_t *arg, void *grad_x) {
    max_args a = {.grad_out = grad_out, .grad_x = grad_x, .arg = (int32_t *)arg, .K = K,
                  .C = C};
    if (bad_dtype(dtype)) return STATUS_BAD_DTYPE;
    if (K < 1 || K > INT32_MAX) return STATUS_BAD_SHAPE;
    for_each(max_bwd[dtype], &a, R, threads);
    return STATUS_OK;
}

int norm_max_backward(int dtype, int threads, int64_t R, int64_t K, int64_t C, const void *x,
                      const int32_t *arg, const void *k1, const void *k0, const void *grad_out,
                      void *grad_x) {
    max_args a = {.x = x, .arg = (int32_t *)arg, .k1 = k1, .k0 = k0, .grad_out = grad_out,
                  .grad_x = grad_x, .K = K, .C = C};
    if (bad_dtype(dtype)) return STATUS_BAD_DTYPE;
    if (K < 1 || K > INT32_MAX || (k1 == NULL) != (k0 == NULL)) return STATUS_BAD_SHAPE;
    for_each(norm_max_bwd[dtype], &a, R, threads);
    return STATUS_OK;
}

/* STATUS_BAD_INDEX for a neighbour index outside [0, N) (out then holds nothing of use). */
int gathered_max_forward(int dtype, int threads, int64_t B, int64_t N, int64_t M, int64_t K,
                          int64_t C, const void *x, const int64_t *idx, void *out) {
    int bad = 0;
    max_args a = {.x = x, .idx = idx, .bad = &bad, .out = out, .N = N, .M = M, .K = K,
                  .C = C};
    if (bad_dtype(dtype)) return STATUS_BAD_DTYPE;
    if (K < 1 || N < 1 || M < 1 || C < 1 || C > MAX_CHANNELS) return STATUS_BAD_SHAPE;
    for_each(gathered_max[dtype], &a, B * M, threads);
    return bad ? STATUS_BAD_INDEX : STATUS_OK;
}
