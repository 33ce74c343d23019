/* y[M, N] = x[M, K] @ W^T (+ bias), x and y fp32, W bf16, on the tile units of x86-64 CPUs with AMX-BF16.
 *
 * Each product rounds x to bf16 (round to nearest even, as torch does) and accumulates in fp32, as a bf16
 * model's products do. W arrives packed once at load time (amx_gemm.py) in the order the tiles read it:
 * for each 32 output features, for each 32 input features, two 16 x 64-byte tiles of 16 features' pairs of
 * inputs. One product then reads W front to back as one stream, which is what bounds a decode step: at
 * decode batch sizes the tile units finish a block's arithmetic long before the next block's weights arrive
 * from memory, so the stream is prefetched ahead and nothing else is read from memory meanwhile.
 * A block of 32 features meets up to 32 rows of x at a time (two rows of tiles, four accumulators); x is
 * taken in chunks of rows small enough to stay in L2 while every block passes over it. Blocks are shared
 * among OpenMP threads.
 */
#include "amx_tiles.h"

int amx_request(void) { return request_tiles(); }

/* x: [m, k] fp32, rows x_row floats apart; packed: [ceil(n / 32)][k32 / 32][2][16][16][2] bf16, k32 = k rounded
 * up to 32; a: scratch for x in bf16, [m rounded up to 16][k32] (in round_rows' tile order); y: [m, n]; bias: [n]
 * or NULL. */
void amx_linear(const float *x, long m, long k, long x_row, const uint16_t *packed, long n, const float *bias,
                uint16_t *a, float *y, int threads) {
    long k32 = (k + 31) / 32 * 32, steps = k32 / 32, mp = (m + 15) / 16 * 16, blocks = (n + 31) / 32;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (long r = 0; r < mp; r += 16) round_rows(x, m, k, x_row, steps, r, a);
        configure_tiles();
        for (long m0 = 0; m0 < mp; m0 += ROW_CHUNK) {
            long m1 = m0 + ROW_CHUNK < mp ? m0 + ROW_CHUNK : mp;
#pragma omp for schedule(static)
            for (long b = 0; b < blocks; b++) {
                const uint16_t *wb = packed + b * steps * 1024;
                multiply_block(wb, steps, a, m, m0, m1, y, n, b, bias);
            }
        }
        _tile_release();
    }
}
