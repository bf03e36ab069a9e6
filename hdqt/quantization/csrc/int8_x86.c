/* The 256-bit int8 variants for x86 CPUs without AVX512-VNNI: AVX-VNNI (the
 * VEX-encoded vpdpbusd of newer client CPUs) and AVX2 (vpmaddubsw + vpmaddwd).
 * Their register blocks are one template (int8_block256.h) with a different dot
 * product; the operands are packed by int8_pack.c.
 * Part of the one translation unit that kernels.c includes (static helpers are
 * shared across files); not compiled on its own. */
#ifdef HDQT_INT8_AVX2

/* acc + the 8 int32 lanes of v, as 4 int64 lanes. */
INT8_AVX2_TARGET
static inline __m256i i8b_widen(__m256i acc, __m256i v) {
    acc = _mm256_add_epi64(acc, _mm256_cvtepi32_epi64(_mm256_castsi256_si128(v)));
    return _mm256_add_epi64(acc, _mm256_cvtepi32_epi64(_mm256_extracti128_si256(v, 1)));
}

/* AVX2 has no byte dot product into int32. vpmaddubsw multiplies unsigned bytes of
 * b with signed bytes of a and adds adjacent pairs into int16 lanes WITH SIGNED
 * SATURATION; vpmaddwd by ones then adds adjacent int16 pairs into int32 exactly.
 * The result is exact only while no pair sum b0*a0 + b1*a1 leaves [-32768, 32767].
 * The layout puts A (the weights: signed, 4-bit codes |a| <= 8 in the forward) in
 * the signed slot and B in the unsigned one, B offset by -min(B) where it is signed
 * (i8_offset), so |pair| <= 2 * max|A| * max(B + offset): 2 * 8 * 15 = 240 for
 * unsigned 4-bit activations and 2 * 8 * (7 + 7) = 224 for signed ones, far from
 * 32767. Full 8-bit operands would not be safe (2 * 127 * 255 = 64770): i8_setup_a
 * checks the bound on the operands of each call and declines (status 1: the float
 * kernel runs). */
/* The product's block (I8B_PAIRS) goes further: it adds the pair sums of several
 * groups in int16 lanes before one vpmaddwd widens them, which keeps the multiplier
 * port (the bottleneck: both instructions use it) half as busy. The pair sums of
 * c->pair_groups groups stay exact in int16: i8_setup_a sets it to
 * 32767 / (2 * max|A| * max(B + offset)), and i8_offset gives AVX2 the smallest
 * offset that makes B unsigned (+7 for 4-bit codes in [-7, 7], not +128), so that a
 * tile of 32 (8 groups), or a whole reduction of hundreds, needs one widening. */
INT8_AVX2_TARGET
static inline __m256i i8_dot_avx2(__m256i acc, __m256i b, __m256i a) {
    __m256i pairs = _mm256_maddubs_epi16(b, a);
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

#define I8B_NAME i8_block_avx2
#define I8B_DW_NAME dot_rows_i8_avx2
#define I8B_TARGET INT8_AVX2_TARGET
#define I8B_DOT i8_dot_avx2
#define I8B_PAIRS _mm256_maddubs_epi16
#include "int8_block256.h"
#undef I8B_PAIRS
#undef I8B_NAME
#undef I8B_DW_NAME
#undef I8B_TARGET
#undef I8B_DOT

#ifdef HDQT_INT8_AVXVNNI
#define I8B_NAME i8_block_avxvnni
#define I8B_DW_NAME dot_rows_i8_avxvnni
#define I8B_TARGET INT8_AVXVNNI_TARGET
#define I8B_DOT _mm256_dpbusd_avx_epi32 /* 32-bit sums: no intermediate saturation */
#include "int8_block256.h"
#undef I8B_NAME
#undef I8B_DW_NAME
#undef I8B_TARGET
#undef I8B_DOT
#endif

#endif /* HDQT_INT8_AVX2 */

#ifdef HDQT_INT8_AVX2
/* The packing of int8_pack.c in AVX2 intrinsics, for the 256-bit variants: GCC
 * leaves the portable loops scalar (their float range checks and min/max), which
 * made packing most of a product's time. The same bytes, sums and checks. */

/* The first n (<= 8) lanes, as a load mask. */
INT8_AVX2_TARGET
static inline __m256i i8x_lanes(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int32_t)n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* v truncated to int32 where it is an integer in [lo, hi] (else 0), and *ok cleared
 * on the lanes where it is not (NaN is not). */
INT8_AVX2_TARGET
static inline __m256i i8x_int(__m256 v, float lo, float hi, __m256 *ok) {
    __m256 in = _mm256_and_ps(_mm256_cmp_ps(v, _mm256_set1_ps(lo), _CMP_GE_OQ),
                              _mm256_cmp_ps(v, _mm256_set1_ps(hi), _CMP_LE_OQ));
    __m256i q = _mm256_cvttps_epi32(_mm256_and_ps(v, in));
    *ok = _mm256_and_ps(*ok, _mm256_and_ps(in, _mm256_cmp_ps(_mm256_cvtepi32_ps(q), v, _CMP_EQ_OQ)));
    return q;
}

/* 8 int32 lanes, each a byte's value, as 8 bytes (signed: [-128, 127], else [0, 255]). */
INT8_AVX2_TARGET
static inline uint64_t i8x_bytes(__m256i q, int is_signed) {
    __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
    return (uint64_t)_mm_cvtsi128_si64(is_signed ? _mm_packs_epi16(w, w) : _mm_packus_epi16(w, w));
}

/* i8x_pack_a for an A whose columns are contiguous (sm == 1: the transposed view of
 * a row-major tensor, as the weight of a layer's input gradient is): 8 rows at a
 * time, each load 8 rows' values of one k, 4 of them shifted into the rows' words
 * (the transpose i8x_pack_b does for B). The same words, sums and checks as the
 * row loop; the portable loop was ~4% of the samples of FCNet's step under perf here. */
INT8_AVX2_TARGET
static void i8x_pack_a_columns(i8_ctx *c, int64_t begin, int64_t end, int worker) {
    __m256 ok = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
    __m256i top = _mm256_setzero_si256();
    const __m256i byte = _mm256_set1_epi32(0xff);
    for (int64_t m0 = begin; m0 < end; m0 += 8) {
        const int64_t rows = end - m0 < 8 ? end - m0 : 8;
        const __m256i valid = i8x_lanes(rows); /* lanes past the range load 0: neutral */
        for (int64_t t = 0; t < c->tiles; ++t) {
            int64_t k0 = t * c->tile, k1 = k0 + c->tile < c->K ? k0 + c->tile : c->K;
            __m256i sums = _mm256_setzero_si256();
            for (int64_t k = k0, g = c->tile_group[t]; k < k1; k += 4, ++g) {
                __m256i word = _mm256_setzero_si256(); /* bytes past k1 stay 0: the padding */
                for (int64_t i = 0; i < 4 && k + i < k1; ++i) {
                    __m256i q = i8x_int(_mm256_maskload_ps(c->A + m0 + (k + i) * c->sk, valid), -128.0f, 127.0f, &ok);
                    sums = _mm256_add_epi32(sums, q), top = _mm256_max_epi32(top, _mm256_abs_epi32(q));
                    word = _mm256_or_si256(word, _mm256_slli_epi32(_mm256_and_si256(q, byte), (int)(8 * i)));
                }
                int32_t words[8];
                _mm256_storeu_si256((__m256i *)words, word);
                for (int64_t r = 0; r < rows; ++r) c->a[(m0 + r) * c->groups + g] = words[r];
            }
            int32_t lanes[8];
            _mm256_storeu_si256((__m256i *)lanes, sums);
            for (int64_t r = 0; r < rows; ++r) c->start[(m0 + r) * c->tiles + t] = -c->offset * lanes[r];
        }
    }
    int32_t tops[8], a_max = 0;
    _mm256_storeu_si256((__m256i *)tops, top);
    for (int i = 0; i < 8; ++i) a_max = tops[i] > a_max ? tops[i] : a_max;
    c->bad[worker] = _mm256_movemask_ps(ok) != 0xff, c->a_max[worker] = a_max;
}

INT8_AVX2_TARGET
static void i8x_pack_a(void *arg, int64_t begin, int64_t end, int worker) {
    i8_ctx *c = (i8_ctx *)arg;
    if (c->sm == 1 && c->sk != 1) {
        i8x_pack_a_columns(c, begin, end, worker);
        return;
    }
    if (c->sk != 1) { /* A read through other strides: the portable loop */
        i8p_pack_a(arg, begin, end, worker);
        return;
    }
    __m256 ok = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
    __m256i top = _mm256_setzero_si256();
    for (int64_t m = begin; m < end; ++m) {
        int8_t *row = (int8_t *)(c->a + m * c->groups);
        memset(row, 0, (size_t)c->groups * 4);
        const float *src = c->A + m * c->sm;
        for (int64_t t = 0; t < c->tiles; ++t) {
            int64_t k0 = t * c->tile, k1 = k0 + c->tile < c->K ? k0 + c->tile : c->K;
            int8_t *dst = row + c->tile_group[t] * 4;
            __m256i sums = _mm256_setzero_si256();
            for (int64_t k = k0; k < k1; k += 8) {
                int64_t n = k1 - k < 8 ? k1 - k : 8;
                __m256i q = i8x_int(_mm256_maskload_ps(src + k, i8x_lanes(n)), -128.0f, 127.0f, &ok);
                sums = _mm256_add_epi32(sums, q), top = _mm256_max_epi32(top, _mm256_abs_epi32(q));
                uint64_t bytes = i8x_bytes(q, 1);
                if (n == 8) /* a constant size: one store, not a call through a stack copy */
                    memcpy(dst + (k - k0), &bytes, 8);
                else
                    memcpy(dst + (k - k0), &bytes, (size_t)n);
            }
            int32_t lanes[8], sum = 0;
            _mm256_storeu_si256((__m256i *)lanes, sums);
            for (int i = 0; i < 8; ++i) sum += lanes[i];
            c->start[m * c->tiles + t] = -c->offset * sum;
        }
    }
    int32_t tops[8], a_max = 0;
    _mm256_storeu_si256((__m256i *)tops, top);
    for (int i = 0; i < 8; ++i) a_max = tops[i] > a_max ? tops[i] : a_max;
    c->bad[worker] = _mm256_movemask_ps(ok) != 0xff, c->a_max[worker] = a_max;
}

INT8_AVX2_TARGET
static void i8x_scan_b(void *arg, int64_t begin, int64_t end, int worker) {
    i8_ctx *c = (i8_ctx *)arg;
    __m256 ok = _mm256_castsi256_ps(_mm256_set1_epi32(-1)), lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
    for (int64_t i = begin; i < end; i += 8) {
        __m256 v = _mm256_maskload_ps(c->B + i, i8x_lanes(end - i)); /* lanes past end: 0, neutral */
        (void)i8x_int(v, -128.0f, 255.0f, &ok);
        lo = _mm256_min_ps(lo, v), hi = _mm256_max_ps(hi, v);
    }
    float l[8], h[8], lmin = 0.0f, hmax = 0.0f;
    _mm256_storeu_ps(l, lo), _mm256_storeu_ps(h, hi);
    for (int i = 0; i < 8; ++i) lmin = l[i] < lmin ? l[i] : lmin, hmax = h[i] > hmax ? h[i] : hmax;
    c->bad[worker] = _mm256_movemask_ps(ok) != 0xff, c->lo[worker] = lmin, c->hi[worker] = hmax;
}

INT8_AVX2_TARGET
static void i8x_pack_b(void *arg, int64_t begin, int64_t end, int worker) {
    i8_ctx *c = (i8_ctx *)arg;
    const __m256i offset = _mm256_set1_epi32(c->offset), byte = _mm256_set1_epi32(0xff);
    for (int64_t s = begin; s < end; ++s) {
        int64_t j = s * NV, lanes = c->J - j < NV ? c->J - j : NV;
        uint8_t *dst = c->b + s * c->groups * 64;
        if (c->b_transposed) { /* (J, K): 8 values of a lane's row -> 2 groups' words */
            memset(dst, 0, (size_t)c->groups * 64);
            for (int64_t lane = 0; lane < lanes; ++lane) {
                const float *row = c->B + (j + lane) * c->K;
                for (int64_t t = 0; t < c->tiles; ++t) {
                    int64_t k0 = t * c->tile, k1 = k0 + c->tile < c->K ? k0 + c->tile : c->K;
                    uint8_t *g = dst + c->tile_group[t] * 64 + lane * 4;
                    for (int64_t k = k0; k < k1; k += 8) {
                        int64_t n = k1 - k < 8 ? k1 - k : 8;
                        __m256i mask = i8x_lanes(n); /* past k1: 0 bytes, against A's zero padding */
                        __m256i q = _mm256_and_si256(
                            _mm256_add_epi32(_mm256_cvttps_epi32(_mm256_maskload_ps(row + k, mask)), offset), mask);
                        uint64_t bytes = i8x_bytes(q, 0);
                        uint8_t *w = g + (k - k0) / 4 * 64;
                        memcpy(w, &bytes, 4);
                        if (n > 4) memcpy(w + 64, (uint8_t *)&bytes + 4, 4);
                    }
                }
            }
            continue;
        }
        const __m256i valid[2] = {i8x_lanes(lanes), i8x_lanes(lanes - 8)}; /* padding lanes hold 0 */
        for (int64_t t = 0; t < c->tiles; ++t) {
            int64_t k0 = t * c->tile, k1 = k0 + c->tile < c->K ? k0 + c->tile : c->K;
            for (int64_t k = k0, g = c->tile_group[t]; k < k1; k += 4, ++g) {
                __m256i word[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
                for (int64_t i = 0; i < 4 && k + i < k1; ++i) {
                    for (int h = 0; h < 2; ++h) {
                        __m256 v = _mm256_maskload_ps(c->B + (k + i) * c->J + j + 8 * h, valid[h]);
                        __m256i q = _mm256_and_si256(_mm256_add_epi32(_mm256_cvttps_epi32(v), offset), byte);
                        q = _mm256_and_si256(q, valid[h]);
                        word[h] = _mm256_or_si256(word[h], _mm256_slli_epi32(q, (int)(8 * i)));
                    }
                }
                _mm256_storeu_si256((__m256i *)(dst + g * 64), word[0]);
                _mm256_storeu_si256((__m256i *)(dst + g * 64 + 32), word[1]);
            }
        }
    }
}

/* conv_i8_band_bytes' row: n floats + offset as bytes (all validated by the scan). */
INT8_AVX2_TARGET
static void i8x_row_bytes(const float *src, int64_t n, int32_t offset, uint8_t *dst) {
    const __m256i off = _mm256_set1_epi32(offset);
    for (int64_t i = 0; i < n; i += 8) {
        int64_t m = n - i < 8 ? n - i : 8;
        __m256i q = _mm256_add_epi32(_mm256_cvttps_epi32(_mm256_maskload_ps(src + i, i8x_lanes(m))), off);
        uint64_t bytes = i8x_bytes(q, 0);
        memcpy(dst + i, &bytes, (size_t)m);
    }
}

/* i8p_gradient_bytes in AVX2: a gradient row + 128 as unsigned bytes (padding 0). */
INT8_AVX2_TARGET
static int i8x_gradient_bytes(const float *g, int64_t n, uint8_t *dst, int64_t padded) {
    __m256 ok = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
    for (int64_t i = 0; i < n; i += 8) {
        int64_t m = n - i < 8 ? n - i : 8;
        __m256i q = i8x_int(_mm256_maskload_ps(g + i, i8x_lanes(m)), -128.0f, 127.0f, &ok);
        uint64_t bytes = i8x_bytes(_mm256_add_epi32(q, _mm256_set1_epi32(128)), 0);
        memcpy(dst + i, &bytes, (size_t)m);
    }
    memset(dst + n, 0, (size_t)(padded - n));
    return _mm256_movemask_ps(ok) != 0xff;
}
#endif /* HDQT_INT8_AVX2 */
