/* The int8 variant for aarch64: the ARMv8.2 dot product (sdot, vdotq_s32), signed
 * bytes times signed bytes into int32 lanes, 4 pairs per lane. B is packed as
 * signed bytes (a B in [128, 255] offset by -128, see i8_offset); the rest is
 * i8_block's: exact int32 tile sums, clamped and added to float32 totals in tile
 * order, bit for bit hdqt_tiled_matmul_f32. Chosen where the CPU has the
 * instructions (int8_variant.h).
 * Part of the one translation unit that kernels.c includes (static helpers are
 * shared across files); not compiled on its own. */
#ifdef HDQT_INT8_SDOT

#define I8S_MR 4 /* rows of A per block: 16 accumulators of the 32 NEON registers */

INT8_SDOT_TARGET
static void i8_block_sdot(const i8_ctx *c, const uint8_t *bs, float *Y, int64_t ldy, int64_t j, int64_t lanes,
                          sat_slot *sat) {
    const int32x4_t lim = vdupq_n_s32(c->limit), neg_lim = vdupq_n_s32(-c->limit);
    uint32x4_t stored[4];
    for (int q = 0; q < 4; ++q) {
        const int32_t iota[4] = {4 * q, 4 * q + 1, 4 * q + 2, 4 * q + 3};
        stored[q] = vcltq_s32(vld1q_s32(iota), vdupq_n_s32((int32_t)lanes));
    }
    for (int64_t m0 = 0; m0 < c->M; m0 += I8S_MR) {
        int64_t rows = c->M - m0 < I8S_MR ? c->M - m0 : I8S_MR;
        const int32_t *a[I8S_MR], *start[I8S_MR];
        for (int r = 0; r < I8S_MR; ++r) { /* rows past M repeat row m0: computed, not stored */
            int64_t m = m0 + (r < rows ? r : 0);
            a[r] = c->a + m * c->groups, start[r] = c->start + m * c->tiles;
        }
        float32x4_t total[I8S_MR][4];
        for (int r = 0; r < I8S_MR; ++r)
            for (int q = 0; q < 4; ++q) total[r][q] = vdupq_n_f32(0.0f);
        uint64_t count = 0;           /* with sat: the block's saturated tile sums */
        int64x2_t sums = vdupq_n_s64(0); /* and the sum of their |sum| */
        for (int64_t t = 0; t < c->tiles; ++t) {
            int32x4_t acc[I8S_MR][4];
            for (int r = 0; r < I8S_MR; ++r)
                for (int q = 0; q < 4; ++q) acc[r][q] = vdupq_n_s32(start[r][t]);
            for (int64_t g = c->tile_group[t]; g < c->tile_group[t + 1]; ++g) {
                int8x16_t b[4];
                for (int q = 0; q < 4; ++q) b[q] = vld1q_s8((const int8_t *)(bs + g * 64 + 16 * q));
                for (int r = 0; r < I8S_MR; ++r) {
                    int8x16_t av = vreinterpretq_s8_s32(vdupq_n_s32(a[r][g]));
                    for (int q = 0; q < 4; ++q) acc[r][q] = vdotq_s32(acc[r][q], b[q], av);
                }
            }
            for (int r = 0; r < I8S_MR; ++r) {
                for (int q = 0; q < 4; ++q) {
                    int32x4_t clamped = vminq_s32(vmaxq_s32(acc[r][q], neg_lim), lim);
                    total[r][q] = vaddq_f32(total[r][q], vcvtq_f32_s32(clamped));
                    if (sat == NULL || r >= rows) continue;
                    /* the stored lanes where the clamp changed the sum: count, add |sum| (int64) */
                    uint32x4_t over = vandq_u32(vmvnq_u32(vceqq_s32(acc[r][q], clamped)), stored[q]);
                    count += vaddvq_u32(vshrq_n_u32(over, 31));
                    int32x4_t mag = vandq_s32(vabsq_s32(acc[r][q]), vreinterpretq_s32_u32(over));
                    sums = vpadalq_s32(sums, mag);
                }
            }
        }
        if (count) { /* the excess is sum |sum| - limit: sat_collect takes the limit off once per count */
            sat->count[0] += (double)count;
            sat->sum[0] += (double)vaddvq_s64(sums);
        }
        for (int r = 0; r < rows; ++r) {
            float out[NV];
            for (int q = 0; q < 4; ++q) vst1q_f32(out + 4 * q, total[r][q]);
            memcpy(Y + (m0 + r) * ldy + j, out, (size_t)lanes * sizeof(float));
        }
    }
}

#endif /* HDQT_INT8_SDOT */
