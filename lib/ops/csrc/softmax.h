/* The softmax over a point's neighbours, shared by attention_inference.c and
 * attention_softmax.c, and the exponential it uses in float32. */
#ifndef POINT_HAQ_SOFTMAX_H
#define POINT_HAQ_SOFTMAX_H

#include <math.h>
#include <stdint.h>

#include "parallel.h"

/* e^x in float32 without a call, so that the softmax's loop vectorises (expf is a library
 * call per value; 5-10% of the kernel's time at 16 and 32 channels, measured). x = n ln2 + r
 * with |r| <= ln2 / 2; e^r by its Taylor polynomial to r^7 (truncation below 1e-8 relative);
 * 2^n from the exponent bits. Within 1.22 ulp of the exact value over [-87, 88] (every float
 * there checked against exp in double); x is clamped to that range, so that
 * 2^n stays a normal number: below, e^x is under 1.7e-38 where expf's would be smaller still
 * (in a softmax, weights of no consequence), above it overflows to inf as expf's. NaN stays NaN
 * (it passes through the polynomial). */
static inline float exp_f32(float x) {
    const float clamped = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float shifter = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    const float n = (clamped * 1.44269504088896341f + shifter) - shifter;
    const float r = (clamped - n * 0.693359375f) + n * 2.12194440e-4f; /* ln2 in two parts */
    float p = 1.0f / 5040;
    p = p * r + 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    union { int32_t bits; float value; } scale = {.bits = ((int32_t)n + 127) << 23};
    const float y = p * scale.value;
    return x > 88.0f ? INFINITY : y;
}

/* z (K values of one channel, contiguous) replaced by its softmax, shifted by the maximum as
 * torch's is; the sum in an order fixed at compile time (omp simd reduction), so results do
 * not depend on the threads. */
#define DEFINE_SOFTMAX(T, S, EXP)                                                             \
static inline __attribute__((always_inline)) void softmax_##S(T *restrict z, const int64_t K) { \
    T top = z[0], total = 0;                                                                  \
    for (int64_t j = 1; j < K; ++j) top = z[j] > top ? z[j] : top;                            \
    SIMD for (int64_t j = 0; j < K; ++j) z[j] = EXP(z[j] - top);                              \
    _Pragma("omp simd reduction(+:total)")                                                    \
    for (int64_t j = 0; j < K; ++j) total += z[j];                                            \
    const T inverse = 1 / total;                                                              \
    SIMD for (int64_t j = 0; j < K; ++j) z[j] *= inverse;                                     \
}

DEFINE_SOFTMAX(float, f32, exp_f32)
DEFINE_SOFTMAX(double, f64, exp)

#endif
