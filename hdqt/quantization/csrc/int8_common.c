/* What every int8 dot-product variant shares: the packed operands of a tiled
 * product (i8_ctx), the byte offset of B, and small helpers.
 * Part of the one translation unit that kernels.c includes (static helpers are
 * shared across files); not compiled on its own.
 *
 * Every variant packs the same layout (see matmul_int8.c): A as (M, groups) int32
 * words of 4 signed bytes, B as 16-lane strips of (groups, 16 lanes, 4 bytes), a
 * tile's reduction cut into groups of 4 that never straddle two tiles. The x86
 * variants multiply unsigned bytes of B with signed bytes of A (a signed B offset
 * by +128, or on AVX2 by -min(B)); sdot multiplies signed bytes (a B in [128, 255]
 * offset by -128). Each tile's sum starts at -offset * (its part of A's row sum), so
 * that it is exactly the integer sum of the float kernel. */
#ifdef HDQT_INT8_ANY

#define I8_MR 8 /* rows of A per register block (AVX-512) */

typedef struct i8_ctx i8_ctx;

/* All M rows of Y against one packed 16-lane strip bs of B: Y[m * ldy + j + lane]
 * for lane < lanes; sat: NULL, or the worker's saturation counts (see sat_slot). */
typedef void (*i8_block_fn)(const i8_ctx *c, const uint8_t *bs, float *Y, int64_t ldy, int64_t j, int64_t lanes,
                            sat_slot *sat);

struct i8_ctx {
    const float *A, *B;
    int64_t sm, sk, M, K, J, tile, tiles, groups;
    int32_t *a;          /* (M, groups) */
    uint8_t *b;          /* (strips, groups, 16, 4) */
    int32_t *start;      /* (M, tiles): where each tile's accumulator starts */
    int64_t *tile_group; /* (tiles + 1): first group of each tile */
    float *Y;
    int32_t limit, offset;
    int32_t b_top;    /* the largest |byte| of packed B (i8_offset) */
    int32_t a_top;    /* the largest |A| (i8_setup_a) */
    double sum_bound; /* the largest |tile sum| the operands allow (i8_setup_a) */
    int64_t pair_groups; /* AVX2: groups whose int16 pair sums add exactly (i8_setup_a) */
    int b_transposed; /* B given as (J, K) row-major */
    int variant;      /* I8_AVX512VNNI, ... (int8_variant.h) */
    i8_block_fn block;  /* the variant's register block (not AVX512-VNNI's) */
    sat_slot *slots;  /* per-worker saturation counts, or NULL: no counting */
    int bad[HDQT_MAX_THREADS];
    int32_t a_max[HDQT_MAX_THREADS]; /* max |A| */
    float lo[HDQT_MAX_THREADS], hi[HDQT_MAX_THREADS];
};

static int any_bad(const int *bad, int used) {
    int b = 0;
    for (int t = 0; t < used; ++t) b |= bad[t];
    return b;
}

static void i8_release(i8_ctx *c) {
    free(c->tile_group);
    free(c->a);
    free(c->start);
    free(c->b);
}

/* B's byte offset for the variant (c->variant set before), from the scan's per-worker
 * ranges of B: unsigned bytes (x86) take B in [0, 255] as it is and B in [-128, 127]
 * + 128 (AVX2: - min(B), the least that makes it unsigned); signed bytes (sdot) take
 * B in [-128, 127] as it is and B in [0, 255] - 128.
 * Sets c->offset and c->b_top (the largest |B + offset|); 0, or 1 when B fits neither. */
static int i8_offset(i8_ctx *c, int used) {
    float l = 0.0f, h = 0.0f;
    for (int t = 0; t < used; ++t) l = c->lo[t] < l ? c->lo[t] : l, h = c->hi[t] > h ? c->hi[t] : h;
    if (l < 0.0f && h > 127.0f) return 1;
    if (c->variant == I8_SDOT) c->offset = h > 127.0f ? -128 : 0;
    /* AVX2's int16 pair sums: the smallest offset keeps B + offset, and so the pairs, small */
    else if (c->variant == I8_AVX2) c->offset = l < 0.0f ? (int32_t)(-l) : 0;
    else c->offset = l < 0.0f ? 128 : 0;
    float top_hi = h + (float)c->offset, top_lo = l + (float)c->offset;
    c->b_top = (int32_t)(top_hi > -top_lo ? top_hi : -top_lo);
    return 0;
}

static int clamp_i8_threads(int threads) {
    return threads < 1 ? 1 : (threads > HDQT_MAX_THREADS ? HDQT_MAX_THREADS : threads);
}

/* The product over strips [begin, end) by the variant's block (c->block). */
static void i8_product_blocks(void *arg, int64_t begin, int64_t end, int worker) {
    const i8_ctx *c = (const i8_ctx *)arg;
    sat_slot *sat = c->slots != NULL ? &c->slots[worker] : NULL;
    for (int64_t s = begin; s < end; ++s) {
        int64_t j = s * NV, lanes = c->J - j < NV ? c->J - j : NV;
        c->block(c, c->b + s * c->groups * 64, c->Y, c->J, j, lanes, sat);
    }
}

#endif /* HDQT_INT8_ANY */
