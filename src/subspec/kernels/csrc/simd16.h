// Sixteen 32-bit lanes, as the int4 kernel (int4_vnni.c) uses them, on two instruction sets:
// one AVX-512 register where the build has AVX512F (and VNNI), else a pair of AVX2 registers,
// with vpdpbusd done as vpmaddubsw + vpmaddwd (exact here: |u4 x s8| pair sums stay far below
// the int16 limit). The kernel is compiled once per instruction set (native.py) from the same
// source, so both builds do the same arithmetic in the same order.
//
//   f16: 16 floats      i16: 16 int32 lanes, or 64 bytes      n: lanes in use, 0 <= n <= 16
//
// SIMD16_AVX512 is set in the AVX-512 build: code that needs its 32 registers tests it.

#ifndef SUBSPEC_SIMD16_H
#define SUBSPEC_SIMD16_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "sum16.h"

#define SIMD16 static inline __attribute__((always_inline))

#if defined(__AVX512F__) && defined(__AVX512VNNI__)
#define SIMD16_AVX512 1

typedef __m512 f16;
typedef __m512i i16;

SIMD16 __mmask16 lanes(int64_t n) { return (__mmask16)((1u << n) - 1); }
SIMD16 f16 f_zero(void) { return _mm512_setzero_ps(); }
SIMD16 f16 f_set(float a) { return _mm512_set1_ps(a); }
SIMD16 f16 f_add(f16 a, f16 b) { return _mm512_add_ps(a, b); }
SIMD16 f16 f_sub(f16 a, f16 b) { return _mm512_sub_ps(a, b); }
SIMD16 f16 f_mul(f16 a, f16 b) { return _mm512_mul_ps(a, b); }
SIMD16 f16 f_div(f16 a, f16 b) { return _mm512_div_ps(a, b); }
SIMD16 f16 f_max(f16 a, f16 b) { return _mm512_max_ps(a, b); }
SIMD16 f16 f_min(f16 a, f16 b) { return _mm512_min_ps(a, b); }
SIMD16 f16 f_abs(f16 a) { return _mm512_abs_ps(a); }
SIMD16 f16 f_fma(f16 a, f16 b, f16 c) { return _mm512_fmadd_ps(a, b, c); }    // a b + c
SIMD16 f16 f_fnma(f16 a, f16 b, f16 c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a b
SIMD16 f16 f_round(f16 a) {  // to nearest even
    return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
SIMD16 f16 f_scale2(f16 a, f16 n) { return _mm512_scalef_ps(a, n); }  // a 2^n, n integral
SIMD16 f16 f_keep_ge(f16 v, f16 x, float bound) {  // v where x >= bound, else 0
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(bound), _CMP_GE_OQ), v);
}
SIMD16 f16 f_first(f16 v, int64_t n) { return _mm512_maskz_mov_ps(lanes(n), v); }  // else 0
SIMD16 float f_sum(f16 a) { return _mm512_reduce_add_ps(a); }
// Lane j: the sum of v[j]'s lanes, for 16 vectors at once (reduce16_transposed, its inputs
// taken in the order that leaves v[j]'s sum in lane j)
SIMD16 f16 f_sums16(const f16 v[16]) {
    f16 by_column[16];
    for (int i = 0; i < 16; i++) by_column[i] = v[i % 4 * 4 + i / 4];
    return reduce16_transposed(by_column);
}
SIMD16 float f_top(f16 a) { return _mm512_reduce_max_ps(a); }
SIMD16 f16 f_load(const float *p) { return _mm512_loadu_ps(p); }
SIMD16 f16 f_load_n(const float *p, int64_t n) { return _mm512_maskz_loadu_ps(lanes(n), p); }
SIMD16 void f_store(float *p, f16 a) { _mm512_storeu_ps(p, a); }
SIMD16 void f_store_n(float *p, f16 a, int64_t n) { _mm512_mask_storeu_ps(p, lanes(n), a); }
SIMD16 f16 f_bf16(const uint16_t *p) {  // 16 bf16 values, widened
    const __m256i v = _mm256_loadu_si256((const __m256i *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
SIMD16 f16 f_bf16_n(const uint16_t *p, int64_t n) {
    const __m256i v = _mm256_maskz_loadu_epi16(lanes(n), p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
SIMD16 void f_store_i8(int8_t *p, f16 a) {  // rounded to nearest even, saturated
    _mm_storeu_si128((__m128i *)p, _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(a)));
}

SIMD16 i16 i_zero(void) { return _mm512_setzero_si512(); }
SIMD16 i16 i_load(const void *p) { return _mm512_loadu_si512(p); }
SIMD16 i16 i_set(int32_t a) { return _mm512_set1_epi32(a); }
SIMD16 i16 i_add(i16 a, i16 b) { return _mm512_add_epi32(a, b); }
SIMD16 i16 i_and(i16 a, i16 b) { return _mm512_and_si512(a, b); }
SIMD16 i16 i_shl(i16 a, int s) { return _mm512_slli_epi32(a, s); }    // 32-bit lanes
SIMD16 i16 i_shr16(i16 a, int s) { return _mm512_srli_epi16(a, s); }  // 16-bit lanes
SIMD16 i16 i_dpbusd(i16 acc, i16 u8, i16 s8) { return _mm512_dpbusd_epi32(acc, u8, s8); }
// i_dpbusd(acc, u8, i_set(4 bytes at x)) with the broadcast folded into the instruction (gcc
// 12 emits a separate vpbroadcastd): on the Zen 4 VM, 2 / 4 rows in L2 went 39 / 27 -> 43 / 27
// GB/s; from DRAM, no change
typedef int32_t __attribute__((may_alias)) any_i32;  // 4 bytes of int8 values, read as one
SIMD16 i16 i_dpbusd_x4(i16 acc, i16 u8, const int8_t *x) {
    __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(u8), "m"(*(const any_i32 *)x));
    return acc;
}
SIMD16 f16 i_to_f(i16 a) { return _mm512_cvtepi32_ps(a); }
SIMD16 f16 i_as_f(i16 a) { return _mm512_castsi512_ps(a); }

#else  // AVX2 + FMA: lanes 0-7 in .lo, 8-15 in .hi

typedef struct { __m256 lo, hi; } f16;
typedef struct { __m256i lo, hi; } i16;

#define F2(expr_lo, expr_hi) ((f16){expr_lo, expr_hi})
#define I2(expr_lo, expr_hi) ((i16){expr_lo, expr_hi})

SIMD16 __m256i mask8(int64_t n) {  // lanes below n (clamped to 0 .. 8) set
    const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const int32_t c = (int32_t)(n < 0 ? 0 : n > 8 ? 8 : n);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(c), idx);
}
SIMD16 f16 f_zero(void) { return F2(_mm256_setzero_ps(), _mm256_setzero_ps()); }
SIMD16 f16 f_set(float a) { return F2(_mm256_set1_ps(a), _mm256_set1_ps(a)); }
SIMD16 f16 f_add(f16 a, f16 b) { return F2(_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)); }
SIMD16 f16 f_sub(f16 a, f16 b) { return F2(_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)); }
SIMD16 f16 f_mul(f16 a, f16 b) { return F2(_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)); }
SIMD16 f16 f_div(f16 a, f16 b) { return F2(_mm256_div_ps(a.lo, b.lo), _mm256_div_ps(a.hi, b.hi)); }
SIMD16 f16 f_max(f16 a, f16 b) { return F2(_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)); }
SIMD16 f16 f_min(f16 a, f16 b) { return F2(_mm256_min_ps(a.lo, b.lo), _mm256_min_ps(a.hi, b.hi)); }
SIMD16 f16 f_abs(f16 a) {
    const __m256 m = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    return F2(_mm256_and_ps(a.lo, m), _mm256_and_ps(a.hi, m));
}
SIMD16 f16 f_fma(f16 a, f16 b, f16 c) {
    return F2(_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi));
}
SIMD16 f16 f_fnma(f16 a, f16 b, f16 c) {
    return F2(_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi));
}
SIMD16 f16 f_round(f16 a) {
    const int r = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    return F2(_mm256_round_ps(a.lo, r), _mm256_round_ps(a.hi, r));
}
SIMD16 __m256 scale2_8(__m256 a, __m256 n) {  // a 2^n for integral n in -126 .. 127
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n),
                                                         _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(a, _mm256_castsi256_ps(e));
}
SIMD16 f16 f_scale2(f16 a, f16 n) { return F2(scale2_8(a.lo, n.lo), scale2_8(a.hi, n.hi)); }
SIMD16 f16 f_keep_ge(f16 v, f16 x, float bound) {
    const __m256 b = _mm256_set1_ps(bound);
    return F2(_mm256_and_ps(v.lo, _mm256_cmp_ps(x.lo, b, _CMP_GE_OQ)),
              _mm256_and_ps(v.hi, _mm256_cmp_ps(x.hi, b, _CMP_GE_OQ)));
}
SIMD16 f16 f_first(f16 v, int64_t n) {
    return F2(_mm256_and_ps(v.lo, _mm256_castsi256_ps(mask8(n))),
              _mm256_and_ps(v.hi, _mm256_castsi256_ps(mask8(n - 8))));
}
SIMD16 float f_sum(f16 a) {
    __m256 s = _mm256_add_ps(a.lo, a.hi);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}
SIMD16 float f_top(f16 a) {
    __m256 s = _mm256_max_ps(a.lo, a.hi);
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
}
SIMD16 f16 f_load(const float *p) { return F2(_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)); }
SIMD16 f16 f_load_n(const float *p, int64_t n) {
    return F2(_mm256_maskload_ps(p, mask8(n)), _mm256_maskload_ps(p + 8, mask8(n - 8)));
}
SIMD16 void f_store(float *p, f16 a) {
    _mm256_storeu_ps(p, a.lo);
    _mm256_storeu_ps(p + 8, a.hi);
}
SIMD16 void f_store_n(float *p, f16 a, int64_t n) {
    _mm256_maskstore_ps(p, mask8(n), a.lo);
    _mm256_maskstore_ps(p + 8, mask8(n - 8), a.hi);
}
SIMD16 __m256 bf16_8(__m128i v) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
SIMD16 f16 f_bf16(const uint16_t *p) {
    return F2(bf16_8(_mm_loadu_si128((const __m128i *)p)),
              bf16_8(_mm_loadu_si128((const __m128i *)(p + 8))));
}
SIMD16 f16 f_bf16_n(const uint16_t *p, int64_t n) {
    if (n == 16) return f_bf16(p);  // the usual case: head dims are multiples of 16
    uint16_t v[16] = {0};
    memcpy(v, p, sizeof(uint16_t) * (size_t)n);
    return f_bf16(v);
}
SIMD16 void f_store_i8(int8_t *p, f16 a) {
    const __m256i w = _mm256_packs_epi32(_mm256_cvtps_epi32(a.lo), _mm256_cvtps_epi32(a.hi));
    const __m256i b = _mm256_packs_epi16(w, w);  // per 128-bit half: lo 0-3, hi 0-3, lo 4-7, ..
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 0, 0, 0, 0);
    _mm_storeu_si128((__m128i *)p, _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(b, order)));
}

SIMD16 i16 i_zero(void) { return I2(_mm256_setzero_si256(), _mm256_setzero_si256()); }
SIMD16 i16 i_load(const void *p) {
    return I2(_mm256_loadu_si256((const __m256i *)p),
              _mm256_loadu_si256((const __m256i *)((const char *)p + 32)));
}
SIMD16 i16 i_set(int32_t a) { return I2(_mm256_set1_epi32(a), _mm256_set1_epi32(a)); }
SIMD16 i16 i_add(i16 a, i16 b) {
    return I2(_mm256_add_epi32(a.lo, b.lo), _mm256_add_epi32(a.hi, b.hi));
}
SIMD16 i16 i_and(i16 a, i16 b) {
    return I2(_mm256_and_si256(a.lo, b.lo), _mm256_and_si256(a.hi, b.hi));
}
SIMD16 i16 i_shl(i16 a, int s) { return I2(_mm256_slli_epi32(a.lo, s), _mm256_slli_epi32(a.hi, s)); }
SIMD16 i16 i_shr16(i16 a, int s) {
    return I2(_mm256_srli_epi16(a.lo, s), _mm256_srli_epi16(a.hi, s));
}
SIMD16 __m256i dpbusd_8(__m256i acc, __m256i u8, __m256i s8) {
    const __m256i pairs = _mm256_maddubs_epi16(u8, s8);  // |sum| <= 2 * 15 * 128: no saturation
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}
SIMD16 i16 i_dpbusd(i16 acc, i16 u8, i16 s8) {
    return I2(dpbusd_8(acc.lo, u8.lo, s8.lo), dpbusd_8(acc.hi, u8.hi, s8.hi));
}
SIMD16 i16 i_dpbusd_x4(i16 acc, i16 u8, const int8_t *x) {
    int32_t v;
    memcpy(&v, x, 4);
    return i_dpbusd(acc, u8, i_set(v));
}
SIMD16 f16 i_to_f(i16 a) { return F2(_mm256_cvtepi32_ps(a.lo), _mm256_cvtepi32_ps(a.hi)); }
SIMD16 f16 i_as_f(i16 a) { return F2(_mm256_castsi256_ps(a.lo), _mm256_castsi256_ps(a.hi)); }

#endif

// ---- built on either set ----

// e^x for 16 lanes: x = n ln2 + r, |r| <= ln2 / 2, e^r by its degree-6 Taylor polynomial
// (relative error ~2e-7), times 2^n; 0 below -87 (and for -inf).
SIMD16 f16 exp16(f16 x) {
    const f16 clamped = f_max(f_min(x, f_set(88.0f)), f_set(-87.0f));
    const f16 n = f_round(f_mul(clamped, f_set(1.44269504f)));
    f16 r = f_fnma(n, f_set(0.693145752f), clamped);
    r = f_fnma(n, f_set(1.42860677e-6f), r);
    f16 p = f_set(1.0f / 720);
    p = f_fma(p, r, f_set(1.0f / 120));
    p = f_fma(p, r, f_set(1.0f / 24));
    p = f_fma(p, r, f_set(1.0f / 6));
    p = f_fma(p, r, f_set(0.5f));
    p = f_fma(p, r, f_set(1.0f));
    p = f_fma(p, r, f_set(1.0f));
    return f_keep_ge(f_scale2(p, n), x, -87.0f);
}

SIMD16 int64_t upto16(int64_t n) { return n < 0 ? 0 : n < 16 ? n : 16; }  // 0 .. 16

#endif
