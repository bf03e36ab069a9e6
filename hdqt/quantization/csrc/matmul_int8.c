/* The tiled, saturating product on 8-bit integer dot products: the AVX512-VNNI
 * kernels here, and the entry point for every variant (int8_variant.h; the others'
 * packing in int8_pack.c, their register blocks in int8_x86.c and int8_arm.c).
 * Part of the one translation unit that kernels.c includes (static helpers are
 * shared across files); not compiled on its own.
 *
 * The quantized operands of the forward product are small integers held in
 * float32. Where they fit in bytes (A in [-128, 127], B in [0, 255] or
 * [-128, 127]), vpdpbusd multiplies 16 lanes x 4 byte pairs and adds them into
 * 32-bit lanes in one instruction: 64 multiply-adds against a float32 FMA's 16.
 * Each tile's partial sum is an exact int32, clamped at the accumulator's limit
 * and added to a float32 total in the same order as hdqt_tiled_matmul_f32, so
 * the two kernels agree bit for bit.
 *
 * Layout: a tile's reduction is cut into groups of 4 (the last group of a tile
 * zero-padded), so that no group straddles two tiles.
 *   A (M, K) -> (M, groups) int32 words, 4 signed bytes each (broadcast operand);
 *   B (K, J) -> (J / 16 strips, groups, 16 lanes, 4 bytes), unsigned: a signed B
 *   is offset by +128 (AVX2: by -min(B)), and each tile's sum starts at -offset * (its
 *   part of A's row sum).
 * Operands that do not fit, or a CPU without int8 dot products, leave the product
 * to the float32 kernel (hdqt_tiled_matmul_i8 returns 1 or 2). */
#ifdef HDQT_INT8

/* A's rows as signed bytes, and each tile's starting sum (the offset correction;
 * 0 without an offset). */
INT8_TARGET
static void i8_pack_a(void *arg, int64_t begin, int64_t end, int worker) {
    i8_ctx *c = (i8_ctx *)arg;
    int bad = 0;
    __m512i top = _mm512_setzero_si512();
    int32_t top_scalar = 0;
    for (int64_t m = begin; m < end; ++m) {
        int8_t *row = (int8_t *)(c->a + m * c->groups);
        memset(row, 0, (size_t)c->groups * 4);
        for (int64_t t = 0; t < c->tiles; ++t) {
            int64_t k0 = t * c->tile, k1 = k0 + c->tile < c->K ? k0 + c->tile : c->K;
            int8_t *dst = row + c->tile_group[t] * 4;
            int32_t sum = 0;
            if (c->sk == 1) { /* a contiguous row: 16 at a time */
                const float *src = c->A + m * c->sm;
                __m512i sums = _mm512_setzero_si512();
                for (int64_t k = k0; k < k1; k += NV) {
                    int64_t n = k1 - k < NV ? k1 - k : NV;
                    __mmask16 lanes = (__mmask16)((1u << n) - 1);
                    __m512 v = _mm512_maskz_loadu_ps(lanes, src + k);
                    __m512i q = _mm512_cvttps_epi32(v);
                    bad |= fits16(v, q, -128.0f, 127.0f, lanes) != lanes;
                    sums = _mm512_add_epi32(sums, q);
                    top = _mm512_max_epi32(top, _mm512_abs_epi32(q));
                    _mm_mask_storeu_epi8(dst + (k - k0), lanes, _mm512_cvtepi32_epi8(q));
                }
                sum = _mm512_reduce_add_epi32(sums);
            } else {
                for (int64_t k = k0; k < k1; ++k) {
                    float v = c->A[m * c->sm + k * c->sk];
                    int ok = fits(v, -128.0f, 127.0f);
                    bad |= !ok;
                    int32_t q = ok ? (int32_t)v : 0;
                    dst[k - k0] = (int8_t)q;
                    sum += q;
                    top_scalar = q > top_scalar ? q : (-q > top_scalar ? -q : top_scalar);
                }
            }
            c->start[m * c->tiles + t] = -c->offset * sum;
        }
    }
    int32_t vector_top = _mm512_reduce_max_epi32(top);
    c->bad[worker] = bad, c->a_max[worker] = vector_top > top_scalar ? vector_top : top_scalar;
}

/* min and max of B's elements [begin, end) in memory order, and whether all of
 * them are integers in [-128, 255] (NaN is not). */
INT8_TARGET
static void i8_scan_b(void *arg, int64_t begin, int64_t end, int worker) {
    i8_ctx *c = (i8_ctx *)arg;
    __m512 lo = _mm512_setzero_ps(), hi = _mm512_setzero_ps();
    int bad = 0;
    for (int64_t i = begin; i < end; i += NV) {
        int64_t n = end - i < NV ? end - i : NV;
        __mmask16 lanes = (__mmask16)((1u << n) - 1);
        __m512 v = _mm512_maskz_loadu_ps(lanes, c->B + i);
        bad |= fits16(v, _mm512_cvttps_epi32(v), -128.0f, 255.0f, lanes) != lanes;
        lo = _mm512_min_ps(lo, v), hi = _mm512_max_ps(hi, v); /* padding lanes are 0: neutral */
    }
    c->bad[worker] = bad, c->lo[worker] = _mm512_reduce_min_ps(lo), c->hi[worker] = _mm512_reduce_max_ps(hi);
}

/* i8_pack_b for B given transposed, (J, K) row-major: each lane's column is a
 * contiguous row, 16 of its values (4 groups) converted at a time. */
INT8_TARGET
static void i8_pack_b_transposed(i8_ctx *c, int64_t s) {
    const __m512i offset = _mm512_set1_epi32(c->offset);
    int64_t j = s * NV, lanes = c->J - j < NV ? c->J - j : NV;
    uint8_t *dst = c->b + s * c->groups * 64;
    if (lanes < NV) memset(dst, 0, (size_t)c->groups * 64); /* lanes past J: computed, not stored */
    for (int64_t lane = 0; lane < lanes; ++lane) {
        const float *row = c->B + (j + lane) * c->K;
        for (int64_t t = 0; t < c->tiles; ++t) {
            int64_t k0 = t * c->tile, k1 = k0 + c->tile < c->K ? k0 + c->tile : c->K;
            for (int64_t k = k0; k < k1; k += NV) {
                int64_t n = k1 - k < NV ? k1 - k : NV;
                __mmask16 mask = (__mmask16)((1u << n) - 1);
                __m512i q = _mm512_add_epi32(_mm512_cvttps_epi32(_mm512_maskz_loadu_ps(mask, row + k)), offset);
                uint8_t bytes[NV]; /* past k1: bytes of a 0 input, against A's zero padding */
                _mm_storeu_si128((__m128i *)bytes, _mm512_cvtepi32_epi8(q));
                int64_t g = c->tile_group[t] + (k - k0) / 4;
                for (int64_t w = 0; w < (n + 3) / 4; ++w) memcpy(dst + (g + w) * 64 + lane * 4, bytes + 4 * w, 4);
            }
        }
    }
}

/* B's 16-column strips as (groups, 16 lanes, 4 bytes): lane j of a group holds
 * rows k..k+3 of column j, the byte order vpdpbusd pairs with A's word. */
INT8_TARGET
static void i8_pack_b(void *arg, int64_t begin, int64_t end, int worker) {
    (void)worker;
    i8_ctx *c = (i8_ctx *)arg;
    const __m512i bytes = _mm512_set1_epi32(0xff), offset = _mm512_set1_epi32(c->offset);
    for (int64_t s = begin; s < end; ++s) {
        if (c->b_transposed) {
            i8_pack_b_transposed(c, s);
            continue;
        }
        int64_t j = s * NV, lanes = c->J - j < NV ? c->J - j : NV;
        __mmask16 mask = (__mmask16)((1u << lanes) - 1);
        uint8_t *dst = c->b + s * c->groups * 64;
        for (int64_t t = 0; t < c->tiles; ++t) {
            int64_t k0 = t * c->tile, k1 = k0 + c->tile < c->K ? k0 + c->tile : c->K;
            for (int64_t k = k0, g = c->tile_group[t]; k < k1; k += 4, ++g) {
                __m512i word = _mm512_setzero_si512();
                for (int64_t i = 0; i < 4 && k + i < k1; ++i) {
                    __m512 v = _mm512_maskz_loadu_ps(mask, c->B + (k + i) * c->J + j);
                    __m512i q = _mm512_and_si512(_mm512_add_epi32(_mm512_cvttps_epi32(v), offset), bytes);
                    q = _mm512_maskz_mov_epi32(mask, q); /* padding lanes hold 0, not the offset */
                    word = _mm512_or_si512(word, _mm512_slli_epi32(q, (unsigned)(8 * i)));
                }
                _mm512_storeu_si512(dst + g * 64, word);
            }
        }
    }
}

/* acc + the 16 int32 lanes of v, as 8 int64 lanes. */
INT8_TARGET
static inline __m512i i8_widen(__m512i acc, __m512i v) {
    acc = _mm512_add_epi64(acc, _mm512_cvtepi32_epi64(_mm512_castsi512_si256(v)));
    return _mm512_add_epi64(acc, _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(v, 1)));
}

/* All M rows of Y against one 16-lane strip of B, given as its packed groups bs:
 * Y[m * ldy + j + lane] for the lanes in mask. sat: NULL, or the worker's
 * saturation counts (see sat_slot), over the rows below M and the lanes in mask
 * (the outputs that are stored). */
INT8_TARGET
static void i8_block(const i8_ctx *c, const uint8_t *bs, float *Y, int64_t ldy, int64_t j, __mmask16 mask,
                     sat_slot *sat) {
    const __m512i lim = _mm512_set1_epi32(c->limit), neg_lim = _mm512_set1_epi32(-c->limit);
    /* a tile's |sums|, added over the block's rows in int32, could wrap: widen per row */
    const int widen_rows = c->sum_bound * I8_MR >= 2147483647.0;
    for (int64_t m0 = 0; m0 < c->M; m0 += I8_MR) {
        int64_t rows = c->M - m0 < I8_MR ? c->M - m0 : I8_MR;
        const int32_t *a[I8_MR], *start[I8_MR];
        for (int r = 0; r < I8_MR; ++r) { /* rows past M repeat row m0: computed, not stored */
            int64_t m = m0 + (r < rows ? r : 0);
            a[r] = c->a + m * c->groups, start[r] = c->start + m * c->tiles;
        }
        __m512 total[I8_MR];
        for (int r = 0; r < I8_MR; ++r) total[r] = _mm512_setzero_ps();
        int64_t count = 0;                     /* with sat: the block's saturated tile sums */
        __m512i sums = _mm512_setzero_si512(); /* and the sum of their |sum|, 8 int64 lanes */
        for (int64_t t = 0; t < c->tiles; ++t) {
            __m512i acc[I8_MR];
            for (int r = 0; r < I8_MR; ++r) acc[r] = _mm512_set1_epi32(start[r][t]);
            for (int64_t g = c->tile_group[t]; g < c->tile_group[t + 1]; ++g) {
                __m512i bv = _mm512_loadu_si512(bs + g * 64);
                for (int r = 0; r < I8_MR; ++r)
                    acc[r] = _mm512_dpbusd_epi32(acc[r], bv, _mm512_set1_epi32(a[r][g]));
            }
            if (sat == NULL) {
                for (int r = 0; r < I8_MR; ++r) {
                    __m512i clamped = _mm512_min_epi32(_mm512_max_epi32(acc[r], neg_lim), lim);
                    total[r] = _mm512_add_ps(total[r], _mm512_cvtepi32_ps(clamped));
                }
                continue;
            }
            /* Saturation counts, branch-free: the lanes (of those stored) where the
             * clamp changed a sum, their popcount, and |sum| added under that mask
             * (|sum| < 2^31 by i8_setup_a: no wrap). Rows past M are not outputs. */
            __m512i tile_sums = _mm512_setzero_si512();
            for (int r = 0; r < I8_MR; ++r) {
                __m512i clamped = _mm512_min_epi32(_mm512_max_epi32(acc[r], neg_lim), lim);
                total[r] = _mm512_add_ps(total[r], _mm512_cvtepi32_ps(clamped));
                if (r >= rows) continue;
                __mmask16 over = _mm512_mask_cmpneq_epi32_mask(mask, acc[r], clamped);
                count += __builtin_popcount((unsigned)over);
                tile_sums = _mm512_mask_add_epi32(tile_sums, over, tile_sums, _mm512_abs_epi32(acc[r]));
                if (widen_rows) sums = i8_widen(sums, tile_sums), tile_sums = _mm512_setzero_si512();
            }
            sums = i8_widen(sums, tile_sums);
        }
        if (count) { /* the excess is sum |sum| - limit: sat_collect takes the limit off once per count */
            sat->count[0] += (double)count;
            sat->sum[0] += (double)_mm512_reduce_add_epi64(sums);
        }
        for (int r = 0; r < rows; ++r) _mm512_mask_storeu_ps(Y + (m0 + r) * ldy + j, mask, total[r]);
    }
}

static void i8_product(void *arg, int64_t begin, int64_t end, int worker) {
    const i8_ctx *c = (const i8_ctx *)arg;
    sat_slot *sat = c->slots != NULL ? &c->slots[worker] : NULL;
    for (int64_t s = begin; s < end; ++s) {
        int64_t j = s * NV, lanes = c->J - j < NV ? c->J - j : NV;
        i8_block(c, c->b + s * c->groups * 64, c->Y, c->J, j, (__mmask16)((1u << lanes) - 1), sat);
    }
}

#endif /* HDQT_INT8 */

#ifdef HDQT_INT8_ANY
/* The tile groups of the reduction, and A packed with its tiles' starting sums
 * (c->variant, c->offset and c->b_top set before). 0; 1 when A is not signed bytes,
 * or a sum could leave int32 or (AVX2) int16; -1 without memory. */
static int i8_setup_a(i8_ctx *c, int threads) {
    c->tiles = (c->K + c->tile - 1) / c->tile;
    c->tile_group = (int64_t *)malloc((size_t)(c->tiles + 1) * sizeof(int64_t));
    if (c->tile_group == NULL) return -1;
    c->tile_group[0] = 0;
    for (int64_t t = 0; t < c->tiles; ++t) {
        int64_t len = (t + 1) * c->tile < c->K ? c->tile : c->K - t * c->tile;
        c->tile_group[t + 1] = c->tile_group[t] + (len + 3) / 4;
    }
    c->groups = c->tile_group[c->tiles];
    c->a = (int32_t *)malloc((size_t)(c->M * c->groups) * sizeof(int32_t));
    c->start = (int32_t *)malloc((size_t)(c->M * c->tiles) * sizeof(int32_t));
    if (c->a == NULL || c->start == NULL) return -1;
    range_fn pack = i8p_pack_a;
#ifdef HDQT_INT8
    if (c->variant == I8_AVX512VNNI) pack = i8_pack_a;
    if (c->variant == I8_AVX2 || c->variant == I8_AVXVNNI) pack = i8x_pack_a;
#endif
    int used = parallel_for(c->M, threads, (1 << 14) / c->K + 1, pack, c);
    if (any_bad(c->bad, used)) return 1;
    int32_t a_max = 0;
    for (int t = 0; t < used; ++t) a_max = c->a_max[t] > a_max ? c->a_max[t] : a_max;
    c->a_top = a_max;
    /* AVX2's 16-bit pair sums must not saturate: |pair| <= 2 * max|A| * max(B + offset)
     * (see i8_dot_avx2) */
    if (c->variant == I8_AVX2 && 2.0 * a_max * c->b_top > 32767.0) return 1;
    /* and the int16 sums of that many groups' pairs must not either (int8_x86.c) */
    const double pair = 2.0 * a_max * c->b_top;
    c->pair_groups = pair > 0.0 ? (int64_t)(32767.0 / pair) : c->groups + 1;
    /* every tile's int32 sum must be exact: it starts at -offset * (A's sum) and adds
     * products of at most max|A| * max|B + offset| */
    double length = c->tile < c->K ? (double)c->tile : (double)c->K;
    c->sum_bound = length * a_max * ((double)c->b_top + abs(c->offset));
    return c->sum_bound < 2147483647.0 ? 0 : 1;
}

/* The variant's packing and product: AVX-512 code for AVX512-VNNI, the portable
 * packing and the variant's register block for the others. */
typedef struct {
    range_fn scan_b, pack_b, product;
} i8_kernels;

static i8_kernels i8_kernels_for(i8_ctx *c) {
    i8_kernels k = {i8p_scan_b, i8p_pack_b, i8_product_blocks};
#ifdef HDQT_INT8
    if (c->variant == I8_AVX512VNNI) k = (i8_kernels){i8_scan_b, i8_pack_b, i8_product};
    if (c->variant == I8_AVX2 || c->variant == I8_AVXVNNI) k = (i8_kernels){i8x_scan_b, i8x_pack_b, i8_product_blocks};
    if (c->variant == I8_AVX2) c->block = i8_block_avx2;
#endif
#ifdef HDQT_INT8_AVXVNNI
    if (c->variant == I8_AVXVNNI) c->block = i8_block_avxvnni;
#endif
#ifdef HDQT_INT8_SDOT
    if (c->variant == I8_SDOT) c->block = i8_block_sdot;
#endif
    return k;
}
#endif /* HDQT_INT8_ANY */

/* Y (M, J) as hdqt_tiled_matmul_f32, on int8 dot products (the variant of
 * i8_variant_now); B is (K, J) row-major, or (J, K) with b_transposed. Returns 0; 1
 * when an operand does not fit in bytes, a tile's sum could leave int32, or AVX2's
 * pair sums could saturate (nothing written: use the float32 kernel); 2 without
 * int8 dot products (or HDQT_INT8=0); -1 if no buffer could be allocated. tile >= K
 * with limit >= 2^31 - 1 is the exact, unsaturated product. saturation: NULL, or 2
 * doubles that receive the saturation counts as in hdqt_tiled_matmul_f32 (written
 * only when it returns 0). */
int hdqt_tiled_matmul_i8(const float *A, int64_t sm, int64_t sk, const float *B, int b_transposed, float *Y,
                         int64_t M, int64_t K, int64_t J, int64_t tile, float limit, double *saturation,
                         int threads) {
#ifdef HDQT_INT8_ANY
    const int variant = i8_variant_now();
    if (variant == I8_NONE) return 2;
    threads = clamp_i8_threads(threads);
    if (M < 1 || J < 1 || K < 1) return 1; /* nothing to gain: the float kernel handles the edge */
    i8_ctx c;
    memset(&c, 0, sizeof c);
    c.A = A, c.B = B, c.sm = sm, c.sk = sk, c.M = M, c.K = K, c.J = J, c.tile = tile, c.Y = Y;
    c.b_transposed = b_transposed, c.variant = variant;
    c.limit = limit >= 2147483647.0f ? 2147483647 : (int32_t)limit;
    const i8_kernels kernels = i8_kernels_for(&c);
    int used = parallel_for(K * J, threads, ELEMENT_GRAIN, kernels.scan_b, &c);
    if (any_bad(c.bad, used)) return 1;
    if (i8_offset(&c, used) != 0) return 1; /* neither unsigned nor signed bytes */
    int status = i8_setup_a(&c, threads);
    const int64_t strips = (J + NV - 1) / NV;
    if (status == 0) {
        c.b = (uint8_t *)aligned_alloc(64, (size_t)(strips * c.groups) * 64);
        status = c.b == NULL ? -1 : 0;
    }
    if (status == 0) {
        parallel_for(strips, threads, 1, kernels.pack_b, &c);
        sat_slot slots[HDQT_MAX_THREADS];
        if (saturation != NULL) memset(slots, 0, sizeof slots), c.slots = slots;
        int64_t grain = ((int64_t)1 << 20) / (M * K * NV + 1) + 1;
        parallel_for(strips, threads, grain, kernels.product, &c);
        sat_collect(slots, c.limit, saturation);
    }
    i8_release(&c);
    return status;
#else
    (void)A, (void)sm, (void)sk, (void)B, (void)b_transposed, (void)Y, (void)M, (void)K, (void)J, (void)tile,
        (void)limit, (void)saturation, (void)threads;
    return 2;
#endif
}
