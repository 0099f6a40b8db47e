/* Skinny int8 / int4 weight-only matrix products for CPU decoding: y[m, n] = x[m, :] . dequant(W)[n, :] + b[n]
 * for a few rows m, with W quantized symmetrically in blocks of 32 inputs (llama.cpp's Q8_0 / Q4_0 blocks):
 *   int8: q[n, k] (int8), int4: q[n, k/2] (byte j of a block holds weight j in its low nibble and weight
 *   j + 16 in its high one, both offset by 8), and one fp16 scale per `G` inputs of a row (G a multiple of 32).
 * Decoding reads every weight once per step, so speed is bytes streamed: 1.06 bytes a weight for int8 and
 * 0.56 for int4 against 4 for fp32. Each thread streams its own groups of 8 W rows once (stored interleaved:
 * dots8) and multiplies each block into all M rows of x (which stay in L1/L2).
 * With AVX2, as llama.cpp does, the x rows are first quantized to int8 blocks of 32 (one scale each) and a
 * block's 32 products are summed in integers (dots8 for the groups of 8 rows; dots, one row at a time, for the
 * last N % 8 rows: about 8 instructions a block and row), where widening the
 * weights to fp32 took 25 and could not keep up with memory (measured on a Zen 3 EPYC: int4 reached 7.5 GB/s
 * that way). Elsewhere, plain C on fp32 activations (the same numbers as dequantize-then-matmul). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

typedef _Float16 half;
/* bytes ahead of the stream to prefetch: measured on a Zen 3 EPYC, 48 GPT-2 sized matrices in turn, +8-15% */
#define PREFETCH 1024

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

/* The interleaved layout (quantize.interleave): rows in groups of 8; for each group and block of 32 inputs, the 8
 * rows' bytes in 4-byte chunks, chunk c of all 8 rows side by side (32 bytes), then chunk c + 1; scales
 * [N / 8, K / G, 8]. One 32-byte load then holds 4 inputs (int8) or 4 + 4 (int4: low and high nibbles) of 8
 * rows, all multiplied by the same 4 x values broadcast: the 8 rows' sums build up in the lanes of one register,
 * with no horizontal sums, and a block's scales cost one conversion for 8 rows. int4 products (at most
 * 2 x 15 x 127 a lane) add up in 16 bits over a whole block. About 5 weights an instruction where `dots` does 3. */
static inline __attribute__((always_inline))
void dots8(const uint8_t *w, const half *s, const int8_t *restrict xq, const float *restrict xd,
           const float *restrict xs, long K, long G, int bits, const int M, __m256 *out) {
    const long B = K / 32, R = bits == 8 ? 32 : 16; /* bytes of a row's block */
    const __m256i ones = _mm256_set1_epi16(1), low = _mm256_set1_epi8(0x0F);
    for (int m = 0; m < M; m++) out[m] = _mm256_setzero_ps();
    for (long blk = 0; blk < B; blk++, w += 8 * R) {
        const int8_t *x = xq + 32 * blk;
        for (int c = 0; c < 8 * R; c += 64) _mm_prefetch((const char *)w + PREFETCH + c, _MM_HINT_T0);
        __m256i acc[4];
        for (int m = 0; m < M; m++) acc[m] = _mm256_setzero_si256();
        if (bits == 4) {
            for (int c = 0; c < 4; c++) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(w + 32 * c));
                __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                for (int m = 0; m < M; m++) {
                    int32_t xl, xh;
                    memcpy(&xl, x + m * K + 4 * c, 4), memcpy(&xh, x + m * K + 16 + 4 * c, 4);
                    __m256i a = _mm256_maddubs_epi16(lo, _mm256_set1_epi32(xl));
                    acc[m] = _mm256_add_epi16(acc[m], _mm256_add_epi16(a, _mm256_maddubs_epi16(hi, _mm256_set1_epi32(xh))));
                }
            }
            for (int m = 0; m < M; m++) acc[m] = _mm256_madd_epi16(acc[m], ones);
        } else {
            for (int c = 0; c < 8; c++) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(w + 32 * c)), av = _mm256_sign_epi8(v, v);
                for (int m = 0; m < M; m++) {
                    int32_t xc;
                    memcpy(&xc, x + m * K + 4 * c, 4);
                    __m256i p = _mm256_maddubs_epi16(av, _mm256_sign_epi8(_mm256_set1_epi32(xc), v));
                    acc[m] = _mm256_add_epi32(acc[m], _mm256_madd_epi16(p, ones));
                }
            }
        }
        __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + 32 * blk / G * 8)));
        for (int m = 0; m < M; m++) { /* int4: the nibbles are q + 8, so take 8 x sum(x) off */
            __m256 t = _mm256_mul_ps(_mm256_cvtepi32_ps(acc[m]), _mm256_set1_ps(xd[m * B + blk]));
            if (bits == 4) t = _mm256_sub_ps(t, _mm256_set1_ps(8.f * xs[m * B + blk]));
            out[m] = _mm256_fmadd_ps(d, t, out[m]);
        }
    }
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

/* the interleaved layout (see the AVX2 dots8), on fp32 activations: out[8 m + r] for row r of the group */
static inline void dots8(const uint8_t *w, const half *s, const float *restrict x, const float *unused,
                         const float *unused_too, long K, long G, int bits, const int M, float *out) {
    (void)unused, (void)unused_too;
    const long R = bits == 8 ? 32 : 16;
    for (int i = 0; i < 8 * M; i++) out[i] = 0.f;
    for (long blk = 0; blk < K / 32; blk++, w += 8 * R)
        for (int r = 0; r < 8; r++) {
            float scale = (float)s[32 * blk / G * 8 + r], v[32];
            for (int j = 0; j < 32; j++) {
                int c = bits == 8 ? j : j & 15; /* the byte of the row's block holding input j */
                uint8_t byte = w[c / 4 * 32 + r * 4 + c % 4];
                v[j] = bits == 8 ? (float)(int8_t)byte : (float)((j < 16 ? byte & 15 : byte >> 4) - 8);
            }
            for (int m = 0; m < M; m++) {
                float t = 0.f;
                for (int j = 0; j < 32; j++) t += v[j] * x[m * K + 32 * blk + j];
                out[8 * m + r] += t * scale;
            }
        }
}
#endif

#ifdef INT_DOTS
/* x rows as int8 blocks of 32 with one fp32 scale each (llama.cpp's Q8_0 for activations): xd = max|x| / 127,
 * and each block's sum in x's units (xs, for the int4 offset). Vectorized: with scalar roundf this took 10 ns
 * a value, 30 us for a 3072-wide row, as long as streaming a 768 x 768 int4 matrix. */
static void quantize_rows(const float *x, long M, long K, int8_t *xq, float *xd, float *xs) {
    const __m256 sign = _mm256_set1_ps(-0.f), half = _mm256_set1_ps(0.5f);
    for (long i = 0; i < M * K / 32; i++, x += 32) {
        __m256 v[4], top = _mm256_setzero_ps();
        for (int j = 0; j < 4; j++) top = _mm256_max_ps(top, _mm256_andnot_ps(sign, v[j] = _mm256_loadu_ps(x + 8 * j)));
        __m128 t = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
        t = _mm_max_ps(t, _mm_movehl_ps(t, t));
        float d = _mm_cvtss_f32(_mm_max_ss(t, _mm_movehdup_ps(t))) / 127.f;
        __m256 inv = _mm256_set1_ps(d > 0.f ? 1.f / d : 0.f);
        __m256i q[4];
        for (int j = 0; j < 4; j++) /* to nearest, half away from zero as roundf: add 0.5 with x's sign, cut */
            q[j] = _mm256_cvttps_epi32(_mm256_add_ps(_mm256_mul_ps(v[j], inv), _mm256_or_ps(_mm256_and_ps(v[j], sign), half)));
        __m256i sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        /* the packs work within 128-bit lanes: put the 32 values back in order */
        packed = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(xq + 32 * i), packed);
        xd[i] = d, xs[i] = d * hsum(_mm256_cvtepi32_ps(sum));
    }
}
#endif

#ifdef INT_DOTS
#define DOTS8(M) { __m256 v[4]; dots8(w8, s8, xv, xd, xs, K, G, bits, M, v); \
                   for (int m = 0; m < M; m++) _mm256_storeu_ps(out + 8 * m, v[m]); }
#else
#define DOTS8(M) dots8(w8, s8, xv, xd, xs, K, G, bits, M, out);
#endif
#define ROWS(M)                                                                                    \
    case M:                                                                                        \
        _Pragma("omp parallel for schedule(static)")                                               \
        for (long g = 0; g < N / 8; g++) {                                                         \
            const uint8_t *w8 = (const uint8_t *)W + g * 8 * row_bytes;                            \
            const half *s8 = S + g * 8 * (K / G);                                                  \
            float out[32];                                                                         \
            DOTS8(M)                                                                               \
            for (int m = 0; m < M; m++)                                                            \
                for (int r = 0; r < 8; r++) y[m * N + 8 * g + r] = out[8 * m + r] + (b ? b[8 * g + r] : 0.f); \
        }                                                                                          \
        for (long n = N - N % 8; n < N; n++) { /* the rows after the last group of 8, as stored */ \
            float out[4];                                                                          \
            dots((const uint8_t *)W + n * row_bytes, S + n * (K / G), xv, xd, xs, K, G, bits, M, out);\
            for (int m = 0; m < M; m++) y[m * N + n] = out[m] + (b ? b[n] : 0.f);                  \
        }                                                                                          \
        break;

/* x [M, K] fp32, W [N, K] int8 or [N, K/2] packed int4, S [N, K/G] fp16, all in the interleaved layout (quantize.py's
 * `interleave`: each complete group of 8 rows as dots8 reads it, the last N % 8 rows as they are), b [N] fp32 or
 * NULL, y [M, N] fp32; K and G multiples of 32, G dividing K; x rows go 4 at a time (one pass over W each).
 * Returns 0, or -1 when scratch memory cannot be had. */
int quant_gemm(const float *x, const void *W, const half *S, const float *b, float *y, long M, long N, long K,
               long G, long bits);

int quant_linear(const float *x, const void *W, const half *S, const float *b, float *y, long M, long N, long K,
                 long G, long bits) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
    /* From 3 rows gemm.c's vpdpbusd tiles (16 W rows, every x row in one pass over W, prefetching as here) stream
     * the weights faster than dots8's maddubs, which passes over W once per 4 rows: measured on a Zen 5 EPYC, 120
     * SmolLM2-sized matrices (113 MB int8, 60 MB int4) from memory, 4 rows 38 / 29 GB/s against 35 / 25, 8 rows
     * 27 / 24 against 18 / 13.5; 1-2 rows, where both run near memory's speed, dots8 stays ahead by 3-10%. */
    if (M >= 3) return quant_gemm(x, W, S, b, y, M, N, K, G, bits);
#endif
    long row_bytes = bits == 8 ? K : K / 2;
#ifdef INT_DOTS
    int8_t *xq = malloc(4 * K);
    float *xd = malloc(2 * 4 * (K / 32) * sizeof(float)), *xs = xd + 4 * (K / 32);
    if (!xq || !xd) {
        free(xq), free(xd);
        return -1;
    }
    const int8_t *xv = xq;
#else
    const float *xv, *xd = NULL, *xs = NULL;
#endif
    for (long m0 = 0; m0 < M; m0 += 4, x += 4 * K, y += 4 * N) {
        long rows = M - m0 < 4 ? M - m0 : 4;
#ifdef INT_DOTS
        quantize_rows(x, rows, K, xq, xd, xs);
#else
        xv = x;
#endif
        switch (rows) {
            ROWS(1) ROWS(2) ROWS(3) ROWS(4)
        }
    }
#ifdef INT_DOTS
    free(xq), free(xd);
#endif
    return 0;
}
