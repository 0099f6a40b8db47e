/* Skinny int8 / int4 weight-only matrix products for CPU decoding: y[m, n] = x[m, :] . dequant(W)[n, :] + b[n]
 * for 1-8 rows m, with W quantized symmetrically in blocks of 32 inputs (llama.cpp's Q8_0 / Q4_0 blocks):
 *   int8: q[n, k] (int8), int4: q[n, k/2] (byte j of a block holds weight j in its low nibble and weight
 *   j + 16 in its high one, both offset by 8), and one fp16 scale per `G` inputs of a row (G a multiple of 32).
 * Decoding reads every weight once per step, so speed is bytes streamed: 1.06 bytes a weight for int8 and
 * 0.56 for int4 against 4 for fp32. Each thread streams its own W rows once and multiplies each block into
 * all M rows of x (which stay in L1/L2).
 * With AVX2, as llama.cpp does, the x rows are first quantized to int8 blocks of 32 (one scale each) and a
 * block's 32 products are summed in integers: about 8 instructions a block and row, where widening the
 * weights to fp32 took 25 and could not keep up with memory (measured on a Zen 3 EPYC: int4 reached 7.5 GB/s
 * that way). Elsewhere, plain C on fp32 activations (the same numbers as dequantize-then-matmul). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

typedef _Float16 half;

#ifdef __AVX2__
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* The 32 products of a block summed exactly in integers, then scaled once. maddubs multiplies unsigned bytes by
 * signed ones: int8 weights move their signs onto x; int4 weights are unsigned nibbles (q + 8), and the 8 x sum(x)
 * this adds is taken off per block from the row's block sums (xs). */
static inline __m256i nibbles(const uint8_t *w) {
    __m128i b = _mm_loadu_si128((const __m128i *)w);  /* low nibbles: weights 0-15, high: 16-31 */
    __m256i both = _mm256_insertf128_si256(_mm256_castsi128_si256(b), _mm_srli_epi16(b, 4), 1);
    return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}

/* acc[m] += block blk of the row times block blk of x row m, scaled by c[m][blk] */
static inline __attribute__((always_inline))
void block(const void *row, const int8_t *restrict xq, long K, long B, float c[][B], int bits, const int M, long blk,
           __m256 *acc) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i w, aw;
    if (bits == 8) {
        w = _mm256_loadu_si256((const __m256i *)((const int8_t *)row + 32 * blk));
        aw = _mm256_sign_epi8(w, w);
    } else {
        aw = w = nibbles((const uint8_t *)row + 16 * blk);
    }
    for (int m = 0; m < M; m++) {
        __m256i x = _mm256_loadu_si256((const __m256i *)(xq + m * K + 32 * blk));
        __m256i p = _mm256_maddubs_epi16(aw, bits == 8 ? _mm256_sign_epi8(x, w) : x);
        __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones));
        acc[m] = _mm256_fmadd_ps(_mm256_broadcast_ss(&c[m][blk]), dot, acc[m]);
    }
}

/* out[m] = dequant(row) . x[m] for m < M, with x given as int8 blocks xq, their scales xd and their sums xs
 * (quantize_rows). First, per block, the product of the weight scale and each row's x scale (c) and the int4
 * offset, vectorized over the row's blocks; then the block loop is loads, integer products and one FMA a row.
 * M is a constant where this is inlined, so the accumulators live in registers; one per row suffices (a
 * 4-cycle FMA chain per 32 weights outpaces memory). */
static inline __attribute__((always_inline))
void dots(const void *row, const half *s, const int8_t *restrict xq, const float *restrict xd,
          const float *restrict xs, long K, long G, int bits, const int M, float *out) {
    const long B = K / 32;
    float ws[G == 32 ? 1 : B], c[M][B];
    if (G != 32)  /* one scale a block: the group's, repeated */
        for (long g = 0, blk = 0; g < K / G; g++)
            for (long j = 0; j < G / 32; j++) ws[blk++] = (float)s[g];
    __m256 off[8];
    for (int m = 0; m < M; m++) off[m] = _mm256_setzero_ps();
    long blk = 0;
    for (; blk + 8 <= B; blk += 8) {
        __m256 w8 = G == 32 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + blk))) : _mm256_loadu_ps(ws + blk);
        for (int m = 0; m < M; m++) {
            _mm256_storeu_ps(&c[m][blk], _mm256_mul_ps(w8, _mm256_loadu_ps(xd + m * B + blk)));
            off[m] = _mm256_fmadd_ps(w8, _mm256_loadu_ps(xs + m * B + blk), off[m]);
        }
    }
    for (int m = 0; m < M; m++) out[m] = hsum(off[m]);
    for (; blk < B; blk++) {
        float w1 = G == 32 ? (float)s[blk] : ws[blk];
        for (int m = 0; m < M; m++) {
            c[m][blk] = w1 * xd[m * B + blk];
            out[m] += w1 * xs[m * B + blk];
        }
    }
    for (int m = 0; m < M; m++) out[m] = bits == 4 ? -8.f * out[m] : 0.f;
    __m256 acc0[8], acc1[8];  /* two chains a row, alternate blocks: one 4-cycle FMA chain would set the pace */
    for (int m = 0; m < M; m++) acc0[m] = acc1[m] = _mm256_setzero_ps();
    for (blk = 0; blk + 2 <= B; blk += 2) {
        block(row, xq, K, B, c, bits, M, blk, acc0);
        block(row, xq, K, B, c, bits, M, blk + 1, acc1);
    }
    if (blk < B) block(row, xq, K, B, c, bits, M, blk, acc0);
    for (int m = 0; m < M; m++) acc0[m] = _mm256_add_ps(acc0[m], acc1[m]);
    for (int m = 0; m < M; m++) out[m] += hsum(acc0[m]);
}
#define INT_DOTS 1
#else
static inline void dots(const void *row, const half *s, const float *restrict x, const float *unused,
                        const float *unused_too, long K, long G, int bits, const int M, float *out) {
    (void)unused, (void)unused_too;
    for (int m = 0; m < M; m++) out[m] = 0.f;
    for (long k = 0; k < K; k += 32) {
        float scale = (float)s[k / G], w[32];
        for (int j = 0; j < 32; j++) {
            if (bits == 8) w[j] = ((const int8_t *)row)[k + j];
            else {
                uint8_t byte = ((const uint8_t *)row)[k / 2 + (j & 15)];
                w[j] = (float)((j < 16 ? byte & 15 : byte >> 4) - 8);
            }
        }
        for (int m = 0; m < M; m++) {
            float t = 0.f;
            for (int j = 0; j < 32; j++) t += w[j] * x[m * K + k + j];
            out[m] += t * scale;
        }
    }
}
#endif

#ifdef INT_DOTS
/* x rows as int8 blocks of 32 with one fp32 scale each (llama.cpp's Q8_0 for activations): xd = max|x| / 127,
 * and each block's sum in x's units (xs, for the int4 offset) */
static void quantize_rows(const float *x, long M, long K, int8_t *xq, float *xd, float *xs) {
    for (long i = 0; i < M * K / 32; i++) {
        float amax = 0.f;
        for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(x[32 * i + j]));
        float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
        int sum = 0;
        for (int j = 0; j < 32; j++) sum += xq[32 * i + j] = (int8_t)roundf(x[32 * i + j] * inv);
        xd[i] = d, xs[i] = d * (float)sum;
    }
}
#endif

#define ROWS(M)                                                                                    \
    case M:                                                                                        \
        _Pragma("omp parallel for schedule(static)")                                               \
        for (long n = 0; n < N; n++) {                                                             \
            float out[8];                                                                          \
            dots((const uint8_t *)W + n * row_bytes, S + n * (K / G), xv, xd, xs, K, G, bits, M, out);\
            float bias = b ? b[n] : 0.f;                                                           \
            for (int m = 0; m < M; m++) y[m * N + n] = out[m] + bias;                              \
        }                                                                                          \
        break;

/* x [M, K] fp32, W [N, K] int8 or [N, K/2] packed int4, S [N, K/G] fp16, b [N] fp32 or NULL, y [M, N] fp32;
 * K and G multiples of 32, G dividing K; more than 8 rows go 8 at a time (one pass over W each).
 * Returns 0, or -1 when scratch memory cannot be had. */
int quant_linear(const float *x, const void *W, const half *S, const float *b, float *y, long M, long N, long K,
                 long G, long bits) {
    long row_bytes = bits == 8 ? K : K / 2;
#ifdef INT_DOTS
    int8_t *xq = malloc(8 * K);
    float *xd = malloc(2 * 8 * (K / 32) * sizeof(float)), *xs = xd + 8 * (K / 32);
    if (!xq || !xd) {
        free(xq), free(xd);
        return -1;
    }
    const int8_t *xv = xq;
#else
    const float *xv, *xd = NULL, *xs = NULL;
#endif
    for (long m0 = 0; m0 < M; m0 += 8, x += 8 * K, y += 8 * N) {
        long rows = M - m0 < 8 ? M - m0 : 8;
#ifdef INT_DOTS
        quantize_rows(x, rows, K, xq, xd, xs);
#else
        xv = x;
#endif
        switch (rows) {
            ROWS(1) ROWS(2) ROWS(3) ROWS(4) ROWS(5) ROWS(6) ROWS(7) ROWS(8)
        }
    }
#ifdef INT_DOTS
    free(xq), free(xd);
#endif
    return 0;
}
