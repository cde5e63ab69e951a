/* moekit CPU kernels: the router's gate, logits = x @ W^T + b over a handful of experts, and
 * its backward (float32).
 *
 * With 8 experts the gate is a [T, d] @ [d, 8] product, and BLAS runs it and its two backward
 * products far below its speed: several times their arithmetic's time, a noticeable share of
 * a small MoE's training step (benchmarks/moe_vs_dense.py). Here each token's E dot products
 * run along d with W in L1; dx is each token's E-term sum of W's rows; dW sums each thread's
 * tokens in L1, four at a time, then adds the threads' sums. Exported: moekit_router_logits,
 * moekit_router_logits_backward; built with the other kernels by moekit/kernels/library.py.
 */
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

/* Below this many multiply-adds, one thread: a parallel region costs a few microseconds. */
#define PARALLEL_MIN 65536

#if defined(__AVX512F__)
static inline __mmask16 tail16(long n) { return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1); }
#endif

/* dot(a, b) over n floats */
static inline float dot(const float *a, const float *b, long n)
{
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    for (long i = 0; i < n; i += 16) {
        __mmask16 m = tail16(n - i);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc);
    }
    return _mm512_reduce_add_ps(acc);
#else
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (long i = 0; i < n; i++) s += a[i] * b[i];
    return s;
#endif
}

/* dx[c] = sum over e < E of g[e] w[e][c] (w's rows d apart), c < d: each value written once */
static void dx_row(float *dx, const float *w, const float *g, long E, long d)
{
#if defined(__AVX512F__)
    for (long c = 0; c < d; c += 16) {
        __mmask16 m = tail16(d - c);
        __m512 acc = _mm512_setzero_ps();
        for (long e = 0; e < E; e++) acc = _mm512_fmadd_ps(_mm512_set1_ps(g[e]), _mm512_maskz_loadu_ps(m, w + e * d + c), acc);
        _mm512_mask_storeu_ps(dx + c, m, acc);
    }
#else
    for (long c = 0; c < d; c++) {
        float s = 0.0f;
        for (long e = 0; e < E; e++) s += g[e] * w[e * d + c];
        dx[c] = s;
    }
#endif
}

/* dw[e][c] += sum over i < n of g[i E + e] x[i][c] (x's rows d apart): n tokens (up to 4) in
 * one read and write of dw's row */
static void dw_rows(float *dw, const float *x, const float *g, long n, long E, long d)
{
    for (long e = 0; e < E; e++) {
        float *row = dw + e * d;
#if defined(__AVX512F__)
        for (long c = 0; c < d; c += 16) {
            __mmask16 m = tail16(d - c);
            __m512 acc = _mm512_maskz_loadu_ps(m, row + c);
            for (long i = 0; i < n; i++)
                acc = _mm512_fmadd_ps(_mm512_set1_ps(g[i * E + e]), _mm512_maskz_loadu_ps(m, x + i * d + c), acc);
            _mm512_mask_storeu_ps(row + c, m, acc);
        }
#else
        for (long i = 0; i < n; i++) {
            float a = g[i * E + e];
#pragma omp simd
            for (long c = 0; c < d; c++) row[c] += a * x[i * d + c];
        }
#endif
    }
}

/* logits[t, e] = dot(x[t], w[e]) (+ b[e] where b), t < T, e < E: x [T, d], w [E, d], logits
 * [T, E], contiguous. */
int moekit_router_logits(const float *x, long T, long d, const float *w, const float *b, long E, float *logits,
                         int threads)
{
#pragma omp parallel for schedule(static) num_threads(threads) if (T * E * d >= PARALLEL_MIN)
    for (long t = 0; t < T; t++)
        for (long e = 0; e < E; e++) logits[t * E + e] = dot(x + t * d, w + e * d, d) + (b ? b[e] : 0.0f);
    return 0;
}

/* Its backward for dl = dlogits [T, E]: dx [T, d] = dl @ w, dw [E, d] = dl^T @ x, db [E] = the
 * column sums of dl; each output may be NULL (not needed). dw and db: each thread sums its
 * share of the tokens (the same shares every call for a thread count: the same sums), then
 * the threads' sums are added in thread order. Returns 0, or -1 when out of memory. */
int moekit_router_logits_backward(const float *x, long T, long d, const float *w, long E, const float *dl,
                                  float *dx, float *dw, float *db, int threads)
{
    int n = T * E * d >= PARALLEL_MIN ? threads : 1;
    long all = E * (d + 1); /* one thread's dw, then db */
    float *part = NULL;
    if (dw || db) {
        part = calloc((size_t)n * all, sizeof(float));
        if (!part)
            return -1;
    }
#pragma omp parallel num_threads(n)
    {
        int me = omp_get_thread_num(), nt = omp_get_num_threads();
        long t0 = T * me / nt, t1 = T * (me + 1) / nt;
        float *pw = part ? part + (size_t)me * all : NULL, *pb = pw ? pw + E * d : NULL;
        for (long t = t0; dx && t < t1; t++) dx_row(dx + t * d, w, dl + t * E, E, d);
        for (long t = t0; pw && t < t1; t += 4) {
            long m = t1 - t < 4 ? t1 - t : 4;
            dw_rows(pw, x + t * d, dl + t * E, m, E, d);
            for (long i = 0; i < m; i++)
                for (long e = 0; e < E; e++) pb[e] += dl[(t + i) * E + e];
        }
        if (part) {
#pragma omp barrier
            for (long i = all * me / nt; i < all * (me + 1) / nt; i++) { /* this thread's share of the values */
                float s = 0.0f;
                for (int p = 0; p < nt; p++) s += part[(size_t)p * all + i];
                if (i < E * d && dw)
                    dw[i] = s;
                else if (i >= E * d && db)
                    db[i - E * d] = s;
            }
        }
    }
    free(part);
    return 0;
}
