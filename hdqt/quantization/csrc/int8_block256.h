/* The register blocks of the 256-bit int8 variants, as a template: int8_x86.c
 * includes it once per variant with I8B_NAME (the product's block), I8B_DW_NAME
 * (the conv weight gradient's dot rows), I8B_TARGET (their instruction sets) and
 * I8B_DOT(acc, b, a) (acc + the 8 dot products of 4 unsigned
 * bytes of b with 4 signed bytes of a, as int32 lanes) defined, and optionally
 * I8B_PAIRS(b, a) (the 16 int16 sums of 2 such byte products: AVX2's vpmaddubsw),
 * with which the product's block adds several groups in int16 before widening.
 *
 * i8_block (matmul_int8.c) on two 256-bit halves of each 16-lane strip, I8B_MR rows
 * of A per block: the same exact int32 tile sums, clamped and added to float32 totals
 * in tile order, so Y is bit for bit that of hdqt_tiled_matmul_f32; the saturation
 * counts likewise. */
/* Rows of A per block: 4, or 3 with I8B_PAIRS, whose 6 int16 sums, 2 strips of B and
 * 3 broadcasts fit the 16 ymm registers (at 4 rows GCC kept one sum in memory, and
 * the store-to-load chain through it made the loop ~2x slower). */
#ifdef I8B_PAIRS
#define I8B_MR 3
#else
#define I8B_MR 4
#endif

I8B_TARGET
static void I8B_NAME(const i8_ctx *c, const uint8_t *bs, float *Y, int64_t ldy, int64_t j, int64_t lanes,
                     sat_slot *sat) {
    const __m256i lim = _mm256_set1_epi32(c->limit), neg_lim = _mm256_set1_epi32(-c->limit);
    const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i stored[2] = {_mm256_cmpgt_epi32(_mm256_set1_epi32((int32_t)lanes), iota),
                               _mm256_cmpgt_epi32(_mm256_set1_epi32((int32_t)lanes - 8), iota)};
    /* a tile's |sums|, added over the block's rows in int32, could wrap: widen per row */
    const int widen_rows = c->sum_bound * I8B_MR >= 2147483647.0;
    for (int64_t m0 = 0; m0 < c->M; m0 += I8B_MR) {
        int64_t rows = c->M - m0 < I8B_MR ? c->M - m0 : I8B_MR;
        const int32_t *a[I8B_MR], *start[I8B_MR];
        for (int r = 0; r < I8B_MR; ++r) { /* rows past M repeat row m0: computed, not stored */
            int64_t m = m0 + (r < rows ? r : 0);
            a[r] = c->a + m * c->groups, start[r] = c->start + m * c->tiles;
        }
        __m256 total[I8B_MR][2];
        for (int r = 0; r < I8B_MR; ++r) total[r][0] = total[r][1] = _mm256_setzero_ps();
        int64_t count = 0;                     /* with sat: the block's saturated tile sums */
        __m256i sums = _mm256_setzero_si256(); /* and the sum of their |sum|, 4 int64 lanes */
        for (int64_t t = 0; t < c->tiles; ++t) {
            __m256i acc[I8B_MR][2];
            for (int r = 0; r < I8B_MR; ++r) acc[r][0] = acc[r][1] = _mm256_set1_epi32(start[r][t]);
#ifdef I8B_PAIRS
            /* Two stages: the int16 pair sums of up to c->pair_groups groups are added
             * in int16 (exact: i8_setup_a bounds them below 2^15), then widened into the
             * int32 accumulators by one vpmaddwd. The multiplier port does one
             * instruction per group and row instead of two. */
            for (int64_t g = c->tile_group[t], end = c->tile_group[t + 1]; g < end;) {
                const int64_t stop = end - g < c->pair_groups ? end : g + c->pair_groups;
                __m256i pairs[I8B_MR][2];
                for (int r = 0; r < I8B_MR; ++r) pairs[r][0] = pairs[r][1] = _mm256_setzero_si256();
                for (; g < stop; ++g) {
                    __m256i b0 = _mm256_loadu_si256((const __m256i *)(bs + g * 64));
                    __m256i b1 = _mm256_loadu_si256((const __m256i *)(bs + g * 64 + 32));
                    for (int r = 0; r < I8B_MR; ++r) {
                        __m256i av = _mm256_set1_epi32(a[r][g]);
                        pairs[r][0] = _mm256_add_epi16(pairs[r][0], I8B_PAIRS(b0, av));
                        pairs[r][1] = _mm256_add_epi16(pairs[r][1], I8B_PAIRS(b1, av));
                    }
                }
                for (int r = 0; r < I8B_MR; ++r)
                    for (int h = 0; h < 2; ++h)
                        acc[r][h] = _mm256_add_epi32(acc[r][h], _mm256_madd_epi16(pairs[r][h], _mm256_set1_epi16(1)));
            }
#else
            for (int64_t g = c->tile_group[t]; g < c->tile_group[t + 1]; ++g) {
                __m256i b0 = _mm256_loadu_si256((const __m256i *)(bs + g * 64));
                __m256i b1 = _mm256_loadu_si256((const __m256i *)(bs + g * 64 + 32));
                for (int r = 0; r < I8B_MR; ++r) {
                    __m256i av = _mm256_set1_epi32(a[r][g]);
                    acc[r][0] = I8B_DOT(acc[r][0], b0, av);
                    acc[r][1] = I8B_DOT(acc[r][1], b1, av);
                }
            }
#endif
            __m256i tile_sums = _mm256_setzero_si256();
            for (int r = 0; r < I8B_MR; ++r) {
                for (int h = 0; h < 2; ++h) {
                    __m256i clamped = _mm256_min_epi32(_mm256_max_epi32(acc[r][h], neg_lim), lim);
                    total[r][h] = _mm256_add_ps(total[r][h], _mm256_cvtepi32_ps(clamped));
                    if (sat == NULL || r >= rows) continue;
                    /* the stored lanes where the clamp changed the sum: count them, add |sum|
                     * (< 2^31 by i8_setup_a: no wrap) */
                    __m256i over = _mm256_andnot_si256(_mm256_cmpeq_epi32(acc[r][h], clamped), stored[h]);
                    count += __builtin_popcount((unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(over)));
                    tile_sums = _mm256_add_epi32(tile_sums, _mm256_and_si256(over, _mm256_abs_epi32(acc[r][h])));
                }
                if (sat != NULL && widen_rows) sums = i8b_widen(sums, tile_sums), tile_sums = _mm256_setzero_si256();
            }
            if (sat != NULL) sums = i8b_widen(sums, tile_sums);
        }
        if (count) { /* the excess is sum |sum| - limit: sat_collect takes the limit off once per count */
            int64_t parts[4];
            _mm256_storeu_si256((__m256i *)parts, sums);
            sat->count[0] += (double)count;
            sat->sum[0] += (double)(parts[0] + parts[1] + parts[2] + parts[3]);
        }
        for (int r = 0; r < rows; ++r) {
            float *y = Y + (m0 + r) * ldy + j;
            if (lanes == NV) {
                _mm256_storeu_ps(y, total[r][0]), _mm256_storeu_ps(y + 8, total[r][1]);
                continue;
            }
            _mm256_maskstore_ps(y, stored[0], total[r][0]);
            if (lanes > 8) _mm256_maskstore_ps(y + 8, stored[1], total[r][1]);
        }
    }
}

/* dot_rows_i8 (conv_weight_grad.c) on 256-bit registers: the N gradient rows gb
 * (+ 128, unsigned bytes) against `count` <= 4 column rows r (signed bytes; the
 * buffer holds 4), sums their sums; 4 gradient rows x 2 column rows per block. The
 * same exact int32 sums, so the same floats. */
I8B_TARGET
static void I8B_DW_NAME(const uint8_t *gb, int64_t N, const int8_t *r, const int32_t *sums, int64_t padded,
                        int64_t K, int64_t k, int count, float *part) {
    for (int64_t n0 = 0; n0 < N; n0 += 4) {
        const int64_t rows = N - n0 < 4 ? N - n0 : 4;
        const uint8_t *g[4];
        for (int i = 0; i < 4; ++i) g[i] = gb + (n0 + (i < rows ? i : 0)) * padded;
        for (int j0 = 0; j0 < count; j0 += 2) { /* the buffer holds 4 rows: row j0 + 1 exists */
            __m256i acc[4][2];
            for (int i = 0; i < 4; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_si256();
            const int8_t *r0 = r + j0 * padded, *r1 = r0 + padded;
            for (int64_t l = 0; l < padded; l += 32) {
                __m256i v0 = _mm256_loadu_si256((const __m256i *)(r0 + l));
                __m256i v1 = _mm256_loadu_si256((const __m256i *)(r1 + l));
                for (int i = 0; i < 4; ++i) {
                    __m256i gv = _mm256_loadu_si256((const __m256i *)(g[i] + l));
                    acc[i][0] = I8B_DOT(acc[i][0], gv, v0);
                    acc[i][1] = I8B_DOT(acc[i][1], gv, v1);
                }
            }
            for (int i = 0; i < rows; ++i) {
                for (int j = 0; j < 2 && j0 + j < count; ++j) {
                    int32_t lanes[8], total = 0;
                    _mm256_storeu_si256((__m256i *)lanes, acc[i][j]);
                    for (int q = 0; q < 8; ++q) total += lanes[q];
                    part[(n0 + i) * K + k + j0 + j] += (float)(total - 128 * sums[j0 + j]);
                }
            }
        }
    }
}

#undef I8B_MR
