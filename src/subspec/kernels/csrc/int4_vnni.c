// Low-bit substitute matmul for x86 CPUs: y[M, N] = x[M, K] @ W[N, K]^T (+ bias), built for
// AVX512-VNNI and for AVX2 from this one source (simd16.h: 16 lanes, one register or two).
//
// W is 4-bit, grouped along K: W[n, k] = (q[n, k] - 8) * s[g, n] + z[g, n] with g = k / G
// (torch's int4 convention) and s, z bf16.
//
// W is held in tiles of 16 rows, each tile as K / G group records of 8 G + 64 bytes:
//   w[N / 16, K / G, 8 G + 64]: the group's values, then its 16 (s, z) bf16 pairs,
// where the values are interleaved for vpdpbusd: byte (c, r, j) of a record holds
// q[16 t + r, 8 c + j] (low nibble) and q[16 t + r, 8 c + 4 + j] (high nibble). One 64-byte load
// is then 16 rows x 8 values, and each 32-bit lane of a vpdpbusd is one row of W against 4
// broadcast values of x: the sums land per row, so a tile's 16 outputs are one vector, with
// no horizontal reduction; and a thread reads one stream, front to back (with the scales in a
// separate [K / G, N, 2] array, strided by N, a step was ~1.5x slower).
//
// x is quantized per 64 values to int8 (the draft's numerics need not match the target's: the
// verifier keeps the output exact), so per block b of 64 values of K:
//   sum_k W[n, k] x[k] ~= sum_b s (sx_b * dot(q_b, qx_b)) + (z - 8 s) * sum(x_b).
// x may be float32 or bf16, y float32 or bf16 (rounded to nearest even), so that a bf16 forward
// needs no casts around the call. Tiles are split across OpenMP threads: built with -fopenmp
// and loaded after torch, the library binds to the libgomp torch already loaded, so both share
// one thread pool.

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "draft_attention.h"
#include "simd16.h"

#define BLOCK 64
// How far ahead of its loads a thread's stream of W is prefetched: into L1 by PREFETCH_BYTES
// (on a Sapphire Rapids VM, 2-3 KB took the 17920 x 1536 substitute at 2 rows from 18 to 22.7
// GB/s out of DRAM; 0.5 KB: 20.5, 4 KB: 16.5), and into L2 by the L2_PREFETCH distances, far
// enough to cover DRAM latency (on a Zen 4 VM, the four linears of 26 substitute layers went
// at 1 / 2 / 4 rows from 19.5 / 21.5 / 14.2 to 23.5 / 26.5 / 22.7 GB/s, against a sum over 1
// GB at 25-32; 16 KB alone: 20.2 / 25.3 / 20.1). The hardware prefetcher alone stops at every
// 4 KB page.
#define PREFETCH_BYTES 2048
#define L2_PREFETCH_NEAR 8192
#define L2_PREFETCH_FAR 16384
enum { TILE = 16, CHUNKS = BLOCK / 8, MAX_M = 4 };  // rows of W per tile; rows of x per pass

typedef struct {
    const uint8_t *w;      // [N / 16, K / G, 8 G + 64]: values and scales, see above
    const uint16_t *bias;  // [N] bf16, or NULL
    const int8_t *qx;      // [M, K]
    const float *sx;       // [M, K / 64] activation scales
    const float *sumx;     // [M, K / 64] exact block sums of x
    void *y;               // [M, N] float32 or bf16
    int y_bf16;
    int64_t m, n, k, group;
} Job;

static void store_row(const Job *j, int64_t row, int64_t n0, f16 v) {
    if (j->bias) v = f_add(v, f_bf16(j->bias + n0));
    if (!j->y_bf16) {
        f_store((float *)j->y + row * j->n + n0, v);
        return;
    }
    float values[TILE];
    uint16_t out[TILE];
    f_store(values, v);
    for (int r = 0; r < TILE; r++) out[r] = float_to_bf16(values[r]);
    memcpy((uint16_t *)j->y + row * j->n + n0, out, sizeof out);
}

// Tile t of W (rows 16 t .. 16 t + 15) against rows m0 .. m0 + mm of x; `mm` is a compile-time
// constant after inlining, so that the accumulators stay in registers.
static inline __attribute__((always_inline)) void tile_rows(const Job *j, int64_t t, int64_t m0,
                                                            const int mm) {
    const int64_t blocks = j->k / BLOCK, per_group = j->group / BLOCK, n0 = t * TILE;
    const int64_t record = 8 * j->group + 64;  // bytes per group of a tile
    const uint8_t *tile = j->w + t * (j->k / j->group) * record;
    const i16 nibble = i_set(0x0F0F0F0F);
    f16 acc[MAX_M], offset[MAX_M];
    for (int i = 0; i < mm; i++) acc[i] = offset[i] = f_zero();
    for (int64_t b = 0; b < blocks; b++) {
        const uint8_t *group = tile + (b / per_group) * record;
        // 16 (s, z) bf16 pairs: s in the low half of each 32-bit lane, z in the high half
        const i16 pairs = i_load(group + 8 * j->group);
        const f16 s = i_as_f(i_shl(pairs, 16));
        const f16 z = i_as_f(i_and(pairs, i_set(-65536)));
        const f16 shift = f_fnma(f_set(8.0f), s, z);

        const uint8_t *wb = group + (b % per_group) * (BLOCK / 2) * TILE;
        i16 low[MAX_M], high[MAX_M];  // two dot-product chains per row of x
        for (int i = 0; i < mm; i++) low[i] = high[i] = i_zero();
        for (int c = 0; c < CHUNKS; c++) {
            __builtin_prefetch(wb + c * 64 + PREFETCH_BYTES);
            __builtin_prefetch(wb + c * 64 + L2_PREFETCH_NEAR, 0, 2);
            __builtin_prefetch(wb + c * 64 + L2_PREFETCH_FAR, 0, 2);
            const i16 packed = i_load(wb + c * 64);
            const i16 lo = i_and(packed, nibble);               // k 8c .. 8c + 3
            const i16 hi = i_and(i_shr16(packed, 4), nibble);  // k 8c + 4 .. 8c + 7
            for (int i = 0; i < mm; i++) {
                const int8_t *x = j->qx + (m0 + i) * j->k + b * BLOCK + c * 8;
                low[i] = i_dpbusd_x4(low[i], lo, x);
                high[i] = i_dpbusd_x4(high[i], hi, x + 4);
            }
        }
        for (int i = 0; i < mm; i++) {
            const int64_t r = (m0 + i) * blocks + b;
            const f16 dot = i_to_f(i_add(low[i], high[i]));
            acc[i] = f_fma(dot, f_mul(s, f_set(j->sx[r])), acc[i]);
            offset[i] = f_fma(shift, f_set(j->sumx[r]), offset[i]);
        }
    }
    for (int i = 0; i < mm; i++) store_row(j, m0 + i, n0, f_add(acc[i], offset[i]));
}

static void tile_kernel(const Job *j, int64_t t) {
    for (int64_t m0 = 0; m0 < j->m; m0 += MAX_M) {
        switch (j->m - m0) {
            case 1: tile_rows(j, t, m0, 1); break;
            case 2: tile_rows(j, t, m0, 2); break;
            case 3: tile_rows(j, t, m0, 3); break;
            default: tile_rows(j, t, m0, 4); break;
        }
    }
}

// 16 values of x as float32, from float32 or bf16.
static inline f16 load16(const void *x, int x_bf16, int64_t at) {
    return x_bf16 ? f_bf16((const uint16_t *)x + at) : f_load((const float *)x + at);
}

// Per 64 values of x: scale amax / 127, int8 values (rounded to nearest even), fp32 sum.
static void quantize_activations(const void *x, int x_bf16, int64_t count, int8_t *qx, float *sx,
                                 float *sumx) {
    for (int64_t b = 0; b < count / BLOCK; b++) {
        f16 v[BLOCK / 16], amax = f_zero(), sum = f_zero();
        for (int i = 0; i < BLOCK / 16; i++) {
            v[i] = load16(x, x_bf16, b * BLOCK + i * 16);
            amax = f_max(amax, f_abs(v[i]));
            sum = f_add(sum, v[i]);
        }
        const float top = f_top(amax);
        const f16 inv = f_set(top > 0.0f ? 127.0f / top : 0.0f);
        for (int i = 0; i < BLOCK / 16; i++) f_store_i8(qx + b * BLOCK + i * 16, f_mul(v[i], inv));
        sx[b] = top / 127.0f;
        sumx[b] = f_sum(sum);
    }
}

// Whether this build's instructions run here.
int subspec_int4_vnni_supported(void) {
    __builtin_cpu_init();
#if defined(__AVX512F__)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
#else
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
}

// Returns 0 on success, -1 on bad shapes, -2 when out of memory.
int subspec_int4_vnni_matmul(const void *x, int x_bf16, const uint8_t *w, const uint16_t *bias,
                             void *y, int y_bf16, int64_t m, int64_t n, int64_t k, int64_t group,
                             int threads) {
    if (m < 1 || n < 1 || n % TILE || k % BLOCK || group % BLOCK || k % group) return -1;
    int8_t *qx = aligned_alloc(64, (size_t)((m * k + 63) / 64 * 64));
    float *sx = malloc(sizeof(float) * (size_t)(m * k / BLOCK) * 2);
    if (!qx || !sx) {
        free(qx);
        free(sx);
        return -2;
    }
    float *sumx = sx + m * k / BLOCK;
    quantize_activations(x, x_bf16, m * k, qx, sx, sumx);

    const Job job = {w, bias, qx, sx, sumx, y, y_bf16, m, n, k, group};
    const int64_t tiles = n / TILE;
    if (n * k < (1 << 20)) threads = 1;  // too small to share
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tiles; t++) tile_kernel(&job, t);
    free(qx);
    free(sx);
    return 0;
}

// ---------------------------------------------------------------------------------------------
// One decoder layer of the draft in a single call: a substitute layer (four int4 linears) with
// its norms, RoPE, cache writes and attention, for the few rows of a draft step. Called per
// layer from torch, it replaces ~45 small torch ops (each a few microseconds) by one call.
// Everything runs in fp32 between the bf16 input and output; the keys and values written to
// the shared cache are rounded to bf16 as the torch path writes them. A draft's numerics need
// not match the target's.

typedef struct {
    const uint8_t *w;      // values and scales, packed as above
    const uint16_t *bias;  // [n] bf16 or NULL
    int64_t n, k;
} Int4Linear;

typedef struct {
    Int4Linear qkv, o, gate_up, down;
    const uint16_t *attn_norm, *mlp_norm;  // [H] bf16
    const uint16_t *q_norm, *k_norm;       // [D] bf16, or NULL (Qwen3 has them)
    int64_t hidden, heads, kv_heads, head_dim, group;
    float eps;
} DraftLayer;

static int linear_f32(const Int4Linear *l, int64_t group, const float *x, float *y, int64_t m,
                      int threads) {
    return subspec_int4_vnni_matmul(x, 0, l->w, l->bias, y, 0, m, l->n, l->k, group, threads);
}

// y[n] = x[n] / rms(x) * weight (fp32 out), over `n` values
static void rms_norm_row(const float *x, const uint16_t *weight, int64_t n, float eps, float *y) {
    float ss = 0.0f;
    for (int64_t i = 0; i < n; i++) ss += x[i] * x[i];
    const float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (int64_t i = 0; i < n; i++) y[i] = x[i] * r * bf16_to_float(weight[i]);
}

// Rotate-half RoPE on one head vector v[D] with this token's cos, sin rows (bf16, [D]).
static void rope_row(float *v, const uint16_t *cos, const uint16_t *sin, int64_t d) {
    const int64_t half = d / 2;
    for (int64_t i = 0; i < half; i++) {
        const float a = v[i], b = v[i + half];
        v[i] = a * bf16_to_float(cos[i]) - b * bf16_to_float(sin[i]);
        v[i + half] = b * bf16_to_float(cos[i + half]) + a * bf16_to_float(sin[i + half]);
    }
}

// act[F] = silu(gate[F]) * up[F]
static void silu_mul(const float *gate, const float *up, float *act, int64_t f) {
    for (int64_t i = 0; i < f; i += 16) {
        const int64_t live = upto16(f - i);
        const f16 g = f_load_n(gate + i, live);
        const f16 e = exp16(f_sub(f_zero(), g));  // e^-g
        const f16 s = f_div(g, f_add(f_set(1.0f), e));
        f_store_n(act + i, f_mul(s, f_load_n(up + i, live)), live);
    }
}

// x[T, H] bf16 is replaced by the layer's output. k_cache, v_cache: this layer's [Hkv, S, D]
// bf16 cache; the T new keys and values go to `slots`; mask [T, kv_len] (1 = attend) or NULL.
// Returns 0, -1 on bad shapes or a slot outside [0, capacity), -2 when out of memory.
int subspec_draft_layer(const DraftLayer *L, uint16_t *x, int64_t t, const uint16_t *cos,
                        const uint16_t *sin, uint16_t *k_cache, uint16_t *v_cache,
                        int64_t capacity, const int64_t *slots, const uint8_t *mask,
                        int64_t kv_len, int threads) {
    const int64_t h = L->hidden, hq = L->heads, hkv = L->kv_heads, d = L->head_dim;
    const int64_t width = (hq + 2 * hkv) * d, ffn = L->gate_up.n / 2;
    if (t < 1 || kv_len > capacity || L->qkv.n != width || L->o.k != hq * d || L->down.k != ffn ||
        hkv < 1 || hq % hkv)
        return -1;
    for (int64_t r = 0; r < t; r++)
        if (slots[r] < 0 || slots[r] >= capacity) return -1;
    const int64_t floats = t * (3 * h + width + hq * d + 3 * ffn) + t * hq * kv_len;
    float *scratch = malloc(sizeof(float) * (size_t)floats);
    if (!scratch) return -2;
    float *res = scratch, *normed = res + t * h, *proj = normed + t * h;  // [T, H] each
    float *qkv = proj + t * h, *att = qkv + t * width, *gu = att + t * hq * d;
    float *act = gu + 2 * t * ffn, *scores = act + t * ffn;  // scores: [T, Hq, kv_len]
    for (int64_t i = 0; i < t * h; i++) res[i] = bf16_to_float(x[i]);

    int rc = 0;
    for (int64_t r = 0; r < t; r++) rms_norm_row(res + r * h, L->attn_norm, h, L->eps, normed + r * h);
    rc |= linear_f32(&L->qkv, L->group, normed, qkv, t, threads);
    for (int64_t r = 0; r < t && rc == 0; r++) {
        float *row = qkv + r * width;  // q heads, k heads, v heads
        for (int64_t j = 0; j < hq + hkv; j++) {
            float *head = row + j * d;
            const uint16_t *norm = j < hq ? L->q_norm : L->k_norm;
            if (norm) rms_norm_row(head, norm, d, L->eps, head);
            rope_row(head, cos + r * d, sin + r * d, d);
        }
        for (int64_t j = 0; j < hkv; j++) {  // write this token's keys and values
            const int64_t at = (j * capacity + slots[r]) * d;
            for (int64_t i = 0; i < d; i++) {
                k_cache[at + i] = float_to_bf16(row[(hq + j) * d + i]);
                v_cache[at + i] = float_to_bf16(row[(hq + hkv + j) * d + i]);
            }
        }
    }
    if (rc == 0) {
        // a task per (row, kv head), or per block of its query heads when that is too few
        const int64_t g = hq / hkv;
        const int64_t blocks = t * hkv < threads ? (g + QUERY_BLOCK - 1) / QUERY_BLOCK : 1;
        const int64_t per = (g + blocks - 1) / blocks;  // query heads per task
#pragma omp parallel for num_threads(threads) schedule(static) if (t * hq * kv_len > 4096)
        for (int64_t p = 0; p < t * hkv * blocks; p++) {
            const int64_t r = p / (hkv * blocks), kvh = p / blocks % hkv, first = p % blocks * per;
            const int64_t head = kvh * g + first, n = first + per < g ? per : g - first;
            if (n < 1) continue;
            subspec_attend_group(qkv + r * width + head * d, n, k_cache + kvh * capacity * d,
                                 v_cache + kvh * capacity * d, mask ? mask + r * kv_len : NULL,
                                 kv_len, d, scores + (r * hq + head) * kv_len,
                                 att + (r * hq + head) * d, d);
        }
        rc |= linear_f32(&L->o, L->group, att, proj, t, threads);
    }
    if (rc == 0) {
        for (int64_t i = 0; i < t * h; i++) res[i] += proj[i];
        for (int64_t r = 0; r < t; r++) rms_norm_row(res + r * h, L->mlp_norm, h, L->eps, normed + r * h);
        rc |= linear_f32(&L->gate_up, L->group, normed, gu, t, threads);
    }
    if (rc == 0) {
        for (int64_t r = 0; r < t; r++)
            silu_mul(gu + r * 2 * ffn, gu + r * 2 * ffn + ffn, act + r * ffn, ffn);
        rc |= linear_f32(&L->down, L->group, act, proj, t, threads);
    }
    if (rc == 0)
        for (int64_t i = 0; i < t * h; i++) x[i] = float_to_bf16(res[i] + proj[i]);
    free(scratch);
    return rc ? -1 : 0;
}

// ---------------------------------------------------------------------------------------------
// The tree builder's normaliser: out[r] = log sum_i e^(scale x[r, i]) over the n values of each
// row of x (float32 or bf16), scale > 0: the draft's logits over the vocabulary (torch's exp
// ran ~6 ms per 2 x 152k values on a Zen 3).

static inline float value_at(const void *x, int x_bf16, int64_t i) {
    return x_bf16 ? bf16_to_float(((const uint16_t *)x)[i]) : ((const float *)x)[i];
}

static float row_logsumexp(const void *x, int x_bf16, int64_t n, float scale) {
    const int64_t full = n / 16 * 16;
    f16 top16 = f_set(-INFINITY);
    for (int64_t i = 0; i < full; i += 16) top16 = f_max(top16, load16(x, x_bf16, i));
    float top = full ? f_top(top16) : -INFINITY;
    for (int64_t i = full; i < n; i++) top = fmaxf(top, value_at(x, x_bf16, i));
    if (top == -INFINITY || top == INFINITY) return top;
    const f16 s = f_set(scale), neg_shift = f_set(-scale * top);
    f16 sum16 = f_zero();
    for (int64_t i = 0; i < full; i += 16)
        sum16 = f_add(sum16, exp16(f_fma(load16(x, x_bf16, i), s, neg_shift)));
    float sum = f_sum(sum16);
    for (int64_t i = full; i < n; i++) sum += expf(scale * (value_at(x, x_bf16, i) - top));
    return scale * top + logf(sum);
}

int subspec_scaled_logsumexp(const void *x, int x_bf16, int64_t rows, int64_t n, float scale,
                             float *out, int threads) {
    if (rows < 1 || n < 1 || !(scale > 0.0f)) return -1;
    const int64_t bytes = x_bf16 ? 2 : 4;
#pragma omp parallel for num_threads(threads) schedule(static) if (rows > 1)
    for (int64_t r = 0; r < rows; r++)
        out[r] = row_logsumexp((const char *)x + r * n * bytes, x_bf16, n, scale);
    return 0;
}
