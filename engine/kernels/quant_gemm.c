/* y[M, N] = x[M, K] @ W^T (+ bias), x and y fp32, W quantized (engine.model.quantized's layout), on x86-64 CPUs
 * with AMX-BF16 (which all have AVX512-VNNI).
 *
 * A decode step streams every weight once, so what bounds it is the bytes read: 4-8.5 bits a weight here against
 * 16 for bf16. Two paths, by the number of rows:
 * - up to GEMV_ROWS rows (a decode step of few sequences), a dot product in int16 on the vector units: each row
 *   of x is quantized to int16 per 32 inputs (a scale of max|x| / 32767: finer than bf16's 8 bits), each tile row
 *   of W widened to int16 in registers, and `vpdpwssd` sums the pairs of inputs the layout keeps together into
 *   each feature's int32; per group of inputs the sum is scaled once in fp32:
 *   sum_i w_i x_i = xs * (d * sc * sum_i q_i xq_i + (dmin * mn - d * sc * zero) * sum_i xq_i).
 *   A few instructions per 32 weights, so memory, not arithmetic, bounds the product;
 * - above that, each 32-feature block of W is expanded in registers into bf16 tiles (w = d * sc * (q - zero) +
 *   dmin * mn, rounded to bf16 once), a few steps of 32 inputs at a time into a per-thread buffer small enough to
 *   stay in L1, and multiplied from there as amx_gemm.c multiplies bf16 weights: x rounded to bf16, sums in fp32.
 *   Up to 32 rows, each step is multiplied as soon as it is expanded; above, the accumulators of each 32 rows wait
 *   in memory between chunks of steps. The expansion costs a few instructions per weight whatever the batch; the
 *   arithmetic on the tiles is what a bf16 model's is.
 */
#include <stdlib.h>

#include "amx_tiles.h"

typedef struct {
    int bits, group, zero, sub_scales;
} qformat;

#define CODE_PREFETCH 2048 /* bytes of codes fetched ahead of where they are read */

/* The codes `bytes` from `at`, CODE_PREFETCH bytes ahead: the blocks a thread reads follow one another in memory. */
static inline void prefetch_codes(const uint8_t *at, long bytes) {
    for (long line = 0; line < bytes; line += 64) _mm_prefetch((const char *)at + CODE_PREFETCH + line, _MM_HINT_T0);
}

/* One tile's 16 features' scale and offset for one group of inputs, feature f in lane f: w = scale * q + offset
 * (the format's zero folded into the offset). */
static inline void group_params(const qformat *f, const uint16_t *d, const uint16_t *dmin, const int8_t *sc,
                                const int8_t *mn, __m512 *scale_out, __m512 *offset_out) {
    __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)d));
    __m512 offset = dmin ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)dmin)) : _mm512_setzero_ps();
    if (f->sub_scales) {
        scale = _mm512_mul_ps(scale, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)sc))));
        if (dmin)
            offset = _mm512_mul_ps(offset, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)mn))));
    }
    *scale_out = scale;
    *offset_out = _mm512_fnmadd_ps(scale, _mm512_set1_ps((float)f->zero), offset);
}

/* The same, laid out as a tile row's two halves use them: half h holds features 8h..8h+7, each twice (its two
 * inputs). */
static inline void group_scales(const qformat *f, const uint16_t *d, const uint16_t *dmin, const int8_t *sc,
                                const int8_t *mn, __m512 *s0, __m512 *s1, __m512 *o0, __m512 *o1) {
    __m512 scale, offset;
    group_params(f, d, dmin, sc, mn, &scale, &offset);
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

/* Steps [s0, s1) of block b of W as bf16 tiles into wb ([s1 - s0][1024]). */
static void expand_steps(const qformat *f, long b, long steps, long s0, long s1, const uint8_t *quants,
                         const uint16_t *d, const uint16_t *dmin, const int8_t *sc, const int8_t *mn, uint16_t *wb) {
    const long row_bytes = 4 * f->bits, groups_per_step = 32 / f->group, groups = steps * groups_per_step;
    const long scale_groups = f->sub_scales ? (steps * 32 + 255) / 256 : groups; /* the last super-block may be partial */
    for (long s = s0; s < s1; s++) {
        const uint8_t *q = quants + (b * steps + s) * 32 * row_bytes;
        prefetch_codes(q, 32 * row_bytes);
        for (int t = 0; t < 2; t++)
            for (long g = 0; g < groups_per_step; g++) {
                long gi = s * groups_per_step + g, di = f->sub_scales ? s * 32 / 256 : gi;
                long at = (b * scale_groups + di) * 32 + t * 16, sub = (b * groups + gi) * 32 + t * 16;
                __m512 sc0, sc1, o0, o1;
                group_scales(f, d + at, dmin ? dmin + at : 0, sc ? sc + sub : 0, mn ? mn + sub : 0,
                             &sc0, &sc1, &o0, &o1);
                int rows = 16 / groups_per_step; /* a row holds two inputs: a group of 16 spans 8 rows */
                for (int r = g * rows; r < (g + 1) * rows; r++)
                    decode_row(f->bits, q + (t * 16 + r) * row_bytes, sc0, sc1, o0, o1,
                               wb + (s - s0) * 1024 + t * 512 + r * 32);
            }
    }
}

#define EXPAND_STEPS 8 /* steps of a block expanded at a time: 16 KB of tiles, which stay in L1 */

/* Each thread's expanded steps ([EXPAND_STEPS][1024] bf16), and the accumulators of a pass's rows beyond the
 * tiles' 32 ([ROW_CHUNK][32] fp32). */
static __thread uint16_t tile_buf[EXPAND_STEPS * 1024] __attribute__((aligned(64)));
static __thread float row_acc[ROW_CHUNK * 32] __attribute__((aligned(64)));

/* ---- few rows: int16 dot products ---------------------------------------------------------------------------- */

#define GEMV_ROWS 4 /* rows of x per pass over a block's weights, its accumulators in registers */

/* A tile row's 32 values as int16 in value order: features 0-15, each its two inputs. */
static inline __m512i decode_row16(int bits, const uint8_t *row) {
    if (bits == 8)
        return _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)row));
    __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)row));
    __m256i lo = _mm256_and_si256(v, _mm256_set1_epi16(0x0F)), hi = _mm256_srli_epi16(v, 4);
    __m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
    if (bits == 6) { /* value i + 8j has its top two bits in byte i of the row's last 8, at bit 2j */
        static const int16_t shifts[32] __attribute__((aligned(64))) = {
            0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2, 4, 4, 4, 4, 4, 4, 4, 4, 6, 6, 6, 6, 6, 6, 6, 6};
        long long top;
        memcpy(&top, row + 16, sizeof top);
        __m512i h = _mm512_cvtepu8_epi16(_mm256_set1_epi64x(top)); /* lane j: byte j % 8 */
        h = _mm512_and_si512(_mm512_srlv_epi16(h, _mm512_load_si512(shifts)), _mm512_set1_epi16(3));
        w = _mm512_or_si512(w, _mm512_slli_epi16(h, 4));
    }
    return w;
}

/* Each row of x as int16 per step of 32 inputs (xq: [m, k]), the step's scale (xs: [m, steps]) and the sums of
 * its two halves of 16 (xsum: [m, steps, 2]). */
static void quantize_rows(const float *x, long m, long k, long x_row, int16_t *xq, float *xs, int32_t *xsum) {
    const long steps = k / 32;
    for (long r = 0; r < m; r++)
        for (long s = 0; s < steps; s++) {
            const float *src = x + r * x_row + s * 32;
            __m512 v0 = _mm512_loadu_ps(src), v1 = _mm512_loadu_ps(src + 16);
            float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
            __m512 inv = _mm512_set1_ps(amax > 0.0f ? 32767.0f / amax : 0.0f);
            __m512i i0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, inv)), i1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, inv));
            _mm256_storeu_si256((__m256i *)(xq + r * k + s * 32), _mm512_cvtsepi32_epi16(i0));
            _mm256_storeu_si256((__m256i *)(xq + r * k + s * 32 + 16), _mm512_cvtsepi32_epi16(i1));
            xs[r * steps + s] = amax / 32767.0f;
            xsum[(r * steps + s) * 2] = _mm512_reduce_add_epi32(i0);
            xsum[(r * steps + s) * 2 + 1] = _mm512_reduce_add_epi32(i1);
        }
}

/* Rows [r0, r0 + rows) of x (rows <= GEMV_ROWS, a constant where inlined) against block b of W, into y. */
static inline __attribute__((always_inline)) void gemv_rows(
        const qformat *f, long b, long steps, long k, const uint8_t *quants, const uint16_t *d, const uint16_t *dmin,
        const int8_t *sc, const int8_t *mn, const int16_t *xq, const float *xs, const int32_t *xsum, long r0,
        const int rows, float *y, long n, const float *bias) {
    const long row_bytes = 4 * f->bits, groups_per_step = 32 / f->group, groups = steps * groups_per_step;
    const long scale_groups = f->sub_scales ? (steps * 32 + 255) / 256 : groups;
    const int rows_per_group = 16 / groups_per_step;
    __m512 acc[2][GEMV_ROWS];
    for (int t = 0; t < 2; t++)
        for (int i = 0; i < rows; i++) acc[t][i] = _mm512_setzero_ps();
    for (long s = 0; s < steps; s++) {
        prefetch_codes(quants + (b * steps + s) * 32 * row_bytes, 32 * row_bytes);
        for (int t = 0; t < 2; t++) {
            const uint8_t *q = quants + ((b * steps + s) * 32 + t * 16) * row_bytes;
            for (long g = 0; g < groups_per_step; g++) {
                long gi = s * groups_per_step + g, di = f->sub_scales ? s * 32 / 256 : gi;
                long at = (b * scale_groups + di) * 32 + t * 16, sub = (b * groups + gi) * 32 + t * 16;
                __m512i dot[GEMV_ROWS];
                for (int i = 0; i < rows; i++) dot[i] = _mm512_setzero_si512();
                for (int r = g * rows_per_group; r < (g + 1) * rows_per_group; r++) {
                    __m512i w = decode_row16(f->bits, q + r * row_bytes);
                    for (int i = 0; i < rows; i++) { /* inputs 2r and 2r + 1 of the step, as one int32 */
                        int32_t pair;
                        memcpy(&pair, xq + (r0 + i) * k + s * 32 + 2 * r, sizeof pair);
                        dot[i] = _mm512_dpwssd_epi32(dot[i], w, _mm512_set1_epi32(pair));
                    }
                }
                __m512 scale, offset;
                group_params(f, d + at, dmin ? dmin + at : 0, sc ? sc + sub : 0, mn ? mn + sub : 0, &scale, &offset);
                for (int i = 0; i < rows; i++) {
                    const int32_t *sums = xsum + ((r0 + i) * steps + s) * 2;
                    float sum = groups_per_step == 1 ? (float)(sums[0] + sums[1]) : (float)sums[g];
                    __m512 part = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[i]), scale,
                                                  _mm512_mul_ps(offset, _mm512_set1_ps(sum)));
                    acc[t][i] = _mm512_fmadd_ps(part, _mm512_set1_ps(xs[(r0 + i) * steps + s]), acc[t][i]);
                }
            }
        }
    }
    for (int t = 0; t < 2; t++) {
        long f0 = b * 32 + t * 16, cols = n - f0 < 16 ? n - f0 : 16;
        if (cols <= 0) continue;
        __mmask16 mask = cols == 16 ? 0xFFFF : (__mmask16)((1u << cols) - 1);
        __m512 add = bias ? _mm512_maskz_loadu_ps(mask, bias + f0) : _mm512_setzero_ps();
        for (int i = 0; i < rows; i++)
            _mm512_mask_storeu_ps(y + (r0 + i) * n + f0, mask, _mm512_add_ps(acc[t][i], add));
    }
}

static void gemv_block(const qformat *f, long b, long steps, long k, const uint8_t *quants, const uint16_t *d,
                       const uint16_t *dmin, const int8_t *sc, const int8_t *mn, const int16_t *xq, const float *xs,
                       const int32_t *xsum, long m, float *y, long n, const float *bias) {
    for (long r0 = 0; r0 < m; r0 += GEMV_ROWS) {
        switch (m - r0 < GEMV_ROWS ? m - r0 : GEMV_ROWS) {
        case 1: gemv_rows(f, b, steps, k, quants, d, dmin, sc, mn, xq, xs, xsum, r0, 1, y, n, bias); break;
        case 2: gemv_rows(f, b, steps, k, quants, d, dmin, sc, mn, xq, xs, xsum, r0, 2, y, n, bias); break;
        case 3: gemv_rows(f, b, steps, k, quants, d, dmin, sc, mn, xq, xs, xsum, r0, 3, y, n, bias); break;
        default: gemv_rows(f, b, steps, k, quants, d, dmin, sc, mn, xq, xs, xsum, r0, GEMV_ROWS, y, n, bias);
        }
    }
}

/* A quantized weight as engine.kernels.quant_gemm describes it once: the packed tensors (dmin, sc, mn NULL where
 * the format has none), the bias (or NULL) and the shape. */
typedef struct {
    const uint8_t *quants;
    const uint16_t *d, *dmin;
    const int8_t *sc, *mn;
    const float *bias;
    long n, k;
    int bits, group, zero, sub_scales;
} qweight;

/* ---- rows of W (embedding lookups from a quantized table) ----------------------------------------------------- */

/* Row f of W decoded to fp32 into out [k] exactly as engine.model.quantized.dequantize computes it: (q - zero) *
 * scale, plus the offset, each rounded in turn. */
static void decode_feature(const qweight *w, long f, float *out) {
    const long k = w->k, steps = k / 32, row_bytes = 4 * w->bits, groups = k / w->group;
    const long scale_groups = w->sub_scales ? (k + 255) / 256 : groups;
    const long b = f / 32, fb = f % 32, t = fb / 16, lane = fb % 16;
    for (long s = 0; s < steps; s++) {
        const uint8_t *tile = w->quants + ((b * steps + s) * 32 + t * 16) * row_bytes;
        for (long r = 0; r < 16; r++) { /* row r: inputs 2r and 2r + 1 of the step, value 2 * lane + j of each */
            const uint8_t *row = tile + r * row_bytes;
            for (long j = 0; j < 2; j++) {
                long e = 2 * lane + j, in = s * 32 + 2 * r + j, g = in / w->group;
                int q;
                if (w->bits == 8) {
                    q = row[e];
                } else {
                    q = e < 16 ? row[e] & 0x0F : row[e - 16] >> 4;
                    if (w->bits == 6) q |= ((row[16 + e % 8] >> (2 * (e / 8))) & 3) << 4;
                }
                long di = w->sub_scales ? in / 256 : g;
                float scale = _cvtsh_ss(w->d[(b * scale_groups + di) * 32 + fb]);
                float offset = w->dmin ? _cvtsh_ss(w->dmin[(b * scale_groups + di) * 32 + fb]) : 0.0f;
                if (w->sub_scales) {
                    scale = scale * (float)w->sc[(b * groups + g) * 32 + fb];
                    if (w->dmin) offset = offset * (float)w->mn[(b * groups + g) * 32 + fb];
                }
                float v = ((float)q - (float)w->zero) * scale;
                __asm__("" : "+x"(v)); /* the product rounded on its own, not fused with the sum, as torch rounds it */
                out[in] = w->dmin ? v + offset : v;
            }
        }
    }
}

/* Rows rows[0..count) of W (each in range: the caller checks) into out [count, k]. */
void quant_rows(const qweight *w, const int64_t *rows, long count, float *out, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (count * w->k >= 1L << 16)
    for (long i = 0; i < count; i++) decode_feature(w, rows[i], out + i * w->k);
}

/* The dot products' scratch for x (int16 values, scales, sums): per calling thread, grown to the largest m x k. */
static __thread char *dot_scratch;
static __thread long dot_scratch_bytes;

/* x: [m, k] fp32, rows x_row floats apart, k a multiple of 32. Up to dot_rows rows take the dot products; above,
 * a: scratch for x in bf16, [m rounded up to 16][k] (in round_rows' tile order). y: [m, n]. */
void quant_linear(const float *x, long m, long x_row, const qweight *w, uint16_t *a, float *y, int threads,
                  long dot_rows) {
    qformat f = {w->bits, w->group, w->zero, w->sub_scales};
    const long k = w->k, n = w->n, steps = k / 32, mp = (m + 15) / 16 * 16, blocks = (n + 31) / 32;
    const uint8_t *quants = w->quants;
    const uint16_t *d = w->d, *dmin = w->dmin;
    const int8_t *sc = w->sc, *mn = w->mn;
    const float *bias = w->bias;
    if (m <= dot_rows) {
        long bytes = m * k * (long)sizeof(int16_t) + m * steps * (long)sizeof(float) + m * (k / 16) * (long)sizeof(int32_t);
        if (bytes > dot_scratch_bytes) {
            char *grown = realloc(dot_scratch, bytes);
            if (!grown) abort();
            dot_scratch = grown;
            dot_scratch_bytes = bytes;
        }
        int16_t *xq = (int16_t *)dot_scratch;
        float *xs = (float *)(dot_scratch + m * k * sizeof(int16_t));
        int32_t *xsum = (int32_t *)(xs + m * steps);
        quantize_rows(x, m, k, x_row, xq, xs, xsum);
#pragma omp parallel for num_threads(threads) schedule(static)
        for (long b = 0; b < blocks; b++)
            gemv_block(&f, b, steps, k, quants, d, dmin, sc, mn, xq, xs, xsum, m, y, n, bias);
        return;
    }
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (long r = 0; r < mp; r += 16) round_rows(x, m, k, x_row, steps, r, a);
        configure_tiles();
        if (mp <= 32) { /* one pass over the rows: each step's tiles are multiplied as soon as expanded, from L1 */
#pragma omp for schedule(static)
            for (long b = 0; b < blocks; b++) {
                int two = mp > 16;
                zero_accumulators();
                for (long s = 0; s < steps; s++) {
                    expand_steps(&f, b, steps, s, s + 1, quants, d, dmin, sc, mn, tile_buf);
                    tile_step(tile_buf, x_tile(a, steps, 0, s), x_tile(a, steps, 16, s), two);
                }
                long cols = n - b * 32 < 32 ? n - b * 32 : 32;
                store_block(y, n, 0, m, b * 32, cols, two, bias);
            }
        }
        for (long m0 = 0; mp > 32 && m0 < mp; m0 += ROW_CHUNK) {
            long m1 = m0 + ROW_CHUNK < mp ? m0 + ROW_CHUNK : mp;
#pragma omp for schedule(static)
            for (long b = 0; b < blocks; b++) {
                /* A few steps at a time, expanded into L1 and multiplied against every row; the accumulators of
                 * rows beyond the tiles' 32 wait in row_acc between them. */
                for (long c0 = 0; c0 < steps; c0 += EXPAND_STEPS) {
                    long c1 = c0 + EXPAND_STEPS < steps ? c0 + EXPAND_STEPS : steps;
                    expand_steps(&f, b, steps, c0, c1, quants, d, dmin, sc, mn, tile_buf);
                    for (long mb = m0; mb < m1; mb += 32) {
                        int two = mb + 16 < m1;
                        float *at = row_acc + (mb - m0) * 32;
                        if (c0 == 0) {
                            zero_accumulators();
                        } else {
                            _tile_loadd(0, at, 128);
                            _tile_loadd(1, at + 16, 128);
                            if (two) {
                                _tile_loadd(2, at + 16 * 32, 128);
                                _tile_loadd(3, at + 16 * 32 + 16, 128);
                            }
                        }
                        for (long s = c0; s < c1; s++)
                            tile_step(tile_buf + (s - c0) * 1024, x_tile(a, steps, mb, s), x_tile(a, steps, mb + 16, s),
                                      two);
                        _tile_stored(0, at, 128);
                        _tile_stored(1, at + 16, 128);
                        if (two) {
                            _tile_stored(2, at + 16 * 32, 128);
                            _tile_stored(3, at + 16 * 32 + 16, 128);
                        }
                    }
                }
                long f0 = b * 32, cols = n - f0 < 32 ? n - f0 : 32;
                for (long r = m0; r < m1 && r < m; r++)
                    for (long c = 0; c < cols; c += 16) {
                        __mmask16 mask = cols - c >= 16 ? 0xFFFF : (__mmask16)((1u << (cols - c)) - 1);
                        __m512 v = _mm512_loadu_ps(row_acc + (r - m0) * 32 + c);
                        if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, bias + f0 + c));
                        _mm512_mask_storeu_ps(y + r * n + f0 + c, mask, v);
                    }
            }
        }
        _tile_release();
    }
}
