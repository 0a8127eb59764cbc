// Low-bit substitute matmul for x86 CPUs with AVX512-VNNI: y[M, N] = x[M, K] @ W[N, K]^T.
//
// W is 4-bit, grouped along K: W[n, k] = (q[n, k] - 8) * s[g, n] + z[g, n] with g = k / G,
// and s, z bf16 pairs in sz[K / G, N, 2] (torch's int4 convention, read in place). Each group of
// 64 values packs into 32 bytes: byte j holds q[j] (low nibble) and q[j + 32] (high nibble).
//
// x is quantized per 64 values to int8 (the draft's numerics need not match the target's: the
// verifier keeps the output exact), so one block of 64 products is one vpdpbusd:
//   sum_k W[n, k] x[k] ~= sum_b s (sa_b * dot(q_b, qx_b)) + (z - 8 s) * sum(x_b).
// Tiles of W's rows are split across OpenMP threads: built with -fopenmp and loaded after
// torch, the library binds to the libgomp torch already loaded, so both share one thread pool.

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define BLOCK 64

typedef struct {
    const uint8_t *qw;      // [N, K / 2]
    const uint16_t *sz;     // [K / G, N, 2] bf16
    const int8_t *qx;       // [M, K]
    const float *sx;        // [M, K / 64] activation scales
    const float *sumx;      // [M, K / 64] exact block sums of x
    float *y;               // [M, N]
    int64_t m, n, k, group;
} Job;

static inline __m512i unpack_block(const uint8_t *packed) {
    const __m256i nibble = _mm256_set1_epi8(0x0F);
    __m256i bytes = _mm256_loadu_si256((const __m256i *)packed);
    __m256i lo = _mm256_and_si256(bytes, nibble);                       // q[0..31]
    __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), nibble); // q[32..63]
    return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}

enum { TILE = 16, MAX_M = 4 };  // rows of W per tile (one zmm of scales); rows of x per pass
// How far ahead in W to prefetch: measured 1-32 KB on the dev VM, 8 KB best (1.4 -> 1.1 ms
// for 17920 x 1536 at 2 rows with the weights in DRAM).
#define PREFETCH_BYTES 8192

// The block scales of a tile of 16 rows of W for up to MAX_M rows of x, and the offset terms:
// scale[b][i][r] = s[g(b), n0 + r] * sx[i, b];  offset[i][r] = sum_b (z - 8 s) * sumx[i, b].
static void tile_scales(const Job *j, int64_t n0, int64_t m0, int64_t mm, float *scale,
                        __m512 *offset) {
    const int64_t blocks = j->k / BLOCK, per_group = j->group / BLOCK;
    for (int64_t i = 0; i < mm; i++) offset[i] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
        // 16 (s, z) bf16 pairs: s in the low half of each 32-bit lane, z in the high half
        const uint16_t *tile_pairs = j->sz + ((b / per_group) * j->n + n0) * 2;
        const __m512i pairs = _mm512_loadu_si512(tile_pairs);
        // the next tile's scales: one line per group, far apart, so the hardware misses them
        if (b % per_group == 0) _mm_prefetch((const char *)(tile_pairs + 2 * TILE), _MM_HINT_T0);
        const __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
        const __m512 z = _mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32(-65536)));
        const __m512 shift = _mm512_fnmadd_ps(_mm512_set1_ps(8.0f), s, z);
        for (int64_t i = 0; i < mm; i++) {
            const int64_t r = (m0 + i) * blocks + b;
            _mm512_storeu_ps(scale + (b * MAX_M + i) * TILE, _mm512_mul_ps(s, _mm512_set1_ps(j->sx[r])));
            offset[i] = _mm512_fmadd_ps(shift, _mm512_set1_ps(j->sumx[r]), offset[i]);
        }
    }
}

// One row of W against `mm` rows of x (a compile-time constant after inlining, so that the
// accumulators stay in registers); two accumulators per row of x break the FMA chain.
static inline __attribute__((always_inline)) void row_dot(
    const uint8_t *row, const int8_t *qx, const float *scale, int64_t blocks, int64_t r,
    const int mm, float *out) {
    __m512 even[MAX_M], odd[MAX_M];
    for (int i = 0; i < mm; i++) even[i] = odd[i] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; b += 2) {  // blocks is even: K % 128 == 0
        _mm_prefetch((const char *)(row + PREFETCH_BYTES + b * (BLOCK / 2)), _MM_HINT_T0);
        const __m512i w0 = unpack_block(row + b * (BLOCK / 2));
        const __m512i w1 = unpack_block(row + (b + 1) * (BLOCK / 2));
        for (int i = 0; i < mm; i++) {
            const int8_t *x = qx + (i * blocks + b) * BLOCK;
            const __m512i d0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w0, _mm512_loadu_si512(x));
            const __m512i d1 =
                _mm512_dpbusd_epi32(_mm512_setzero_si512(), w1, _mm512_loadu_si512(x + BLOCK));
            even[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0),
                                      _mm512_set1_ps(scale[(b * MAX_M + i) * TILE + r]), even[i]);
            odd[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d1),
                                     _mm512_set1_ps(scale[((b + 1) * MAX_M + i) * TILE + r]), odd[i]);
        }
    }
    for (int i = 0; i < mm; i++) out[i] = _mm512_reduce_add_ps(_mm512_add_ps(even[i], odd[i]));
}

// Rows n0 .. n0 + TILE of y; `scale` holds blocks * MAX_M * TILE floats of scratch.
static void tile_kernel(const Job *j, int64_t n0, float *scale) {
    const int64_t blocks = j->k / BLOCK;
    float offset_lanes[MAX_M][TILE], dots[MAX_M];
    for (int64_t m0 = 0; m0 < j->m; m0 += MAX_M) {
        const int64_t mm = j->m - m0 < MAX_M ? j->m - m0 : MAX_M;
        const int8_t *qx = j->qx + m0 * j->k;
        __m512 offset[MAX_M];
        tile_scales(j, n0, m0, mm, scale, offset);
        for (int64_t i = 0; i < mm; i++) _mm512_storeu_ps(offset_lanes[i], offset[i]);
        for (int64_t r = 0; r < TILE; r++) {
            const uint8_t *row = j->qw + (n0 + r) * (j->k / 2);
            switch (mm) {
                case 1: row_dot(row, qx, scale, blocks, r, 1, dots); break;
                case 2: row_dot(row, qx, scale, blocks, r, 2, dots); break;
                case 3: row_dot(row, qx, scale, blocks, r, 3, dots); break;
                default: row_dot(row, qx, scale, blocks, r, 4, dots); break;
            }
            for (int64_t i = 0; i < mm; i++)
                j->y[(m0 + i) * j->n + n0 + r] = dots[i] + offset_lanes[i][r];
        }
    }
}

// Per 64 values of x: scale amax / 127, int8 values, exact fp32 sum.
static void quantize_activations(const float *x, int64_t count, int8_t *qx, float *sx,
                                 float *sumx) {
    for (int64_t b = 0; b < count / BLOCK; b++) {
        const float *v = x + b * BLOCK;
        float amax = 0.0f, sum = 0.0f;
        for (int i = 0; i < BLOCK; i++) {
            amax = fmaxf(amax, fabsf(v[i]));
            sum += v[i];
        }
        const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        for (int i = 0; i < BLOCK; i++) qx[b * BLOCK + i] = (int8_t)lrintf(v[i] * inv);
        sx[b] = amax / 127.0f;
        sumx[b] = sum;
    }
}

int subspec_int4_vnni_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

// Returns 0 on success, -1 on bad shapes, -2 when out of memory.
int subspec_int4_vnni_matmul(const float *x, const uint8_t *qw, const uint16_t *sz, float *y,
                             int64_t m, int64_t n, int64_t k, int64_t group, int threads) {
    if (m < 1 || n < 1 || n % TILE || k % (2 * BLOCK) || group % BLOCK || k % group) return -1;
    int8_t *qx = aligned_alloc(64, (size_t)(m * k));
    float *sx = malloc(sizeof(float) * (size_t)(m * k / BLOCK) * 2);
    if (!qx || !sx) {
        free(qx);
        free(sx);
        return -2;
    }
    float *sumx = sx + m * k / BLOCK;
    quantize_activations(x, m * k, qx, sx, sumx);

    const Job job = {qw, sz, qx, sx, sumx, y, m, n, k, group};
    const int64_t tiles = n / TILE;
    if (n * k < (1 << 20)) threads = 1;  // too small to share
#pragma omp parallel num_threads(threads)
    {
        float scale[k / BLOCK * MAX_M * TILE];  // each thread's tile scales: 4 bytes per column
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tiles; t++) tile_kernel(&job, t * TILE, scale);
    }
    free(qx);
    free(sx);
    return 0;
}
