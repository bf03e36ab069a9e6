/* Rounding onto an integer grid: stochastic (counter-based hash) and nearest,
 * and the whole dynamic per-tensor quantizer in one call.
 * Part of the one translation unit that kernels.c includes (static helpers are
 * shared across files); not compiled on its own.
 */
static inline uint32_t fmix32(uint32_t h) {
    h ^= h >> 16;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    h *= 0xc2b2ae35u;
    h ^= h >> 16;
    return h;
}

typedef struct {
    const float *x;
    float *out;
    float scale, qmin, qmax;
    uint32_t seed_lo, seed_hi;
} round_ctx;

/* v < qmin ? qmin : (v > qmax ? qmax : v), NaN kept, written as the two selects x86's
 * maxps / minps compute (each returns its second operand when the compare fails), so
 * that the compiler emits them instead of compares and blends (the nested form cost
 * stochastic rounding about a third of its time on AVX2). The same value for every v,
 * -0.0 and NaN included. */
static inline __attribute__((always_inline)) float clamp_grid(float v, float qmin, float qmax) {
    v = qmin > v ? qmin : v;
    return qmax < v ? qmax : v;
}

HDQT_CLONES
static void sr_span(const float *x, float *out, uint32_t lo0, uint32_t count, float scale, float qmin,
                    float qmax, uint32_t k0, uint32_t k1) {
    const float inv = 1.0f / scale;
    for (uint32_t j = 0; j < count; ++j) {
        uint32_t h = fmix32(((lo0 + j) ^ k1) * 0x9e3779b9u + k0);
        float u = (float)(h >> 8) * (1.0f / 16777216.0f); /* 24 random bits in [0, 1) */
        float v = x[j] * inv; /* stochastic: a multiply suffices (no ties to match) */
        v = clamp_grid(v, qmin, qmax);
        v = floor_small(v + u);
        out[j] = v > qmax ? qmax : v; /* guards float rounding of v + u at the top */
    }
}

/* Stochastic rounding of n elements whose global indices start at first_index
 * (x and out point at that first element). The high half of the index re-keys
 * the stream, so that the low half can be a 32-bit counter. */
static void sr_apply(const float *x, float *out, int64_t first_index, int64_t n, const round_ctx *c) {
    int64_t index = first_index, end = first_index + n;
    while (index < end) {
        int64_t block_end = ((index >> 32) + 1) << 32;
        int64_t stop = end < block_end ? end : block_end;
        uint32_t k1 = c->seed_hi ^ fmix32((uint32_t)(index >> 32) + 0x68e31da4u);
        int64_t at = index - first_index;
        sr_span(x + at, out + at, (uint32_t)index, (uint32_t)(stop - index), c->scale, c->qmin, c->qmax,
                c->seed_lo, k1);
        index = stop;
    }
}

static void sr_range(void *arg, int64_t begin, int64_t end, int worker) {
    (void)worker;
    const round_ctx *c = (const round_ctx *)arg;
    sr_apply(c->x + begin, c->out + begin, begin, end - begin, c);
}

/* out = floor(clamp(x / scale, qmin, qmax) + u), u ~ U[0, 1): unbiased inside the clip. */
void hdqt_sr_quantize_f32(const float *x, float *out, int64_t n, float scale, float qmin, float qmax,
                          uint64_t seed, int threads) {
    round_ctx c = {x, out, scale, qmin, qmax, (uint32_t)seed, (uint32_t)(seed >> 32)};
    parallel_for(n, threads, ELEMENT_GRAIN, sr_range, &c);
}

HDQT_CLONES
static void rtn_range(void *arg, int64_t begin, int64_t end, int worker) {
    (void)worker;
    round_ctx *c = (round_ctx *)arg;
    const float *x = c->x;
    float *out = c->out;
    float scale = c->scale, qmin = c->qmin, qmax = c->qmax;
    for (int64_t i = begin; i < end; ++i) {
        /* clamping to integer bounds first gives the same result and keeps |v| small */
        float v = x[i] / scale;
        v = clamp_grid(v, qmin, qmax);
        out[i] = round_small(v); /* ties to even, as torch.round */
    }
}

/* out = clamp(round(x / scale), qmin, qmax), round half to even. */
void hdqt_rtn_quantize_f32(const float *x, float *out, int64_t n, float scale, float qmin, float qmax,
                           int threads) {
    round_ctx c = {x, out, scale, qmin, qmax, 0, 0};
    parallel_for(n, threads, ELEMENT_GRAIN, rtn_range, &c);
}

/* max|x| and whether any x < 0, in one pass over the bits: on the bits of |x| an
 * unsigned max orders like the floats and puts every NaN above infinity, and a
 * negative number has the sign bit and a non-zero magnitude (-0.0 is not below
 * zero). Integer reductions only, which vectorise. */
typedef struct {
    const float *x;
    uint32_t top[HDQT_MAX_THREADS], negative[HDQT_MAX_THREADS];
} range_ctx;

HDQT_CLONES
static void range_scan(void *arg, int64_t begin, int64_t end, int worker) {
    range_ctx *c = (range_ctx *)arg;
    uint32_t top = 0, negative = 0;
    for (int64_t i = begin; i < end; ++i) {
        uint32_t bits;
        memcpy(&bits, &c->x[i], sizeof bits);
        uint32_t magnitude = bits & 0x7fffffffu;
        top = magnitude > top ? magnitude : top;
        negative |= (bits >> 31) & (magnitude != 0);
    }
    c->top[worker] = top, c->negative[worker] = negative;
}

/* The grid's scale (Quantizer.grid): clip = clip_ratio * max|x|, scale = clip / qmax,
 * or 1 for an all-zero tensor, so that it maps to zeros and not NaN. */
static double grid_scale(double clip_ratio, double amax, double qmax) {
    double clip = clip_ratio * amax;
    return clip > 0.0 ? clip / qmax : 1.0;
}

/* The whole dynamic per-tensor quantizer in one call: min and max, the grid (the
 * same rule as Quantizer.grid in quantizer.py: sign_mode 0 signed, 1 unsigned,
 * 2 signed only if the tensor has a negative value; clip = clip_ratio * max|x|, scale =
 * clip / qmax, or 1 for an all-zero tensor), then rounding to nearest
 * (stochastic = 0) or stochastically. Writes the scale to *scale_out. Returns 0,
 * or 1 if the tensor holds NaN or Inf (out is then untouched). */
int hdqt_quantize_f32(const float *x, float *out, int64_t n, int stochastic, int sign_mode, double clip_ratio,
                      double signed_max, double unsigned_max, uint64_t seed, double *scale_out, int threads) {
    range_ctx rc;
    rc.x = x;
    int used = parallel_for(n, threads, ELEMENT_GRAIN, range_scan, &rc);
    uint32_t top = 0, negative = 0;
    for (int t = 0; t < used; ++t) {
        top = rc.top[t] > top ? rc.top[t] : top;
        negative |= rc.negative[t];
    }
    if (top >= 0x7f800000u) return 1; /* Inf or NaN */
    float amax_f;
    memcpy(&amax_f, &top, sizeof amax_f);
    double amax = amax_f;
    int is_signed = sign_mode == 0 || (sign_mode == 2 && negative);
    double qmax = is_signed ? signed_max : unsigned_max, qmin = is_signed ? -qmax : 0.0;
    double scale = grid_scale(clip_ratio, amax, qmax);
    *scale_out = scale;
    round_ctx c = {x, out, (float)scale, (float)qmin, (float)qmax, (uint32_t)seed, (uint32_t)(seed >> 32)};
    parallel_for(n, threads, ELEMENT_GRAIN, stochastic ? sr_range : rtn_range, &c);
    return 0;
}
