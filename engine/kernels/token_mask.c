/* A grammar's token mask applied to logits: each forbidden token's logit becomes -inf.
 *
 * The mask is a bitmask, bit j of 32-bit word w allowing token 32 w + j, as the grammar library writes it. torch
 * needs a bool tensor the size of the logits and a masked fill over all of them (some ten milliseconds for 32 rows
 * of 49152 on one core); here a word whose tokens are all allowed is one compare, and only forbidden tokens are
 * written.
 */
#include <math.h>
#include <stdint.h>

/* logits[B, V] (row stride `stride` floats); for g < G, row rows[g] takes mask[g, W]. */
void apply_token_mask(float *logits, long stride, long V, const int64_t *rows, long G, const uint32_t *mask, long W) {
    for (long g = 0; g < G; g++) {
        float *row = logits + rows[g] * stride;
        const uint32_t *m = mask + g * W;
        for (long w = 0; w < W; w++) {
            uint32_t word = m[w];
            if (word == 0xFFFFFFFFu) continue;
            long base = w * 32;
            long n = V - base < 32 ? V - base : 32;
            float *x = row + base;
            if (word == 0) {
                for (long j = 0; j < n; j++) x[j] = -INFINITY;
                continue;
            }
            /* Only the forbidden bits, one at a time: no branch per token to mispredict. */
            for (uint32_t z = ~word; z; z &= z - 1) {
                long j = __builtin_ctz(z);
                if (j < n) x[j] = -INFINITY;
            }
        }
    }
}
