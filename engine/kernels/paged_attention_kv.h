/* The part of paged_attention.c that reads the KV cache, for one element type of the cache. Included once per
 * type, with KV_T the element, KV_LOAD8(p) eight elements from p as fp32, KV_LOAD1(x) one, and KV(name) the
 * name of this type's version of a function. */

static float KV(dot)(const float *a, const KV_T *b, long d) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();  /* two chains: FMA latency, not throughput */
    long i = 0;
    for (; i + 16 <= d; i += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), KV_LOAD8(b + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), KV_LOAD8(b + i + 8), a1);
    }
    for (; i + 8 <= d; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), KV_LOAD8(b + i), a0);
    float s = hsum(_mm256_add_ps(a0, a1));
    for (; i < d; i++) s += a[i] * KV_LOAD1(b[i]);
    return s;
}

static void KV(axpy)(float *y, float a, const KV_T *x, long d) {
    __m256 av = _mm256_set1_ps(a);
    long i = 0;
    for (; i + 8 <= d; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, KV_LOAD8(x + i), _mm256_loadu_ps(y + i)));
    for (; i < d; i++) y[i] += a * KV_LOAD1(x[i]);
}

/* Asks for the rows of KV heads [h0, h1) in one block to be fetched ahead of use. Inlined by force, as is
 * prefetch_block: left to itself the compiler calls them, and decode attention ran 15% slower. */
static inline __attribute__((always_inline)) void KV(prefetch_rows)(const KV_T *block_base, long rows, long row,
                                                                    long h0, long h1, long d) {
    for (long r = 0; r < rows; r++) {
        const char *p = (const char *)(block_base + r * row + h0 * d), *end = (const char *)(block_base + r * row + h1 * d);
        for (; p < end; p += 64) _mm_prefetch(p, _MM_HINT_T0);
    }
}

/* The rows of block b of a sequence's table (none past its last block) fetched ahead of use. */
static inline __attribute__((always_inline)) void KV(prefetch_block)(const KV_T *cache, const int64_t *table,
                                                                     long b, long blocks, long len, long block_size,
                                                                     long block, long row, long h0, long h1, long d) {
    if (b >= blocks) return;
    long rows = len - b * block_size < block_size ? len - b * block_size : block_size;
    KV(prefetch_rows)(cache + table[b] * block, rows, row, h0, h1, d);
}

/* sc[t] <- scale * q . k_t for t < n, k_t = k + t * row. */
static inline void KV(block_scores)(const float *q, const KV_T *k, long row, long n, long d, float scale, float *sc) {
    long t = 0;
    if (d % 8 == 0) {  /* eight keys at a time, their dot products reduced together */
        __m256 sv = _mm256_set1_ps(scale);
        for (; t + 8 <= n; t += 8) {
            __m256 acc[8];
            for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
            for (long i = 0; i < d; i += 8) {
                __m256 qv = _mm256_loadu_ps(q + i);
                for (int j = 0; j < 8; j++) acc[j] = _mm256_fmadd_ps(qv, KV_LOAD8(k + (t + j) * row + i), acc[j]);
            }
            _mm256_storeu_ps(sc + t, _mm256_mul_ps(sv, hsum8(acc)));
        }
    }
    for (; t < n; t++) sc[t] = scale * KV(dot)(q, k + t * row, d);
}

/* o[0..d) += sum over t < n of p[t] * v_t, v_t = v + t * row; d a multiple of 8 up to 128. Inlined with a
 * constant d, the sums stay in registers across the block. */
static inline __attribute__((always_inline)) void KV(block_values)(float *o, const float *p, const KV_T *v,
                                                                   long row, long n, long d) {
    __m256 acc[16];
    for (long i = 0; i < d / 8; i++) acc[i] = _mm256_loadu_ps(o + 8 * i);
    for (long t = 0; t < n; t++) {
        __m256 pt = _mm256_set1_ps(p[t]);
        for (long i = 0; i < d / 8; i++) acc[i] = _mm256_fmadd_ps(pt, KV_LOAD8(v + t * row + 8 * i), acc[i]);
    }
    for (long i = 0; i < d / 8; i++) _mm256_storeu_ps(o + 8 * i, acc[i]);
}

static void KV(add_block_values)(float *o, const float *p, const KV_T *v, long row, long n, long d) {
    if (d == 64) KV(block_values)(o, p, v, row, n, 64);
    else if (d == 128) KV(block_values)(o, p, v, row, n, 128);
    else if (d % 8 == 0 && d <= 128) KV(block_values)(o, p, v, row, n, d);
    else for (long t = 0; t < n; t++) KV(axpy)(o, p[t], v + t * row, d);
}

/* One sequence's query heads of KV heads [h0, h1): qs its queries, os its output rows, table its blocks;
 * scores holds (h1 - h0) * group * len floats. */
static void KV(attend)(const float *qs, const KV_T *k_cache, const KV_T *v_cache, const int64_t *table, long len,
                       long start, float cap,
                       long h0, long h1, long group, long d, long block_size, long row, long block, float scale,
                       float *scores, float *os) {
    long blocks = (len + block_size - 1) / block_size;
    for (long b = 0; b < blocks; b++) {
        long t0 = b * block_size, rows = len - t0 < block_size ? len - t0 : block_size;
        KV(prefetch_block)(k_cache, table, b + 1, blocks, len, block_size, block, row, h0, h1, d);
        const KV_T *kb = k_cache + table[b] * block;
        for (long h = h0; h < h1; h++)
            for (long g = 0; g < group; g++)
                KV(block_scores)(qs + (h * group + g) * d, kb + h * d, row, rows, d, scale,
                                 scores + ((h - h0) * group + g) * len + t0);
    }
    KV(prefetch_block)(v_cache, table, 0, blocks, len, block_size, block, row, h0, h1, d);
    for (long qh = 0; qh < (h1 - h0) * group; qh++) window_softmax(scores + qh * len, start, len, cap);
    for (long i = h0 * group * d; i < h1 * group * d; i++) os[i] = 0.f;
    for (long b = 0; b < blocks; b++) {
        long t0 = b * block_size, rows = len - t0 < block_size ? len - t0 : block_size;
        KV(prefetch_block)(v_cache, table, b + 1, blocks, len, block_size, block, row, h0, h1, d);
        const KV_T *vb = v_cache + table[b] * block;
        for (long h = h0; h < h1; h++)
            for (long g = 0; g < group; g++)
                KV(add_block_values)(os + (h * group + g) * d, scores + ((h - h0) * group + g) * len + t0,
                                     vb + h * d, row, rows, d);
    }
}

