// The draft layer's attention (csrc/int4_vnni.c's subspec_draft_layer): a group of query heads
// that share a kv head, over the bf16 cache, in fp32. AVX-512: the group's queries a block at
// a time over each row of values; AVX2: one head at a time. Built into the int4_vnni library.

#include <math.h>
#include <stdint.h>

#include "bf16.h"
#include "draft_attention.h"
#include "simd16.h"

// In place: v[i] = e^(v[i] - shift) over n values; returns their sum.
static float exp_shifted(float *v, int64_t n, float shift) {
    f16 sum = f_zero();
    for (int64_t i = 0; i < n; i += 16) {
        const int64_t live = upto16(n - i);
        const f16 e = exp16(f_sub(f_load_n(v + i, live), f_set(shift)));
        f_store_n(v + i, e, live);
        sum = f_add(sum, f_first(e, live));
    }
    return f_sum(sum);
}

#if defined(SIMD16_AVX512)
// The grouped-query attention of one token: `g` query heads that share one kv head (all of
// them, or a block when the caller splits them over threads), each over the keys `mask` keeps
// (bf16 rows [S, D] of that head). Each key row is widened once for the g queries, each value
// row once per QUERY_BLOCK of them (a head at a time, the widening cost as much as the
// products), and the scores are summed 16 keys at a time (one sum per key cost as much
// again). On the Zen 4 VM, 26 layers at 4 rows over 500 keys each, one thread: 7.8 ms a head
// at a time, 5.1 ms.

// The largest of n values (-inf when all are; n >= 1).
static float max_of(const float *v, int64_t n) {
    const int64_t full = n / 16 * 16;
    f16 top16 = f_set(-INFINITY);
    for (int64_t i = 0; i < full; i += 16) top16 = f_max(top16, f_load(v + i));
    float top = f_top(top16);
    for (int64_t i = full; i < n; i++) top = v[i] > top ? v[i] : top;
    return top;
}

// scores[i][s] = q_i . k_s / sqrt(D) for the g queries and keys s0 .. s0 + 16 (those that
// exist): the block's key rows widened once, 16 dot products a query summed at once.
static void score_block(const float *q, int64_t g, const uint16_t *keys, int64_t kv_len,
                        int64_t d, int64_t s0, float *scores) {
    const int64_t n = upto16(kv_len - s0);
    float block[16 * d];  // [16, D] fp32, zeros past the last key: 8 KB at D = 128
    for (int64_t j = 0; j < 16; j++)
        for (int64_t c = 0; c < d; c += 16)
            f_store_n(block + j * d + c,
                      j < n ? f_bf16_n(keys + (s0 + j) * d + c, upto16(d - c)) : f_zero(),
                      upto16(d - c));
    const f16 scale = f_set(1.0f / sqrtf((float)d));
    for (int64_t i = 0; i < g; i++) {
        f16 acc[16];
        for (int j = 0; j < 16; j++) acc[j] = f_zero();
        for (int64_t c = 0; c < d; c += 16) {
            const int64_t live = upto16(d - c);
            const f16 qv = f_load_n(q + i * d + c, live);
            for (int j = 0; j < 16; j++)
                acc[j] = f_fma(qv, f_load_n(block + j * d + c, live), acc[j]);
        }
        f_store_n(scores + i * kv_len + s0, f_mul(f_sums16(acc), scale), n);
    }
}

// out[i][d0 .. d0 + 64) = scale[i] * sum over kept keys s of p[i][s] v[s, d0 ..], for the nq
// queries i; the 4 x nq accumulators stay in registers across the keys (past D, columns run
// with no lanes in use). `nq` is a constant after inlining.
static inline __attribute__((always_inline)) void weigh_values(
    const float *p, int64_t p_stride, const uint16_t *values, const uint8_t *mask,
    int64_t kv_len, int64_t d, int64_t d0, const float *scale, float *out, int64_t out_stride,
    const int nq) {
    f16 acc[QUERY_BLOCK][4];
    int64_t live[4];
    for (int c = 0; c < 4; c++) live[c] = upto16(d - d0 - 16 * c);
    for (int i = 0; i < nq; i++)
        for (int c = 0; c < 4; c++) acc[i][c] = f_zero();
    for (int64_t s = 0; s < kv_len; s++) {
        if (mask && !mask[s]) continue;
        const uint16_t *v = values + s * d + d0;
        f16 row[4];
        for (int c = 0; c < 4; c++) row[c] = f_bf16_n(v + 16 * c, live[c]);
        for (int i = 0; i < nq; i++) {
            const f16 ps = f_set(p[i * p_stride + s]);
            for (int c = 0; c < 4; c++) acc[i][c] = f_fma(ps, row[c], acc[i][c]);
        }
    }
    for (int i = 0; i < nq; i++)
        for (int c = 0; c < 4; c++)
            f_store_n(out + i * out_stride + d0 + 16 * c, f_mul(acc[i][c], f_set(scale[i])),
                      live[c]);
}

// out[i][D] (rows out_stride apart) for the g query rows q[i][D] (d apart): softmax over the
// kept keys of q_i . k_s / sqrt(D), applied to v. scores: g rows of kv_len floats of scratch.
void subspec_attend_group(const float *q, int64_t g, const uint16_t *keys,
                          const uint16_t *values, const uint8_t *mask, int64_t kv_len, int64_t d,
                          float *scores, float *out, int64_t out_stride) {
    float top[g], scale_out[g];
    for (int64_t s0 = 0; s0 < kv_len; s0 += 16) score_block(q, g, keys, kv_len, d, s0, scores);
    if (mask)
        for (int64_t s = 0; s < kv_len; s++)
            if (!mask[s])
                for (int64_t i = 0; i < g; i++) scores[i * kv_len + s] = -INFINITY;
    for (int64_t i = 0; i < g; i++) top[i] = max_of(scores + i * kv_len, kv_len);
    for (int64_t i = 0; i < g; i++) {
        if (top[i] == -INFINITY) {  // nothing to attend to: zeros (a kept key has a finite score)
            for (int64_t s = 0; s < kv_len; s++) scores[i * kv_len + s] = 0.0f;
            scale_out[i] = 0.0f;
        } else {
            scale_out[i] = 1.0f / exp_shifted(scores + i * kv_len, kv_len, top[i]);
        }
    }
    for (int64_t i0 = 0; i0 < g; i0 += QUERY_BLOCK) {
        const float *p = scores + i0 * kv_len, *scale = scale_out + i0;
        float *o = out + i0 * out_stride;
        for (int64_t d0 = 0; d0 < d; d0 += 64) {
#define WEIGH(nq) weigh_values(p, kv_len, values, mask, kv_len, d, d0, scale, o, out_stride, nq)
            switch (g - i0) {
                case 1: WEIGH(1); break;
                case 2: WEIGH(2); break;
                case 3: WEIGH(3); break;
                default: WEIGH(4); break;
            }
#undef WEIGH
        }
    }
}

#else  // AVX2: one head at a time (the blocks above need 32 registers: grouped, 2x slower)

// q[D] . k[D] (k bf16)
static float dot_bf16(const float *q, const uint16_t *k, int64_t d) {
    f16 acc = f_zero();
    for (int64_t i = 0; i < d; i += 16) {
        const int64_t live = upto16(d - i);
        acc = f_fma(f_load_n(q + i, live), f_bf16_n(k + i, live), acc);
    }
    return f_sum(acc);
}

// out[d0 .. d0 + 16 nv) = scale * sum of p[s] v[s, d0 ..] over the keys `mask` keeps (v: bf16
// rows [S, D]). The nv vectors of the output stay in registers across the keys: read and
// written back per key, they had cost as much as the products. `nv` is a constant after
// inlining.
static inline __attribute__((always_inline)) void weigh_head_values(
    const float *p, const uint16_t *values, const uint8_t *mask, int64_t kv_len, int64_t d,
    int64_t d0, float scale, float *out, const int nv) {
    f16 acc[4];
    for (int c = 0; c < nv; c++) acc[c] = f_zero();
    for (int64_t s = 0; s < kv_len; s++) {
        if (mask && !mask[s]) continue;
        const f16 ps = f_set(p[s]);
        const uint16_t *v = values + s * d + d0;
        for (int c = 0; c < nv; c++)
            acc[c] = f_fma(ps, f_bf16_n(v + 16 * c, upto16(d - d0 - 16 * c)), acc[c]);
    }
    for (int c = 0; c < nv; c++)
        f_store_n(out + d0 + 16 * c, f_mul(acc[c], f_set(scale)), upto16(d - d0 - 16 * c));
}

// out[D] = softmax over the keys `mask` keeps of q . k_s / sqrt(D), applied to v; keys and
// values are bf16 rows [S, D] of one kv head; `scores` holds kv_len floats of scratch.
static void attend_head(const float *q, const uint16_t *keys, const uint16_t *values,
                        const uint8_t *mask, int64_t kv_len, int64_t d, float *scores,
                        float *out) {
    const float scale = 1.0f / sqrtf((float)d);
    float top = -INFINITY;
    for (int64_t s = 0; s < kv_len; s++) {
        scores[s] = mask && !mask[s] ? -INFINITY : dot_bf16(q, keys + s * d, d) * scale;
        top = scores[s] > top ? scores[s] : top;
    }
    if (top == -INFINITY) {  // nothing to attend to
        for (int64_t i = 0; i < d; i++) out[i] = 0.0f;
        return;
    }
    const float scale_out = 1.0f / exp_shifted(scores, kv_len, top);
    for (int64_t d0 = 0; d0 < d; d0 += 64) {  // 4 vectors of the output at a time
#define WEIGH(nv) weigh_head_values(scores, values, mask, kv_len, d, d0, scale_out, out, nv)
        switch ((d - d0 + 15) / 16) {
            case 1: WEIGH(1); break;
            case 2: WEIGH(2); break;
            case 3: WEIGH(3); break;
            default: WEIGH(4); break;
        }
#undef WEIGH
    }
}

// out[i][D] (rows out_stride apart) for the g query rows q[i][D]: attend_head per query.
void subspec_attend_group(const float *q, int64_t g, const uint16_t *keys,
                          const uint16_t *values, const uint8_t *mask, int64_t kv_len, int64_t d,
                          float *scores, float *out, int64_t out_stride) {
    for (int64_t i = 0; i < g; i++)
        attend_head(q + i * d, keys, values, mask, kv_len, d, scores + i * kv_len,
                    out + i * out_stride);
}

#endif
