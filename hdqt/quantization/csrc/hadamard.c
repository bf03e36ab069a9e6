/* The Walsh-Hadamard transform of rows (contiguous, or gathered from a strided view),
 * with max|result|.
 * Part of the one translation unit that kernels.c includes (static helpers are
 * shared across files); not compiled on its own.
 */
/* The four butterfly stages inside a 16-lane vector (h = 1, 2, 4, 8): lane i
 * becomes x[i ^ h] + x[i] where bit h of i is clear and x[i ^ h] - x[i] where it
 * is set, i.e. shuffle(x) + sign * x: one permute and one multiply-add per stage. */
typedef int32_t vi16 __attribute__((vector_size(64)));
/* Lane i of the 16-lane vector x takes lane i ^ h; M is an integer vector type of x's
 * lane width (GCC's shuffle mask). And the lanes' signs of stage h, as a T. Shared by
 * the float transforms and the int16 build of conv_weight_grad.c. */
#if defined(__clang__)
#define SWAP_LANES_T(x, h, M)                                                                          \
    __builtin_shufflevector(x, x, 0 ^ h, 1 ^ h, 2 ^ h, 3 ^ h, 4 ^ h, 5 ^ h, 6 ^ h, 7 ^ h, 8 ^ h, 9 ^ h, \
                            10 ^ h, 11 ^ h, 12 ^ h, 13 ^ h, 14 ^ h, 15 ^ h)
#else
#define SWAP_LANES_T(x, h, M)                                                                          \
    __builtin_shuffle(x, (M){0 ^ h, 1 ^ h, 2 ^ h, 3 ^ h, 4 ^ h, 5 ^ h, 6 ^ h, 7 ^ h, 8 ^ h, 9 ^ h,     \
                            10 ^ h, 11 ^ h, 12 ^ h, 13 ^ h, 14 ^ h, 15 ^ h})
#endif
#define LANE_SIGNS_T(T, h)                                                                             \
    ((T){(0 & h) ? -1 : 1, (1 & h) ? -1 : 1, (2 & h) ? -1 : 1, (3 & h) ? -1 : 1, (4 & h) ? -1 : 1,     \
         (5 & h) ? -1 : 1, (6 & h) ? -1 : 1, (7 & h) ? -1 : 1, (8 & h) ? -1 : 1, (9 & h) ? -1 : 1,     \
         (10 & h) ? -1 : 1, (11 & h) ? -1 : 1, (12 & h) ? -1 : 1, (13 & h) ? -1 : 1, (14 & h) ? -1 : 1, \
         (15 & h) ? -1 : 1})
#define SWAP_LANES(x, h) SWAP_LANES_T(x, h, vi16)
#define LANE_SIGNS(h) LANE_SIGNS_T(vf16, h)

/* The four butterfly stages between 16 vectors v[0..15] of type T (distances 1, 2, 4,
 * 8), spelt out with constant indices so that all 16 stay in registers; a macro, so that
 * the float and the int16 builds (conv_weight_grad.c) share one network. */
#define BF(T, i, j)                                                                                    \
    do {                                                                                               \
        T t_ = v[i];                                                                                   \
        v[i] = t_ + v[j];                                                                              \
        v[j] = t_ - v[j];                                                                              \
    } while (0)
#define BUTTERFLIES16(T)                                                                               \
    do {                                                                                               \
        BF(T, 0, 1); BF(T, 2, 3); BF(T, 4, 5); BF(T, 6, 7);                                            \
        BF(T, 8, 9); BF(T, 10, 11); BF(T, 12, 13); BF(T, 14, 15);                                      \
        BF(T, 0, 2); BF(T, 1, 3); BF(T, 4, 6); BF(T, 5, 7);                                            \
        BF(T, 8, 10); BF(T, 9, 11); BF(T, 12, 14); BF(T, 13, 15);                                      \
        BF(T, 0, 4); BF(T, 1, 5); BF(T, 2, 6); BF(T, 3, 7);                                            \
        BF(T, 8, 12); BF(T, 9, 13); BF(T, 10, 14); BF(T, 11, 15);                                      \
        BF(T, 0, 8); BF(T, 1, 9); BF(T, 2, 10); BF(T, 3, 11);                                          \
        BF(T, 4, 12); BF(T, 5, 13); BF(T, 6, 14); BF(T, 7, 15);                                        \
    } while (0)
static inline __attribute__((always_inline)) void butterflies16(vf16 *v) {
    BUTTERFLIES16(vf16);
}

/* The four butterfly stages inside one 16-lane vector. */
static inline __attribute__((always_inline)) vf16 lanes16(vf16 v) {
    const vf16 s1 = LANE_SIGNS(1), s2 = LANE_SIGNS(2), s4 = LANE_SIGNS(4), s8 = LANE_SIGNS(8);
    v = SWAP_LANES(v, 1) + s1 * v;
    v = SWAP_LANES(v, 2) + s2 * v;
    v = SWAP_LANES(v, 4) + s4 * v;
    return SWAP_LANES(v, 8) + s8 * v;
}

/* The stages h, 2h, ... < p of the transform of every length-p block of a row of n
 * floats, in memory (contiguous inner loops: vectorised in each caller's target). */
static inline __attribute__((always_inline)) void fwht_stages(float *r, int64_t n, int64_t p, int64_t h) {
    for (; h < p; h <<= 1) {
        for (int64_t block = 0; block < n; block += p) {
            for (int64_t i = block; i < block + p; i += h << 1) {
                float *lo = r + i, *hi = r + i + h;
                for (int64_t j = 0; j < h; ++j) {
                    float a = lo[j], b = hi[j];
                    lo[j] = a + b;
                    hi[j] = a - b;
                }
            }
        }
    }
}

/* Unnormalised Sylvester transform of every length-p block of a row of n floats
 * (p a power of two dividing n). */
HDQT_CLONES
static void fwht_row(float *r, int64_t n, int64_t p) {
    if (p < 2) return;
    int64_t h = 1;
    if (p >= NV * NV) { /* stages 1..128 on 256 floats at a time, all in registers */
        for (int64_t i = 0; i < n; i += NV * NV) {
            vf16 v[NV];
            memcpy(v, r + i, sizeof v);
            for (int j = 0; j < NV; ++j) v[j] = lanes16(v[j]);
            butterflies16(v); /* stages 16..128: between vectors 1..8 apart */
            memcpy(r + i, v, sizeof v);
        }
        h = NV * NV;
    } else if (p >= NV) { /* stages 1..8 inside each 16-float vector, in registers */
        for (int64_t i = 0; i < n; i += NV) {
            vf16 v;
            memcpy(&v, r + i, sizeof v);
            v = lanes16(v);
            memcpy(r + i, &v, sizeof v);
        }
        h = NV;
    }
    fwht_stages(r, n, p, h);
}

#ifdef HDQT_NARROW_BYTES
/* The row transform on narrow vectors (vfn: 8 floats on AVX2, 4 on NEON). A vf16
 * variable lives in memory where no register holds 16 floats (common.h), and
 * fwht_row's 256-float block keeps 16 of them: on AVX2 every butterfly went through
 * the stack. Here 16 vfn (16 ymm on AVX2) hold 16 * NL values, and the stages run in
 * fwht_row's order (h = 1, 2, 4, ...; each a + b or a - b of the same two values),
 * so the floats are the same, bit for bit. */
#if NL == 8
#define NARROW_SIGNS(h)                                                                                \
    ((vfn){(0 & h) ? -1.f : 1.f, (1 & h) ? -1.f : 1.f, (2 & h) ? -1.f : 1.f, (3 & h) ? -1.f : 1.f,     \
           (4 & h) ? -1.f : 1.f, (5 & h) ? -1.f : 1.f, (6 & h) ? -1.f : 1.f, (7 & h) ? -1.f : 1.f})
#else
#define NARROW_SIGNS(h) ((vfn){(0 & h) ? -1.f : 1.f, (1 & h) ? -1.f : 1.f, (2 & h) ? -1.f : 1.f, (3 & h) ? -1.f : 1.f})
#endif

/* The stages h = 1 .. NL/2 inside one vfn: lane i becomes x[i ^ h] + x[i] or x[i ^ h] - x[i]. */
typedef int32_t vin __attribute__((vector_size(HDQT_NARROW_BYTES)));
#if NL == 8
#define NARROW_PERMUTE(h) 0 ^ h, 1 ^ h, 2 ^ h, 3 ^ h, 4 ^ h, 5 ^ h, 6 ^ h, 7 ^ h
#else
#define NARROW_PERMUTE(h) 0 ^ h, 1 ^ h, 2 ^ h, 3 ^ h
#endif
#if defined(__clang__)
#define SWAP_NARROW(x, h) __builtin_shufflevector(x, x, NARROW_PERMUTE(h))
#else
#define SWAP_NARROW(x, h) __builtin_shuffle(x, (vin){NARROW_PERMUTE(h)})
#endif
NARROW_TARGET
static inline vfn lanes_narrow(vfn v) {
    v = SWAP_NARROW(v, 1) + NARROW_SIGNS(1) * v;
    v = SWAP_NARROW(v, 2) + NARROW_SIGNS(2) * v;
#if NL == 8
    v = SWAP_NARROW(v, 4) + NARROW_SIGNS(4) * v;
#endif
    return v;
}

#define BF_N(i, j)                                                                                     \
    do {                                                                                               \
        vfn t_ = v[i];                                                                                 \
        v[i] = t_ + v[j];                                                                              \
        v[j] = t_ - v[j];                                                                              \
    } while (0)
/* The four stages between 16 vfn (vectors 1, 2, 4, 8 apart). */
NARROW_TARGET
static inline void butterflies16_narrow(vfn *v) {
    BF_N(0, 1); BF_N(2, 3); BF_N(4, 5); BF_N(6, 7); BF_N(8, 9); BF_N(10, 11); BF_N(12, 13); BF_N(14, 15);
    BF_N(0, 2); BF_N(1, 3); BF_N(4, 6); BF_N(5, 7); BF_N(8, 10); BF_N(9, 11); BF_N(12, 14); BF_N(13, 15);
    BF_N(0, 4); BF_N(1, 5); BF_N(2, 6); BF_N(3, 7); BF_N(8, 12); BF_N(9, 13); BF_N(10, 14); BF_N(11, 15);
    BF_N(0, 8); BF_N(1, 9); BF_N(2, 10); BF_N(3, 11); BF_N(4, 12); BF_N(5, 13); BF_N(6, 14); BF_N(7, 15);
}
#undef BF_N

/* fwht_row on vfn: stages 1 .. 8 NL on 16 NL floats at a time in registers, the
 * rest as fwht_row's loop (contiguous, vectorised). */
NARROW_TARGET
static void fwht_row_narrow(float *r, int64_t n, int64_t p) {
    if (p < 2) return;
    int64_t h = 1;
    if (p >= 16 * NL) {
        for (int64_t i = 0; i < n; i += 16 * NL) {
            vfn v[16];
            memcpy(v, r + i, sizeof v);
            for (int j = 0; j < 16; ++j) v[j] = lanes_narrow(v[j]);
            butterflies16_narrow(v);
            memcpy(r + i, v, sizeof v);
        }
        h = 16 * NL;
    } else if (p >= NL) {
        for (int64_t i = 0; i < n; i += NL) {
            vfn v;
            memcpy(&v, r + i, sizeof v);
            v = lanes_narrow(v);
            memcpy(r + i, &v, sizeof v);
        }
        h = NL;
    }
    fwht_stages(r, n, p, h);
}
#endif /* HDQT_NARROW_BYTES */

HDQT_CLONES
static float absmax_row(const float *r, int64_t n) {
    /* On the bits of |v| an unsigned max orders like the floats, and every NaN
     * pattern is above infinity: one integer reduction, which vectorises. */
    uint32_t top = 0;
    for (int64_t i = 0; i < n; ++i) {
        uint32_t bits;
        memcpy(&bits, &r[i], sizeof bits);
        bits &= 0x7fffffffu;
        top = bits > top ? bits : top;
    }
    float m;
    memcpy(&m, &top, sizeof m);
    return m;
}

/* 8 floats, for the transposes of gather_rows (any target: GCC lowers the shuffles
 * to what the clone's instruction set has). */
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
#if defined(__clang__)
#define SHUFFLE8(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE8(a, b, ...) __builtin_shuffle(a, b, (v8i){__VA_ARGS__})
#endif

/* The 8x8 floats at (r, r_stride) transposed into (o, o_stride): o[l][k] = r[k][l].
 * Three rounds of two-input shuffles (pairs of rows, of pairs, of quads), 24 in all. */
static inline __attribute__((always_inline)) void transpose8(const float *r, int64_t r_stride, float *o,
                                                             int64_t o_stride) {
    v8f a[8], t[8], u[8];
    for (int i = 0; i < 8; ++i) memcpy(&a[i], r + i * r_stride, sizeof a[i]);
    for (int i = 0; i < 8; i += 2) {
        t[i] = SHUFFLE8(a[i], a[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
        t[i + 1] = SHUFFLE8(a[i], a[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
    }
    for (int i = 0; i < 8; i += 4) {
        for (int j = 0; j < 2; ++j) {
            u[i + 2 * j] = SHUFFLE8(t[i + j], t[i + j + 2], 0, 1, 8, 9, 4, 5, 12, 13);
            u[i + 2 * j + 1] = SHUFFLE8(t[i + j], t[i + j + 2], 2, 3, 10, 11, 6, 7, 14, 15);
        }
    }
    for (int i = 0; i < 4; ++i) {
        v8f lo = SHUFFLE8(u[i], u[i + 4], 0, 1, 2, 3, 8, 9, 10, 11);
        v8f hi = SHUFFLE8(u[i], u[i + 4], 4, 5, 6, 7, 12, 13, 14, 15);
        memcpy(o + i * o_stride, &lo, sizeof lo);
        memcpy(o + (i + 4) * o_stride, &hi, sizeof hi);
    }
}

/* Where row r of a view of rows starts: rows come in groups of `group`, a row's
 * index in its group steps by sr and its group by sg (a matrix: group = rows; the
 * (D0, D1, len) view with strides (sg, sr, .): group = D1). */
static inline const float *row_start(const float *src, int64_t r, int64_t sr, int64_t group, int64_t sg) {
    return src + (r / group) * sg + (r % group) * sr;
}

/* Rows [r0, r0 + n) of the view of src (rows at row_start, columns sc apart), into
 * the same rows of the contiguous out. The transposed view of a row-major matrix
 * (sr = 1, as a batch-major activation or gradient is along the batch) goes 8 rows
 * and 8 columns at a time through a register transpose: every source row then gives
 * 32 contiguous bytes. torch's own copy of such a view took ~40 us for 128 x 405
 * floats on one thread of the AVX2 VM, and it does not split it over threads. */
HDQT_CLONES
static void gather_rows(const float *src, int64_t sr, int64_t sc, int64_t group, int64_t sg, float *out,
                        int64_t row_len, int64_t r0, int64_t n) {
    if (sc == 1) {
        for (int64_t r = r0; r < r0 + n; ++r)
            memcpy(out + r * row_len, row_start(src, r, sr, group, sg), (size_t)row_len * sizeof *out);
        return;
    }
    int64_t k = 0;
    if (sr == 1 && n == 8 && r0 % group + 8 <= group) { /* 8 rows side by side in memory */
        const float *base = row_start(src, r0, sr, group, sg);
        for (; k + 8 <= row_len; k += 8) transpose8(base + k * sc, sc, out + r0 * row_len + k, row_len);
    }
    for (int64_t r = r0; r < r0 + n; ++r) { /* the columns past the last 8, or any other strides */
        const float *row = row_start(src, r, sr, group, sg);
        for (int64_t j = k; j < row_len; ++j) out[r * row_len + j] = row[j * sc];
    }
}

typedef struct {
    float *x;
    int64_t row_len, p;
    int narrow; /* fwht_row_narrow (narrow_vectors) */
    const float *src; /* NULL, or where the rows come from (gather_rows: sr, sc, group, sg) */
    int64_t sr, sc, group, sg;
    float amax[HDQT_MAX_THREADS];
} fwht_ctx;

static void fwht_range(void *arg, int64_t begin, int64_t end, int worker) {
    fwht_ctx *c = (fwht_ctx *)arg;
    float m = 0.0f;
    for (int64_t r0 = begin; r0 < end; r0 += 8) { /* 8 rows: gathered together, then transformed while in cache */
        const int64_t n = end - r0 < 8 ? end - r0 : 8;
        if (c->src != NULL) gather_rows(c->src, c->sr, c->sc, c->group, c->sg, c->x, c->row_len, r0, n);
        for (int64_t row = r0; row < r0 + n; ++row) {
            float *r = c->x + row * c->row_len;
#ifdef HDQT_NARROW_BYTES
            if (c->narrow) fwht_row_narrow(r, c->row_len, c->p);
            else
#endif
            fwht_row(r, c->row_len, c->p);
            m = absmax_step(m, absmax_row(r, c->row_len));
        }
    }
    c->amax[worker] = m;
}

static float reduce_amax(const float *amax, int used) {
    float m = 0.0f;
    for (int t = 0; t < used; ++t) m = absmax_step(m, amax[t]);
    return m;
}

/* The transform of every length-p block of `rows` rows of length row_len: read
 * from src (gather_rows: sr, sc, group, sg) when src is not NULL, written to x
 * (contiguous), else in place in x. Returns max|result| (NaN if any element is NaN). */
static float fwht_rows(const float *src, int64_t sr, int64_t sc, int64_t group, int64_t sg, float *x, int64_t rows,
                       int64_t row_len, int64_t p, int threads) {
    fwht_ctx c;
    c.x = x, c.row_len = row_len, c.p = p, c.narrow = narrow_vectors();
    c.src = src, c.sr = sr, c.sc = sc, c.group = group > 0 ? group : 1, c.sg = sg;
    int64_t grain = ELEMENT_GRAIN / (row_len > 0 ? row_len : 1);
    int used = parallel_for(rows, threads, grain, fwht_range, &c);
    return reduce_amax(c.amax, used);
}

/* In place: every length-p block of `rows` contiguous rows of length row_len.
 * Returns max|result| (NaN if any element is NaN). */
float hdqt_fwht_rows_f32(float *x, int64_t rows, int64_t row_len, int64_t p, int threads) {
    return fwht_rows(NULL, 0, 0, 1, 0, x, rows, row_len, p, threads);
}

/* The transform of the rows of x into out (contiguous; x is not modified): row r
 * starts at x + (r / group) * sg + (r % group) * sr, its columns sc apart (a
 * (rows, row_len) matrix with strides (sr, sc): group = rows; a (D0, D1, row_len)
 * view with strides (sg, sr, sc): group = D1), then the dynamic per-tensor quantizer on
 * a signed grid of [-qmax, qmax] from the max|result| the transform returned
 * (Quantizer.grid with lo = -amax: scale = clip_ratio * amax / qmax, or 1 for an
 * all-zero result), then rounding to nearest (stochastic = 0) or stochastically
 * (seed), in place in out. Value for value what a contiguous copy, the transform and
 * the rounding give as three calls: two passes fewer over memory and two calls
 * fewer from Python (a backward operand in the Hadamard domain, often a transposed
 * view). Writes the scale to *scale_out. Returns 0, or 1 if the result holds NaN or
 * Inf (out then holds the transform). */
int hdqt_fwht_quantize_f32(const float *x, int64_t sr, int64_t sc, int64_t group, int64_t sg, float *out,
                           int64_t rows, int64_t row_len, int64_t p, int stochastic, double clip_ratio, double qmax,
                           uint64_t seed, double *scale_out, int threads) {
    float amax = fwht_rows(x, sr, sc, group, sg, out, rows, row_len, p, threads);
    uint32_t bits;
    memcpy(&bits, &amax, sizeof bits);
    if ((bits & 0x7fffffffu) >= 0x7f800000u) return 1; /* Inf or NaN */
    double scale = grid_scale(clip_ratio, (double)amax, qmax);
    *scale_out = scale;
    round_ctx c = {out, out, (float)scale, (float)-qmax, (float)qmax, (uint32_t)seed, (uint32_t)(seed >> 32)};
    parallel_for(rows * row_len, threads, ELEMENT_GRAIN, stochastic ? sr_range : rtn_range, &c);
    return 0;
}
