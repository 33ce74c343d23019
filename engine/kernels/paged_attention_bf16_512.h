/* paged_attention.c's reading of a bf16 cache with AVX-512, for heads of 64 or 128 dimensions: built for any
 * x86-64 CPU (each function asks for AVX-512 itself) and called only where the CPU has it.
 *
 * Per block and KV head, the keys are widened to fp32 once into a buffer that stays in L1 and read from there by
 * each query head that shares them (GQA); sixteen keys' dot products with a query are summed lane-wise, then
 * reduced together (reduce16) into one vector of sixteen scores. Each value row is widened once and added into
 * the outputs of all the query heads that share it, their sums held in registers across the block. */
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))

AVX512 static inline __m512 widen16_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* Lane j of the result: the sum of a[j]'s sixteen lanes. */
AVX512 static inline __m512 reduce16(const __m512 *a) {
    __m512 x[4];
    for (int c = 0; c < 4; c++) { /* x[c], 128-bit lane k: the sums over lane k of a[4c .. 4c + 3] */
        const __m512 *v = a + 4 * c;
        __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(v[0], v[1]), _mm512_unpackhi_ps(v[0], v[1]));
        __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(v[2], v[3]), _mm512_unpackhi_ps(v[2], v[3]));
        x[c] = _mm512_add_ps(_mm512_shuffle_ps(s01, s23, _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(s01, s23, _MM_SHUFFLE(3, 2, 3, 2)));
    }
    __m512 z01 = _mm512_add_ps(_mm512_shuffle_f32x4(x[0], x[1], _MM_SHUFFLE(1, 0, 1, 0)),
                               _mm512_shuffle_f32x4(x[0], x[1], _MM_SHUFFLE(3, 2, 3, 2)));
    __m512 z23 = _mm512_add_ps(_mm512_shuffle_f32x4(x[2], x[3], _MM_SHUFFLE(1, 0, 1, 0)),
                               _mm512_shuffle_f32x4(x[2], x[3], _MM_SHUFFLE(3, 2, 3, 2)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(z01, z23, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(z01, z23, _MM_SHUFFLE(3, 1, 3, 1)));
}

/* sc[t] <- scale * q . kw_t for t < n <= 16, kw: [n][D16 * 16] fp32. */
AVX512 static inline __attribute__((always_inline)) void scores16(const float *q, const float *kw, long n,
                                                                  const int D16, float scale, float *sc) {
    __m512 acc[16];
    for (int j = 0; j < 16; j++) acc[j] = _mm512_setzero_ps();
    if (n == 16) {
        for (int c = 0; c < D16; c++) {
            __m512 qv = _mm512_loadu_ps(q + 16 * c);
            for (int j = 0; j < 16; j++) acc[j] = _mm512_fmadd_ps(qv, _mm512_load_ps(kw + (j * D16 + c) * 16), acc[j]);
        }
    } else {
        for (int c = 0; c < D16; c++) {
            __m512 qv = _mm512_loadu_ps(q + 16 * c);
            for (long j = 0; j < n; j++) acc[j] = _mm512_fmadd_ps(qv, _mm512_load_ps(kw + (j * D16 + c) * 16), acc[j]);
        }
    }
    __mmask16 mask = n == 16 ? 0xFFFF : (__mmask16)((1u << n) - 1);
    _mm512_mask_storeu_ps(sc, mask, _mm512_mul_ps(_mm512_set1_ps(scale), reduce16(acc)));
}

/* os[g] += sum over t < n of p[g][t] * v_t for GN query heads g (p rows len apart, os rows D16 * 16 apart),
 * v_t = v + t * row widened. */
AVX512 static inline __attribute__((always_inline)) void values512(float *os, const float *p, long len,
                                                                   const uint16_t *v, long row, long n,
                                                                   const int D16, const int GN) {
    __m512 acc[4][8];
    for (int g = 0; g < GN; g++)
        for (int c = 0; c < D16; c++) acc[g][c] = _mm512_loadu_ps(os + (g * D16 + c) * 16);
    for (long t = 0; t < n; t++) {
        __m512 vv[8];
        for (int c = 0; c < D16; c++) vv[c] = widen16_bf16(v + t * row + 16 * c);
        for (int g = 0; g < GN; g++) {
            __m512 pt = _mm512_set1_ps(p[g * len + t]);
            for (int c = 0; c < D16; c++) acc[g][c] = _mm512_fmadd_ps(pt, vv[c], acc[g][c]);
        }
    }
    for (int g = 0; g < GN; g++)
        for (int c = 0; c < D16; c++) _mm512_storeu_ps(os + (g * D16 + c) * 16, acc[g][c]);
}

/* One block's values for the query heads [g0, g0 + gn) of one KV head, with gn at most 4 (d = 64) or 2 (d = 128)
 * so that their sums fit in registers. */
AVX512 static void values_block512(float *os, const float *p, long len, const uint16_t *v, long row, long n, long d,
                                   long gn) {
    if (d == 64) {
        switch (gn) {
        case 1: values512(os, p, len, v, row, n, 4, 1); break;
        case 2: values512(os, p, len, v, row, n, 4, 2); break;
        case 3: values512(os, p, len, v, row, n, 4, 3); break;
        default: values512(os, p, len, v, row, n, 4, 4);
        }
    } else if (gn == 1) {
        values512(os, p, len, v, row, n, 8, 1);
    } else {
        values512(os, p, len, v, row, n, 8, 2);
    }
}

/* Block b's rows (none past the last block) asked for into L2 only: further ahead than prefetch_block_bf16's. */
static inline __attribute__((always_inline)) void prefetch_block_l2(const uint16_t *cache, const int64_t *table, long b,
                                                                    long blocks, long len, long block_size, long block,
                                                                    long row, long h0, long h1, long d) {
    if (b >= blocks) return;
    long rows = len - b * block_size < block_size ? len - b * block_size : block_size;
    const uint16_t *base = cache + table[b] * block;
    for (long r = 0; r < rows; r++) {
        const char *p = (const char *)(base + r * row + h0 * d), *end = (const char *)(base + r * row + h1 * d);
        for (; p < end; p += 64) _mm_prefetch(p, _MM_HINT_T1);
    }
}

/* attend_bf16 (paged_attention_kv.h) with AVX-512, d 64 or 128; kw: a 64-byte aligned buffer of block_size x d
 * floats. */
AVX512 static void attend_bf16_512(const float *qs, const uint16_t *k_cache, const uint16_t *v_cache,
                                   const int64_t *table, long len, long start, float cap, long h0, long h1,
                                   long group, long d,
                                   long block_size, long row, long block, float scale, float *scores, float *os,
                                   float *kw, const int64_t *next_table, long next_len) {
    long blocks = (len + block_size - 1) / block_size;
    prefetch_block_l2(k_cache, table, 1, blocks, len, block_size, block, row, h0, h1, d);
    prefetch_block_l2(k_cache, table, 2, blocks, len, block_size, block, row, h0, h1, d);
    for (long b = 0; b < blocks; b++) {
        long t0 = b * block_size, rows = len - t0 < block_size ? len - t0 : block_size;
        prefetch_block_bf16(k_cache, table, b + 1, blocks, len, block_size, block, row, h0, h1, d);
        prefetch_block_l2(k_cache, table, b + 3, blocks, len, block_size, block, row, h0, h1, d);
        const uint16_t *kb = k_cache + table[b] * block;
        for (long h = h0; h < h1; h++) {
            for (long t = 0; t < rows; t++)
                for (long c = 0; c < d; c += 16) _mm512_store_ps(kw + t * d + c, widen16_bf16(kb + t * row + h * d + c));
            for (long g = 0; g < group; g++) {
                const float *q = qs + (h * group + g) * d;
                float *sc = scores + ((h - h0) * group + g) * len + t0;
                for (long j = 0; j < rows; j += 16) {
                    long n = rows - j < 16 ? rows - j : 16;
                    if (d == 64) scores16(q, kw + j * d, n, 4, scale, sc + j);
                    else scores16(q, kw + j * d, n, 8, scale, sc + j);
                }
            }
        }
    }
    prefetch_block_bf16(v_cache, table, 0, blocks, len, block_size, block, row, h0, h1, d);
    prefetch_block_l2(v_cache, table, 1, blocks, len, block_size, block, row, h0, h1, d);
    prefetch_block_l2(v_cache, table, 2, blocks, len, block_size, block, row, h0, h1, d);
    for (long qh = 0; qh < (h1 - h0) * group; qh++) window_softmax(scores + qh * len, start, len, cap);
    for (long i = h0 * group * d; i < h1 * group * d; i++) os[i] = 0.f;
    long per = d == 64 ? 4 : 2; /* query heads whose sums fit in registers at once */
    long next_blocks = next_table ? (next_len + block_size - 1) / block_size : 0, next_fetched = 0;
    for (long b = 0; b < blocks; b++) {
        long t0 = b * block_size, rows = len - t0 < block_size ? len - t0 : block_size;
        prefetch_block_bf16(v_cache, table, b + 1, blocks, len, block_size, block, row, h0, h1, d);
        prefetch_block_l2(v_cache, table, b + 3, blocks, len, block_size, block, row, h0, h1, d);
        /* The next sequence's first keys, as this one's values run out: three blocks ahead in all. */
        for (; next_fetched < next_blocks && next_fetched <= b + 3 - blocks; next_fetched++)
            prefetch_block_l2(k_cache, next_table, next_fetched, next_blocks, next_len, block_size, block, row, h0,
                              h1, d);
        const uint16_t *vb = v_cache + table[b] * block;
        for (long h = h0; h < h1; h++)
            for (long g = 0; g < group; g += per) {
                long gn = group - g < per ? group - g : per;
                values_block512(os + (h * group + g) * d, scores + ((h - h0) * group + g) * len + t0, len,
                                vb + h * d, row, rows, d, gn);
            }
    }
}

#undef AVX512
