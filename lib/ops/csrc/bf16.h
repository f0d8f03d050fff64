/* bfloat16 rows around float32 arithmetic, for the kernels' forms under CPU bf16 autocast: a
 * bf16 value is a float32's upper half, read exactly, and stored rounded to nearest, ties to
 * even, NaN kept a (quiet) NaN, as torch's conversion does. Plain integer operations, which the
 * compiler vectorises on any x86-64 (native bf16 instructions are not needed: the kernels that
 * use these are memory-bound, and halving the bytes they move is the gain). */
#ifndef POINT_HAQ_BF16_H
#define POINT_HAQ_BF16_H

#include <stdint.h>

static inline float bf16_load(uint16_t h) {
    union { uint32_t bits; float value; } v = {.bits = (uint32_t)h << 16};
    return v.value;
}

static inline uint16_t bf16_store(float f) {
    union { float value; uint32_t bits; } v = {.value = f};
    if ((v.bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.bits >> 16) | 0x40u);
    return (uint16_t)((v.bits + 0x7fffu + ((v.bits >> 16) & 1u)) >> 16);
}

/* The load and store of float32 and float64 rows, for bodies written once for every type. */
#define SAME(x) (x)

#endif
