/* The AMX-BF16 tile work that the products share (amx_gemm.c, quant_gemm.c): the tiles' set-up, rounding rows
 * of x to bf16, one 32-feature block of bf16 weight tiles against the rows, and storing its accumulators.
 * A block's weights are [steps][2 tiles][16 rows][16 features][2 inputs] bf16: for each step of 32 inputs, two
 * 16 x 64-byte tiles whose row r holds, for each of 16 features, inputs 2r and 2r + 1 of the step. */
#ifndef STRATA_AMX_TILES_H
#define STRATA_AMX_TILES_H
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
static inline int request_tiles(void) { return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) ? -1 : 0; }

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* Eight tiles of 16 rows x 64 bytes: 0-3 accumulators (fp32), 4-5 rows of x (bf16), 6-7 weights (bf16 pairs). */
static inline void configure_tiles(void) {
    tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) {
        c.rows[t] = 16;
        c.colsb[t] = 64;
    }
    _tile_loadconfig(&c);
}

/* Rows [r0, r0 + 16) of x (r0 a multiple of 16) rounded to bf16 in tile order: a + ((r0 / 16) * steps + s) * 512
 * is the tile of those rows' inputs [32 s, 32 s + 32), 16 rows of 64 bytes one after the other, so that a tile
 * loads from one contiguous kilobyte. Zero beyond k, and for rows past m. */
static inline void round_rows(const float *x, long m, long k, long x_row, long steps, long r0, uint16_t *a) {
    uint16_t *tiles = a + (r0 / 16) * steps * 512;
    for (long r = r0; r < r0 + 16; r++) {
        uint16_t *dst = tiles + (r - r0) * 32;
        const float *src = r < m ? x + r * x_row : x; /* a row past m reads nothing: every lane masked off */
        for (long s = 0; s < steps; s++)
            for (long h = 0; h < 32; h += 16) {
                long i = s * 32 + h, left = r < m ? k - i : 0;
                __mmask16 mask = left >= 16 ? 0xFFFF : left > 0 ? (__mmask16)((1u << left) - 1) : 0;
                __m512 v = _mm512_maskz_loadu_ps(mask, src + i);
                _mm256_storeu_si256((__m256i *)(dst + s * 512 + h), (__m256i)_mm512_cvtneps_pbh(v));
            }
    }
}

/* The tile of rounded rows [r, r + 16) (r a multiple of 16) and step s, in round_rows' order. */
static inline const uint16_t *x_tile(const uint16_t *a, long steps, long r, long s) {
    return a + ((r / 16) * steps + s) * 512;
}

static inline void zero_accumulators(void) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
}

/* One step of 32 inputs: a block's two weight tiles (w: [2][16][32] bf16) against one tile of x (a0), or two (a1
 * too, where `two`), each round_rows' tile of 16 rows, into accumulators 0-3. */
static inline void tile_step(const uint16_t *w, const uint16_t *a0, const uint16_t *a1, int two) {
    _tile_loadd(6, w, 64);
    _tile_loadd(7, w + 512, 64);
    _tile_loadd(4, a0, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if (two) {
        _tile_loadd(5, a1, 64);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
}

/* Accumulators of rows [mb, mb + rows) x features [f0, f0 + cols) into y, plus the bias. */
static inline void store_block(float *y, long n, long mb, long rows, long f0, long cols, int two, const float *bias) {
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

/* Rows [m0, m1) of the rounded x (a: round_rows' tiles) against one block of weight tiles (wb: [steps][1024]),
 * into y's features [32 b, 32 b + 32), plus the bias. Tiles 0-3 accumulate, 4-5 hold x, 6-7 the weights. */
static inline void multiply_block(const uint16_t *wb, long steps, const uint16_t *a, long m, long m0, long m1,
                                  float *y, long n, long b, const float *bias) {
    /* The first pass over the block's rows reads its weights from memory, fetched a few steps ahead; the passes
     * after it find them in cache and meanwhile fetch the next block's into L2, spread over their steps, so that
     * memory is not idle while the tiles work on rows already fetched. */
    long passes = (m1 - m0 + 31) / 32, block_bytes = steps * 2048;
    long share = passes > 1 ? (block_bytes / (passes - 1) / steps + 63) / 64 * 64 : 0; /* bytes per step */
    const char *next = (const char *)(wb + steps * 1024);
    for (long mb = m0; mb < m1; mb += 32) {
        int two = mb + 16 < m1;
        long pass = (mb - m0) / 32;
        zero_accumulators();
        for (long s = 0; s < steps; s++) {
            const uint16_t *w = wb + s * 1024;
            if (pass == 0) {
                for (int line = 0; line < 2048; line += 64)  /* this step's two tiles, ahead */
                    _mm_prefetch((const char *)w + PREFETCH + line, _MM_HINT_T0);
            } else {
                const char *from = next + ((pass - 1) * steps + s) * share;
                for (long line = 0; line < share && from + line < next + block_bytes; line += 64)
                    _mm_prefetch(from + line, _MM_HINT_T1);
            }
            tile_step(w, x_tile(a, steps, mb, s), x_tile(a, steps, mb + 16, s), two);
        }
        long rows = m - mb < 32 ? m - mb : 32, cols = n - b * 32 < 32 ? n - b * 32 : 32;
        if (rows > 0) store_block(y, n, mb, rows, b * 32, cols, two, bias);
    }
}

#endif
