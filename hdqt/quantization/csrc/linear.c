/* One quantized linear layer's forward, and its backward, each in one call
 * (fused_linear.py): the same quantizer, transform and packing calls, in the same
 * order and with the same arguments, that functional.QuantLinearFunction makes one
 * by one from Python, and products whose sums are the same (exact, or tiled and
 * saturated alike), so the values and the random streams are the same bit for bit
 * (the tests compare the two). What is saved is the ~10 Python round trips a layer and
 * direction would make otherwise (each 7-23 us of ctypes, buffers and checks
 * around kernels of a few us: benchmarks/bench_overhead.py), which is most of
 * a small layer's step at two threads.
 * Part of the one translation unit that kernels.c includes; not compiled on its own.
 */

typedef struct {
    float *y;
    float scale;
} scale_ctx;

static void scale_range(void *arg, int64_t begin, int64_t end, int worker) {
    (void)worker;
    const scale_ctx *c = (const scale_ctx *)arg;
    float *restrict y = c->y;
    const float s = c->scale;
    for (int64_t i = begin; i < end; ++i) y[i] *= s;
}

/* y *= scale over n values. torch's tensor.mul_(python_float) multiplies each float32
 * by the float32 nearest the double: so does this (one IEEE multiply each). */
static void scale_values(float *y, int64_t n, double scale, int threads) {
    scale_ctx c = {y, (float)scale};
    parallel_for(n, threads, ELEMENT_GRAIN, scale_range, &c);
}

/* (rows, cols) row-major -> (cols, rows) row-major: the float kernel reads B as (K, J).
 * Row c of the copy is column c of x, gathered 8 rows at a time (hadamard.c's
 * gather_rows, whose 8x8 register transposes serve here too). */
static float *transposed_copy(const float *x, int64_t rows, int64_t cols) {
    float *t = (float *)malloc((size_t)(rows * cols + 1) * sizeof(float));
    if (t == NULL) return NULL;
    for (int64_t c0 = 0; c0 < cols; c0 += 8)
        gather_rows(x, 1, cols, cols, 0, t, rows, c0, cols - c0 < 8 ? cols - c0 : 8);
    return t;
}

/* A matrix view: element (r, c) at v[r * rs + c * cs]. */
typedef struct {
    const float *v;
    int64_t rs, cs;
} view2;

/* out (M, J) = A (M, K) times the transpose of Bt (J, K), tiled along K as
 * matmul.tiled_matmul_kj does with a = A, b = Bt^T: the int8 kernel first (when
 * use_int8), the float kernel where it declines (operands not bytes, or no int8
 * variant now), which reads B as a dense (K, J), the copy tiled_matmul_kj makes.
 * Bt must be dense, row-major or column-major (the quantizers write them so).
 * Returns 0, or -1 when memory ran out. */
static int product_rows(view2 a, view2 bt, float *out, int64_t M, int64_t K, int64_t J, int64_t tile, float limit,
                        double *saturation, int use_int8, int threads) {
    /* row-major (J, K) rows are the transposed layout of a (K, J) b; a size-1 dimension
     * reads the same either way (torch's is_contiguous ignores its stride) */
    const int b_rows_major = bt.cs == 1 || K == 1;
    if (use_int8) {
        int status = hdqt_tiled_matmul_i8(a.v, a.rs, a.cs, bt.v, b_rows_major, out, M, K, J, tile, limit, saturation,
                                          threads);
        if (status <= 0) return status;
    }
    float *dense = b_rows_major && J > 1 ? transposed_copy(bt.v, J, K) : NULL;
    if (b_rows_major && J > 1 && dense == NULL) return -1;
    hdqt_tiled_matmul_f32(a.v, a.rs, a.cs, dense != NULL ? dense : bt.v, out, M, K, J, tile, limit, saturation,
                          threads);
    free(dense);
    return 0;
}

/* The codes of a saved operand: two a byte (nibbles, <= 4 bits: hdqt_pack_nibbles_f32)
 * or one (hdqt_pack_bytes_f32); returns 1 if one is negative (packing.pack_operand). */
static int pack_codes(const float *codes, int64_t n, int nibbles, uint8_t *out, int threads) {
    return nibbles ? hdqt_pack_nibbles_f32(codes, n, out, threads) : hdqt_pack_bytes_f32(codes, n, out, threads);
}

/* The codes pack_codes kept, as floats (packing.unpack_operand). */
static void unpack_codes(const uint8_t *packed, int64_t n, int nibbles, int is_signed, float *out, int threads) {
    if (nibbles) hdqt_unpack_nibbles_f32(packed, n, is_signed, out, threads);
    else hdqt_unpack_bytes_f32(packed, n, is_signed, out, threads);
}

/* The quantized layer's forward, Y = Q(X) Q(W)^T, as QuantLinearFunction.forward:
 * x (batch, in) dense (row-major, or x_transposed: stored as (in, batch)), w (out, in)
 * row-major, each quantized by the dynamic per-tensor quantizer (hdqt_quantize_f32,
 * over its memory in order: x first, then w), the tiled product computed as
 * Y^T = W X^T into y (out, batch), or with batch_major as Y = X W^T into y (batch, out)
 * (the layout of the separate calls' plain product, for an unlimited accumulator),
 * with each length-`tile` partial sum saturating at
 * `limit` (saturation: NULL or the counts, as in the product kernels; an unlimited
 * accumulator: tile = in, limit 2^31 - 1, exact sums), times the two scales. Then the
 * codes are kept (pack_codes: nibbles where x_nibbles / w_nibbles, else bytes) where
 * x_packed / w_packed is not NULL, and whether any code was negative goes to
 * negative[0] / [1].
 * The scales go to scales[0], [1]. Returns 0; 1 or 2 if x or w holds NaN or Inf (y
 * then untouched); -1 if memory ran out. */
int hdqt_linear_forward_f32(const float *x, int x_transposed, const float *w, int64_t batch, int64_t in_features,
                            int64_t out_features, int x_stochastic, int x_sign_mode, double x_clip, double x_smax,
                            double x_umax, uint64_t x_seed, int w_stochastic, int w_sign_mode, double w_clip,
                            double w_smax, double w_umax, uint64_t w_seed, int64_t tile, float limit,
                            double *saturation, int use_int8, float *y, int batch_major, uint8_t *x_packed,
                            int x_nibbles, uint8_t *w_packed, int w_nibbles, double *scales, int *negative,
                            int threads) {
    const int64_t nx = batch * in_features, nw = out_features * in_features;
    float *xq = (float *)malloc((size_t)(nx + 1) * sizeof(float));
    float *wq = (float *)malloc((size_t)(nw + 1) * sizeof(float));
    int status = xq == NULL || wq == NULL ? -1 : 0;
    if (status == 0 && hdqt_quantize_f32(x, xq, nx, x_stochastic, x_sign_mode, x_clip, x_smax, x_umax, x_seed,
                                         &scales[0], threads) != 0)
        status = 1;
    if (status == 0 && hdqt_quantize_f32(w, wq, nw, w_stochastic, w_sign_mode, w_clip, w_smax, w_umax, w_seed,
                                         &scales[1], threads) != 0)
        status = 2;
    if (status == 0) {
        /* X^T's rows are x's columns: (in, batch) row-major when x is stored transposed */
        view2 w_rows = {wq, in_features, 1};
        view2 x_rows = {xq, x_transposed ? 1 : in_features, x_transposed ? batch : 1};
        status = batch_major ? product_rows(x_rows, w_rows, y, batch, in_features, out_features, tile, limit,
                                            saturation, use_int8, threads)
                             : product_rows(w_rows, x_rows, y, out_features, in_features, batch, tile, limit,
                                            saturation, use_int8, threads);
    }
    if (status == 0) {
        scale_values(y, out_features * batch, scales[0] * scales[1], threads);
        if (x_packed != NULL) negative[0] = pack_codes(xq, nx, x_nibbles, x_packed, threads);
        if (w_packed != NULL) negative[1] = pack_codes(wq, nw, w_nibbles, w_packed, threads);
    }
    free(xq);
    free(wq);
    return status;
}

/* One backward operand: the rows of `src` (rows, len) in the Hadamard domain (blocks
 * of p along each row) and quantized onto the signed grid [-qmax, qmax], as
 * functional.backward_operands does: with p > 1 by hdqt_fwht_quantize_f32 (out then
 * holds the rows row-major), with p == 1 (no transform) by hdqt_quantize_f32 over
 * src's memory in order (src dense; out then has src's strides). The result's view
 * goes to *q. Returns 0, or 1 if the operand holds NaN or Inf. */
static int backward_operand(view2 src, int64_t rows, int64_t len, int64_t p, int stochastic, double clip,
                            double qmax, uint64_t seed, float *out, view2 *q, double *scale, int threads) {
    if (p > 1) {
        *q = (view2){out, len, 1};
        return hdqt_fwht_quantize_f32(src.v, src.rs, src.cs, rows, 0, out, rows, len, p, stochastic, clip, qmax, seed,
                                      scale, threads) != 0;
    }
    *q = (view2){out, src.rs, src.cs};
    return hdqt_quantize_f32(src.v, out, rows * len, stochastic, 0, clip, qmax, qmax, seed, scale, threads) != 0;
}

/* One backward product, out = Qa(A) Qb(B)^T reduced over the rows' length `len`
 * (A rows (m, len), B rows (j, len)), times
 * ((scale_a * scale_b) * saved_scale) * extra, the order in which
 * QuantLinearFunction.backward multiplies them. The sums are exact (no accumulator
 * limit; the caller checked they stay below 2^24), so whichever kernel computes
 * them gives the same values. Returns 0, -1 out of memory, or 1 / 2 for a non-finite
 * A / B. */
static int backward_product(view2 a, int64_t m, int stochastic_a, double clip_a, double qmax_a, uint64_t seed_a,
                            view2 b, int64_t j, int stochastic_b, double clip_b, double qmax_b, uint64_t seed_b,
                            int64_t len, int64_t p, double saved_scale, double extra, int a_first, int use_int8,
                            float *out, int threads) {
    float *qa = (float *)malloc((size_t)(m * len + 1) * sizeof(float));
    float *qb = (float *)malloc((size_t)(j * len + 1) * sizeof(float));
    int status = qa == NULL || qb == NULL ? -1 : 0;
    view2 va, vb;
    double sa = 1.0, sb = 1.0;
    if (status == 0 && backward_operand(a, m, len, p, stochastic_a, clip_a, qmax_a, seed_a, qa, &va, &sa, threads))
        status = 1;
    if (status == 0 && backward_operand(b, j, len, p, stochastic_b, clip_b, qmax_b, seed_b, qb, &vb, &sb, threads))
        status = 2;
    if (status == 0) {
        /* the product's own order of operands (dX^T = W G^T for a transposed input) */
        status = a_first ? product_rows(va, vb, out, m, len, j, len, 2147483647.0f, NULL, use_int8, threads)
                         : product_rows(vb, va, out, j, len, m, len, 2147483647.0f, NULL, use_int8, threads);
    }
    if (status == 0) scale_values(out, m * j, sa * sb * saved_scale * extra, threads);
    free(qa);
    free(qb);
    return status;
}

/* The quantized layer's backward, as QuantLinearFunction.backward, from the codes
 * the forward kept (pack_codes; x_packed: the input codes (batch, in), stored transposed when
 * x_transposed; w_packed: the weight codes (out, in) row-major; NULL where that
 * gradient is not wanted):
 *   grad_x = Qa(G H) Qb(W^T H)^T  (rows of G along out, blocks of p_out), written as
 *            (in, batch) when x_transposed (dX^T = W G^T: the input's layout), else (batch, in);
 *   grad_w = Qc(G^T H) Qd(X^T H)^T (rows along the batch, blocks of p_batch), (out, in);
 * quantizers a-d: g_dx, w, g_dw, x (signed grids, stochastic or nearest, clip ratio,
 * qmax, seed), in that order, which is the order Python draws their seeds in. grad
 * (batch, out) is read through its strides (gs0, gs1) and must be dense (row- or
 * column-major). extra_*: the factor that undoes H H (1 without a transform).
 * Returns 0; 1-4 if operand a-d holds NaN or Inf (what follows it is not computed);
 * -1 if memory ran out. */
int hdqt_linear_backward_f32(const float *grad, int64_t gs0, int64_t gs1, int64_t batch, int64_t in_features,
                             int64_t out_features, const uint8_t *x_packed, int x_nibbles, int x_signed,
                             int x_transposed, double x_scale, const uint8_t *w_packed, int w_nibbles,
                             int w_signed, double w_scale, int64_t p_out,
                             int64_t p_batch, double extra_dx, double extra_dw, int a_stochastic, double a_clip,
                             double a_qmax, uint64_t a_seed, int b_stochastic, double b_clip, double b_qmax,
                             uint64_t b_seed, int c_stochastic, double c_clip, double c_qmax, uint64_t c_seed,
                             int d_stochastic, double d_clip, double d_qmax, uint64_t d_seed, int use_int8,
                             float *grad_x, float *grad_w, int threads) {
    int status = 0;
    const view2 g = {grad, gs0, gs1}, gt = {grad, gs1, gs0};
    if (grad_x != NULL) {
        float *wv = (float *)malloc((size_t)(out_features * in_features + 1) * sizeof(float));
        if (wv == NULL) return -1;
        unpack_codes(w_packed, out_features * in_features, w_nibbles, w_signed, wv, threads);
        const view2 wt = {wv, 1, in_features}; /* W^T (in, out) */
        status = x_transposed
                     ? backward_product(g, batch, a_stochastic, a_clip, a_qmax, a_seed, wt, in_features, b_stochastic,
                                        b_clip, b_qmax, b_seed, out_features, p_out, w_scale, extra_dx, 0, use_int8,
                                        grad_x, threads)
                     : backward_product(g, batch, a_stochastic, a_clip, a_qmax, a_seed, wt, in_features, b_stochastic,
                                        b_clip, b_qmax, b_seed, out_features, p_out, w_scale, extra_dx, 1, use_int8,
                                        grad_x, threads);
        free(wv);
        if (status != 0) return status;
    }
    if (grad_w != NULL) {
        float *xv = (float *)malloc((size_t)(batch * in_features + 1) * sizeof(float));
        if (xv == NULL) return -1;
        unpack_codes(x_packed, batch * in_features, x_nibbles, x_signed, xv, threads);
        /* X^T (in, batch): x's columns */
        const view2 xt = x_transposed ? (view2){xv, batch, 1} : (view2){xv, 1, in_features};
        status = backward_product(gt, out_features, c_stochastic, c_clip, c_qmax, c_seed, xt, in_features,
                                  d_stochastic, d_clip, d_qmax, d_seed, batch, p_batch, x_scale, extra_dw, 1, use_int8,
                                  grad_w, threads);
        free(xv);
        if (status > 0) status += 2; /* operands c, d */
    }
    return status;
}
