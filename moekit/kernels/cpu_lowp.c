/* moekit CPU kernels: products with low-precision weights (moekit/ops/lowp.py's formats), and
 * the decode steps built on them.
 *
 * out[m, n] = alpha * sum_k W[n, k] x[m, k] (+ out[m, n] when accumulate), for up to 64 rows
 * x a call: each weight row is read once for all rows of x, so a decode step costs the
 * weights' bytes at memory speed, a half (bf16), a quarter (int8) or about an eighth (int4)
 * of float32's. bf16 weights multiply x in float32 (vdpbf16ps on x split into two bf16
 * halves where AVX-512 BF16 is built, else widened in registers); for int8 and int4 each row
 * of x is first quantised to int8 with one scale (llama.cpp's q8 activations) and the
 * products are integer dot products, scaled back in float32:
 *   fmt 0, bf16: w uint16 [N, K] (bfloat16 bits);
 *   fmt 1, int8: w int8 [N, K], scale float [N]            (W = q * scale[n]);
 *   fmt 2, int4: w uint8 [N, K/2], scale float [N, K/G]   (W = (code - 8) * scale[n, g]),
 *     within each group of G weights byte j holds code j (low nibble) and code j + G/2
 *     (high nibble), so both halves multiply contiguous x (the layout of llama.cpp's q4_0).
 * Integer dot products: AVX-512 VNNI (vpdpbusd: unsigned x signed bytes) where built, so
 * int8 rows meet activations offset by 128 (the offset's share, 128 * sum w, taken off) and
 * int4 codes (0..15, unsigned: a byte's two nibbles) meet the activations reordered once per
 * vector to match (the -8 offset's share pre-summed per lane); else AVX2 maddubs, else
 * plain loops. Four weight rows at a time share each load of x, and with VNNI two rows of x
 * share each load of the weights. Parallel over blocks of rows.
 *
 * Decode steps, in place on the residual: moekit_moe_token_lowp (norm, the float32 router,
 * each chosen SwiGLU expert, for up to 64 tokens: each chosen expert's codes read once for
 * all the tokens that chose it) and moekit_attention_token_lowp (one token: norm, q/k/v,
 * RoPE, cache, attention, output projection), the weights in one format; the router and the
 * attention middle are cpu_gemv.c's. Built with the other kernels by moekit/kernels/library.py;
 * moekit/ops/lowp.py holds the torch reference.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#include "cpu_bf16.h"

void moekit_rmsnorm(const float *x, const float *g, long n, float eps, float *out);          /* cpu_gemv.c */
void moekit_silu_mul_rows(const float *g, const float *u, float *out, long n);                 /* cpu_gemv.c */
void moekit_route_token(const float *h, long K, const float *wr, const float *br, long E, int k, int renormalize,
                        float scale, float *logits, long *chosen, float *chosen_w, float *logits_out,
                        float *probs_out, long *counts_out);                                   /* cpu_gemv.c */
void moekit_attend_token(float *qkv, float *y, float *scores, long H, long Hkv, long hd, const float *cos,
                         const float *sin, float *kc, float *vc, long hs, long pos, long start, int nthreads);
void moekit_share(long n, long align, long *a, long *b); /* cpu_gemv.c: this thread's [a, b) of n */

#define PARALLEL_MIN 65536 /* weights: below this one thread (a parallel region costs microseconds) */
#define R 4                /* weight rows per block */
#define LOWP_MAX_ROWS 64   /* rows of x (tokens) one call takes: kernels/lowp.py's LOWP_MAX_ROWS */

/* s[r] = dot(row r of the block, x) for the R rows starting at w (row stride K), r < rows */
__attribute__((unused)) static void bf16_block(const uint16_t *w, long K, long rows, const float *x, float *s)
{
    const uint16_t *w0 = w, *w1 = w + (rows > 1) * K, *w2 = w + (rows > 2) * 2 * K, *w3 = w + (rows > 3) * 3 * K;
    float a0 = 0, a1 = 0, a2 = 0, a3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
    for (long k = 0; k < K; k++) {
        float v = x[k];
        a0 += bf16_in(w0[k]) * v;
        a1 += bf16_in(w1[k]) * v;
        a2 += bf16_in(w2[k]) * v;
        a3 += bf16_in(w3[k]) * v;
    }
    s[0] = a0, s[1] = a1, s[2] = a2, s[3] = a3;
}

/* x quantised to int8 with one scale (llama.cpp's q8 activations): xq = round(x / sx),
 * sx = max |x| / 127 (1 for a zero row), rounding half to even as torch.round does. */
static float quantize_row(const float *x, long K, int8_t *xq)
{
    float amax = 0.0f;
    for (long k = 0; k < K; k++)
        amax = fabsf(x[k]) > amax ? fabsf(x[k]) : amax;
    float sx = amax > 0.0f ? amax / 127.0f : 1.0f;
    for (long k = 0; k < K; k++)
        xq[k] = (int8_t)lrintf(x[k] / sx);
    return sx;
}

#if defined(__AVX2__)
#include <immintrin.h>
/* 8 int32 sums of products of 32 signed bytes: maddubs takes unsigned x signed, so the
 * weight's sign moves onto the activation (|w| * sign(w) a); pairs stay below 2^15. */
static inline __m256i dot32(__m256i w, __m256i a)
{
    __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(a, w));
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
}
static inline int hsum_i32(__m256i v)
{
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}
static inline float hsum_f32(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* integer dot of one int8 weight row with xq (K a multiple of 32 on the vector path) */
static int64_t i8_dot(const int8_t *w, const int8_t *xq, long K)
{
    long k = 0;
    int64_t total = 0;
#if defined(__AVX2__)
    __m256i acc = _mm256_setzero_si256();
    for (; k + 32 <= K; k += 32) {
        acc = _mm256_add_epi32(acc, dot32(_mm256_loadu_si256((const __m256i *)(w + k)),
                                          _mm256_loadu_si256((const __m256i *)(xq + k))));
        if ((k & 8191) == 8160) { /* flush well before 8 lanes of int32 could overflow */
            total += hsum_i32(acc);
            acc = _mm256_setzero_si256();
        }
    }
    total += hsum_i32(acc);
#endif
    for (; k < K; k++)
        total += (int32_t)w[k] * xq[k];
    return total;
}

/* int4 row: sum over groups of scale[g] * dot(codes - 8, xq), in float */
static float i4_dot(const uint8_t *q, const float *scale, const int8_t *xq, long K, long G)
{
    long groups = K / G, half = G / 2;
    float s = 0.0f;
#if defined(__AVX2__)
    if (G % 32 == 0) {
        __m256 acc = _mm256_setzero_ps();
        const __m128i low = _mm_set1_epi8(15), eight = _mm_set1_epi8(8);
        for (long g = 0; g < groups; g++) {
            const uint8_t *b = q + g * half;
            const int8_t *a = xq + g * G;
            __m256i t = _mm256_setzero_si256();
            for (long j = 0; j < half; j += 16) { /* 16 bytes: codes j..j+15 and j+half.. */
                __m128i bytes = _mm_loadu_si128((const __m128i *)(b + j));
                __m128i lo = _mm_sub_epi8(_mm_and_si128(bytes, low), eight);
                __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(bytes, 4), low), eight);
                __m256i alo = _mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(a + j)));
                alo = _mm256_inserti128_si256(alo, _mm_loadu_si128((const __m128i *)(a + half + j)), 1);
                t = _mm256_add_epi32(t, dot32(_mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1), alo));
            }
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), _mm256_set1_ps(scale[g]), acc);
        }
        return hsum_f32(acc);
    }
#endif
    for (long g = 0; g < groups; g++) {
        const uint8_t *b = q + g * half;
        const int8_t *a = xq + g * G;
        int32_t t = 0;
        for (long j = 0; j < half; j++)
            t += ((int32_t)(b[j] & 15) - 8) * a[j] + ((int32_t)(b[j] >> 4) - 8) * a[j + half];
        s += scale[g] * (float)t;
    }
    return s;
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define VNNI 1
/* The weights AHEAD_ROWS rows ahead of the ones being read are fetched (a block's four
 * rows are four short streams, too short for the hardware prefetcher to ramp up on); a hint,
 * never a fault. Tuned by benchmarks/quantize.py. */
#define AHEAD_ROWS 8
static inline void fetch_ahead(const void *p, long row_bytes)
{
    _mm_prefetch((const char *)p + AHEAD_ROWS * row_bytes, _MM_HINT_T0);
}

/* Four bf16 rows against float x: each 16 weights widened (zero-extend, shift into the high
 * half) and multiplied in float32, 32 a step (a cache line of each row), the tail through masks. */
static inline __m512 bf16_widen(const uint16_t *p, __mmask16 m)
{
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
static inline __m512 bf16_load(const uint16_t *p)
{
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
static void bf16_block_avx512(const uint16_t *w, long K, long rows, const float *x, float *s)
{
    const uint16_t *w0 = w, *w1 = w + (rows > 1) * K, *w2 = w + (rows > 2) * 2 * K, *w3 = w + (rows > 3) * 3 * K;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    long k = 0, rb = 2 * K;
    for (; k + 32 <= K; k += 32) {
        fetch_ahead(w0 + k, rb), fetch_ahead(w1 + k, rb), fetch_ahead(w2 + k, rb), fetch_ahead(w3 + k, rb);
        __m512 xa = _mm512_loadu_ps(x + k), xb = _mm512_loadu_ps(x + k + 16);
        a0 = _mm512_fmadd_ps(bf16_load(w0 + k), xa, a0), b0 = _mm512_fmadd_ps(bf16_load(w0 + k + 16), xb, b0);
        a1 = _mm512_fmadd_ps(bf16_load(w1 + k), xa, a1), b1 = _mm512_fmadd_ps(bf16_load(w1 + k + 16), xb, b1);
        a2 = _mm512_fmadd_ps(bf16_load(w2 + k), xa, a2), b2 = _mm512_fmadd_ps(bf16_load(w2 + k + 16), xb, b2);
        a3 = _mm512_fmadd_ps(bf16_load(w3 + k), xa, a3), b3 = _mm512_fmadd_ps(bf16_load(w3 + k + 16), xb, b3);
    }
    for (; k < K; k += 16) {
        __mmask16 m = K - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (K - k)) - 1);
        __m512 xv = _mm512_maskz_loadu_ps(m, x + k);
        a0 = _mm512_fmadd_ps(bf16_widen(w0 + k, m), xv, a0);
        a1 = _mm512_fmadd_ps(bf16_widen(w1 + k, m), xv, a1);
        a2 = _mm512_fmadd_ps(bf16_widen(w2 + k, m), xv, a2);
        a3 = _mm512_fmadd_ps(bf16_widen(w3 + k, m), xv, a3);
    }
    s[0] = _mm512_reduce_add_ps(_mm512_add_ps(a0, b0)), s[1] = _mm512_reduce_add_ps(_mm512_add_ps(a1, b1));
    s[2] = _mm512_reduce_add_ps(_mm512_add_ps(a2, b2)), s[3] = _mm512_reduce_add_ps(_mm512_add_ps(a3, b3));
}

#if defined(__AVX512BF16__)
#define BF16_DOT 1
/* Four bf16 rows against x split into two bf16 vectors, x = hi + lo to 16 bits of mantissa
 * (lowp_prepare): vdpbf16ps multiplies pairs of bf16 exactly and adds in float32, so each
 * row's sum is float32's to about 2^-17 at a third of the widening loop's instructions. */
static void bf16_block_dot(const uint16_t *w, long K, long rows, const uint16_t *hi, const uint16_t *lo, float *s)
{
    const uint16_t *w0 = w, *w1 = w + (rows > 1) * K, *w2 = w + (rows > 2) * 2 * K, *w3 = w + (rows > 3) * 3 * K;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    long k = 0, rb = 2 * K;
#define BF16_STEP(LOAD)                                                                              \
    do {                                                                                             \
        __m512bh xh = (__m512bh)LOAD(hi + k), xl = (__m512bh)LOAD(lo + k);                           \
        __m512bh v0 = (__m512bh)LOAD(w0 + k), v1 = (__m512bh)LOAD(w1 + k);                          \
        __m512bh v2 = (__m512bh)LOAD(w2 + k), v3 = (__m512bh)LOAD(w3 + k);                          \
        a0 = _mm512_dpbf16_ps(a0, v0, xh), b0 = _mm512_dpbf16_ps(b0, v0, xl);                        \
        a1 = _mm512_dpbf16_ps(a1, v1, xh), b1 = _mm512_dpbf16_ps(b1, v1, xl);                        \
        a2 = _mm512_dpbf16_ps(a2, v2, xh), b2 = _mm512_dpbf16_ps(b2, v2, xl);                        \
        a3 = _mm512_dpbf16_ps(a3, v3, xh), b3 = _mm512_dpbf16_ps(b3, v3, xl);                        \
    } while (0)
#define FULL(p) _mm512_loadu_si512((const void *)(p))
#define PART(p) _mm512_maskz_loadu_epi16(m, (const void *)(p))
    for (; k + 32 <= K; k += 32) {
        fetch_ahead(w0 + k, rb), fetch_ahead(w1 + k, rb), fetch_ahead(w2 + k, rb), fetch_ahead(w3 + k, rb);
        BF16_STEP(FULL);
    }
    if (k < K) {
        __mmask32 m = (__mmask32)((1ull << (K - k)) - 1);
        BF16_STEP(PART);
    }
#undef FULL
#undef PART
#undef BF16_STEP
    s[0] = _mm512_reduce_add_ps(_mm512_add_ps(a0, b0)), s[1] = _mm512_reduce_add_ps(_mm512_add_ps(a1, b1));
    s[2] = _mm512_reduce_add_ps(_mm512_add_ps(a2, b2)), s[3] = _mm512_reduce_add_ps(_mm512_add_ps(a3, b3));
}
#else
#define BF16_DOT 0
#endif

/* Four int8 rows against xu = xq + 128 (unsigned): dot(xq, w) = dot(xu, w) - 128 sum(w), both
 * sums by vpdpbusd. Lanes stay below 2^31 for K <= VNNI_I8_MAX_K (int8_vnni). */
#define VNNI_I8_MAX_K 65536
static void i8_block_vnni(const int8_t *w, long K, long rows, const uint8_t *xu, int32_t *s)
{
    const int8_t *w0 = w, *w1 = w + (rows > 1) * K, *w2 = w + (rows > 2) * 2 * K, *w3 = w + (rows > 3) * 3 * K;
    const __m512i c128 = _mm512_set1_epi8((char)0x80);
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0, c0 = a0, c1 = a0, c2 = a0, c3 = a0;
    long k = 0;
    for (; k + 64 <= K; k += 64) {
        fetch_ahead(w0 + k, K), fetch_ahead(w1 + k, K), fetch_ahead(w2 + k, K), fetch_ahead(w3 + k, K);
        __m512i xv = _mm512_loadu_si512(xu + k);
        __m512i v0 = _mm512_loadu_si512(w0 + k), v1 = _mm512_loadu_si512(w1 + k);
        __m512i v2 = _mm512_loadu_si512(w2 + k), v3 = _mm512_loadu_si512(w3 + k);
        a0 = _mm512_dpbusd_epi32(a0, xv, v0), c0 = _mm512_dpbusd_epi32(c0, c128, v0);
        a1 = _mm512_dpbusd_epi32(a1, xv, v1), c1 = _mm512_dpbusd_epi32(c1, c128, v1);
        a2 = _mm512_dpbusd_epi32(a2, xv, v2), c2 = _mm512_dpbusd_epi32(c2, c128, v2);
        a3 = _mm512_dpbusd_epi32(a3, xv, v3), c3 = _mm512_dpbusd_epi32(c3, c128, v3);
    }
    if (k < K) {
        __mmask64 m = ((__mmask64)1 << (K - k)) - 1;
        __m512i xv = _mm512_maskz_loadu_epi8(m, xu + k);
        __m512i v0 = _mm512_maskz_loadu_epi8(m, w0 + k), v1 = _mm512_maskz_loadu_epi8(m, w1 + k);
        __m512i v2 = _mm512_maskz_loadu_epi8(m, w2 + k), v3 = _mm512_maskz_loadu_epi8(m, w3 + k);
        a0 = _mm512_dpbusd_epi32(a0, xv, v0), c0 = _mm512_dpbusd_epi32(c0, c128, v0);
        a1 = _mm512_dpbusd_epi32(a1, xv, v1), c1 = _mm512_dpbusd_epi32(c1, c128, v1);
        a2 = _mm512_dpbusd_epi32(a2, xv, v2), c2 = _mm512_dpbusd_epi32(c2, c128, v2);
        a3 = _mm512_dpbusd_epi32(a3, xv, v3), c3 = _mm512_dpbusd_epi32(c3, c128, v3);
    }
    s[0] = _mm512_reduce_add_epi32(_mm512_sub_epi32(a0, c0)), s[1] = _mm512_reduce_add_epi32(_mm512_sub_epi32(a1, c1));
    s[2] = _mm512_reduce_add_epi32(_mm512_sub_epi32(a2, c2)), s[3] = _mm512_reduce_add_epi32(_mm512_sub_epi32(a3, c3));
}

/* Four int4 rows, 128 codes (64 bytes) a step: the bytes' low nibbles meet x's values for
 * them and the high nibbles theirs (x reordered once by lowp_prepare), both vpdpbusd into one
 * sum per lane starting from the lane's -8 * sum(x); a lane's four bytes lie in one group, so
 * each lane's sum is scaled by its group's scale in float. Groups of 32 (four a step: lanes
 * 0-3 the first), 64 (two) or a multiple of 128 (one scale a step). */
static inline __m512 i4_scales(const float *sc, long c, long G)
{
    if (G == 32) {
        const __m512i pat = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
        return _mm512_permutexvar_ps(pat, _mm512_castps128_ps512(_mm_loadu_ps(sc + 4 * c)));
    }
    if (G == 64) {
        const __m512i pat = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
        return _mm512_permutexvar_ps(pat, _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd((const double *)(sc + 2 * c)))));
    }
    return _mm512_set1_ps(sc[c * 128 / G]);
}
static inline __m512 i4_step(const uint8_t *w, __m512i bv, __m512i xlo, __m512i xhi, __m512 scale, __m512 acc)
{
    const __m512i low = _mm512_set1_epi8(15);
    __m512i b = _mm512_loadu_si512(w);
    __m512i t = _mm512_dpbusd_epi32(bv, _mm512_and_si512(b, low), xlo);
    t = _mm512_dpbusd_epi32(t, _mm512_and_si512(_mm512_srli_epi16(b, 4), low), xhi);
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), scale, acc);
}
static inline void i4_block_vnni_g(const uint8_t *w, const float *scale, long K, long G, long rows, const int8_t *xp,
                                   const int32_t *bias, float *s)
{
    long half = K / 2, ns = K / G;
    const uint8_t *w0 = w, *w1 = w + (rows > 1) * half, *w2 = w + (rows > 2) * 2 * half, *w3 = w + (rows > 3) * 3 * half;
    const float *s0 = scale, *s1 = scale + (rows > 1) * ns, *s2 = scale + (rows > 2) * 2 * ns, *s3 = scale + (rows > 3) * 3 * ns;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (long c = 0; c < K / 128; c++) {
        fetch_ahead(w0 + 64 * c, half), fetch_ahead(w1 + 64 * c, half), fetch_ahead(w2 + 64 * c, half),
            fetch_ahead(w3 + 64 * c, half);
        __m512i xlo = _mm512_loadu_si512(xp + 128 * c), xhi = _mm512_loadu_si512(xp + 128 * c + 64);
        __m512i bv = _mm512_loadu_si512(bias + 16 * c);
        a0 = i4_step(w0 + 64 * c, bv, xlo, xhi, i4_scales(s0, c, G), a0);
        a1 = i4_step(w1 + 64 * c, bv, xlo, xhi, i4_scales(s1, c, G), a1);
        a2 = i4_step(w2 + 64 * c, bv, xlo, xhi, i4_scales(s2, c, G), a2);
        a3 = i4_step(w3 + 64 * c, bv, xlo, xhi, i4_scales(s3, c, G), a3);
    }
    s[0] = _mm512_reduce_add_ps(a0), s[1] = _mm512_reduce_add_ps(a1);
    s[2] = _mm512_reduce_add_ps(a2), s[3] = _mm512_reduce_add_ps(a3);
}
static void i4_block_vnni(const uint8_t *w, const float *scale, long K, long G, long rows, const int8_t *xp,
                          const int32_t *bias, float *s)
{
    if (G == 32) /* the group size a constant where it is common: the scale pattern folds */
        i4_block_vnni_g(w, scale, K, 32, rows, xp, bias, s);
    else
        i4_block_vnni_g(w, scale, K, G, rows, xp, bias, s);
}

/* i8_block_vnni for two vectors at once: each weight load and the weights' sums serve both */
static void i8_block_vnni2(const int8_t *w, long K, long rows, const uint8_t *xa, const uint8_t *xb, int32_t *sa,
                           int32_t *sb)
{
    const int8_t *w0 = w, *w1 = w + (rows > 1) * K, *w2 = w + (rows > 2) * 2 * K, *w3 = w + (rows > 3) * 3 * K;
    const __m512i c128 = _mm512_set1_epi8((char)0x80);
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    __m512i c0 = a0, c1 = a0, c2 = a0, c3 = a0;
    for (long k = 0; k < K; k += 64) {
        __mmask64 m = K - k >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (K - k)) - 1);
        __m512i xv = _mm512_maskz_loadu_epi8(m, xa + k), yv = _mm512_maskz_loadu_epi8(m, xb + k);
        __m512i v0 = _mm512_maskz_loadu_epi8(m, w0 + k), v1 = _mm512_maskz_loadu_epi8(m, w1 + k);
        __m512i v2 = _mm512_maskz_loadu_epi8(m, w2 + k), v3 = _mm512_maskz_loadu_epi8(m, w3 + k);
        a0 = _mm512_dpbusd_epi32(a0, xv, v0), b0 = _mm512_dpbusd_epi32(b0, yv, v0), c0 = _mm512_dpbusd_epi32(c0, c128, v0);
        a1 = _mm512_dpbusd_epi32(a1, xv, v1), b1 = _mm512_dpbusd_epi32(b1, yv, v1), c1 = _mm512_dpbusd_epi32(c1, c128, v1);
        a2 = _mm512_dpbusd_epi32(a2, xv, v2), b2 = _mm512_dpbusd_epi32(b2, yv, v2), c2 = _mm512_dpbusd_epi32(c2, c128, v2);
        a3 = _mm512_dpbusd_epi32(a3, xv, v3), b3 = _mm512_dpbusd_epi32(b3, yv, v3), c3 = _mm512_dpbusd_epi32(c3, c128, v3);
    }
    sa[0] = _mm512_reduce_add_epi32(_mm512_sub_epi32(a0, c0)), sb[0] = _mm512_reduce_add_epi32(_mm512_sub_epi32(b0, c0));
    sa[1] = _mm512_reduce_add_epi32(_mm512_sub_epi32(a1, c1)), sb[1] = _mm512_reduce_add_epi32(_mm512_sub_epi32(b1, c1));
    sa[2] = _mm512_reduce_add_epi32(_mm512_sub_epi32(a2, c2)), sb[2] = _mm512_reduce_add_epi32(_mm512_sub_epi32(b2, c2));
    sa[3] = _mm512_reduce_add_epi32(_mm512_sub_epi32(a3, c3)), sb[3] = _mm512_reduce_add_epi32(_mm512_sub_epi32(b3, c3));
}

/* i4_block_vnni for two vectors at once: each row's codes unpacked and its scales built once for both */
static inline void i4_block_vnni2_g(const uint8_t *w, const float *scale, long K, long G, long rows,
                                    const int8_t *xa, const int32_t *ba, const int8_t *xb, const int32_t *bb,
                                    float *sa, float *sb)
{
    long half = K / 2, ns = K / G;
    const __m512i low = _mm512_set1_epi8(15);
    __m512 a[R], b[R];
    for (int r = 0; r < R; r++) a[r] = b[r] = _mm512_setzero_ps();
    for (long c = 0; c < K / 128; c++) {
        __m512i xla = _mm512_loadu_si512(xa + 128 * c), xha = _mm512_loadu_si512(xa + 128 * c + 64);
        __m512i xlb = _mm512_loadu_si512(xb + 128 * c), xhb = _mm512_loadu_si512(xb + 128 * c + 64);
        __m512i bva = _mm512_loadu_si512(ba + 16 * c), bvb = _mm512_loadu_si512(bb + 16 * c);
        for (int r = 0; r < R; r++) { /* unrolled: R is a constant */
            const uint8_t *wr = w + (rows > r) * r * half + 64 * c;
            __m512i v = _mm512_loadu_si512(wr);
            __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
            __m512 sc = i4_scales(scale + (rows > r) * r * ns, c, G);
            __m512i ta = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(bva, lo, xla), hi, xha);
            __m512i tb = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(bvb, lo, xlb), hi, xhb);
            a[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ta), sc, a[r]);
            b[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(tb), sc, b[r]);
        }
    }
    for (int r = 0; r < R; r++) sa[r] = _mm512_reduce_add_ps(a[r]), sb[r] = _mm512_reduce_add_ps(b[r]);
}
static void i4_block_vnni2(const uint8_t *w, const float *scale, long K, long G, long rows, const int8_t *xa,
                           const int32_t *ba, const int8_t *xb, const int32_t *bb, float *sa, float *sb)
{
    if (G == 32)
        i4_block_vnni2_g(w, scale, K, 32, rows, xa, ba, xb, bb, sa, sb);
    else
        i4_block_vnni2_g(w, scale, K, G, rows, xa, ba, xb, bb, sa, sb);
}

/* Preparing a vector in registers (lowp_prepare): the same numbers as the scalar loops (an
 * IEEE division and the rounding mode's nearest-even, as lrintf), 16 values a step. */
static float amax_avx512(const float *x, long K)
{
    __m512 m = _mm512_setzero_ps();
    for (long k = 0; k < K; k += 16) {
        __mmask16 t = K - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (K - k)) - 1);
        m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_maskz_loadu_ps(t, x + k)));
    }
    return _mm512_reduce_max_ps(m);
}
/* q[i] = round(x[i] / sx) + offset for the lanes of t */
static inline void round16(const float *x, __m512 sx, int8_t *q, __mmask16 t, int offset)
{
    __m512i i = _mm512_cvtps_epi32(_mm512_div_ps(_mm512_maskz_loadu_ps(t, x), sx));
    _mm_mask_storeu_epi8(q, t, _mm512_cvtepi32_epi8(_mm512_add_epi32(i, _mm512_set1_epi32(offset))));
}
static float quantize_avx512(const float *x, long K, int8_t *q, int offset)
{
    float amax = amax_avx512(x, K), sx = amax > 0.0f ? amax / 127.0f : 1.0f;
    __m512 sv = _mm512_set1_ps(sx);
    for (long k = 0; k < K; k += 16)
        round16(x + k, sv, q + k, K - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (K - k)) - 1), offset);
    return sx;
}
/* int4's reordering (lowp_prepare), G / 2 a multiple of 16: runs of 16 values */
static float quantize_int4_avx512(const float *x, long K, long G, int8_t *q, int32_t *bias)
{
    float amax = amax_avx512(x, K), sx = amax > 0.0f ? amax / 127.0f : 1.0f;
    __m512 sv = _mm512_set1_ps(sx);
    long half = G / 2;
    for (long B = 0; B < K / 2; B += 16) {
        long c = B / 64, j = B % 64, at = (B / half) * G + B % half;
        round16(x + at, sv, q + 128 * c + j, 0xffff, 0);
        round16(x + at + half, sv, q + 128 * c + 64 + j, 0xffff, 0);
    }
    const __m512i ones = _mm512_set1_epi8(1);
    for (long c = 0; c < K / 128; c++) {
        __m512i t = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, _mm512_loadu_si512(q + 128 * c));
        t = _mm512_dpbusd_epi32(t, ones, _mm512_loadu_si512(q + 128 * c + 64));
        _mm512_storeu_si512(bias + 16 * c, _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(t, 3)));
    }
    return sx;
}
#if BF16_DOT
/* x = hi + lo in bf16, each rounded to the nearest (ties to even) */
static void split_bf16_avx512(const float *x, long K, uint16_t *hi, uint16_t *lo)
{
    for (long k = 0; k < K; k += 16) {
        __mmask16 t = K - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (K - k)) - 1);
        __m512 v = _mm512_maskz_loadu_ps(t, x + k);
        __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
        __m512 back = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
        _mm256_mask_storeu_epi16(hi + k, t, h);
        _mm256_mask_storeu_epi16(lo + k, t, (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(v, back)));
    }
}
#endif
#else
#define VNNI 0
#define BF16_DOT 0
#endif

/* A weight matrix in format fmt: rows of K weights (scale and G as moekit_rows_lowp's). */
typedef struct {
    int fmt;
    const void *w;
    const float *scale;
    long K, G;
} lowp_mat;

/* A vector prepared for products with one matrix's rows: x (bf16), or its int8 rounding q
 * with scale sx (for the VNNI paths offset to unsigned (int8), or reordered with the lanes'
 * -8 * sums in bias (int4)). */
typedef struct {
    const float *x;
    int8_t *q;
    int32_t *bias;
    float sx;
    int vnni;
} lowp_vec;

#if VNNI /* the shapes the VNNI blocks take */
static int int8_vnni(long K) { return K <= VNNI_I8_MAX_K; }
static int int4_vnni(long K, long G) { return K % 128 == 0 && (G == 32 || G == 64 || G % 128 == 0); }
#endif

/* The bytes lowp_prepare needs beside the vector: q (K; bf16: hi and lo, 4 K), bias (K / 4
 * int32s) aligned to 64 */
static long prep_bytes(long K) { return 4 * K + 4 * (K / 4 + 1) + 64; }

/* v prepared from x for the rows of W; buf: prep_bytes(W->K) bytes */
static void lowp_prepare(const lowp_mat *W, const float *x, lowp_vec *v, char *buf)
{
    long K = W->K;
    v->x = x, v->vnni = 0, v->q = (int8_t *)buf, v->bias = (int32_t *)(((uintptr_t)buf + 4 * K + 63) & ~(uintptr_t)63);
    if (W->fmt == 0) {
#if BF16_DOT
        split_bf16_avx512(x, K, (uint16_t *)buf, (uint16_t *)buf + K); /* x = hi + lo (bf16_block_dot) */
        v->vnni = 1;
#endif
        return;
    }
#if VNNI
    if (W->fmt == 1 && int8_vnni(K)) { /* offset to unsigned (i8_block_vnni) */
        v->sx = quantize_avx512(x, K, v->q, 128), v->vnni = 1;
        return;
    }
    if (W->fmt == 2 && int4_vnni(K, W->G)) {
        /* step c's values for the low nibbles of packed bytes 64c..64c+63, then for their high
         * nibbles; byte B holds codes j and j + G/2 of group B / (G/2), j = B % (G/2); bias:
         * -8 * the sum of each lane's four low and four high values */
        v->sx = quantize_int4_avx512(x, K, W->G, v->q, v->bias), v->vnni = 1;
        return;
    }
#endif
    v->sx = quantize_row(x, K, v->q);
}

/* s[r] = dot(row n + r of W, v) for r < rows (at most R) */
static void lowp_block(const lowp_mat *W, const lowp_vec *v, long n, long rows, float *s)
{
    long K = W->K, G = W->G;
    if (W->fmt == 0) {
        const uint16_t *w = (const uint16_t *)W->w + n * K;
#if BF16_DOT
        if (v->vnni) {
            bf16_block_dot(w, K, rows, (const uint16_t *)v->q, (const uint16_t *)v->q + K, s);
            return;
        }
#endif
#if VNNI
        bf16_block_avx512(w, K, rows, v->x, s);
#else
        bf16_block(w, K, rows, v->x, s);
#endif
    } else if (W->fmt == 1) {
        const int8_t *w = (const int8_t *)W->w + n * K;
#if VNNI
        if (v->vnni) {
            int32_t t[R];
            i8_block_vnni(w, K, rows, (const uint8_t *)v->q, t);
            for (long r = 0; r < rows; r++) s[r] = (float)t[r] * W->scale[n + r] * v->sx;
            return;
        }
#endif
        for (long r = 0; r < rows; r++) s[r] = (float)i8_dot(w + r * K, v->q, K) * W->scale[n + r] * v->sx;
    } else {
        const uint8_t *w = (const uint8_t *)W->w + n * (K / 2);
        const float *sc = W->scale + n * (K / G);
#if VNNI
        if (v->vnni) {
            i4_block_vnni(w, sc, K, G, rows, v->q, v->bias, s);
            for (long r = 0; r < rows; r++) s[r] *= v->sx;
            return;
        }
#endif
        for (long r = 0; r < rows; r++) s[r] = i4_dot(w + r * (K / 2), sc + r * (K / G), v->q, K, G) * v->sx;
    }
}

static int format_ok(int fmt, long K, long G)
{
    return fmt >= 0 && fmt <= 2 && K > 0 && (fmt != 2 || (G > 0 && G <= 1024 && G % 2 == 0 && K % G == 0));
}

/* lowp_block for two vectors: the VNNI pair kernels where both took the VNNI preparation */
static void lowp_block2(const lowp_mat *W, const lowp_vec *va, const lowp_vec *vb, long n, long rows, float *sa,
                        float *sb)
{
#if VNNI
    long K = W->K, G = W->G;
    if (W->fmt == 1 && va->vnni && vb->vnni) {
        int32_t ta[R], tb[R];
        i8_block_vnni2((const int8_t *)W->w + n * K, K, rows, (const uint8_t *)va->q, (const uint8_t *)vb->q, ta, tb);
        for (long r = 0; r < rows; r++)
            sa[r] = (float)ta[r] * W->scale[n + r] * va->sx, sb[r] = (float)tb[r] * W->scale[n + r] * vb->sx;
        return;
    }
    if (W->fmt == 2 && va->vnni && vb->vnni) {
        i4_block_vnni2((const uint8_t *)W->w + n * (K / 2), W->scale + n * (K / G), K, G, rows, va->q, va->bias, vb->q,
                       vb->bias, sa, sb);
        for (long r = 0; r < rows; r++) sa[r] *= va->sx, sb[r] *= vb->sx;
        return;
    }
#endif
    lowp_block(W, va, n, rows, sa);
    lowp_block(W, vb, n, rows, sb);
}

/* One thread's share of products with M vectors at once (each block of weight rows read
 * from memory once for all, two vectors a pass): y[m][n] = alpha[m] * dot(row n of W, v[m])
 * + bias[n] (+ y[m][n] when accumulate) for n0 <= n < n1; bias may be NULL. */
static void lowp_dots_rows(const lowp_mat *W, lowp_vec *const *v, long M, long n0, long n1, float *const *y,
                           const float *alpha, int accumulate, const float *bias)
{
    for (long n = n0; n < n1; n += R) {
        long rows = n1 - n < R ? n1 - n : R;
        for (long m = 0; m < M; m += 2) {
            float s[2][R];
            long pair = m + 1 < M;
            if (pair)
                lowp_block2(W, v[m], v[m + 1], n, rows, s[0], s[1]);
            else
                lowp_block(W, v[m], n, rows, s[0]);
            for (long j = 0; j <= pair; j++) {
                float *o = y[m + j] + n, al = alpha[m + j];
                for (long r = 0; r < rows; r++) {
                    float t = al * s[j][r] + (bias ? bias[n + r] : 0.0f);
                    o[r] = accumulate ? o[r] + t : t;
                }
            }
        }
    }
}

/* out[m] = alpha * W @ v_m (+ out[m] when accumulate) for m < M (at most 64), v_m = x[m], or
 * rmsnorm(x[m]) * g when g is given. Returns 0, 1 when out of memory, 2 for a bad format. */
int moekit_rows_lowp(int fmt, const void *w, const float *scale, long N, long K, long G, const float *x, long M,
                     float *out, float alpha, int accumulate, const float *g, float eps, int threads)
{
    if (!format_ok(fmt, K, G) || M < 1 || M > LOWP_MAX_ROWS)
        return 2;
    lowp_mat W = {fmt, w, scale, K, G};
    long pb = prep_bytes(K);
    char *buf = malloc(M * pb + (g ? M * K * sizeof(float) : 0));
    if (!buf)
        return 1;
    lowp_vec v[LOWP_MAX_ROWS];
    float *normed = (float *)(buf + M * pb);
    for (long m = 0; m < M; m++) {
        const float *xm = x + m * K;
        if (g) {
            moekit_rmsnorm(xm, g, K, eps, normed + m * K);
            xm = normed + m * K;
        }
        lowp_prepare(&W, xm, &v[m], buf + m * pb);
    }
    lowp_vec *vp[LOWP_MAX_ROWS];
    float *ys[LOWP_MAX_ROWS], alphas[LOWP_MAX_ROWS];
    for (long m = 0; m < M; m++) vp[m] = &v[m], ys[m] = out + m * N, alphas[m] = alpha;
    long blocks = (N + R - 1) / R;
#pragma omp parallel for schedule(static) num_threads(threads) if (N * K >= PARALLEL_MIN)
    for (long blk = 0; blk < blocks; blk++) {
        long n = blk * R, n1 = N - n < R ? N : n + R;
        lowp_dots_rows(&W, vp, M, n, n1, ys, alphas, accumulate, NULL);
    }
    free(buf);
    return 0;
}

/* B tokens (at most 64) through an MoE feed-forward with the softmax top-k router, its
 * experts in format fmt (group G), in place on x [B, K]: h = rmsnorm(x) * g (g NULL: h = x);
 * each token's router (float32 wr [E, K], br) as moekit_route_token's, its choice written to
 * chosen[b * k + i] and chosen_w[b * k + i]; x[b] += sum of weight * w2_e @ (silu(w1_e @ h[b])
 * * (w3_e @ h[b])). Each chosen expert's weights are read once for all the tokens that chose
 * it (experts in index order). Expert e's rows: w1, w3 [E, F, K] and w2 [E, K, F] (nn.Linear's
 * [out, in] per expert) with their scales s1, s3 ([E, F] for int8, [E, F, K/G] for int4) and
 * s2. Returns 0, 1 when out of memory, 2 for a bad argument. */
int moekit_moe_token_lowp(int fmt, long G, float *x, long B, long K, const float *g, float eps, const float *wr,
                          const float *br, long E, int k, int renormalize, float scale, const void *q1,
                          const float *s1, const void *q3, const float *s3, const void *q2, const float *s2, long F,
                          long *chosen, float *chosen_w, int threads)
{
    if (!format_ok(fmt, K, G) || !format_ok(fmt, F, G) || k < 1 || k > E || B < 1 || B > LOWP_MAX_ROWS)
        return 2;
    long pK = prep_bytes(K), pF = prep_bytes(F);
    /* h [B, K], logits [E]; two sets (experts alternate, so a thread still reading one
     * expert's hidden never meets the next expert's writes) of gate, up, hidden [B, F] and
     * the hidden rows' preparations; the experts' row lists */
    size_t floats = (size_t)(B * K + E + 2 * 3 * B * F), prep = (size_t)(B * pK + 2 * B * pF);
    size_t longs = (size_t)(2 * E + 1 + B * k);
    char *buf = malloc(longs * sizeof(long) + floats * sizeof(float) + prep);
    if (!buf)
        return 1;
    long *start = (long *)buf, *slots = start + E + 1, *cursor = slots + B * k;
    float *h = (float *)(buf + longs * sizeof(long)), *logits = h + B * K, *act = logits + E;
    char *prep_h = (char *)(h + floats), *prep_hidden = prep_h + B * pK;
    lowp_mat W1 = {fmt, q1, s1, K, G};
    lowp_vec vh[LOWP_MAX_ROWS], vhid[2][LOWP_MAX_ROWS];
    for (long b = 0; b < B; b++) {
        moekit_rmsnorm(x + b * K, g, K, eps, h + b * K);
        moekit_route_token(h + b * K, K, wr, br, E, k, renormalize, scale, logits, chosen + b * k, chosen_w + b * k,
                           NULL, NULL, NULL);
        lowp_prepare(&W1, h + b * K, &vh[b], prep_h + b * pK); /* w1 and w3 of every expert read the same h */
    }
    for (long e = 0; e <= E; e++) start[e] = 0; /* slots grouped by expert: start[e]..start[e + 1] */
    for (long s = 0; s < B * k; s++) start[chosen[s] + 1]++;
    for (long e = 0; e < E; e++) start[e + 1] += start[e], cursor[e] = start[e];
    for (long s = 0; s < B * k; s++) slots[cursor[chosen[s]]++] = s;
    double bytes_w = fmt == 0 ? 2.0 : fmt == 1 ? 1.0 : 0.5;
    long b1 = (long)(F * K * bytes_w), b2 = (long)(K * F * bytes_w); /* one expert's codes of w1 (w3), w2 */
    long n1 = fmt == 1 ? F : fmt == 2 ? F * (K / G) : 0, n2 = fmt == 1 ? K : fmt == 2 ? K * (F / G) : 0;
#pragma omp parallel num_threads(threads) if (F * K >= PARALLEL_MIN)
    {
        long j = 0;
        for (long e = 0; e < E; e++) {
            long M = start[e + 1] - start[e];
            if (M == 0)
                continue;
            int set = (int)(j++ % 2);
            lowp_vec *vin[LOWP_MAX_ROWS], *vmid[LOWP_MAX_ROWS];
            float *gate[LOWP_MAX_ROWS], *up[LOWP_MAX_ROWS], *xo[LOWP_MAX_ROWS], w[LOWP_MAX_ROWS], one[LOWP_MAX_ROWS];
            for (long m = 0; m < M; m++) {
                long s = slots[start[e] + m], b = s / k;
                vin[m] = &vh[b], vmid[m] = &vhid[set][m];
                gate[m] = act + (size_t)set * 3 * B * F + m * 3 * F, up[m] = gate[m] + F;
                xo[m] = x + b * K, w[m] = chosen_w[s], one[m] = 1.0f;
            }
            lowp_mat w1 = {fmt, (const char *)q1 + e * b1, s1 ? s1 + e * n1 : NULL, K, G};
            lowp_mat w3 = {fmt, (const char *)q3 + e * b1, s3 ? s3 + e * n1 : NULL, K, G};
            lowp_mat w2 = {fmt, (const char *)q2 + e * b2, s2 ? s2 + e * n2 : NULL, F, G};
            long a, b;
            moekit_share(F, 16, &a, &b);
            if (b > a) {
                lowp_dots_rows(&w1, vin, M, a, b, gate, one, 0, NULL);
                lowp_dots_rows(&w3, vin, M, a, b, up, one, 0, NULL);
                for (long m = 0; m < M; m++) moekit_silu_mul_rows(gate[m] + a, up[m] + a, up[m] + F + a, b - a);
            }
#pragma omp barrier
#pragma omp for schedule(static)
            for (long m = 0; m < M; m++) lowp_prepare(&w2, up[m] + F, vmid[m], prep_hidden + (set * B + m) * pF);
            moekit_share(K, 16, &a, &b); /* the same columns of x for every expert: no two threads write one */
            lowp_dots_rows(&w2, vmid, M, a, b, xo, w, 1, NULL);
        }
    }
    free(buf);
    return 0;
}

/* One token's self-attention (batch 1) added into the residual x[d], in place, its
 * projections in format fmt (group G): qkv = Wqkv @ (rmsnorm(x) * g) + bqkv (Wqkv: rows
 * [(H + 2 Hkv) hd, d] as qkv_w, qkv_s); the middle as moekit_attend_token's; x += Wo @ y + bo
 * (Wo: rows [d, H hd] as wo_w, wo_s). Returns 0, 1 when out of memory, 2 for a bad format. */
int moekit_attention_token_lowp(int fmt, long G, float *x, long d, const float *g, float eps, const void *qkv_w,
                                const float *qkv_s, const float *bqkv, long H, long Hkv, long hd, const float *cos,
                                const float *sin, float *kc, float *vc, long hs, long pos, long start,
                                const void *wo_w, const float *wo_s, const float *bo, int threads)
{
    long n = (H + 2 * Hkv) * hd, L = pos + 1 - start, p1 = prep_bytes(d), p2 = prep_bytes(H * hd);
    if (!format_ok(fmt, d, G) || !format_ok(fmt, H * hd, G))
        return 2;
    char *buf = malloc((d + n + H * hd + H * L) * sizeof(float) + p1 + p2);
    if (!buf)
        return 1;
    float *h = (float *)buf, *qkv = h + d, *y = qkv + n, *scores = y + H * hd;
    char *prep1 = (char *)(scores + H * L), *prep2 = prep1 + p1;
    lowp_mat Wqkv = {fmt, qkv_w, qkv_s, d, G}, Wo = {fmt, wo_w, wo_s, H * hd, G};
    lowp_vec vh, vy, *pvh = &vh, *pvy = &vy;
    const float one = 1.0f;
    moekit_rmsnorm(x, g, d, eps, h);
    lowp_prepare(&Wqkv, h, &vh, prep1);
#pragma omp parallel num_threads(threads) if (n * d >= PARALLEL_MIN)
    {
        long a, b;
        moekit_share(n, 16, &a, &b);
        lowp_dots_rows(&Wqkv, &pvh, 1, a, b, &qkv, &one, 0, bqkv);
    }
    moekit_attend_token(qkv, y, scores, H, Hkv, hd, cos, sin, kc, vc, hs, pos, start, threads);
    lowp_prepare(&Wo, y, &vy, prep2);
#pragma omp parallel num_threads(threads) if (d * H * hd >= PARALLEL_MIN)
    {
        long a, b;
        moekit_share(d, 16, &a, &b);
        lowp_dots_rows(&Wo, &pvy, 1, a, b, &x, &one, 1, bo);
    }
    free(buf);
    return 0;
}

/* Which dot products this build has: 3 AVX-512 VNNI and BF16, 2 AVX-512 VNNI, 1 AVX2 maddubs,
 * 0 the plain C loops (kernels.status() says). */
int moekit_lowp_simd(void)
{
#if VNNI
    return 2 + BF16_DOT;
#elif defined(__AVX2__)
    return 1;
#else
    return 0;
#endif
}
