/* moekit CPU kernels: routing, and moving rows between token order and expert order.
 *
 * The MoE layer's fast path gathers each token's row once per chosen expert into expert
 * order, runs the experts, and adds the weighted outputs back to their tokens. In torch ops
 * the add is an index_add_ (a scatter into a zeroed buffer) and its backward an
 * index_select, a multiply and a row sum; here every one of those is one pass that reads
 * each row once, parallel over the rows written (no two threads write a row, so no atomics
 * and no zero-fill). Exported: moekit_sort_slots (the plan: slots sorted by expert, a
 * counting sort), moekit_gather_rows (a weighted sum of gathered rows: the combine, the
 * backward of the gather, the gather itself), moekit_combine_backward (the gradients of the
 * combine for the expert outputs and the router weights), both float32 or bfloat16 on the
 * experts' side, and the softmax
 * top-k router with its backward (moekit_topk_softmax, moekit_topk_softmax_backward: over a
 * handful of experts torch's row-wise softmax and topk cost far more than their arithmetic).
 * Rows are contiguous. Built with cpu_gemv.c by moekit/kernels/library.py.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#include "cpu_bf16.h"
#include "cpu_vmath.h"

/* Below this many floats written, one thread: a parallel region costs a few microseconds. */
#define PARALLEL_MIN 16384
/* Rows per share a thread takes at a time: dynamic, so that when the OS deschedules one
 * thread (other programs on the machine) the others take its rows rather than wait for it
 * at the region's end (benchmarks/moe_layer.py --neighbours). */
#define CHUNK 64

/* Columns a row is summed in at a time when a side is bfloat16 (a float32 buffer on the stack). */
#define COLS 256

/* acc[c] (=, or += where add) a * row[c] for c < m, the row float32 or bfloat16 (bf). */
static inline void axpy_row(float *acc, const void *row, int bf, long m, float a, int add)
{
    if (bf) {
        const uint16_t *r = row;
        if (add) {
#pragma omp simd
            for (long c = 0; c < m; c++) acc[c] += a * bf16_in(r[c]);
        } else {
#pragma omp simd
            for (long c = 0; c < m; c++) acc[c] = a * bf16_in(r[c]);
        }
    } else {
        const float *r = row;
        if (add) {
#pragma omp simd
            for (long c = 0; c < m; c++) acc[c] += a * r[c];
        } else {
#pragma omp simd
            for (long c = 0; c < m; c++) acc[c] = a * r[c];
        }
    }
}

/* dst[i] = sum over j < k with idx[i k + j] >= 0 of w[i k + j] * src[idx[i k + j]] (w NULL: 1),
 * for i < n; a row with no source is zero. src and dst are float32, or bfloat16 where src_bf16
 * / dst_bf16 (uint16 bits; each row summed in float32 and rounded once): bfloat16 training
 * gathers float32 tokens straight into the experts' bfloat16 rows and combines their
 * bfloat16 outputs, with no cast pass of its own. */
int moekit_gather_rows(const void *src, int src_bf16, long d, const long *idx, const float *w, long k, long n,
                       void *dst, int dst_bf16, int threads)
{
    size_t src_row = (size_t)d * (src_bf16 ? 2 : 4);
#pragma omp parallel for schedule(dynamic, CHUNK) num_threads(threads) if (n * d >= PARALLEL_MIN)
    for (long i = 0; i < n; i++) {
        float buf[COLS];
        for (long c0 = 0; c0 < d; c0 += dst_bf16 ? COLS : d) {
            long m = dst_bf16 && d - c0 > COLS ? COLS : d - c0;
            float *acc = dst_bf16 ? buf : (float *)dst + i * d; /* float32 rows: summed in place */
            int written = 0;
            for (long j = 0; j < k; j++) {
                long s = idx[i * k + j];
                if (s < 0)
                    continue;
                const char *r = (const char *)src + s * src_row + c0 * (src_bf16 ? 2 : 4);
                axpy_row(acc, r, src_bf16, m, w ? w[i * k + j] : 1.0f, written);
                written = 1;
            }
            if (!written)
                memset(acc, 0, (size_t)m * sizeof(float));
            if (dst_bf16) {
                uint16_t *o = (uint16_t *)dst + i * d + c0;
#pragma omp simd
                for (long c = 0; c < m; c++) o[c] = bf16_out(acc[c]);
            }
        }
    }
    return 0;
}

/* The backward of out[tok[i]] += w[i] * y[i] (i < n, expert order): dy[i] = w[i] * dout[tok[i]]
 * and dw[i] = dot(dout[tok[i]], y[i]); either output may be NULL (not needed). A row with
 * tok[i] < 0 (padding between experts' segments) gets dy 0 and dw 0. y and dy are float32, or
 * bfloat16 where y_bf16 (dy rounded once); dout float32, or bfloat16 where dout_bf16. */
int moekit_combine_backward(const void *dout, int dout_bf16, const void *y, int y_bf16, long d, const long *tok,
                            const float *w, long n, void *dy, float *dw, int threads)
{
    size_t g_row = (size_t)d * (dout_bf16 ? 2 : 4), y_row = (size_t)d * (y_bf16 ? 2 : 4);
#pragma omp parallel for schedule(dynamic, CHUNK) num_threads(threads) if (n * d >= PARALLEL_MIN)
    for (long i = 0; i < n; i++) {
        if (tok[i] < 0) { /* a padding row: no token, no gradient (zero bits: 0 in either dtype) */
            if (dy)
                memset((char *)dy + i * y_row, 0, y_row);
            if (dw)
                dw[i] = 0.0f;
            continue;
        }
        float g[COLS], r[COLS], dot = 0.0f;
        for (long c0 = 0; c0 < d; c0 += COLS) {
            long m = d - c0 > COLS ? COLS : d - c0;
            axpy_row(g, (const char *)dout + tok[i] * g_row + c0 * (dout_bf16 ? 2 : 4), dout_bf16, m, 1.0f, 0);
            if (dy) {
                float a = w[i];
                if (y_bf16) {
                    uint16_t *o = (uint16_t *)dy + i * d + c0;
#pragma omp simd
                    for (long c = 0; c < m; c++) o[c] = bf16_out(a * g[c]);
                } else {
                    float *o = (float *)dy + i * d + c0;
#pragma omp simd
                    for (long c = 0; c < m; c++) o[c] = a * g[c];
                }
            }
            if (dw) {
                axpy_row(r, (const char *)y + i * y_row + c0 * (y_bf16 ? 2 : 4), y_bf16, m, 1.0f, 0);
#pragma omp simd reduction(+ : dot)
                for (long c = 0; c < m; c++) dot += g[c] * r[c];
            }
        }
        if (dw)
            dw[i] = dot;
    }
    return 0;
}

/* Counting sort of the router's slots by expert, each expert's rows starting on a multiple
 * of `multiple` (the rows between: padding; 1: none): the dispatch's plan in one pass where
 * a stable argsort and a dozen small torch ops took longer than the gather itself.
 * expert[S]: each slot's expert, E where the slot does not exist (dropped, masked).
 * Out: counts[E] the slots each expert got; slot_idx[N], token_idx[N] (slot / k) and rows[N]
 * (its row in the padded layout) in expert order (slot order within an expert; N the slots
 * that exist); pos[S] the padded row of each slot (-1: none); row_token[P], row_slot[P]: the
 * token and slot of each padded row (-1 for padding), P = sum of counts rounded up. Returns P. */
long moekit_sort_slots(const long *expert, long S, long E, long k, long multiple, long *counts, long *slot_idx,
                       long *token_idx, long *rows, long *pos, long *row_token, long *row_slot)
{
    long *start = malloc((size_t)(3 * E + 1) * sizeof(long)), *first = start + E, *fill = first + E;
    if (!start)
        return -1;
    for (long e = 0; e < E; e++) counts[e] = fill[e] = 0;
    for (long s = 0; s < S; s++)
        if (expert[s] < E)
            counts[expert[s]]++;
    long sorted = 0, padded = 0;
    for (long e = 0; e < E; e++) {
        start[e] = sorted, first[e] = padded;
        sorted += counts[e];
        padded += (counts[e] + multiple - 1) / multiple * multiple;
    }
    for (long r = 0; r < padded; r++) row_token[r] = row_slot[r] = -1;
    for (long s = 0; s < S; s++) {
        long e = expert[s];
        if (e >= E) {
            pos[s] = -1;
            continue;
        }
        long j = fill[e]++, i = start[e] + j, row = first[e] + j;
        slot_idx[i] = s, token_idx[i] = s / k, rows[i] = row, pos[s] = row;
        row_token[row] = s / k, row_slot[row] = s;
    }
    free(start);
    return padded;
}

/* ix[0..k) the k largest of v[0..E), largest first, ties to the lower index, in one pass:
 * each value past the k-th best so far is inserted in place. k <= E. The choice of a top-k
 * router; shared with moekit_moe_token (cpu_gemv.c). */
void moekit_topk_of(const float *v, long E, int k, long *ix)
{
    int n = 0;
    for (long e = 0; e < E; e++) {
        float x = v[e];
        if (n == k && !(x > v[ix[k - 1]]))
            continue;
        int pos = n < k ? n : k - 1;
        for (; pos > 0 && x > v[ix[pos - 1]]; pos--) ix[pos] = ix[pos - 1];
        ix[pos] = e;
        n += n < k;
    }
}

/* The softmax top-k router over rows of logits [T, E]: probs = softmax of each row; idx[k] the
 * k largest (ties: lower index); w = their probabilities times scale, divided by their sum
 * where renormalize; lse (where not NULL) each row's logsumexp, which the z-loss squares. One
 * pass per row, parallel over rows. Where psum is given, also the balancing loss's sums over
 * the rows: psum[E] of the probabilities and load[E] of the slots each expert got, in row
 * order (the same sums every call). */
int moekit_topk_softmax(const float *logits, long T, long E, int k, int renormalize, float scale, float *probs,
                        long *idx, float *w, float *lse, float *psum, float *load, int threads)
{
#pragma omp parallel for schedule(dynamic, CHUNK) num_threads(threads) if (T * E >= PARALLEL_MIN)
    for (long t = 0; t < T; t++) {
        const float *l = logits + t * E;
        float *p = probs + t * E, top = -INFINITY, total = 0.0f, chosen = 0.0f;
        long *ix = idx + t * k;
        float *wt = w + t * k;
        int nan = 0;
        for (long e = 0; e < E; e++) {
            top = l[e] > top ? l[e] : top;
            nan |= l[e] != l[e];
        }
        long e = 0;
#if defined(__AVX512F__)
        /* exp16 in place of expf, 16 experts a call (its clamps would turn a NaN into a
         * number: a row with a NaN takes expf, and its probabilities stay NaN) */
        for (; !nan && e < E; e += 16) {
            __mmask16 m = E - e >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (E - e)) - 1);
            __m512 v = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, l + e), _mm512_set1_ps(top)));
            _mm512_mask_storeu_ps(p + e, m, v);
            total += _mm512_mask_reduce_add_ps(m, v);
        }
#endif
        for (; e < E; e++) total += (p[e] = expf(l[e] - top));
        for (e = 0; e < E; e++) p[e] /= total;
        if (lse)
            lse[t] = top + logf(total);
        moekit_topk_of(p, E, k, ix);
        for (int i = 0; i < k; i++) chosen += p[ix[i]];
        for (int i = 0; i < k; i++) wt[i] = (renormalize ? p[ix[i]] / chosen : p[ix[i]]) * scale;
    }
    if (psum) {
        memset(psum, 0, (size_t)E * sizeof(float));
        memset(load, 0, (size_t)E * sizeof(float));
        for (long t = 0; t < T; t++) {
            for (long e = 0; e < E; e++) psum[e] += probs[t * E + e];
            for (int i = 0; i < k; i++) load[idx[t * k + i]] += 1.0f;
        }
    }
    return 0;
}

/* Its backward: dlogits = softmax backward of g, g = dprobs (NULL: 0) plus the weights'
 * gradient dw (NULL: 0) taken back through the renormalisation onto the chosen entries, plus
 * dlse[t] probs[t] (the logsumexp's gradient; dlse NULL: 0); dpsum[E] (the probability sums'
 * gradient, NULL: 0) adds to every row's dprobs. */
int moekit_topk_softmax_backward(const float *probs, const long *idx, const float *w, const float *dprobs,
                                 const float *dw, const float *dlse, const float *dpsum, long T, long E, int k,
                                 int renormalize, float scale, float *dlogits, int threads)
{
#pragma omp parallel for schedule(dynamic, CHUNK) num_threads(threads) if (T * E >= PARALLEL_MIN)
    for (long t = 0; t < T; t++) {
        const float *p = probs + t * E;
        float *g = dlogits + t * E; /* g first, then overwritten by dlogits */
        for (long e = 0; e < E; e++) g[e] = (dprobs ? dprobs[t * E + e] : 0.0f) + (dpsum ? dpsum[e] : 0.0f);
        if (dw) {
            const long *ix = idx + t * k;
            const float *dwt = dw + t * k, *wt = w + t * k;
            if (renormalize) {
                float chosen = 0.0f, dot = 0.0f;
                for (int i = 0; i < k; i++) chosen += p[ix[i]], dot += dwt[i] * wt[i];
                for (int i = 0; i < k; i++) g[ix[i]] += (scale * dwt[i] - dot) / chosen;
            } else {
                for (int i = 0; i < k; i++) g[ix[i]] += scale * dwt[i];
            }
        }
        float dot = dlse ? -dlse[t] : 0.0f; /* d lse / d logits = probs: + dlse p, folded into the dot */
        for (long e = 0; e < E; e++) dot += g[e] * p[e];
        for (long e = 0; e < E; e++) g[e] = p[e] * (g[e] - dot);
    }
    return 0;
}
