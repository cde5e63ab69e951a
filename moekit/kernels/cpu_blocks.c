/* moekit CPU kernels: every SwiGLU expert over its rows as blocked matrix products, forward and
 * backward (float32), the experts shared among threads.
 *
 * With many small experts (64 experts top-8, d_ff 224) each expert's products are small
 * ([32, 512] @ [512, 224] at 256 tokens); a BLAS call splits each of them across the threads
 * and pays a parallel region, its barrier and its packing per product, and reaches half its
 * large-matrix speed. Here each product runs on one thread, from a packed micro-kernel, and
 * the threads take experts (and blocks of a long expert's rows) from a shared list in one
 * parallel region per pass: no barrier between products, no thread waiting for another's
 * product, and a thread that the OS deschedules (a busy machine) only takes fewer blocks.
 * benchmarks/moe_layer.py measures it against the dense FFN and the other paths.
 *
 * Exported: moekit_swiglu_blocks (forward; keeps the gate and up pre-activations when asked)
 * and moekit_swiglu_blocks_backward, with the arguments of moekit_swiglu_segments and
 * moekit_swiglu_segments_backward (cpu_gemv.c), whose callers pick one or the other. Built
 * with the other kernels by moekit/kernels/library.py; weights with unit stride in a row.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#if defined(__AVX__)
#include <immintrin.h>
#endif

void moekit_silu_mul_rows(const float *g, const float *u, float *out, long n);                       /* cpu_gemv.c */
void moekit_silu_mul_grad_rows(const float *dh, const float *g, const float *u, float *dg, float *du, long n);

/* The micro-kernel's vectors: GCC vector extensions, as wide as the build's widest float
 * registers (AVX-512 16, AVX 8, else 4, which the compiler lowers to what the CPU has). */
#if defined(__AVX512F__)
#define VW 16
#elif defined(__AVX__)
#define VW 8
#else
#define VW 4
#endif
typedef float vf __attribute__((vector_size(VW * sizeof(float))));
/* rows of C per micro-tile: MR x 2 vector accumulators, 2 of B and a broadcast of A fit the
 * registers (AVX-512: 32, else 16); 12 rows halve the loads of B per multiply-add */
#if VW == 16
#define MR 12
#else
#define MR 6
#endif
#define NR (2 * VW) /* columns of C per micro-tile */
#define KC 256      /* depth of one packed panel: MR x KC of A in L1, KC x NC of B in L2 */
#define KCW 512     /* the weight gradients' depth (their rows per expert) in one panel: each written once */
#define MC 192      /* rows of A packed at once (MC x KC in L2; a multiple of MR) */
#define NC 512      /* columns of B packed at once (KC x NC in L2; a multiple of NR) */
#define ROWS 192    /* rows of one expert per task in the forward */
#define BROWS 512   /* ... in the backward's row pass, whose tasks pack three transposed weights each */
#define WROWS 128   /* rows of a weight gradient per task */
#define STREAM 2    /* gemm's acc: write C once, non-temporally */
#define AT_ROWS 64  /* up to this many rows of an expert, the backward reads its weights in place (gemm_at) */
#define DIRECT_ROWS 64          /* up to this many rows of A, gemm reads a small B in place ... */
#define DIRECT_BYTES (1L << 20) /* ... of up to this many bytes */

static inline vf load(const float *p)
{
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store(float *p, vf v) { memcpy(p, &v, sizeof v); }

/* A weight gradient is written once and not read soon: where aligned, a non-temporal store
 * skips the read of the cache line that a plain store makes first (as cpu_gemv.c's put16). */
static inline void store_nt(float *p, vf v)
{
#if defined(__AVX512F__)
    if (((uintptr_t)p & 63) == 0) {
        _mm512_stream_ps(p, (__m512)v);
        return;
    }
#elif defined(__AVX__)
    if (((uintptr_t)p & 31) == 0) {
        _mm256_stream_ps(p, (__m256)v);
        return;
    }
#endif
    store(p, v);
}

/* after a task's non-temporal stores: ordered before the barrier that hands them over */
static inline void fence(void)
{
#if defined(__AVX__)
    _mm_sfence();
#endif
}

/* r[0..VW) as the rows of a VW x VW block, transposed in place: at each step h the
 * off-diagonal h x h blocks of every 2h x 2h block swap (log2 VW steps of shuffles). */
#if defined(__clang__) /* no __builtin_shuffle: the scalar loop transposes */
#define VEC_TRANSPOSE 0
static inline void transpose(vf *r) { (void)r; }
#else
#define VEC_TRANSPOSE 1
typedef int vi __attribute__((vector_size(VW * sizeof(int))));
static inline __attribute__((always_inline)) void transpose(vf *r)
{
#pragma GCC unroll 4
    for (int h = VW / 2; h >= 1; h /= 2) {
        vi lo, hi;
        for (int k = 0; k < VW; k++) {
            lo[k] = k & h ? VW + k - h : k;
            hi[k] = k & h ? VW + k : k + h;
        }
#pragma GCC unroll 16
        for (int i = 0; i < VW; i++)
            if (!(i & h)) {
                vf a = r[i], b = r[i + h];
                r[i] = __builtin_shuffle(a, b, lo);
                r[i + h] = __builtin_shuffle(a, b, hi);
            }
    }
}
#endif

/* B's KC x n panel as NR-column strips (zero-padded): element (p, j) of B at B[p rbs + j cbs].
 * A transposed weight (rbs 1) is read along its rows, NR of them at once. */
static void pack_b(const float *B, long rbs, long cbs, long kc, long n, float *bp)
{
    if (cbs == 1) { /* each row of B read once, front to back, into the strips' rows */
        long whole = n / NR * NR;
        for (long p = 0; p < kc; p++) {
            const float *src = B + p * rbs;
            for (long j0 = 0; j0 < whole; j0 += NR) {
                float *dst = bp + j0 * kc + p * NR;
                store(dst, load(src + j0));
                store(dst + VW, load(src + j0 + VW));
            }
            float *dst = bp + whole * kc + p * NR; /* the last, partial strip */
            for (long j = whole; j < n; j++) dst[j - whole] = src[j];
            for (long j = n; whole < n && j < whole + NR; j++) dst[j - whole] = 0;
        }
        return;
    }
    for (long j0 = 0; j0 < n; j0 += NR, bp += NR * kc) {
        long nr = n - j0 < NR ? n - j0 : NR;
        if (rbs == 1) { /* nr rows of B^T, each read along: VW x VW blocks transposed in registers */
            long p = 0;
            for (; VEC_TRANSPOSE && p + VW <= kc; p += VW)
                for (long h = 0; h < NR; h += VW) {
                    vf r[VW];
                    for (long j = 0; j < VW; j++) r[j] = h + j < nr ? load(B + (j0 + h + j) * cbs + p) : (vf){0};
                    transpose(r);
                    for (long q = 0; q < VW; q++) store(bp + (p + q) * NR + h, r[q]);
                }
            for (; p < kc; p++)
                for (long j = 0; j < NR; j++) bp[p * NR + j] = j < nr ? B[(j0 + j) * cbs + p] : 0;
            continue;
        }
        for (long p = 0; p < kc; p++) {
            const float *src = B + p * rbs + j0 * cbs;
            long j = 0;
            for (; j < nr; j++) bp[p * NR + j] = src[j * cbs];
            for (; j < NR; j++) bp[p * NR + j] = 0;
        }
    }
}

/* A's m x kc block as MR-row strips (zero-padded), column by column: element (i, p) of A at
 * A[i ras + p cas] */
static void pack_a(const float *A, long ras, long cas, long m, long kc, float *ap)
{
    for (long i0 = 0; i0 < m; i0 += MR, ap += MR * kc) {
        long mr = m - i0 < MR ? m - i0 : MR;
        for (long p = 0; p < kc; p++) {
            long i = 0;
            for (; i < mr; i++) ap[p * MR + i] = A[(i0 + i) * ras + p * cas];
            for (; i < MR; i++) ap[p * MR + i] = 0;
        }
    }
}

/* The next operand's lines, fetched into L2 a few per micro-kernel iteration while this
 * product runs, so that its packing or reading does not wait on memory (many small experts:
 * each expert's weights are read from memory once per pass; benchmarks/moe_layer.py). */
typedef struct {
    const char *at;
    long lines, share;
} prefetch;

static prefetch prefetch_over(const void *next, long bytes, long calls)
{
    long lines = next ? (bytes + 63) / 64 : 0;
    return (prefetch){next, lines, calls ? (lines + calls - 1) / calls : 0};
}

/* this micro-kernel call's share of the lines: returns their count, *at the first */
static inline long prefetch_take(prefetch *pf, const char **at)
{
    long n = pf->lines < pf->share ? pf->lines : pf->share;
    *at = pf->at;
    if (n) {
        pf->at += 64 * n;
        pf->lines -= n;
    }
    return n;
}

#include "cpu_tiles.h"

/* C[rows, nr] (row stride ldc) = (acc 1 ? C : 0) + a-strip @ b-strip over kc; b's rows ldb apart;
 * acc STREAM: C = the product, stored non-temporally; pf: pfn lines of the next operand to
 * fetch (see prefetch). Inlined per row count (BY_ROWS). The B line 8 rows ahead is fetched
 * early. */
static inline __attribute__((always_inline)) void micro_rows(const int rows, long kc, const float *a, const float *b,
                                                             long ldb, float *c, long ldc, long nr, int acc,
                                                             const char *pf, long pfn)
{
    long per = (pfn + kc - 1) / kc;
    vf c0[MR], c1[MR];
    for (int i = 0; i < rows; i++) c0[i] = c1[i] = (vf){0};
    for (long p = 0; p < kc; p++, a += MR, b += ldb) {
        vf b0 = load(b), b1 = load(b + VW);
        __builtin_prefetch(b + 8 * ldb, 0, 3);
        for (long q = p * per; q < (p + 1) * per && q < pfn; q++) __builtin_prefetch(pf + 64 * q, 0, 2);
#pragma GCC unroll 12
        for (int i = 0; i < rows; i++) {
            c0[i] += a[i] * b0;
            c1[i] += a[i] * b1;
        }
    }
    if (nr == NR && acc == STREAM) {
        for (int i = 0; i < rows; i++) {
            store_nt(c + i * ldc, c0[i]);
            store_nt(c + i * ldc + VW, c1[i]);
        }
        return;
    }
    if (nr == NR) {
        for (int i = 0; i < rows; i++) {
            float *ci = c + i * ldc;
            store(ci, acc == 1 ? c0[i] + load(ci) : c0[i]);
            store(ci + VW, acc == 1 ? c1[i] + load(ci + VW) : c1[i]);
        }
        return;
    }
    float t[NR];
    for (int i = 0; i < rows; i++) {
        float *ci = c + i * ldc;
        store(t, c0[i]);
        store(t + VW, c1[i]);
        for (long j = 0; j < nr; j++) ci[j] = acc == 1 ? ci[j] + t[j] : t[j];
    }
}

static void micro(long kc, const float *a, const float *b, long ldb, float *c, long ldc, long mr, long nr, int acc,
                  const char *pf, long pfn)
{
    BY_ROWS(mr, micro_rows, kc, a, b, ldb, c, ldc, nr, acc, pf, pfn);
}

/* C[rows, nr] as micro_rows, with A read in place (row i at a + i lda, unit stride along k)
 * and C stored transposed (C(i, j) at c[j ldc + i]): for a weight as A, never copied. */
static inline __attribute__((always_inline)) void micro_at_rows(const int rows, long kc, const float *a, long lda,
                                                                const float *b, float *c, long ldc, long nr, int acc,
                                                                const char *pf, long pfn)
{
    long per = (pfn + kc - 1) / kc;
    vf c0[MR], c1[MR];
    const float *ar[MR];
    for (int i = 0; i < rows; i++) {
        c0[i] = c1[i] = (vf){0};
        ar[i] = a + i * lda;
    }
    for (long p = 0; p < kc; p++, b += NR) {
        vf b0 = load(b), b1 = load(b + VW);
        for (long q = p * per; q < (p + 1) * per && q < pfn; q++) __builtin_prefetch(pf + 64 * q, 0, 2);
#pragma GCC unroll 12
        for (int i = 0; i < rows; i++) {
            c0[i] += ar[i][p] * b0;
            c1[i] += ar[i][p] * b1;
        }
    }
#if VEC_TRANSPOSE && MR <= VW /* C's rows are contiguous along i: VW x VW blocks transposed in registers */
    for (int half = 0; half < 2; half++) {
        vf r[VW];
        for (int i = 0; i < VW; i++) r[i] = i < rows ? (half ? c1[i] : c0[i]) : (vf){0};
        transpose(r);
        for (long j = half * VW; j < nr && j < (half + 1) * VW; j++) {
            float t[VW], *cj = c + j * ldc;
            store(t, r[j - half * VW]);
            for (int i = 0; i < rows; i++) cj[i] = acc ? cj[i] + t[i] : t[i];
        }
    }
#else
    float t[NR];
    for (int i = 0; i < rows; i++) {
        store(t, c0[i]);
        store(t + VW, c1[i]);
        for (long j = 0; j < nr; j++) c[j * ldc + i] = acc ? c[j * ldc + i] + t[j] : t[j];
    }
#endif
}

static void micro_at(long kc, const float *a, long lda, const float *b, float *c, long ldc, long mr, long nr, int acc,
                     const char *pf, long pfn)
{
    BY_ROWS(mr, micro_at_rows, kc, a, lda, b, c, ldc, nr, acc, pf, pfn);
}

/* One thread: C^T[n, m] (row stride ldc) = (acc ? C^T : 0) + (A[m, k] @ Bt^T[k, n])^T, with
 * A's rows lda apart and Bt [n, k] with rows ldbt apart, both unit stride along k: the
 * backward's products with a weight on the left (dh^T = w2 @ dy^T, dx^T = w1 @ dgate^T) when
 * an expert has few rows: the weight, the large operand, is read once in place where the
 * other form would copy its transpose into a packed panel. n up to AT_ROWS (Bt packed in
 * one KC x AT_ROWS panel: gemm_buffer(AT_ROWS, KC) floats of buf). */
static void gemm_at(long m, long n, long k, const float *A, long lda, const float *Bt, long ldbt, float *C, long ldc,
                    int acc, float *buf, const void *next, long next_bytes)
{
    prefetch pf = prefetch_over(next, next_bytes, (k + KC - 1) / KC * ((m + MR - 1) / MR) * ((n + NR - 1) / NR));
    const char *at;
    for (long p0 = 0; p0 < k; p0 += KC) {
        long kc = k - p0 < KC ? k - p0 : KC;
        pack_b(Bt + p0, 1, ldbt, kc, n, buf);
        for (long i0 = 0; i0 < m; i0 += MR)
            for (long j0 = 0; j0 < n; j0 += NR) {
                long pfn = prefetch_take(&pf, &at);
                micro_at(kc, A + i0 * lda + p0, lda, buf + j0 * kc, C + j0 * ldc + i0, ldc, m - i0 < MR ? m - i0 : MR,
                         n - j0 < NR ? n - j0 : NR, acc || p0 > 0, at, pfn);
            }
    }
}

/* Floats of gemm's buffer for products up to n columns wide and panels up to kc deep. */
static long gemm_buffer(long n, long kc)
{
    long nc = (n + NR - 1) / NR * NR;
    return kc * (nc < NC ? nc : NC) + MC * kc;
}

/* One thread: C[m, n] (row stride ldc) = (acc ? C : 0) + A[m, k] @ B[k, n] (acc STREAM: C's
 * lines written non-temporally where k fits one panel, so that each is written once), with
 * A's element (i, p) at A[i ras + p cas] and B's (p, j) at B[p rbs + j cbs], in panels up to
 * kcmax deep; buf: gemm_buffer(n, kcmax) floats. B is packed NC columns at a time into
 * contiguous strips, which the micro-kernel streams from L2 while A's strip stays in L1
 * (read in place where A has few rows and B is small, below).
 * next: the next product's operand (next_bytes from there), fetched meanwhile (or 0). */
static void gemm(long m, long n, long k, const float *A, long ras, long cas, const float *B, long rbs, long cbs,
                 float *C, long ldc, int acc, long kcmax, float *buf, const void *next, long next_bytes)
{
    if (acc == STREAM && k > kcmax)
        acc = 0;
    if (k == 0) { /* an idle expert's gradient: zeros, streamed like the others */
        for (long i = 0; acc != 1 && i < m; i++) {
            float *ci = C + i * ldc;
            long j = 0;
            if (acc == STREAM)
                for (; j + VW <= n; j += VW) store_nt(ci + j, (vf){0});
            memset(ci + j, 0, (size_t)(n - j) * sizeof(float));
        }
        return;
    }
    /* few rows and a weight that fits L2 (fetched there by the previous product): B read in
     * place, where packing it would copy each value for only MR-row tiles' use
     * (benchmarks/moe_layer.py, fine-grained rows) */
    int direct = m <= DIRECT_ROWS && k * n * (long)sizeof(float) <= DIRECT_BYTES && cbs == 1 && n % NR == 0;
    long ncmax = (n + NR - 1) / NR * NR;
    ncmax = ncmax < NC ? ncmax : NC;
    float *bp = buf, *ap = buf + kcmax * ncmax;
    /* the next operand's lines (pf), fetched into L2 a few per micro-kernel iteration */
    prefetch pf = prefetch_over(next, next_bytes, (k + kcmax - 1) / kcmax * ((m + MR - 1) / MR) * ((n + NR - 1) / NR));
    const char *at;
    for (long p0 = 0; p0 < k; p0 += kcmax) {
        long kc = k - p0 < kcmax ? k - p0 : kcmax;
        int a0 = p0 > 0 ? 1 : acc;
        for (long m0 = 0; m0 < m; m0 += MC) {
            long mc = m - m0 < MC ? m - m0 : MC;
            pack_a(A + m0 * ras + p0 * cas, ras, cas, mc, kc, ap);
            for (long n0 = 0; n0 < n; n0 += NC) {
                long nc = n - n0 < NC ? n - n0 : NC;
                if (!direct) pack_b(B + p0 * rbs + n0 * cbs, rbs, cbs, kc, nc, bp);
                for (long i0 = 0; i0 < mc; i0 += MR)
                    for (long j0 = 0; j0 < nc; j0 += NR) {
                        long pfn = prefetch_take(&pf, &at);
                        micro(kc, ap + i0 * kc, direct ? B + p0 * rbs + n0 + j0 : bp + j0 * kc, direct ? rbs : NR,
                              C + (m0 + i0) * ldc + n0 + j0, ldc,
                              mc - i0 < MR ? mc - i0 : MR, nc - j0 < NR ? nc - j0 : NR, a0, at, pfn);
                    }
            }
        }
    }
}

/* A unit of work: expert e, rows [a, b) of its segment (or of a weight gradient), and which
 * product (the backward's weight gradients: 0 w1, 1 w3, 2 w2). */
typedef struct {
    long e, a, b;
    int which;
} task;

/* first row of each expert's segment; returns the largest segment */
static long starts(const long *counts, long E, long *start)
{
    long row = 0, most = 0;
    for (long e = 0; e < E; e++) {
        start[e] = row;
        row += counts[e];
        most = counts[e] > most ? counts[e] : most;
    }
    return most;
}

/* every non-empty segment cut into equal blocks of at most `rows` rows (each block packs the
 * expert's weights again: no short last block) */
static long row_tasks(const long *counts, long E, long rows, task *t)
{
    long n = 0;
    for (long e = 0; e < E; e++) {
        long blocks = (counts[e] + rows - 1) / rows, size = blocks ? (counts[e] + blocks - 1) / blocks : 0;
        for (long a = 0; a < counts[e]; a += size)
            t[n++] = (task){e, a, a + size < counts[e] ? a + size : counts[e], 0};
    }
    return n;
}

static long max3(long a, long b, long c) { return a > b ? (a > c ? a : c) : (b > c ? b : c); }

/* Every SwiGLU expert over its rows of x (sorted by expert, counts[e] rows for expert e):
 * out[i] = (silu(x[i] @ w1_e) * (x[i] @ w3_e)) @ w2_e. x: [rows, K], out: [rows, N],
 * contiguous; w1_e = w1 + e e13, [K, F] with row stride ld13 (w3 alike), w2_e = w2 + e e2,
 * [F, N] with row stride ld2. Where gate_save and up_save are given ([rows, F], contiguous)
 * the pre-activations are kept there for moekit_swiglu_blocks_backward. Rows past the
 * counts' sum are left alone. Returns 0, or -1 when out of memory. */
int moekit_swiglu_blocks(const float *x, long K, const long *counts, long E, const float *w1, const float *w3,
                         long e13, long ld13, long F, const float *w2, long e2, long ld2, long N, float *out,
                         float *gate_save, float *up_save, int nthreads)
{
    long *start = malloc((E + 1) * sizeof(long)), total = 0;
    for (long e = 0; e < E; e++) total += (counts[e] + ROWS - 1) / ROWS;
    task *tasks = malloc((total + 1) * sizeof(task));
    long per_thread = gemm_buffer(max3(F, N, 1), KC) + 3 * ROWS * F;
    float *buf = malloc((size_t)nthreads * per_thread * sizeof(float));
    int rc = 0;
    if (!start || !tasks || !buf) {
        rc = -1;
        goto done;
    }
    starts(counts, E, start);
    long n_tasks = row_tasks(counts, E, ROWS, tasks);
    #pragma omp parallel num_threads(n_tasks < nthreads ? (n_tasks ? n_tasks : 1) : nthreads)
    {
        float *gb = buf + omp_get_thread_num() * per_thread, *mine = gb + gemm_buffer(max3(F, N, 1), KC);
        #pragma omp for schedule(dynamic, 1)
        for (long t = 0; t < n_tasks; t++) {
            long e = tasks[t].e, r0 = start[e] + tasks[t].a, R = tasks[t].b - tasks[t].a;
            const float *xr = x + r0 * K;
            float *gate = gate_save ? gate_save + r0 * F : mine, *up = up_save ? up_save + r0 * F : mine + ROWS * F;
            float *hidden = mine + 2 * ROWS * F;
            /* each product fetches the next one's weight (the last, the next task's first) */
            long next = t + nthreads < n_tasks ? tasks[t + nthreads].e : -1;
            int whole13 = ld13 == F, whole2 = ld2 == N;
            gemm(R, F, K, xr, K, 1, w1 + e * e13, ld13, 1, gate, F, 0, KC, gb, whole13 ? w3 + e * e13 : 0,
                 K * F * sizeof(float));
            gemm(R, F, K, xr, K, 1, w3 + e * e13, ld13, 1, up, F, 0, KC, gb, whole2 ? w2 + e * e2 : 0,
                 F * N * sizeof(float));
            moekit_silu_mul_rows(gate, up, hidden, R * F);
            gemm(R, N, F, hidden, F, 1, w2 + e * e2, ld2, 1, out + r0 * N, N, 0, KC, gb,
                 whole13 && next >= 0 && next != e ? w1 + next * e13 : 0, K * F * sizeof(float));
        }
    }
done:
    free(start);
    free(tasks);
    free(buf);
    return rc;
}

/* The backward of moekit_swiglu_blocks, given its saved gate and up ([rows, F]) and the
 * output's gradient dy [rows, N]: dx [rows, K] and the weight gradients dw1, dw3 [E, K, F]
 * and dw2 [E, F, N] (contiguous; experts without rows get zeros). Two passes over a shared
 * list of tasks: blocks of each expert's rows (dh = dy @ w2^T, the SwiGLU's derivative,
 * dx = dgate @ w1^T + dup @ w3^T), then blocks of each weight gradient's rows (dw1 =
 * x^T dgate, dw3 = x^T dup, dw2 = hidden^T dy). Rows of dx past the counts' sum are left
 * alone. Returns 0, or -1 when out of memory. */
int moekit_swiglu_blocks_backward(const float *x, long K, const long *counts, long E, const float *w1,
                                  const float *w3, long e13, long ld13, long F, const float *w2, long e2, long ld2,
                                  long N, const float *gate_save, const float *up_save, const float *dy, float *dx,
                                  float *dw1, float *dw3, float *dw2, int nthreads)
{
    long *start = malloc((E + 1) * sizeof(long)), rows = 0, n_rows = 0, n_w = 0;
    for (long e = 0; e < E; e++) {
        rows += counts[e];
        n_rows += (counts[e] + BROWS - 1) / BROWS;
    }
    long w_blocks = 2 * ((K + WROWS - 1) / WROWS) + (F + WROWS - 1) / WROWS;
    task *tasks = malloc((n_rows + E * w_blocks + 1) * sizeof(task));
    long per_thread = gemm_buffer(max3(K, F, N), KCW), at = gemm_buffer(AT_ROWS, KC);
    per_thread = per_thread > at ? per_thread : at;
    float *buf = malloc((size_t)nthreads * per_thread * sizeof(float));
    float *hidden = malloc((3 * rows * F + 1) * sizeof(float)), *dg = hidden + rows * F, *du = dg + rows * F;
    int rc = 0;
    if (!start || !tasks || !buf || !hidden) {
        rc = -1;
        goto done;
    }
    starts(counts, E, start);
    row_tasks(counts, E, BROWS, tasks);
    task *wt = tasks + n_rows;
    for (long e = 0; e < E; e++)
        for (int which = 0; which < 3; which++)
            for (long a = 0, m = which < 2 ? K : F; a < m; a += WROWS)
                wt[n_w++] = (task){e, a, a + WROWS < m ? a + WROWS : m, which};
    #pragma omp parallel num_threads(nthreads)
    {
        float *gb = buf + omp_get_thread_num() * per_thread;
        #pragma omp for schedule(dynamic, 1)
        for (long t = 0; t < n_rows; t++) {
            long e = tasks[t].e, r0 = start[e] + tasks[t].a, R = tasks[t].b - tasks[t].a;
            float *h = hidden + r0 * F, *g = dg + r0 * F, *u = du + r0 * F;
            const float *gs = gate_save + r0 * F, *us = up_save + r0 * F;
            /* each product fetches the next one's weight (the last, the next task's first) */
            long next = t + nthreads < n_rows ? tasks[t + nthreads].e : -1;
            const float *w1e = ld13 == F ? w1 + e * e13 : 0, *w3e = ld13 == F ? w3 + e * e13 : 0;
            const float *w2n = ld2 == N && next >= 0 && next != e ? w2 + next * e2 : 0;
            long b13 = K * F * sizeof(float), b2 = F * N * sizeof(float);
            if (R <= AT_ROWS) /* dh = dy @ w2^T, into dg */
                gemm_at(F, R, N, w2 + e * e2, ld2, dy + r0 * N, N, g, F, 0, gb, w1e, b13);
            else
                gemm(R, F, N, dy + r0 * N, N, 1, w2 + e * e2, 1, ld2, g, F, 0, KC, gb, w1e, b13);
            moekit_silu_mul_rows(gs, us, h, R * F);
            moekit_silu_mul_grad_rows(g, gs, us, g, u, R * F);
            if (R <= AT_ROWS) { /* dx = dgate @ w1^T + dup @ w3^T */
                gemm_at(K, R, F, w1 + e * e13, ld13, g, F, dx + r0 * K, K, 0, gb, w3e, b13);
                gemm_at(K, R, F, w3 + e * e13, ld13, u, F, dx + r0 * K, K, 1, gb, w2n, b2);
            } else {
                gemm(R, K, F, g, F, 1, w1 + e * e13, 1, ld13, dx + r0 * K, K, 0, KC, gb, w3e, b13);
                gemm(R, K, F, u, F, 1, w3 + e * e13, 1, ld13, dx + r0 * K, K, 1, KC, gb, w2n, b2);
            }
        }
        /* the implied barrier: every row's dgate, dup and hidden are written */
        #pragma omp for schedule(dynamic, 1)
        for (long t = 0; t < n_w; t++) {
            long e = wt[t].e, a = wt[t].a, m = wt[t].b - a, R = counts[e], r0 = start[e];
            if (wt[t].which == 2) { /* dw2[a:b] = hidden^T[a:b] @ dy, [F, N] */
                gemm(m, N, R, hidden + r0 * F + a, 1, F, dy + r0 * N, N, 1, dw2 + e * F * N + a * N, N, STREAM, KCW, gb, 0, 0);
            } else { /* dw1[a:b] = x^T[a:b] @ dgate (dw3: dup), [K, F] */
                float *dw = (wt[t].which ? dw3 : dw1) + e * K * F + a * F;
                gemm(m, F, R, x + r0 * K + a, 1, K, (wt[t].which ? du : dg) + r0 * F, F, 1, dw, F, STREAM, KCW, gb, 0, 0);
            }
            fence();
        }
    }
done:
    free(start);
    free(tasks);
    free(buf);
    free(hidden);
    return rc;
}
