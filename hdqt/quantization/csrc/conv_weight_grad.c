/* The weight gradient of a convolution without materialising its columns.
 * Part of the one translation unit that kernels.c includes (static helpers are
 * shared across files); not compiled on its own.
 */
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
    /* int8 dot products (see dw_sample_bytes): row length padded to 64, and per
     * worker the sample's gradient rows + 128 as bytes, the column rows as bytes
     * and their sums; bytes == NULL: float32 only */
    int64_t padded_len;
    uint8_t *bytes;
    int narrow; /* narrow vectors (narrow_vectors): dot_rows_narrow, fwht_row_narrow */
    int i8_variant; /* the int8 variant of the byte path (dw_int8_variant) */
    int64_t byte_samples[HDQT_MAX_THREADS]; /* samples multiplied as bytes, per worker */
    /* int16 builds (build_channel_rows16): the largest |x| for which they are exact
     * (32767 / p; 0: float builds only); per worker, the rows and the scratch as int16 */
    int64_t code_bound;
    int use16;
    int16_t *rows16, *scratch16;
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

/* The stages h = 16 .. m/2 of the transform across the output rows of a 16-column strip
 * s of dst (rows of OW elements of vector type T, NV per vector), within blocks of m rows:
 * the float and the int16 builds' last stages (the first four run in registers). */
#define STAGES_ACROSS_ROWS(T)                                                                          \
    do {                                                                                               \
        for (int64_t h = NV; h < m; h <<= 1) {                                                         \
            for (int64_t r = 0; r < g->OH; ++r) {                                                      \
                if (r & h) continue;                                                                   \
                T lo, hi, sum, diff;                                                                   \
                memcpy(&lo, dst + r * OW + s, sizeof lo);                                              \
                memcpy(&hi, dst + (r + h) * OW + s, sizeof hi);                                        \
                sum = lo + hi, diff = lo - hi;                                                         \
                memcpy(dst + r * OW + s, &sum, sizeof sum);                                            \
                memcpy(dst + (r + h) * OW + s, &diff, sizeof diff);                                    \
            }                                                                                          \
        }                                                                                              \
    } while (0)

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
#ifdef HDQT_NARROW_BYTES
            if (c->narrow) {
                fwht_row_narrow(out + i * L, L, c->p);
                continue;
            }
#endif
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
                STAGES_ACROSS_ROWS(vf16); /* the remaining stages across rows, within blocks of m */
            }
        }
    }
}

/* The shared-width build on int16 lanes. The columns of a conv's saved input are
 * integer codes (|x| <= 15 at 4 bits), and the transform of a block of p of them only
 * adds and subtracts, so every intermediate is an integer of at most p * max|x|: exact
 * in int16 while that is <= 32767, and exact in float32 as well (below 2^24). Both builds
 * therefore give the same numbers, and the int16 one moves half the bytes and holds
 * 16 values a 256-bit register, so 16 rows of a strip stay in AVX2's 16 registers (the
 * float build's 16 vf16 do not). Used where the width is 16 or 32 at width stride 1, for
 * every channel whose values are integers of at most 32767 / p in magnitude (checked as
 * it is read: others take the float build). */
typedef int16_t vs16 __attribute__((vector_size(32)));
#define SWAP16(x, h) SWAP_LANES_T(x, h, vs16)
#define SIGNS16(h) LANE_SIGNS_T(vs16, h)

/* lanes16 on int16 lanes: the four stages inside one 16-lane vector. */
static inline __attribute__((always_inline)) vs16 lanes16_i16(vs16 v) {
    v = SWAP16(v, 1) + SIGNS16(1) * v;
    v = SWAP16(v, 2) + SIGNS16(2) * v;
    v = SWAP16(v, 4) + SIGNS16(4) * v;
    return SWAP16(v, 8) + SIGNS16(8) * v;
}

/* butterflies16 on int16 vectors: the four stages between 16 of them (hadamard.c's network). */
static inline __attribute__((always_inline)) void butterflies16_i16(vs16 *v) {
    BUTTERFLIES16(vs16);
}

static int build16_applies(const conv_geom *g, int64_t p, int64_t code_bound) {
    return rows_share_width_transform(g, p) && g->sw == 1 && (g->OW == 16 || g->OW == 32) && code_bound > 0 &&
           code_bound * p <= 32767;
}

/* The int16 scratch per worker: the shifted, width-transformed rows, and the channel's
 * input rows zero-padded to the padded width. */
static int64_t padded_width16(const conv_geom *g) {
    return (g->OW - 1) + (g->kw - 1) * g->dw + 1; /* width stride 1 */
}

static int64_t scratch16_len(const conv_geom *g) {
    return g->kw * g->H * g->OW + g->H * padded_width16(g);
}

/* build_channel_rows' shared-width path on int16 (where build16_applies). Returns 0,
 * or 1 when a value of the channel that the columns read is not an integer of at most
 * c->code_bound in magnitude (out is then not written: the float build takes the
 * channel). */
HDQT_CLONES
static int build_channel_rows16(const dw_ctx *c, int64_t b, int64_t ch, int16_t *out, int16_t *scratch) {
    const conv_geom *g = &c->g;
    const float *img = c->x + (b * g->C + ch) * g->H * g->W;
    const float bound = (float)c->code_bound;
    const int64_t OW = g->OW, m = c->p / OW, pw_len = padded_width16(g);
    const int64_t copy = g->W < pw_len - g->pw ? g->W : pw_len - g->pw;
    int16_t *rows_in = scratch + g->kw * g->H * OW; /* H rows of pw_len, zero margins */
    memset(rows_in, 0, (size_t)(g->H * pw_len) * sizeof(int16_t));
    int bad = 0;
    for (int64_t ih = 0; ih < g->H; ++ih) {
        const float *src = img + ih * g->W;
        int16_t *dst = rows_in + ih * pw_len + g->pw;
        for (int64_t i = 0; i < copy; ++i) {
            float v = src[i];
            int32_t q = (int32_t)(v >= -bound && v <= bound ? v : 0.0f);
            bad |= (float)q != v; /* out of range (then q = 0 != v), not an integer, or NaN */
            dst[i] = (int16_t)q;
        }
    }
    if (bad) return 1;
    for (int64_t ih = 0; ih < g->H; ++ih) {
        for (int64_t kj = 0; kj < g->kw; ++kj) {
            const int16_t *src = rows_in + ih * pw_len + kj * g->dw;
            int16_t *d = scratch + (kj * g->H + ih) * OW;
            vs16 v0;
            memcpy(&v0, src, sizeof v0);
            v0 = lanes16_i16(v0);
            if (OW == NV) {
                memcpy(d, &v0, sizeof v0);
                continue;
            }
            vs16 v1;
            memcpy(&v1, src + NV, sizeof v1);
            v1 = lanes16_i16(v1);
            vs16 sum = v0 + v1, diff = v0 - v1;
            memcpy(d, &sum, sizeof sum);
            memcpy(d + NV, &diff, sizeof diff);
        }
    }
    static const int16_t zeros[NV] = {0};
    const int64_t L = g->OH * OW;
    for (int64_t ki = 0; ki < g->kh; ++ki) {
        for (int64_t kj = 0; kj < g->kw; ++kj) {
            int16_t *dst = out + (ki * g->kw + kj) * L;
            const int16_t *shifted = scratch + kj * g->H * OW;
            for (int64_t s = 0; s < OW; s += NV) {
                for (int64_t r0 = 0; r0 < g->OH; r0 += NV) {
                    vs16 v[NV];
                    for (int i = 0; i < NV; ++i) {
                        int64_t ih = (r0 + i) * g->sh - g->ph + ki * g->dh;
                        memcpy(&v[i], ih >= 0 && ih < g->H ? shifted + ih * OW + s : zeros, sizeof v[i]);
                    }
                    butterflies16_i16(v);
                    for (int i = 0; i < NV; ++i) memcpy(dst + (r0 + i) * OW + s, &v[i], sizeof v[i]);
                }
                STAGES_ACROSS_ROWS(vs16);
            }
        }
    }
    return 0;
}

/* max|v| of n int16 values (none is -32768: build16_applies bounds them). */
HDQT_CLONES
static int32_t absmax_row16(const int16_t *v, int64_t n) {
    int16_t m = 0;
    for (int64_t i = 0; i < n; ++i) {
        int16_t a = v[i] < 0 ? (int16_t)-v[i] : v[i];
        m = a > m ? a : m;
    }
    return m;
}

/* n int16 values as floats (exact). */
HDQT_CLONES
static void widen_row16(const int16_t *v, int64_t n, float *out) {
    for (int64_t i = 0; i < n; ++i) out[i] = (float)v[i];
}

static void cols_amax_range(void *arg, int64_t begin, int64_t end, int worker) {
    dw_ctx *c = (dw_ctx *)arg;
    const int64_t offsets = c->g.kh * c->g.kw, L = c->g.OH * c->g.OW;
    float *r = c->rows + worker * c->rows_per_worker * L;
    float *scratch = c->scratch + worker * c->scratch_per_worker;
    int16_t *r16 = c->use16 ? c->rows16 + worker * c->rows_per_worker * L : NULL;
    int16_t *scratch16 = c->use16 ? c->scratch16 + worker * scratch16_len(&c->g) : NULL;
    float m = 0.0f;
    int32_t m16 = 0; /* max over the channels built on int16 */
    for (int64_t b = begin; b < end; ++b) {
        for (int64_t ch = 0; ch < c->g.C; ++ch) {
            if (r16 && build_channel_rows16(c, b, ch, r16, scratch16) == 0) {
                int32_t a = absmax_row16(r16, offsets * L);
                m16 = a > m16 ? a : m16;
                continue;
            }
            build_channel_rows(c, b, ch, r, scratch);
            m = absmax_step(m, absmax_row(r, offsets * L));
        }
    }
    c->amax[worker] = absmax_step(m, (float)m16);
}

/* Sum of the 16 lanes of v. */
static inline float lane_sum(vf16 v) {
    float lanes[NV], sum = 0.0f;
    memcpy(lanes, &v, sizeof lanes);
    for (int j = 0; j < NV; ++j) sum += lanes[j];
    return sum;
}

#define DOT_ROWS 4 /* column rows per register block, and gradient rows */
#define HDQT_MAX_DW_ROWS 128 /* column rows of a channel group, at most (int8 path) */

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

#ifdef HDQT_NARROW_BYTES
/* dot_rows on narrow vectors (vfn): 4 gradient rows x 2 column rows per block, so
 * that the 8 accumulators fit the registers of AVX2 and NEON. */
NARROW_TARGET
static void dot_rows_narrow(const float *gb, int64_t row_stride, int64_t N, const float *r, int64_t L, int64_t K,
                            int64_t k, int count, float *part) {
    const int64_t full = L / NL * NL;
    for (int64_t n0 = 0; n0 < N; n0 += DOT_ROWS) {
        const int64_t rows = N - n0 < DOT_ROWS ? N - n0 : DOT_ROWS;
        const float *g[DOT_ROWS];
        for (int i = 0; i < DOT_ROWS; ++i) g[i] = gb + (n0 + (i < rows ? i : 0)) * row_stride;
        for (int j0 = 0; j0 < count; j0 += 2) { /* the buffer holds DOT_ROWS rows: row j0 + 1 exists */
            vfn acc[DOT_ROWS][2];
            for (int i = 0; i < DOT_ROWS; ++i) acc[i][0] = acc[i][1] = (vfn){0};
            const float *r0 = r + j0 * L, *r1 = r0 + L;
            for (int64_t l = 0; l < full; l += NL) {
                vfn v0, v1, gv;
                memcpy(&v0, r0 + l, sizeof v0);
                memcpy(&v1, r1 + l, sizeof v1);
                for (int i = 0; i < DOT_ROWS; ++i) {
                    memcpy(&gv, g[i] + l, sizeof gv);
                    acc[i][0] += gv * v0;
                    acc[i][1] += gv * v1;
                }
            }
            for (int i = 0; i < rows; ++i) {
                for (int j = 0; j < 2 && j0 + j < count; ++j) {
                    float lanes[NL], sum = 0.0f;
                    memcpy(lanes, &acc[i][j], sizeof lanes);
                    for (int q = 0; q < NL; ++q) sum += lanes[q];
                    const float *rj = j ? r1 : r0;
                    for (int64_t l = full; l < L; ++l) sum += g[i][l] * rj[l];
                    part[(n0 + i) * K + k + j0 + j] += sum;
                }
            }
        }
    }
}
#endif

#ifdef HDQT_INT8
/* The int8 path of pass 2. Both operands are integers on small grids: the rounded
 * columns in [qmin, qmax] and the quantized gradient. With the gradient offset to
 * unsigned bytes (g + 128), vpdpbusd multiplies 64 pairs per instruction, and
 * sum_l (g + 128) c = sum_l g c + 128 sum_l c: the column rows' sums undo the
 * offset. Every sum is an exact int32 (rows of at most 2^31 / (255 * 128)
 * positions), so the result equals the float32 dot's wherever that is exact. */
INT8_TARGET
static int dw_gradient_bytes(const float *g, int64_t n, uint8_t *dst, int64_t padded) {
    int bad = 0;
    for (int64_t i = 0; i < padded; i += NV) {
        int64_t lanes_n = n - i < NV ? (n - i > 0 ? n - i : 0) : NV;
        __mmask16 lanes = (__mmask16)((1u << lanes_n) - 1);
        __m512 v = _mm512_maskz_loadu_ps(lanes, g + i);
        __m512i q = _mm512_cvttps_epi32(v);
        bad |= fits16(v, q, -128.0f, 127.0f, lanes) != lanes;
        q = _mm512_maskz_add_epi32(lanes, q, _mm512_set1_epi32(128)); /* padding: 0 */
        _mm_storeu_si128((__m128i *)(dst + i), _mm512_cvtepi32_epi8(q));
    }
    return bad;
}

/* A rounded column row as signed bytes (padding 0); returns its sum. */
INT8_TARGET
static int32_t dw_column_bytes(const float *r, int64_t n, int8_t *dst, int64_t padded) {
    __m512i sums = _mm512_setzero_si512();
    for (int64_t i = 0; i < padded; i += NV) {
        int64_t lanes_n = n - i < NV ? (n - i > 0 ? n - i : 0) : NV;
        __mmask16 lanes = (__mmask16)((1u << lanes_n) - 1);
        __m512i q = _mm512_cvttps_epi32(_mm512_maskz_loadu_ps(lanes, r + i));
        sums = _mm512_add_epi32(sums, q);
        _mm_storeu_si128((__m128i *)(dst + i), _mm512_cvtepi32_epi8(q));
    }
    return _mm512_reduce_add_epi32(sums);
}

/* dot_rows on bytes: gb holds the N gradient rows (+ 128), r `count` <= 4 column rows
 * (4 in the buffer, unused ones zero), sums their sums. */
INT8_TARGET
static void dot_rows_i8(const uint8_t *gb, int64_t N, const int8_t *r, const int32_t *sums, int64_t padded,
                        int64_t K, int64_t k, int count, float *part) {
    for (int64_t n0 = 0; n0 < N; n0 += DOT_ROWS) {
        const int64_t rows = N - n0 < DOT_ROWS ? N - n0 : DOT_ROWS;
        const uint8_t *g[DOT_ROWS];
        for (int i = 0; i < DOT_ROWS; ++i) g[i] = gb + (n0 + (i < rows ? i : 0)) * padded;
        __m512i acc[DOT_ROWS][DOT_ROWS];
        for (int i = 0; i < DOT_ROWS; ++i)
            for (int j = 0; j < DOT_ROWS; ++j) acc[i][j] = _mm512_setzero_si512();
        for (int64_t l = 0; l < padded; l += 64) {
            __m512i v[DOT_ROWS];
            for (int j = 0; j < DOT_ROWS; ++j) v[j] = _mm512_loadu_si512(r + j * padded + l);
            for (int i = 0; i < DOT_ROWS; ++i) {
                __m512i gv = _mm512_loadu_si512(g[i] + l);
                for (int j = 0; j < DOT_ROWS; ++j) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], gv, v[j]);
            }
        }
        for (int i = 0; i < rows; ++i)
            for (int j = 0; j < count; ++j)
                part[(n0 + i) * K + k + j] += (float)(_mm512_reduce_add_epi32(acc[i][j]) - 128 * sums[j]);
    }
}
#endif

/* The int8 variant with which pass 2 may multiply bytes (I8_NONE: none): columns
 * rounded onto a byte grid, int32 sums that cannot overflow, and on AVX2 16-bit
 * pair sums that cannot saturate (see i8_dot_avx2): the gradient + 128 (<= 255)
 * times a column byte, 2 * 255 * max|column| <= 32767, so columns of up to 7 bits. */
static int dw_int8_variant(const dw_ctx *c) {
#ifdef HDQT_INT8
    const int64_t L = c->g.OH * c->g.OW;
    if (!(c->qmin >= -128.0f && c->qmax <= 127.0f && (double)L * 255.0 * 128.0 < 2147483647.0)) return I8_NONE;
    const int v = i8_variant_now();
    const float column_top = -c->qmin > c->qmax ? -c->qmin : c->qmax;
    if (v == I8_AVX512VNNI || v == I8_AVXVNNI || (v == I8_AVX2 && 2.0f * 255.0f * column_top <= 32767.0f)) return v;
#else
    (void)c;
#endif
    return I8_NONE;
}

#ifdef HDQT_INT8
/* The byte rows of a gradient and a column, and their dot rows, on c->i8_variant. */
static int dw_gradient_row(const dw_ctx *c, const float *g, int64_t n, uint8_t *dst, int64_t padded) {
    if (c->i8_variant == I8_AVX512VNNI) return dw_gradient_bytes(g, n, dst, padded);
    return i8x_gradient_bytes(g, n, dst, padded);
}

static int32_t dw_column_row(const dw_ctx *c, const float *r, int64_t n, int8_t *dst, int64_t padded) {
    if (c->i8_variant == I8_AVX512VNNI) return dw_column_bytes(r, n, dst, padded);
    return i8p_column_bytes(r, n, dst, padded);
}

static void dw_dot_rows_bytes(const dw_ctx *c, const uint8_t *gb, const int8_t *r, const int32_t *sums,
                              int64_t padded, int64_t K, int64_t k, int count, float *part) {
#ifdef HDQT_INT8_AVXVNNI
    if (c->i8_variant == I8_AVXVNNI) {
        dot_rows_i8_avxvnni(gb, c->N, r, sums, padded, K, k, count, part);
        return;
    }
#endif
    if (c->i8_variant == I8_AVX2) dot_rows_i8_avx2(gb, c->N, r, sums, padded, K, k, count, part);
    else dot_rows_i8(gb, c->N, r, sums, padded, K, k, count, part);
}
#endif

static void dw_range(void *arg, int64_t begin, int64_t end, int worker) {
    dw_ctx *c = (dw_ctx *)arg;
    const int64_t offsets = c->g.kh * c->g.kw, K = c->g.C * offsets, L = c->g.OH * c->g.OW, B = c->g.B;
    float *r = c->rows + worker * c->rows_per_worker * L;
    float *scratch = c->scratch + worker * c->scratch_per_worker;
    float *part = c->partials + worker * c->N * K;
    round_ctx rc = {NULL, NULL, c->scale, c->qmin, c->qmax, (uint32_t)c->seed, (uint32_t)(c->seed >> 32)};
    int16_t *r16 = c->use16 ? c->rows16 + worker * c->rows_per_worker * L : NULL;
    int16_t *scratch16 = c->use16 ? c->scratch16 + worker * scratch16_len(&c->g) : NULL;
    memset(part, 0, (size_t)(c->N * K) * sizeof(float));
#ifdef HDQT_INT8
    const int64_t Lp = c->padded_len;
    uint8_t *gbytes = c->bytes ? c->bytes + worker * (c->N + c->rows_per_worker) * Lp : NULL;
    int8_t *cbytes = gbytes ? (int8_t *)(gbytes + c->N * Lp) : NULL;
    int32_t sums[HDQT_MAX_DW_ROWS];
#endif
    for (int64_t b = begin; b < end; ++b) {
        int bytes = 0; /* this sample's gradient rows are bytes: multiply bytes */
#ifdef HDQT_INT8
        if (gbytes) {
            int bad = 0;
            for (int64_t n = 0; n < c->N; ++n) bad |= dw_gradient_row(c, c->gq + n * B * L + b * L, L, gbytes + n * Lp, Lp);
            bytes = !bad;
            c->byte_samples[worker] += bytes;
        }
#endif
        for (int64_t ch0 = 0; ch0 < c->g.C; ch0 += c->group) { /* a group's rows fill whole register blocks */
            int64_t channels = c->g.C - ch0 < c->group ? c->g.C - ch0 : c->group;
            int64_t k0 = ch0 * offsets, count = channels * offsets;
            for (int64_t i = 0; i < channels; ++i) {
                if (r16 && build_channel_rows16(c, b, ch0 + i, r16, scratch16) == 0) {
                    widen_row16(r16, offsets * L, r + i * offsets * L); /* the float build's values */
                    continue;
                }
                build_channel_rows(c, b, ch0 + i, r + i * offsets * L, scratch);
            }
            for (int64_t i = 0; i < count; ++i) sr_apply(r + i * L, r + i * L, ((k0 + i) * B + b) * L, L, &rc);
            int64_t padded = (count + DOT_ROWS - 1) / DOT_ROWS * DOT_ROWS;
#ifdef HDQT_INT8
            if (bytes) {
                for (int64_t i = 0; i < padded; ++i) {
                    if (i < count) sums[i] = dw_column_row(c, r + i * L, L, cbytes + i * Lp, Lp);
                    else sums[i] = 0, memset(cbytes + i * Lp, 0, (size_t)Lp);
                }
                for (int64_t i = 0; i < count; i += DOT_ROWS)
                    dw_dot_rows_bytes(c, gbytes, cbytes + i * Lp, sums + i, Lp, K, k0 + i,
                                      count - i < DOT_ROWS ? (int)(count - i) : DOT_ROWS, part);
                continue;
            }
#endif
            memset(r + count * L, 0, (size_t)((padded - count) * L) * sizeof(float));
            for (int64_t i = 0; i < count; i += DOT_ROWS) {
                int rows_here = count - i < DOT_ROWS ? (int)(count - i) : DOT_ROWS;
#ifdef HDQT_NARROW_BYTES
                if (c->narrow) {
                    dot_rows_narrow(c->gq + b * L, B * L, c->N, r + i * L, L, K, k0 + i, rows_here, part);
                    continue;
                }
#endif
                dot_rows(c->gq + b * L, B * L, c->N, r + i * L, L, K, k0 + i, rows_here, part);
            }
        }
    }
}

static int clamp_threads(int threads) {
    return threads < 1 ? 1 : (threads > HDQT_MAX_THREADS ? HDQT_MAX_THREADS : threads);
}

/* Geometry and per-worker buffers of both passes; 0, or -1 if a buffer could not be allocated. */
static int dw_setup(dw_ctx *c, int threads, const float *x, int64_t B, int64_t C, int64_t H, int64_t W, int64_t kh,
                    int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw, int64_t OH,
                    int64_t OW, int64_t p, int64_t N, int allow_int16) {
    memset(c, 0, sizeof *c);
    c->narrow = narrow_vectors();
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
    c->code_bound = allow_int16 && p > 0 ? 32767 / p : 0;
    if (build16_applies(&c->g, p, c->code_bound)) { /* without memory for them, the float build runs */
        c->rows16 = (int16_t *)malloc((size_t)threads * c->rows_per_worker * OH * OW * sizeof(int16_t));
        c->scratch16 = (int16_t *)malloc((size_t)threads * scratch16_len(&c->g) * sizeof(int16_t));
        c->use16 = c->rows16 != NULL && c->scratch16 != NULL;
    }
    return 0;
}

/* The byte buffers of pass 2's int8 path, where it applies (grid set before). */
static void dw_setup_bytes(dw_ctx *c, int threads) {
    c->padded_len = (c->g.OH * c->g.OW + 63) / 64 * 64;
    c->i8_variant = dw_int8_variant(c);
    if (c->i8_variant == I8_NONE || c->rows_per_worker > HDQT_MAX_DW_ROWS) return;
    /* without memory for them, the float32 path runs */
    c->bytes = (uint8_t *)malloc((size_t)(threads * (c->N + c->rows_per_worker) * c->padded_len));
}

static void dw_release(dw_ctx *c) {
    free(c->rows16);
    free(c->scratch16);
    free(c->bytes);
    free(c->rows);
    free(c->scratch);
    free(c->partials);
}

/* max|H cols| over the batch (NaN if any is NaN); -1 if no buffer could be allocated.
 * allow_int16: build on int16 where that is exact (build_channel_rows16; the same result). */
float hdqt_conv_cols_amax_f32(const float *x, int64_t B, int64_t C, int64_t H, int64_t W, int64_t kh, int64_t kw,
                              int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw, int64_t OH,
                              int64_t OW, int64_t p, int allow_int16, int threads) {
    threads = clamp_threads(threads);
    dw_ctx c;
    if (dw_setup(&c, threads, x, B, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, OH, OW, p, 0, allow_int16) != 0)
        return -1.0f;
    int used = parallel_for(B, threads, 1, cols_amax_range, &c);
    dw_release(&c);
    return reduce_amax(c.amax, used);
}

/* dw (N, K) = gq (N, B, L) @ Q_sr(H cols (K, B, L))^T, the columns rounded onto
 * [qmin, qmax] with `scale`. use_int8: multiply bytes where both operands are
 * (the same result); allow_int16: build the columns on int16 where that is exact (the
 * same values). Returns how many samples were multiplied as bytes, or -1 if no buffer
 * could be allocated. */
int hdqt_conv_dw_sr_f32(const float *x, const float *gq, float *dw_out, int64_t N, int64_t B, int64_t C, int64_t H,
                        int64_t W, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh,
                        int64_t dw, int64_t OH, int64_t OW, int64_t p, float scale, float qmin, float qmax,
                        uint64_t seed, int use_int8, int allow_int16, int threads) {
    threads = clamp_threads(threads);
    dw_ctx c;
    if (dw_setup(&c, threads, x, B, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, OH, OW, p, N, allow_int16) != 0) return -1;
    c.gq = gq, c.scale = scale, c.qmin = qmin, c.qmax = qmax, c.seed = seed;
    if (use_int8) dw_setup_bytes(&c, threads);
    const int64_t NK = N * C * kh * kw;
    int used = parallel_for(B, threads, 1, dw_range, &c);
    for (int64_t i = 0; i < NK; ++i) {
        float sum = 0.0f;
        for (int t = 0; t < used; ++t) sum += c.partials[t * NK + i];
        dw_out[i] = sum;
    }
    int64_t byte_samples = 0;
    for (int t = 0; t < used; ++t) byte_samples += c.byte_samples[t];
    dw_release(&c);
    return (int)byte_samples;
}
