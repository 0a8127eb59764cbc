// The row-invariant linear over a weight streamed in residual form (residual.c), rebuilt block
// by block inside the call: each thread rebuilds a block of W's rows (BLOCK_BYTES, a multiple
// of 16 rows) into its own buffer, which stays in its L2, and the exact kernel reads the block
// from there (exact_rows). The weights are the same bits as a whole rebuild's and each output
// is computed by the same code, so y is bit for bit subspec_exact_linear's over the rebuilt W,
// without writing W to memory and reading it back.

#include <stdint.h>
#include <stdlib.h>

#include "exact_linear.h"
#include "residual.h"

enum { TILE_ROWS = 16 };

// This thread's block buffer: grown once to the largest block, kept for the pool's life.
static uint16_t *block_buffer(int64_t values) {
    static __thread uint16_t *buffer;
    static __thread int64_t held;
    if (values > held) {
        free(buffer);
        buffer = aligned_alloc(64, (size_t)((values * 2 + 63) / 64 * 64));
        held = buffer ? values : 0;
    }
    return buffer;
}

// y[T, N] = x[T, K] @ W^T + bias, W [N, K] rebuilt from the substitute's records `w` and its
// residual form (residual.c's arguments), on `path` (dpbf16: x bf16; fma, portable: x fp32;
// not amx). `simd`: residual.c's AVX-512 decoder. Returns 0, -1 for a path or decoder this
// CPU lacks (or amx), -2 when out of memory, 1 for bad shapes, 2 for a residual form that
// disagrees with its table (a corrupted file: y is then not to be used).
int subspec_residual_exact_linear(const uint8_t *w, const int8_t *resid, const uint16_t *escapes,
                                  int64_t n_escapes, const int32_t *tile_escapes, const void *x,
                                  const float *bias, void *y, int64_t t, int64_t n, int64_t k,
                                  int64_t group, int y_bf16, int path, int simd, int threads) {
    if (path != PATH_DPBF16 && path != PATH_FMA && path != PATH_PORTABLE) return -1;
    if (path == PATH_DPBF16 && !subspec_exact_dpbf16_supported()) return -1;
    if (path == PATH_FMA && !subspec_exact_fma_supported()) return -1;
    if (simd && !subspec_residual_simd()) return -1;
    if (t < 1) return 1;
    const int checked = residual_check(n, k, group, n_escapes, tile_escapes);
    if (checked) return checked;
    int64_t rows = BLOCK_BYTES / (k * 2) / TILE_ROWS * TILE_ROWS;
    if (rows < TILE_ROWS) rows = TILE_ROWS;
    const int64_t blocks = (n + rows - 1) / rows;
    int bad = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(| : bad)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t n0 = b * rows, n1 = n0 + rows < n ? n0 + rows : n;
        uint16_t *block = block_buffer(rows * k);
        if (!block) {
            bad |= 4;
            continue;
        }
        uint16_t *row0 = (uint16_t *)((uintptr_t)block - (uintptr_t)(n0 * k * 2));  // W's place
        for (int64_t tile = n0 / TILE_ROWS; tile < n1 / TILE_ROWS; tile++)
            bad |= residual_decode_tile(w, resid, escapes, tile_escapes, row0, tile, k, group,
                                        simd);
        exact_rows(x, block, bias, y, t, n, k, n0, n1, y_bf16, path);
    }
    return bad & 4 ? -2 : bad ? 2 : 0;
}
