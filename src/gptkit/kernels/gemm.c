/* Integer GEMM for quantized prefill: y[m, n] = x[m, :] . dequant(W)[n, :] + b[n] for many rows m, over the int8 /
 * int4 blocks as the layers store them (quant.c's interleaved layout: groups of 8 rows, each block of 32 inputs
 * as 4-byte chunks of the 8 rows side by side) with no fp32 copy of the weights. As llama.cpp does, the x rows are
 * first quantized to int8 blocks of 32 with one fp32 scale each (xd = max|x| / 127, the same as quant.c's decode
 * path), once per call; a block's 32 products are then summed exactly in integers and scaled once:
 *   y[m, n] = sum over blocks of  d_w[n, blk] * xd[m, blk] * (q_w[n, blk] . q_x[m, blk])
 * One 32-byte chunk of the layout holds 4 inputs of 8 W rows, so a 4-byte broadcast of x and one multiply-add
 * instruction give 8 rows' partial dots in the lanes of one register: no horizontal sums anywhere.
 * Paths, chosen at build time (gemm_path names the one built):
 *   avx512-vnni  zmm: two groups (16 W rows) side by side, vpdpbusd with x broadcast from memory, 12 x rows a tile
 *   avx-vnni     ymm: one group, vpdpbusd (VEX), 4 x rows a tile
 *   avx2         ymm: maddubs + madd, 4 x rows a tile
 *   portable     plain C, the blocks unpacked to int8 and dotted in int32 (what the compiler makes of it)
 * vpdpbusd multiplies unsigned bytes by signed ones: int8 weights become unsigned by w + 128 (an xor), int4 ones
 * are already (q + 8 in a nibble); the 128 or 8 x sum(q_x) this adds is taken off by starting the block's
 * integer sum at -128 or -8 x that sum (xsum, from the quantization). maddubs adds pairs in saturating 16 bits,
 * which (w + 128) x q_x could overflow, so the avx2 path moves the int8 weights' signs onto x instead (as
 * quant.c does); int4 products (at most 2 x 15 x 127 a pair) add up in 16 bits over a whole block there.
 * Each thread takes its own panels of W rows (they stay in L1) and sweeps every x row (L2) past them. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

typedef _Float16 half;
/* bytes ahead of the weights' stream to prefetch on a panel's first sweep, when they come from memory (as quant.c) */
#define PREFETCH 1024

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512F__)
#define GEMM_AVX512VNNI 1
#elif defined(__AVXVNNI__) && defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#define GEMM_AVXVNNI 1
#elif defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#define GEMM_AVX2 1
#endif

const char *gemm_path(void) {
#if defined(GEMM_AVX512VNNI)
    return "avx512-vnni";
#elif defined(GEMM_AVXVNNI)
    return "avx-vnni";
#elif defined(GEMM_AVX2)
    return "avx2";
#else
    return "portable";
#endif
}

static inline int32_t load4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* x [M, K] as int8 blocks of 32: xq [M, K], xd [M, K/32] scales, xsum [M, K/32] sums of each block's integers.
 * Rounding to nearest, half away from zero, as roundf (and quant.c's quantize_rows). */
static void quantize_x(const float *x, long M, long K, int8_t *xq, float *xd, int32_t *xsum) {
    const long blocks = M * (K / 32);
#pragma omp for schedule(static)
    for (long i = 0; i < blocks; i++) {
        const float *v = x + 32 * i;
        float top = 0.f;
        for (int j = 0; j < 32; j++) top = top > __builtin_fabsf(v[j]) ? top : __builtin_fabsf(v[j]);
        float d = top / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
        int32_t sum = 0;
        for (int j = 0; j < 32; j++) {
            int32_t q = (int32_t)(v[j] * inv + __builtin_copysignf(0.5f, v[j]));
            xq[32 * i + j] = (int8_t)q;
            sum += q;
        }
        xd[i] = d, xsum[i] = sum;
    }
}

/* The 32 integer weights of block blk of row r: of a group of 8 (interleaved) when grouped, else of a row as stored */
static inline void unpack(const uint8_t *base, int grouped, int r, int bits, int8_t *w) {
    for (int j = 0; j < 32; j++) {
        int c = bits == 8 ? j : j & 15; /* the byte of the row's block holding input j */
        uint8_t byte = grouped ? base[c / 4 * 32 + r * 4 + c % 4] : base[c];
        w[j] = bits == 8 ? (int8_t)byte : (int8_t)((j < 16 ? byte & 15 : byte >> 4) - 8);
    }
}

/* Plain C: y rows [n0, n0 + rows) from W rows at `w` (a group of 8 interleaved, or `rows` rows as stored) */
static void rows_portable(const uint8_t *w, const half *s, int grouped, int rows, const int8_t *xq, const float *xd,
                          const float *b, float *y, long M, long N, long K, long G, int bits, long n0) {
    const long B = K / 32, R = bits == 8 ? 32 : 16, row_bytes = bits == 8 ? K : K / 2;
    for (long m = 0; m < M; m++)
        for (int r = 0; r < rows; r++) y[m * N + n0 + r] = b ? b[n0 + r] : 0.f;
    for (long blk = 0; blk < B; blk++) {
        int8_t v[8][32];
        float d[8];
        for (int r = 0; r < rows; r++) {
            unpack(grouped ? w + blk * 8 * R : w + r * row_bytes + blk * R, grouped, r, bits, v[r]);
            d[r] = grouped ? (float)s[32 * blk / G * 8 + r] : (float)s[r * (K / G) + 32 * blk / G];
        }
        for (long m = 0; m < M; m++) {
            const int8_t *q = xq + m * K + 32 * blk;
            for (int r = 0; r < rows; r++) {
                int32_t dot = 0;
                for (int j = 0; j < 32; j++) dot += v[r][j] * q[j];
                y[m * N + n0 + r] += (float)dot * (d[r] * xd[m * B + blk]);
            }
        }
    }
}

#if defined(GEMM_AVX512VNNI)
#define MT 12 /* x rows a tile: 12 integer and 12 float accumulators, with the weights, in the 32 zmm registers */
#define LANES 16
/* y rows [n0, n0 + 16) of M x rows (M <= MT) from the groups at w0 and w1 (rows 8-15); `lanes` of them stored */
static inline __attribute__((always_inline))
void tile(const uint8_t *w0, const uint8_t *w1, const half *s0, const half *s1, const int8_t *xq, const float *xd,
          const int32_t *xsum, const float *b, float *y, long N, long K, long G, int bits, const int M, long n0,
          int lanes, int stream) {
    const long B = K / 32, R = bits == 8 ? 32 : 16;
    const __m512i low = _mm512_set1_epi8(0x0F), flip = _mm512_set1_epi8((char)0x80);
    const int32_t offset = bits == 8 ? -128 : -8;
    __m512 acc[MT];
    for (int m = 0; m < M; m++) acc[m] = _mm512_setzero_ps();
    for (long blk = 0; blk < B; blk++) {
        const uint8_t *a = w0 + blk * 8 * R, *c = w1 + blk * 8 * R;
        const int8_t *x = xq + 32 * blk;
        if (stream)
            for (int k = 0; k < 8 * R; k += 64) {
                _mm_prefetch((const char *)a + PREFETCH + k, _MM_HINT_T0);
                _mm_prefetch((const char *)c + PREFETCH + k, _MM_HINT_T0);
            }
        /* independent sums a row (U): one chain of dependent vpdpbusd a row would set the pace for 1 or 2 rows */
        const int U = M == 1 ? 4 : M == 2 ? 2 : 1;
        __m512i dot[4][MT];
        for (int m = 0; m < M; m++) {
            dot[0][m] = _mm512_set1_epi32(offset * xsum[m * B + blk]);
            for (int u = 1; u < U; u++) dot[u][m] = _mm512_setzero_si512();
        }
        if (bits == 8) {
            for (int k = 0; k < 8; k++) {
                __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(a + 32 * k))),
                                               _mm256_loadu_si256((const __m256i *)(c + 32 * k)), 1);
                v = _mm512_xor_si512(v, flip);
                for (int m = 0; m < M; m++)
                    dot[k % U][m] = _mm512_dpbusd_epi32(dot[k % U][m], v, _mm512_set1_epi32(load4(x + m * K + 4 * k)));
            }
        } else {
            for (int k = 0; k < 4; k++) {
                __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(a + 32 * k))),
                                               _mm256_loadu_si256((const __m256i *)(c + 32 * k)), 1);
                __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
                for (int m = 0; m < M; m++) {
                    const int u = 2 * k % U, w = (2 * k + 1) % U;
                    dot[u][m] = _mm512_dpbusd_epi32(dot[u][m], lo, _mm512_set1_epi32(load4(x + m * K + 4 * k)));
                    dot[w][m] = _mm512_dpbusd_epi32(dot[w][m], hi, _mm512_set1_epi32(load4(x + m * K + 16 + 4 * k)));
                }
            }
        }
        for (int m = 0; m < M; m++)
            for (int u = 1; u < U; u++) dot[0][m] = _mm512_add_epi32(dot[0][m], dot[u][m]);
        long g = 32 * blk / G * 8;
        __m512 d = _mm512_cvtph_ps(_mm256_inserti128_si256(
            _mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(s0 + g))), _mm_loadu_si128((const __m128i *)(s1 + g)), 1));
        for (int m = 0; m < M; m++)
            acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[0][m]), _mm512_mul_ps(d, _mm512_set1_ps(xd[m * B + blk])), acc[m]);
    }
    __m512 bias = _mm512_setzero_ps();
    if (b) bias = _mm512_maskz_loadu_ps((__mmask16)((1u << lanes) - 1), b + n0);
    for (int m = 0; m < M; m++)
        _mm512_mask_storeu_ps(y + m * N + n0, (__mmask16)((1u << lanes) - 1), _mm512_add_ps(acc[m], bias));
}
#elif defined(GEMM_AVXVNNI) || defined(GEMM_AVX2)
#define MT 4
#define LANES 8
#ifdef GEMM_AVXVNNI
#define DPBUSD(acc, u, s) _mm256_dpbusd_avx_epi32(acc, u, s)
#endif
static inline __attribute__((always_inline))
void tile(const uint8_t *w0, const uint8_t *unused, const half *s0, const half *unused_too, const int8_t *xq,
          const float *xd, const int32_t *xsum, const float *b, float *y, long N, long K, long G, int bits, const int M,
          long n0, int lanes, int stream) {
    (void)unused, (void)unused_too, (void)lanes, (void)xsum;
    const long B = K / 32, R = bits == 8 ? 32 : 16;
    const __m256i low = _mm256_set1_epi8(0x0F);
    __m256 acc[MT];
    for (int m = 0; m < M; m++) acc[m] = _mm256_setzero_ps();
    for (long blk = 0; blk < B; blk++) {
        const uint8_t *a = w0 + blk * 8 * R;
        const int8_t *x = xq + 32 * blk;
        if (stream)
            for (int k = 0; k < 8 * R; k += 64) _mm_prefetch((const char *)a + PREFETCH + k, _MM_HINT_T0);
        __m256i dot[MT];
#ifdef GEMM_AVXVNNI
        const int32_t offset = bits == 8 ? -128 : -8;
        const __m256i flip = _mm256_set1_epi8((char)0x80);
        for (int m = 0; m < M; m++) dot[m] = _mm256_set1_epi32(offset * xsum[m * B + blk]);
        if (bits == 8) {
            for (int k = 0; k < 8; k++) {
                __m256i v = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(a + 32 * k)), flip);
                for (int m = 0; m < M; m++)
                    dot[m] = DPBUSD(dot[m], v, _mm256_set1_epi32(load4(x + m * K + 4 * k)));
            }
        } else {
            for (int k = 0; k < 4; k++) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(a + 32 * k));
                __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                for (int m = 0; m < M; m++) {
                    dot[m] = DPBUSD(dot[m], lo, _mm256_set1_epi32(load4(x + m * K + 4 * k)));
                    dot[m] = DPBUSD(dot[m], hi, _mm256_set1_epi32(load4(x + m * K + 16 + 4 * k)));
                }
            }
        }
#else
        const __m256i ones = _mm256_set1_epi16(1);
        if (bits == 8) {
            for (int m = 0; m < M; m++) dot[m] = _mm256_setzero_si256();
            for (int k = 0; k < 8; k++) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(a + 32 * k)), av = _mm256_sign_epi8(v, v);
                for (int m = 0; m < M; m++) {
                    __m256i p = _mm256_maddubs_epi16(av, _mm256_sign_epi8(_mm256_set1_epi32(load4(x + m * K + 4 * k)), v));
                    dot[m] = _mm256_add_epi32(dot[m], _mm256_madd_epi16(p, ones));
                }
            }
        } else {
            __m256i pairs[MT];
            for (int m = 0; m < M; m++) pairs[m] = _mm256_setzero_si256();
            for (int k = 0; k < 4; k++) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(a + 32 * k));
                __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                for (int m = 0; m < M; m++) {
                    __m256i p = _mm256_maddubs_epi16(lo, _mm256_set1_epi32(load4(x + m * K + 4 * k)));
                    p = _mm256_add_epi16(p, _mm256_maddubs_epi16(hi, _mm256_set1_epi32(load4(x + m * K + 16 + 4 * k))));
                    pairs[m] = _mm256_add_epi16(pairs[m], p);
                }
            }
            for (int m = 0; m < M; m++)
                dot[m] = _mm256_sub_epi32(_mm256_madd_epi16(pairs[m], ones), _mm256_set1_epi32(8 * xsum[m * B + blk]));
        }
#endif
        __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s0 + 32 * blk / G * 8)));
        for (int m = 0; m < M; m++)
            acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[m]), _mm256_mul_ps(d, _mm256_set1_ps(xd[m * B + blk])), acc[m]);
    }
    __m256 bias = b ? _mm256_loadu_ps(b + n0) : _mm256_setzero_ps();
    for (int m = 0; m < M; m++) _mm256_storeu_ps(y + m * N + n0, _mm256_add_ps(acc[m], bias));
}
#endif

#ifdef MT
#define TILE(M) case M: tile(w0, w1, s0, s1, q, d, sums, b, y + m * N, N, K, G, bits, M, n0, lanes, m == 0); break;
/* all M x rows against the W rows [n0, n0 + LANES) (of which `lanes` exist), MT rows at a time */
static void panel(const uint8_t *w0, const uint8_t *w1, const half *s0, const half *s1, const int8_t *xq,
                  const float *xd, const int32_t *xsum, const float *b, float *y, long M, long N, long K, long G,
                  int bits, long n0, int lanes) {
    const long B = K / 32;
    for (long m = 0; m < M; m += MT) {
        const int8_t *q = xq + m * K;
        const float *d = xd + m * B;
        const int32_t *sums = xsum + m * B;
        switch (M - m < MT ? M - m : MT) {
            TILE(1) TILE(2) TILE(3) TILE(4)
#if MT > 4
            TILE(5) TILE(6) TILE(7) TILE(8) TILE(9) TILE(10) TILE(11) TILE(12)
#endif
        }
    }
}
#endif

/* x [M, K] fp32, W [N, K] int8 or [N, K/2] packed int4 and S [N, K/G] fp16 in the interleaved layout (the last N % 8
 * rows as stored), b [N] fp32 or NULL, y [M, N] fp32; K and G multiples of 32, G dividing K.
 * Returns 0, or -1 when scratch memory cannot be had. */
int quant_gemm(const float *x, const void *W, const half *S, const float *b, float *y, long M, long N, long K,
               long G, long bits) {
    const long B = K / 32, row_bytes = bits == 8 ? K : K / 2, groups = N / 8;
    int8_t *xq = malloc(M * K);
    float *xd = malloc(M * B * sizeof(float));
    int32_t *xsum = malloc(M * B * sizeof(int32_t));
    if (!xq || !xd || !xsum) {
        free(xq), free(xd), free(xsum);
        return -1;
    }
    const uint8_t *w = W;
#pragma omp parallel
    {
        quantize_x(x, M, K, xq, xd, xsum); /* (ends in the barrier of its omp for) */
#ifdef MT
        const long per = LANES / 8, panels = (groups + per - 1) / per;
#pragma omp for schedule(static) nowait
        for (long p = 0; p < panels; p++) {
            long g = p * per; /* a panel's groups; the avx512 path's last one may have one group, read twice */
            long h = g + per - 1 < groups ? g + per - 1 : g;
            panel(w + g * 8 * row_bytes, w + h * 8 * row_bytes, S + g * 8 * (K / G), S + h * 8 * (K / G), xq, xd, xsum,
                  b, y, M, N, K, G, (int)bits, 8 * g, h > g || per == 1 ? LANES : 8);
        }
#else
#pragma omp for schedule(static) nowait
        for (long g = 0; g < groups; g++)
            rows_portable(w + g * 8 * row_bytes, S + g * 8 * (K / G), 1, 8, xq, xd, b, y, M, N, K, G, (int)bits, 8 * g);
#endif
#pragma omp single nowait
        if (N % 8) /* the rows after the last group of 8, as stored */
            rows_portable(w + groups * 8 * row_bytes, S + groups * 8 * (K / G), 0, (int)(N % 8), xq, xd, b, y, M, N, K,
                          G, (int)bits, 8 * groups);
    }
    free(xq), free(xd), free(xsum);
    return 0;
}
