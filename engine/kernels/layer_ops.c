/* The elementwise work of a decoder layer, fp32, for x86-64 CPUs with AVX2 and FMA.
 *
 * Between its matrix products a layer adds residuals, normalises, rotates q and k, writes the
 * new keys and values into the paged cache and gates its MLP. In torch that is some thirty
 * small kernels per layer, each a pass over memory and a few microseconds of dispatch: at a
 * pipeline stage's micro-batch of 32 decodes, more time than the work itself. Here each is
 * one call and one pass. The KV cache it writes holds fp32, or bf16 rounded as torch rounds. Built with -ffp-contract=off, so that a product and a sum round
 * separately, as torch's kernels round them: rotation and gating give torch's own bits.
 * Rows are shared among OpenMP threads when there are enough of them.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "vec_math.h"

/* Below this many elements a call stays on one thread: waking the others costs more. */
#define PARALLEL_ELEMS (1L << 13)

/* x[D] += delta (when given); returns the sum of the squares of x. */
static inline float add_sum_squares(float *xr, const float *dr, long D) {
    __m256 acc = _mm256_setzero_ps();
    long i = 0;
    for (; i + 8 <= D; i += 8) {
        __m256 v = _mm256_loadu_ps(xr + i);
        if (dr) {
            v = _mm256_add_ps(v, _mm256_loadu_ps(dr + i));
            _mm256_storeu_ps(xr + i, v);
        }
        acc = _mm256_add_ps(acc, _mm256_mul_ps(v, v));
    }
    float ss = hsum(acc);
    for (; i < D; i++) {
        if (dr) xr[i] += dr[i];
        ss += xr[i] * xr[i];
    }
    return ss;
}

/* h[D] = w * (x * 1 / sqrt(ss / D + eps)); h may be x. */
static inline void scale_row(const float *xr, const float *w, float *hr, float ss, long D, float eps) {
    float r = 1.0f / sqrtf(ss / (float)D + eps);
    __m256 rv = _mm256_set1_ps(r);
    long i = 0;
    for (; i + 8 <= D; i += 8)
        _mm256_storeu_ps(hr + i, _mm256_mul_ps(_mm256_loadu_ps(w + i), _mm256_mul_ps(_mm256_loadu_ps(xr + i), rv)));
    for (; i < D; i++) hr[i] = w[i] * (xr[i] * r);
}

/* x[T, D] += delta (when given), then h = w * (x * 1 / sqrt(mean(x^2) + eps)), row by row. */
void add_rms_norm(float *x, const float *delta, const float *w, float *h, long T, long D, float eps, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (T * D >= PARALLEL_ELEMS)
    for (long t = 0; t < T; t++) {
        float *xr = x + t * D;
        float ss = add_sum_squares(xr, delta ? delta + t * D : NULL, D);
        scale_row(xr, w, h + t * D, ss, D, eps);
    }
}

/* qkv[T, (heads + 2 kv_heads) d]: each query head normalised by qw[d] and each key head by kw[d], in place (Qwen3's
 * norms before the rotary embedding); the values are left as they are. */
void head_rms_norm(float *qkv, long T, long heads, long kv_heads, long d, const float *qw, const float *kw,
                   float eps, int threads) {
    long width = (heads + 2 * kv_heads) * d;
#pragma omp parallel for schedule(static) num_threads(threads) if (T * width >= PARALLEL_ELEMS)
    for (long t = 0; t < T; t++)
        for (long j = 0; j < heads + kv_heads; j++) {
            float *x = qkv + t * width + j * d;
            scale_row(x, j < heads ? qw : kw, x, add_sum_squares(x, NULL, d), d, eps);
        }
}

/* One head of d values rotated in place (rotate-half layout): x * cos + rotate_half(x) * sin. */
static inline void rotate(float *x, const float *cos, const float *sin, long d) {
    long half = d / 2, i = 0;
    for (; i + 8 <= half; i += 8) {
        __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + half + i);
        __m256 lo = _mm256_add_ps(_mm256_mul_ps(a, _mm256_loadu_ps(cos + i)),
                                  _mm256_mul_ps(_mm256_sub_ps(_mm256_setzero_ps(), b), _mm256_loadu_ps(sin + i)));
        __m256 hi = _mm256_add_ps(_mm256_mul_ps(b, _mm256_loadu_ps(cos + half + i)),
                                  _mm256_mul_ps(a, _mm256_loadu_ps(sin + half + i)));
        _mm256_storeu_ps(x + i, lo);
        _mm256_storeu_ps(x + half + i, hi);
    }
    for (; i < half; i++) {
        float a = x[i], b = x[half + i];
        x[i] = a * cos[i] + (-b) * sin[i];
        x[half + i] = b * cos[half + i] + a * sin[half + i];
    }
}

/* fp32 -> bf16, rounded to nearest even; a NaN stays a (quiet) NaN. torch rounds the same way. */
static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* to_bf16 on eight values at once, the same bits. */
static inline __m128i to_bf16_8(__m256 f) {
    __m256i u = _mm256_castps_si256(f);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), odd), 16);
    __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7FFFFFFF)), _mm256_set1_epi32(0x7F800000));
    rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
    /* the low halves of the eight lanes, in order (packus works within 128-bit halves) */
    __m256i packed = _mm256_packus_epi32(rounded, rounded);
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, _MM_SHUFFLE(3, 1, 2, 0)));
}

static inline void store_kv(void *cache, long slot, const float *x, long n, int bf16) {
    if (!bf16) {
        memcpy((float *)cache + slot * n, x, n * sizeof(float));
        return;
    }
    uint16_t *dst = (uint16_t *)cache + slot * n;
    long i = 0;
    for (; i + 8 <= n; i += 8) _mm_storeu_si128((__m128i *)(dst + i), to_bf16_8(_mm256_loadu_ps(x + i)));
    for (; i < n; i++) dst[i] = to_bf16(x[i]);
}

/* qkv: [T, (heads + 2 kv_heads) d], each row q | k | v. Rotates q and k in place by each token's position
 * (table: [positions, 2, d], cos then sin), then copies k and v into the caches' slots: caches are
 * [slots, kv_heads, d], fp32 or (kv_bf16) bf16, token t's at slot slots[t]. */
void rotary_into_cache(float *qkv, long T, long heads, long kv_heads, long d, const int64_t *positions,
                       const float *table, const int64_t *slots, void *k_cache, void *v_cache, int kv_bf16,
                       int threads) {
    long row = (heads + 2 * kv_heads) * d, kv_row = kv_heads * d;
#pragma omp parallel for schedule(static) num_threads(threads) if (T * row >= PARALLEL_ELEMS)
    for (long t = 0; t < T; t++) {
        float *x = qkv + t * row;
        const float *cos = table + positions[t] * 2 * d, *sin = cos + d;
        for (long h = 0; h < heads + kv_heads; h++) rotate(x + h * d, cos, sin, d);
        store_kv(k_cache, slots[t], x + heads * d, kv_row, kv_bf16);
        store_kv(v_cache, slots[t], x + (heads + kv_heads) * d, kv_row, kv_bf16);
    }
}

/* out[T, I] = silu(gate) * up, where gate_up rows are gate | up (I each) and silu(g) = g / (1 + e^-g). */
void silu_mul(const float *gate_up, float *out, long T, long I, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (T * I >= PARALLEL_ELEMS)
    for (long t = 0; t < T; t++) {
        const float *g = gate_up + t * 2 * I, *u = g + I;
        float *o = out + t * I;
        const __m256 one = _mm256_set1_ps(1.0f);
        long i = 0;
        for (; i + 8 <= I; i += 8) {
            __m256 gv = _mm256_loadu_ps(g + i);
            __m256 s = _mm256_div_ps(gv, _mm256_add_ps(one, exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), gv))));
            _mm256_storeu_ps(o + i, _mm256_mul_ps(s, _mm256_loadu_ps(u + i)));
        }
        for (; i < I; i++) o[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
}
