/* im2col of a convolution, fused with the transform of each unfolded row.
 * Part of the one translation unit that kernels.c includes (static helpers are
 * shared across files); not compiled on its own.
 */
typedef struct {
    int64_t B, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, OH, OW;
} conv_geom;

/* One row of the unfold of x: sample b, column k = (channel, kernel row, kernel
 * column) in torch's order, along the OH*OW output positions. */
static void gather_row(const conv_geom *g, const float *x, int64_t b, int64_t k, float *r) {
    int64_t ch = k / (g->kh * g->kw), ki = k / g->kw % g->kh, kj = k % g->kw;
    const float *img = x + (b * g->C + ch) * g->H * g->W;
    int64_t off = kj * g->dw - g->pw; /* iw = ow * sw + off */
    /* output columns whose input column lies inside the image: ow in [lo, hi) */
    int64_t lo = off >= 0 ? 0 : (-off + g->sw - 1) / g->sw;
    int64_t hi = g->W - off <= 0 ? 0 : (g->W - off + g->sw - 1) / g->sw;
    if (hi > g->OW) hi = g->OW;
    if (lo > hi) lo = hi;
    for (int64_t oh = 0; oh < g->OH; ++oh) {
        int64_t ih = oh * g->sh - g->ph + ki * g->dh;
        float *dst = r + oh * g->OW;
        if (ih < 0 || ih >= g->H) {
            memset(dst, 0, (size_t)g->OW * sizeof(float));
            continue;
        }
        const float *src = img + ih * g->W + off;
        for (int64_t ow = 0; ow < lo; ++ow) dst[ow] = 0.0f;
        if (g->sw == 1) memcpy(dst + lo, src + lo, (size_t)(hi - lo) * sizeof(float));
        else for (int64_t ow = lo; ow < hi; ++ow) dst[ow] = src[ow * g->sw];
        for (int64_t ow = hi; ow < g->OW; ++ow) dst[ow] = 0.0f;
    }
}

typedef struct {
    conv_geom g;
    const float *x;
    float *out;
    int64_t p, channel_major;
    int narrow; /* fwht_row_narrow (narrow_vectors) */
    float amax[HDQT_MAX_THREADS];
} im2col_ctx;

static void im2col_range(void *arg, int64_t begin, int64_t end, int worker) {
    im2col_ctx *c = (im2col_ctx *)arg;
    const int64_t K = c->g.C * c->g.kh * c->g.kw, L = c->g.OH * c->g.OW;
    float m = 0.0f;
    for (int64_t row = begin; row < end; ++row) {
        int64_t b = row / K, k = row % K;
        /* (B, K, L) as torch's unfold, or (K, B, L): then the whole batch's columns form one
         * (K, B*L) matrix, the operand of a single product */
        float *r = c->out + (c->channel_major ? k * c->g.B + b : row) * L;
        gather_row(&c->g, c->x, b, k, r);
        if (c->p > 1) {
#ifdef HDQT_NARROW_BYTES
            if (c->narrow) fwht_row_narrow(r, L, c->p);
            else
#endif
            fwht_row(r, L, c->p);
            m = absmax_step(m, absmax_row(r, L));
        }
    }
    c->amax[worker] = m;
}

static conv_geom make_geom(int64_t B, int64_t C, int64_t H, int64_t W, int64_t kh, int64_t kw, int64_t sh,
                           int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw, int64_t OH, int64_t OW) {
    conv_geom g = {B, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, OH, OW};
    return g;
}

/* The unfold (im2col) of x (B, C, H, W): rows of length OH*OW, one per sample and
 * (channel, kernel row, kernel column) in torch's unfold order, laid out as
 * (B, C*kh*kw, L) or, with channel_major, as (C*kh*kw, B, L). Each row is then
 * transformed along the positions in blocks of p (p = 1: plain unfold).
 * Returns max|transformed| (0 when p = 1). */
float hdqt_im2col_fwht_f32(const float *x, float *out, int64_t B, int64_t C, int64_t H, int64_t W, int64_t kh,
                           int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw,
                           int64_t OH, int64_t OW, int64_t p, int64_t channel_major, int threads) {
    im2col_ctx c;
    c.g = make_geom(B, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, OH, OW);
    c.x = x, c.out = out, c.p = p, c.channel_major = channel_major, c.narrow = narrow_vectors();
    int64_t L = OH * OW;
    int64_t grain = (1 << 15) / (L > 0 ? L : 1);
    int used = parallel_for(B * C * kh * kw, threads, grain, im2col_range, &c);
    return reduce_amax(c.amax, used);
}
