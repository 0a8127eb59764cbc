// The sums of 16 AVX-512 vectors' lanes at once, shared by the exact kernel (bf16_exact.c,
// compiled for baseline x86-64 with target attributes) and the int4 kernel's AVX-512 build
// (simd16.h's f_sums16).

#ifndef SUBSPEC_SUM16_H
#define SUBSPEC_SUM16_H

#include <immintrin.h>

// The sum of 16 floats in a fixed pairwise order: l and l + 8, then l + 4, l + 2, l + 1.
static inline float tree_sum(const float *acc) {
    float s[8];
    for (int l = 0; l < 8; l++) s[l] = acc[l] + acc[l + 8];
    for (int l = 0; l < 4; l++) s[l] = s[l] + s[l + 4];
    for (int l = 0; l < 2; l++) s[l] = s[l] + s[l + 2];
    return s[0] + s[1];
}

// r[i] = _mm512_reduce_add_ps(v[i]) for 16 vectors at once, in the same order, bit for bit:
// lanes l and l + 8, then l and l + 4, l and l + 2, l and l + 1 (additions commute exactly;
// every output goes through the same operand order, so even which of two NaNs survives does
// not depend on its position), with the 16 vectors transposed as they are halved (45 shuffles
// and adds, not 16 x 8). Lane 4 q + m of the result is the sum of v[4 m + q].
static inline __attribute__((target("avx512f"), always_inline)) __m512 reduce16_transposed(
    const __m512 v[16]) {
    __m512 u[8], w[4], x[2];
    for (int j = 0; j < 8; j++)  // lanes 0-7: v[2j]'s l + (l + 8); lanes 8-15: v[2j + 1]'s
        u[j] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * j], v[2 * j + 1], 0x44),
                             _mm512_shuffle_f32x4(v[2 * j], v[2 * j + 1], 0xEE));
    for (int j = 0; j < 4; j++)  // quarter q: v[4j + q]'s l + (l + 4)
        w[j] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * j], u[2 * j + 1], 0x88),
                             _mm512_shuffle_f32x4(u[2 * j], u[2 * j + 1], 0xDD));
    for (int j = 0; j < 2; j++)  // per quarter: w[2j]'s l + (l + 2), then w[2j + 1]'s
        x[j] = _mm512_add_ps(_mm512_shuffle_ps(w[2 * j], w[2 * j + 1], 0x44),
                             _mm512_shuffle_ps(w[2 * j], w[2 * j + 1], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_ps(x[0], x[1], 0x88), _mm512_shuffle_ps(x[0], x[1], 0xDD));
}

#endif
