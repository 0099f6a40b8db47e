/* One decoding step of a whole GPT in one call: M rows of one new token each, every block from the input
 * embeddings to the final norm, with the KV cache written in place. The weights stream through the skinny
 * kernels (gemv.c, quant.c); everything between them (norms, RoPE, attention over the cache, activations,
 * residuals) is a few thousand floats a row, done here in C, so a step costs the weights' streaming time and
 * not one Python dispatch per operation (about 4 ms a token for GPT-2 124M, a third of an int4 step).
 * It computes what model.py computes (same formulas, fp32), for every architecture GPTConfig describes. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef _Float16 half;

void skinny_linear_f32(const float *x, const float *W, const float *b, float *y, long M, long N, long K);
int quant_linear(const float *x, const void *W, const half *S, const float *b, float *y, long M, long N, long K,
                 long G, long bits);

typedef struct {
    const void *w;  /* fp32 [N, K], int8 [N, K] or packed int4 [N, K / 2] */
    const half *s;  /* fp16 scales [N, K / G] (quantized only) */
    const float *b; /* [N] or NULL */
    long N, K, G, bits; /* bits: 32 (fp32), 8 or 4 */
} Linear;

typedef struct {
    const float *n1w, *n1b, *n2w, *n2b; /* norms (biases NULL for RMSNorm / no bias) */
    const float *qn, *kn;               /* QK-norm weights [D] or NULL */
    Linear qkv, proj, fc, out;
    long local;                         /* banded attention in this layer */
} Layer;

typedef struct {
    Linear wte;               /* the token embedding: fp32, or int8 rows as quant.c stores them */
    const float *wpe;         /* learned positions [context, E] or NULL */
    long n_layer, E, H, KV, D, hidden, context;
    long rms, act, rope, prenorm, window; /* act: 0 gelu, 1 gelu_tanh, 2 swiglu, 3 relu2 */
    float eps;
    const float *cos, *sin;   /* RoPE tables [context, D] */
    const float *nfw, *nfb;   /* final norm or NULL */
    const Layer *layers;
} Plan;

static int linear(const Linear *l, const float *x, float *y, long M) {
    if (l->bits == 32) {
        skinny_linear_f32(x, (const float *)l->w, l->b, y, M, l->N, l->K);
        return 0;
    }
    return quant_linear(x, l->w, l->s, l->b, y, M, l->N, l->K, l->G, l->bits);
}

static void norm(const float *x, float *y, long n, const float *w, const float *b, int rms, float eps) {
    float mean = 0.f, var = 0.f;
    if (!rms) {
        for (long i = 0; i < n; i++) mean += x[i];
        mean /= n;
    }
    for (long i = 0; i < n; i++) var += (x[i] - mean) * (x[i] - mean);
    float inv = 1.f / sqrtf(var / n + eps);
    for (long i = 0; i < n; i++) y[i] = (x[i] - mean) * inv * w[i] + (b ? b[i] : 0.f);
}

/* rotate the two halves of a head, as apply_rope: out = x * cos + [-x2, x1] * sin */
static void rope(float *x, long D, const float *cos, const float *sin) {
    long h = D / 2;
    for (long i = 0; i < h; i++) {
        float a = x[i], b = x[i + h];
        x[i] = a * cos[i] - b * sin[i];
        x[i + h] = b * cos[i + h] + a * sin[i + h];
    }
}

static float activation(float v, long act) {
    switch (act) {
    case 0: return 0.5f * v * (1.f + erff(v * (float)M_SQRT1_2));
    case 1: return 0.5f * v * (1.f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
    case 3: return v > 0.f ? v * v : 0.f;
    default: return v / (1.f + expf(-v)); /* SiLU, the gate of SwiGLU */
    }
}

/* q . k over D values: 8 lanes at a time (a float reduction is not vectorized by the compiler on its own) */
static inline float dot(const float *q, const float *k, long D) {
    typedef float v8 __attribute__((vector_size(32)));
    v8 acc = {0};
    long i = 0;
    for (; i + 8 <= D; i += 8) {
        v8 a, b;
        memcpy(&a, q + i, sizeof a), memcpy(&b, k + i, sizeof b);
        acc += a * b;
    }
    float s = 0.f;
    for (int j = 0; j < 8; j++) s += acc[j];
    for (; i < D; i++) s += q[i] * k[i];
    return s;
}

typedef struct {
    float *qkv, *att, *f;                     /* scratch: [M, Q], [M, H * D], [M, F] */
    const int64_t *pos, *tables;              /* [M], [M, max_blocks]: row m's position j is in block tables[j / bs] */
    float *kc, *vc;                           /* [n_layer, n_blocks, KV, bs, D] */
    long M, n_blocks, bs, max_blocks;
} Step;

/* where position j of row m's key head g of layer l lives in the cache */
static inline long slot(const Step *s, long l, long m, long g, long KV, long j, long D) {
    return (((l * s->n_blocks + s->tables[m * s->max_blocks + j / s->bs]) * KV + g) * s->bs + j % s->bs) * D;
}

/* y (one head) = softmax(q . k_j / sqrt(D)) v over the cached positions from..to of row m, key head g; the
 * positions are walked block by block (a block's bs positions of one head are contiguous) */
static void attend(const Step *s, long l, long m, long g, long KV, const float *q, long from, long to, long D,
                   float *y) {
    float scores[to - from + 1], top = -INFINITY, total = 0.f, scale = 1.f / sqrtf((float)D);
    for (long j = from; j <= to;) {
        long at = slot(s, l, m, g, KV, j, D), n = s->bs - j % s->bs;
        if (n > to - j + 1) n = to - j + 1;
        for (long t = 0; t < n; t++, j++) {
            scores[j - from] = dot(q, s->kc + at + t * D, D) * scale;
            top = fmaxf(top, scores[j - from]);
        }
    }
    for (long j = 0; j <= to - from; j++) total += scores[j] = expf(scores[j] - top);
    for (long i = 0; i < D; i++) y[i] = 0.f;
    for (long j = from; j <= to;) {
        long at = slot(s, l, m, g, KV, j, D), n = s->bs - j % s->bs;
        if (n > to - j + 1) n = to - j + 1;
        for (long t = 0; t < n; t++, j++) {
            float p = scores[j - from] / total;
            const float *v = s->vc + at + t * D;
            for (long i = 0; i < D; i++) y[i] += p * v[i];
        }
    }
}

/* y = attention(x) for the rows of step s: the new keys and values are written into the cache first */
static int attention(const Plan *p, const Layer *L, long l, const Step *s, const float *x, float *y) {
    const long H = p->H, KV = p->KV, D = p->D, Q = (H + 2 * KV) * D, M = s->M;
    if (linear(&L->qkv, x, s->qkv, M)) return -1;
    for (long m = 0; m < M; m++) {
        float *q = s->qkv + m * Q, *k = q + H * D, *v = k + KV * D;
        for (long i = 0; i < H + KV; i++) { /* the query heads, then the key heads */
            if (L->qn) norm(q + i * D, q + i * D, D, i < H ? L->qn : L->kn, NULL, 1, p->eps);
            if (p->rope) rope(q + i * D, D, p->cos + s->pos[m] * D, p->sin + s->pos[m] * D);
        }
        for (long g = 0; g < KV; g++) {
            long at = slot(s, l, m, g, KV, s->pos[m], D);
            memcpy(s->kc + at, k + g * D, sizeof(float) * D);
            memcpy(s->vc + at, v + g * D, sizeof(float) * D);
        }
    }
    #pragma omp parallel for collapse(2) schedule(static)
    for (long m = 0; m < M; m++)
        for (long i = 0; i < H; i++) {
            long to = s->pos[m], from = L->local && to - p->window + 1 > 0 ? to - p->window + 1 : 0;
            attend(s, l, m, i / (H / KV), KV, s->qkv + m * Q + i * D, from, to, D, s->att + (m * H + i) * D);
        }
    return linear(&L->proj, s->att, y, M);
}

/* y = MLP(x): fc, the activation (SwiGLU: SiLU of the first half times the second), projection */
static int mlp(const Plan *p, const Layer *L, const Step *s, const float *x, float *y) {
    const long n = p->hidden, gated = p->act == 2;
    if (linear(&L->fc, x, s->f, s->M)) return -1;
    for (long m = 0; m < s->M; m++) {
        float *f = s->f + m * (gated + 1) * n, *out = s->f + m * n; /* rows compacted in place, in order */
        for (long i = 0; i < n; i++) out[i] = gated ? activation(f[i], 2) * f[n + i] : activation(f[i], p->act);
    }
    return linear(&L->out, s->f, y, s->M);
}

/* x = the embedding of token t: row t of the table, with int8 rows dequantized as quantize.py does. In the int8
 * layout (quant.c) each complete group of 8 rows is interleaved in 4-byte chunks, the last N % 8 rows are not. */
static void embed(const Linear *wte, long t, float *x) {
    const long K = wte->K, G = wte->G;
    if (wte->bits == 32) {
        memcpy(x, (const float *)wte->w + t * K, sizeof(float) * K);
        return;
    }
    const int8_t *q = (const int8_t *)wte->w;
    const half *s = wte->s;
    long r = t % 8, stride = 32, scale_stride = 8; /* chunk / scale steps within the row's group */
    if (t < wte->N / 8 * 8) {
        q += t / 8 * 8 * K + 4 * r, s += t / 8 * 8 * (K / G) + r;
    } else {
        q += t * K, s += t * (K / G), stride = 4, scale_stride = 1;
    }
    for (long k = 0; k < K; k++) x[k] = (float)q[k / 4 * stride + k % 4] * (float)s[k / G * scale_stride];
}

/* tokens [M]: each row's new token, at position pos[m] of its row; the caches kc / vc are blocks [n_layer, n_blocks,
 * KV, bs, D] and row m's position j is in block tables[m * max_blocks + j / bs] (a contiguous cache [n_layer, batch,
 * KV, max_len, D] is one block a row: bs = max_len, tables[m] = its row). x [M, E] gets the rows' final hidden states.
 * Returns 0; -1 when memory cannot be had; -2 (nothing touched) when a token, position or block is out of range. */
int decode_step(const Plan *p, const int64_t *tokens, float *x, long M, const int64_t *pos, const int64_t *tables,
                float *kc, float *vc, long n_blocks, long bs, long max_blocks) {
    for (long m = 0; m < M; m++) {
        if (tokens[m] < 0 || tokens[m] >= p->wte.N || pos[m] < 0 || pos[m] >= p->context ||
            pos[m] / bs >= max_blocks)
            return -2;
        for (long b = 0; b <= pos[m] / bs; b++)
            if (tables[m * max_blocks + b] < 0 || tables[m * max_blocks + b] >= n_blocks) return -2;
    }
    for (long m = 0; m < M; m++) {
        embed(&p->wte, tokens[m], x + m * p->E);
        if (p->wpe)
            for (long i = 0; i < p->E; i++) x[m * p->E + i] += p->wpe[pos[m] * p->E + i];
    }
    const long E = p->E, Q = (p->H + 2 * p->KV) * p->D, F = (p->act == 2 ? 2 : 1) * p->hidden;
    float *h = malloc(sizeof(float) * M * (2 * E + Q + p->H * p->D + F));
    if (!h) return -1;
    float *y = h + M * E;
    Step s = {y + M * E, y + M * E + M * Q, y + M * E + M * Q + M * p->H * p->D, pos, tables, kc, vc, M, n_blocks, bs,
              max_blocks};
    int failed = 0;
    for (long l = 0; l < p->n_layer && !failed; l++) {
        const Layer *L = p->layers + l;
        if (p->prenorm) { /* x += attention(norm1(x)); x += mlp(norm2(x)) */
            for (long m = 0; m < M; m++) norm(x + m * E, h + m * E, E, L->n1w, L->n1b, p->rms, p->eps);
            failed |= attention(p, L, l, &s, h, y);
            for (long i = 0; i < M * E; i++) x[i] += y[i];
            for (long m = 0; m < M; m++) norm(x + m * E, h + m * E, E, L->n2w, L->n2b, p->rms, p->eps);
            failed |= mlp(p, L, &s, h, y);
            for (long i = 0; i < M * E; i++) x[i] += y[i];
        } else { /* GPT-1: x = norm1(x + attention(x)); x = norm2(x + mlp(x)) */
            failed |= attention(p, L, l, &s, x, y);
            for (long i = 0; i < M * E; i++) x[i] += y[i];
            for (long m = 0; m < M; m++) norm(x + m * E, x + m * E, E, L->n1w, L->n1b, p->rms, p->eps);
            failed |= mlp(p, L, &s, x, y);
            for (long i = 0; i < M * E; i++) x[i] += y[i];
            for (long m = 0; m < M; m++) norm(x + m * E, x + m * E, E, L->n2w, L->n2b, p->rms, p->eps);
        }
    }
    if (p->nfw)
        for (long m = 0; m < M; m++) norm(x + m * E, x + m * E, E, p->nfw, p->nfb, p->rms, p->eps);
    free(h);
    return failed ? -1 : 0;
}
