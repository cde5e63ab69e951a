/* moekit CPU kernels: products with low-precision weights (moekit.quant's formats).
 *
 * out[m, n] = alpha * sum_k W[n, k] x[m, k] (+ out[m, n] when accumulate), for the few rows x
 * of a decode step: each weight row is read once for all rows of x, so a step costs the
 * weights' bytes at memory speed, a half (bf16), a quarter (int8) or about an eighth (int4)
 * of float32's. bf16 weights are widened in registers and multiplied in float32; for int8 and
 * int4 each row of x is first quantised to int8 with one scale (llama.cpp's q8 activations)
 * and the products are integer dot products (AVX2 maddubs where built, else plain loops),
 * scaled back in float32:
 *   fmt 0, bf16: w uint16 [N, K] (bfloat16 bits);
 *   fmt 1, int8: w int8 [N, K], scale float [N]            (W = q * scale[n]);
 *   fmt 2, int4: w uint8 [N, K/2], scale float [N, K/G]   (W = (code - 8) * scale[n, g]),
 *     within each group of G weights byte j holds code j (low nibble) and code j + G/2
 *     (high nibble), so both halves multiply contiguous x (the layout of llama.cpp's q4_0).
 * bf16 takes four weight rows at a time (four independent sums hide the multiply-add
 * latency). Parallel over blocks of rows; at most 64 rows of x a call. Built with the other
 * kernels by moekit/kernels/library.py; moekit/quant/formats.py holds the torch reference.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#define PARALLEL_MIN 65536 /* weights: below this one thread (a parallel region costs microseconds) */
#define R 4                /* weight rows per block */

static inline float bf16_value(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float v;
    memcpy(&v, &u, sizeof v);
    return v;
}

/* s[r] = dot(row r of the block, x) for the R rows starting at w (row stride K), r < rows */
static void bf16_block(const uint16_t *w, long K, long rows, const float *x, float *s)
{
    const uint16_t *w0 = w, *w1 = w + (rows > 1) * K, *w2 = w + (rows > 2) * 2 * K, *w3 = w + (rows > 3) * 3 * K;
    float a0 = 0, a1 = 0, a2 = 0, a3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
    for (long k = 0; k < K; k++) {
        float v = x[k];
        a0 += bf16_value(w0[k]) * v;
        a1 += bf16_value(w1[k]) * v;
        a2 += bf16_value(w2[k]) * v;
        a3 += bf16_value(w3[k]) * v;
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

int moekit_rows_lowp(int fmt, const void *w, const float *scale, long N, long K, long G, const float *x, long M,
                     float *out, float alpha, int accumulate, int threads)
{
    if (fmt < 0 || fmt > 2 || (fmt == 2 && (G <= 0 || G > 1024 || G % 2 || K % G)))
        return 2;
    int8_t *xq = NULL;
    float sx[64];
    if (fmt > 0) { /* int8 and int4 multiply integers: the rows of x quantised once here */
        if (M > 64 || !(xq = malloc((size_t)(M * K))))
            return 1;
        for (long m = 0; m < M; m++)
            sx[m] = quantize_row(x + m * K, K, xq + m * K);
    }
    long blocks = (N + R - 1) / R;
#pragma omp parallel for schedule(static) num_threads(threads) if (N * K >= PARALLEL_MIN)
    for (long blk = 0; blk < blocks; blk++) {
        long n = blk * R, rows = N - n < R ? N - n : R;
        for (long m = 0; m < M; m++) {
            float s[R];
            if (fmt == 0)
                bf16_block((const uint16_t *)w + n * K, K, rows, x + m * K, s);
            else if (fmt == 1)
                for (long r = 0; r < rows; r++)
                    s[r] = (float)i8_dot((const int8_t *)w + (n + r) * K, xq + m * K, K) * scale[n + r] * sx[m];
            else
                for (long r = 0; r < rows; r++)
                    s[r] = i4_dot((const uint8_t *)w + (n + r) * (K / 2), scale + (n + r) * (K / G), xq + m * K, K, G)
                           * sx[m];
            float *o = out + m * N + n;
            for (long r = 0; r < rows; r++)
                o[r] = accumulate ? o[r] + alpha * s[r] : alpha * s[r];
        }
    }
    free(xq);
    return 0;
}

/* Which integer dot products this build has: 1 AVX2 maddubs, 0 the plain C loops (kernels.status() says). */
int moekit_lowp_simd(void)
{
#if defined(__AVX2__)
    return 1;
#else
    return 0;
#endif
}
