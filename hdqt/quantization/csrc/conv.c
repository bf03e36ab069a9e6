/* The tiled, saturating convolution as an implicit GEMM.
 * Part of the one translation unit that kernels.c includes (static helpers are
 * shared across files); not compiled on its own.
 */
/* The forward product of a quantized convolution without materialising its
 * columns (implicit GEMM): for every sample and run of 16 output positions, the
 * (K x 16) panel of columns is gathered into a buffer that stays in L1, and all
 * output channels are computed from it with the same tiled, saturating
 * accumulation as hdqt_tiled_matmul_f32. y is (B, N, OH*OW); wt is the weight
 * transposed, (K, N), with K in torch's unfold order (channel, kernel row, kernel
 * column). */
typedef struct {
    const float *x, *wt;
    float *y, *panels;
    int64_t B, C, H, W, N, kh, kw, sh, sw, ph, pw, dh, dw, OH, OW, tile;
    float limit;
    int narrow;      /* narrow register blocks (narrow_vectors) */
    sat_slot *slots; /* per-worker saturation counts, or NULL: no counting */
} conv_ctx;

/* The worker's saturation counts, or NULL. */
static inline sat_slot *conv_sat(const conv_ctx *c, int worker) {
    return c->slots != NULL ? &c->slots[worker] : NULL;
}

static void conv_pack_panel(const conv_ctx *c, int64_t b, int64_t l0, float *panel) {
    const int64_t L = c->OH * c->OW;
    int64_t base_h[NV], base_w[NV], lanes = L - l0 < NV ? L - l0 : NV;
    for (int64_t lane = 0; lane < NV; ++lane) {
        int64_t l = l0 + (lane < lanes ? lane : 0);
        base_h[lane] = (l / c->OW) * c->sh - c->ph;
        base_w[lane] = (l % c->OW) * c->sw - c->pw;
    }
    /* the run of positions lies in one output row: then for stride 1 a kernel
     * offset reads up to 16 consecutive input values, zeros outside the image */
    int one_row = lanes == NV && base_h[0] == base_h[NV - 1] && c->sw == 1;
    float *dst = panel;
    for (int64_t ch = 0; ch < c->C; ++ch) {
        const float *img = c->x + (b * c->C + ch) * c->H * c->W;
        for (int64_t ki = 0; ki < c->kh; ++ki) {
            for (int64_t kj = 0; kj < c->kw; ++kj, dst += NV) {
                if (one_row) {
                    int64_t ih = base_h[0] + ki * c->dh, iw = base_w[0] + kj * c->dw;
                    if (ih < 0 || ih >= c->H) {
                        memset(dst, 0, NV * sizeof(float));
                        continue;
                    }
                    const float *src = img + ih * c->W + iw;
                    if (iw >= 0 && iw + NV <= c->W) { /* the common case: one constant-size copy */
                        memcpy(dst, src, NV * sizeof(float));
                        continue;
                    }
                    int64_t first = iw < 0 ? -iw : 0, stop = c->W - iw < NV ? c->W - iw : NV;
                    if (first >= stop) {
                        memset(dst, 0, NV * sizeof(float));
                        continue;
                    }
                    for (int64_t lane = 0; lane < first; ++lane) dst[lane] = 0.0f;
                    memcpy(dst + first, src + first, (size_t)(stop - first) * sizeof(float));
                    for (int64_t lane = stop; lane < NV; ++lane) dst[lane] = 0.0f;
                    continue;
                }
                for (int64_t lane = 0; lane < NV; ++lane) {
                    int64_t ih = base_h[lane] + ki * c->dh, iw = base_w[lane] + kj * c->dw;
                    int inside = lane < lanes && ih >= 0 && ih < c->H && iw >= 0 && iw < c->W;
                    dst[lane] = inside ? img[ih * c->W + iw] : 0.0f;
                }
            }
        }
    }
}

/* All output channels for one panel: the panel is a (K x 16) strip of the column
 * matrix, so this is the tiled product's register-blocked step with A = w (read
 * through the transposed weight's strides) and Y = sample b's (N, L) output. */
static void conv_panel_product(const conv_ctx *c, const float *panel, int64_t b, int64_t l0, sat_slot *sat) {
    const int64_t L = c->OH * c->OW, K = c->C * c->kh * c->kw;
    const int64_t lanes = L - l0 < NV ? L - l0 : NV; /* the panel's lanes past L are zero: not counted either */
    tmm_ctx t = {c->wt, NULL, c->y + b * c->N * L, 1, c->N, c->N, K, L, c->tile, c->limit, c->narrow, sat, NULL};
    tmm_vector_block(&t, panel, NV, l0, lanes);
}

static void conv_range(void *arg, int64_t begin, int64_t end, int worker) {
    const conv_ctx *c = (const conv_ctx *)arg;
    const int64_t L = c->OH * c->OW, runs = (L + NV - 1) / NV, K = c->C * c->kh * c->kw;
    float *panel = c->panels + worker * K * NV; /* one L1-sized panel per worker */
    sat_slot *sat = conv_sat(c, worker);
    for (int64_t unit = begin; unit < end; ++unit) {
        int64_t b = unit / runs, l0 = (unit % runs) * NV;
        conv_pack_panel(c, b, l0, panel);
        conv_panel_product(c, panel, b, l0, sat);
    }
}

/* Stride 1 along the width: no panel. For a band of up to CONV_BAND output rows
 * of one sample, the input rows the band reads are copied, zero-padded, into a
 * small per-worker buffer (C x band_in rows of W + 2 * pw + 16 floats, in L1 or
 * L2). Column k = (channel, kernel row ki, kernel column kj) of the run of 16
 * positions at (oh, ow0) is then the 16 consecutive floats at buffer row
 * (channel, (oh - oh0) * sh + ki * dh), column ow0 + kj * dw, which the product
 * loads in place through an offset table. Each input row is copied about once,
 * against kh * kw times into panels, with no branch per column and run. */
#define CONV_BAND 8

/* Unit `unit` of the band split: sample b, output rows [oh0, oh1), and the input
 * rows they read, ih0 .. ih0 + used - 1 (some may lie in the padding). */
typedef struct {
    int64_t b, oh0, oh1, ih0, used;
} conv_band;

static conv_band band_of(const conv_ctx *c, int64_t unit) {
    const int64_t bands = (c->OH + CONV_BAND - 1) / CONV_BAND;
    conv_band band;
    band.b = unit / bands, band.oh0 = unit % bands * CONV_BAND;
    band.oh1 = band.oh0 + CONV_BAND < c->OH ? band.oh0 + CONV_BAND : c->OH;
    band.ih0 = band.oh0 * c->sh - c->ph;
    band.used = (band.oh1 - 1 - band.oh0) * c->sh + (c->kh - 1) * c->dh + 1;
    return band;
}

typedef struct {
    const conv_ctx *c;
    float *rows;         /* per worker: C * band_in rows of row_len floats */
    const int64_t *koff; /* K offsets into a worker's rows, for the band's first output row */
    int64_t row_len, band_in;
} conv_rows_ctx;

static void conv_rows_range(void *arg, int64_t begin, int64_t end, int worker) {
    const conv_rows_ctx *rc = (const conv_rows_ctx *)arg;
    const conv_ctx *c = rc->c;
    const int64_t L = c->OH * c->OW, K = c->C * c->kh * c->kw;
    const int64_t row_len = rc->row_len;
    float *rows = rc->rows + worker * c->C * rc->band_in * row_len;
    /* the padding columns are never written again, so they stay zero */
    memset(rows, 0, (size_t)(c->C * rc->band_in * row_len) * sizeof(float));
    for (int64_t unit = begin; unit < end; ++unit) {
        const conv_band band = band_of(c, unit);
        const int64_t b = band.b, oh0 = band.oh0, oh1 = band.oh1;
        for (int64_t ch = 0; ch < c->C; ++ch) {
            const float *img = c->x + (b * c->C + ch) * c->H * c->W;
            for (int64_t r = 0; r < band.used; ++r) {
                float *dst = rows + (ch * rc->band_in + r) * row_len;
                int64_t ih = band.ih0 + r;
                if (ih < 0 || ih >= c->H) memset(dst, 0, (size_t)row_len * sizeof(float));
                else memcpy(dst + c->pw, img + ih * c->W, (size_t)c->W * sizeof(float));
            }
        }
        tmm_ctx t = {c->wt, NULL, c->y + b * c->N * L, 1, c->N, c->N, K, L, c->tile, c->limit, c->narrow,
                     conv_sat(c, worker), NULL};
        for (int64_t oh = oh0; oh < oh1; ++oh) {
            const float *base = rows + (oh - oh0) * c->sh * row_len;
            for (int64_t ow0 = 0; ow0 < c->OW; ow0 += NV) {
                int64_t lanes = c->OW - ow0 < NV ? c->OW - ow0 : NV; /* extra lanes are computed, not stored */
                tmm_vector_block_offsets(&t, base + ow0, rc->koff, oh * c->OW + ow0, lanes);
            }
        }
    }
}

static int conv_direct(const conv_ctx *c, int threads) {
    const int64_t K = c->C * c->kh * c->kw, row_len = c->W + 2 * c->pw + NV;
    const int64_t band_in = (CONV_BAND - 1) * c->sh + (c->kh - 1) * c->dh + 1;
    float *rows = (float *)malloc((size_t)threads * c->C * band_in * row_len * sizeof(float));
    int64_t *koff = (int64_t *)malloc((size_t)K * sizeof(int64_t));
    if (rows == NULL || koff == NULL) {
        free(rows);
        free(koff);
        return -1;
    }
    for (int64_t k = 0; k < K; ++k) { /* k = (channel, ki, kj) in unfold order */
        int64_t ch = k / (c->kh * c->kw), ki = k / c->kw % c->kh, kj = k % c->kw;
        koff[k] = (ch * band_in + ki * c->dh) * row_len + kj * c->dw;
    }
    conv_rows_ctx rc = {c, rows, koff, row_len, band_in};
    const int64_t bands = (c->OH + CONV_BAND - 1) / CONV_BAND;
    int64_t grain = ((int64_t)1 << 20) / (c->N * K * c->OW * CONV_BAND + 1) + 1;
    parallel_for(c->B * bands, threads, grain, conv_rows_range, &rc);
    free(rows);
    free(koff);
    return 0;
}

/* Returns 0, or -1 if the panel buffers could not be allocated. saturation: NULL,
 * or 2 doubles that receive how many tile sums of the stored outputs saturated
 * and the sum of |sum| - limit over them (written when it returns 0). */
int hdqt_conv_tiled_f32(const float *x, const float *wt, float *y, int64_t B, int64_t C, int64_t H, int64_t W,
                        int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh,
                        int64_t dw, int64_t OH, int64_t OW, int64_t N, int64_t tile, float limit, double *saturation,
                        int threads) {
    if (threads > HDQT_MAX_THREADS) threads = HDQT_MAX_THREADS;
    if (threads < 1) threads = 1;
    const int64_t L = OH * OW, runs = (L + NV - 1) / NV, K = C * kh * kw;
    sat_slot slots[HDQT_MAX_THREADS];
    if (saturation != NULL) memset(slots, 0, sizeof slots);
    conv_ctx c = {x, wt, y, NULL, B, C, H, W, N, kh, kw, sh, sw, ph, pw, dh, dw, OH, OW, tile, limit,
                  narrow_vectors(), saturation != NULL ? slots : NULL};
    int status = 0;
    if (sw == 1) {
        status = conv_direct(&c, threads);
    } else {
        float *panels = (float *)aligned_alloc(64, (size_t)threads * K * NV * sizeof(float));
        if (panels == NULL) return -1;
        c.panels = panels;
        int64_t grain = ((int64_t)1 << 20) / (N * K * NV + 1) + 1;
        parallel_for(B * runs, threads, grain, conv_range, &c);
        free(panels);
    }
    if (status == 0) sat_collect(slots, limit, saturation);
    return status;
}
