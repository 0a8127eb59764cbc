// The row-invariant linear's shared definitions (bf16_exact.c), and its entry for one block
// of rows of W held on their own (residual_linear.c rebuilds a streamed W block by block).

#ifndef SUBSPEC_EXACT_LINEAR_H
#define SUBSPEC_EXACT_LINEAR_H

#include <stdint.h>
#include <string.h>

enum { PATH_PORTABLE = 0, PATH_DPBF16 = 1, PATH_FMA = 2, PATH_AMX = 3 };  // exact.py's paths

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

int subspec_exact_dpbf16_supported(void);  // whether the CPU runs each path
int subspec_exact_fma_supported(void);

// Rows [n0, n1) of y = x @ W^T + bias (y [T, N]) on `path` (not amx), W's rows n0 .. n1 - 1
// read from `rows` ([n1 - n0, K] bf16): the same bits as subspec_exact_linear's, which splits
// W into such blocks over its threads.
void exact_rows(const void *x, const uint16_t *rows, const float *bias, void *y, int64_t t,
                int64_t n, int64_t k, int64_t n0, int64_t n1, int y_bf16, int path);

#endif
