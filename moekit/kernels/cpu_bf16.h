/* bfloat16 <-> float32 for moekit's C kernels (bfloat16 values are their uint16 bits).
 *
 * Included by every kernel file that reads or writes bfloat16; inline because each call sits
 * in an inner loop that the compiler must vectorise. moekit/kernels/library.py hashes this
 * header with the .c files, so a change here rebuilds the kernels.
 */
#ifndef MOEKIT_CPU_BF16_H
#define MOEKIT_CPU_BF16_H

#include <stdint.h>
#include <string.h>

/* The float32 a bfloat16 stands for (exact: bfloat16 is float32's top half). */
static inline float bf16_in(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* The nearest bfloat16 (ties to even, as torch rounds); NaN stays NaN. */
static inline uint16_t bf16_out(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? (u >> 16) | 0x40u : r);
}

#endif
