// Row-invariant linear (and attention, in exact_attention.c): every output row is a function
// of its own input row (and, for attention, of the keys that row attends to) alone, bit for
// bit, whatever the number of rows in the call, the row's position among them, or the number
// of threads.
//
// Linear, y[T, N] = x[T, K] @ W[N, K]^T + b: output (t, n) is always computed the same way,
//   acc[16] = 0;  for each chunk c of K, in order: acc[l] += products of x[t] and W[n] in lane l
//   y = tree_sum(acc) + b[n], rounded once to bf16 (or kept in fp32)
// inside a single call of a register-tile kernel. Tiles of MR rows of x by NR rows of W only
// share loads: each (t, n) keeps its own accumulator; edge tiles repeat a row, and the dpbf16
// path's last 1-2 rows of x run as single rows through the same chunks, products and
// reduction (dp_row_tile), so how T and N fall into tiles, cache blocks and threads (split
// over N only, never over K) cannot change any result.
// Four arithmetic paths, each invariant on its own (they differ from each other); which one
// runs is chosen by the CPU alone (exact.py), never by the shape of a call:
// - amx (x and W bf16, CPU with AMX-BF16): chunks of 32 values, one tdpbf16ps each into the
//   output's own fp32 element of a tile (the amx section below);
// - dpbf16 (x and W bf16, CPU with AVX512_BF16): chunks of 32 values, one vdpbf16ps each (lane
//   l sums the products of values 2l and 2l + 1), reduced in _mm512_reduce_add_ps's order
//   (reduce16_transposed, 16 outputs at once);
// - fma (CPU with AVX2 and FMA): x fp32, W bf16 or fp32, chunks of 8 values, lane l = fma(x, w,
//   lane l) rounded once per step, a fixed pairwise tree at the end;
// - portable (any x86-64): x fp32, W bf16 or fp32, chunks of 16 values, lane l += x * w rounded
//   as written (built with -ffp-contract=off), a fixed pairwise tree at the end.
//
// Attention, the library's other half, is in exact_attention.c.
//
// OpenMP: built with -fopenmp and loaded after torch, the library shares torch's libgomp pool.

#include <cpuid.h>
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "exact_linear.h"
#include "sum16.h"

#define LANES 16
#define DP_TARGET __attribute__((target("avx512f,avx512bw,avx512bf16"), always_inline)) inline
enum { MR = 4, NR = 4 };  // register tile: rows of x by rows of W
// One row of x against the NR rows of W held in w0..w3: four accumulators, 32 values.
#define DP_ROW(row, a0, a1, a2, a3)                                            \
    do {                                                                       \
        const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(m, (row) + c); \
        a0 = _mm512_dpbf16_ps(a0, xv, w0);                                     \
        a1 = _mm512_dpbf16_ps(a1, xv, w1);                                     \
        a2 = _mm512_dpbf16_ps(a2, xv, w2);                                     \
        a3 = _mm512_dpbf16_ps(a3, xv, w3);                                     \
    } while (0)

// While a tile reads a line of each of its rows of W (dp_tile, fma_tile_w), the same columns
// of the next tile's rows are prefetched into L2: a tile's rows are short (3 KB at K = 1536),
// too short for the hardware prefetcher to ramp up on each. On a Zen 4 VM this took 2-row
// calls from 18-24 to 29-34 GB/s (dpbf16 path) and from 15-19 to 28-30 (fma path), 33-row
// dpbf16 calls from 7 to 8. A hint only: the arithmetic is unchanged. (A macro: as a static
// inline function, gcc 12 dropped the prefetch.)
#define PREFETCH_L2(p) _mm_prefetch((const char *)(p), _MM_HINT_T1)

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
    for (int64_t i = 0; i < full; i += 32) {
        for (int b = 0; b < NR; b++) PREFETCH_L2(w[b] + i + NR * k);  // the next tile's rows
        DP_CHUNK(i, ~(__mmask32)0);
    }
    // the last chunk reads only the values that exist; the rest are zeros on both sides
    if (full < k) DP_CHUNK(full, ((__mmask32)1 << (k - full)) - 1);
    const __m512 by_column[16] = {c00, c10, c20, c30, c01, c11, c21, c31,
                                  c02, c12, c22, c32, c03, c13, c23, c33};
    _mm512_storeu_ps(&out[0][0], reduce16_transposed(by_column));  // lane 4 a + b: out[a][b]
}

// The same products for one row of x (the rows a tree leaves after its full tiles): each
// output's chunks, products and reduction are those of dp_tile, so its bits are too, NaNs'
// included.
static DP_TARGET void dp_row_tile(const uint16_t *x, const uint16_t *w[NR], int64_t k,
                                  float out[NR]) {
    __m512 a0, a1, a2, a3;
    a0 = a1 = a2 = a3 = _mm512_setzero_ps();
    const int64_t full = k / 32 * 32;
    for (int64_t c = 0; c < k; c += 32) {
        const __mmask32 m = c < full ? ~(__mmask32)0 : ((__mmask32)1 << (k - full)) - 1;
        if (c < full)
            for (int b = 0; b < NR; b++) PREFETCH_L2(w[b] + c + NR * k);
        const __m512bh w0 = (__m512bh)_mm512_maskz_loadu_epi16(m, w[0] + c);
        const __m512bh w1 = (__m512bh)_mm512_maskz_loadu_epi16(m, w[1] + c);
        const __m512bh w2 = (__m512bh)_mm512_maskz_loadu_epi16(m, w[2] + c);
        const __m512bh w3 = (__m512bh)_mm512_maskz_loadu_epi16(m, w[3] + c);
        DP_ROW(x, a0, a1, a2, a3);
    }
    // the tile's reduction itself, so that even the operand order of each add is the same
    // (it picks which of two NaNs survives): lanes 0-3 hold a0's .. a3's sums
    const __m512 by_column[16] = {a0, a0, a0, a0, a1, a1, a1, a1, a2, a2, a2, a2, a3, a3, a3, a3};
    float sums[16];
    _mm512_storeu_ps(sums, reduce16_transposed(by_column));
    for (int b = 0; b < NR; b++) out[b] = sums[b];
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

static DP_TARGET void dp_row_tile_any(const Linear *j, const void *x, const void *w[NR],
                                      float out[NR]) {
    dp_row_tile(x, (const uint16_t **)w, j->k, out);
}

typedef void TileFn(const Linear *j, const void *x[MR], const void *w[NR], float out[MR][NR]);
typedef void RowTileFn(const Linear *j, const void *x, const void *w[NR], float out[NR]);

// Rows n0 .. n1 of W against every row of x, x passing over them MR rows at a time. Edge tiles
// repeat their last row of x or W: computed like any other, not stored. When `row_tile` is not
// NULL, the last rows of x, when at most MR / 2, pass one by one instead (the same bits: see
// dp_row_tile), so a 29-node tree costs 7 tiles and a row, not 8 tiles.
// `nr` <= NR: the tile's rows of W (the fma path's tiles are MR x 3).
static inline __attribute__((always_inline)) void block(const Linear *j, int64_t n0, int64_t n1,
                                                        int64_t x_bytes, TileFn tile,
                                                        RowTileFn row_tile, const int64_t nr) {
    const int64_t w_bytes = j->k * (j->w_bf16 ? 2 : 4);
    for (int64_t t0 = 0; t0 < j->t; t0 += MR) {
        const int64_t rows = j->t - t0 < MR ? j->t - t0 : MR;
        const void *x[MR];
        for (int64_t a = 0; a < MR; a++)
            x[a] = (const char *)j->x + (t0 + a < j->t ? t0 + a : j->t - 1) * j->k * x_bytes;
        for (int64_t n = n0; n < n1; n += nr) {
            const void *w[NR];
            float out[MR][NR];
            for (int64_t b = 0; b < nr; b++)
                w[b] = (const char *)j->w + (n + b < n1 ? n + b : n1 - 1) * w_bytes;
            if (row_tile && rows <= MR / 2)
                for (int64_t a = 0; a < rows; a++) row_tile(j, x[a], w, out[a]);
            else
                tile(j, x, w, out);
            for (int64_t a = 0; a < rows; a++)
                for (int64_t b = 0; b < nr && n + b < n1; b++) store(j, t0 + a, n + b, out[a][b]);
        }
    }
}

__attribute__((target("avx512f,avx512bw,avx512bf16"))) static void dp_block(const Linear *j,
                                                                           int64_t n0, int64_t n1) {
    block(j, n0, n1, 2, dp_tile_any, dp_row_tile_any, NR);
}

// The clones differ in instructions, not arithmetic: no FMA contraction, no reassociation.
__attribute__((target_clones("avx512f", "avx2", "default"))) static void fp_block(const Linear *j,
                                                                                 int64_t n0,
                                                                                 int64_t n1) {
    block(j, n0, n1, 4, fp_tile, NULL, NR);
}

// ---- fma path (AVX2 + FMA) ----

#define FMA_TARGET __attribute__((target("avx2,fma")))
enum { FNR = 3 };  // 4 x 3 accumulators, 3 rows of W and one row of x: the 16 ymm registers

// 8 values of W from value c on, as fp32 (bf16 widening is exact).
static FMA_TARGET inline __m256 w8(const void *w, int64_t c, const int bf16) {
    if (!bf16) return _mm256_loadu_ps((const float *)w + c);
    const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + c));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static FMA_TARGET inline float sum8(__m256 v) {  // fixed pairwise order over 8 lanes
    float l[8];
    _mm256_storeu_ps(l, v);
    return ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
}

// The 8 values from c on of every (row of x, row of W) pair of the tile.
#define FMA_ROW(xr, a0, a1, a2)                        \
    do {                                               \
        const __m256 xv = _mm256_loadu_ps((xr) + c);   \
        a0 = _mm256_fmadd_ps(xv, v0, a0);              \
        a1 = _mm256_fmadd_ps(xv, v1, a1);              \
        a2 = _mm256_fmadd_ps(xv, v2, a2);              \
    } while (0)
#define FMA_CHUNK(c_, x0, x1, x2, x3, w0, w1, w2, bf16)                               \
    do {                                                                                \
        const int64_t c = (c_);                                                         \
        const __m256 v0 = w8(w0, c, bf16), v1 = w8(w1, c, bf16), v2 = w8(w2, c, bf16); \
        FMA_ROW(x0, c00, c01, c02);                                                     \
        FMA_ROW(x1, c10, c11, c12);                                                     \
        FMA_ROW(x2, c20, c21, c22);                                                     \
        FMA_ROW(x3, c30, c31, c32);                                                     \
    } while (0)

static FMA_TARGET inline __attribute__((always_inline)) void fma_tile_w(
    const Linear *j, const void *xp[MR], const void *w[NR], float out[MR][NR], const int bf16) {
    const int64_t k = j->k, full = k / 8 * 8;
    const float *x[MR] = {xp[0], xp[1], xp[2], xp[3]};
    __m256 c00, c01, c02, c10, c11, c12, c20, c21, c22, c30, c31, c32;
    c00 = c01 = c02 = c10 = c11 = c12 = c20 = c21 = c22 = c30 = c31 = c32 = _mm256_setzero_ps();
    const int64_t size = bf16 ? 2 : 4, per_line = 64 / size;  // bytes per value of W
    for (int64_t i = 0; i < full; i += 8) {
        if (i % per_line == 0)  // a line of each of the next tile's rows
            for (int b = 0; b < FNR; b++)
                PREFETCH_L2((const char *)w[b] + (i + FNR * k) * size);
        FMA_CHUNK(i, x[0], x[1], x[2], x[3], w[0], w[1], w[2], bf16);
    }
    if (full < k) {  // the last values, zero-padded to a chunk on both sides
        float xt[MR][8] = {{0}}, wt[FNR][8] = {{0}};
        for (int64_t l = 0; l < k - full; l++) {
            for (int a = 0; a < MR; a++) xt[a][l] = x[a][full + l];
            for (int b = 0; b < FNR; b++)
                wt[b][l] = bf16 ? bf16_to_f32(((const uint16_t *)w[b])[full + l])
                                : ((const float *)w[b])[full + l];
        }
        FMA_CHUNK(0, xt[0], xt[1], xt[2], xt[3], wt[0], wt[1], wt[2], 0);
    }
    const __m256 acc[MR][FNR] = {
        {c00, c01, c02}, {c10, c11, c12}, {c20, c21, c22}, {c30, c31, c32}};
    for (int a = 0; a < MR; a++)
        for (int b = 0; b < FNR; b++) out[a][b] = sum8(acc[a][b]);
}

static FMA_TARGET void fma_tile(const Linear *j, const void *x[MR], const void *w[NR],
                                float out[MR][NR]) {
    if (j->w_bf16) fma_tile_w(j, x, w, out, 1);
    else fma_tile_w(j, x, w, out, 0);
}

static FMA_TARGET void fma_block(const Linear *j, int64_t n0, int64_t n1) {
    block(j, n0, n1, 4, fma_tile, NULL, FNR);
}

int subspec_exact_fma_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

int subspec_exact_dpbf16_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512bf16");
}

// ---- amx path (x and W bf16, CPU with AMX-BF16, tiles granted by the kernel) ----
//
// C tile [16 rows of W][16 rows of x] += A [16 rows of W][32 values] . B [16 pairs][16 rows of
// x][2]: one tdpbf16ps per 32 values of K, in order, into the same fp32 element. W is loaded
// straight from its [N, K] rows (the stride is the row); x is repacked once per call into B
// tiles (pairs of values of each row side by side). A step takes 32 rows of W and 32 of x: 4 C
// tiles, 2 A, 2 B, the 8 tile registers. Each element's sum depends on its row of x and of W
// alone: the last block of W starts at N - 32 (recomputing rows the previous one stored), rows
// of x past T are zeros, and K's tail is zero-padded on both sides.

#define AMX_TARGET __attribute__((target("amx-tile,amx-bf16")))
enum { ATILE = 16, AK = 32, AN = 2 * ATILE };  // tile rows, values per tdpbf16ps, W rows a step

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

// x [T, K] bf16 -> B tiles [ceil(T / 16)][ceil(K / 32)][16 pairs][16 rows][2], zero-padded.
static uint16_t *amx_pack_x(const uint16_t *x, int64_t t, int64_t k) {
    const int64_t chunks = (k + AK - 1) / AK, blocks = (t + ATILE - 1) / ATILE;
    uint16_t *xp = calloc((size_t)(blocks * chunks * ATILE * AK), sizeof(uint16_t));
    if (!xp) return NULL;
    for (int64_t r = 0; r < t; r++)
        for (int64_t i = 0; i < k; i++) {
            const int64_t tile = (r / ATILE) * chunks + i / AK, pair = (i % AK) / 2;
            xp[((tile * ATILE + pair) * ATILE + r % ATILE) * 2 + i % 2] = x[r * k + i];
        }
    return xp;
}

// 32 rows of W from row n, against x's B tiles mb and mb + 1 (when two), into C tiles 0-3.
static AMX_TARGET void amx_step(const Linear *j, const uint16_t *xp, int64_t n, int64_t mb,
                                int two) {
    const int64_t k = j->k, chunks = (k + AK - 1) / AK, full = k / AK;
    const uint16_t *w = (const uint16_t *)j->w + n * k;
    const uint16_t *b0 = xp + mb * chunks * ATILE * AK, *b1 = b0 + chunks * ATILE * AK;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t c = 0; c < chunks; c++) {
        uint16_t tail[AN][AK];
        if (c < full) {
            _tile_loadd(4, w + c * AK, k * 2);
            _tile_loadd(5, w + ATILE * k + c * AK, k * 2);
        } else {  // K's last values, zero-padded to a chunk
            memset(tail, 0, sizeof(tail));
            for (int r = 0; r < AN; r++) memcpy(tail[r], w + r * k + c * AK, (k - c * AK) * 2);
            _tile_loadd(4, tail[0], AK * 2);
            _tile_loadd(5, tail[ATILE], AK * 2);
        }
        _tile_loadd(6, b0 + c * ATILE * AK, AK * 2);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 5, 6);
        if (two) {
            _tile_loadd(7, b1 + c * ATILE * AK, AK * 2);
            _tile_dpbf16ps(2, 4, 7);
            _tile_dpbf16ps(3, 5, 7);
        }
    }
}

// A C tile's results for rows t0.. of x and n0.. of W, of which only the rows of W from `from`
// on, below N (the others another block stores, or padding), and the rows of x below T.
static void amx_store(const Linear *j, float c[ATILE][ATILE], int64_t t0, int64_t n0,
                      int64_t from) {
    const int64_t lo = from > n0 ? from - n0 : 0, hi = j->n - n0 < ATILE ? j->n - n0 : ATILE;
    for (int64_t i = 0; i < ATILE && t0 + i < j->t; i++) {
        const int64_t at = (t0 + i) * j->n + n0;
        for (int64_t r = lo; r < hi; r++) {
            float v = c[r][i];
            if (j->bias) v += j->bias[n0 + r];
            if (j->y_bf16) ((uint16_t *)j->y)[at + r] = f32_to_bf16(v);
            else ((float *)j->y)[at + r] = v;
        }
    }
}

// Rows [from, n1) of W, computed as the 32 rows from n1 - 32, against every row of x.
static AMX_TARGET void amx_block(const Linear *j, const uint16_t *xp, int64_t from, int64_t n1) {
    const int64_t n = n1 - AN, blocks = (j->t + ATILE - 1) / ATILE;
    float c[4][ATILE][ATILE];  // [tile][row of W][row of x]
    for (int64_t mb = 0; mb < blocks; mb += 2) {
        const int two = mb + 1 < blocks;
        amx_step(j, xp, n, mb, two);
        _tile_stored(0, c[0], ATILE * 4);
        _tile_stored(1, c[1], ATILE * 4);
        _tile_stored(2, c[2], ATILE * 4);
        _tile_stored(3, c[3], ATILE * 4);
        for (int tile = 0; tile < (two ? 4 : 2); tile++)
            amx_store(j, c[tile], (mb + tile / 2) * ATILE, n + (tile % 2) * ATILE, from);
    }
}

// Every tile 16 rows of 64 bytes. A global, not a local: gcc's _tile_loadconfig tells the
// compiler it reads 8 bytes, and the stores to a local's other 56 are then dropped.
static const TileConfig AMX_CONFIG = {
    .palette = 1,
    .colsb = {64, 64, 64, 64, 64, 64, 64, 64},
    .rows = {ATILE, ATILE, ATILE, ATILE, ATILE, ATILE, ATILE, ATILE},
};

static AMX_TARGET void amx_configure(void) { _tile_loadconfig(&AMX_CONFIG); }

static AMX_TARGET void amx_release(void) { _tile_release(); }

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

int subspec_exact_amx_supported(void) {
    static int supported = -1;
    if (supported < 0) {
        unsigned a, b, c, d;
        const int cpu = __get_cpuid_count(7, 0, &a, &b, &c, &d) && (d >> 24 & 1) && (d >> 22 & 1);
        supported = cpu && syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    }
    return supported;
}

// The amx path over the whole of W: blocks of 32 rows split over threads. W with fewer than 32
// rows is copied into a zero-padded one first.
static int amx_linear(const Linear *job, int threads) {
    Linear j = *job;
    uint16_t *padded = NULL, *xp = amx_pack_x(j.x, j.t, j.k);
    if (j.n < AN) {
        padded = calloc((size_t)(AN * j.k), sizeof(uint16_t));
        if (padded) memcpy(padded, j.w, (size_t)(j.n * j.k) * 2);
        j.w = padded;
    }
    if (!xp || (job->n < AN && !padded)) {
        free(xp);
        free(padded);
        return -2;
    }
    const int64_t rows = j.n < AN ? AN : j.n, blocks = (rows + AN - 1) / AN;
    if (rows * j.k * j.t < (1 << 18)) threads = 1;  // too small to share
#pragma omp parallel num_threads(threads)
    {
        amx_configure();
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            const int64_t n1 = (b + 1) * AN < rows ? (b + 1) * AN : rows;
            amx_block(&j, xp, b * AN, n1);
        }
        amx_release();
    }
    free(xp);
    free(padded);
    return 0;
}

// Rows [n0, n1) of W against every row of x on `path` (not amx): one thread's block.
static void run_block(const Linear *job, int64_t n0, int64_t n1, int path) {
    if (path == PATH_DPBF16) dp_block(job, n0, n1);
    else if (path == PATH_FMA) fma_block(job, n0, n1);
    else fp_block(job, n0, n1);
}

// y = x @ W^T + bias on `path`: amx and dpbf16 take x and W bf16, the others x fp32.
// Returns 0, -1 on bad arguments (or a path this CPU lacks), -2 when out of memory.
int subspec_exact_linear(const void *x, const void *w, const float *bias, void *y, int64_t t,
                         int64_t n, int64_t k, int w_bf16, int y_bf16, int path, int threads) {
    if (t < 1 || n < 1 || k < 1) return -1;
    if (path == PATH_DPBF16 && (!w_bf16 || !subspec_exact_dpbf16_supported())) return -1;
    if (path == PATH_FMA && !subspec_exact_fma_supported()) return -1;
    if (path == PATH_AMX && (!w_bf16 || !subspec_exact_amx_supported())) return -1;
    if (path < PATH_PORTABLE || path > PATH_AMX) return -1;
    const Linear job = {x, w, bias, y, t, n, k, w_bf16, y_bf16};
    if (path == PATH_AMX) return amx_linear(&job, threads);
    const int64_t nr = path == PATH_FMA ? FNR : NR;
    int64_t rows = BLOCK_BYTES / (k * (w_bf16 ? 2 : 4)) / nr * nr;  // rows of W per block
    if (rows < nr) rows = nr;
    const int64_t blocks = (n + rows - 1) / rows;
    if (n * k * t < (1 << 18)) threads = 1;  // too small to share
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; b++)
        run_block(&job, b * rows, (b + 1) * rows < n ? (b + 1) * rows : n, path);
    return 0;
}

void exact_rows(const void *x, const uint16_t *rows, const float *bias, void *y, int64_t t,
                int64_t n, int64_t k, int64_t n0, int64_t n1, int y_bf16, int path) {
    const void *w = (const void *)((uintptr_t)rows - (uintptr_t)(n0 * k * 2));  // row 0's place
    const Linear job = {x, w, bias, y, t, n, k, 1, y_bf16};
    run_block(&job, n0, n1, path);
}
