// bf16 <-> float32, shared by the kernels that read or write bf16 one value at a time
// (int4_vnni.c, residual.c, hqq.c).

#ifndef SUBSPEC_BF16_H
#define SUBSPEC_BF16_H

#include <stdint.h>
#include <string.h>

static inline float bf16_to_float(uint16_t v) {
    const uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t float_to_bf16(float f) {  // round to nearest even (finite inputs)
    uint32_t bits;
    memcpy(&bits, &f, 4);
    return (uint16_t)((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

#endif
