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
 * gathered_max is the same maximum over rows picked by index, out[b, i, c] = max_j
 * x[b, idx[b, i, j], c] for x (B, N, C) and idx (B, M, K), without the (B, M, K, C) copy that
 * gathering them first writes (inference only: no backward).
 * Built with the other kernels here by lib/ops/native.py. */
#include <stdint.h>
#include <string.h>

#include "parallel.h"

typedef struct {
    const void *x, *grad_out;
    void *out, *grad_x;
    int32_t *arg;
    const int64_t *idx;
    int64_t N, M, K, C;
} max_args;

#define DEFINE_MAX(T, S)                                                                      \
static void max_fwd_##S(const void *p, int64_t r) {                                           \
    const max_args *a = (const max_args *)p;                                                  \
    const int64_t K = a->K, C = a->C;                                                         \
    const T *x = (const T *)a->x + r * K * C;                                                 \
    T *restrict best = (T *)a->out + r * C;                                                   \
    int32_t *restrict arg = a->arg + r * C;                                                   \
    memcpy(best, x, C * sizeof(T));                                                           \
    memset(arg, 0, C * sizeof(int32_t));                                                      \
    for (int64_t j = 1; j < K; ++j) {                                                         \
        const T *restrict row = x + j * C;                                                    \
        for (int64_t c = 0; c < C; ++c) {                                                     \
            const int take = row[c] > best[c] || (row[c] != row[c] && best[c] == best[c]);    \
            best[c] = take ? row[c] : best[c];                                                \
            arg[c] = take ? (int32_t)j : arg[c];                                              \
        }                                                                                     \
    }                                                                                         \
}                                                                                             \
                                                                                              \
static void max_bwd_##S(const void *p, int64_t r) {                                           \
    const max_args *a = (const max_args *)p;                                                  \
    const int64_t K = a->K, C = a->C;                                                         \
    const T *restrict g = (const T *)a->grad_out + r * C;                                     \
    const int32_t *restrict arg = a->arg + r * C;                                             \
    T *restrict gx = (T *)a->grad_x + r * K * C;                                              \
    for (int64_t j = 0; j < K; ++j)                                                           \
        for (int64_t c = 0; c < C; ++c) gx[j * C + c] = arg[c] == j ? g[c] : (T)0;            \
}                                                                                             \
                                                                                              \
static void gathered_max_##S(const void *p, int64_t r) {                                      \
    const max_args *a = (const max_args *)p;                                                  \
    const int64_t K = a->K, C = a->C;                                                         \
    const T *x = (const T *)a->x + r / a->M * a->N * C;                                       \
    const int64_t *nb = a->idx + r * K;                                                       \
    T *restrict best = (T *)a->out + r * C;                                                   \
    memcpy(best, x + nb[0] * C, C * sizeof(T));                                               \
    for (int64_t j = 1; j < K; ++j) {                                                         \
        const T *restrict row = x + nb[j] * C;                                                \
        for (int64_t c = 0; c < C; ++c) {                                                     \
            const int take = row[c] > best[c] || (row[c] != row[c] && best[c] == best[c]);    \
            best[c] = take ? row[c] : best[c];                                                \
        }                                                                                     \
    }                                                                                         \
}

DEFINE_MAX(float, f32)
DEFINE_MAX(double, f64)

/* dtype 0 = float32, 1 = float64. STATUS_BAD_SHAPE where the neighbour index would not fit the
 * int32 `arg`. */
int neighbour_max_forward(int dtype, int threads, int64_t R, int64_t K, int64_t C,
                           const void *x, void *out, int32_t *arg) {
    max_args a = {.x = x, .out = out, .arg = arg, .K = K, .C = C};
    if (K < 1 || K > INT32_MAX) return STATUS_BAD_SHAPE;
    for_each(dtype ? max_fwd_f64 : max_fwd_f32, &a, R, threads);
    return STATUS_OK;
}

int neighbour_max_backward(int dtype, int threads, int64_t R, int64_t K, int64_t C,
                            const void *grad_out, const int32_t *arg, void *grad_x) {
    max_args a = {.grad_out = grad_out, .grad_x = grad_x, .arg = (int32_t *)arg, .K = K,
                  .C = C};
    if (K < 1 || K > INT32_MAX) return STATUS_BAD_SHAPE;
    for_each(dtype ? max_bwd_f64 : max_bwd_f32, &a, R, threads);
    return STATUS_OK;
}

/* Neighbour indices must lie in [0, N): lib/ops checks them before the call. */
int gathered_max_forward(int dtype, int threads, int64_t B, int64_t N, int64_t M, int64_t K,
                          int64_t C, const void *x, const int64_t *idx, void *out) {
    max_args a = {.x = x, .idx = idx, .out = out, .N = N, .M = M, .K = K, .C = C};
    if (K < 1 || N < 1 || M < 1 || C < 1) return STATUS_BAD_SHAPE;
    for_each(dtype ? gathered_max_f64 : gathered_max_f32, &a, B * M, threads);
    return STATUS_OK;
}
