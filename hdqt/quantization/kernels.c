/* Fused CPU kernels for the quantization engine, loaded through ctypes.
 *
 * What torch would run as several passes over memory, or cannot express:
 *   - the dynamic per-tensor quantizer (range, grid, nearest or stochastic
 *     rounding) in one call,
 *   - the Walsh-Hadamard transform of contiguous rows (all log2(p) butterfly
 *     stages while a row is in cache), returning max|result|,
 *   - im2col fused with that transform (the plain columns are never written),
 *   - the tiled product whose per-tile partial sums saturate (register-blocked),
 *     and the convolution built on it as an implicit GEMM,
 *   - the weight gradient of a convolution: columns gathered, transformed,
 *     rounded and multiplied in cache, never materialised.
 * Everything else stays in torch.
 *
 * Threads: OpenMP, built against the libgomp.so.1 that torch has already loaded,
 * so the kernels run on torch's own thread pool (a second pool would spin-wait
 * against it); without OpenMP, pthreads created per call. The caller passes the
 * thread count (torch.get_num_threads()), and small inputs run on the calling
 * thread.
 *
 * Randomness: a counter-based generator, the MurmurHash3 32-bit finaliser over
 * the element index, keyed by the seed. One round: a second cost 40% more time
 * in rounding and changes nothing the tests measure (mean, spread, seeds). It
 * is stateless, so the result does not depend on how the elements are split
 * over threads, and it vectorises. The 64-bit seed is drawn by the caller from
 * its torch.Generator.
 *
 * Vector code: gcc builds x86-64-v4 (AVX-512 F/BW/DQ/VL), x86-64-v3 (AVX2, FMA)
 * and baseline clones of the hot loops and picks one at load time
 * (target_clones), so the cached library runs on any x86-64 machine.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && !defined(HDQT_NO_CLONES)
#define HDQT_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define HDQT_CLONES
#endif

#define HDQT_MAX_THREADS 64

/* 16 floats: GCC/Clang vector extensions lower it to whatever the clone's
 * instruction set has (one AVX-512 register, two AVX2 registers, ...). */
typedef float vf16 __attribute__((vector_size(64)));
#define NV 16 /* lanes of vf16 */
#define MR 8  /* rows of a register block: each vector load feeds MR multiply-adds */

/* ---------------------------------------------------------------- threads */

typedef void (*range_fn)(void *ctx, int64_t begin, int64_t end, int worker);

typedef struct {
    range_fn fn;
    void *ctx;
    int64_t begin, end;
    int worker;
} range_job;

static void *run_job(void *arg) {
    range_job *job = (range_job *)arg;
    job->fn(job->ctx, job->begin, job->end, job->worker);
    return NULL;
}

/* Split [0, n) into at most `threads` contiguous ranges of at least `grain`
 * items; returns the number of workers used (worker ids 0..used-1). */
static int parallel_for(int64_t n, int threads, int64_t grain, range_fn fn, void *ctx) {
    if (threads > HDQT_MAX_THREADS) threads = HDQT_MAX_THREADS;
    if (threads < 1) threads = 1;
    if (grain < 1) grain = 1;
    int64_t by_grain = n / grain;
    if (by_grain < threads) threads = by_grain < 1 ? 1 : (int)by_grain;
    if (threads == 1) {
        fn(ctx, 0, n, 0);
        return 1;
    }
    int64_t chunk_omp = (n + threads - 1) / threads;
#ifdef _OPENMP
    /* Built against the OpenMP runtime that torch has already loaded (the same
     * SONAME resolves to the loaded copy): the work runs on torch's own threads. */
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int t = 0; t < threads; ++t) {
        int64_t b = t * chunk_omp, e = b + chunk_omp < n ? b + chunk_omp : n;
        if (b < e) fn(ctx, b, e, t);
    }
    return threads;
#endif
    range_job jobs[HDQT_MAX_THREADS];
    pthread_t tids[HDQT_MAX_THREADS];
    int started[HDQT_MAX_THREADS];
    int64_t chunk = (n + threads - 1) / threads;
    for (int t = 0; t < threads; ++t) {
        int64_t b = t * chunk, e = b + chunk < n ? b + chunk : n;
        jobs[t] = (range_job){fn, ctx, b, e, t};
    }
    for (int t = 1; t < threads; ++t)
        started[t] = pthread_create(&tids[t], NULL, run_job, &jobs[t]) == 0;
    run_job(&jobs[0]);
    for (int t = 1; t < threads; ++t) {
        if (started[t]) pthread_join(tids[t], NULL);
        else run_job(&jobs[t]); /* no thread available: do the work here */
    }
    return threads;
}

/* NaN-propagating running maximum of |v|: once NaN, it stays NaN. */
static inline float absmax_step(float m, float v) {
    float a = fabsf(v);
    return (a > m || a != a) ? a : m;
}

/* floor(y) for |y| < 2^31, in branch-free form the vectoriser accepts (floorf is a libm call). */
static inline float floor_small(float y) {
    float t = (float)(int32_t)y; /* truncates toward zero */
    return t > y ? t - 1.0f : t;
}

/* Round half to even for |y| < 2^22 (adding and removing 1.5 * 2^23 leaves the
 * nearest integer under the default rounding mode), as torch.round does. Valid
 * only without -ffast-math, which would fold the two operations away. */
static inline float round_small(float y) {
    return (y + 12582912.0f) - 12582912.0f;
}

/* ------------------------------------------------------------- rounding */

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

HDQT_CLONES
static void sr_span(const float *x, float *out, uint32_t lo0, uint32_t count, float scale, float qmin,
                    float qmax, uint32_t k0, uint32_t k1) {
    const float inv = 1.0f / scale;
    for (uint32_t j = 0; j < count; ++j) {
        uint32_t h = fmix32(((lo0 + j) ^ k1) * 0x9e3779b9u + k0);
        float u = (float)(h >> 8) * (1.0f / 16777216.0f); /* 24 random bits in [0, 1) */
        float v = x[j] * inv; /* stochastic: a multiply suffices (no ties to match) */
        v = v < qmin ? qmin : (v > qmax ? qmax : v);
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
    parallel_for(n, threads, 1 << 16, sr_range, &c);
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
        v = v < qmin ? qmin : (v > qmax ? qmax : v);
        out[i] = round_small(v); /* ties to even, as torch.round */
    }
}

/* out = clamp(round(x / scale), qmin, qmax), round half to even. */
void hdqt_rtn_quantize_f32(const float *x, float *out, int64_t n, float scale, float qmin, float qmax,
                           int threads) {
    round_ctx c = {x, out, scale, qmin, qmax, 0, 0};
    parallel_for(n, threads, 1 << 16, rtn_range, &c);
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
    int used = parallel_for(n, threads, 1 << 16, range_scan, &rc);
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
    double clip = clip_ratio * amax;
    double scale = clip > 0.0 ? clip / qmax : 1.0;
    *scale_out = scale;
    round_ctx c = {x, out, (float)scale, (float)qmin, (float)qmax, (uint32_t)seed, (uint32_t)(seed >> 32)};
    parallel_for(n, threads, 1 << 16, stochastic ? sr_range : rtn_range, &c);
    return 0;
}

/* ------------------------------------------------------------- Hadamard */

/* The four butterfly stages inside a 16-lane vector (h = 1, 2, 4, 8): lane i
 * becomes x[i ^ h] + x[i] where bit h of i is clear and x[i ^ h] - x[i] where it
 * is set, i.e. shuffle(x) + sign * x: one permute and one multiply-add per stage. */
typedef int32_t vi16 __attribute__((vector_size(64)));
#if defined(__clang__)
#define SWAP_LANES(x, h)                                                                               \
    __builtin_shufflevector(x, x, 0 ^ h, 1 ^ h, 2 ^ h, 3 ^ h, 4 ^ h, 5 ^ h, 6 ^ h, 7 ^ h, 8 ^ h, 9 ^ h, \
                            10 ^ h, 11 ^ h, 12 ^ h, 13 ^ h, 14 ^ h, 15 ^ h)
#else
#define SWAP_LANES(x, h)                                                                               \
    __builtin_shuffle(x, (vi16){0 ^ h, 1 ^ h, 2 ^ h, 3 ^ h, 4 ^ h, 5 ^ h, 6 ^ h, 7 ^ h, 8 ^ h, 9 ^ h,  \
                               10 ^ h, 11 ^ h, 12 ^ h, 13 ^ h, 14 ^ h, 15 ^ h})
#endif
#define LANE_SIGNS(h)                                                                                  \
    ((vf16){(0 & h) ? -1.f : 1.f, (1 & h) ? -1.f : 1.f, (2 & h) ? -1.f : 1.f, (3 & h) ? -1.f : 1.f,     \
            (4 & h) ? -1.f : 1.f, (5 & h) ? -1.f : 1.f, (6 & h) ? -1.f : 1.f, (7 & h) ? -1.f : 1.f,     \
            (8 & h) ? -1.f : 1.f, (9 & h) ? -1.f : 1.f, (10 & h) ? -1.f : 1.f, (11 & h) ? -1.f : 1.f,   \
            (12 & h) ? -1.f : 1.f, (13 & h) ? -1.f : 1.f, (14 & h) ? -1.f : 1.f, (15 & h) ? -1.f : 1.f})

/* The four butterfly stages between 16 vectors (distances 1, 2, 4, 8), spelt
 * out with constant indices so that all 16 stay in registers. */
#define BF(i, j)                                                                                       \
    do {                                                                                               \
        vf16 t_ = v[i];                                                                                \
        v[i] = t_ + v[j];                                                                              \
        v[j] = t_ - v[j];                                                                              \
    } while (0)
static inline __attribute__((always_inline)) void butterflies16(vf16 *v) {
    BF(0, 1); BF(2, 3); BF(4, 5); BF(6, 7); BF(8, 9); BF(10, 11); BF(12, 13); BF(14, 15);
    BF(0, 2); BF(1, 3); BF(4, 6); BF(5, 7); BF(8, 10); BF(9, 11); BF(12, 14); BF(13, 15);
    BF(0, 4); BF(1, 5); BF(2, 6); BF(3, 7); BF(8, 12); BF(9, 13); BF(10, 14); BF(11, 15);
    BF(0, 8); BF(1, 9); BF(2, 10); BF(3, 11); BF(4, 12); BF(5, 13); BF(6, 14); BF(7, 15);
}
#undef BF

/* The four butterfly stages inside one 16-lane vector. */
static inline __attribute__((always_inline)) vf16 lanes16(vf16 v) {
    const vf16 s1 = LANE_SIGNS(1), s2 = LANE_SIGNS(2), s4 = LANE_SIGNS(4), s8 = LANE_SIGNS(8);
    v = SWAP_LANES(v, 1) + s1 * v;
    v = SWAP_LANES(v, 2) + s2 * v;
    v = SWAP_LANES(v, 4) + s4 * v;
    return SWAP_LANES(v, 8) + s8 * v;
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
    for (; h < p; h <<= 1) {
        for (int64_t block = 0; block < n; block += p) {
            for (int64_t i = block; i < block + p; i += h << 1) {
                float *lo = r + i, *hi = r + i + h;
                for (int64_t j = 0; j < h; ++j) { /* contiguous: vectorised */
                    float a = lo[j], b = hi[j];
                    lo[j] = a + b;
                    hi[j] = a - b;
                }
            }
        }
    }
}

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

typedef struct {
    float *x;
    int64_t row_len, p;
    float amax[HDQT_MAX_THREADS];
} fwht_ctx;

static void fwht_range(void *arg, int64_t begin, int64_t end, int worker) {
    fwht_ctx *c = (fwht_ctx *)arg;
    float m = 0.0f;
    for (int64_t row = begin; row < end; ++row) {
        float *r = c->x + row * c->row_len;
        fwht_row(r, c->row_len, c->p);
        m = absmax_step(m, absmax_row(r, c->row_len));
    }
    c->amax[worker] = m;
}

static float reduce_amax(const float *amax, int used) {
    float m = 0.0f;
    for (int t = 0; t < used; ++t) m = absmax_step(m, amax[t]);
    return m;
}

/* In place: every length-p block of `rows` contiguous rows of length row_len.
 * Returns max|result| (NaN if any element is NaN). */
float hdqt_fwht_rows_f32(float *x, int64_t rows, int64_t row_len, int64_t p, int threads) {
    fwht_ctx c;
    c.x = x, c.row_len = row_len, c.p = p;
    int64_t grain = (1 << 15) / (row_len > 0 ? row_len : 1);
    int used = parallel_for(rows, threads, grain, fwht_range, &c);
    return reduce_amax(c.amax, used);
}

/* ---------------------------------------------------------------- im2col */

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
    c.x = x, c.out = out, c.p = p, c.channel_major = channel_major;
    int64_t L = OH * OW;
    int64_t grain = (1 << 15) / (L > 0 ? L : 1);
    int used = parallel_for(B * C * kh * kw, threads, grain, im2col_range, &c);
    return reduce_amax(c.amax, used);
}

/* ------------------------------------------- fused weight gradient of conv */

/* dW = Gq (N, B*L) @ Q_sr(H cols)^T without materialising the columns: the rows
 * of a few input channels of one sample (one row per channel and kernel offset,
 * along the L output positions) are built transformed in a small buffer,
 * stochastically rounded, and multiplied with the N gradient rows of that
 * sample. A first pass (hdqt_conv_cols_amax_f32) finds the scale: max|H cols|
 * over the whole batch. Work is split over samples, and each worker sums into its
 * own (N, K) partial. The random draw of element (k, b, l) is keyed by its index
 * in the (K, B, L) layout, so the result does not depend on the thread count. */
typedef struct {
    conv_geom g;
    const float *x, *gq;
    float *partials, *rows, *scratch;
    int64_t N, p, group, rows_per_worker, scratch_per_worker;
    float scale, qmin, qmax;
    uint64_t seed;
    float amax[HDQT_MAX_THREADS];
} dw_ctx;

static int64_t is_pow2(int64_t v) {
    return v > 0 && (v & (v - 1)) == 0;
}

/* When a Hadamard block covers m >= 16 whole output rows of a power-of-two width
 * OW >= 16, H_p = H_m (over rows) (x) H_OW (along a row), since Sylvester indices
 * split into (row, column) bits. Then the kh * kw rows of one channel share their
 * work: each input row is shifted by kj and transformed along the width once
 * (kw * H short transforms), and every kernel offset only selects shifted rows
 * and transforms across them, 16 rows at a time in registers. About half the
 * work of gathering and transforming each of the kh * kw rows on its own. */
static int rows_share_width_transform(const conv_geom *g, int64_t p) {
    return is_pow2(g->OW) && g->OW >= NV && p % g->OW == 0 && p / g->OW >= NV;
}

/* The kh * kw rows of channel ch of sample b into out (row i = kernel offset i),
 * each transformed along the positions in blocks of p (p = 1: plain unfold).
 * scratch holds kw * H * OW floats for the shared path. */
HDQT_CLONES
static void build_channel_rows(const dw_ctx *c, int64_t b, int64_t ch, float *out, float *scratch) {
    const conv_geom *g = &c->g;
    const int64_t L = g->OH * g->OW, offsets = g->kh * g->kw;
    if (!rows_share_width_transform(g, c->p)) {
        for (int64_t i = 0; i < offsets; ++i) {
            gather_row(g, c->x, b, ch * offsets + i, out + i * L);
            fwht_row(out + i * L, L, c->p);
        }
        return;
    }
    const float *img = c->x + (b * g->C + ch) * g->H * g->W;
    const int64_t OW = g->OW, m = c->p / OW;
    /* every input row, shifted by kj and transformed along the width */
    float *padded = scratch + g->kw * g->H * OW; /* one zero-padded input row */
    const int64_t padded_len = (OW - 1) * g->sw + (g->kw - 1) * g->dw + 1;
    for (int64_t i = 0; i < padded_len; ++i) padded[i] = 0.0f;
    for (int64_t ih = 0; ih < g->H; ++ih) {
        const int64_t copy = g->W < padded_len - g->pw ? g->W : padded_len - g->pw;
        if (copy > 0) memcpy(padded + g->pw, img + ih * g->W, (size_t)copy * sizeof(float));
        for (int64_t kj = 0; kj < g->kw; ++kj) {
            const float *src = padded + kj * g->dw;
            float *d = scratch + (kj * g->H + ih) * OW;
            if (g->sw == 1 && OW == NV) {
                vf16 v0;
                memcpy(&v0, src, sizeof v0);
                v0 = lanes16(v0);
                memcpy(d, &v0, sizeof v0);
            } else if (g->sw == 1 && OW == 2 * NV) {
                vf16 v0, v1;
                memcpy(&v0, src, sizeof v0);
                memcpy(&v1, src + NV, sizeof v1);
                v0 = lanes16(v0), v1 = lanes16(v1);
                vf16 sum = v0 + v1, diff = v0 - v1;
                memcpy(d, &sum, sizeof sum);
                memcpy(d + NV, &diff, sizeof diff);
            } else {
                for (int64_t ow = 0; ow < OW; ++ow) d[ow] = src[ow * g->sw];
                fwht_row(d, OW, OW);
            }
        }
    }
    static const float zeros[NV] = {0};
    for (int64_t ki = 0; ki < g->kh; ++ki) {
        for (int64_t kj = 0; kj < g->kw; ++kj) {
            float *dst = out + (ki * g->kw + kj) * L;
            const float *shifted = scratch + kj * g->H * OW;
            for (int64_t s = 0; s < OW; s += NV) {         /* a strip of 16 columns */
                for (int64_t r0 = 0; r0 < g->OH; r0 += NV) { /* 16 output rows in registers */
                    const float *src[NV]; /* row i's input row, or zeros outside the image */
                    for (int i = 0; i < NV; ++i) {
                        int64_t ih = (r0 + i) * g->sh - g->ph + ki * g->dh;
                        src[i] = ih >= 0 && ih < g->H ? shifted + ih * OW + s : zeros;
                    }
                    vf16 v[NV];
                    for (int i = 0; i < NV; ++i) memcpy(&v[i], src[i], sizeof v[i]);
                    butterflies16(v);
                    for (int i = 0; i < NV; ++i) memcpy(dst + (r0 + i) * OW + s, &v[i], sizeof v[i]);
                }
                for (int64_t h = NV; h < m; h <<= 1) { /* the remaining stages across rows, within blocks of m */
                    for (int64_t r = 0; r < g->OH; ++r) {
                        if (r & h) continue;
                        vf16 lo, hi, sum, diff;
                        memcpy(&lo, dst + r * OW + s, sizeof lo);
                        memcpy(&hi, dst + (r + h) * OW + s, sizeof hi);
                        sum = lo + hi, diff = lo - hi;
                        memcpy(dst + r * OW + s, &sum, sizeof sum);
                        memcpy(dst + (r + h) * OW + s, &diff, sizeof diff);
                    }
                }
            }
        }
    }
}

static void cols_amax_range(void *arg, int64_t begin, int64_t end, int worker) {
    dw_ctx *c = (dw_ctx *)arg;
    const int64_t offsets = c->g.kh * c->g.kw, L = c->g.OH * c->g.OW;
    float *r = c->rows + worker * c->rows_per_worker * L;
    float *scratch = c->scratch + worker * c->scratch_per_worker;
    float m = 0.0f;
    for (int64_t b = begin; b < end; ++b) {
        for (int64_t ch = 0; ch < c->g.C; ++ch) {
            build_channel_rows(c, b, ch, r, scratch);
            m = absmax_step(m, absmax_row(r, offsets * L));
        }
    }
    c->amax[worker] = m;
}

/* Sum of the 16 lanes of v. */
static inline float lane_sum(vf16 v) {
    float lanes[NV], sum = 0.0f;
    memcpy(lanes, &v, sizeof lanes);
    for (int j = 0; j < NV; ++j) sum += lanes[j];
    return sum;
}

#define DOT_ROWS 4 /* column rows per register block, and gradient rows */

/* part[n * K + k + i] += sum_l g[n][l] * r_i[l] for the N gradient rows g (stride
 * row_stride) and `count` <= 4 column rows r_i = r + i * L (k .. k + count - 1; the
 * buffer holds 4 rows, unused ones zeroed). 4 x 4 register blocks: each vector
 * load feeds 4 multiply-adds, and the gradient rows, which live in L2, are read
 * once per 4 column rows. */
HDQT_CLONES
static void dot_rows(const float *gb, int64_t row_stride, int64_t N, const float *r, int64_t L, int64_t K, int64_t k,
                     int count, float *part) {
    const int64_t full = L / NV * NV;
    for (int64_t n0 = 0; n0 < N; n0 += DOT_ROWS) {
        const int64_t rows = N - n0 < DOT_ROWS ? N - n0 : DOT_ROWS;
        const float *g[DOT_ROWS];
        for (int i = 0; i < DOT_ROWS; ++i) g[i] = gb + (n0 + (i < rows ? i : 0)) * row_stride;
        vf16 acc[DOT_ROWS][DOT_ROWS];
        for (int i = 0; i < DOT_ROWS; ++i)
            for (int j = 0; j < DOT_ROWS; ++j) acc[i][j] = (vf16){0};
        for (int64_t l = 0; l < full; l += NV) {
            vf16 v[DOT_ROWS], gv;
            for (int j = 0; j < DOT_ROWS; ++j) memcpy(&v[j], r + j * L + l, sizeof gv);
            for (int i = 0; i < DOT_ROWS; ++i) { /* rows past N repeat row n0: computed, not stored */
                memcpy(&gv, g[i] + l, sizeof gv);
                for (int j = 0; j < DOT_ROWS; ++j) acc[i][j] += gv * v[j];
            }
        }
        for (int i = 0; i < rows; ++i) {
            for (int j = 0; j < count; ++j) {
                float sum = lane_sum(acc[i][j]);
                for (int64_t l = full; l < L; ++l) sum += g[i][l] * r[j * L + l];
                part[(n0 + i) * K + k + j] += sum;
            }
        }
    }
}

static void dw_range(void *arg, int64_t begin, int64_t end, int worker) {
    dw_ctx *c = (dw_ctx *)arg;
    const int64_t offsets = c->g.kh * c->g.kw, K = c->g.C * offsets, L = c->g.OH * c->g.OW, B = c->g.B;
    float *r = c->rows + worker * c->rows_per_worker * L;
    float *scratch = c->scratch + worker * c->scratch_per_worker;
    float *part = c->partials + worker * c->N * K;
    round_ctx rc = {NULL, NULL, c->scale, c->qmin, c->qmax, (uint32_t)c->seed, (uint32_t)(c->seed >> 32)};
    memset(part, 0, (size_t)(c->N * K) * sizeof(float));
    for (int64_t b = begin; b < end; ++b) {
        for (int64_t ch0 = 0; ch0 < c->g.C; ch0 += c->group) { /* a group's rows fill whole register blocks */
            int64_t channels = c->g.C - ch0 < c->group ? c->g.C - ch0 : c->group;
            int64_t k0 = ch0 * offsets, count = channels * offsets;
            for (int64_t i = 0; i < channels; ++i) build_channel_rows(c, b, ch0 + i, r + i * offsets * L, scratch);
            for (int64_t i = 0; i < count; ++i) sr_apply(r + i * L, r + i * L, ((k0 + i) * B + b) * L, L, &rc);
            int64_t padded = (count + DOT_ROWS - 1) / DOT_ROWS * DOT_ROWS;
            memset(r + count * L, 0, (size_t)((padded - count) * L) * sizeof(float));
            for (int64_t i = 0; i < count; i += DOT_ROWS)
                dot_rows(c->gq + b * L, B * L, c->N, r + i * L, L, K, k0 + i,
                         count - i < DOT_ROWS ? (int)(count - i) : DOT_ROWS, part);
        }
    }
}

static int clamp_threads(int threads) {
    return threads < 1 ? 1 : (threads > HDQT_MAX_THREADS ? HDQT_MAX_THREADS : threads);
}

/* Geometry and per-worker buffers of both passes; 0, or -1 if a buffer could not be allocated. */
static int dw_setup(dw_ctx *c, int threads, const float *x, int64_t B, int64_t C, int64_t H, int64_t W, int64_t kh,
                    int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw, int64_t OH,
                    int64_t OW, int64_t p, int64_t N) {
    memset(c, 0, sizeof *c);
    c->g = make_geom(B, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, OH, OW);
    c->x = x, c->p = p, c->N = N;
    const int64_t offsets = kh * kw;
    int64_t group = 1; /* channels per group: the fewest whose rows are a multiple of DOT_ROWS */
    while ((group * offsets) % DOT_ROWS != 0) ++group;
    c->group = group;
    c->rows_per_worker = (group * offsets + DOT_ROWS - 1) / DOT_ROWS * DOT_ROWS;
    /* the shifted, width-transformed input rows, and one zero-padded input row */
    c->scratch_per_worker = rows_share_width_transform(&c->g, p) ? kw * H * OW + (OW - 1) * sw + (kw - 1) * dw + 1 : 0;
    c->rows = (float *)malloc((size_t)threads * c->rows_per_worker * OH * OW * sizeof(float));
    c->scratch = (float *)malloc((size_t)threads * c->scratch_per_worker * sizeof(float) + 1);
    c->partials = N > 0 ? (float *)malloc((size_t)threads * N * C * offsets * sizeof(float)) : NULL;
    if (c->rows == NULL || c->scratch == NULL || (N > 0 && c->partials == NULL)) {
        free(c->rows);
        free(c->scratch);
        free(c->partials);
        return -1;
    }
    return 0;
}

static void dw_release(dw_ctx *c) {
    free(c->rows);
    free(c->scratch);
    free(c->partials);
}

/* max|H cols| over the batch (NaN if any is NaN); -1 if no buffer could be allocated. */
float hdqt_conv_cols_amax_f32(const float *x, int64_t B, int64_t C, int64_t H, int64_t W, int64_t kh, int64_t kw,
                              int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw, int64_t OH,
                              int64_t OW, int64_t p, int threads) {
    threads = clamp_threads(threads);
    dw_ctx c;
    if (dw_setup(&c, threads, x, B, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, OH, OW, p, 0) != 0) return -1.0f;
    int used = parallel_for(B, threads, 1, cols_amax_range, &c);
    dw_release(&c);
    return reduce_amax(c.amax, used);
}

/* dw (N, K) = gq (N, B, L) @ Q_sr(H cols (K, B, L))^T, the columns rounded onto
 * [qmin, qmax] with `scale`. Returns 0, or -1 if no buffer could be allocated. */
int hdqt_conv_dw_sr_f32(const float *x, const float *gq, float *dw_out, int64_t N, int64_t B, int64_t C, int64_t H,
                        int64_t W, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh,
                        int64_t dw, int64_t OH, int64_t OW, int64_t p, float scale, float qmin, float qmax,
                        uint64_t seed, int threads) {
    threads = clamp_threads(threads);
    dw_ctx c;
    if (dw_setup(&c, threads, x, B, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, OH, OW, p, N) != 0) return -1;
    c.gq = gq, c.scale = scale, c.qmin = qmin, c.qmax = qmax, c.seed = seed;
    const int64_t NK = N * C * kh * kw;
    int used = parallel_for(B, threads, 1, dw_range, &c);
    for (int64_t i = 0; i < NK; ++i) {
        float sum = 0.0f;
        for (int t = 0; t < used; ++t) sum += c.partials[t * NK + i];
        dw_out[i] = sum;
    }
    dw_release(&c);
    return 0;
}

/* ------------------------------------------------- tiled saturating matmul */

/* Y (M, J) = sum over tiles t of clamp(A[:, t] @ B[t, :], -limit, limit), where
 * tile t covers `tile` consecutive entries of the reduction K. A is read through
 * its strides, A[m, k] = A[m * sm + k * sk] (A's values are broadcast one at a
 * time, so any layout works without a copy); B is (K, J) row-major, Y (M, J). Operands hold integers in float32; the caller makes
 * sure every partial sum stays below 2^24, so each is exact.
 *
 * Register blocking: MR rows of A against one 16-wide column vector of B. */

typedef struct {
    const float *A, *B;
    float *Y;
    int64_t sm, sk, M, K, J, tile;
    float limit;
} tmm_ctx;

/* Clamp a vector to [-lim, lim] in place. Written as a lane loop of min/max
 * ternaries, the form the vectoriser turns into minps/maxps; vector comparisons
 * in C get split into scalar code. A macro, so that it compiles inside each
 * clone with that clone's instruction set. */
#define CLAMP16(v, lim)                                                                                \
    do {                                                                                               \
        float t_[NV];                                                                                  \
        memcpy(t_, &(v), sizeof t_);                                                                   \
        for (int i_ = 0; i_ < NV; ++i_) {                                                              \
            float a_ = t_[i_] < (lim) ? t_[i_] : (lim);                                                \
            t_[i_] = a_ > -(lim) ? a_ : -(lim);                                                        \
        }                                                                                              \
        memcpy(&(v), t_, sizeof t_);                                                                   \
    } while (0)

/* Y[:, j:j+lanes] from a (K x 16) strip of B: row k of the strip starts at
 * b_strip + koff[k], or at b_strip + k * ldb without a table. Inlined into the
 * two clones below, so that the address rule is resolved at compile time. */
static inline __attribute__((always_inline)) void tmm_block(const tmm_ctx *c, const float *b_strip,
                                                           const int64_t *koff, int64_t ldb, int64_t j,
                                                           int64_t lanes) {
    const float lim = c->limit;
    for (int64_t m0 = 0; m0 < c->M; m0 += MR) {
        int64_t rows = c->M - m0 < MR ? c->M - m0 : MR;
        vf16 total[MR];
        for (int r = 0; r < MR; ++r) total[r] = (vf16){0};
        for (int64_t k0 = 0; k0 < c->K; k0 += c->tile) {
            int64_t k1 = k0 + c->tile < c->K ? k0 + c->tile : c->K;
            vf16 acc[MR];
            for (int r = 0; r < MR; ++r) acc[r] = (vf16){0};
            for (int64_t k = k0; k < k1; ++k) {
                vf16 b;
                memcpy(&b, b_strip + (koff ? koff[k] : k * ldb), sizeof b);
                if (rows == MR) {
                    for (int r = 0; r < MR; ++r) acc[r] += c->A[(m0 + r) * c->sm + k * c->sk] * b;
                } else {
                    for (int r = 0; r < rows; ++r) acc[r] += c->A[(m0 + r) * c->sm + k * c->sk] * b;
                }
            }
            for (int r = 0; r < MR; ++r) {
                CLAMP16(acc[r], lim);
                total[r] += acc[r];
            }
        }
        for (int r = 0; r < rows; ++r) memcpy(c->Y + (m0 + r) * c->J + j, &total[r], (size_t)lanes * sizeof(float));
    }
}

HDQT_CLONES
static void tmm_vector_block(const tmm_ctx *c, const float *b_strip, int64_t ldb, int64_t j, int64_t lanes) {
    tmm_block(c, b_strip, NULL, ldb, j, lanes);
}

HDQT_CLONES
static void tmm_vector_block_offsets(const tmm_ctx *c, const float *b_strip, const int64_t *koff, int64_t j,
                                     int64_t lanes) {
    tmm_block(c, b_strip, koff, 0, j, lanes);
}

static void tmm_range(void *arg, int64_t begin, int64_t end, int worker) {
    (void)worker;
    const tmm_ctx *c = (const tmm_ctx *)arg;
    for (int64_t unit = begin; unit < end; ++unit) { /* unit: one run of 16 output columns */
        int64_t j = unit * NV, lanes = c->J - j < NV ? c->J - j : NV;
        if (lanes == NV) {
            tmm_vector_block(c, c->B + j, c->J, j, NV);
            continue;
        }
        /* the last, partial run: a zero-padded copy of its strip keeps it vectorised */
        float *strip = (float *)calloc((size_t)c->K * NV, sizeof(float));
        if (strip == NULL) { /* no memory for the copy: the same sums one column at a time */
            for (int64_t col = j; col < c->J; ++col) {
                for (int64_t m = 0; m < c->M; ++m) {
                    float total = 0.0f;
                    for (int64_t k0 = 0; k0 < c->K; k0 += c->tile) {
                        int64_t k1 = k0 + c->tile < c->K ? k0 + c->tile : c->K;
                        float acc = 0.0f;
                        for (int64_t k = k0; k < k1; ++k) acc += c->A[m * c->sm + k * c->sk] * c->B[k * c->J + col];
                        total += acc < -c->limit ? -c->limit : (acc > c->limit ? c->limit : acc);
                    }
                    c->Y[m * c->J + col] = total;
                }
            }
            continue;
        }
        for (int64_t k = 0; k < c->K; ++k) memcpy(strip + k * NV, c->B + k * c->J + j, (size_t)lanes * sizeof(float));
        tmm_vector_block(c, strip, NV, j, lanes);
        free(strip);
    }
}

void hdqt_tiled_matmul_f32(const float *A, int64_t sm, int64_t sk, const float *B, float *Y, int64_t M, int64_t K,
                           int64_t J, int64_t tile, float limit, int threads) {
    tmm_ctx c = {A, B, Y, sm, sk, M, K, J, tile, limit};
    int64_t units = (J + NV - 1) / NV;
    int64_t work_per_unit = M * K * NV;
    int64_t grain = work_per_unit > 0 ? ((int64_t)1 << 20) / work_per_unit + 1 : units;
    parallel_for(units, threads, grain, tmm_range, &c);
}

/* ------------------------------------------- tiled saturating convolution */

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
} conv_ctx;

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
static void conv_panel_product(const conv_ctx *c, const float *panel, int64_t b, int64_t l0) {
    const int64_t L = c->OH * c->OW, K = c->C * c->kh * c->kw;
    const int64_t lanes = L - l0 < NV ? L - l0 : NV;
    tmm_ctx t = {c->wt, NULL, c->y + b * c->N * L, 1, c->N, c->N, K, L, c->tile, c->limit};
    tmm_vector_block(&t, panel, NV, l0, lanes);
}

static void conv_range(void *arg, int64_t begin, int64_t end, int worker) {
    const conv_ctx *c = (const conv_ctx *)arg;
    const int64_t L = c->OH * c->OW, runs = (L + NV - 1) / NV, K = c->C * c->kh * c->kw;
    float *panel = c->panels + worker * K * NV; /* one L1-sized panel per worker */
    for (int64_t unit = begin; unit < end; ++unit) {
        int64_t b = unit / runs, l0 = (unit % runs) * NV;
        conv_pack_panel(c, b, l0, panel);
        conv_panel_product(c, panel, b, l0);
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

typedef struct {
    const conv_ctx *c;
    float *rows;         /* per worker: C * band_in rows of row_len floats */
    const int64_t *koff; /* K offsets into a worker's rows, for the band's first output row */
    int64_t row_len, band_in;
} conv_rows_ctx;

static void conv_rows_range(void *arg, int64_t begin, int64_t end, int worker) {
    const conv_rows_ctx *rc = (const conv_rows_ctx *)arg;
    const conv_ctx *c = rc->c;
    const int64_t L = c->OH * c->OW, K = c->C * c->kh * c->kw, bands = (c->OH + CONV_BAND - 1) / CONV_BAND;
    const int64_t row_len = rc->row_len;
    float *rows = rc->rows + worker * c->C * rc->band_in * row_len;
    /* the padding columns are never written again, so they stay zero */
    memset(rows, 0, (size_t)(c->C * rc->band_in * row_len) * sizeof(float));
    for (int64_t unit = begin; unit < end; ++unit) {
        int64_t b = unit / bands, oh0 = unit % bands * CONV_BAND;
        int64_t oh1 = oh0 + CONV_BAND < c->OH ? oh0 + CONV_BAND : c->OH;
        int64_t ih0 = oh0 * c->sh - c->ph, used = (oh1 - 1 - oh0) * c->sh + (c->kh - 1) * c->dh + 1;
        for (int64_t ch = 0; ch < c->C; ++ch) {
            const float *img = c->x + (b * c->C + ch) * c->H * c->W;
            for (int64_t r = 0; r < used; ++r) {
                float *dst = rows + (ch * rc->band_in + r) * row_len;
                int64_t ih = ih0 + r;
                if (ih < 0 || ih >= c->H) memset(dst, 0, (size_t)row_len * sizeof(float));
                else memcpy(dst + c->pw, img + ih * c->W, (size_t)c->W * sizeof(float));
            }
        }
        tmm_ctx t = {c->wt, NULL, c->y + b * c->N * L, 1, c->N, c->N, K, L, c->tile, c->limit};
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

/* Returns 0, or -1 if the panel buffers could not be allocated. */
int hdqt_conv_tiled_f32(const float *x, const float *wt, float *y, int64_t B, int64_t C, int64_t H, int64_t W,
                        int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh,
                        int64_t dw, int64_t OH, int64_t OW, int64_t N, int64_t tile, float limit, int threads) {
    if (threads > HDQT_MAX_THREADS) threads = HDQT_MAX_THREADS;
    if (threads < 1) threads = 1;
    const int64_t L = OH * OW, runs = (L + NV - 1) / NV, K = C * kh * kw;
    conv_ctx c = {x, wt, y, NULL, B, C, H, W, N, kh, kw, sh, sw, ph, pw, dh, dw, OH, OW, tile, limit};
    if (sw == 1) return conv_direct(&c, threads);
    float *panels = (float *)aligned_alloc(64, (size_t)threads * K * NV * sizeof(float));
    if (panels == NULL) return -1;
    c.panels = panels;
    int64_t grain = ((int64_t)1 << 20) / (N * K * NV + 1) + 1;
    parallel_for(B * runs, threads, grain, conv_range, &c);
    free(panels);
    return 0;
}
