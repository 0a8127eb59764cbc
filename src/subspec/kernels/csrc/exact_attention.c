// Row-invariant attention, the other half of the bf16_exact library (with bf16_exact.c): each
// (query, head) is one call of the same routine over the list of the keys it attends to, in key
// order; masked keys are dropped before any arithmetic, so a tree node gets exactly what the
// same query gets alone over those keys stored contiguously. Two routines, each invariant on
// its own: AVX512F (D % 16 == 0) and portable C. A query that attends to no key gets zeros.

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "sum16.h"

#define LANES 16

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
    return bf16 ? bf16_to_float(((const uint16_t *)base)[i]) : ((const float *)base)[i];
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
    if (a->count[t] == 0) {  // a query that may attend to no key gets zeros, not 0 / 0
        memset(a->out + i * a->d, 0, sizeof(float) * (size_t)a->d);
        return;
    }
    if (a->wide) attend_avx512(a, q, k, v, keep, a->count[t], p, a->out + i * a->d);
    else attend_portable(a, q, k, v, keep, a->count[t], p, a->out + i * a->d);
}

// out = softmax(q k^T * scale, over the keys mask allows) v, grouped-query (Hq % Hkv == 0).
// mask: [T, S] bytes, nonzero = attend, or NULL for all; a row that attends to no key gives
// zeros. Returns 0, -1 on bad arguments, -2 when out of memory.
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
