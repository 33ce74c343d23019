/* Decode attention straight from the paged KV cache, fp32, for x86-64 CPUs with AVX2 and FMA.
 *
 * One query token per sequence attends to its context, whose keys and values sit in blocks
 * of the cache named by the sequence's block table. Each (sequence, KV head) pair reads its
 * keys and values once, for all the query heads that share them (GQA), straight from the
 * blocks: no gathered copy of the context is written and read back. The softmax is taken
 * over the whole context at once (maximum subtracted, exponentials vectorised), then one
 * pass over the values.
 * Pairs are shared among OpenMP threads.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "vec_math.h"

static float dot(const float *a, const float *b, long d) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();  /* two chains: FMA latency, not throughput */
    long i = 0;
    for (; i + 16 <= d; i += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), a1);
    }
    for (; i + 8 <= d; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), a0);
    float s = hsum(_mm256_add_ps(a0, a1));
    for (; i < d; i++) s += a[i] * b[i];
    return s;
}

/* The sums of eight vectors, as one vector. */
static inline __m256 hsum8(const __m256 *v) {
    __m256 ab = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
    __m256 cd = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(ab, cd, 0x20), _mm256_permute2f128_ps(ab, cd, 0x31));
}

/* sc[0..len) <- softmax(sc) */
static void softmax(float *sc, long len) {
    float m = -INFINITY, sum = 0.f;
    for (long t = 0; t < len; t++) m = (sc[t] > m || sc[t] != sc[t]) ? sc[t] : m;  /* a NaN wins, as in SDPA */
    __m256 mv = _mm256_set1_ps(m), acc = _mm256_setzero_ps();
    long t = 0;
    for (; t + 8 <= len; t += 8) {
        __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(sc + t), mv));
        _mm256_storeu_ps(sc + t, e);
        acc = _mm256_add_ps(acc, e);
    }
    sum = hsum(acc);
    for (; t < len; t++) sum += (sc[t] = expf(sc[t] - m));
    float inv = 1.f / sum;
    for (t = 0; t < len; t++) sc[t] *= inv;
}

static void axpy(float *y, float a, const float *x, long d) {
    __m256 av = _mm256_set1_ps(a);
    long i = 0;
    for (; i + 8 <= d; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < d; i++) y[i] += a * x[i];
}

/* o[0..d) <- sum over t of p[t] * v_t, d a multiple of 8 up to 128; inlined with a constant d, the sums
 * stay in registers. */
static inline __attribute__((always_inline)) void weighted_values(float *o, const float *p, long len,
                                                                  const float *v_cache, const int64_t *table,
                                                                  long block_size, long block, long row, long off,
                                                                  long d) {
    __m256 acc[16];
    for (long i = 0; i < d / 8; i++) acc[i] = _mm256_setzero_ps();
    for (long t = 0; t < len; t++) {
        const float *v = v_cache + table[t / block_size] * block + (t % block_size) * row + off;
        __m256 pt = _mm256_set1_ps(p[t]);
        for (long i = 0; i < d / 8; i++) acc[i] = _mm256_fmadd_ps(pt, _mm256_loadu_ps(v + 8 * i), acc[i]);
    }
    for (long i = 0; i < d / 8; i++) _mm256_storeu_ps(o + 8 * i, acc[i]);
}

/* q: [n, heads, d], q_row floats from one sequence's queries to the next (a view of the step's fused qkv rows
 * needs no copy); caches: [blocks, block_size, kv_heads, d]; tables: [n, max_blocks]; lens: [n];
 * out: [n, heads, d]. Returns 0, or -1 when a thread could not allocate its score buffer. */
int paged_decode_attention(const float *q, long q_row, const float *k_cache, const float *v_cache,
                            const int64_t *tables, const int64_t *lens, long n, long heads, long kv_heads, long d,
                            long block_size, long max_blocks, float scale, float *out, int threads) {
    long group = heads / kv_heads, max_len = 0;
    for (long s = 0; s < n; s++) max_len = lens[s] > max_len ? lens[s] : max_len;
    long row = kv_heads * d, block = block_size * row;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *scores = malloc(sizeof(float) * (group * max_len + 1));
        if (!scores) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic)
        for (long pair = 0; pair < n * kv_heads; pair++) {
            if (!scores) continue;
            long s = pair / kv_heads, h = pair % kv_heads, len = lens[s];
            const int64_t *table = tables + s * max_blocks;
            const float *qs = q + s * q_row + h * group * d;
            float *os = out + (s * heads + h * group) * d;
            long t = 0;
            if (d % 8 == 0) {  /* eight keys at a time, their dot products reduced together */
                __m256 sv = _mm256_set1_ps(scale);
                for (; t + 8 <= len; t += 8) {
                    const float *k[8];
                    for (int j = 0; j < 8; j++)
                        k[j] = k_cache + table[(t + j) / block_size] * block + ((t + j) % block_size) * row + h * d;
                    for (long g = 0; g < group; g++) {
                        const float *qg = qs + g * d;
                        __m256 acc[8];
                        for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
                        for (long i = 0; i < d; i += 8) {
                            __m256 qv = _mm256_loadu_ps(qg + i);
                            for (int j = 0; j < 8; j++) acc[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[j] + i), acc[j]);
                        }
                        _mm256_storeu_ps(scores + g * len + t, _mm256_mul_ps(sv, hsum8(acc)));
                    }
                }
            }
            for (; t < len; t++) {
                const float *k = k_cache + table[t / block_size] * block + (t % block_size) * row + h * d;
                for (long g = 0; g < group; g++) scores[g * len + t] = scale * dot(qs + g * d, k, d);
            }
            for (long g = 0; g < group; g++) softmax(scores + g * len, len);
            if (d % 8 == 0 && d <= 128) {
                for (long g = 0; g < group; g++) {
                    float *o = os + g * d, *pg = scores + g * len;
                    if (d == 64) weighted_values(o, pg, len, v_cache, table, block_size, block, row, h * d, 64);
                    else if (d == 128) weighted_values(o, pg, len, v_cache, table, block_size, block, row, h * d, 128);
                    else weighted_values(o, pg, len, v_cache, table, block_size, block, row, h * d, d);
                }
            } else {
                for (long i = 0; i < group * d; i++) os[i] = 0.f;
                for (long t = 0; t < len; t++) {
                    const float *v = v_cache + table[t / block_size] * block + (t % block_size) * row + h * d;
                    for (long g = 0; g < group; g++) axpy(os + g * d, scores[g * len + t], v, d);
                }
            }
        }
        free(scores);
    }
    return failed ? -1 : 0;
}
