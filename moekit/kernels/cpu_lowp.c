/* moekit CPU kernels: products with low-precision weights (moekit.quant's formats).
 *
 * out[m, n] = alpha * sum_k W[n, k] x[m, k] (+ out[m, n] when accumulate), for the few rows x
 * of a decode step: each weight row is read once for all rows of x, so a step costs the
 * weights' bytes at memory speed, a half (bf16), a quarter (int8) or about an eighth (int4)
 * of float32's. Weights are dequantised in registers and multiplied in float32:
 *   fmt 0, bf16: w uint16 [N, K] (bfloat16 bits);
 *   fmt 1, int8: w int8 [N, K], scale float [N]            (W = q * scale[n]);
 *   fmt 2, int4: w uint8 [N, K/2], scale float [N, K/G]   (W = (code - 8) * scale[n, g]),
 *     within each group of G weights byte j holds code j (low nibble) and code j + G/2
 *     (high nibble), so both halves multiply contiguous x (the layout of llama.cpp's q4_0).
 * Parallel over the weight rows. Built with the other kernels by moekit/kernels/library.py.
 */
#include <stdint.h>
#include <string.h>
#include <omp.h>

#define PARALLEL_MIN 65536 /* weights: below this one thread (a parallel region costs microseconds) */

static inline float bf16_dot(const uint16_t *w, const float *x, long K)
{
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (long k = 0; k < K; k++) {
        uint32_t u = (uint32_t)w[k] << 16;
        float v;
        memcpy(&v, &u, sizeof v);
        s += v * x[k];
    }
    return s;
}

static inline float i8_dot(const int8_t *q, const float *x, long K)
{
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (long k = 0; k < K; k++)
        s += (float)q[k] * x[k];
    return s;
}

static inline float i4_dot(const uint8_t *q, const float *scale, const float *x, long K, long G)
{
    float s = 0.0f;
    long half = G / 2;
    for (long g = 0; g < K / G; g++) {
        const uint8_t *b = q + g * half;
        const float *lo = x + g * G, *hi = lo + half;
        float t = 0.0f;
#pragma omp simd reduction(+ : t)
        for (long j = 0; j < half; j++)
            t += (float)((int)(b[j] & 15) - 8) * lo[j] + (float)((int)(b[j] >> 4) - 8) * hi[j];
        s += scale[g] * t;
    }
    return s;
}

int moekit_rows_lowp(int fmt, const void *w, const float *scale, long N, long K, long G, const float *x, long M,
                     float *out, float alpha, int accumulate, int threads)
{
    if (fmt < 0 || fmt > 2 || (fmt == 2 && (G <= 0 || G % 2 || K % G)))
        return 2;
#pragma omp parallel for schedule(static) num_threads(threads) if (N * K >= PARALLEL_MIN)
    for (long n = 0; n < N; n++) {
        for (long m = 0; m < M; m++) {
            const float *xm = x + m * K;
            float s;
            if (fmt == 0)
                s = bf16_dot((const uint16_t *)w + n * K, xm, K);
            else if (fmt == 1)
                s = scale[n] * i8_dot((const int8_t *)w + n * K, xm, K);
            else
                s = i4_dot((const uint8_t *)w + n * (K / 2), scale + n * (K / G), xm, K, G);
            float *o = out + m * N + n;
            *o = accumulate ? *o + alpha * s : alpha * s;
        }
    }
    return 0;
}
