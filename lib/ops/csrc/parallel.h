/* A parallel for over independent units (points, clouds), shared by the kernels in this folder.
 *
 * OpenMP, because torch's Linux wheels run their intra-op threads on GNU OpenMP: this library's
 * libgomp.so.1 (built with -fopenmp by lib/ops/native.py) resolves to the one torch has already
 * loaded, so these loops run on torch's thread pool. Threads of their own would compete for the
 * cores with torch's idle threads, which spin for a while after each parallel op: on 2 cores
 * that doubled the time of the kNN calls inside a training step. A torch built on another
 * OpenMP (Intel's libiomp5, LLVM's libomp) gets a second pool here, correct but slower on few
 * cores. Compiled without OpenMP, the loops run serially. */
#ifndef POINT_HAQ_PARALLEL_H
#define POINT_HAQ_PARALLEL_H

#include <stdint.h>
#include <stdlib.h>

/* What the exported functions return; lib/ops turns each into a one-line Python error. */
enum { STATUS_OK = 0, STATUS_NO_MEMORY = -1, STATUS_NOT_FINITE = -2, STATUS_BAD_SHAPE = -3,
       STATUS_BAD_DTYPE = -4, STATUS_BAD_INDEX = -5 };

/* A neighbour index as a kernel reads through it: j when it lies in [0, n), else 0 with the
 * call's flag *bad raised, and the call then returns STATUS_BAD_INDEX (lib/ops raises). Row 0
 * instead of j keeps every read and scatter-write inside the tensors, whatever the indices
 * hold, including a write Python cannot see (through .numpy() or .data, or to the indices a
 * forward saved for its backward), so lib/ops runs no check of its own before the kernels.
 * The flag is written atomically (several threads may find bad indices at once); the compare
 * costs nothing a training step shows (bench/RESULTS.md, "Index checks in the kernels"). */
static inline int64_t checked_index(int64_t j, int64_t n, int *bad) {
    if (__builtin_expect((uint64_t)j < (uint64_t)n, 1)) return j;
    __atomic_store_n(bad, 1, __ATOMIC_RELAXED);
    return 0;
}

/* The kernels' dtype argument (lib/ops/dispatch.py's KERNEL_DTYPE_CODES): every tensor float32,
 * every tensor float64, or bfloat16 rows with float32 arithmetic and float32 per-channel
 * vectors (each kernel says which of its tensors are rows). */
enum { DTYPE_F32 = 0, DTYPE_F64 = 1, DTYPE_BF16 = 2 };

static inline int bad_dtype(int dtype) { return dtype < DTYPE_F32 || dtype > DTYPE_BF16; }

/* Rows of C channels are kept on the stack (variable-length arrays) by the kernels: a bound on
 * C keeps that within any thread's stack. lib/ops sends wider rows to the PyTorch forms. */
enum { MAX_CHANNELS = 4096 };

/* The Point Transformer presets' widths (models/point_transformer.py, share_planes 8): C = 16 << s
 * channels with W = C / 8 attention weights, s < PRESETS. The kernels compile a body for each
 * with C and W constant, so that the row loops unroll and vectorise; this says which, or -1. */
enum { PRESETS = 6 };

static inline int preset_index(int64_t C, int64_t W) {
    for (int s = 0; s < PRESETS; ++s)
        if (C == (16 << s) && W == C / 8) return s;
    return -1;
}

/* M(S, C, W) for every preset, in preset_index's order: the kernels' bodies and tables. */
#define FOR_EACH_PRESET(M, S) \
    M(S, 16, 2) M(S, 32, 4) M(S, 64, 8) M(S, 128, 16) M(S, 256, 32) M(S, 512, 64)

/* Put before a loop over a row's channels that has no dependence between channels: GCC then
 * vectorises that loop; left alone, it vectorised some presets' narrow rows (16 channels, 2
 * weights) across the outputs or weight groups instead, with shuffles that cost 3-5x the
 * arithmetic (bench/RESULTS.md, "What bounds the CPU targets"). Without OpenMP, a no-op. */
#define SIMD _Pragma("omp simd")

typedef void (*body_fn)(const void *args, int64_t unit);

/* body(args, u) for u in [0, units), in contiguous spans over up to `threads` threads. */
static void for_each(body_fn body, const void *args, int64_t units, int threads) {
    if (threads > units) threads = (int)units;
    if (threads < 1) threads = 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t u = 0; u < units; ++u) body(args, u);
}

/* Sums that do not depend on the number of threads: body(args, u) for each of `chunks` units
 * writes `width` sums to (*partial)[u width ...] (partial: the args' field, allocated here for
 * the call); they are then added up in unit order into out. Returns STATUS_OK, or
 * STATUS_NO_MEMORY without memory for the partial sums. */
static inline int chunked_sums(body_fn body, void *args, double **partial, int64_t chunks,
                               int64_t width, int threads, double *out) {
    *partial = malloc(sizeof(double) * (chunks > 0 ? chunks : 1) * width);
    if (!*partial) return STATUS_NO_MEMORY;
    for_each(body, args, chunks, threads);
    for (int64_t c = 0; c < width; ++c) out[c] = 0;
    for (int64_t k = 0; k < chunks; ++k)
        for (int64_t c = 0; c < width; ++c) out[c] += (*partial)[k * width + c];
    free(*partial);
    *partial = NULL;
    return STATUS_OK;
}

#endif
