/* moekit CPU kernels: routing, and moving rows between token order and expert order (float32).
 *
 * The MoE layer's fast path gathers each token's row once per chosen expert into expert
 * order, runs the experts, and adds the weighted outputs back to their tokens. In torch ops
 * the add is an index_add_ (a scatter into a zeroed buffer) and its backward an
 * index_select, a multiply and a row sum; here every one of those is one pass that reads
 * each row once, parallel over the rows written (no two threads write a row, so no atomics
 * and no zero-fill). Exported: moekit_gather_rows (a weighted sum of gathered rows: the
 * combine, the backward of the gather, the gather itself), moekit_combine_backward (the
 * gradients of the combine for the expert outputs and the router weights), and the softmax
 * top-k router with its backward (moekit_topk_softmax, moekit_topk_softmax_backward: over a
 * handful of experts torch's row-wise softmax and topk cost far more than their arithmetic).
 * Rows are contiguous. Built with cpu_gemv.c by moekit/kernels/library.py.
 */
#include <math.h>
#include <string.h>
#include <omp.h>

/* Below this many floats written, one thread: a parallel region costs a few microseconds. */
#define PARALLEL_MIN 16384
/* Rows per share a thread takes at a time: dynamic, so that when the OS deschedules one
 * thread (other programs on the machine) the others take its rows rather than wait for it
 * at the region's end (benchmarks/moe_layer.py --neighbours). */
#define CHUNK 64

/* dst[i] = sum over j < k with idx[i k + j] >= 0 of w[i k + j] * src[idx[i k + j]] (w NULL: 1),
 * for i < n; a row with no source is zero. */
int moekit_gather_rows(const float *src, long d, const long *idx, const float *w, long k, long n, float *dst,
                       int threads)
{
#pragma omp parallel for schedule(dynamic, CHUNK) num_threads(threads) if (n * d >= PARALLEL_MIN)
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
#pragma omp parallel for schedule(dynamic, CHUNK) num_threads(threads) if (n * d >= PARALLEL_MIN)
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
 * where renormalize. One pass per row, parallel over rows. */
int moekit_topk_softmax(const float *logits, long T, long E, int k, int renormalize, float scale, float *probs,
                        long *idx, float *w, int threads)
{
#pragma omp parallel for schedule(dynamic, CHUNK) num_threads(threads) if (T * E >= PARALLEL_MIN)
    for (long t = 0; t < T; t++) {
        const float *l = logits + t * E;
        float *p = probs + t * E, top = -INFINITY, total = 0.0f, chosen = 0.0f;
        long *ix = idx + t * k;
        float *wt = w + t * k;
        for (long e = 0; e < E; e++) top = l[e] > top ? l[e] : top;
        for (long e = 0; e < E; e++) total += (p[e] = expf(l[e] - top));
        for (long e = 0; e < E; e++) p[e] /= total;
        moekit_topk_of(p, E, k, ix);
        for (int i = 0; i < k; i++) chosen += p[ix[i]];
        for (int i = 0; i < k; i++) wt[i] = (renormalize ? p[ix[i]] / chosen : p[ix[i]]) * scale;
    }
    return 0;
}

/* Its backward: dlogits = softmax backward of g, g = dprobs (NULL: 0) plus the weights'
 * gradient dw (NULL: 0) taken back through the renormalisation onto the chosen entries. */
int moekit_topk_softmax_backward(const float *probs, const long *idx, const float *w, const float *dprobs,
                                 const float *dw, long T, long E, int k, int renormalize, float scale, float *dlogits,
                                 int threads)
{
#pragma omp parallel for schedule(dynamic, CHUNK) num_threads(threads) if (T * E >= PARALLEL_MIN)
    for (long t = 0; t < T; t++) {
        const float *p = probs + t * E;
        float *g = dlogits + t * E; /* g first, then overwritten by dlogits */
        for (long e = 0; e < E; e++) g[e] = dprobs ? dprobs[t * E + e] : 0.0f;
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
        float dot = 0.0f;
        for (long e = 0; e < E; e++) dot += g[e] * p[e];
        for (long e = 0; e < E; e++) g[e] = p[e] * (g[e] - dot);
    }
    return 0;
}
