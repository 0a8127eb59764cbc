// The residual codec's tile decoder (residual.c), shared with the fused exact linear that
// rebuilds a streamed weight block by block (residual_linear.c).

#ifndef SUBSPEC_RESIDUAL_H
#define SUBSPEC_RESIDUAL_H

#include <stdint.h>

int subspec_residual_simd(void);  // whether the CPU runs the AVX-512 decoder

// 0 when W [N, K] in group `group` fits the codec and `tile_escapes` ([N / 16 + 1]) starts at
// 0, never decreases and ends at most at `n_escapes`; 1 for bad shapes, 2 for a bad table (a
// corrupted file).
int residual_check(int64_t n, int64_t k, int64_t group, int64_t n_escapes,
                   const int32_t *tile_escapes);

// Tile t (rows 16 t .. 16 t + 15) rebuilt at weight + 16 t K: `weight` may point before the
// buffer that holds a block of rows alone. `simd`: the AVX-512 path (the caller checked the
// CPU has it). Returns 0, or 1 when the tile uses more or fewer escapes than its table says.
int residual_decode_tile(const uint8_t *w, const int8_t *resid, const uint16_t *escapes,
                         const int32_t *tile_escapes, uint16_t *weight, int64_t t, int64_t k,
                         int64_t group, int simd);

#endif
