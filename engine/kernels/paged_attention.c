/* Decode attention straight from the paged KV cache (fp32, or bf16 widened in registers), for x86-64 CPUs with
 * AVX2 and FMA.
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
 * Sequences are shared among OpenMP threads, longest first and round robin; with fewer
 * sequences than threads, each sequence's KV heads are split among several.
 * A bf16 cache with heads of 64 or 128 takes an AVX-512 path where the CPU has it
 * (paged_attention_bf16_512.h): 1.2-1.4x faster than the AVX2 path on a Xeon with two threads,
 * most of what is left being the keys and values read (python -m bench.attention).
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "vec_math.h"

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

/* The keys before `start` are outside the query's window (a sliding window's first block): weight 0; softmax over the
 * rest, its scores first capped softly to (-cap, cap) as cap * tanh(score / cap) where cap > 0 (Gemma 2). */
static void window_softmax(float *sc, long start, long len, float cap) {
    if (cap > 0.f)
        for (long t = start; t < len; t++) sc[t] = tanhf(sc[t] / cap) * cap;
    softmax(sc + start, len - start);
    for (long t = 0; t < start; t++) sc[t] = 0.f;
}

/* bf16 widened to fp32: its bits are the high half of the fp32's. */
static inline __m256 widen_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

static inline float bf16_to_float(uint16_t x) {
    union { uint32_t u; float f; } c = {(uint32_t)x << 16};
    return c.f;
}

#define KV_T float
#define KV_LOAD8(p) _mm256_loadu_ps(p)
#define KV_LOAD1(x) (x)
#define KV(name) name##_f32
#include "paged_attention_kv.h"
#undef KV_T
#undef KV_LOAD8
#undef KV_LOAD1
#undef KV

#define KV_T uint16_t
#define KV_LOAD8(p) widen_bf16(p)
#define KV_LOAD1(x) bf16_to_float(x)
#define KV(name) name##_bf16
#include "paged_attention_kv.h"
#undef KV_T
#undef KV_LOAD8
#undef KV_LOAD1
#undef KV

#include "paged_attention_bf16_512.h"

typedef struct {
    int64_t len, seq;
} by_length;

static int longer_first(const void *a, const void *b) {
    const by_length *x = a, *y = b;
    return x->len != y->len ? (x->len < y->len ? 1 : -1) : (x->seq > y->seq) - (x->seq < y->seq);
}

/* A sequence's first key in its window: starts[s], or 0 without a window. */
#define START(s) (starts ? starts[s] : 0)

/* q: [n, heads, d], q_row floats from one sequence's queries to the next (a view of the step's fused qkv rows
 * needs no copy); caches: [blocks, block_size, kv_heads, d], fp32 or (kv_bf16) bf16; tables: [n, max_blocks]; lens: [n];
 * starts: [n] keys of each table to leave out (a sliding window's start within its first block), or NULL; cap: the
 * scores' soft cap, or 0;
 * out: [n, heads, d]; allow_wide: whether a bf16 cache may take the AVX-512 path. Returns 0, or -1 when a buffer
 * could not be allocated. */
int paged_decode_attention(const float *q, long q_row, const void *k_cache, const void *v_cache, int kv_bf16,
                            const int64_t *tables, const int64_t *lens, const int64_t *starts, float cap, long n, long heads, long kv_heads, long d,
                            long block_size, long max_blocks, float scale, float *out, int threads, int allow_wide) {
    long group = heads / kv_heads, max_len = 0;
    for (long s = 0; s < n; s++) max_len = lens[s] > max_len ? lens[s] : max_len;
    long row = kv_heads * d, block = block_size * row;
    /* Work items: a sequence's KV heads, in several parts where there are fewer sequences than threads. */
    long parts = n < threads ? (threads + n - 1) / n : 1;
    parts = parts > kv_heads ? kv_heads : parts;
    int failed = 0, wide = allow_wide && kv_bf16 && (d == 64 || d == 128) && __builtin_cpu_supports("avx512f") &&
                           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
                           __builtin_cpu_supports("avx512vl");
    /* Sequences go to threads round robin, longest first, so the threads' shares are even and each thread knows
     * its next sequence, whose first keys it fetches while it finishes the one before. */
    by_length *order = malloc(sizeof(by_length) * (n + 1));
    if (!order) return -1;
    for (long s = 0; s < n; s++) order[s] = (by_length){lens[s], s};
    qsort(order, n, sizeof(by_length), longer_first);
#pragma omp parallel num_threads(threads)
    {
        long team = omp_get_num_threads();
        float *scores = malloc(sizeof(float) * (heads * max_len + 1));
        float *kw = wide ? aligned_alloc(64, sizeof(float) * ((block_size * d + 15) / 16 * 16)) : NULL;
        if (!scores || (wide && !kw)) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static, 1)
        for (long item = 0; item < n * parts; item++) {
            if (!scores || (wide && !kw)) continue;
            long s = order[item / parts].seq, part = item % parts;
            long h0 = part * kv_heads / parts, h1 = (part + 1) * kv_heads / parts;
            if (wide) {
                long next = parts == 1 && item + team < n ? order[item + team].seq : -1; /* this thread's next */
                attend_bf16_512(q + s * q_row, k_cache, v_cache, tables + s * max_blocks, lens[s], START(s), cap,
                                h0, h1, group, d, block_size, row, block, scale, scores, out + s * heads * d, kw,
                                next >= 0 ? tables + next * max_blocks : NULL, next >= 0 ? lens[next] : 0);
            } else if (kv_bf16)
                attend_bf16(q + s * q_row, k_cache, v_cache, tables + s * max_blocks, lens[s], START(s), cap, h0, h1,
                            group, d, block_size, row, block, scale, scores, out + s * heads * d);
            else
                attend_f32(q + s * q_row, k_cache, v_cache, tables + s * max_blocks, lens[s], START(s), cap, h0, h1,
                           group, d, block_size, row, block, scale, scores, out + s * heads * d);
        }
        free(scores);
        free(kw);
    }
    free(order);
    return failed ? -1 : 0;
}
