// Data-free HQQ (half-quadratic quantization) of a weight W[rows, cols], groups of G along a
// row (hqq's axis 1), as hqq 0.2.x's Quantizer.quantize computes it with its default solver,
// optimize_weights_proximal_legacy, then re-rounded against the stored parameters.
//
// hqq works with the inverse scale i and zero point z: W ~ (round(W i + z) - z) / i.
//   min-max start, per group:  i = (2^b - 1) / (max - min)  (1 where |max - min| <= 1e-4),
//                              i = min(i, 2e4),  z = -min i
//   then `iters` (20) proximal steps on z with i fixed, each over the whole chunk:
//     Q = clamp(round(W i + z), 0, 2^b - 1),  R = (Q - z) / i,  err = mean |W - R|
//     E = shrink(W - R) = sign(d) max(|d| - |d|^(p-1) / beta, 0)   (p = 0.7, beta = 10, fixed:
//                                                                   the legacy solver has no
//                                                                   beta schedule)
//     z = mean over the group of (Q - (W - E) i)
//   stopping after the first step whose err is not below the best so far (its updated z is
//   kept, as hqq keeps it). The error is the chunk's mean, so every step is a sweep over the
//   chunk; each sweep reads W once and keeps a group's values in registers.
// Out, in subspec's convention W ~ (q - off) s + z' (quant/linear.py): s = 1 / i and
// z' = (off - z) s, both rounded to the compute dtype, and q = clamp(round((W - z') / s) + off)
// from those rounded values, so that storage rounding adds no error.
//
// Every product and sum is rounded as written (built without FMA contraction), as torch's
// elementwise ops round them; the group sums' order differs from torch's, so a zero point may
// differ from hqq's in its last bits. The shrink is zero unless |d| > beta^(-1 / (2 - p))
// (0.17 at the defaults, far above a weight's usual rounding error): lanes past a margin below
// that go through powf, the rest skip it.

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

enum { MAX_GROUP = 1024 };
enum { IN_F32 = 0, IN_BF16 = 1 };      // the weight's dtype
enum { OUT_F32 = 0, OUT_BF16 = 1 };    // what the stored scale and zero are rounded to
enum { E_ARGS = -1, E_NONFINITE = -2, E_MEMORY = -3 };

typedef struct {
    float max_q;      // 2^bits - 1
    float inv_beta;   // 1 / beta
    float lp_minus_1; // p - 1
    float shrink_at;  // |d| above which the shrink may be non-zero (with a margin)
} Solver;

// one group of W as floats
static void load_group(const void *w, int in_dtype, int64_t start, int g, float *out) {
    if (in_dtype == IN_BF16) {
        const uint16_t *src = (const uint16_t *)w + start;
        for (int j = 0; j < g; j++) out[j] = bf16_to_float(src[j]);
    } else {
        memcpy(out, (const float *)w + start, (size_t)g * sizeof(float));
    }
}

static inline float shrink(float d, const Solver *s) {
    const float a = fabsf(d);
    const float out = fmaxf(a - s->inv_beta * powf(a, s->lp_minus_1), 0.0f);
    return d < 0 ? -out : out;
}

static int finish_start(float lo, float hi, const Solver *s, float *inv, float *zero) {
    const float denom = hi - lo;
    // (2^b - 1) / denom as torch computes a Python number over a tensor: a reciprocal, then
    // a product, each rounded
    float i = fabsf(denom) <= 1e-4f ? 1.0f : (1.0f / denom) * s->max_q;
    i = fminf(i, 2e4f);
    *inv = i;
    *zero = -lo * i;
    return 0;
}

// hqq's min-max start for one group; 0, or E_NONFINITE for a NaN or infinite weight
static int start_group(const float *x, int g, const Solver *s, float *inv, float *zero) {
    float lo = x[0], hi = x[0];
    for (int j = 0; j < g; j++) {
        if (!isfinite(x[j])) return E_NONFINITE;
        lo = x[j] < lo ? x[j] : lo;
        hi = x[j] > hi ? x[j] : hi;
    }
    return finish_start(lo, hi, s, inv, zero);
}

// q of one group from its stored scale and zero point
static void store_group(const float *x, int g, float scale, float zero, float off,
                        const Solver *s, uint8_t *q) {
    for (int j = 0; j < g; j++) {
        const float v = rintf((x[j] - zero) / scale) + off;
        q[j] = (uint8_t)(v < 0.0f ? 0.0f : v > s->max_q ? s->max_q : v);
    }
}

// one proximal step on one group: its new zero point; its sum of |W - R| is added to the
// row's error lanes err[0..15] (lane 0 here)
static float step_scalar(const float *x, int g, float inv, float z, const Solver *s,
                         float *err) {
    float err_sum = 0.0f, acc = 0.0f;
    for (int j = 0; j < g; j++) {
        const float t = x[j] * inv;
        float q = rintf(t + z);
        q = q < 0.0f ? 0.0f : q > s->max_q ? s->max_q : q;
        const float d = x[j] - (q - z) / inv;
        err_sum += fabsf(d);
        const float e = fabsf(d) > s->shrink_at ? shrink(d, s) : 0.0f;
        const float kept = x[j] - e;
        acc += q - kept * inv;
    }
    err[0] += err_sum;
    return acc / (float)g;
}

#if defined(__x86_64__)
#define AVX512 __attribute__((target("avx512f")))

AVX512 static inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

// step_scalar for g % 16 == 0, 16 weights a vector, the error added lane by lane; lanes
// near the shrink's threshold (rare) make the group go through step_scalar instead, which
// gives the same zero point
AVX512 static float step_avx512(const float *x, int g, float inv, float z, const Solver *s,
                                float *err) {
    const __m512 vinv = _mm512_set1_ps(inv), vz = _mm512_set1_ps(z);
    const __m512 lo = _mm512_setzero_ps(), hi = _mm512_set1_ps(s->max_q);
    const __m512 shrink_at = _mm512_set1_ps(s->shrink_at);
    __m512 err_v = _mm512_setzero_ps(), acc = _mm512_setzero_ps();
    __mmask16 far = 0;
    for (int j = 0; j < g; j += 16) {
        const __m512 xv = _mm512_loadu_ps(x + j);
        const __m512 t = _mm512_mul_ps(xv, vinv);
        __m512 q = _mm512_roundscale_ps(_mm512_add_ps(t, vz),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        q = _mm512_min_ps(_mm512_max_ps(q, lo), hi);
        const __m512 d = _mm512_sub_ps(xv, _mm512_div_ps(_mm512_sub_ps(q, vz), vinv));
        const __m512 a = _mm512_abs_ps(d);
        err_v = _mm512_add_ps(err_v, a);
        far |= _mm512_cmp_ps_mask(a, shrink_at, _CMP_GT_OQ);
        acc = _mm512_add_ps(acc, _mm512_sub_ps(q, t));  // (W - 0) i == W i
    }
    if (far) return step_scalar(x, g, inv, z, s, err);
    _mm512_storeu_ps(err, _mm512_add_ps(_mm512_loadu_ps(err), err_v));
    return hsum(acc) / (float)g;
}

// start_group for g % 16 == 0 (x * 0 is NaN exactly where x is not finite)
AVX512 static int start_avx512(const float *x, int g, const Solver *s, float *inv,
                               float *zero) {
    __m512 lo = _mm512_loadu_ps(x), hi = lo, bad = _mm512_setzero_ps();
    for (int j = 0; j < g; j += 16) {
        const __m512 xv = _mm512_loadu_ps(x + j);
        lo = _mm512_min_ps(lo, xv);
        hi = _mm512_max_ps(hi, xv);
        bad = _mm512_add_ps(bad, _mm512_mul_ps(xv, _mm512_setzero_ps()));
    }
    if (isnan(_mm512_reduce_add_ps(bad))) return E_NONFINITE;
    return finish_start(_mm512_reduce_min_ps(lo), _mm512_reduce_max_ps(hi), s, inv, zero);
}

// load_group for g % 16 == 0
AVX512 static void load_avx512(const void *w, int in_dtype, int64_t start, int g, float *out) {
    if (in_dtype != IN_BF16) {
        memcpy(out, (const float *)w + start, (size_t)g * sizeof(float));
        return;
    }
    const uint16_t *src = (const uint16_t *)w + start;
    for (int j = 0; j < g; j += 16) {
        const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(src + j)));
        _mm512_storeu_ps(out + j, _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16)));
    }
}

// store_group for g % 16 == 0
AVX512 static void store_avx512(const float *x, int g, float scale, float zero, float off,
                                const Solver *s, uint8_t *q) {
    const __m512 vs = _mm512_set1_ps(scale), vz = _mm512_set1_ps(zero);
    const __m512 voff = _mm512_set1_ps(off), lo = _mm512_setzero_ps();
    const __m512 hi = _mm512_set1_ps(s->max_q);
    for (int j = 0; j < g; j += 16) {
        const __m512 t = _mm512_div_ps(_mm512_sub_ps(_mm512_loadu_ps(x + j), vz), vs);
        __m512 v = _mm512_add_ps(_mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT |
                                                             _MM_FROUND_NO_EXC), voff);
        v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
        _mm_storeu_si128((__m128i *)(q + j), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(v)));
    }
}

static int has_avx512(void) { return __builtin_cpu_supports("avx512f"); }
#else
#define load_avx512 load_group
#define step_avx512 step_scalar
#define start_avx512 start_group
#define store_avx512 store_group
static int has_avx512(void) { return 0; }
#endif

// the per-group work, vectorized or not
typedef struct {
    void (*load)(const void *, int, int64_t, int, float *);
    int (*start)(const float *, int, const Solver *, float *, float *);
    float (*step)(const float *, int, float, float, const Solver *, float *);
    void (*store)(const float *, int, float, float, float, const Solver *, uint8_t *);
} GroupFns;

static GroupFns group_fns(int g) {
    if (g % 16 == 0 && has_avx512())
        return (GroupFns){load_avx512, start_avx512, step_avx512, store_avx512};
    return (GroupFns){load_group, start_group, step_scalar, store_group};
}

// one sweep of proximal steps over all groups: zero_next, and the mean |W - R| as float
static float sweep(const void *w, int in_dtype, int64_t rows, int64_t cols, int g,
                   const Solver *s, const GroupFns *fn, const float *inv, const float *zero,
                   float *zero_next, double *row_err, int threads) {
    const int64_t per_row = cols / g;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        float x[MAX_GROUP];
        float e[16] = {0};
        for (int64_t k = 0; k < per_row; k++) {
            const int64_t grp = r * per_row + k;
            fn->load(w, in_dtype, grp * g, g, x);
            zero_next[grp] = fn->step(x, g, inv[grp], zero[grp], s, e);
        }
        double sum = 0.0;
        for (int l = 0; l < 16; l++) sum += e[l];
        row_err[r] = sum;
    }
    double total = 0.0;  // in row order: the same for any number of threads
    for (int64_t r = 0; r < rows; r++) total += row_err[r];
    return (float)(total / (double)(rows * cols));
}

static float to_out(float v, int out_dtype) {  // v as stored: in float32, or rounded to bf16
    return out_dtype == OUT_BF16 ? bf16_to_float(float_to_bf16(v)) : v;
}

// subspec's stored form from hqq's (inv, zero): scale, zero and q of every group
static void store(const void *w, int in_dtype, int64_t rows, int64_t cols, int g, int bits,
                  const Solver *s, const GroupFns *fn, const float *inv, const float *zero,
                  int out_dtype, uint8_t *q, float *scale_out, float *zero_out, int threads) {
    const int64_t per_row = cols / g;
    const float off = bits == 8 ? 128.0f : 8.0f;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        float x[MAX_GROUP];
        for (int64_t k = 0; k < per_row; k++) {
            const int64_t grp = r * per_row + k;
            const float sc = 1.0f / inv[grp];
            const float sv = to_out(sc, out_dtype);
            const float zv = to_out((off - zero[grp]) * sc, out_dtype);
            scale_out[grp] = sv;
            zero_out[grp] = zv;
            fn->load(w, in_dtype, grp * g, g, x);
            fn->store(x, g, sv, zv, off, s, q + grp * g);
        }
    }
}

// W[rows, cols] (in_dtype) -> q[rows, cols] (uint8 in [0, 2^bits)), scale and zero
// [rows, cols / group] (float32 holding values of out_dtype). optimize = 0: hqq's min-max
// start alone. Returns 0, E_ARGS for bad arguments, E_NONFINITE for a NaN or infinite weight,
// E_MEMORY when scratch cannot be allocated. `iterations`, if not NULL, gets the steps taken.
int subspec_hqq_quantize(const void *w, int in_dtype, int64_t rows, int64_t cols, int group,
                         int bits, int optimize, int iters, float lp_norm, float beta,
                         int out_dtype, uint8_t *q, float *scale_out, float *zero_out,
                         int *iterations, int threads) {
    if (!w || !q || !scale_out || !zero_out || rows <= 0 || cols <= 0 || group <= 0 ||
        group > MAX_GROUP || cols % group || bits < 1 || bits > 8 || iters < 0 ||
        !(lp_norm > 0.0f && lp_norm <= 1.0f) || !(beta > 0.0f) || threads < 1 ||
        (in_dtype != IN_F32 && in_dtype != IN_BF16) ||
        (out_dtype != OUT_F32 && out_dtype != OUT_BF16))
        return E_ARGS;
    const Solver s = {
        .max_q = (float)((1 << bits) - 1),
        .inv_beta = (float)(1.0 / beta),
        .lp_minus_1 = lp_norm - 1.0f,
        .shrink_at = 0.99f * powf(1.0f / beta, 1.0f / (2.0f - lp_norm)),
    };
    const int64_t groups = rows * (cols / group);
    float *inv = malloc(sizeof(float) * groups), *zero = malloc(sizeof(float) * groups);
    float *zero_next = malloc(sizeof(float) * groups);
    double *row_err = malloc(sizeof(double) * rows);
    int rc = (inv && zero && zero_next && row_err) ? 0 : E_MEMORY;
    int taken = 0;
    const GroupFns fn = group_fns(group);
    if (rc == 0) {
        const int64_t per_row = cols / group;
#pragma omp parallel for schedule(static) num_threads(threads) reduction(| : rc)
        for (int64_t r = 0; r < rows; r++) {
            float x[MAX_GROUP];
            for (int64_t k = 0; k < per_row; k++) {
                const int64_t grp = r * per_row + k;
                fn.load(w, in_dtype, grp * group, group, x);
                rc |= fn.start(x, group, &s, &inv[grp], &zero[grp]) ? 1 : 0;
            }
        }
        rc = rc ? E_NONFINITE : 0;
    }
    if (rc == 0 && optimize) {
        float best = INFINITY;
        for (int i = 0; i < iters; i++) {
            const float err = sweep(w, in_dtype, rows, cols, group, &s, &fn, inv, zero,
                                    zero_next, row_err, threads);
            float *t = zero;  // hqq keeps the step's new zero point whether or not it stops
            zero = zero_next;
            zero_next = t;
            taken = i + 1;
            if (!(err < best)) break;
            best = err;
        }
    }
    if (rc == 0)
        store(w, in_dtype, rows, cols, group, bits, &s, &fn, inv, zero, out_dtype, q, scale_out,
              zero_out, threads);
    if (iterations) *iterations = taken;
    free(inv);
    free(zero);
    free(zero_next);
    free(row_err);
    return rc;
}
