/* Skinny fp32 matrix product for CPU decoding: y[m, n] = x[m, :] . W[n, :] + b[n] for a few rows m (8 per pass).
 * Decoding reads every weight once per step, so its speed is the speed at which W streams from memory.
 * Each thread streams its own block of W rows exactly once; each loaded piece of a W row is multiplied into
 * all M rows of x (which stay in L1/L2), so 8 rows cost little more than one. Independent accumulators
 * (M x U of them) keep the FMA latency chain from setting the pace, and the M dot products of a W row are
 * reduced together by a transposing shuffle network instead of one horizontal sum each. Written with GCC
 * vector extensions on 8-float vectors (AVX2, AVX-512 and NEON all run them); -march=native picks the ISA. */
#include <string.h>

typedef float v8 __attribute__((vector_size(32)));
typedef int i8 __attribute__((vector_size(32)));

static inline v8 load(const float *p) { v8 v; memcpy(&v, p, sizeof v); return v; }

/* pairwise sums of two vectors' neighbouring lanes, interleaved: [a0+a1, b0+b1, a2+a3, b2+b3, ...] */
static inline v8 pairs(v8 a, v8 b) {
    return __builtin_shuffle(a, b, (i8){0, 8, 2, 10, 4, 12, 6, 14}) + __builtin_shuffle(a, b, (i8){1, 9, 3, 11, 5, 13, 7, 15});
}

/* the lane sums of eight vectors, as one vector */
static inline v8 sums8(v8 a0, v8 a1, v8 a2, v8 a3, v8 a4, v8 a5, v8 a6, v8 a7) {
    v8 t0 = pairs(a0, a1), t1 = pairs(a2, a3), t2 = pairs(a4, a5), t3 = pairs(a6, a7);
    v8 u0 = __builtin_shuffle(t0, t1, (i8){0, 1, 8, 9, 4, 5, 12, 13}) + __builtin_shuffle(t0, t1, (i8){2, 3, 10, 11, 6, 7, 14, 15});
    v8 u1 = __builtin_shuffle(t2, t3, (i8){0, 1, 8, 9, 4, 5, 12, 13}) + __builtin_shuffle(t2, t3, (i8){2, 3, 10, 11, 6, 7, 14, 15});
    return __builtin_shuffle(u0, u1, (i8){0, 1, 2, 3, 8, 9, 10, 11}) + __builtin_shuffle(u0, u1, (i8){4, 5, 6, 7, 12, 13, 14, 15});
}

/* out[m] = w . x[m] for m < M; M and U are constants where this is inlined, so acc lives in registers */
static inline __attribute__((always_inline))
void dots(const float *restrict w, const float *restrict x, long K, const int M, const int U, float *out) {
    v8 acc[8][4];
    for (int m = 0; m < 8; m++)
        for (int u = 0; u < U; u++) acc[m][u] = (v8){0};
    long k = 0;
    for (; k + 8 * U <= K; k += 8 * U)
        for (int u = 0; u < U; u++) {
            v8 wv = load(w + k + 8 * u);
            for (int m = 0; m < M; m++) acc[m][u] += wv * load(x + m * K + k + 8 * u);
        }
    for (; k + 8 <= K; k += 8) {
        v8 wv = load(w + k);
        for (int m = 0; m < M; m++) acc[m][0] += wv * load(x + m * K + k);
    }
    v8 a[8];
    for (int m = 0; m < 8; m++) {
        a[m] = acc[m][0];
        for (int u = 1; u < U; u++) a[m] += acc[m][u];
    }
    v8 s = sums8(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]);
    for (int m = 0; m < M; m++) {
        float t = s[m];
        for (long j = k; j < K; j++) t += w[j] * x[m * K + j];
        out[m] = t;
    }
}

#define ROWS(M, U)                                                                      \
    case M:                                                                             \
        _Pragma("omp parallel for schedule(static)")                                    \
        for (long n = 0; n < N; n++) {                                                  \
            float out[8];                                                               \
            dots(W + n * K, x, K, M, U, out);                                           \
            float bias = b ? b[n] : 0.f;                                                \
            for (int m = 0; m < M; m++) y[m * N + n] = out[m] + bias;                   \
        }                                                                               \
        break;

static void rows8(const float *x, const float *W, const float *b, float *y, long M, long N, long K) {
    switch (M) {
        ROWS(1, 4) ROWS(2, 4) ROWS(3, 2) ROWS(4, 2) ROWS(5, 1) ROWS(6, 1) ROWS(7, 1) ROWS(8, 1)
    }
}

/* More than 8 rows: one pass over W per 8 rows (measured: ahead of MKL up to 64 rows, of oneDNN up to 32). */
void skinny_linear_f32(const float *x, const float *W, const float *b, float *y, long M, long N, long K) {
    for (long m = 0; m < M; m += 8)
        rows8(x + m * K, W, b, y + m * N, M - m < 8 ? M - m : 8, N, K);
}
