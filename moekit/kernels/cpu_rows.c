/* moekit CPU kernels: moving rows between token order and expert order (float32).
 *
 * The MoE layer's fast path gathers each token's row once per chosen expert into expert
 * order, runs the experts, and adds the weighted outputs back to their tokens. In torch ops
 * the add is an index_add_ (a scatter into a zeroed buffer) and its backward an
 * index_select, a multiply and a row sum; here every one of those is one pass that reads
 * each row once, parallel over the rows written (no two threads write a row, so no atomics
 * and no zero-fill). Exported: moekit_gather_rows (a weighted sum of gathered rows: the
 * combine, the backward of the gather, the gather itself) and moekit_combine_backward (the
 * gradients of the combine for the expert outputs and the router weights). Rows are
 * contiguous, d floats each. Built with cpu_gemv.c by moekit/kernels/__init__.py.
 */
#include <string.h>
#include <omp.h>

/* Below this many floats written, one thread: a parallel region costs a few microseconds. */
#define PARALLEL_MIN 16384

/* dst[i] = sum over j < k with idx[i k + j] >= 0 of w[i k + j] * src[idx[i k + j]] (w NULL: 1),
 * for i < n; a row with no source is zero. */
int moekit_gather_rows(const float *src, long d, const long *idx, const float *w, long k, long n, float *dst,
                       int threads)
{
#pragma omp parallel for schedule(static) num_threads(threads) if (n * d >= PARALLEL_MIN)
    for (long i = 0; i < n; i++) {
        float *o = dst + i * d;
        int written = 0;
        for (long j = 0; j < k; j++) {
            long s = idx[i * k + j];
            if (s < 0)
                continue;
            const float *r = src + s * d;
            float a = w ? w[i * k + j] : 1.0f;
            if (!written) {
                if (w) {
#pragma omp simd
                    for (long c = 0; c < d; c++)
                        o[c] = a * r[c];
                } else {
                    memcpy(o, r, (size_t)d * sizeof(float));
                }
                written = 1;
            } else {
#pragma omp simd
                for (long c = 0; c < d; c++)
                    o[c] += a * r[c];
            }
        }
        if (!written)
            memset(o, 0, (size_t)d * sizeof(float));
    }
    return 0;
}

/* The backward of out[tok[i]] += w[i] * y[i] (i < n, expert order): dy[i] = w[i] * dout[tok[i]]
 * and dw[i] = dot(dout[tok[i]], y[i]); either output may be NULL (not needed). */
int moekit_combine_backward(const float *dout, const float *y, long d, const long *tok, const float *w, long n,
                            float *dy, float *dw, int threads)
{
#pragma omp parallel for schedule(static) num_threads(threads) if (n * d >= PARALLEL_MIN)
    for (long i = 0; i < n; i++) {
        const float *g = dout + tok[i] * d;
        if (dy) {
            float a = w[i], *o = dy + i * d;
#pragma omp simd
            for (long c = 0; c < d; c++)
                o[c] = a * g[c];
        }
        if (dw) {
            const float *r = y + i * d;
            float s = 0.0f;
#pragma omp simd reduction(+ : s)
            for (long c = 0; c < d; c++)
                s += g[c] * r[c];
            dw[i] = s;
        }
    }
    return 0;
}
