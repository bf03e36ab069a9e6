/* The packing of the int8 product's operands in portable C, for the variants other
 * than AVX512-VNNI (which packs with AVX-512 masks, matmul_int8.c): the same
 * layout, offsets and checks. Written as plain loops over 16 lanes that the
 * compiler vectorises (AVX2 on x86, NEON on aarch64).
 * Part of the one translation unit that kernels.c includes (static helpers are
 * shared across files); not compiled on its own. */
#ifdef HDQT_INT8_ANY

/* v as an int32 when it is an integer in [lo, hi], else 0 with *bad set; branch-free
 * (the truncation only ever sees values in range; NaN fails the range test). */
static inline __attribute__((always_inline)) int32_t i8p_int(float v, float lo, float hi, int *bad) {
    float in = v >= lo && v <= hi ? v : 0.0f;
    int32_t q = (int32_t)in;
    *bad |= ((float)q != v);
    return q;
}

/* i8_pack_a in portable C: A's rows as signed bytes, each tile's starting sum, max |A|. */
INT8_PACK_TARGET
static void i8p_pack_a(void *arg, int64_t begin, int64_t end, int worker) {
    i8_ctx *c = (i8_ctx *)arg;
    int bad = 0;
    int32_t top = 0;
    for (int64_t m = begin; m < end; ++m) {
        int8_t *row = (int8_t *)(c->a + m * c->groups);
        memset(row, 0, (size_t)c->groups * 4);
        const float *src = c->A + m * c->sm;
        for (int64_t t = 0; t < c->tiles; ++t) {
            int64_t k0 = t * c->tile, k1 = k0 + c->tile < c->K ? k0 + c->tile : c->K;
            int8_t *dst = row + c->tile_group[t] * 4 - k0;
            int32_t sum = 0;
            if (c->sk == 1) {
                for (int64_t k = k0; k < k1; ++k) {
                    int32_t q = i8p_int(src[k], -128.0f, 127.0f, &bad);
                    dst[k] = (int8_t)q, sum += q;
                    int32_t a = q < 0 ? -q : q;
                    top = a > top ? a : top;
                }
            } else {
                for (int64_t k = k0; k < k1; ++k) {
                    int32_t q = i8p_int(src[k * c->sk], -128.0f, 127.0f, &bad);
                    dst[k] = (int8_t)q, sum += q;
                    int32_t a = q < 0 ? -q : q;
                    top = a > top ? a : top;
                }
            }
            c->start[m * c->tiles + t] = -c->offset * sum;
        }
    }
    c->bad[worker] = bad, c->a_max[worker] = top;
}

/* i8_scan_b in portable C: min and max of B's elements [begin, end) in memory order,
 * and whether all of them are integers in [-128, 255]. */
INT8_PACK_TARGET
static void i8p_scan_b(void *arg, int64_t begin, int64_t end, int worker) {
    i8_ctx *c = (i8_ctx *)arg;
    float lo = 0.0f, hi = 0.0f;
    int bad = 0;
    for (int64_t i = begin; i < end; ++i) {
        float v = c->B[i];
        (void)i8p_int(v, -128.0f, 255.0f, &bad);
        lo = v < lo ? v : lo, hi = v > hi ? v : hi;
    }
    c->bad[worker] = bad, c->lo[worker] = lo, c->hi[worker] = hi;
}

/* 4 rows of 16 values (row i at src[i], NULL: a row past the tile) as the 16 words
 * of one packed group: byte i of word lane is row i's lane + offset. Lanes past
 * `lanes` hold 0. */
INT8_PACK_TARGET
static inline void i8p_group(const float *const src[4], int64_t lanes, int32_t offset, uint8_t *dst) {
    uint32_t word[NV];
    for (int l = 0; l < NV; ++l) word[l] = 0;
    for (int i = 0; i < 4; ++i) {
        if (src[i] == NULL) continue;
        float v[NV];
        for (int l = 0; l < NV; ++l) v[l] = l < lanes ? src[i][l] : 0.0f;
        for (int l = 0; l < NV; ++l) {
            uint32_t byte = (uint32_t)((int32_t)v[l] + offset) & 0xffu;
            word[l] |= (l < lanes ? byte : 0u) << (8 * i);
        }
    }
    memcpy(dst, word, sizeof word); /* little-endian: byte i of each word is row i */
}

/* i8_pack_b in portable C: B's 16-column strips as (groups, 16 lanes, 4 bytes). */
INT8_PACK_TARGET
static void i8p_pack_b(void *arg, int64_t begin, int64_t end, int worker) {
    (void)worker;
    i8_ctx *c = (i8_ctx *)arg;
    for (int64_t s = begin; s < end; ++s) {
        int64_t j = s * NV, lanes = c->J - j < NV ? c->J - j : NV;
        uint8_t *dst = c->b + s * c->groups * 64;
        if (c->b_transposed) { /* (J, K): each lane's column is a contiguous row */
            memset(dst, 0, (size_t)c->groups * 64); /* lanes past J, and the padding of a tile's last group */
            for (int64_t lane = 0; lane < lanes; ++lane) {
                const float *row = c->B + (j + lane) * c->K;
                for (int64_t t = 0; t < c->tiles; ++t) {
                    int64_t k0 = t * c->tile, k1 = k0 + c->tile < c->K ? k0 + c->tile : c->K;
                    uint8_t *g = dst + c->tile_group[t] * 64 + lane * 4;
                    for (int64_t k = k0; k < k1; ++k)
                        g[(k - k0) / 4 * 64 + (k - k0) % 4] = (uint8_t)((int32_t)row[k] + c->offset);
                }
            }
            continue;
        }
        for (int64_t t = 0; t < c->tiles; ++t) {
            int64_t k0 = t * c->tile, k1 = k0 + c->tile < c->K ? k0 + c->tile : c->K;
            for (int64_t k = k0, g = c->tile_group[t]; k < k1; k += 4, ++g) {
                const float *src[4];
                for (int i = 0; i < 4; ++i) src[i] = k + i < k1 ? c->B + (k + i) * c->J + j : NULL;
                i8p_group(src, lanes, c->offset, dst + g * 64);
            }
        }
    }
}

/* Four 16-byte rows r[0..3] -> 16 lanes of 4 bytes (r0[i], r1[i], r2[i], r3[i]) at
 * dst (64 bytes): the packed group of a conv panel. SSE2 (every x86-64), NEON's
 * 4-way interleaving store, or plain C. */
static inline void i8_interleave4(const uint8_t *const r[4], uint8_t *dst) {
#if defined(__x86_64__)
    __m128i a = _mm_loadu_si128((const __m128i *)r[0]), b = _mm_loadu_si128((const __m128i *)r[1]);
    __m128i c = _mm_loadu_si128((const __m128i *)r[2]), d = _mm_loadu_si128((const __m128i *)r[3]);
    __m128i ab_lo = _mm_unpacklo_epi8(a, b), ab_hi = _mm_unpackhi_epi8(a, b);
    __m128i cd_lo = _mm_unpacklo_epi8(c, d), cd_hi = _mm_unpackhi_epi8(c, d);
    _mm_storeu_si128((__m128i *)dst, _mm_unpacklo_epi16(ab_lo, cd_lo));
    _mm_storeu_si128((__m128i *)(dst + 16), _mm_unpackhi_epi16(ab_lo, cd_lo));
    _mm_storeu_si128((__m128i *)(dst + 32), _mm_unpacklo_epi16(ab_hi, cd_hi));
    _mm_storeu_si128((__m128i *)(dst + 48), _mm_unpackhi_epi16(ab_hi, cd_hi));
#elif defined(__aarch64__)
    uint8x16x4_t v = {{vld1q_u8(r[0]), vld1q_u8(r[1]), vld1q_u8(r[2]), vld1q_u8(r[3])}};
    vst4q_u8(dst, v);
#else
    for (int i = 0; i < NV; ++i)
        for (int q = 0; q < 4; ++q) dst[4 * i + q] = r[q][i];
#endif
}

#ifdef HDQT_INT8 /* used by the x86 variants' conv weight gradient only */
/* dw_column_bytes in portable C: a rounded column row as signed bytes (padding 0);
 * returns its sum. */
INT8_PACK_TARGET
static int32_t i8p_column_bytes(const float *r, int64_t n, int8_t *dst, int64_t padded) {
    int32_t sum = 0;
    for (int64_t i = 0; i < n; ++i) {
        int32_t q = (int32_t)r[i];
        dst[i] = (int8_t)q, sum += q;
    }
    memset(dst + n, 0, (size_t)(padded - n));
    return sum;
}
#endif

#endif /* HDQT_INT8_ANY */
