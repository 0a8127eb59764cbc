// The draft layer's attention (draft_attention.c), called by int4_vnni.c's draft layer.

#ifndef SUBSPEC_DRAFT_ATTENTION_H
#define SUBSPEC_DRAFT_ATTENTION_H

#include <stdint.h>

enum { QUERY_BLOCK = 4 };  // query heads per pass over the values; at most per attention task

// out[i][D] (rows out_stride apart) for the g query rows q[i][D] (d apart) of one kv head:
// softmax over the keys `mask` keeps (all when NULL) of q_i . k_s / sqrt(D), applied to the
// values; keys, values: [kv_len, D] bf16; scores: g rows of kv_len floats of scratch. A query
// that keeps no key gets zeros.
void subspec_attend_group(const float *q, int64_t g, const uint16_t *keys,
                          const uint16_t *values, const uint8_t *mask, int64_t kv_len, int64_t d,
                          float *scores, float *out, int64_t out_stride);

#endif
