/* y[M, N] = x[M, K] @ W^T (+ bias), x and y fp32, W quantized (engine.model.quantized's layout), on the tile units
 * of x86-64 CPUs with AMX-BF16.
 *
 * A decode step streams every weight once, so what bounds it is the bytes read: 4-6 bits a weight here against
 * 16 for bf16. Each 32-feature block of W is expanded in registers into bf16 tiles in a per-thread buffer that
 * stays in L2 (w = d * sc * (q - zero) + dmin * mn, rounded to bf16 once), then multiplied as amx_gemm.c
 * multiplies bf16 weights: x rounded to bf16, sums in fp32. The expansion costs a few instructions per weight
 * whatever the batch; the arithmetic on the tiles is what a bf16 model's is.
 */
#include <omp.h>

#include "amx_tiles.h"

typedef struct {
    int bits, group, zero, sub_scales;
} qformat;

/* Per-lane scale and offset of one tile's 16 features for one group of inputs, laid out as a tile row's two
 * halves use them: half h holds features 8h..8h+7, each twice (its two inputs). */
static inline void group_scales(const qformat *f, const uint16_t *d, const uint16_t *dmin, const int8_t *sc,
                                const int8_t *mn, __m512 *s0, __m512 *s1, __m512 *o0, __m512 *o1) {
    __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)d));
    __m512 offset = dmin ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)dmin)) : _mm512_setzero_ps();
    if (f->sub_scales) {
        scale = _mm512_mul_ps(scale, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)sc))));
        if (dmin)
            offset = _mm512_mul_ps(offset, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)mn))));
    }
    offset = _mm512_fnmadd_ps(scale, _mm512_set1_ps((float)f->zero), offset);
    const __m512i lo = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    const __m512i hi = _mm512_add_epi32(lo, _mm512_set1_epi32(8));
    *s0 = _mm512_permutexvar_ps(lo, scale);
    *s1 = _mm512_permutexvar_ps(hi, scale);
    *o0 = _mm512_permutexvar_ps(lo, offset);
    *o1 = _mm512_permutexvar_ps(hi, offset);
}

/* One tile row (32 values) decoded and rounded into 32 bf16. */
static inline void decode_row(int bits, const uint8_t *row, __m512 s0, __m512 s1, __m512 o0, __m512 o1,
                              uint16_t *out) {
    __m512i q0, q1;
    if (bits == 8) {
        q0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)row));
        q1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + 16)));
    } else {
        const __m512i nibble = _mm512_set1_epi32(0x0F);
        __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)row));
        q0 = _mm512_and_si512(v, nibble);
        q1 = _mm512_srli_epi32(v, 4);
        if (bits == 6) {
            long long top;
            memcpy(&top, row + 16, sizeof top);
            __m512i h = _mm512_cvtepu8_epi32(_mm_set1_epi64x(top)); /* lane j: byte j % 8 */
            const __m512i three = _mm512_set1_epi32(3);
            const __m512i shift0 = _mm512_set_epi32(2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0);
            const __m512i shift1 = _mm512_set_epi32(6, 6, 6, 6, 6, 6, 6, 6, 4, 4, 4, 4, 4, 4, 4, 4);
            q0 = _mm512_or_si512(q0, _mm512_slli_epi32(_mm512_and_si512(_mm512_srlv_epi32(h, shift0), three), 4));
            q1 = _mm512_or_si512(q1, _mm512_slli_epi32(_mm512_and_si512(_mm512_srlv_epi32(h, shift1), three), 4));
        }
    }
    __m512 w0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q0), s0, o0);
    __m512 w1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q1), s1, o1);
    _mm512_storeu_si512(out, (__m512i)_mm512_cvtne2ps_pbh(w1, w0));
}

/* Block b of W, all its steps, as bf16 tiles into wb ([steps][1024]). */
static void expand_block(const qformat *f, long b, long steps, const uint8_t *quants, const uint16_t *d,
                         const uint16_t *dmin, const int8_t *sc, const int8_t *mn, uint16_t *wb) {
    const long row_bytes = 4 * f->bits, groups_per_step = 32 / f->group, groups = steps * groups_per_step;
    const long scale_groups = f->sub_scales ? (steps * 32 + 255) / 256 : groups; /* the last super-block may be partial */
    for (long s = 0; s < steps; s++) {
        const uint8_t *q = quants + (b * steps + s) * 32 * row_bytes;
        for (int t = 0; t < 2; t++)
            for (long g = 0; g < groups_per_step; g++) {
                long gi = s * groups_per_step + g, di = f->sub_scales ? s * 32 / 256 : gi;
                long at = (b * scale_groups + di) * 32 + t * 16, sub = (b * groups + gi) * 32 + t * 16;
                __m512 s0, s1, o0, o1;
                group_scales(f, d + at, dmin ? dmin + at : 0, sc ? sc + sub : 0, mn ? mn + sub : 0,
                             &s0, &s1, &o0, &o1);
                int rows = 16 / groups_per_step; /* a row holds two inputs: a group of 16 spans 8 rows */
                for (int r = g * rows; r < (g + 1) * rows; r++)
                    decode_row(f->bits, q + (t * 16 + r) * row_bytes, s0, s1, o0, o1, wb + s * 1024 + t * 512 + r * 32);
            }
    }
}

/* x: [m, k] fp32, rows x_row floats apart, k a multiple of 32; quants, d, dmin, sc, mn: the packed weight (dmin,
 * sc, mn NULL where the format has none); a: scratch for x in bf16, [m rounded up to 16][k]; wbuf: threads x
 * (k / 32) x 1024 bf16; y: [m, n]; bias: [n] or NULL. */
void quant_linear(const float *x, long m, long k, long x_row, const uint8_t *quants, const uint16_t *d,
                  const uint16_t *dmin, const int8_t *sc, const int8_t *mn, int bits, int group, int zero,
                  int sub_scales, long n, const float *bias, uint16_t *a, uint16_t *wbuf, float *y, int threads) {
    qformat f = {bits, group, zero, sub_scales};
    long steps = k / 32, mp = (m + 15) / 16 * 16, blocks = (n + 31) / 32;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (long r = 0; r < mp; r += 16) round_rows(x, m, k, x_row, k, r, r + 16, a);
        configure_tiles();
        uint16_t *wb = wbuf + (long)omp_get_thread_num() * steps * 1024; /* this thread's tiles */
        for (long m0 = 0; m0 < mp; m0 += ROW_CHUNK) {
            long m1 = m0 + ROW_CHUNK < mp ? m0 + ROW_CHUNK : mp;
#pragma omp for schedule(static)
            for (long b = 0; b < blocks; b++) {
                expand_block(&f, b, steps, quants, d, dmin, sc, mn, wb);
                multiply_block(wb, steps, a, k, m, m0, m1, y, n, b, bias);
            }
        }
        _tile_release();
    }
}
