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
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define ROW_CHUNK 256 /* rows of x per pass over the weights: 256 x K bf16 stays in L2 */
#define PREFETCH 8192 /* bytes of weights ahead of the tiles being read: four steps */

/* Linux hands out the tile registers' state only on request, once per process. 0: granted. */
int amx_request(void) { return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) ? -1 : 0; }

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* Eight tiles of 16 rows x 64 bytes: 0-3 accumulators (fp32), 4-5 rows of x (bf16), 6-7 weights (bf16 pairs). */
static void configure_tiles(void) {
    tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) {
        c.rows[t] = 16;
        c.colsb[t] = 64;
    }
    _tile_loadconfig(&c);
}

/* Rows [r0, r1) of x, rounded to bf16, into a [.., k32] zero-padded beyond k (and rows past m all zero). */
static void round_rows(const float *x, long m, long k, long x_row, long k32, long r0, long r1, uint16_t *a) {
    for (long r = r0; r < r1; r++) {
        uint16_t *dst = a + r * k32;
        long i = 0;
        if (r < m) {
            const float *src = x + r * x_row;
            for (; i < k; i += 16) {
                __mmask16 mask = k - i >= 16 ? 0xFFFF : (__mmask16)((1u << (k - i)) - 1);
                __m512 v = _mm512_maskz_loadu_ps(mask, src + i);
                _mm256_mask_storeu_epi16(dst + i, mask, (__m256i)_mm512_cvtneps_pbh(v));
            }
            i = k;
        }
        memset(dst + i, 0, (k32 - i) * sizeof(uint16_t));
    }
}

/* Accumulators of rows [mb, mb + rows) x features [f0, f0 + cols) into y, plus the bias. */
static void store_block(float *y, long n, long mb, long rows, long f0, long cols, int two, const float *bias) {
    if (rows >= 16 * (two + 1) && cols == 32) {  /* whole tiles straight into y */
        _tile_stored(0, y + mb * n + f0, n * sizeof(float));
        _tile_stored(1, y + mb * n + f0 + 16, n * sizeof(float));
        if (two) {
            _tile_stored(2, y + (mb + 16) * n + f0, n * sizeof(float));
            _tile_stored(3, y + (mb + 16) * n + f0 + 16, n * sizeof(float));
        }
    } else {
        float tmp[32 * 32] __attribute__((aligned(64)));
        _tile_stored(0, tmp, 32 * sizeof(float));
        _tile_stored(1, tmp + 16, 32 * sizeof(float));
        if (two) {
            _tile_stored(2, tmp + 16 * 32, 32 * sizeof(float));
            _tile_stored(3, tmp + 16 * 32 + 16, 32 * sizeof(float));
        }
        for (long r = 0; r < rows; r++)
            for (long c = 0; c < cols; c += 16) {
                __mmask16 mask = cols - c >= 16 ? 0xFFFF : (__mmask16)((1u << (cols - c)) - 1);
                _mm512_mask_storeu_ps(y + (mb + r) * n + f0 + c, mask, _mm512_loadu_ps(tmp + r * 32 + c));
            }
    }
    if (bias)
        for (long r = 0; r < rows; r++)
            for (long c = 0; c < cols; c += 16) {
                __mmask16 mask = cols - c >= 16 ? 0xFFFF : (__mmask16)((1u << (cols - c)) - 1);
                float *out = y + (mb + r) * n + f0 + c;
                _mm512_mask_storeu_ps(out, mask, _mm512_add_ps(_mm512_maskz_loadu_ps(mask, out),
                                                               _mm512_maskz_loadu_ps(mask, bias + f0 + c)));
            }
}

/* x: [m, k] fp32, rows x_row floats apart; packed: [ceil(n / 32)][k32 / 32][2][16][16][2] bf16, k32 = k rounded
 * up to 32; a: scratch for x in bf16, [m rounded up to 16][k32]; y: [m, n]; bias: [n] or NULL. */
void amx_linear(const float *x, long m, long k, long x_row, const uint16_t *packed, long n, const float *bias,
                uint16_t *a, float *y, int threads) {
    long k32 = (k + 31) / 32 * 32, steps = k32 / 32, mp = (m + 15) / 16 * 16, blocks = (n + 31) / 32;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (long r = 0; r < mp; r += 16) round_rows(x, m, k, x_row, k32, r, r + 16, a);
        configure_tiles();
        for (long m0 = 0; m0 < mp; m0 += ROW_CHUNK) {
            long m1 = m0 + ROW_CHUNK < mp ? m0 + ROW_CHUNK : mp;
#pragma omp for schedule(static)
            for (long b = 0; b < blocks; b++) {
                const uint16_t *wb = packed + b * steps * 1024;
                for (long mb = m0; mb < m1; mb += 32) {
                    int two = mb + 16 < m1;
                    _tile_zero(0);
                    _tile_zero(1);
                    _tile_zero(2);
                    _tile_zero(3);
                    const uint16_t *a0 = a + mb * k32, *a1 = a + (mb + 16) * k32;
                    for (long s = 0; s < steps; s++) {
                        const uint16_t *w = wb + s * 1024;
                        for (int line = 0; line < 2048; line += 64)  /* this step's two tiles, ahead */
                            _mm_prefetch((const char *)w + PREFETCH + line, _MM_HINT_T0);
                        _tile_loadd(6, w, 64);
                        _tile_loadd(7, w + 512, 64);
                        _tile_loadd(4, a0 + s * 32, k32 * sizeof(uint16_t));
                        _tile_dpbf16ps(0, 4, 6);
                        _tile_dpbf16ps(1, 4, 7);
                        if (two) {
                            _tile_loadd(5, a1 + s * 32, k32 * sizeof(uint16_t));
                            _tile_dpbf16ps(2, 5, 6);
                            _tile_dpbf16ps(3, 5, 7);
                        }
                    }
                    long rows = m - mb < 32 ? m - mb : 32, cols = n - b * 32 < 32 ? n - b * 32 : 32;
                    if (rows > 0) store_block(y, n, mb, rows, b * 32, cols, two, bias);
                }
            }
        }
        _tile_release();
    }
}
