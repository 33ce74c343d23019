/* y[M, N] = x[M, K] @ W^T (+ bias), x and y fp32, W bf16 or fp16, for x86-64 CPUs with AVX2, FMA and F16C.
 *
 * W arrives packed in blocks of 16 output features, [ceil(N/16)][K][16] (see half_gemm.py), so that one
 * 32-byte load holds the 16 features of one input column. A 6x16 tile of y lives in twelve registers while
 * k runs; the half-precision weights become fp32 in registers, so they cross memory at half size and no fp32
 * copy of them is ever written. A block's weights (K x 16, 18 KiB at K = 576) stay in L1/L2 while every
 * 6-row tile of x passes over them, and while those tiles run they fetch the next block into L2, a share
 * each, so no tile waits on memory: the cost per row barely depends on M, and a product of 32 rows costs
 * half one of 64, where a BLAS that packs its weights on every call does not. Blocks are shared among
 * OpenMP threads.
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

/* Sixteen weights of one input column as two fp32 vectors: features 0-7 and 8-15 of the block. bf16 blocks are
 * packed interleaved (0, 8, 1, 9, ..., 7, 15), so one 32-byte load and two integer ops widen all sixteen: a
 * bf16 is the high half of an fp32, and each 32-bit lane holds feature j low and feature 8 + j high. */
static inline void load16(const uint16_t *p, int fp16, __m256 *lo, __m256 *hi) {
    if (fp16) {
        *lo = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
        *hi = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 8)));
    } else {
        __m256i v = _mm256_loadu_si256((const __m256i *)p);
        *lo = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
        *hi = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xFFFF0000u)));
    }
}

/* The share of the next block a tile fetches: lines [line, end) of it, one every `every` values of k. */
typedef struct {
    const char *base;
    long line, end, every;
} Prefetch;

static inline Prefetch share(const char *next, long tile, long per_tile, long lines, long every) {
    Prefetch pf = {next, tile * per_tile, (tile + 1) * per_tile < lines ? (tile + 1) * per_tile : lines, every};
    if (!next) pf.end = 0;
    return pf;
}

#define TILE(MT)                                                                                               \
    static void tile##MT(const float *x, long K, const uint16_t *w, float *y, long ldy, const float *bias,     \
                         int fp16, long ncols, Prefetch pf) {                                                 \
        __m256 a0[MT], a1[MT];                                                                                \
        for (int i = 0; i < MT; i++) a0[i] = a1[i] = _mm256_setzero_ps();                                     \
        long countdown = pf.every;                                                                            \
        for (long k = 0; k < K; k++) {                                                                        \
            if (--countdown == 0) {                                                                           \
                countdown = pf.every;                                                                         \
                if (pf.line < pf.end) {                                                                       \
                    _mm_prefetch(pf.base + 64 * pf.line, _MM_HINT_T1);                                        \
                    pf.line++;                                                                                \
                }                                                                                             \
            }                                                                                                 \
            __m256 w0, w1;                                                                                    \
            load16(w + k * 16, fp16, &w0, &w1);                                                               \
            for (int i = 0; i < MT; i++) {                                                                    \
                __m256 b = _mm256_broadcast_ss(x + i * K + k);                                                \
                a0[i] = _mm256_fmadd_ps(b, w0, a0[i]);                                                        \
                a1[i] = _mm256_fmadd_ps(b, w1, a1[i]);                                                        \
            }                                                                                                 \
        }                                                                                                     \
        if (bias) {                                                                                           \
            __m256 b0 = _mm256_loadu_ps(bias), b1 = _mm256_loadu_ps(bias + 8);                                \
            for (int i = 0; i < MT; i++) {                                                                    \
                a0[i] = _mm256_add_ps(a0[i], b0);                                                             \
                a1[i] = _mm256_add_ps(a1[i], b1);                                                             \
            }                                                                                                 \
        }                                                                                                     \
        for (int i = 0; i < MT; i++) {                                                                        \
            if (ncols == 16) {                                                                                \
                _mm256_storeu_ps(y + i * ldy, a0[i]);                                                         \
                _mm256_storeu_ps(y + i * ldy + 8, a1[i]);                                                     \
            } else {                                                                                          \
                float t[16];                                                                                  \
                _mm256_storeu_ps(t, a0[i]);                                                                   \
                _mm256_storeu_ps(t + 8, a1[i]);                                                               \
                memcpy(y + i * ldy, t, ncols * sizeof(float));                                                \
            }                                                                                                 \
        }                                                                                                     \
    }
TILE(1) TILE(2) TILE(3) TILE(4) TILE(5) TILE(6)

void half_gemm(const float *x, long M, long K, const uint16_t *w_packed, long N, const float *bias, float *y,
               int fp16, int threads) {
    if (M <= 0) return;
    long blocks = (N + 15) / 16;
    /* As few tiles as six rows each allow, their rows shared out evenly (32 rows: 6, 6, 5, 5, 5, 5). A tile's
     * k loop costs about max(rows, 4) cycles: FMA throughput from four rows up, FMA latency below, as too few
     * accumulators are in flight. So 6 + 2 rows take ten cycles where 4 + 4 take eight. */
    long tiles = (M + 5) / 6, base = M / tiles, extra = M % tiles;
    long lines = (K * 16 * 2 + 63) / 64;          /* cache lines of one packed block */
    long per_tile = (lines + tiles - 1) / tiles;  /* lines of the next block each tile fetches */
    long every = per_tile > 0 && K / per_tile > 0 ? K / per_tile : 1;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long nb = 0; nb < blocks; nb++) {
        const uint16_t *w = w_packed + nb * K * 16;
        const char *next = nb + 1 < blocks ? (const char *)(w + K * 16) : NULL;
        long n0 = nb * 16, ncols = N - n0 < 16 ? N - n0 : 16;
        const float *bb = bias ? bias + n0 : NULL;
        float padded[16];
        if (bb && ncols < 16) {
            memset(padded, 0, sizeof padded);
            memcpy(padded, bb, ncols * sizeof(float));
            bb = padded;
        }
        for (long t = 0; t < tiles; t++) {
            long m = t * base + (t < extra ? t : extra), rows = base + (t < extra);
            const float *xm = x + m * K;
            float *ym = y + m * N + n0;
            Prefetch pf = share(next, t, per_tile, lines, every);
            switch (rows) {
                case 1: tile1(xm, K, w, ym, N, bb, fp16, ncols, pf); break;
                case 2: tile2(xm, K, w, ym, N, bb, fp16, ncols, pf); break;
                case 3: tile3(xm, K, w, ym, N, bb, fp16, ncols, pf); break;
                case 4: tile4(xm, K, w, ym, N, bb, fp16, ncols, pf); break;
                case 5: tile5(xm, K, w, ym, N, bb, fp16, ncols, pf); break;
                default: tile6(xm, K, w, ym, N, bb, fp16, ncols, pf); break;
            }
        }
    }
}
