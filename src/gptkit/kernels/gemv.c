/* Skinny fp32 matrix product for CPU decoding: y[m, n] = x[m, :] . W[n, :] + b[n] for a few rows m.
 * Decoding reads every weight once per token, so its speed is the speed at which W streams from memory.
 * Each thread streams its own block of W rows exactly once; the few x rows stay in L1. Written with GCC
 * vector extensions (portable: AVX-512, AVX2 or NEON, whatever -march=native offers) and four
 * independent accumulators so that loads, not the FMA latency chain, set the pace. */
#include <string.h>

typedef float v16 __attribute__((vector_size(64)));

static inline v16 load(const float *p) { v16 v; memcpy(&v, p, sizeof v); return v; }

static float dot(const float *w, const float *x, long K) {
    v16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
    long k = 0;
    for (; k + 64 <= K; k += 64) {
        a0 += load(w + k) * load(x + k);
        a1 += load(w + k + 16) * load(x + k + 16);
        a2 += load(w + k + 32) * load(x + k + 32);
        a3 += load(w + k + 48) * load(x + k + 48);
    }
    for (; k + 16 <= K; k += 16) a0 += load(w + k) * load(x + k);
    v16 a = (a0 + a1) + (a2 + a3);
    float s = 0.f;
    for (int j = 0; j < 16; j++) s += a[j];
    for (; k < K; k++) s += w[k] * x[k];
    return s;
}

void skinny_linear_f32(const float *x, const float *W, const float *b, float *y, long M, long N, long K) {
    #pragma omp parallel for schedule(static)
    for (long n = 0; n < N; n++) {
        const float *w = W + n * K;
        float bias = b ? b[n] : 0.f;
        for (long m = 0; m < M; m++) y[m * N + n] = dot(w, x + m * K, K) + bias;
    }
}
