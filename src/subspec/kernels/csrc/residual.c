// A bf16 weight streamed as what its resident 4-bit substitute lacks, rebuilt bit for bit.
//
// SubSpec keeps a 4-bit substitute of every streamed layer in fast memory for the draft. The
// target's weight W (bf16) is close to the substitute's value D = bf16((q - 8) * s + z), so
// the slow tier holds the difference of their bit patterns instead of W:
//   r = W_bits - D_bits (as int16): one byte when -127 <= r <= 127, else the byte -128 (an
//   escape) and W_bits itself in a separate escape list, in order.
// For the 1.5B Qwen2.5 (4 bits, group 64) 6-7% of the weights escape: 1.14 bytes a weight
// instead of 2. The patterns of same-signed floats are ordered like their values, so r counts
// the bf16 values between W and D; it overflows a byte only for weights much nearer zero
// than the group's quantization step.
//
// The substitute's layout is csrc/int4_vnni.c's: W[N, K] in tiles of 16 rows, each tile as
// K / G group records of 8 G + 64 bytes (the values, byte (c, r, j) holding q[16 t + r, 8 c + j]
// in its low nibble and q[16 t + r, 8 c + 4 + j] in its high one, then the 16 rows' (s, z) bf16
// pairs). The residuals follow the records, front to back: per 64-byte chunk c of a record,
// 128 bytes, 8 per row in the order ROWS below (the order an AVX-512 unpack of the chunk
// yields), each row's 8 for k = 8 c .. 8 c + 7. `tile_escapes[t]` is the number of escapes
// before tile t, so that threads can rebuild tiles independently.
//
// D is computed with one fp32 product and one fp32 sum, each rounded (this file is built
// without FMA contraction), then rounded to nearest even: every path here computes the same D,
// so encoding on one machine and rebuilding on another agree.

#include <stdint.h>
#include <string.h>

#include "bf16.h"
#include "residual.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

enum { TILE = 16 };
// a chunk's rows in residual order: the unpack of its low and high nibbles, see above
static const int ROWS[TILE] = {0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15};

// tab[r][q] = D for row r of a record and value q, from the record's (s, z) pairs
static void tables_scalar(const uint16_t *pairs, uint16_t tab[TILE][16]) {
    for (int r = 0; r < TILE; r++) {
        const float s = bf16_to_float(pairs[2 * r]), z = bf16_to_float(pairs[2 * r + 1]);
        for (int q = 0; q < 16; q++) {
            const float scaled = (float)(q - 8) * s;
            tab[r][q] = float_to_bf16(scaled + z);
        }
    }
}

static inline int value_at(const uint8_t *chunk, int row, int jj) {
    const uint8_t byte = chunk[4 * row + (jj & 3)];
    return jj < 4 ? byte & 15 : byte >> 4;
}

// One tile of 16 rows in residual order, either way: `encode` 1 reads its rows of `weight`
// and writes its residuals from `resid` on and its escapes from *esc on; 0 the reverse,
// reading no escape at or past `end`. Returns 0, or 1 when the tile needs escapes past `end`.
// (The order defined here is the format: the AVX-512 decoder below follows it.)
static int tile_scalar(const uint8_t *w, int64_t t, int64_t k, int64_t group, uint16_t *weight,
                       int8_t *resid, uint16_t **esc, const uint16_t *end, int encode) {
    const int64_t groups = k / group, chunks = group / 8, record = 8 * group + 64;
    uint16_t tab[TILE][16];
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *rec = w + (t * groups + g) * record;
        tables_scalar((const uint16_t *)(rec + 8 * group), tab);
        for (int64_t c = 0; c < chunks; c++) {
            for (int slot = 0; slot < TILE; slot++) {
                const int row = ROWS[slot];
                uint16_t *values = weight + (TILE * t + row) * k + g * group + 8 * c;
                for (int jj = 0; jj < 8; jj++, resid++) {
                    const uint16_t d = tab[row][value_at(rec + 64 * c, row, jj)];
                    if (!encode) {
                        if (*resid == -128 && *esc >= end) return 1;
                        values[jj] = *resid == -128 ? *(*esc)++
                                                    : (uint16_t)(d + (uint16_t)(int16_t)*resid);
                        continue;
                    }
                    const int16_t diff = (int16_t)(uint16_t)(values[jj] - d);
                    const int fits = diff >= -127 && diff <= 127;
                    *resid = fits ? (int8_t)diff : -128;
                    if (!fits) *(*esc)++ = values[jj];
                }
            }
        }
    }
    return 0;
}

// Writes the residual form of weight[N, K] (bf16 bits) against the substitute's records;
// returns the number of escapes, or -1 for bad shapes. `escapes` holds N K values at most.
int64_t subspec_residual_encode(const uint8_t *w, const uint16_t *weight, int8_t *resid,
                                uint16_t *escapes, int32_t *tile_escapes, int64_t n, int64_t k,
                                int64_t group) {
    if (n % TILE || group % 8 || k % group) return -1;
    uint16_t *esc = escapes;
    for (int64_t t = 0; t < n / TILE; t++) {
        tile_escapes[t] = (int32_t)(esc - escapes);
        tile_scalar(w, t, k, group, (uint16_t *)weight, resid + t * TILE * k, &esc, NULL, 1);
    }
    tile_escapes[n / TILE] = (int32_t)(esc - escapes);
    return esc - escapes;
}

#if defined(__x86_64__)
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2")))

// The 16 rows' tables as 4 pairs of registers: pair p holds rows ROWS[4p .. 4p + 3], entry
// 16 slot + q in lane (16 slot + q) mod 32 of register (16 slot + q) / 32.
AVX512 static void tables_avx512(const uint16_t *pairs, __m512i tab[8]) {
    const __m512 values = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
    uint16_t rows[TILE][16];
    for (int r = 0; r < TILE; r++) {
        const __m512 s = _mm512_set1_ps(bf16_to_float(pairs[2 * r]));
        const __m512 z = _mm512_set1_ps(bf16_to_float(pairs[2 * r + 1]));
        const __m512i bits = _mm512_castps_si512(_mm512_add_ps(_mm512_mul_ps(values, s), z));
        const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
        const __m512i rounded = _mm512_add_epi32(_mm512_add_epi32(bits, odd),
                                                 _mm512_set1_epi32(0x7FFF));
        _mm256_storeu_si256((__m256i *)rows[r],
                            _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
    }
    uint16_t lanes[8][32];
    for (int slot = 0; slot < TILE; slot++)
        memcpy(&lanes[slot / 2][(slot % 2) * 16], rows[ROWS[slot]], 32);
    for (int i = 0; i < 8; i++) tab[i] = _mm512_loadu_si512(lanes[i]);
}

// Returns 0, or 1 when the tile needs escapes at or past `end` (nothing is read there) or
// fewer than reach it.
AVX512 static int decode_tile_avx512(const uint8_t *w, const int8_t *resid, const uint16_t *esc,
                                     const uint16_t *end, uint16_t *weight, int64_t t, int64_t k,
                                     int64_t group) {
    const int64_t groups = k / group, chunks = group / 8, record = 8 * group + 64;
    const __m512i nibble = _mm512_set1_epi8(15), escape = _mm512_set1_epi16(-128);
    // lane l of a register covers slot l / 8 of its 4 rows: its table entries start at 16 slot
    uint16_t bases[32];
    for (int l = 0; l < 32; l++) bases[l] = (uint16_t)(16 * (l / 8));
    const __m512i slot_base = _mm512_loadu_si512(bases);
    __m512i tab[8];
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *rec = w + (t * groups + g) * record;
        tables_avx512((const uint16_t *)(rec + 8 * group), tab);
        for (int64_t c = 0; c < chunks; c++) {
            const __m512i v = _mm512_loadu_si512(rec + 64 * c);
            const __m512i lo = _mm512_and_si512(v, nibble);
            const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
            const __m512i halves[2] = {_mm512_unpacklo_epi32(lo, hi),
                                       _mm512_unpackhi_epi32(lo, hi)};
            for (int p = 0; p < 4; p++) {  // 4 rows (ROWS[4p ..]) x 8 values
                const __m512i half = halves[p / 2];
                const __m256i bytes = p % 2 ? _mm512_extracti64x4_epi64(half, 1)
                                            : _mm512_castsi512_si256(half);
                const __m512i idx = _mm512_add_epi16(_mm512_cvtepu8_epi16(bytes), slot_base);
                const __m512i d = _mm512_permutex2var_epi16(tab[2 * p], idx, tab[2 * p + 1]);
                const __m512i r = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)resid));
                resid += 32;
                const __mmask32 escaped = _mm512_cmpeq_epi16_mask(r, escape);
                if (esc + __builtin_popcount(escaped) > end) return 1;
                __m512i out = _mm512_add_epi16(d, r);
                out = _mm512_mask_expandloadu_epi16(out, escaped, esc);
                esc += __builtin_popcount(escaped);
                uint16_t *dst = weight + (TILE * t) * k + g * group + 8 * c;
                _mm_storeu_si128((__m128i *)(dst + ROWS[4 * p] * k), _mm512_castsi512_si128(out));
                _mm_storeu_si128((__m128i *)(dst + ROWS[4 * p + 1] * k),
                                 _mm512_extracti32x4_epi32(out, 1));
                _mm_storeu_si128((__m128i *)(dst + ROWS[4 * p + 2] * k),
                                 _mm512_extracti32x4_epi32(out, 2));
                _mm_storeu_si128((__m128i *)(dst + ROWS[4 * p + 3] * k),
                                 _mm512_extracti32x4_epi32(out, 3));
            }
        }
    }
    return esc != end;
}

static int has_avx512(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi2");
}
#else
static int has_avx512(void) { return 0; }
#endif

int subspec_residual_simd(void) { return has_avx512(); }

int residual_check(int64_t n, int64_t k, int64_t group, int64_t n_escapes,
                   const int32_t *tile_escapes) {
    if (n % TILE || group % 8 || k % group || n_escapes < 0) return 1;
    const int64_t tiles = n / TILE;
    if (tile_escapes[0] != 0 || tile_escapes[tiles] > n_escapes) return 2;
    for (int64_t t = 0; t < tiles; t++)
        if (tile_escapes[t + 1] < tile_escapes[t]) return 2;
    return 0;
}

int residual_decode_tile(const uint8_t *w, const int8_t *resid, const uint16_t *escapes,
                         const int32_t *tile_escapes, uint16_t *weight, int64_t t, int64_t k,
                         int64_t group, int simd) {
    const int8_t *r = resid + t * TILE * k;
    uint16_t *e = (uint16_t *)escapes + tile_escapes[t];
    const uint16_t *end = escapes + tile_escapes[t + 1];
#if defined(__x86_64__)
    if (simd) return decode_tile_avx512(w, r, e, end, weight, t, k, group);
#endif
    return tile_scalar(w, t, k, group, weight, (int8_t *)r, &e, end, 0) || e != end;
}

// Rebuilds weight[N, K] (bf16 bits) from the substitute's records and the residual form;
// `simd` 0 forces the scalar path (tests compare the two). Returns 0, 1 for bad shapes, 2 for
// a table or residual that disagrees (residual.h).
int subspec_residual_decode(const uint8_t *w, const int8_t *resid, const uint16_t *escapes,
                            int64_t n_escapes, const int32_t *tile_escapes, uint16_t *weight,
                            int64_t n, int64_t k, int64_t group, int simd, int threads) {
    const int checked = residual_check(n, k, group, n_escapes, tile_escapes);
    if (checked) return checked;
    const int fast = simd && has_avx512();
    int bad = 0;
#pragma omp parallel for schedule(static) num_threads(threads) reduction(| : bad)
    for (int64_t t = 0; t < n / TILE; t++)
        bad |= residual_decode_tile(w, resid, escapes, tile_escapes, weight, t, k, group, fast);
    return bad ? 2 : 0;
}
