/* moekit CPU kernels: decoding one token, and experts over a few rows each, forward and
 * backward (float32).
 *
 * At batch 1 a decode step is memory-bound: it reads every active weight once. These
 * loops stream the weights with software prefetch and several independent accumulators,
 * which reads them faster on a 2-core AVX-512 machine than the BLAS call torch makes for
 * a one-row matmul (measured by benchmarks/generate.py). Threads split the output, so no
 * reduction across threads is needed. Exported: moekit_rows (W @ v, optional RMSNorm, bias,
 * residual), moekit_swiglu_add (one SwiGLU expert into the output), moekit_swiglu_segments
 * and moekit_swiglu_segments_backward (every expert over its few rows, each weight read from
 * memory once per pass, each weight gradient written once), moekit_moe_token (norm,
 * top-k router and the chosen experts of a Mixtral-style layer) and moekit_attention_token
 * (norm, q/k/v, RoPE, KV-cache write, attention, output projection). Built and loaded by
 * moekit/kernels/library.py; unit stride within a row, any row stride. Without AVX-512 the
 * #else branches are plain loops the compiler vectorises.
 */
#include <math.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#include <omp.h>

#include "cpu_bf16.h"
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#include "cpu_vmath.h"

void moekit_topk_of(const float *v, long E, int k, long *ix); /* cpu_rows.c */

/* Prefetch AHEAD rows ahead of the row being read; in column tiles, one prefetch per
 * PF_EVERY vectors (4 x 64 B; the hardware fetches the neighbouring lines). Tuned on the
 * 2-core AVX-512 machine: AHEAD 4-8 and PF_EVERY 4 read fastest. */
#define AHEAD 8
#define PF_EVERY 4

/* [a, b): thread t's share of n items, in blocks of `align` */
static void share(long n, long align, long *a, long *b)
{
    int t = omp_get_thread_num(), T = omp_get_num_threads();
    long blocks = (n + align - 1) / align;
    *a = blocks * t / T * align;
    *b = blocks * (t + 1) / T * align;
    if (*a > n) *a = n;
    if (*b > n) *b = n;
}

/* share for cpu_lowp.c's parallel regions */
void moekit_share(long n, long align, long *a, long *b) { share(n, align, a, b); }

/* a hint, never a fault: the address may lie past the end of the weights */
static inline void prefetch(const float *p, long offset)
{
    __builtin_prefetch((const void *)((uintptr_t)p + (uintptr_t)offset * sizeof(float)), 0, 3);
}

/* r[i] = dot(w + i * ldw, x) for i < 4 (rows past `rows` repeat row 0) */
static void dot4(const float *w, long ldw, int rows, long K, const float *x, float *r)
{
    const float *w0 = w, *w1 = rows > 1 ? w + ldw : w, *w2 = rows > 2 ? w + 2 * ldw : w, *w3 = rows > 3 ? w + 3 * ldw : w;
    long ahead = AHEAD * ldw;
#if defined(__AVX512F__)
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    long k = 0;
    for (; k + 16 <= K; k += 16) {
        prefetch(w0, ahead + k), prefetch(w1, ahead + k), prefetch(w2, ahead + k), prefetch(w3, ahead + k);
        __m512 xv = _mm512_loadu_ps(x + k);
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w0 + k), xv, a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w1 + k), xv, a1);
        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w2 + k), xv, a2);
        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w3 + k), xv, a3);
    }
    if (k < K) {
        __mmask16 m = (__mmask16)((1u << (K - k)) - 1);
        __m512 xv = _mm512_maskz_loadu_ps(m, x + k);
        a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w0 + k), xv, a0);
        a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w1 + k), xv, a1);
        a2 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w2 + k), xv, a2);
        a3 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w3 + k), xv, a3);
    }
    r[0] = _mm512_reduce_add_ps(a0), r[1] = _mm512_reduce_add_ps(a1);
    r[2] = _mm512_reduce_add_ps(a2), r[3] = _mm512_reduce_add_ps(a3);
#else
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (long k = 0; k < K; k += 16)
        prefetch(w0, ahead + k), prefetch(w1, ahead + k), prefetch(w2, ahead + k), prefetch(w3, ahead + k);
    #pragma omp simd reduction(+:s0, s1, s2, s3)
    for (long k = 0; k < K; k++) {
        s0 += w0[k] * x[k], s1 += w1[k] * x[k], s2 += w2[k] * x[k], s3 += w3[k] * x[k];
    }
    r[0] = s0, r[1] = s1, r[2] = s2, r[3] = s3;
#endif
}

/* acc[j] = sum_k x[k] * W[k, j] for j < n. Column tiles of 128 floats stay in registers
 * while the tile's part of every row streams by (prefetched AHEAD rows ahead). */
static void axpy_rows(const float *W, long K, long ldw, long n, const float *x, float *acc)
{
    long ahead = AHEAD * ldw;
    long j = 0;
#if defined(__AVX512F__)
#define TILE(V)                                                                              \
    for (; j + 16 * (V) <= n; j += 16 * (V)) {                                               \
        __m512 a[V];                                                                         \
        for (int v = 0; v < (V); v++) a[v] = _mm512_setzero_ps();                           \
        const float *w = W + j;                                                              \
        for (long k = 0; k < K; k++, w += ldw) {                                             \
            for (int v = 0; v < (V); v += PF_EVERY) prefetch(w, ahead + 16 * v);           \
            __m512 xv = _mm512_set1_ps(x[k]);                                                \
            for (int v = 0; v < (V); v++) a[v] = _mm512_fmadd_ps(xv, _mm512_loadu_ps(w + 16 * v), a[v]); \
        }                                                                                    \
        for (int v = 0; v < (V); v++) _mm512_storeu_ps(acc + j + 16 * v, a[v]);             \
    }
    TILE(8)
    TILE(4)
    TILE(1)
#undef TILE
    if (j < n) {
        __mmask16 m = (__mmask16)((1u << (n - j)) - 1);
        __m512 a0 = _mm512_setzero_ps();
        const float *w = W + j;
        for (long k = 0; k < K; k++, w += ldw)
            a0 = _mm512_fmadd_ps(_mm512_set1_ps(x[k]), _mm512_maskz_loadu_ps(m, w), a0);
        _mm512_mask_storeu_ps(acc + j, m, a0);
        j = n;
    }
#endif
    if (j < n) { /* without AVX-512: row by row */
        long m = n - j;
        for (long i = 0; i < m; i++) acc[j + i] = 0.0f;
        for (long k = 0; k < K; k++) {
            const float *w = W + k * ldw + j;
            for (long i = 0; i < m; i += 16) prefetch(w, ahead + i);
            float xk = x[k];
            float *a = acc + j;
            #pragma omp simd
            for (long i = 0; i < m; i++) a[i] += xk * w[i];
        }
    }
}

/* acc[r * lda + j] = sum_k x[r * ldx + k] * W[k, j] for r < R and j < n: axpy_rows for many
 * rows at once. Per tile of 128 columns and block of KB weight rows (24 KB at 128 columns, in
 * L1), two x rows at a time keep the tile in registers: the block comes from memory for the
 * first pair and from L1 for the others, so the weights are read once whatever R is (without
 * the blocking each pair after the first reads the tile again from L2). The tile shape was
 * chosen with benchmarks/moe_layer.py; the figures are in docs/benchmarks.md. */
#define MR_V 8
#define KB 48
static void axpy_rows_many(const float *W, long K, long ldw, long n, const float *x, long ldx, long R, float *acc,
                           long lda)
{
#if defined(__AVX512F__)
    long ahead = AHEAD * ldw;
    for (long j = 0; j < n; j += 16 * MR_V) {
        __mmask16 mk[MR_V];
        for (int v = 0; v < MR_V; v++) {
            long c = n - j - 16 * v;
            mk[v] = c >= 16 ? (__mmask16)0xFFFF : c > 0 ? (__mmask16)((1u << c) - 1) : (__mmask16)0;
        }
        for (long k0 = 0; k0 < K; k0 += KB) {
            long k1 = k0 + KB < K ? k0 + KB : K;
            for (long r = 0; r < R; r += 2) {
                int two = r + 1 < R;
                const float *x0 = x + r * ldx, *x1 = x + (r + two) * ldx;
                float *c0 = acc + r * lda + j, *c1 = acc + (r + two) * lda + j;
                __m512 a0[MR_V], a1[MR_V];
                for (int v = 0; v < MR_V; v++) { /* the partial sums of the blocks before */
                    a0[v] = k0 ? _mm512_maskz_loadu_ps(mk[v], c0 + 16 * v) : _mm512_setzero_ps();
                    a1[v] = k0 ? _mm512_maskz_loadu_ps(mk[v], c1 + 16 * v) : _mm512_setzero_ps();
                }
                const float *w = W + k0 * ldw + j;
                for (long k = k0; k < k1; k++, w += ldw) {
                    if (r == 0)
                        for (int v = 0; v < MR_V; v += PF_EVERY) prefetch(w, ahead + 16 * v);
                    __m512 s0 = _mm512_set1_ps(x0[k]), s1 = _mm512_set1_ps(x1[k]);
                    for (int v = 0; v < MR_V; v++) {
                        __m512 wv = _mm512_maskz_loadu_ps(mk[v], w + 16 * v);
                        a0[v] = _mm512_fmadd_ps(s0, wv, a0[v]);
                        a1[v] = _mm512_fmadd_ps(s1, wv, a1[v]);
                    }
                }
                for (int v = 0; v < MR_V; v++) {
                    if (two) _mm512_mask_storeu_ps(c1 + 16 * v, mk[v], a1[v]);
                    _mm512_mask_storeu_ps(c0 + 16 * v, mk[v], a0[v]);
                }
            }
        }
    }
#else
    for (long r = 0; r < R; r++) axpy_rows(W, K, ldw, n, x + r * ldx, acc + r * lda);
#endif
}

/* out[i] = x[i] / sqrt(mean(x^2) + eps) * g[i], as torch's rms_norm */
static void rmsnorm(const float *x, const float *g, long n, float eps, float *out)
{
    float ss = 0.0f;
    #pragma omp simd reduction(+:ss)
    for (long i = 0; i < n; i++) ss += x[i] * x[i];
    float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (long i = 0; i < n; i++) out[i] = x[i] * r * g[i];
}

/* y[n] = alpha * dot(W[n, :], v) + bias[n] + add[n] for n < N, where v = x, or rmsnorm(x) * g
 * when g is given (bias, add, g may be NULL; add may be y). W is [N, K] with row stride ldw.
 * Returns 0, or -1 when out of memory (y untouched). */
int moekit_rows(const float *W, long N, long K, long ldw, const float *x, const float *g, float eps,
                float *y, float alpha, const float *bias, const float *add, int nthreads)
{
    float *normed = NULL;
    if (g) {
        normed = malloc(K * sizeof(float));
        if (!normed) return -1;
        rmsnorm(x, g, K, eps, normed);
        x = normed;
    }
    #pragma omp parallel num_threads(nthreads)
    {
        long n0, n1;
        share(N, 16, &n0, &n1);
        for (long n = n0; n < n1; n += 4) {
            int rows = n1 - n < 4 ? (int)(n1 - n) : 4;
            float r[4];
            dot4(W + n * ldw, ldw, rows, K, x, r);
            for (int i = 0; i < rows; i++) {
                float v = alpha * r[i];
                if (bias) v += bias[n + i];
                if (add) v += add[n + i];
                y[n + i] = v;
            }
        }
    }
    free(normed);
    return 0;
}

/* The SwiGLU activation and its gradient, vectorised (exp by polynomial), for the kernels
 * below and for whole buffers (moekit_silu_mul, moekit_silu_mul_backward), where torch takes
 * two to four passes. */
/* out[i] = silu(g[i]) * u[i] for i < n (out may be g). */
static void silu_mul_n(const float *g, const float *u, float *out, long n)
{
    long i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16) {
        __m512 gv = _mm512_loadu_ps(g + i);
        _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_mul_ps(gv, sigmoid16(gv)), _mm512_loadu_ps(u + i)));
    }
#elif defined(__AVX2__) && defined(__FMA__)
    for (; i + 8 <= n; i += 8) {
        __m256 gv = _mm256_loadu_ps(g + i);
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(gv, sigmoid8(gv)), _mm256_loadu_ps(u + i)));
    }
#endif
    for (; i < n; i++) out[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

/* The gradients of h = silu(g) * u for dh, i < n: du = dh * silu(g), dg = dh * u * s *
 * (1 + g (1 - s)) with s = sigmoid(g) (dg or du may be dh). */
static void silu_mul_grad_n(const float *dh, const float *g, const float *u, float *dg, float *du, long n)
{
    long i = 0;
#if defined(__AVX512F__)
    __m512 one = _mm512_set1_ps(1.0f);
    for (; i + 16 <= n; i += 16) {
        __m512 gv = _mm512_loadu_ps(g + i), dv = _mm512_loadu_ps(dh + i), s = sigmoid16(gv);
        __m512 d = _mm512_mul_ps(_mm512_mul_ps(dv, _mm512_loadu_ps(u + i)), s);
        _mm512_storeu_ps(dg + i, _mm512_mul_ps(d, _mm512_fmadd_ps(gv, _mm512_sub_ps(one, s), one)));
        _mm512_storeu_ps(du + i, _mm512_mul_ps(dv, _mm512_mul_ps(gv, s)));
    }
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 one = _mm256_set1_ps(1.0f);
    for (; i + 8 <= n; i += 8) {
        __m256 gv = _mm256_loadu_ps(g + i), dv = _mm256_loadu_ps(dh + i), s = sigmoid8(gv);
        __m256 d = _mm256_mul_ps(_mm256_mul_ps(dv, _mm256_loadu_ps(u + i)), s);
        _mm256_storeu_ps(dg + i, _mm256_mul_ps(d, _mm256_fmadd_ps(gv, _mm256_sub_ps(one, s), one)));
        _mm256_storeu_ps(du + i, _mm256_mul_ps(dv, _mm256_mul_ps(gv, s)));
    }
#endif
    for (; i < n; i++) {
        float s = 1.0f / (1.0f + expf(-g[i])), d = dh[i];
        dg[i] = d * u[i] * s * (1.0f + g[i] * (1.0f - s));
        du[i] = d * g[i] * s;
    }
}

/* Whether this build's few-row loops are the AVX-512 ones (else plain loops, which the blocked
 * kernel of cpu_blocks.c beats at every row count: benchmarks/moe_layer.py). */
int moekit_rows_simd(void)
{
#if defined(__AVX512F__)
    return 1;
#else
    return 0;
#endif
}

/* One thread's silu_mul_n and silu_mul_grad_n, for cpu_blocks.c. */
void moekit_silu_mul_rows(const float *g, const float *u, float *out, long n) { silu_mul_n(g, u, out, n); }

void moekit_silu_mul_grad_rows(const float *dh, const float *g, const float *u, float *dg, float *du, long n)
{
    silu_mul_grad_n(dh, g, u, dg, du, n);
}

/* Below this many values, one thread: a parallel region costs a few microseconds. */
#define ACT_PARALLEL_MIN 65536

/* out[i] = silu(g[i]) * u[i] for i < n (out may be g). */
void moekit_silu_mul(const float *g, const float *u, float *out, long n, int nthreads)
{
    #pragma omp parallel num_threads(n < ACT_PARALLEL_MIN ? 1 : nthreads)
    {
        long a, b;
        share(n, 16, &a, &b);
        silu_mul_n(g + a, u + a, out + a, b - a);
    }
}

/* silu_mul_grad_n over whole buffers (du may be dh). */
void moekit_silu_mul_backward(const float *dh, const float *g, const float *u, float *dg, float *du, long n,
                              int nthreads)
{
    #pragma omp parallel num_threads(n < ACT_PARALLEL_MIN ? 1 : nthreads)
    {
        long a, b;
        share(n, 16, &a, &b);
        silu_mul_grad_n(dh + a, g + a, u + a, dg + a, du + a, b - a);
    }
}

/* The same two over bfloat16 buffers (uint16 bits), for bfloat16 training: each value widened
 * to float32, the activation and its gradient computed there and rounded once to the
 * nearest bfloat16 (ties to even; NaN stays NaN), ACT_CHUNK values at a time through the
 * float32 loops. torch's bfloat16 silu and mul take several passes and round between them
 * (benchmarks/moe_vs_dense.py --dtype bfloat16). */
#define ACT_CHUNK 512

/* out[i] = silu(g[i]) * u[i] for i < n, bfloat16 (out may be g). */
void moekit_silu_mul_bf16(const uint16_t *g, const uint16_t *u, uint16_t *out, long n, int nthreads)
{
    #pragma omp parallel num_threads(n < ACT_PARALLEL_MIN ? 1 : nthreads)
    {
        long a, b;
        share(n, 16, &a, &b);
        float gf[ACT_CHUNK], uf[ACT_CHUNK];
        for (long i = a; i < b; i += ACT_CHUNK) {
            long m = b - i < ACT_CHUNK ? b - i : ACT_CHUNK;
            for (long j = 0; j < m; j++) gf[j] = bf16_in(g[i + j]), uf[j] = bf16_in(u[i + j]);
            silu_mul_n(gf, uf, gf, m);
            for (long j = 0; j < m; j++) out[i + j] = bf16_out(gf[j]);
        }
    }
}

/* silu_mul_grad_n over bfloat16 buffers (du may be dh). */
void moekit_silu_mul_backward_bf16(const uint16_t *dh, const uint16_t *g, const uint16_t *u, uint16_t *dg,
                                   uint16_t *du, long n, int nthreads)
{
    #pragma omp parallel num_threads(n < ACT_PARALLEL_MIN ? 1 : nthreads)
    {
        long a, b;
        share(n, 16, &a, &b);
        float hf[ACT_CHUNK], gf[ACT_CHUNK], uf[ACT_CHUNK], dgf[ACT_CHUNK], duf[ACT_CHUNK];
        for (long i = a; i < b; i += ACT_CHUNK) {
            long m = b - i < ACT_CHUNK ? b - i : ACT_CHUNK;
            for (long j = 0; j < m; j++)
                hf[j] = bf16_in(dh[i + j]), gf[j] = bf16_in(g[i + j]), uf[j] = bf16_in(u[i + j]);
            silu_mul_grad_n(hf, gf, uf, dgf, duf, m);
            for (long j = 0; j < m; j++) dg[i + j] = bf16_out(dgf[j]), du[i + j] = bf16_out(duf[j]);
        }
    }
}

/* out[j] += weight * expert(x)[j] for j < N: one SwiGLU expert, (silu(x @ w1) * (x @ w3)) @ w2.
 * w1, w3: [K, F] with row stride ld13 (two tensors, or the halves of a fused one); w2: [F, N]
 * with row stride ld2; buf: 3F floats. Threads split the F hidden columns, then the N outputs. */
static void swiglu_add(const float *x, long K, const float *w1, const float *w3, long ld13, long F,
                       const float *w2, long ld2, long N, float *out, float weight, float *buf, int nthreads)
{
    float *gate = buf, *up = buf + F, *hidden = buf + 2 * F;
    #pragma omp parallel num_threads(nthreads)
    {
        long a, b;
        share(F, 16, &a, &b);
        if (b > a) {
            axpy_rows(w1 + a, K, ld13, b - a, x, gate + a);
            axpy_rows(w3 + a, K, ld13, b - a, x, up + a);
            silu_mul_n(gate + a, up + a, hidden + a, b - a);
        }
        #pragma omp barrier
        share(N, 16, &a, &b);
        for (long j = a; j < b; j += 1024) {
            long m = b - j < 1024 ? b - j : 1024;
            float y[1024];
            axpy_rows(w2 + j, F, ld2, m, hidden, y);
            for (long i = 0; i < m; i++) out[j + i] += weight * y[i];
        }
    }
}

/* Returns 0, or -1 when out of memory (out untouched). */
int moekit_swiglu_add(const float *x, long K, const float *w1, const float *w3, long ld13, long F,
                      const float *w2, long ld2, long N, float *out, float weight, int nthreads)
{
    float *buf = malloc(3 * F * sizeof(float));
    if (!buf) return -1;
    swiglu_add(x, K, w1, w3, ld13, F, w2, ld2, N, out, weight, buf, nthreads);
    free(buf);
    return 0;
}

/* Every SwiGLU expert over its rows of x (sorted by expert, counts[e] rows for expert e):
 * out[i] = (silu(x[i] @ w1_e) * (x[i] @ w3_e)) @ w2_e, all of an expert's rows together, so
 * each weight comes from memory once (the few-rows-per-expert case). x: [rows, K] and
 * out: [rows, N], contiguous; expert e's weights as moekit_moe_token's. Where gate_save and
 * up_save are given ([rows, F], contiguous), the pre-activations x @ w1_e and x @ w3_e are
 * kept there for moekit_swiglu_segments_backward. Threads split the F hidden columns, then
 * the N outputs. Returns 0, or -1 when out of memory. */
int moekit_swiglu_segments(const float *x, long K, const long *counts, long E, const float *w1, const float *w3,
                           long e13, long ld13, long F, const float *w2, long e2, long ld2, long N, float *out,
                           float *gate_save, float *up_save, int nthreads)
{
    long most = 0;
    for (long e = 0; e < E; e++) most = counts[e] > most ? counts[e] : most;
    float *buf = malloc((3 * most * F + 1) * sizeof(float));
    if (!buf) return -1;
    float *hidden = buf + 2 * most * F;
    #pragma omp parallel num_threads(nthreads)
    {
        long row = 0;
        for (long e = 0; e < E; e++) {
            long R = counts[e];
            if (R == 0) continue;
            const float *xr = x + row * K;
            float *gate = gate_save ? gate_save + row * F : buf, *up = up_save ? up_save + row * F : buf + most * F;
            long a, b;
            share(F, 16, &a, &b);
            if (b > a) {
                axpy_rows_many(w1 + e * e13 + a, K, ld13, b - a, xr, K, R, gate + a, F);
                axpy_rows_many(w3 + e * e13 + a, K, ld13, b - a, xr, K, R, up + a, F);
                for (long r = 0; r < R; r++) silu_mul_n(gate + r * F + a, up + r * F + a, hidden + r * F + a, b - a);
            }
            #pragma omp barrier
            share(N, 16, &a, &b);
            if (b > a) axpy_rows_many(w2 + e * e2 + a, F, ld2, b - a, hidden, F, R, out + row * N + a, N);
            #pragma omp barrier /* hidden is rewritten by the next expert */
            row += R;
        }
    }
    free(buf);
    return 0;
}

/* A weight gradient is written once and not read back soon: non-temporal stores skip the
 * read of each cache line a plain store makes first (benchmarks/moe_layer.py). */
#if defined(__AVX512F__)
static inline void put16(float *p, __m512 v, int nt)
{
    if (nt) _mm512_stream_ps(p, v);
    else _mm512_storeu_ps(p, v);
}
#endif

/* This thread's share of p[0, n) set to 0, with non-temporal stores where aligned. */
static void zero_share(float *p, long n)
{
    long a, b;
    share(n, 16, &a, &b);
#if defined(__AVX512F__)
    long i = a;
    for (; i < b && ((uintptr_t)(p + i) & 63); i++) p[i] = 0.0f;
    for (; i + 16 <= b; i += 16) _mm512_stream_ps(p + i, _mm512_setzero_ps());
    for (; i < b; i++) p[i] = 0.0f;
#else
    for (long i = a; i < b; i++) p[i] = 0.0f;
#endif
}

/* One pass over a weight row w[0, n) for rows A_r = A + r * lda (r < R) and coefficients
 * c_r = coef[r * ldc]: out[j] = sum_r c_r * A_r[j] (the row's weight gradient, streamed) and
 * dots[r * ldd] = dot(A_r, w) (or += where accumulate). tmp: n floats of scratch (R > DR). */
#define DR 8
static void dot_outer(const float *w, long n, const float *A, long lda, const float *coef, long ldc, long R,
                      float *dots, long ldd, int accumulate, float *out, float *tmp)
{
#if defined(__AVX512F__)
    int nt = ((uintptr_t)out & 63) == 0;
    for (long r0 = 0; r0 < R; r0 += DR) {
        long rows = R - r0 < DR ? R - r0 : DR;
        int first = r0 == 0, last = r0 + DR >= R;
        const float *a[DR];
        __m512 cf[DR], d[DR];
        for (int i = 0; i < DR; i++) {
            a[i] = A + (r0 + (i < rows ? i : 0)) * lda;
            cf[i] = _mm512_set1_ps(i < rows ? coef[(r0 + i) * ldc] : 0.0f);
            d[i] = _mm512_setzero_ps();
        }
        long j = 0;
        for (; j + 16 <= n; j += 16) {
            __m512 wv = _mm512_loadu_ps(w + j), g = first ? _mm512_setzero_ps() : _mm512_loadu_ps(tmp + j);
            for (int i = 0; i < DR; i++) {
                __m512 av = _mm512_loadu_ps(a[i] + j);
                d[i] = _mm512_fmadd_ps(av, wv, d[i]);
                g = _mm512_fmadd_ps(cf[i], av, g);
            }
            if (last) put16(out + j, g, nt);
            else _mm512_storeu_ps(tmp + j, g);
        }
        if (j < n) {
            __mmask16 m = (__mmask16)((1u << (n - j)) - 1);
            __m512 wv = _mm512_maskz_loadu_ps(m, w + j);
            __m512 g = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m, tmp + j);
            for (int i = 0; i < DR; i++) {
                __m512 av = _mm512_maskz_loadu_ps(m, a[i] + j);
                d[i] = _mm512_fmadd_ps(av, wv, d[i]);
                g = _mm512_fmadd_ps(cf[i], av, g);
            }
            _mm512_mask_storeu_ps(last ? out + j : tmp + j, m, g);
        }
        for (long i = 0; i < rows; i++) {
            float v = _mm512_reduce_add_ps(d[i]);
            dots[(r0 + i) * ldd] = accumulate ? dots[(r0 + i) * ldd] + v : v;
        }
    }
#else
    (void)tmp;
    for (long j = 0; j < n; j++) {
        float g = 0.0f;
        for (long r = 0; r < R; r++) g += coef[r * ldc] * A[r * lda + j];
        out[j] = g;
    }
    for (long r = 0; r < R; r++) {
        float v = 0.0f;
        for (long j = 0; j < n; j++) v += A[r * lda + j] * w[j];
        dots[r * ldd] = accumulate ? dots[r * ldd] + v : v;
    }
#endif
}

/* The backward of moekit_swiglu_segments, given its saved gate and up ([rows, F]) and the
 * output's gradient dy [rows, N]: dx [rows, K] and the weight gradients dw1, dw3 [E, K, F]
 * and dw2 [E, F, N] (contiguous; experts without rows get zeros). Each weight is read once
 * and each gradient written once: for each expert, threads split w2's F rows (dh = dy @
 * w2^T, dw2 = hidden^T dy, then the SwiGLU's derivative), then the K rows of w1 and w3
 * (dx = dgate @ w1^T + dup @ w3^T, dw1 = x^T dgate, dw3 = x^T dup). Returns 0, or -1 when
 * out of memory. */
int moekit_swiglu_segments_backward(const float *x, long K, const long *counts, long E, const float *w1,
                                    const float *w3, long e13, long ld13, long F, const float *w2, long e2, long ld2,
                                    long N, const float *gate_save, const float *up_save, const float *dy, float *dx,
                                    float *dw1, float *dw3, float *dw2, int nthreads)
{
    long most = 0;
    for (long e = 0; e < E; e++) most = counts[e] > most ? counts[e] : most;
    long wide = F > N ? F : N;
    float *buf = malloc((3 * most * F + nthreads * wide + 1) * sizeof(float));
    if (!buf) return -1;
    float *hidden = buf, *dg = buf + most * F, *du = buf + 2 * most * F;
    #pragma omp parallel num_threads(nthreads)
    {
        float *tmp = buf + 3 * most * F + omp_get_thread_num() * wide;
        for (long e = 0; e < E; e++)
            if (counts[e] == 0) {
                zero_share(dw1 + e * K * F, K * F);
                zero_share(dw3 + e * K * F, K * F);
                zero_share(dw2 + e * F * N, F * N);
            }
        long row = 0;
        for (long e = 0; e < E; e++) {
            long R = counts[e];
            if (R == 0) continue;
            const float *gate = gate_save + row * F, *up = up_save + row * F, *xr = x + row * K;
            long a, b;
            share(F, 16, &a, &b);
            for (long r = 0; r < R; r++) silu_mul_n(gate + r * F + a, up + r * F + a, hidden + r * F + a, b - a);
            for (long j = a; j < b; j++) /* dh lands in dg, then becomes the gate's gradient */
                dot_outer(w2 + e * e2 + j * ld2, N, dy + row * N, N, hidden + j, F, R, dg + j, F, 0,
                          dw2 + e * F * N + j * N, tmp);
            for (long r = 0; r < R; r++) {
                float *dh = dg + r * F + a; /* becomes the gate's gradient, in place */
                silu_mul_grad_n(dh, gate + r * F + a, up + r * F + a, dh, du + r * F + a, b - a);
            }
            #pragma omp barrier
            share(K, 16, &a, &b);
            for (long i = a; i < b; i++) {
                dot_outer(w1 + e * e13 + i * ld13, F, dg, F, xr + i, K, R, dx + row * K + i, K, 0,
                          dw1 + e * K * F + i * F, tmp);
                dot_outer(w3 + e * e13 + i * ld13, F, du, F, xr + i, K, R, dx + row * K + i, K, 1,
                          dw3 + e * K * F + i * F, tmp);
            }
            #pragma omp barrier /* dg and du are rewritten by the next expert */
            row += R;
        }
#if defined(__AVX512F__)
        _mm_sfence(); /* the streamed stores are visible before the call returns */
#endif
    }
    free(buf);
    return 0;
}

/* The softmax top-k router of one token (Mixtral): logits = wr @ h + br ([E, K] rows); the k
 * largest logits (ties: lower index); weights = softmax over those k (renormalise) or their
 * softmax probabilities over all E, times scale, written to chosen[k] and chosen_w[k]; where
 * given, the logits and the softmax over all E to logits_out[E] and probs_out[E], and
 * counts_out[E] gets 1 added for each chosen expert. logits: E floats of scratch. Shared by
 * moekit_moe_token and cpu_lowp.c's moekit_moe_token_lowp. */
void moekit_route_token(const float *h, long K, const float *wr, const float *br, long E, int k, int renormalize,
                        float scale, float *logits, long *chosen, float *chosen_w, float *logits_out,
                        float *probs_out, long *counts_out)
{
    for (long e = 0; e < E; e++) {
        const float *w = wr + e * K;
        float s = 0.0f;
        #pragma omp simd reduction(+:s)
        for (long i = 0; i < K; i++) s += w[i] * h[i];
        logits[e] = s + (br ? br[e] : 0.0f);
    }
    float top = -INFINITY;
    for (long e = 0; e < E; e++) top = logits[e] > top ? logits[e] : top;
    float total = 0.0f; /* softmax denominator over all E, for renormalize = 0 */
    for (long e = 0; e < E; e++) total += expf(logits[e] - top);
    if (logits_out)
        for (long e = 0; e < E; e++) logits_out[e] = logits[e];
    if (probs_out)
        for (long e = 0; e < E; e++) probs_out[e] = expf(logits[e] - top) / total;
    float chosen_total = 0.0f;
    moekit_topk_of(logits, E, k, chosen);
    for (int i = 0; i < k; i++) {
        chosen_w[i] = expf(logits[chosen[i]] - top);
        chosen_total += chosen_w[i];
    }
    for (int i = 0; i < k; i++) chosen_w[i] = chosen_w[i] / (renormalize ? chosen_total : total) * scale;
    if (counts_out)
        for (int i = 0; i < k; i++) counts_out[chosen[i]] += 1;
}

/* out[i] = x[i] / sqrt(mean(x^2) + eps) * g[i] (g NULL: a copy of x), for cpu_lowp.c */
void moekit_rmsnorm(const float *x, const float *g, long n, float eps, float *out)
{
    if (g)
        rmsnorm(x, g, n, eps, out);
    else
        for (long i = 0; i < n; i++) out[i] = x[i];
}

/* One token through an MoE feed-forward with a softmax top-k router (Mixtral):
 * h = rmsnorm(x) * g (g NULL: h = x); the router as moekit_route_token's; out += sum of
 * weight * expert(h) (out may be x: the residual, in place). Expert e's weights: w1 + e * e13
 * (and w3), [K, F] with row stride ld13; w2 + e * e2, [F, K] with row stride ld2. Returns 0,
 * or -1 when out of memory. */
int moekit_moe_token(const float *x, float *out, long K, const float *g, float eps, const float *wr,
                     const float *br, long E, int k, int renormalize, float scale, const float *w1,
                     const float *w3, long e13, long ld13, long F, const float *w2, long e2, long ld2, long *chosen,
                     float *chosen_w, float *logits_out, float *probs_out, long *counts_out, int nthreads)
{
    float *h = malloc((K + E + 3 * F) * sizeof(float));
    if (!h) return -1;
    float *logits = h + K, *buf = h + K + E;
    moekit_rmsnorm(x, g, K, eps, h);
    moekit_route_token(h, K, wr, br, E, k, renormalize, scale, logits, chosen, chosen_w, logits_out, probs_out,
                       counts_out);
    for (int i = 0; i < k; i++)
        swiglu_add(h, K, w1 + chosen[i] * e13, w3 + chosen[i] * e13, ld13, F, w2 + chosen[i] * e2, ld2, K, out,
                   chosen_w[i], buf, nthreads);
    free(h);
    return 0;
}

/* v[hd] rotated by RoPE in the half-split layout: (a, b) -> (a cos - b sin, b cos + a sin) */
static void rope(float *v, long hd, const float *cos, const float *sin)
{
    long half = hd / 2;
    for (long i = 0; i < half; i++) {
        float a = v[i], b = v[i + half];
        v[i] = a * cos[i] - b * sin[i];
        v[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

/* The middle of one token's attention (batch 1), between its two products: q and k of
 * qkv [(H + 2 Hkv) hd] rotated by RoPE (cos, sin: [hd] of this position); k and v written at
 * row `pos` of the layer's caches kc, vc ([Hkv, rows, hd], head stride hs, row stride hd);
 * each query head attends to kv head h / (H / Hkv) over cache rows [start, pos] (softmax of
 * q.k / sqrt(hd)) into y [H hd]. scores: H (pos + 1 - start) floats of scratch. Shared by
 * moekit_attention_token and cpu_lowp.c's moekit_attention_token_lowp. */
void moekit_attend_token(float *qkv, float *y, float *scores, long H, long Hkv, long hd, const float *cos,
                         const float *sin, float *kc, float *vc, long hs, long pos, long start, int nthreads)
{
    long L = pos + 1 - start;
    for (long h = 0; h < H + Hkv; h++) rope(qkv + h * hd, hd, cos, sin);
    for (long h = 0; h < Hkv; h++) {
        float *k = qkv + (H + h) * hd, *v = qkv + (H + Hkv + h) * hd;
        for (long i = 0; i < hd; i++) kc[h * hs + pos * hd + i] = k[i], vc[h * hs + pos * hd + i] = v[i];
    }
    float scale = 1.0f / sqrtf((float)hd);
    long group = H / Hkv;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long h = 0; h < H; h++) {
        const float *q = qkv + h * hd, *keys = kc + (h / group) * hs, *vals = vc + (h / group) * hs;
        float *s = scores + h * L, *out = y + h * hd, top = -INFINITY, total = 0.0f;
        for (long t = 0; t < L; t++) {
            const float *k = keys + (start + t) * hd;
            float dot = 0.0f;
            #pragma omp simd reduction(+:dot)
            for (long i = 0; i < hd; i++) dot += q[i] * k[i];
            s[t] = dot * scale;
            top = s[t] > top ? s[t] : top;
        }
        for (long t = 0; t < L; t++) s[t] = expf(s[t] - top), total += s[t];
        for (long i = 0; i < hd; i++) out[i] = 0.0f;
        for (long t = 0; t < L; t++) {
            const float *v = vals + (start + t) * hd;
            float p = s[t] / total;
            #pragma omp simd
            for (long i = 0; i < hd; i++) out[i] += p * v[i];
        }
    }
}

/* One token's self-attention (batch 1) added into the residual x[d], in place:
 * qkv = wqkv @ (rmsnorm(x) * g) + bqkv, [(H + 2 Hkv) hd] (wqkv rows contiguous, [n, d]);
 * the middle as moekit_attend_token's; x += wo @ y + bo (wo: [d, H hd] with row stride ldo).
 * Returns 0, or -1 when out of memory. */
int moekit_attention_token(float *x, long d, const float *g, float eps, const float *wqkv, const float *bqkv,
                           long H, long Hkv, long hd, const float *cos, const float *sin, float *kc, float *vc,
                           long hs, long pos, long start, const float *wo, long ldo, const float *bo, int nthreads)
{
    long n = (H + 2 * Hkv) * hd, L = pos + 1 - start;
    float *qkv = malloc((n + H * hd + H * L) * sizeof(float));
    if (!qkv) return -1;
    float *y = qkv + n, *scores = y + H * hd;
    if (moekit_rows(wqkv, n, d, d, x, g, eps, qkv, 1.0f, bqkv, NULL, nthreads) != 0) {
        free(qkv);
        return -1;
    }
    moekit_attend_token(qkv, y, scores, H, Hkv, hd, cos, sin, kc, vc, hs, pos, start, nthreads);
    moekit_rows(wo, d, H * hd, ldo, y, NULL, 0.0f, x, 1.0f, bo, x, nthreads); /* no norm: cannot fail */
    free(qkv);
    return 0;
}
