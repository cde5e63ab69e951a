/* moekit CPU kernels: every SwiGLU expert over its rows in bfloat16, forward and backward, as
 * blocked matrix products on AVX-512 BF16's pair dot products (float32 sums), the experts
 * shared among threads.
 *
 * Without it bfloat16 training runs each expert's products as oneDNN calls: dozens a layer
 * and step, each with a fixed cost, on segments of a few hundred rows where oneDNN stays
 * below its large-matrix speed. Here, as cpu_blocks.c does in float32, each product runs on
 * one thread from a register-blocked micro-kernel, and the threads take blocks of experts'
 * rows from a shared list, in one parallel region per pass; each expert's weights are packed
 * once per pass into the micro-kernel's layout (pairs of k), shared by every block of its
 * rows. benchmarks/moe_vs_dense.py --dtype bfloat16 measures it against the dense model.
 *
 * Rounding, as the torch path's bfloat16 products: float32 sums, each product's output
 * rounded once to bfloat16 (gate, up, hidden, the output, dx; the weight gradients of
 * bfloat16 weights, those of float32 weights stay float32). The hidden layer's gradient
 * stays float32 into the SwiGLU derivative (torch rounds it first). The weight gradients'
 * sums run in an order fixed by the rows and the thread count, not by which thread ran what:
 * repeated calls agree bit for bit.
 *
 * Exported: moekit_swiglu_blocks_bf16 and moekit_swiglu_blocks_bf16_backward, with the
 * arguments of cpu_blocks.c's float32 pair and wf32 (rows, gate, up and their gradients
 * bfloat16, as uint16 bits; the weights and their gradients float32 where wf32, rounded to
 * bfloat16 as they are packed, else bfloat16; K, F and N even), and moekit_blocks_bf16_built:
 * 1 where the build has AVX-512 BF16, else 0 (and the two return 2, an argument refused).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#include <pthread.h>
#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#include "cpu_vmath.h"
#define BLOCKS_BF16 1
#endif

int moekit_blocks_bf16_built(void)
{
#ifdef BLOCKS_BF16
    return 1;
#else
    return 0;
#endif
}

#ifdef BLOCKS_BF16

#define MR 12      /* rows of C per micro-tile: 12 x 2 accumulators, 2 of B and a broadcast in 32 registers */
#define NR 32      /* columns of C per micro-tile (two vectors of 16 floats) */
#define SP (2 * NR) /* bfloat16 values per pair of k in a packed strip of B */
#define KCP 256    /* pairs of k per panel: a strip of B (32 KB) in L1, a row block of A in L2 */
#define NCS 8      /* strips of B per column block (NCS x KCP x SP x 2 bytes = 256 KB in L2) */
#define ROWS 192   /* rows of an expert per task of the forward */
#define BROWS 128  /* rows of an expert per block of the backward's row pass */
#define SUMS_L2 (512L << 10) /* bytes of weight-gradient sums that stay in L2 beside a block's operands */
#define SUMS_MAX (2L << 20)  /* the most bytes of an expert's weight-gradient sums kept per chunk of rows */
#define PARTS_MAX (64L << 20) /* the most bytes of chunks' sums kept until the end (many threads: fewer chunks) */
#define WS 4       /* strips of NR columns of a weight gradient per task of the shared weight pass */
#include "cpu_tiles.h"

typedef uint16_t bf16;

static inline long cdiv(long a, long b) { return (a + b - 1) / b; }

static inline uint32_t load32(const void *p)
{
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline __mmask16 mask16(long n) { return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1); }
static inline __mmask32 mask32(long n) { return n >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << n) - 1); }

/* dst[i] = src[i] rounded to bfloat16 (ties to even), i < n */
static void to_bf16(const float *src, bf16 *dst, long n)
{
    for (long i = 0; i < n; i += 16) {
        __mmask16 m = mask16(n - i);
        __m512 v = _mm512_maskz_loadu_ps(m, src + i);
        _mm256_mask_storeu_epi16(dst + i, m, (__m256i)_mm512_cvtneps_pbh(v));
    }
}

/* element i of a weight (or its gradient): float32 where f32, else bfloat16 */
static inline const void *elem(const void *p, long i, int f32) { return (const char *)p + i * (f32 ? 4 : 2); }

/* One expert's weight [rows, cols] (row stride ld) in bfloat16: the weight itself where it is
 * bfloat16, else rounded into scratch (contiguous); *ldb gets the row stride of the answer. */
static const bf16 *weight_bf16(const void *w, int f32, long rows, long cols, long ld, bf16 *scratch, long *ldb)
{
    if (!f32) {
        *ldb = ld;
        return w;
    }
    for (long r = 0; r < rows; r++) to_bf16((const float *)w + r * ld, scratch + r * cols, cols);
    *ldb = cols;
    return scratch;
}

static inline __m512 widen(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }

/* One row of the forward's activation, in one pass: the gate and up sums (float32) rounded
 * to bfloat16 into gs and us, and hidden = silu(gate) * up from the rounded values, rounded. */
static void act_row(const float *g, const float *u, bf16 *gs, bf16 *us, bf16 *hidden, long n)
{
    for (long i = 0; i < n; i += 16) {
        __mmask16 m = mask16(n - i);
        __m256i gb = (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, g + i));
        __m256i ub = (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, u + i));
        _mm256_mask_storeu_epi16(gs + i, m, gb);
        _mm256_mask_storeu_epi16(us + i, m, ub);
        __m512 gv = widen(gb);
        __m512 h = _mm512_mul_ps(_mm512_mul_ps(gv, sigmoid16(gv)), widen(ub));
        _mm256_mask_storeu_epi16(hidden + i, m, (__m256i)_mm512_cvtneps_pbh(h));
    }
}

/* 16 values of two rows (a: the first, b: the second) rounded to bfloat16: [a | b] */
static inline __m512i round2(__m512 a, __m512 b) { return (__m512i)_mm512_cvtne2ps_pbh(b, a); }

/* [a | b] (two rows' 16 bfloat16 values) as their 16 pairs, a's value first in each: one half
 * of a packed strip's pair of rows (pack_b_rows's layout) */
static inline __m512i pairs16(__m512i ab)
{
    static const short mix[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                  8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    return _mm512_permutexvar_epi16(_mm512_loadu_si512(mix), ab);
}

/* One row's 16 values of the backward's activation, from the saved gate and up (bfloat16) and
 * the hidden layer's gradient dh (float32), lanes outside m zero: hidden = silu(gate) * up
 * again (for dW2), dgate = dh * up * s * (1 + gate (1 - s)) and dup = dh * silu(gate), s =
 * sigmoid(gate), in float32 (each rounded once to bfloat16 by the caller); the sigmoid once
 * for all three. */
static inline void act_grad16(const bf16 *gs, const bf16 *us, const float *dh, __mmask16 m, __m512 *h, __m512 *dg,
                              __m512 *du)
{
    __m512 one = _mm512_set1_ps(1.0f);
    __m512 gv = widen(_mm256_maskz_loadu_epi16(m, gs)), uv = widen(_mm256_maskz_loadu_epi16(m, us));
    __m512 dv = _mm512_maskz_loadu_ps(m, dh), s = sigmoid16(gv), silu = _mm512_mul_ps(gv, s);
    *dg = _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(dv, uv), s), _mm512_fmadd_ps(gv, _mm512_sub_ps(one, s), one));
    *h = _mm512_mul_ps(silu, uv);
    *du = _mm512_mul_ps(dv, silu);
}

/* The backward's activation on a block's R rows, columns of strip s (NR):
 * [dgate | dup] as rows (dgu, row stride 2F: the left side of dx), and hidden, dgate and dup
 * as packed strips of pairs of rows (pack_b_rows's layout from pair q0 of strips at hs, dgs,
 * dus, ss values apart; zeros past F and past R): the right sides of the weight gradients,
 * written as they are computed rather than packed from memory afterwards. A strip at a time:
 * each row's lines read whole, each strip written in order. */
typedef struct {
    const bf16 *gs, *us; /* the block's saved gate and up, row stride F */
    const float *dh;     /* the block's dh, row stride ldh */
    long ldh, R, F, q0, ss;
    bf16 *dgu, *hs, *dgs, *dus;
} act_block;

static void act_grad_strip(const act_block *t, long s)
{
    long F = t->F;
    __m512 zero = _mm512_setzero_ps();
    for (long r = 0; r < t->R; r += 2)
        for (long j = s * NR; j < (s + 1) * NR; j += 16) {
            __mmask16 m = j < F ? mask16(F - j) : 0;
            long at = s * t->ss + (t->q0 + r / 2) * SP + (j - s * NR) * 2;
            __m512 h0, g0, u0, h1 = zero, g1 = zero, u1 = zero;
            act_grad16(t->gs + r * F + j, t->us + r * F + j, t->dh + r * t->ldh + j, m, &h0, &g0, &u0);
            if (r + 1 < t->R)
                act_grad16(t->gs + (r + 1) * F + j, t->us + (r + 1) * F + j, t->dh + (r + 1) * t->ldh + j, m, &h1, &g1, &u1);
            __m512i hb = round2(h0, h1), gb = round2(g0, g1), ub = round2(u0, u1);
            bf16 *row = t->dgu + r * 2 * F + j;
            _mm256_mask_storeu_epi16(row, m, _mm512_castsi512_si256(gb));
            _mm256_mask_storeu_epi16(row + F, m, _mm512_castsi512_si256(ub));
            if (r + 1 < t->R) {
                _mm256_mask_storeu_epi16(row + 2 * F, m, _mm512_extracti64x4_epi64(gb, 1));
                _mm256_mask_storeu_epi16(row + 3 * F, m, _mm512_extracti64x4_epi64(ub, 1));
            }
            _mm512_storeu_si512(t->hs + at, pairs16(hb));
            _mm512_storeu_si512(t->dgs + at, pairs16(gb));
            _mm512_storeu_si512(t->dus + at, pairs16(ub));
        }
}

/* B [k, n] with its rows contiguous (element (p, j) at B[p rbs + j]) as strips of NR
 * columns, each ceil(k/2) pairs of rows deep: strip s at bp + s sstride, pair q's 2 NR values
 * at SP q, column j's two rows side by side (zeros past n and past k). */
static void pack_b_rows(const bf16 *B, long rbs, long k, long n, bf16 *bp, long sstride)
{
    /* interleaving two rows' 32 values into pairs: lo for columns 0-15, hi for 16-31 */
    static const short lo[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                 8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
    __m512i ilo = _mm512_loadu_si512(lo), ihi = _mm512_add_epi16(ilo, _mm512_set1_epi16(16));
    for (long s = 0; s * NR < n; s++) {
        __mmask32 m = mask32(n - s * NR);
        bf16 *dst = bp + s * sstride;
        for (long p = 0; p < k; p += 2, dst += SP) {
            __m512i r0 = _mm512_maskz_loadu_epi16(m, B + p * rbs + s * NR);
            __m512i r1 = p + 1 < k ? _mm512_maskz_loadu_epi16(m, B + (p + 1) * rbs + s * NR) : _mm512_setzero_si512();
            _mm512_storeu_si512(dst, _mm512_permutex2var_epi16(r0, ilo, r1));
            _mm512_storeu_si512(dst + NR, _mm512_permutex2var_epi16(r0, ihi, r1));
        }
    }
}

/* r[q] lane j = r[j] lane q (32-bit lanes): a 16 x 16 transpose in registers */
static inline void transpose16(__m512i *r)
{
    __m512i t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int i = 0; i < 2; i++)
        for (int c = 0; c < 4; c++) {
            t[8 * i + c] = _mm512_shuffle_i32x4(r[8 * i + c], r[8 * i + 4 + c], 0x88);
            t[8 * i + 4 + c] = _mm512_shuffle_i32x4(r[8 * i + c], r[8 * i + 4 + c], 0xdd);
        }
    for (int c = 0; c < 8; c++) {
        r[c] = _mm512_shuffle_i32x4(t[c], t[8 + c], 0x88);
        r[c + 8] = _mm512_shuffle_i32x4(t[c], t[8 + c], 0xdd);
    }
}

/* pack_b_rows's layout for B [k, n] stored transposed (element (p, j) at B[j cbs + p]): a
 * column's pair of rows is adjacent in memory (32 bits), so 16 columns' next 16 pairs are a
 * 16 x 16 transpose of 32-bit values (zeros past n and past k). */
static void pack_b_cols(const bf16 *B, long cbs, long k, long n, bf16 *bp, long sstride)
{
    for (long s = 0; s * NR < n; s++) {
        bf16 *dst = bp + s * sstride;
        for (int h = 0; h < 2; h++) {
            long j0 = s * NR + h * 16;
            for (long p = 0; p < k; p += 32) { /* 16 pairs of rows of B */
                __mmask32 m = mask32(k - p);
                __m512i r[16];
                for (int j = 0; j < 16; j++)
                    r[j] = j0 + j < n ? _mm512_maskz_loadu_epi16(m, B + (j0 + j) * cbs + p) : _mm512_setzero_si512();
                transpose16(r);
                for (long q = 0; q < 16 && p + 2 * q < k; q++) _mm512_storeu_si512(dst + (p / 2 + q) * SP + h * 32, r[q]);
            }
        }
    }
}

/* dst[j ldd + i] (float32) = (add ? dst : 0) + C[i, j] (C's row stride ldc), i < m, j < n:
 * by 16 x 16 register transposes */
static void store_t(const float *c, long ldc, long m, long n, float *dst, long ldd, int add)
{
    for (long i0 = 0; i0 < m; i0 += 16)
        for (long j0 = 0; j0 < n; j0 += 16) {
            __mmask16 mi = mask16(m - i0), mj = mask16(n - j0);
            __m512i r[16];
            for (int i = 0; i < 16; i++)
                r[i] = i0 + i < m ? _mm512_maskz_loadu_epi32(mj, c + (i0 + i) * ldc + j0) : _mm512_setzero_si512();
            transpose16(r);
            for (long j = 0; j < 16 && j0 + j < n; j++) {
                float *d = dst + (j0 + j) * ldd + i0;
                __m512 v = _mm512_castsi512_ps(r[j]);
                _mm512_mask_storeu_ps(d, mi, add ? _mm512_add_ps(v, _mm512_maskz_loadu_ps(mi, d)) : v);
            }
        }
}

/* dst[i ldd + j] = (add ? dst : 0) + C[i, j], i < m, j < n (float32) */
static void store_rows(const float *c, long ldc, long m, long n, float *dst, long ldd, int add)
{
    for (long i = 0; i < m; i++)
        for (long j = 0; j < n; j += 16) {
            __mmask16 mj = mask16(n - j);
            __m512 v = _mm512_maskz_loadu_ps(mj, c + i * ldc + j);
            float *d = dst + i * ldd + j;
            _mm512_mask_storeu_ps(d, mj, add ? _mm512_add_ps(v, _mm512_maskz_loadu_ps(mj, d)) : v);
        }
}

/* A [m, k] stored transposed (element (i, p) at S[p rs + i]: a weight gradient's left side,
 * activations' rows p) as strips of MR rows of A, each ceil(k/2) pairs deep: strip t at
 * ap + t tstride (32-bit pairs), pair q of row i at q MR + i (zeros past m and past k). */
static void pack_a_t(const bf16 *S, long rs, long m, long k, uint32_t *ap, long tstride)
{
    static const short mix[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                  8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    __m512i imix = _mm512_loadu_si512(mix);
    for (long i0 = 0; i0 < m; i0 += MR) {
        __mmask16 mm = mask16(m - i0 < MR ? m - i0 : MR);
        uint32_t *dst = ap + i0 / MR * tstride;
        for (long p = 0; p < k; p += 2, dst += MR) {
            __m256i r0 = _mm256_maskz_loadu_epi16(mm, S + p * rs + i0);
            __m256i r1 = p + 1 < k ? _mm256_maskz_loadu_epi16(mm, S + (p + 1) * rs + i0) : _mm256_setzero_si256();
            __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(r0), r1, 1);
            _mm512_mask_storeu_epi32(dst, (__mmask16)((1u << MR) - 1), _mm512_permutexvar_epi16(imix, both));
        }
    }
}

/* C[rows, NR] (row stride ldc) = (acc ? C : 0) + A's rows @ one strip of B over kq pairs of
 * k: A's pair (i, q) at a[i ras + q cas] (32 bits), the strip's pair q at b + q SP. Inlined
 * per row count (BY_ROWS). */
static inline __attribute__((always_inline)) void micro_rows(const int rows, long kq, const uint32_t *a, long ras,
                                                             long cas, const bf16 *b, float *c, long ldc, int acc)
{
    __m512 c0[MR], c1[MR];
    for (int i = 0; i < rows; i++) c0[i] = c1[i] = _mm512_setzero_ps();
    for (long q = 0; q < kq; q++, a += cas, b += SP) {
        __m512bh b0 = (__m512bh)_mm512_loadu_si512(b), b1 = (__m512bh)_mm512_loadu_si512(b + NR);
#pragma GCC unroll 12
        for (int i = 0; i < rows; i++) {
            __m512bh av = (__m512bh)_mm512_set1_epi32((int)load32(a + i * ras));
            c0[i] = _mm512_dpbf16_ps(c0[i], av, b0);
            c1[i] = _mm512_dpbf16_ps(c1[i], av, b1);
        }
    }
    for (int i = 0; i < rows; i++) {
        float *ci = c + i * ldc;
        _mm512_storeu_ps(ci, acc ? _mm512_add_ps(c0[i], _mm512_loadu_ps(ci)) : c0[i]);
        _mm512_storeu_ps(ci + 16, acc ? _mm512_add_ps(c1[i], _mm512_loadu_ps(ci + 16)) : c1[i]);
    }
}

static void micro(long mr, long kq, const uint32_t *a, long ras, long cas, const bf16 *b, float *c, long ldc, int acc)
{
    BY_ROWS(mr, micro_rows, kq, a, ras, cas, b, c, ldc, acc);
}

/* The left side of a product: row block t (rows t MR ...) at a + t tstride, pair (i, q) of
 * the block at [i ras + q cas] (32-bit units): rows read in place (ras the row's pairs,
 * cas 1) or packed by pack_a_t (ras 1, cas MR, tstride kp MR). */
typedef struct {
    const uint32_t *a;
    long ras, cas, tstride;
} lhs;

static lhs rows_in_place(const bf16 *A, long lda) { return (lhs){(const uint32_t *)(const void *)A, lda / 2, 1, MR * (lda / 2)}; }

/* Memory the next step reads, fetched into L2 a few lines per micro-kernel call while a
 * product runs: the backward's saved gate and up rows come from memory, and waiting for them
 * in the activation cost more than the products around it (benchmarks/moe_vs_dense.py
 * --dtype bfloat16). Two regions, lines[i] 64-byte lines from at[i]. */
typedef struct {
    const char *at[2];
    long lines[2];
} ahead;

static const ahead NOTHING = {{NULL, NULL}, {0, 0}};

static ahead ahead_of(const void *a, long a_bytes, const void *b, long b_bytes)
{
    return (ahead){{a, b}, {cdiv(a_bytes, 64), cdiv(b_bytes, 64)}};
}

/* up to n of pf's lines fetched, the two regions in step (the activation reads a row of
 * each at a time), pf advanced past them */
static inline void fetch(ahead *pf, long n)
{
    for (int r = 0; n > 0 && (pf->lines[0] > 0 || pf->lines[1] > 0); r ^= 1)
        if (pf->lines[r] > 0) {
            _mm_prefetch(pf->at[r], _MM_HINT_T1);
            pf->lines[r]--, n--, pf->at[r] += 64;
        }
}

/* One thread: C[m, ns NR] (row stride ldc, float32) = (acc ? C : 0) + A[m, 2 kp] @ B, B
 * packed in ns strips (strip s at bp + s sstride, kp pairs each). Blocks of NCS strips
 * (in L2) by panels of KCP pairs, each block of A's rows reused across the strips; pf's lines
 * fetched meanwhile. */
static void gemm(long m, long kp, long ns, lhs A, const bf16 *bp, long sstride, float *c, long ldc, int acc, ahead pf)
{
    long calls = cdiv(m, MR) * ns * cdiv(kp, KCP), share = calls ? cdiv(pf.lines[0] + pf.lines[1], calls) : 0;
    for (long s0 = 0; s0 < ns; s0 += NCS)
        for (long q0 = 0; q0 < kp; q0 += KCP) {
            long kq = kp - q0 < KCP ? kp - q0 : KCP;
            for (long i0 = 0; i0 < m; i0 += MR)
                for (long s = s0; s < s0 + NCS && s < ns; s++) {
                    fetch(&pf, share);
                    micro(m - i0 < MR ? m - i0 : MR, kq, A.a + i0 / MR * A.tstride + q0 * A.cas, A.ras, A.cas,
                          bp + s * sstride + q0 * SP, c + i0 * ldc + s * NR, ldc, acc || q0 > 0);
                }
        }
}

/* A call's large buffers (packed weights, the backward's laid-out operands, the threads'
 * blocks) in one workspace kept between calls: allocated fresh each call they are new pages,
 * thousands of page faults a training step (benchmarks/moe_vs_dense.py --dtype bfloat16).
 * It grows to the largest call's need and stays; one call holds it at a time, a concurrent
 * call (another Python thread) allocates its own. */
static pthread_mutex_t ws_lock = PTHREAD_MUTEX_INITIALIZER;
static char *ws_mem;
static size_t ws_size;

typedef struct {
    char *mem, *at;
    int owned;
} workspace;

static workspace ws_get(size_t bytes)
{
    bytes += 64 * 8; /* each part aligned to a cache line */
    if (pthread_mutex_trylock(&ws_lock) == 0) {
        if (ws_size < bytes) {
            free(ws_mem);
            ws_mem = malloc(bytes);
            ws_size = ws_mem ? bytes : 0;
        }
        if (ws_mem) return (workspace){ws_mem, ws_mem, 0};
        pthread_mutex_unlock(&ws_lock);
        return (workspace){NULL, NULL, 0};
    }
    char *mem = malloc(bytes);
    return (workspace){mem, mem, 1};
}

/* the next part of the workspace, bytes long, cache-line aligned */
static void *ws_part(workspace *w, size_t bytes)
{
    char *p = (char *)(((uintptr_t)w->at + 63) & ~(uintptr_t)63);
    w->at = p + bytes;
    return p;
}

static void ws_put(workspace w)
{
    if (w.owned)
        free(w.mem);
    else if (w.mem)
        pthread_mutex_unlock(&ws_lock);
}

typedef struct {
    long e, a, b, cost;
    int which;
} task;

/* first row of each expert's segment */
static void starts(const long *counts, long E, long *start)
{
    long row = 0;
    for (long e = 0; e < E; e++) {
        start[e] = row;
        row += counts[e];
    }
}

/* every non-empty segment cut into equal blocks of at most rows rows (even), an even number
 * each (but the last): the backward packs pairs of an expert's rows, never split between blocks */
static long row_tasks(const long *counts, long E, long rows, task *t)
{
    long n = 0;
    for (long e = 0; e < E; e++) {
        long blocks = cdiv(counts[e], rows), size = blocks ? cdiv(cdiv(counts[e], blocks), 2) * 2 : 0;
        for (long a = 0; a < counts[e]; a += size) t[n++] = (task){e, a, a + size < counts[e] ? a + size : counts[e], 0, 0};
    }
    return n;
}

int moekit_swiglu_blocks_bf16(const bf16 *x, long K, const long *counts, long E, const void *w1, const void *w3,
                              long e13, long ld13, long F, const void *w2, long e2, long ld2, long N, int wf32,
                              bf16 *out, bf16 *gate_save, bf16 *up_save, int nthreads)
{
    if (K < 2 || F < 2 || N < 2 || K % 2 || F % 2 || N % 2 || ld13 % 2 || ld2 % 2)
        return 2;
    long kpK = K / 2, kpF = F / 2, sF = cdiv(F, NR), sN = cdiv(N, NR), Fp = sF * NR, Np = sN * NR;
    long str13 = kpK * SP, str2 = kpF * SP;     /* one strip's values */
    long per13 = 2 * sF * str13, per2 = sN * str2; /* one expert's packed w1 and w3, w2 */
    long n_tasks = 0;
    for (long e = 0; e < E; e++) n_tasks += cdiv(counts[e], ROWS);
    long *start = malloc((E + 1) * sizeof(long));
    task *tasks = malloc((n_tasks + 1) * sizeof(task));
    long scratch = wf32 ? (K > N ? K : N) * F : 0; /* a float32 weight rounded, before packing */
    long per_thread = ROWS * (2 * Fp + Np) * sizeof(float) + (3 * ROWS * F + scratch) * sizeof(bf16) + 64;
    size_t wp_bytes = (size_t)E * (per13 + per2) * sizeof(bf16);
    workspace ws = ws_get(wp_bytes + (size_t)nthreads * per_thread);
    bf16 *wp = ws.mem ? ws_part(&ws, wp_bytes) : NULL;
    char *buf = ws.mem ? ws_part(&ws, (size_t)nthreads * per_thread) : NULL;
    int rc = 0;
    if (!start || !tasks || !wp || !buf) {
        rc = -1;
        goto done;
    }
    starts(counts, E, start);
    row_tasks(counts, E, ROWS, tasks);
    bf16 *wp2 = wp + E * per13;
    #pragma omp parallel num_threads(nthreads)
    {
        char *mine = buf + omp_get_thread_num() * per_thread;
        float *cg = (float *)mine, *cu = cg + ROWS * Fp, *co = cu + ROWS * Fp;
        bf16 *tg = (bf16 *)(co + ROWS * Np), *tu = tg + ROWS * F, *hidden = tu + ROWS * F, *wb = hidden + ROWS * F;
        /* each used expert's weights packed once, for all of its row blocks */
        #pragma omp for schedule(dynamic, 1)
        for (long t = 0; t < 3 * E; t++) {
            long e = t / 3, ldb;
            if (!counts[e]) continue;
            if (t % 3 < 2) {
                const bf16 *w = weight_bf16(elem(t % 3 ? w3 : w1, e * e13, wf32), wf32, K, F, ld13, wb, &ldb);
                pack_b_rows(w, ldb, K, F, wp + e * per13 + (t % 3) * sF * str13, str13);
            } else {
                const bf16 *w = weight_bf16(elem(w2, e * e2, wf32), wf32, F, N, ld2, wb, &ldb);
                pack_b_rows(w, ldb, F, N, wp2 + e * per2, str2);
            }
        }
        #pragma omp for schedule(dynamic, 1)
        for (long t = 0; t < n_tasks; t++) {
            long e = tasks[t].e, r0 = start[e] + tasks[t].a, R = tasks[t].b - tasks[t].a;
            bf16 *gs = gate_save ? gate_save + r0 * F : tg, *us = up_save ? up_save + r0 * F : tu;
            const bf16 *w13p = wp + e * per13;
            lhs xr = rows_in_place(x + r0 * K, K);
            /* the block's rows come from memory: all asked for at once, not tile by tile */
            for (long i = 0; i < R * K * (long)sizeof(bf16); i += 64) _mm_prefetch((const char *)(x + r0 * K) + i, _MM_HINT_T1);
            gemm(R, kpK, sF, xr, w13p, str13, cg, Fp, 0, NOTHING);
            gemm(R, kpK, sF, xr, w13p + sF * str13, str13, cu, Fp, 0, NOTHING);
            for (long r = 0; r < R; r++) act_row(cg + r * Fp, cu + r * Fp, gs + r * F, us + r * F, hidden + r * F, F);
            gemm(R, kpF, sN, rows_in_place(hidden, F), wp2 + e * per2, str2, co, Np, 0, NOTHING);
            for (long r = 0; r < R; r++) to_bf16(co + r * Np, out + (r0 + r) * N, N);
        }
    }
done:
    free(start);
    free(tasks);
    ws_put(ws);
    return rc;
}

/* larger tasks first: the weight gradients' tasks vary with the experts' rows, and the
 * largest last would leave the other threads waiting */
static int by_cost(const void *pa, const void *pb)
{
    const task *a = pa, *b = pb;
    return (a->cost < b->cost) - (a->cost > b->cost);
}

/* sums of expert e (dW1, dW3 [K, Fp], dW2^T [N, Fp]) into its float32 gradients g1, g3
 * [E, K, F] and g2 [E, F, N]: stored, or added where add */
static void put_sums(const float *sum, long e, long K, long F, long N, long Fp, float *g1, float *g3, float *g2, int add)
{
    store_rows(sum, Fp, K, F, g1 + e * K * F, F, add);
    store_rows(sum + K * Fp, Fp, K, F, g3 + e * K * F, F, add);
    store_t(sum + 2 * K * Fp, Fp, N, F, g2 + e * F * N, N, add);
}

/* Where the weight gradients' operands of some of an expert's rows lie: x^T and dy^T packed
 * (tiles of MR columns, ts 32-bit values apart), hidden, dgate and dup as strips (ss values
 * apart; sF strips each, in that order from hs); pair q of the rows at xa + q MR, hs + q SP. */
typedef struct {
    uint32_t *xa, *ya;
    bf16 *hs;
    long ts, ss;
} operands;

/* products of gp pairs of o's rows: dW1 = x^T @ dgate and dW3 = x^T @ dup into sum's [K, Fp]
 * halves, dW2^T = dy^T @ hidden into [N, Fp] after them; added to sum where more */
static void weight_products(long K, long N, long sF, long Fp, long gp, operands o, float *sum, int more)
{
    lhs xt = {o.xa, 1, MR, o.ts}, yt = {o.ya, 1, MR, o.ts};
    gemm(K, gp, sF, xt, o.hs + sF * o.ss, o.ss, sum, Fp, more, NOTHING);
    gemm(K, gp, sF, xt, o.hs + 2 * sF * o.ss, o.ss, sum + K * Fp, Fp, more, NOTHING);
    gemm(N, gp, sF, yt, o.hs, o.ss, sum + 2 * K * Fp, Fp, more, NOTHING);
}

/* what the backward's row pass reads and writes: rows, saved activations, their gradients;
 * each expert's packed weights (w2^T, [w1^T; w3^T]) */
typedef struct {
    const bf16 *x, *dy, *gate, *up;
    bf16 *dx;
    long K, F, N;
    const bf16 *w2p, *w13p;
    long per2, per13;
} row_pass;

/* One block of R rows of expert e from row r0: dh = dy @ w2^T, the SwiGLU's derivative,
 * dx = [dgate | dup] @ [w1^T; w3^T], and the block's weight gradients' operands into o from
 * pair q (the activation writes hidden, dgate and dup there as it computes them). During dx,
 * x's rows (for the packing) and the next block's dy (next_R rows after these; 0: none known)
 * are fetched. */
static void row_block(const row_pass *p, long e, long r0, long R, operands o, long q, float *cdh, float *cdx, bf16 *dgu,
                      long next_R)
{
    long K = p->K, F = p->F, N = p->N, sF = cdiv(F, NR), sK = cdiv(K, NR), Fp = sF * NR, Kp = sK * NR;
    long gu = R * F * sizeof(bf16);
    gemm(R, N / 2, sF, rows_in_place(p->dy + r0 * N, N), p->w2p + e * p->per2, (N / 2) * SP, cdh, Fp, 0, /* dh */
         ahead_of(p->gate + r0 * F, gu, p->up + r0 * F, gu)); /* the activation's inputs, meanwhile */
    act_block act = {p->gate + r0 * F, p->up + r0 * F, cdh, Fp, R, F, q, o.ss, dgu, o.hs, o.hs + sF * o.ss,
                    o.hs + 2 * sF * o.ss};
    for (long s = 0; s < sF; s++) act_grad_strip(&act, s);
    gemm(R, F, sK, rows_in_place(dgu, 2 * F), p->w13p + e * p->per13, F * SP, cdx, Kp, 0, /* dx; x's rows */
         ahead_of(p->x + r0 * K, R * K * sizeof(bf16), p->dy + (r0 + R) * N, next_R * N * sizeof(bf16)));
    for (long r = 0; r < R; r++) to_bf16(cdx + r * Kp, p->dx + (r0 + r) * K, K);
    pack_a_t(p->x + r0 * K, K, K, R, o.xa + q * MR, o.ts);
    pack_a_t(p->dy + r0 * N, N, N, R, o.ya + q * MR, o.ts);
}

/* The backward of moekit_swiglu_blocks_bf16. The row pass, over blocks of each expert's rows:
 * dh = dy @ w2^T, the SwiGLU's derivative, dx = [dgate | dup] @ [w1^T; w3^T], and the block's
 * weight gradients' operands laid out (x^T and dy^T packed; hidden, dgate and dup written in
 * the micro-kernel's layout by the activation itself).
 *
 * Where an expert's weight gradients are small (float32 sums up to SUMS_MAX), its rows are cut
 * into a few chunks (2 per thread over all experts, by rows), each a task: its blocks'
 * operands gathered in groups that stay in L2 with the chunk's sums, each group's products
 * added to the sums while they are in cache, so the operands never reach memory. An
 * expert's first chunk stores its sums as the gradients, the others keep theirs, added in
 * chunk order after the pass: the gradients do not depend on which thread ran what (the
 * same for a given thread count). Wider experts lay out all of their rows' operands in memory
 * and a weight pass shares the gradients' columns among the threads: a chunk's own sums of a
 * wide expert would cost more to add up than the operands to read back.
 * benchmarks/moe_vs_dense.py --dtype bfloat16 measures it against the dense model. */
int moekit_swiglu_blocks_bf16_backward(const bf16 *x, long K, const long *counts, long E, const void *w1,
                                       const void *w3, long e13, long ld13, long F, const void *w2, long e2, long ld2,
                                       long N, int wf32, const bf16 *gate_save, const bf16 *up_save, const bf16 *dy,
                                       bf16 *dx, void *dw1, void *dw3, void *dw2, int nthreads)
{
    if (K < 2 || F < 2 || N < 2 || K % 2 || F % 2 || N % 2 || ld13 % 2 || ld2 % 2)
        return 2;
    long sF = cdiv(F, NR), sK = cdiv(K, NR), Fp = sF * NR, Kp = sK * NR, tK = cdiv(K, MR), tN = cdiv(N, MR);
    long str2 = (N / 2) * SP, str13 = F * SP;   /* strips of w2^T [N, F] and of [w1^T; w3^T] [2F, K] */
    long per2 = sF * str2, per13 = sK * str13;
    long sums = (2 * K + N) * Fp;               /* an expert's sums: dW1, dW3 [K, Fp], dW2^T [N, Fp] */
    int own = sums * (long)sizeof(float) <= SUMS_MAX; /* chunks with their own sums, else a shared weight pass */
    long rows = 0, pairs = 0;
    for (long e = 0; e < E; e++) {
        rows += counts[e];
        pairs += cdiv(counts[e], 2);
    }
    /* own sums: a chunk's rows at most (a multiple of BROWS), and pairs of rows in a group (a
     * block's, times the sums' size in units of SUMS_L2); else each task a block */
    long chunk = own && rows > 2L * nthreads * BROWS ? BROWS * cdiv(cdiv(rows, 2L * nthreads), BROWS) : BROWS;
    long parts_most = PARTS_MAX / (sums * (long)sizeof(float)); /* later chunks' sums kept at once, at most */
    if (own && rows / chunk > parts_most) chunk = BROWS * cdiv(cdiv(rows, parts_most), BROWS);
    long gp = own ? BROWS / 2 * cdiv(sums * (long)sizeof(float), SUMS_L2) : 0;
    long n_tasks = 0, n_parts = 0;
    for (long e = 0; e < E; e++) n_tasks += cdiv(counts[e], chunk);
    long w_blocks = 3 * cdiv(sF, WS);           /* the shared weight pass's tasks per expert */
    /* each expert's first row, first pair of rows, and first slot of its later chunks' sums */
    long *start = malloc(3 * (E + 1) * sizeof(long)), *pair0 = start + E + 1, *part0 = pair0 + E + 1;
    task *tasks = malloc((n_tasks + (own ? 0 : E * w_blocks) + 1) * sizeof(task));
    long scratch = wf32 ? (K > N ? K : N) * F : 0; /* a float32 weight rounded, before packing */
    long cw = own ? sums : (K > N ? K : N) * WS * NR; /* the sums, or a task's columns */
    long per_thread = (BROWS * (Fp + Kp) + cw) * sizeof(float) + gp * MR * (tK + tN) * sizeof(uint32_t) +
                      (2 * BROWS * F + 3 * sF * gp * SP + scratch) * sizeof(bf16);
    per_thread = cdiv(per_thread, 64) * 64;
    if (!start || !tasks) {
        free(start);
        free(tasks);
        return -1;
    }
    starts(counts, E, start);
    for (long e = 0, q = 0; e < E; q += cdiv(counts[e], 2), e++) pair0[e] = q;
    for (long e = 0; e < E; n_parts += counts[e] ? cdiv(counts[e], chunk) - 1 : 0, e++) part0[e] = n_parts;
    n_tasks = row_tasks(counts, E, chunk, tasks); /* a task's which: its chunk's index within the expert */
    for (long t = 0; t < n_tasks; t++) {
        tasks[t].which = t && tasks[t].e == tasks[t - 1].e ? tasks[t - 1].which + 1 : 0;
        tasks[t].cost = tasks[t].b - tasks[t].a;
    }
    if (own) qsort(tasks, n_tasks, sizeof(task), by_cost); /* the longest chunks first */
    size_t wp_bytes = (size_t)E * (per2 + per13) * sizeof(bf16), buf_bytes = (size_t)nthreads * per_thread;
    size_t lay_bytes = own ? 0 : (size_t)pairs * (MR * (tK + tN) * sizeof(uint32_t) + 3 * sF * SP * sizeof(bf16));
    size_t parts_bytes = (size_t)n_parts * sums * sizeof(float); /* the sums of experts' later chunks */
    /* float32 sums for bfloat16 weights' gradients, rounded once at the end */
    size_t acc_bytes = wf32 ? 0 : (size_t)E * (2 * K * F + F * N) * sizeof(float);
    workspace ws = ws_get(wp_bytes + buf_bytes + lay_bytes + parts_bytes + acc_bytes);
    bf16 *wp = ws.mem ? ws_part(&ws, wp_bytes) : NULL;
    char *buf = ws.mem ? ws_part(&ws, buf_bytes) : NULL, *lay = ws.mem ? ws_part(&ws, lay_bytes) : NULL;
    float *parts = ws.mem ? ws_part(&ws, parts_bytes) : NULL, *acc = ws.mem && !wf32 ? ws_part(&ws, acc_bytes) : NULL;
    float *g1 = wf32 ? dw1 : acc, *g3 = wf32 ? dw3 : acc + E * K * F, *g2 = wf32 ? dw2 : acc + 2 * E * K * F;
    int rc = 0;
    if (!wp || !buf) {
        rc = -1;
        goto done;
    }
    task *wt = tasks + n_tasks;
    long n_w = 0;
    for (long e = 0; !own && e < E; e++) /* strips [a, b) of dW1 (which 1), dW3 (3), dW2^T (2) */
        for (int which = 1; counts[e] && which <= 3; which++)
            for (long s = 0; s < sF; s += WS) {
                long b = s + WS < sF ? s + WS : sF;
                wt[n_w++] = (task){e, s, b, (which == 2 ? N : K) * (b - s) * counts[e], which};
            }
    qsort(wt, n_w, sizeof(task), by_cost);
    bf16 *wp13 = wp + E * per2;
    row_pass rp = {x, dy, gate_save, up_save, dx, K, F, N, wp, wp13, per2, per13};
    uint32_t *lay_x = (uint32_t *)lay, *lay_y = lay_x + pairs * MR * tK;
    bf16 *lay_h = (bf16 *)(lay_y + pairs * MR * tN);
    #pragma omp parallel num_threads(nthreads)
    {
        float *cdh = (float *)(buf + omp_get_thread_num() * per_thread), *cdx = cdh + BROWS * Fp, *mine = cdx + BROWS * Kp;
        uint32_t *xa = (uint32_t *)(mine + cw), *ya = xa + gp * MR * tK;
        bf16 *dgu = (bf16 *)(ya + gp * MR * tN), *hs = dgu + 2 * BROWS * F, *wb = hs + 3 * sF * gp * SP;
        operands group = {xa, ya, hs, gp * MR, gp * SP};
        #pragma omp for schedule(dynamic, 1)
        for (long t = 0; t < 3 * E; t++) {
            long e = t / 3, ldb;
            if (!counts[e]) continue;
            if (t % 3 == 0) { /* w2^T: [N, F] */
                const bf16 *w = weight_bf16(elem(w2, e * e2, wf32), wf32, F, N, ld2, wb, &ldb);
                pack_b_cols(w, ldb, N, F, wp + e * per2, str2);
            } else { /* w1^T above w3^T: [2F, K], F/2 pairs each */
                const bf16 *w = weight_bf16(elem(t % 3 == 1 ? w1 : w3, e * e13, wf32), wf32, K, F, ld13, wb, &ldb);
                pack_b_cols(w, ldb, F, K, wp13 + e * per13 + (t % 3 - 1) * (F / 2) * SP, str13);
            }
        }
        #pragma omp for schedule(dynamic, 1)
        for (long t = 0; t < n_tasks; t++) {
            long e = tasks[t].e, a = tasks[t].a, b = tasks[t].b;
            if (!own) { /* one block, its operands in the expert's layout in memory */
                long kp = cdiv(counts[e], 2);
                operands o = {lay_x + pair0[e] * MR * tK, lay_y + pair0[e] * MR * tN, lay_h + pair0[e] * 3 * sF * SP,
                              kp * MR, kp * SP};
                row_block(&rp, e, start[e] + a, b - a, o, a / 2, cdh, cdx, dgu, 0);
                continue;
            }
            long c = tasks[t].which, q = 0; /* the chunk's index in the expert; the group's pairs */
            float *sum = c ? parts + (part0[e] + c - 1) * sums : mine;
            int more = 0; /* sum holds the chunk's earlier groups */
            for (long r = a; r < b; r += BROWS) {
                long R = b - r < BROWS ? b - r : BROWS;
                if (q + cdiv(R, 2) > gp) { /* the group is full */
                    weight_products(K, N, sF, Fp, q, group, sum, more);
                    more = 1;
                    q = 0;
                }
                row_block(&rp, e, start[e] + r, R, group, q, cdh, cdx, dgu, b - (r + R) < BROWS ? b - (r + R) : BROWS);
                q += cdiv(R, 2);
            }
            weight_products(K, N, sF, Fp, q, group, sum, more);
            if (!c) put_sums(sum, e, K, F, N, Fp, g1, g3, g2, 0); /* the expert's first chunk: its gradients */
        }
        /* the implied barrier: every chunk's sums are in, every operand laid out */
        #pragma omp for schedule(dynamic, 1)
        for (long e = 0; e < E; e++) /* an expert's later chunks' sums added, in order */
            for (long i = part0[e]; own && i < (e + 1 < E ? part0[e + 1] : n_parts); i++)
                put_sums(parts + i * sums, e, K, F, N, Fp, g1, g3, g2, 1);
        /* wide experts: the weight pass over their laid-out operands, blocks of the gradients shared */
        #pragma omp for schedule(dynamic, 1)
        for (long t = 0; t < n_w; t++) {
            long e = wt[t].e, s0 = wt[t].a, ns = wt[t].b - s0, kp = cdiv(counts[e], 2), m = wt[t].which == 2 ? N : K;
            long n = (wt[t].b * NR < F ? wt[t].b * NR : F) - s0 * NR;
            int which = wt[t].which;
            /* dW1 = x^T @ dgate, dW3 = x^T @ dup, dW2^T = dy^T @ hidden: their strips s0.. */
            lhs A = {which == 2 ? lay_y + pair0[e] * MR * tN : lay_x + pair0[e] * MR * tK, 1, MR, kp * MR};
            const bf16 *B = lay_h + pair0[e] * 3 * sF * SP + ((which == 2 ? 0 : which == 1 ? 1 : 2) * sF + s0) * kp * SP;
            gemm(m, kp, ns, A, B, kp * SP, mine, ns * NR, 0, NOTHING);
            if (which == 2) store_t(mine, ns * NR, N, n, g2 + e * F * N + s0 * NR * N, N, 0); /* into dW2's rows */
            else store_rows(mine, ns * NR, K, n, (which == 1 ? g1 : g3) + e * K * F + s0 * NR, F, 0);
        }
        /* experts without rows: zero gradients; bfloat16 gradients: the float32 sums rounded */
        #pragma omp for schedule(dynamic, 1)
        for (long e = 0; e < E; e++) {
            void *d[3] = {(void *)elem(dw1, e * K * F, wf32), (void *)elem(dw3, e * K * F, wf32), (void *)elem(dw2, e * F * N, wf32)};
            long n[3] = {K * F, K * F, F * N};
            const float *from[3] = {g1 + e * K * F, g3 + e * K * F, g2 + e * F * N};
            for (int i = 0; i < 3; i++) {
                if (!counts[e]) memset(d[i], 0, (size_t)n[i] * (wf32 ? 4 : 2));
                else if (!wf32) to_bf16(from[i], d[i], n[i]);
            }
        }
    }
done:
    free(start);
    free(tasks);
    ws_put(ws);
    return rc;
}

#else /* no AVX-512 BF16 in this build: the callers check moekit_blocks_bf16_built first */

int moekit_swiglu_blocks_bf16(const uint16_t *x, long K, const long *counts, long E, const void *w1, const void *w3,
                              long e13, long ld13, long F, const void *w2, long e2, long ld2, long N, int wf32,
                              uint16_t *out, uint16_t *gate_save, uint16_t *up_save, int nthreads)
{
    (void)x, (void)K, (void)counts, (void)E, (void)w1, (void)w3, (void)e13, (void)ld13, (void)F, (void)w2;
    (void)e2, (void)ld2, (void)N, (void)wf32, (void)out, (void)gate_save, (void)up_save, (void)nthreads;
    return 2;
}

int moekit_swiglu_blocks_bf16_backward(const uint16_t *x, long K, const long *counts, long E, const void *w1,
                                       const void *w3, long e13, long ld13, long F, const void *w2, long e2, long ld2,
                                       long N, int wf32, const uint16_t *gate_save, const uint16_t *up_save,
                                       const uint16_t *dy, uint16_t *dx, void *dw1, void *dw3, void *dw2, int nthreads)
{
    (void)x, (void)K, (void)counts, (void)E, (void)w1, (void)w3, (void)e13, (void)ld13, (void)F, (void)w2;
    (void)e2, (void)ld2, (void)N, (void)wf32, (void)gate_save, (void)up_save, (void)dy, (void)dx, (void)dw1, (void)dw3;
    (void)dw2, (void)nthreads;
    return 2;
}

#endif
