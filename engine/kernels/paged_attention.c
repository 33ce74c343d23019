/* Decode attention straight from the paged KV cache, fp32, for x86-64 CPUs with AVX2 and FMA.
 *
 * One query token per sequence attends to its context, whose keys and values sit in blocks
 * of the cache named by the sequence's block table. A sequence is read block by block, each
 * block's keys (then values) for all its KV heads at once: a block's rows lie next to each
 * other in memory, so the read streams, where reading one head at a time would take a
 * strided third of each row and leave the rest for later passes. Each key and value is
 * used for all the query heads that share it (GQA) while it is in the first-level cache.
 * The softmax is taken over the whole context at once (maximum subtracted, exponentials
 * vectorised), between the pass over the keys and the pass over the values; the next block
 * of a pass is fetched ahead, since blocks sit anywhere in the cache.
 * Sequences are shared among OpenMP threads; with fewer sequences than threads, each
 * sequence's KV heads are split among several.
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
    long t = 0;
    __m256 mv = _mm256_set1_ps(-INFINITY), nan = _mm256_setzero_ps();
    for (; t + 8 <= len; t += 8) {
        __m256 x = _mm256_loadu_ps(sc + t);
        mv = _mm256_max_ps(mv, x);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, mv);
    for (int j = 0; j < 8; j++) m = lanes[j] > m ? lanes[j] : m;
    if (_mm256_movemask_ps(nan)) m = NAN;
    for (; t < len; t++) m = (sc[t] > m || sc[t] != sc[t]) ? sc[t] : m;  /* a NaN wins, as in SDPA */
    mv = _mm256_set1_ps(m);
    __m256 acc = _mm256_setzero_ps();
    t = 0;
    for (; t + 8 <= len; t += 8) {
        __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(sc + t), mv));
        _mm256_storeu_ps(sc + t, e);
        acc = _mm256_add_ps(acc, e);
    }
    sum = hsum(acc);
    for (; t < len; t++) sum += (sc[t] = expf(sc[t] - m));
    float inv = 1.f / sum;
    __m256 iv = _mm256_set1_ps(inv);
    for (t = 0; t + 8 <= len; t += 8) _mm256_storeu_ps(sc + t, _mm256_mul_ps(iv, _mm256_loadu_ps(sc + t)));
    for (; t < len; t++) sc[t] *= inv;
}

static void axpy(float *y, float a, const float *x, long d) {
    __m256 av = _mm256_set1_ps(a);
    long i = 0;
    for (; i + 8 <= d; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < d; i++) y[i] += a * x[i];
}

/* Asks for the rows of KV heads [h0, h1) in one block to be fetched ahead of use. Inlined by force, as is
 * prefetch_block: left to itself the compiler calls them, and decode attention ran 15% slower. */
static inline __attribute__((always_inline)) void prefetch_rows(const float *block_base, long rows, long row, long h0,
                                                                long h1, long d) {
    for (long r = 0; r < rows; r++) {
        const char *p = (const char *)(block_base + r * row + h0 * d), *end = (const char *)(block_base + r * row + h1 * d);
        for (; p < end; p += 64) _mm_prefetch(p, _MM_HINT_T0);
    }
}

/* The rows of block b of a sequence's table (none past its last block) fetched ahead of use. */
static inline __attribute__((always_inline)) void prefetch_block(const float *cache, const int64_t *table, long b,
                                                                 long blocks, long len, long block_size, long block,
                                                                 long row, long h0, long h1, long d) {
    if (b >= blocks) return;
    long rows = len - b * block_size < block_size ? len - b * block_size : block_size;
    prefetch_rows(cache + table[b] * block, rows, row, h0, h1, d);
}

/* sc[t] <- scale * q . k_t for t < n, k_t = k + t * row. */
static inline void block_scores(const float *q, const float *k, long row, long n, long d, float scale, float *sc) {
    long t = 0;
    if (d % 8 == 0) {  /* eight keys at a time, their dot products reduced together */
        __m256 sv = _mm256_set1_ps(scale);
        for (; t + 8 <= n; t += 8) {
            __m256 acc[8];
            for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
            for (long i = 0; i < d; i += 8) {
                __m256 qv = _mm256_loadu_ps(q + i);
                for (int j = 0; j < 8; j++) acc[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + (t + j) * row + i), acc[j]);
            }
            _mm256_storeu_ps(sc + t, _mm256_mul_ps(sv, hsum8(acc)));
        }
    }
    for (; t < n; t++) sc[t] = scale * dot(q, k + t * row, d);
}

/* o[0..d) += sum over t < n of p[t] * v_t, v_t = v + t * row; d a multiple of 8 up to 128. Inlined with a
 * constant d, the sums stay in registers across the block. */
static inline __attribute__((always_inline)) void block_values(float *o, const float *p, const float *v, long row,
                                                               long n, long d) {
    __m256 acc[16];
    for (long i = 0; i < d / 8; i++) acc[i] = _mm256_loadu_ps(o + 8 * i);
    for (long t = 0; t < n; t++) {
        __m256 pt = _mm256_set1_ps(p[t]);
        for (long i = 0; i < d / 8; i++) acc[i] = _mm256_fmadd_ps(pt, _mm256_loadu_ps(v + t * row + 8 * i), acc[i]);
    }
    for (long i = 0; i < d / 8; i++) _mm256_storeu_ps(o + 8 * i, acc[i]);
}

static void add_block_values(float *o, const float *p, const float *v, long row, long n, long d) {
    if (d == 64) block_values(o, p, v, row, n, 64);
    else if (d == 128) block_values(o, p, v, row, n, 128);
    else if (d % 8 == 0 && d <= 128) block_values(o, p, v, row, n, d);
    else for (long t = 0; t < n; t++) axpy(o, p[t], v + t * row, d);
}

/* One sequence's query heads of KV heads [h0, h1): qs its queries, os its output rows, table its blocks;
 * scores holds (h1 - h0) * group * len floats. */
static void attend(const float *qs, const float *k_cache, const float *v_cache, const int64_t *table, long len,
                   long h0, long h1, long group, long d, long block_size, long row, long block, float scale,
                   float *scores, float *os) {
    long blocks = (len + block_size - 1) / block_size;
    for (long b = 0; b < blocks; b++) {
        long t0 = b * block_size, rows = len - t0 < block_size ? len - t0 : block_size;
        prefetch_block(k_cache, table, b + 1, blocks, len, block_size, block, row, h0, h1, d);
        const float *kb = k_cache + table[b] * block;
        for (long h = h0; h < h1; h++)
            for (long g = 0; g < group; g++)
                block_scores(qs + (h * group + g) * d, kb + h * d, row, rows, d, scale,
                             scores + ((h - h0) * group + g) * len + t0);
    }
    prefetch_block(v_cache, table, 0, blocks, len, block_size, block, row, h0, h1, d);
    for (long qh = 0; qh < (h1 - h0) * group; qh++) softmax(scores + qh * len, len);
    for (long i = h0 * group * d; i < h1 * group * d; i++) os[i] = 0.f;
    for (long b = 0; b < blocks; b++) {
        long t0 = b * block_size, rows = len - t0 < block_size ? len - t0 : block_size;
        prefetch_block(v_cache, table, b + 1, blocks, len, block_size, block, row, h0, h1, d);
        const float *vb = v_cache + table[b] * block;
        for (long h = h0; h < h1; h++)
            for (long g = 0; g < group; g++)
                add_block_values(os + (h * group + g) * d, scores + ((h - h0) * group + g) * len + t0, vb + h * d,
                                 row, rows, d);
    }
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
    /* Work items: a sequence's KV heads, in several parts where there are fewer sequences than threads. */
    long parts = n < threads ? (threads + n - 1) / n : 1;
    parts = parts > kv_heads ? kv_heads : parts;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *scores = malloc(sizeof(float) * (heads * max_len + 1));
        if (!scores) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic)
        for (long item = 0; item < n * parts; item++) {
            if (!scores) continue;
            long s = item / parts, part = item % parts;
            long h0 = part * kv_heads / parts, h1 = (part + 1) * kv_heads / parts;
            attend(q + s * q_row, k_cache, v_cache, tables + s * max_blocks, lens[s], h0, h1, group, d, block_size,
                   row, block, scale, scores, out + s * heads * d);
        }
        free(scores);
    }
    return failed ? -1 : 0;
}
