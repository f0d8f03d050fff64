/* The backward of a row gather (lib/ops/geometry.py's gather: out[b, s] = rows[b, idx[b, s]]),
 * for TransitionDown's grouped products and TransitionUp's interpolation in training:
 *
 *   grad_rows[b, idx[b, s]] += grad[b, s]    for each gathered row s of cloud b, in increasing s
 *
 * torch's index_add does this with atomics or per-thread copies; the sparse product that
 * lib/ops used before sorts the indices first (an argsort per step, since each step's kNN is a
 * new index tensor). Here one pass: the gathered rows of cloud b (S of them) all land in
 * cloud b's N rows, so the clouds go to threads whole and each destination row
 * has one writer, adding its contributions in increasing s: the sorted sparse product's order,
 * whatever the thread count. An index outside its cloud's rows is reported (checked_index,
 * parallel.h). float32 and float64 (the gather's gradient is taken in the rows' dtype).
 * Built with the other kernels here by lib/ops/native.py. */
#include <stdint.h>

#include "parallel.h"

typedef struct {
    const void *grad;
    void *grad_rows;
    const int64_t *idx;
    int *bad; /* raised by checked_index (parallel.h) */
    int64_t S, N, C;
} gather_args;

#define DEFINE_GATHER_BACKWARD(T, S_)                                                         \
static void gather_backward_##S_(const void *p, int64_t b) {                                  \
    const gather_args *a = (const gather_args *)p;                                            \
    const int64_t C = a->C;                                                                   \
    const T *g = (const T *)a->grad;                                                          \
    T *out = (T *)a->grad_rows;                                                               \
    for (int64_t s = b * a->S; s < (b + 1) * a->S; ++s) {                                     \
        const int64_t j = checked_index(a->idx[s], a->N, a->bad);                             \
        T *restrict row = out + (b * a->N + j) * C;                                           \
        const T *restrict gs = g + s * C;                                                     \
        SIMD for (int64_t c = 0; c < C; ++c) row[c] += gs[c];                                 \
    }                                                                                         \
}

DEFINE_GATHER_BACKWARD(float, f32)
DEFINE_GATHER_BACKWARD(double, f64)

/* dtype DTYPE_F32 or DTYPE_F64: grad (B, S, C) and grad_rows (B, N, C, zeroed by the caller) of
 * that type; idx (B, S) int64, each entry a row of its own cloud, in [0, N). Returns STATUS_OK,
 * STATUS_BAD_DTYPE / STATUS_BAD_SHAPE without touching memory, or STATUS_BAD_INDEX for an
 * entry outside [0, N) (grad_rows then holds nothing of use). */
int gather_rows_backward(int dtype, int threads, int64_t B, int64_t S, int64_t N, int64_t C,
                         const int64_t *idx, const void *grad, void *grad_rows) {
    int bad = 0;
    gather_args a = {.grad = grad, .grad_rows = grad_rows, .idx = idx, .bad = &bad, .S = S,
                     .N = N, .C = C};
    if (dtype != DTYPE_F32 && dtype != DTYPE_F64) return STATUS_BAD_DTYPE;
    if (B < 0 || S < 0 || N < 1 || C < 1) return STATUS_BAD_SHAPE;
    static const body_fn body[] = {gather_backward_f32, gather_backward_f64};
    for_each(body[dtype], &a, B, threads);
    return bad ? STATUS_BAD_INDEX : STATUS_OK;
}
