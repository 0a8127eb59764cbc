// Row-invariant linear and attention: every output row is a function of its own input row (and,
// for attention, of the keys that row attends to) alone, bit for bit, whatever the number of
// rows in the call, the row's position among them, or the number of threads.
//
// Linear, y[T, N] = x[T, K] @ W[N, K]^T + b: output (t, n) is always computed the same way,
//   acc[16] = 0;  for each chunk c of K, in order: acc[l] += products of x[t] and W[n] in lane l
//   y = tree_sum(acc) + b[n], rounded once to bf16 (or kept in fp32)
// inside a single call of a register-tile kernel. Tiles of MR rows of x by NR rows of W only
// share loads: each (t, n) keeps its own accumulator, and edge tiles repeat a row rather than
// take another code path, so how T and N fall into tiles, cache blocks and threads (split over
// N only, never over K) cannot change any result.
// Two arithmetic paths, each invariant on its own (they differ from each other):
// - dpbf16 (x and W bf16, CPU with AVX512_BF16): chunks of 32 values, one vdpbf16ps each (lane
//   l sums the products of values 2l and 2l + 1), reduced by _mm512_reduce_add_ps;
// - portable (any x86-64): x fp32, W bf16 or fp32, chunks of 16 values, lane l += x * w rounded
//   as written (built with -ffp-contract=off), a fixed pairwise tree at the end.
//
// Attention: each (query, head) is one call of the same routine over the list of the keys it
// attends to, in key order; masked keys are dropped before any arithmetic, so a tree node gets
// exactly what the same query gets alone over those keys stored contiguously. Two routines, each
// invariant on its own: AVX512F (D % 16 == 0) and portable C.
//
// OpenMP: built with -fopenmp and loaded after torch, the library shares torch's libgomp pool.

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 16
#define DP_TARGET __attribute__((target("avx512f,avx512bw,avx512bf16"), always_inline)) inline
enum { MR = 4, NR = 4 };  // register tile: rows of x by rows of W
#define BLOCK_BYTES (256 * 1024)  // rows of W kept hot in L2 while all of x passes over them

static inline float bf16_to_f32(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {  // round to nearest even, as torch does
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40);  // NaN
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

static inline float tree_sum(const float *acc) {  // fixed pairwise order over LANES values
    float s[LANES / 2];
    for (int l = 0; l < 8; l++) s[l] = acc[l] + acc[l + 8];
    for (int l = 0; l < 4; l++) s[l] = s[l] + s[l + 4];
    for (int l = 0; l < 2; l++) s[l] = s[l] + s[l + 2];
    return s[0] + s[1];
}

typedef struct {
    const void *x;      // [T, K] bf16 (dpbf16 path) or fp32 (portable path)
    const void *w;      // [N, K] bf16, or fp32 on the portable path when w_bf16 == 0
    const float *bias;  // [N] or NULL
    void *y;            // [T, N] bf16 when y_bf16, else fp32
    int64_t t, n, k;
    int w_bf16, y_bf16;
} Linear;

static inline void store(const Linear *j, int64_t t, int64_t n, float v) {
    if (j->bias) v += j->bias[n];
    if (j->y_bf16) ((uint16_t *)j->y)[t * j->n + n] = f32_to_bf16(v);
    else ((float *)j->y)[t * j->n + n] = v;
}

// One row of x against the NR rows of W held in w0..w3: four accumulators, 32 values.
#define DP_ROW(row, a0, a1, a2, a3)                                            \
    do {                                                                       \
        const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(m, (row) + c); \
        a0 = _mm512_dpbf16_ps(a0, xv, w0);                                     \
        a1 = _mm512_dpbf16_ps(a1, xv, w1);                                     \
        a2 = _mm512_dpbf16_ps(a2, xv, w2);                                     \
        a3 = _mm512_dpbf16_ps(a3, xv, w3);                                     \
    } while (0)

// The 32 values from c on that mask m_ selects, for every (row of x, row of W) of the tile.
#define DP_CHUNK(c_, m_)                                                          \
    do {                                                                          \
        const int64_t c = (c_);                                                   \
        const __mmask32 m = (m_);                                                 \
        const __m512bh w0 = (__m512bh)_mm512_maskz_loadu_epi16(m, w[0] + c);     \
        const __m512bh w1 = (__m512bh)_mm512_maskz_loadu_epi16(m, w[1] + c);     \
        const __m512bh w2 = (__m512bh)_mm512_maskz_loadu_epi16(m, w[2] + c);     \
        const __m512bh w3 = (__m512bh)_mm512_maskz_loadu_epi16(m, w[3] + c);     \
        DP_ROW(x[0], c00, c01, c02, c03);                                         \
        DP_ROW(x[1], c10, c11, c12, c13);                                         \
        DP_ROW(x[2], c20, c21, c22, c23);                                         \
        DP_ROW(x[3], c30, c31, c32, c33);                                         \
    } while (0)

// dpbf16 tile: out[a][b] = x[a] . w[b] over k values, for MR rows of x and NR rows of W.
// The accumulators are named variables: gcc keeps those in registers, not arrays of them.
static DP_TARGET void dp_tile(const uint16_t *x[MR], const uint16_t *w[NR], int64_t k,
                              float out[MR][NR]) {
    __m512 c00, c01, c02, c03, c10, c11, c12, c13, c20, c21, c22, c23, c30, c31, c32, c33;
    c00 = c01 = c02 = c03 = c10 = c11 = c12 = c13 = _mm512_setzero_ps();
    c20 = c21 = c22 = c23 = c30 = c31 = c32 = c33 = _mm512_setzero_ps();
    const int64_t full = k / 32 * 32;
    for (int64_t i = 0; i < full; i += 32) DP_CHUNK(i, ~(__mmask32)0);
    // the last chunk reads only the values that exist; the rest are zeros on both sides
    if (full < k) DP_CHUNK(full, ((__mmask32)1 << (k - full)) - 1);
    const __m512 acc[MR][NR] = {
        {c00, c01, c02, c03}, {c10, c11, c12, c13}, {c20, c21, c22, c23}, {c30, c31, c32, c33}};
    for (int a = 0; a < MR; a++)
        for (int b = 0; b < NR; b++) out[a][b] = _mm512_reduce_add_ps(acc[a][b]);
}

// Portable tile, the same shape of work in plain C (the compiler may vectorize over lanes):
// x rows fp32, W rows bf16 or fp32.
static inline __attribute__((always_inline)) void fp_tile(const Linear *j, const void *x[MR],
                                                          const void *w[NR], float out[MR][NR]) {
    const int64_t k = j->k;
    float acc[MR][NR][LANES] = {{{0}}}, wv[NR][LANES];
    for (int64_t c = 0; c < k; c += LANES) {
        const int64_t len = k - c < LANES ? k - c : LANES;  // lanes past K stay untouched
        for (int b = 0; b < NR; b++)
            for (int l = 0; l < len; l++)
                wv[b][l] = j->w_bf16 ? bf16_to_f32(((const uint16_t *)w[b])[c + l])
                                     : ((const float *)w[b])[c + l];
        for (int a = 0; a < MR; a++)
            for (int b = 0; b < NR; b++)
                for (int l = 0; l < len; l++)
                    acc[a][b][l] += ((const float *)x[a])[c + l] * wv[b][l];
    }
    for (int a = 0; a < MR; a++)
        for (int b = 0; b < NR; b++) out[a][b] = tree_sum(acc[a][b]);
}

static DP_TARGET void dp_tile_any(const Linear *j, const void *x[MR], const void *w[NR],
                                  float out[MR][NR]) {
    dp_tile((const uint16_t **)x, (const uint16_t **)w, j->k, out);
}

typedef void TileFn(const Linear *j, const void *x[MR], const void *w[NR], float out[MR][NR]);

// Rows n0 .. n1 of W against every row of x, x passing over them MR rows at a time. Edge tiles
// repeat their last row of x or W: computed like any other, not stored.
static inline __attribute__((always_inline)) void block(const Linear *j, int64_t n0, int64_t n1,
                                                        int64_t x_bytes, TileFn tile) {
    const int64_t w_bytes = j->k * (j->w_bf16 ? 2 : 4);
    for (int64_t t0 = 0; t0 < j->t; t0 += MR) {
        const void *x[MR];
        for (int64_t a = 0; a < MR; a++)
            x[a] = (const char *)j->x + (t0 + a < j->t ? t0 + a : j->t - 1) * j->k * x_bytes;
        for (int64_t n = n0; n < n1; n += NR) {
            const void *w[NR];
            float out[MR][NR];
            for (int64_t b = 0; b < NR; b++)
                w[b] = (const char *)j->w + (n + b < n1 ? n + b : n1 - 1) * w_bytes;
            tile(j, x, w, out);
            for (int64_t a = 0; a < MR && t0 + a < j->t; a++)
                for (int64_t b = 0; b < NR && n + b < n1; b++) store(j, t0 + a, n + b, out[a][b]);
        }
    }
}

__attribute__((target("avx512f,avx512bw,avx512bf16"))) static void dp_block(const Linear *j,
                                                                           int64_t n0, int64_t n1) {
    block(j, n0, n1, 2, dp_tile_any);
}

// The clones differ in instructions, not arithmetic: no FMA contraction, no reassociation.
__attribute__((target_clones("avx512f", "avx2", "default"))) static void fp_block(const Linear *j,
                                                                                 int64_t n0,
                                                                                 int64_t n1) {
    block(j, n0, n1, 4, fp_tile);
}

int subspec_exact_dpbf16_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512bf16");
}

// y = x @ W^T + bias. use_dpbf16: x, W bf16 and the dpbf16 path; else x fp32 (portable path).
// Returns 0, or -1 on bad arguments.
int subspec_exact_linear(const void *x, const void *w, const float *bias, void *y, int64_t t,
                         int64_t n, int64_t k, int w_bf16, int y_bf16, int use_dpbf16,
                         int threads) {
    if (t < 1 || n < 1 || k < 1 || (use_dpbf16 && (!w_bf16 || !subspec_exact_dpbf16_supported())))
        return -1;
    const Linear job = {x, w, bias, y, t, n, k, w_bf16, y_bf16};
    int64_t rows = BLOCK_BYTES / (k * (w_bf16 ? 2 : 4)) / NR * NR;  // rows of W per block
    if (rows < NR) rows = NR;
    const int64_t blocks = (n + rows - 1) / rows;
    if (n * k * t < (1 << 18)) threads = 1;  // too small to share
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t n1 = (b + 1) * rows < n ? (b + 1) * rows : n;
        if (use_dpbf16) dp_block(&job, b * rows, n1);
        else fp_block(&job, b * rows, n1);
    }
    return 0;
}

// ---- attention ----

typedef struct {
    const float *q;       // [Hq, T, D]
    const void *k, *v;    // [Hkv, S, D] bf16 when kv_bf16, else fp32
    const int32_t *keep;  // [T, S]: the keys query t attends to, in order; count[t] of them
    const int64_t *count;
    float *out;           // [Hq, T, D]
    int64_t hq, hkv, t, s, d;
    float scale;
    int kv_bf16, wide;  // wide: the AVX512F routine (D % 16 == 0, D <= MAX_D, CPU has it)
} Attention;

#define MAX_D 256
#define AVX512_TARGET __attribute__((target("avx512f")))

static inline __attribute__((always_inline)) float kv_at(const void *base, int64_t i,
                                                         const int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)base)[i]) : ((const float *)base)[i];
}

// One query over its kept keys: scores, max, exp, sum and the weighted values, each in key order.
// p: scratch for count scores. Writes out[D].
static inline __attribute__((always_inline)) void attend_one(const Attention *a, const float *q,
                                                             const void *k, const void *v,
                                                             const int32_t *keep, int64_t count,
                                                             float *p, float *out, const int bf16) {
    const int64_t d = a->d;
    float m = -INFINITY, total = 0.0f;
    for (int64_t j = 0; j < count; j++) {
        const int64_t row = (int64_t)keep[j] * d;
        float acc[LANES] = {0};
        int64_t c = 0;
        for (; c + LANES <= d; c += LANES)  // constant trip count: one vector per chunk
            for (int l = 0; l < LANES; l++) acc[l] += q[c + l] * kv_at(k, row + c + l, bf16);
        for (int l = 0; c + l < d; l++) acc[l] += q[c + l] * kv_at(k, row + c + l, bf16);
        p[j] = tree_sum(acc) * a->scale;
        m = fmaxf(m, p[j]);
    }
    for (int64_t j = 0; j < count; j++) {
        p[j] = expf(p[j] - m);
        total += p[j];
    }
    for (int64_t e = 0; e < d; e++) out[e] = 0.0f;
    for (int64_t j = 0; j < count; j++) {
        const int64_t row = (int64_t)keep[j] * d;
        for (int64_t e = 0; e < d; e++) out[e] += p[j] * kv_at(v, row + e, bf16);
    }
    for (int64_t e = 0; e < d; e++) out[e] /= total;
}

// 16 values of K or V from element i on, as fp32.
static AVX512_TARGET inline __m512 load16(const void *base, int64_t i, const int bf16) {
    if (!bf16) return _mm512_loadu_ps((const float *)base + i);
    const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)base + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// e^x for x <= 0 (Cephes' single-precision polynomial, about 1 ulp), 0 below -87.3.
static AVX512_TARGET inline __m512 exp16(__m512 x) {
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), 0);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // x - n ln 2, in two parts
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(y, r), r, r), _mm512_set1_ps(1.0f));
    const __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_LT_OQ);
    return _mm512_maskz_mov_ps((__mmask16)~tiny, _mm512_scalef_ps(y, n));
}

// p[j] = e^(p[j] - max p) for count scores; returns their sum, taken in 16 lanes (j % 16) and
// reduced by _mm512_reduce_add_ps: an order fixed by count.
static AVX512_TARGET inline float softmax_numerators(float *p, int64_t count) {
    __m512 mv = _mm512_set1_ps(-INFINITY), sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < count; j += 16) {
        const __mmask16 live = count - j >= 16 ? 0xffff : (__mmask16)((1u << (count - j)) - 1);
        mv = _mm512_mask_max_ps(mv, live, mv, _mm512_maskz_loadu_ps(live, p + j));
    }
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mv));
    for (int64_t j = 0; j < count; j += 16) {
        const __mmask16 live = count - j >= 16 ? 0xffff : (__mmask16)((1u << (count - j)) - 1);
        const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, p + j), m));
        _mm512_mask_storeu_ps(p + j, live, e);
        sum = _mm512_mask_add_ps(sum, live, sum, e);
    }
    return _mm512_reduce_add_ps(sum);
}

// attend_one's steps in AVX512F, with arithmetic of its own: fused multiply-adds, D / 16 lanes
// of partial dot products reduced by _mm512_reduce_add_ps, exp16, softmax_numerators' sum.
static AVX512_TARGET inline __attribute__((always_inline)) void attend_wide(
    const Attention *a, const float *q, const void *k, const void *v, const int32_t *keep,
    int64_t count, float *p, float *out, const int bf16) {
    const int64_t d = a->d, chunks = d / 16;
    __m512 qv[MAX_D / 16], o[MAX_D / 16];
    for (int64_t c = 0; c < chunks; c++) {
        qv[c] = _mm512_loadu_ps(q + 16 * c);
        o[c] = _mm512_setzero_ps();
    }
    for (int64_t j0 = 0; j0 < count; j0 += 4) {  // 4 keys at a time, each on its own
        const int64_t r0 = (int64_t)keep[j0] * d;
        const int64_t r1 = j0 + 1 < count ? (int64_t)keep[j0 + 1] * d : r0;  // edges repeat
        const int64_t r2 = j0 + 2 < count ? (int64_t)keep[j0 + 2] * d : r0;
        const int64_t r3 = j0 + 3 < count ? (int64_t)keep[j0 + 3] * d : r0;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t c = 0; c < chunks; c++) {
            a0 = _mm512_fmadd_ps(qv[c], load16(k, r0 + 16 * c, bf16), a0);
            a1 = _mm512_fmadd_ps(qv[c], load16(k, r1 + 16 * c, bf16), a1);
            a2 = _mm512_fmadd_ps(qv[c], load16(k, r2 + 16 * c, bf16), a2);
            a3 = _mm512_fmadd_ps(qv[c], load16(k, r3 + 16 * c, bf16), a3);
        }
        const float dots[4] = {_mm512_reduce_add_ps(a0), _mm512_reduce_add_ps(a1),
                               _mm512_reduce_add_ps(a2), _mm512_reduce_add_ps(a3)};
        for (int64_t e = 0; e < 4 && j0 + e < count; e++) p[j0 + e] = dots[e] * a->scale;
    }
    const float total = softmax_numerators(p, count);
    for (int64_t j = 0; j < count; j++) {
        const int64_t row = (int64_t)keep[j] * d;
        const __m512 pj = _mm512_set1_ps(p[j]);
        for (int64_t c = 0; c < chunks; c++)
            o[c] = _mm512_fmadd_ps(pj, load16(v, row + 16 * c, bf16), o[c]);
    }
    for (int64_t c = 0; c < chunks; c++)
        _mm512_storeu_ps(out + 16 * c, _mm512_div_ps(o[c], _mm512_set1_ps(total)));
}

static AVX512_TARGET void attend_avx512(const Attention *a, const float *q, const void *k,
                                        const void *v, const int32_t *keep, int64_t count,
                                        float *p, float *out) {
    if (a->kv_bf16) attend_wide(a, q, k, v, keep, count, p, out, 1);
    else attend_wide(a, q, k, v, keep, count, p, out, 0);
}

// The clones differ in instructions, not arithmetic: no FMA contraction, no reassociation.
__attribute__((target_clones("avx512f", "avx2", "default"))) static void attend_portable(
    const Attention *a, const float *q, const void *k, const void *v, const int32_t *keep,
    int64_t count, float *p, float *out) {
    if (a->kv_bf16) attend_one(a, q, k, v, keep, count, p, out, 1);
    else attend_one(a, q, k, v, keep, count, p, out, 0);
}

// Pair i = h * T + t of the [Hq, T] grid.
static void attend_pair(const Attention *a, int64_t i, float *p) {
    const int64_t h = i / a->t, t = i % a->t, g = h / (a->hq / a->hkv);
    const int64_t kv = g * a->s * a->d * (a->kv_bf16 ? 2 : 4);  // byte offset of head g
    const void *k = (const char *)a->k + kv, *v = (const char *)a->v + kv;
    const float *q = a->q + i * a->d;
    const int32_t *keep = a->keep + t * a->s;
    if (a->wide) attend_avx512(a, q, k, v, keep, a->count[t], p, a->out + i * a->d);
    else attend_portable(a, q, k, v, keep, a->count[t], p, a->out + i * a->d);
}

// out = softmax(q k^T * scale, over the keys mask allows) v, grouped-query (Hq % Hkv == 0).
// mask: [T, S] bytes, nonzero = attend, or NULL for all. Returns 0, -1 on bad arguments, -2
// when out of memory.
int subspec_exact_attention(const float *q, const void *k, const void *v, const uint8_t *mask,
                            float *out, int64_t hq, int64_t hkv, int64_t t, int64_t s, int64_t d,
                            float scale, int kv_bf16, int threads) {
    if (hq < 1 || hkv < 1 || hq % hkv || t < 1 || s < 1 || d < 1) return -1;
    int32_t *keep = malloc(sizeof(int32_t) * (size_t)(t * s));
    int64_t *count = malloc(sizeof(int64_t) * (size_t)t);
    if (!keep || !count) {
        free(keep);
        free(count);
        return -2;
    }
    for (int64_t i = 0; i < t; i++) {
        int64_t c = 0;
        for (int64_t j = 0; j < s; j++)
            if (!mask || mask[i * s + j]) keep[i * s + c++] = (int32_t)j;
        count[i] = c;
    }
    __builtin_cpu_init();
    const int wide = d % 16 == 0 && d <= MAX_D && __builtin_cpu_supports("avx512f");
    const Attention job = {q, k, v, keep, count, out, hq, hkv, t, s, d, scale, kv_bf16, wide};
    const int64_t pairs = hq * t;
    if (pairs * s * d < (1 << 16)) threads = 1;  // too small to share
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *p = malloc(sizeof(float) * (size_t)s);
        if (!p) failed = 1;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < pairs; i++)
            if (p) attend_pair(&job, i, p);
        free(p);
    }
    free(keep);
    free(count);
    return failed ? -2 : 0;
}
