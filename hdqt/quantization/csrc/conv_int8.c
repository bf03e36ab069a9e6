/* The tiled, saturating convolution on 8-bit integer dot products (every variant
 * of int8_variant.h: AVX-512 code for AVX512-VNNI, portable code around the
 * variant's register block for the others).
 * Part of the one translation unit that kernels.c includes (static helpers are
 * shared across files); not compiled on its own.
 *
 * The direct path of conv.c (width stride 1) in bytes: a band of input rows is
 * converted once into zero-padded byte rows (offset by +128 for a signed input),
 * and for each run of 16 output positions the 4 columns of every group of the
 * reduction are interleaved from 4 rows of that band into one 64-byte vector,
 * the layout vpdpbusd pairs with the weights' 4-byte words. All output channels
 * are then computed from those vectors by the int8 product's register block
 * (i8_block), with the same tiles, clamps and float32 totals: the result equals
 * hdqt_conv_tiled_f32's bit for bit. */
#ifdef HDQT_INT8_ANY

typedef struct {
    const conv_ctx *c;
    const i8_ctx *p;       /* the weights, packed, and the tile groups */
    const int64_t *koff;   /* K byte offsets into a worker's band, for the band's first output row */
    uint8_t *bands, *panels;
    int64_t row_len, band_in;
    int32_t offset;
    sat_slot *slots; /* per-worker saturation counts, or NULL: no counting */
} conv_i8_ctx;

/* A band's input rows (rows.used rows of every channel) as bytes + offset, into the
 * worker's band; rows outside the image are left at the offset (a zero input). */
INT8_PACK_TARGET
static void conv_i8_band_bytes(const conv_i8_ctx *ic, const conv_band *rows, uint8_t *band) {
    const conv_ctx *c = ic->c;
    for (int64_t ch = 0; ch < c->C; ++ch) {
        const float *img = c->x + (rows->b * c->C + ch) * c->H * c->W;
        for (int64_t r = 0; r < rows->used; ++r) {
            uint8_t *dst = band + (ch * ic->band_in + r) * ic->row_len + c->pw;
            int64_t ih = rows->ih0 + r;
            if (ih < 0 || ih >= c->H) {
                memset(dst - c->pw, (int)(uint8_t)ic->offset, (size_t)ic->row_len);
                continue;
            }
            const float *src = img + ih * c->W;
#ifdef HDQT_INT8_AVX2
            if (ic->p->variant == I8_AVX2 || ic->p->variant == I8_AVXVNNI) {
                i8x_row_bytes(src, c->W, ic->offset, dst);
                continue;
            }
#endif
            for (int64_t iw = 0; iw < c->W; ++iw) dst[iw] = (uint8_t)((int32_t)src[iw] + ic->offset);
        }
    }
}

/* conv_i8_range for the variants other than AVX512-VNNI: the same band and panel,
 * the panel's groups interleaved by i8_interleave4, the product by p->block. */
static void conv_i8_range_blocks(void *arg, int64_t begin, int64_t end, int worker) {
    const conv_i8_ctx *ic = (const conv_i8_ctx *)arg;
    const conv_ctx *c = ic->c;
    const i8_ctx *p = ic->p;
    const int64_t L = c->OH * c->OW, row_len = ic->row_len;
    uint8_t *band = ic->bands + worker * c->C * ic->band_in * row_len;
    uint8_t *panel = ic->panels + worker * p->groups * 64;
    static const uint8_t none[NV] = {0}; /* the padding columns of a tile's last group: A's bytes are 0 */
    sat_slot *sat = ic->slots != NULL ? &ic->slots[worker] : NULL;
    memset(band, (int)(uint8_t)ic->offset, (size_t)(c->C * ic->band_in * row_len));
    for (int64_t unit = begin; unit < end; ++unit) {
        const conv_band rows = band_of(c, unit);
        conv_i8_band_bytes(ic, &rows, band);
        for (int64_t oh = rows.oh0; oh < rows.oh1; ++oh) {
            const uint8_t *base = band + (oh - rows.oh0) * c->sh * row_len;
            for (int64_t ow0 = 0; ow0 < c->OW; ow0 += NV) {
                int64_t lanes = c->OW - ow0 < NV ? c->OW - ow0 : NV; /* extra lanes are computed, not stored */
                for (int64_t t = 0; t < p->tiles; ++t) {
                    int64_t k0 = t * p->tile, k1 = k0 + p->tile < p->K ? k0 + p->tile : p->K;
                    for (int64_t k = k0, g = p->tile_group[t]; k < k1; k += 4, ++g) {
                        const uint8_t *row[4];
                        for (int i = 0; i < 4; ++i) row[i] = k + i < k1 ? base + ic->koff[k + i] + ow0 : none;
                        i8_interleave4(row, panel + g * 64);
                    }
                }
                p->block(p, panel, c->y + rows.b * c->N * L, L, oh * c->OW + ow0, lanes, sat);
            }
        }
    }
}

#endif /* HDQT_INT8_ANY */

#ifdef HDQT_INT8

/* Four 16-byte rows a, b, c, d -> 16 lanes of 4 bytes (a[i], b[i], c[i], d[i]). */
INT8_TARGET
static inline __m512i interleave4(__m128i a, __m128i b, __m128i c, __m128i d) {
    __m128i ab_lo = _mm_unpacklo_epi8(a, b), ab_hi = _mm_unpackhi_epi8(a, b);
    __m128i cd_lo = _mm_unpacklo_epi8(c, d), cd_hi = _mm_unpackhi_epi8(c, d);
    __m512i v = _mm512_castsi128_si512(_mm_unpacklo_epi16(ab_lo, cd_lo));
    v = _mm512_inserti32x4(v, _mm_unpackhi_epi16(ab_lo, cd_lo), 1);
    v = _mm512_inserti32x4(v, _mm_unpacklo_epi16(ab_hi, cd_hi), 2);
    return _mm512_inserti32x4(v, _mm_unpackhi_epi16(ab_hi, cd_hi), 3);
}

INT8_TARGET
static void conv_i8_range(void *arg, int64_t begin, int64_t end, int worker) {
    const conv_i8_ctx *ic = (const conv_i8_ctx *)arg;
    const conv_ctx *c = ic->c;
    const i8_ctx *p = ic->p;
    const int64_t L = c->OH * c->OW, row_len = ic->row_len;
    uint8_t *band = ic->bands + worker * c->C * ic->band_in * row_len;
    uint8_t *panel = ic->panels + worker * p->groups * 64;
    static const uint8_t none[NV] = {0}; /* the padding columns of a tile's last group: A's bytes are 0 */
    sat_slot *sat = ic->slots != NULL ? &ic->slots[worker] : NULL;
    const __m512i offset = _mm512_set1_epi32(ic->offset);
    /* the padding columns stay at the offset: the byte of a zero input */
    memset(band, ic->offset, (size_t)(c->C * ic->band_in * row_len));
    for (int64_t unit = begin; unit < end; ++unit) {
        const conv_band rows = band_of(c, unit);
        const int64_t b = rows.b, oh0 = rows.oh0, oh1 = rows.oh1;
        for (int64_t ch = 0; ch < c->C; ++ch) {
            const float *img = c->x + (b * c->C + ch) * c->H * c->W;
            for (int64_t r = 0; r < rows.used; ++r) {
                uint8_t *dst = band + (ch * ic->band_in + r) * row_len;
                int64_t ih = rows.ih0 + r;
                if (ih < 0 || ih >= c->H) {
                    memset(dst, ic->offset, (size_t)row_len);
                    continue;
                }
                for (int64_t iw = 0; iw < c->W; iw += NV) {
                    int64_t n = c->W - iw < NV ? c->W - iw : NV;
                    __mmask16 lanes = (__mmask16)((1u << n) - 1);
                    __m512i q = _mm512_cvttps_epi32(_mm512_maskz_loadu_ps(lanes, img + ih * c->W + iw));
                    _mm_mask_storeu_epi8(dst + c->pw + iw, lanes, _mm512_cvtepi32_epi8(_mm512_add_epi32(q, offset)));
                }
            }
        }
        for (int64_t oh = oh0; oh < oh1; ++oh) {
            const uint8_t *base = band + (oh - oh0) * c->sh * row_len;
            for (int64_t ow0 = 0; ow0 < c->OW; ow0 += NV) {
                int64_t lanes = c->OW - ow0 < NV ? c->OW - ow0 : NV; /* extra lanes are computed, not stored */
                for (int64_t t = 0; t < p->tiles; ++t) {
                    int64_t k0 = t * p->tile, k1 = k0 + p->tile < p->K ? k0 + p->tile : p->K;
                    for (int64_t k = k0, g = p->tile_group[t]; k < k1; k += 4, ++g) {
                        const uint8_t *row[4];
                        for (int i = 0; i < 4; ++i) row[i] = k + i < k1 ? base + ic->koff[k + i] + ow0 : none;
                        __m512i v = interleave4(_mm_loadu_si128((const __m128i *)row[0]),
                                                _mm_loadu_si128((const __m128i *)row[1]),
                                                _mm_loadu_si128((const __m128i *)row[2]),
                                                _mm_loadu_si128((const __m128i *)row[3]));
                        _mm512_storeu_si512(panel + g * 64, v);
                    }
                }
                i8_block(p, panel, c->y + b * c->N * L, L, oh * c->OW + ow0, (__mmask16)((1u << lanes) - 1), sat);
            }
        }
    }
}

#endif /* HDQT_INT8 */

/* hdqt_conv_tiled_f32 at width stride 1, on int8 dot products (same arguments; the
 * variant of i8_variant_now). Returns 0; 1 when x or the weights are not bytes, the
 * stride is not 1 along the width, or the variant cannot multiply these operands
 * exactly (nothing written: use the float32 kernel); 2 without int8 dot products
 * (or HDQT_INT8=0); -1 if no
 * buffer could be allocated. saturation as in hdqt_conv_tiled_f32 (written only
 * when it returns 0). */
int hdqt_conv_tiled_i8(const float *x, const float *wt, float *y, int64_t B, int64_t C, int64_t H, int64_t W,
                       int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw,
                       int64_t OH, int64_t OW, int64_t N, int64_t tile, float limit, double *saturation,
                       int threads) {
#ifdef HDQT_INT8_ANY
    const int variant = i8_variant_now();
    if (variant == I8_NONE) return 2;
    if (sw != 1 || B < 1 || C < 1 || N < 1 || OH < 1 || OW < 1) return 1;
    threads = clamp_i8_threads(threads);
    const int64_t K = C * kh * kw;
    conv_ctx c = {x, wt, y, NULL, B, C, H, W, N, kh, kw, sh, sw, ph, pw, dh, dw, OH, OW, tile, limit, 0, NULL};
    i8_ctx p; /* the weights as A (N, K), read through the transposed wt (K, N) */
    memset(&p, 0, sizeof p);
    p.A = wt, p.sm = 1, p.sk = N, p.M = N, p.K = K, p.tile = tile, p.B = x;
    p.limit = limit >= 2147483647.0f ? 2147483647 : (int32_t)limit;
    p.variant = variant;
    const i8_kernels kernels = i8_kernels_for(&p);
    int used = parallel_for(B * C * H * W, threads, ELEMENT_GRAIN, kernels.scan_b, &p); /* x as B, flat */
    if (any_bad(p.bad, used)) return 1;
    if (i8_offset(&p, used) != 0) return 1;
    int status = i8_setup_a(&p, threads);
    /* byte rows: pw zeros, W values, and room for a run's 16 bytes past the last position */
    const int64_t row_len = W + 2 * pw + (kw - 1) * dw + 2 * NV;
    const int64_t band_in = (CONV_BAND - 1) * sh + (kh - 1) * dh + 1;
    conv_i8_ctx ic = {&c, &p, NULL, NULL, NULL, row_len, band_in, p.offset, NULL};
    sat_slot slots[HDQT_MAX_THREADS];
    if (saturation != NULL) memset(slots, 0, sizeof slots), ic.slots = slots;
    int64_t *koff = NULL;
    if (status == 0) {
        koff = (int64_t *)malloc((size_t)K * sizeof(int64_t));
        ic.bands = (uint8_t *)malloc((size_t)(threads * C * band_in * row_len));
        ic.panels = (uint8_t *)aligned_alloc(64, (size_t)(threads * p.groups * 64));
        status = koff == NULL || ic.bands == NULL || ic.panels == NULL ? -1 : 0;
    }
    if (status == 0) {
        for (int64_t k = 0; k < K; ++k) { /* k = (channel, ki, kj) in unfold order */
            int64_t ch = k / (kh * kw), ki = k / kw % kh, kj = k % kw;
            koff[k] = (ch * band_in + ki * dh) * row_len + kj * dw;
        }
        ic.koff = koff;
        const int64_t bands = (OH + CONV_BAND - 1) / CONV_BAND;
        int64_t grain = ((int64_t)1 << 20) / (N * K * OW * CONV_BAND + 1) + 1;
        range_fn range = conv_i8_range_blocks;
#ifdef HDQT_INT8
        if (variant == I8_AVX512VNNI) range = conv_i8_range;
#endif
        parallel_for(B * bands, threads, grain, range, &ic);
        sat_collect(slots, p.limit, saturation);
    }
    free(koff);
    free(ic.bands);
    free(ic.panels);
    i8_release(&p);
    return status;
#else
    (void)x, (void)wt, (void)y, (void)B, (void)C, (void)H, (void)W, (void)kh, (void)kw, (void)sh, (void)sw,
        (void)ph, (void)pw, (void)dh, (void)dw, (void)OH, (void)OW, (void)N, (void)tile, (void)limit, (void)saturation,
        (void)threads;
    return 2;
#endif
}
