/* HadaNets' bit-packed binary product (binary_kernel.py is the Python side).
 *
 * Packing: bit b of word w of a row is 1 when element 64 w + b is not positive (so
 * sign(0) = -1, and a ReLU's output keeps its input's signs); bits past the row's end are 0 in both operands, so they never
 * differ and add nothing to a popcount.
 *
 * Product: for rows a_i, b_j and each group g of the reduction,
 *     y_ij = sum_g beta_a[i,g] * beta_b[j,g] * (K_g - 2 * popcount(a_i XOR b_j over g)),
 * K_g the group's length: the dot product of the two sign vectors, exactly, times
 * the two betas (one float rounding of their product, one of each term).
 *
 * One group per row (group 0) is the fast case, in four variants chosen at run
 * time (hdqt_binary_variant): 3 AVX-512 F + VPOPCNTDQ (8 words a register, a
 * masked load for the tail), 2 AVX2 (popcount of each byte by a nibble table,
 * vpshufb, summed with vpsadbw), 4 NEON (vcntq_u8, pairwise-accumulated), 1 portable
 * C (__builtin_popcountll). Each computes a 4 x 4 block of outputs, the rows of b
 * in chunks that stay in L1. Groups (a power of two) spend their time in a float
 * multiply-add per group and pair: on AVX-512 they run 16 pairs a register and on
 * AVX2 8 (hdqt_binary_matmul_groups_f32, b's words transposed), elsewhere a portable
 * loop per pair. Threads split the rows of a.
 */

#define BIN_R 4        /* rows of a and of b in one register block */
#define BIN_CHUNK 64   /* rows of b per cache chunk */

#if defined(__x86_64__) && defined(__GNUC__)
#define HDQT_BIN_X86 1
#define BIN_AVX512 __attribute__((target("avx512f,avx512vpopcntdq")))
#define BIN_AVX2 __attribute__((target("avx2,popcnt")))
#endif
#if defined(__aarch64__)
#include <arm_neon.h>
#endif

/* ------------------------------------------------------------------ packing */

int hdqt_binary_variant(int requested);
enum { BIN_AUTO = 0, BIN_PORTABLE = 1, BIN_AVX2_V = 2, BIN_AVX512_V = 3, BIN_NEON = 4 };

/* Packing reads each float once and, when `betas` is not NULL, also writes each row's
 * betas: mean |x| over each group of `group` values (0: the whole row is one group),
 * (rows, G) floats. The sums run in double (exact for any group whose magnitudes span
 * less than ~2^(29 - log2 group) of range, so the order of the adds does not matter),
 * then one division and one rounding to float: the float64 formula rounded once. */
typedef struct {
    const float *x;
    int64_t inner, k, so, si, sk, words, group, groups;
    uint64_t *bits;
    float *betas;
    int avx512; /* contiguous rows, groups a multiple of 16 (or one): bin_pack_row_avx512 */
    int avx2;   /* contiguous rows, groups a multiple of 8 (or one): bin_pack_row_avx2 */
} bin_pack_ctx;

#ifdef HDQT_BIN_X86
/* One contiguous row on AVX-512 F: 16 floats a step, their "not positive" mask is 16
 * bits of the word, their magnitudes added in double (two registers of 8); a group
 * (a multiple of 16, or the whole row) ends on a step. */
__attribute__((target("avx512f")))
static void bin_pack_row_avx512(const float *row, const bin_pack_ctx *c, uint64_t *out, float *beta) {
    const int64_t k = c->k, gs = c->group;
    const __m512 zero = _mm512_setzero_ps();
    __m512d acc0 = _mm512_setzero_pd(), acc1 = acc0;
    for (int64_t w = 0; w < c->words; ++w) {
        uint64_t word = 0;
        for (int64_t e0 = 64 * w, s = 0; s < 4 && e0 < k; ++s, e0 += 16) {
            int64_t n = k - e0 < 16 ? k - e0 : 16;
            __mmask16 m = n == 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1);
            __m512 v = _mm512_maskz_loadu_ps(m, row + e0);
            word |= (uint64_t)_mm512_mask_cmp_ps_mask(m, v, zero, _CMP_NGT_UQ) << (16 * s);
            if (!beta) continue;
            __m512 a = _mm512_abs_ps(v);
            acc0 = _mm512_add_pd(acc0, _mm512_cvtps_pd(_mm512_castps512_ps256(a)));
            acc1 = _mm512_add_pd(acc1, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1))));
            int64_t done = e0 + n;
            if (done % gs == 0 || done == k) {
                int64_t q = (done - 1) / gs;
                beta[q] = (float)(_mm512_reduce_add_pd(_mm512_add_pd(acc0, acc1)) / (double)(done - q * gs));
                acc0 = acc1 = _mm512_setzero_pd();
            }
        }
        out[w] = word;
    }
}

/* The same on AVX2: 8 floats a step, their "not positive" mask 8 bits of the word
 * (lanes past the row's end masked off: a zero-filled lane is "not positive"),
 * magnitudes added in double (two registers of 4); a group (a multiple of 8, or the
 * whole row) ends on a step. */
BIN_AVX2
static void bin_pack_row_avx2(const float *row, const bin_pack_ctx *c, uint64_t *out, float *beta) {
    const int64_t k = c->k, gs = c->group;
    const __m256 zero = _mm256_setzero_ps(), sign = _mm256_set1_ps(-0.0f);
    const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256d acc0 = _mm256_setzero_pd(), acc1 = acc0;
    for (int64_t w = 0; w < c->words; ++w) {
        uint64_t word = 0;
        for (int64_t e0 = 64 * w, s = 0; s < 8 && e0 < k; ++s, e0 += 8) {
            int64_t n = k - e0 < 8 ? k - e0 : 8;
            __m256 v = n == 8 ? _mm256_loadu_ps(row + e0)
                              : _mm256_maskload_ps(row + e0, _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), iota));
            unsigned bits = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(v, zero, _CMP_NGT_UQ));
            word |= (uint64_t)(bits & ((1u << n) - 1)) << (8 * s);
            if (!beta) continue;
            __m256 a = _mm256_andnot_ps(sign, v);
            acc0 = _mm256_add_pd(acc0, _mm256_cvtps_pd(_mm256_castps256_ps128(a)));
            acc1 = _mm256_add_pd(acc1, _mm256_cvtps_pd(_mm256_extractf128_ps(a, 1)));
            int64_t done = e0 + n;
            if (done % gs == 0 || done == k) {
                int64_t q = (done - 1) / gs;
                __m256d t = _mm256_add_pd(acc0, acc1);
                __m128d h = _mm_add_pd(_mm256_castpd256_pd128(t), _mm256_extractf128_pd(t, 1));
                double total = _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
                beta[q] = (float)(total / (double)(done - q * gs));
                acc0 = acc1 = _mm256_setzero_pd();
            }
        }
        out[w] = word;
    }
}
#endif

/* Rows whose elements are contiguous (sk == 1): one row at a time, in segments that
 * end at a word or a group boundary. */
HDQT_CLONES
static void bin_pack_rows(void *arg, int64_t begin, int64_t end, int worker) {
    (void)worker;
    const bin_pack_ctx *c = (const bin_pack_ctx *)arg;
    const int64_t gs = c->group;
    for (int64_t r = begin; r < end; ++r) {
        const float *row = c->x + (r / c->inner) * c->so + (r % c->inner) * c->si;
        uint64_t *out = c->bits + r * c->words;
        float *beta = c->betas ? c->betas + r * c->groups : NULL;
#ifdef HDQT_BIN_X86
        if (c->avx512) {
            bin_pack_row_avx512(row, c, out, beta);
            continue;
        }
        if (c->avx2) {
            bin_pack_row_avx2(row, c, out, beta);
            continue;
        }
#endif
        double acc = 0.0;
        for (int64_t w = 0; w < c->words; ++w) {
            int64_t k0 = 64 * w, n = c->k - k0 < 64 ? c->k - k0 : 64;
            uint64_t word = 0;
            for (int64_t s0 = 0; s0 < n;) {
                int64_t s1 = gs < 64 ? s0 + gs - (k0 + s0) % gs : n; /* gs is a power of two or k */
                if (s1 > n) s1 = n;
                double sum = 0.0;
#pragma omp simd reduction(| : word) reduction(+ : sum)
                for (int64_t b = s0; b < s1; ++b) {
                    float v = row[k0 + b];
                    word |= (uint64_t)!(v > 0.0f) << b;
                    sum += (double)fabsf(v);
                }
                acc += sum;
                int64_t done = k0 + s1;
                if (beta && (done % gs == 0 || done == c->k)) {
                    int64_t q = (done - 1) / gs;
                    beta[q] = (float)(acc / (double)(done - q * gs));
                    acc = 0.0;
                }
                s0 = s1;
            }
            out[w] = word;
        }
    }
}

#define BIN_PACK_BLOCK 256 /* rows packed together along a strided reduction */

/* Rows read across (sk != 1, an im2col matrix (B, K, L) read as rows (B, L, K)):
 * a block of rows advances together, reading each element's column in order. */
HDQT_CLONES
static void bin_pack_columns(void *arg, int64_t begin, int64_t end, int worker) {
    (void)worker;
    const bin_pack_ctx *c = (const bin_pack_ctx *)arg;
    const int64_t gs = c->group;
    int64_t blocks = (c->inner + BIN_PACK_BLOCK - 1) / BIN_PACK_BLOCK;
    uint64_t word[BIN_PACK_BLOCK];
    double acc[BIN_PACK_BLOCK];
    for (int64_t item = begin; item < end; ++item) {
        int64_t o = item / blocks, i0 = (item % blocks) * BIN_PACK_BLOCK;
        int64_t n = c->inner - i0 < BIN_PACK_BLOCK ? c->inner - i0 : BIN_PACK_BLOCK;
        int64_t row0 = o * c->inner + i0;
        memset(acc, 0, sizeof(acc));
        for (int64_t w = 0; w < c->words; ++w) {
            memset(word, 0, sizeof(word));
            int64_t k0 = 64 * w, kn = c->k - k0 < 64 ? c->k - k0 : 64;
            for (int64_t b = 0; b < kn; ++b) {
                const float *col = c->x + o * c->so + (k0 + b) * c->sk + i0 * c->si;
                if (c->si == 1) {
#pragma omp simd
                    for (int64_t i = 0; i < n; ++i) {
                        word[i] |= (uint64_t)!(col[i] > 0.0f) << b;
                        acc[i] += (double)fabsf(col[i]);
                    }
                } else {
                    for (int64_t i = 0; i < n; ++i) {
                        word[i] |= (uint64_t)!(col[i * c->si] > 0.0f) << b;
                        acc[i] += (double)fabsf(col[i * c->si]);
                    }
                }
                int64_t done = k0 + b + 1;
                if (c->betas && (done % gs == 0 || done == c->k)) {
                    int64_t q = (done - 1) / gs;
                    double len = (double)(done - q * gs);
                    for (int64_t i = 0; i < n; ++i) {
                        c->betas[(row0 + i) * c->groups + q] = (float)(acc[i] / len);
                        acc[i] = 0.0;
                    }
                }
            }
            for (int64_t i = 0; i < n; ++i) c->bits[(row0 + i) * c->words + w] = word[i];
        }
    }
}

/* Signs of the (outer x inner) rows of k floats (strides so, si, sk) packed into
 * `bits` (rows, words); with `betas` not NULL, also each row's betas (rows, G) for
 * groups of `group` (0 or >= k: one per row). `variant` as hdqt_binary_variant: the
 * avx512 and avx2 variants pack contiguous rows with AVX-512 F or AVX2 (the same bits
 * and betas). */
void hdqt_binary_pack_betas_f32(const float *x, int64_t outer, int64_t inner, int64_t k, int64_t so, int64_t si,
                                int64_t sk, int64_t group, uint64_t *bits, int64_t words, float *betas,
                                int variant, int threads) {
    int64_t gs = group > 0 && group < k ? group : k;
    int resolved = hdqt_binary_variant(variant);
    int avx512 = resolved == BIN_AVX512_V && sk == 1 && (gs == k || gs % 16 == 0);
    int avx2 = resolved == BIN_AVX2_V && sk == 1 && (gs == k || gs % 8 == 0);
    bin_pack_ctx c = {x, inner, k, so, si, sk, words, gs, (k + gs - 1) / gs, bits, betas, avx512, avx2};
    if (outer * inner <= 0 || k <= 0) return;
    if (sk == 1) {
        parallel_for(outer * inner, threads, 64, bin_pack_rows, &c);
    } else {
        int64_t blocks = (inner + BIN_PACK_BLOCK - 1) / BIN_PACK_BLOCK;
        parallel_for(outer * blocks, threads, 1, bin_pack_columns, &c);
    }
}

void hdqt_binary_pack_f32(const float *x, int64_t outer, int64_t inner, int64_t k, int64_t so, int64_t si,
                          int64_t sk, uint64_t *bits, int64_t words, int threads) {
    hdqt_binary_pack_betas_f32(x, outer, inner, k, so, si, sk, 0, bits, words, NULL, 0, threads);
}

/* A convolution's im2col rows packed straight from its input x (B, C, H, W), without
 * the column matrix: row (b, oh, ow) holds x[b, c, oh*sh - ph + i*dh, ow*sw - pw + j*dw]
 * for c, i, j in the weight's order (0 outside x: the zero padding). A block of up to
 * BIN_PACK_BLOCK positions along ow advances together, as bin_pack_columns. */
typedef struct {
    const float *x;
    int64_t C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, OH, OW, k, words, group, groups;
    uint64_t *bits;
    float *betas;
} bin_conv_ctx;

HDQT_CLONES
static void bin_pack_conv(void *arg, int64_t begin, int64_t end, int worker) {
    (void)worker;
    const bin_conv_ctx *c = (const bin_conv_ctx *)arg;
    const int64_t gs = c->group, taps = c->kh * c->kw;
    /* a block: `rows` output rows (oh) of `wn` positions; narrow maps take several rows so
     * that each tap's index arithmetic is shared by up to BIN_PACK_BLOCK positions */
    const int64_t rows = c->OW <= BIN_PACK_BLOCK ? BIN_PACK_BLOCK / c->OW : 1;
    const int64_t wblocks = (c->OW + BIN_PACK_BLOCK - 1) / BIN_PACK_BLOCK, hblocks = (c->OH + rows - 1) / rows;
    uint64_t word[BIN_PACK_BLOCK];
    double acc[BIN_PACK_BLOCK];
    for (int64_t item = begin; item < end; ++item) {
        int64_t b = item / (hblocks * wblocks), rest = item % (hblocks * wblocks);
        int64_t oh0 = (rest / wblocks) * rows, ow0 = (rest % wblocks) * BIN_PACK_BLOCK;
        int64_t nr = c->OH - oh0 < rows ? c->OH - oh0 : rows;
        int64_t wn = c->OW - ow0 < BIN_PACK_BLOCK ? c->OW - ow0 : BIN_PACK_BLOCK;
        memset(acc, 0, sizeof(acc));
        for (int64_t w = 0; w < c->words; ++w) {
            memset(word, 0, sizeof(word));
            int64_t k0 = 64 * w, kn = c->k - k0 < 64 ? c->k - k0 : 64;
            for (int64_t e = 0; e < kn; ++e) {
                int64_t kk = k0 + e, ch = kk / taps, i = (kk % taps) / c->kw, j = kk % c->kw;
                int64_t base = ow0 * c->sw + j * c->dw - c->pw; /* position o reads iw = base + o * sw */
                int64_t lo = base >= 0 ? 0 : (-base + c->sw - 1) / c->sw;
                int64_t hi = c->W - 1 - base < 0 ? 0 : (c->W - 1 - base) / c->sw + 1;
                if (hi > wn) hi = wn;
                if (lo > wn) lo = wn;
                if (hi < lo) hi = lo;
                uint64_t bit = (uint64_t)1 << e;
                for (int64_t r = 0; r < nr; ++r) {
                    int64_t ih = (oh0 + r) * c->sh - c->ph + i * c->dh;
                    uint64_t *wr = word + r * wn;
                    double *ar = acc + r * wn;
                    if (ih < 0 || ih >= c->H) { /* a padding row: every value 0, sign bit set */
                        for (int64_t o = 0; o < wn; ++o) wr[o] |= bit;
                        continue;
                    }
                    for (int64_t o = 0; o < lo; ++o) wr[o] |= bit;
                    for (int64_t o = hi; o < wn; ++o) wr[o] |= bit;
                    const float *src = c->x + ((b * c->C + ch) * c->H + ih) * c->W + base;
                    if (c->sw == 1) {
#pragma omp simd
                        for (int64_t o = lo; o < hi; ++o) {
                            wr[o] |= (uint64_t)!(src[o] > 0.0f) << e;
                            ar[o] += (double)fabsf(src[o]);
                        }
                    } else {
                        for (int64_t o = lo; o < hi; ++o) {
                            float v = src[o * c->sw];
                            wr[o] |= (uint64_t)!(v > 0.0f) << e;
                            ar[o] += (double)fabsf(v);
                        }
                    }
                }
                int64_t done = kk + 1;
                if (c->betas && (done % gs == 0 || done == c->k)) {
                    int64_t q = (done - 1) / gs;
                    double len = (double)(done - q * gs);
                    for (int64_t r = 0; r < nr; ++r)
                        for (int64_t o = 0; o < wn; ++o) {
                            c->betas[((b * c->OH + oh0 + r) * c->OW + ow0 + o) * c->groups + q] =
                                (float)(acc[r * wn + o] / len);
                            acc[r * wn + o] = 0.0;
                        }
                }
            }
            for (int64_t r = 0; r < nr; ++r)
                for (int64_t o = 0; o < wn; ++o)
                    c->bits[((b * c->OH + oh0 + r) * c->OW + ow0 + o) * c->words + w] = word[r * wn + o];
        }
    }
}

/* x (B, C, H, W) contiguous; bits (B * OH * OW, words), betas (B * OH * OW, G) as
 * hdqt_binary_pack_betas_f32 on the im2col rows (K = C * kh * kw). */
void hdqt_binary_pack_conv_f32(const float *x, int64_t B, int64_t C, int64_t H, int64_t W, int64_t kh, int64_t kw,
                               int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw, int64_t OH,
                               int64_t OW, int64_t group, uint64_t *bits, int64_t words, float *betas, int threads) {
    int64_t k = C * kh * kw, gs = group > 0 && group < k ? group : k;
    bin_conv_ctx c = {x, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, OH, OW, k, words, gs, (k + gs - 1) / gs, bits, betas};
    if (B * OH * OW <= 0 || k <= 0) return;
    int64_t rows = OW <= BIN_PACK_BLOCK ? BIN_PACK_BLOCK / OW : 1;
    int64_t items = B * ((OH + rows - 1) / rows) * ((OW + BIN_PACK_BLOCK - 1) / BIN_PACK_BLOCK);
    parallel_for(items, threads, 1, bin_pack_conv, &c);
}

/* ------------------------------------------- popcounts of a 4 x 4 row block */

/* pc[r][c] = popcount(a[r] XOR b[c]) over `words` words. */
typedef void (*bin_block_fn)(const uint64_t *const *a, const uint64_t *const *b, int64_t words,
                             uint64_t pc[BIN_R][BIN_R]);

HDQT_CLONES
static void bin_block_portable(const uint64_t *const *a, const uint64_t *const *b, int64_t words,
                               uint64_t pc[BIN_R][BIN_R]) {
    uint64_t acc[BIN_R][BIN_R] = {{0}};
    for (int64_t w = 0; w < words; ++w)
        for (int r = 0; r < BIN_R; ++r)
            for (int c = 0; c < BIN_R; ++c) acc[r][c] += (uint64_t)__builtin_popcountll(a[r][w] ^ b[c][w]);
    memcpy(pc, acc, sizeof(acc));
}

#ifdef HDQT_BIN_X86
/* Sixteen named accumulators: as an array, GCC kept them in memory (a load and a
 * store around every add), which ran 5x slower. */
#define BIN_ACC4(r) __m512i s##r##0 = z, s##r##1 = z, s##r##2 = z, s##r##3 = z
#define BIN_STEP4(r, av)                                                         \
    s##r##0 = _mm512_add_epi64(s##r##0, _mm512_popcnt_epi64(_mm512_xor_si512(av, b0))); \
    s##r##1 = _mm512_add_epi64(s##r##1, _mm512_popcnt_epi64(_mm512_xor_si512(av, b1))); \
    s##r##2 = _mm512_add_epi64(s##r##2, _mm512_popcnt_epi64(_mm512_xor_si512(av, b2))); \
    s##r##3 = _mm512_add_epi64(s##r##3, _mm512_popcnt_epi64(_mm512_xor_si512(av, b3)))
#define BIN_OUT4(r)                                  \
    pc[r][0] = (uint64_t)_mm512_reduce_add_epi64(s##r##0); \
    pc[r][1] = (uint64_t)_mm512_reduce_add_epi64(s##r##1); \
    pc[r][2] = (uint64_t)_mm512_reduce_add_epi64(s##r##2); \
    pc[r][3] = (uint64_t)_mm512_reduce_add_epi64(s##r##3)

BIN_AVX512
static void bin_block_avx512(const uint64_t *const *a, const uint64_t *const *b, int64_t words,
                             uint64_t pc[BIN_R][BIN_R]) {
    const __m512i z = _mm512_setzero_si512();
    BIN_ACC4(0);
    BIN_ACC4(1);
    BIN_ACC4(2);
    BIN_ACC4(3);
    const uint64_t *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3];
    const uint64_t *q0 = b[0], *q1 = b[1], *q2 = b[2], *q3 = b[3];
    for (int64_t w = 0; w < words; w += 8) {
        __mmask8 m = words - w >= 8 ? (__mmask8)0xFF : (__mmask8)((1u << (words - w)) - 1);
        __m512i b0 = _mm512_maskz_loadu_epi64(m, q0 + w), b1 = _mm512_maskz_loadu_epi64(m, q1 + w);
        __m512i b2 = _mm512_maskz_loadu_epi64(m, q2 + w), b3 = _mm512_maskz_loadu_epi64(m, q3 + w);
        __m512i v0 = _mm512_maskz_loadu_epi64(m, a0 + w);
        BIN_STEP4(0, v0);
        __m512i v1 = _mm512_maskz_loadu_epi64(m, a1 + w);
        BIN_STEP4(1, v1);
        __m512i v2 = _mm512_maskz_loadu_epi64(m, a2 + w);
        BIN_STEP4(2, v2);
        __m512i v3 = _mm512_maskz_loadu_epi64(m, a3 + w);
        BIN_STEP4(3, v3);
    }
    BIN_OUT4(0);
    BIN_OUT4(1);
    BIN_OUT4(2);
    BIN_OUT4(3);
}

/* Popcount of each byte of x, by the 16-entry nibble table, summed into four 64-bit lanes. */
BIN_AVX2
static inline __m256i bin_popcnt_avx2(__m256i x, __m256i table, __m256i low) {
    __m256i lo = _mm256_and_si256(x, low), hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), low);
    __m256i bytes = _mm256_add_epi8(_mm256_shuffle_epi8(table, lo), _mm256_shuffle_epi8(table, hi));
    return _mm256_sad_epu8(bytes, _mm256_setzero_si256());
}

BIN_AVX2
static void bin_block_avx2(const uint64_t *const *a, const uint64_t *const *b, int64_t words,
                           uint64_t pc[BIN_R][BIN_R]) {
    const __m256i table = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                           0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i low = _mm256_set1_epi8(0x0f);
    int64_t vec = words / 4 * 4;
    /* two rows of a at a time: 8 accumulators, the table and mask fit in 16 registers */
    for (int r0 = 0; r0 < BIN_R; r0 += 2) {
        __m256i acc[2][BIN_R];
        for (int r = 0; r < 2; ++r)
            for (int c = 0; c < BIN_R; ++c) acc[r][c] = _mm256_setzero_si256();
        for (int64_t w = 0; w < vec; w += 4) {
            __m256i a0 = _mm256_loadu_si256((const __m256i *)(a[r0] + w));
            __m256i a1 = _mm256_loadu_si256((const __m256i *)(a[r0 + 1] + w));
            for (int c = 0; c < BIN_R; ++c) {
                __m256i bv = _mm256_loadu_si256((const __m256i *)(b[c] + w));
                acc[0][c] = _mm256_add_epi64(acc[0][c], bin_popcnt_avx2(_mm256_xor_si256(a0, bv), table, low));
                acc[1][c] = _mm256_add_epi64(acc[1][c], bin_popcnt_avx2(_mm256_xor_si256(a1, bv), table, low));
            }
        }
        for (int r = 0; r < 2; ++r)
            for (int c = 0; c < BIN_R; ++c) {
                uint64_t lanes[4];
                _mm256_storeu_si256((__m256i *)lanes, acc[r][c]);
                uint64_t s = lanes[0] + lanes[1] + lanes[2] + lanes[3];
                for (int64_t w = vec; w < words; ++w) s += (uint64_t)__builtin_popcountll(a[r0 + r][w] ^ b[c][w]);
                pc[r0 + r][c] = s;
            }
    }
}
#endif

#if defined(__aarch64__)
static void bin_block_neon(const uint64_t *const *a, const uint64_t *const *b, int64_t words,
                           uint64_t pc[BIN_R][BIN_R]) {
    int64_t vec = words / 2 * 2;
    for (int r = 0; r < BIN_R; ++r)
        for (int c = 0; c < BIN_R; ++c) pc[r][c] = 0;
    /* 16-bit lanes gain at most 16 a step: flushed to 64 bits every 2048 steps */
    for (int64_t start = 0; start < vec; start += 2 * 2048) {
        int64_t stop = start + 2 * 2048 < vec ? start + 2 * 2048 : vec;
        uint16x8_t acc[BIN_R][BIN_R];
        for (int r = 0; r < BIN_R; ++r)
            for (int c = 0; c < BIN_R; ++c) acc[r][c] = vdupq_n_u16(0);
        for (int64_t w = start; w < stop; w += 2) {
            uint8x16_t av[BIN_R];
            for (int r = 0; r < BIN_R; ++r) av[r] = vreinterpretq_u8_u64(vld1q_u64(a[r] + w));
            for (int c = 0; c < BIN_R; ++c) {
                uint8x16_t bv = vreinterpretq_u8_u64(vld1q_u64(b[c] + w));
                for (int r = 0; r < BIN_R; ++r) acc[r][c] = vpadalq_u8(acc[r][c], vcntq_u8(veorq_u8(av[r], bv)));
            }
        }
        for (int r = 0; r < BIN_R; ++r)
            for (int c = 0; c < BIN_R; ++c) pc[r][c] += vaddlvq_u16(acc[r][c]);
    }
    for (int r = 0; r < BIN_R; ++r)
        for (int c = 0; c < BIN_R; ++c)
            for (int64_t w = vec; w < words; ++w) pc[r][c] += (uint64_t)__builtin_popcountll(a[r][w] ^ b[c][w]);
}
#endif

/* ------------------------------------------------------------------ variants */

static int bin_runs(int variant) {
    switch (variant) {
    case BIN_PORTABLE:
        return 1;
#ifdef HDQT_BIN_X86
    case BIN_AVX2_V:
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
    case BIN_AVX512_V:
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vpopcntdq");
#endif
#if defined(__aarch64__)
    case BIN_NEON:
        return 1;
#endif
    default:
        return 0;
    }
}

/* The variant a request resolves to on this CPU: 0 (auto) gives the best one; a
 * variant it cannot run gives -1 (the caller says so; it is never run). */
int hdqt_binary_variant(int requested) {
    if (requested == BIN_AUTO) {
        const int order[] = {BIN_AVX512_V, BIN_NEON, BIN_AVX2_V, BIN_PORTABLE};
        for (int i = 0; i < 4; ++i)
            if (bin_runs(order[i])) return order[i];
        return BIN_PORTABLE;
    }
    return bin_runs(requested) ? requested : -1;
}

static bin_block_fn bin_block_for(int variant) {
#ifdef HDQT_BIN_X86
    if (variant == BIN_AVX512_V) return bin_block_avx512;
    if (variant == BIN_AVX2_V) return bin_block_avx2;
#endif
#if defined(__aarch64__)
    if (variant == BIN_NEON) return bin_block_neon;
#endif
    (void)variant;
    return bin_block_portable;
}

/* ------------------------------------------------------------------- products */

typedef struct {
    const uint64_t *a, *b;
    const float *a_beta, *b_beta;
    int64_t m, j, k, words, group, groups;
    float *y;
    bin_block_fn block;
} bin_product_ctx;

/* One beta per row: blocks of 4 rows of a (the range) against chunks of b's rows. */
static void bin_rows(void *arg, int64_t begin, int64_t end, int worker) {
    (void)worker;
    const bin_product_ctx *c = (const bin_product_ctx *)arg;
    uint64_t pc[BIN_R][BIN_R];
    for (int64_t j0 = 0; j0 < c->j; j0 += BIN_CHUNK) {
        int64_t j1 = j0 + BIN_CHUNK < c->j ? j0 + BIN_CHUNK : c->j;
        for (int64_t ib = begin; ib < end; ++ib) {
            int64_t i0 = ib * BIN_R;
            const uint64_t *ar[BIN_R];
            for (int r = 0; r < BIN_R; ++r) /* rows past the end repeat the last: computed, not stored */
                ar[r] = c->a + (i0 + r < c->m ? i0 + r : c->m - 1) * c->words;
            for (int64_t jb = j0; jb < j1; jb += BIN_R) {
                const uint64_t *br[BIN_R];
                for (int s = 0; s < BIN_R; ++s) br[s] = c->b + (jb + s < c->j ? jb + s : c->j - 1) * c->words;
                c->block(ar, br, c->words, pc);
                for (int r = 0; r < BIN_R && i0 + r < c->m; ++r)
                    for (int s = 0; s < BIN_R && jb + s < c->j; ++s)
                        c->y[(i0 + r) * c->j + jb + s] =
                            c->a_beta[i0 + r] * c->b_beta[jb + s] * (float)(c->k - 2 * (int64_t)pc[r][s]);
            }
        }
    }
}

/* Groups of `group` (a power of two) along the row: per pair, per group, one
 * popcount over the group's bits and one float multiply-add with the betas. */
HDQT_CLONES
static void bin_groups(void *arg, int64_t begin, int64_t end, int worker) {
    (void)worker;
    const bin_product_ctx *c = (const bin_product_ctx *)arg;
    const int64_t g = c->group, G = c->groups;
    const float last_len = (float)(c->k - g * (G - 1)), full_len = (float)g;
    for (int64_t j0 = 0; j0 < c->j; j0 += BIN_CHUNK) {
        int64_t j1 = j0 + BIN_CHUNK < c->j ? j0 + BIN_CHUNK : c->j;
        for (int64_t i = begin; i < end; ++i) {
            const uint64_t *ar = c->a + i * c->words;
            const float *ba = c->a_beta + i * G;
            for (int64_t jj = j0; jj < j1; ++jj) {
                const uint64_t *br = c->b + jj * c->words;
                const float *bb = c->b_beta + jj * G;
                float acc = 0.0f;
                if (g >= 64) {
                    int64_t per = g / 64;
                    for (int64_t q = 0; q < G; ++q) {
                        int64_t pcount = 0, w1 = (q + 1) * per < c->words ? (q + 1) * per : c->words;
                        for (int64_t w = q * per; w < w1; ++w) pcount += __builtin_popcountll(ar[w] ^ br[w]);
                        float len = q == G - 1 ? last_len : full_len;
                        acc += ba[q] * bb[q] * (len - 2.0f * (float)pcount);
                    }
                } else {
                    const int per = (int)(64 / g);
                    const uint64_t mask = (1ull << g) - 1;
                    for (int64_t q0 = 0, w = 0; q0 < G; q0 += per, ++w) {
                        uint64_t x = ar[w] ^ br[w];
                        int64_t n = G - q0 < per ? G - q0 : per;
                        for (int64_t s = 0; s < n; ++s) {
                            int pcount = __builtin_popcountll((x >> (s * g)) & mask);
                            float len = q0 + s == G - 1 ? last_len : full_len;
                            acc += ba[q0 + s] * bb[q0 + s] * (len - 2.0f * (float)pcount);
                        }
                    }
                }
                c->y[i * c->j + jj] = acc;
            }
        }
    }
}

#ifdef HDQT_BIN_X86
/* Groups on AVX-512: 16 rows of b a register (their 32-bit words transposed: bt is
 * (words32, jp), jp a multiple of 16, and their betas bbt (G, jp)), 4 rows of a
 * broadcast against them. Per group and 16 pairs: a popcount of each lane's group
 * bits, then beta_a * beta_b * (K_g - 2 * count) added in float. */
typedef struct {
    const uint32_t *a, *bt;
    const float *a_beta, *bbt;
    int64_t m, j, jp, k, words32, a_stride32, group, groups;
    float *y;
} bin_group_ctx;

/* The words and betas of block ib's BIN_R rows of a (rows past m repeat the last:
 * computed, not stored); returns its first row. */
static inline int64_t bin_group_rows(const bin_group_ctx *c, int64_t ib, const uint32_t *ar[BIN_R],
                                     const float *ba[BIN_R]) {
    const int64_t i0 = ib * BIN_R;
    for (int r = 0; r < BIN_R; ++r) {
        const int64_t row = i0 + r < c->m ? i0 + r : c->m - 1;
        ar[r] = c->a + row * c->a_stride32, ba[r] = c->a_beta + row * c->groups;
    }
    return i0;
}

BIN_AVX512
static void bin_groups_avx512(void *arg, int64_t begin, int64_t end, int worker) {
    (void)worker;
    const bin_group_ctx *c = (const bin_group_ctx *)arg;
    const int64_t g = c->group, G = c->groups;
    const __m512 full = _mm512_set1_ps((float)g), last = _mm512_set1_ps((float)(c->k - g * (G - 1)));
    const __m512 two = _mm512_set1_ps(2.0f);
    for (int64_t jv = 0; jv < c->jp; jv += 16) {
        __mmask16 keep = c->j - jv >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (c->j - jv)) - 1);
        for (int64_t ib = begin; ib < end; ++ib) {
            const uint32_t *ar[BIN_R];
            const float *ba[BIN_R];
            const int64_t i0 = bin_group_rows(c, ib, ar, ba);
            __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
#define BIN_GROUP_ADD(acc, r, count, q)                                                            \
    acc = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(ba[r][q]), bbv),                            \
                          _mm512_fnmadd_ps(two, _mm512_cvtepi32_ps(count), q == G - 1 ? last : full), acc)
            if (g <= 32) {
                const int per = (int)(32 / g);
                const __m512i mask = _mm512_set1_epi32(g == 32 ? -1 : (int)((1u << g) - 1));
                for (int64_t w = 0, q0 = 0; q0 < G; ++w, q0 += per) {
                    __m512i bv = _mm512_loadu_si512(c->bt + w * c->jp + jv);
                    __m512i x0 = _mm512_xor_si512(_mm512_set1_epi32((int)ar[0][w]), bv);
                    __m512i x1 = _mm512_xor_si512(_mm512_set1_epi32((int)ar[1][w]), bv);
                    __m512i x2 = _mm512_xor_si512(_mm512_set1_epi32((int)ar[2][w]), bv);
                    __m512i x3 = _mm512_xor_si512(_mm512_set1_epi32((int)ar[3][w]), bv);
                    int64_t n = G - q0 < per ? G - q0 : per;
                    for (int64_t s = 0; s < n; ++s) {
                        int64_t q = q0 + s;
                        unsigned shift = (unsigned)(s * g);
                        __m512 bbv = _mm512_loadu_ps(c->bbt + q * c->jp + jv);
                        BIN_GROUP_ADD(acc0, 0, _mm512_popcnt_epi32(_mm512_and_si512(_mm512_srli_epi32(x0, shift), mask)), q);
                        BIN_GROUP_ADD(acc1, 1, _mm512_popcnt_epi32(_mm512_and_si512(_mm512_srli_epi32(x1, shift), mask)), q);
                        BIN_GROUP_ADD(acc2, 2, _mm512_popcnt_epi32(_mm512_and_si512(_mm512_srli_epi32(x2, shift), mask)), q);
                        BIN_GROUP_ADD(acc3, 3, _mm512_popcnt_epi32(_mm512_and_si512(_mm512_srli_epi32(x3, shift), mask)), q);
                    }
                }
            } else {
                const int64_t per = g / 32;
                for (int64_t q = 0; q < G; ++q) {
                    __m512i p0 = _mm512_setzero_si512(), p1 = p0, p2 = p0, p3 = p0;
                    int64_t w1 = (q + 1) * per < c->words32 ? (q + 1) * per : c->words32;
                    for (int64_t w = q * per; w < w1; ++w) {
                        __m512i bv = _mm512_loadu_si512(c->bt + w * c->jp + jv);
                        p0 = _mm512_add_epi32(p0, _mm512_popcnt_epi32(_mm512_xor_si512(_mm512_set1_epi32((int)ar[0][w]), bv)));
                        p1 = _mm512_add_epi32(p1, _mm512_popcnt_epi32(_mm512_xor_si512(_mm512_set1_epi32((int)ar[1][w]), bv)));
                        p2 = _mm512_add_epi32(p2, _mm512_popcnt_epi32(_mm512_xor_si512(_mm512_set1_epi32((int)ar[2][w]), bv)));
                        p3 = _mm512_add_epi32(p3, _mm512_popcnt_epi32(_mm512_xor_si512(_mm512_set1_epi32((int)ar[3][w]), bv)));
                    }
                    __m512 bbv = _mm512_loadu_ps(c->bbt + q * c->jp + jv);
                    BIN_GROUP_ADD(acc0, 0, p0, q);
                    BIN_GROUP_ADD(acc1, 1, p1, q);
                    BIN_GROUP_ADD(acc2, 2, p2, q);
                    BIN_GROUP_ADD(acc3, 3, p3, q);
                }
            }
#undef BIN_GROUP_ADD
            __m512 accs[BIN_R] = {acc0, acc1, acc2, acc3};
            for (int r = 0; r < BIN_R && i0 + r < c->m; ++r)
                _mm512_mask_storeu_ps(c->y + (i0 + r) * c->j + jv, keep, accs[r]);
        }
    }
}

/* Popcount of each 32-bit lane of x: the nibble table's byte counts, summed in pairs
 * (vpmaddubsw) and pairs of pairs (vpmaddwd). */
BIN_AVX2
static inline __m256i bin_popcnt32_avx2(__m256i x, __m256i table, __m256i low) {
    __m256i lo = _mm256_and_si256(x, low), hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), low);
    __m256i bytes = _mm256_add_epi8(_mm256_shuffle_epi8(table, lo), _mm256_shuffle_epi8(table, hi));
    return _mm256_madd_epi16(_mm256_maddubs_epi16(bytes, _mm256_set1_epi8(1)), _mm256_set1_epi16(1));
}

/* bin_groups_avx512 on AVX2 (with FMA): 8 rows of b a register, 4 rows of a against
 * them, the same float operations in the same order. */
__attribute__((target("avx2,fma,popcnt")))
static void bin_groups_avx2(void *arg, int64_t begin, int64_t end, int worker) {
    (void)worker;
    const bin_group_ctx *c = (const bin_group_ctx *)arg;
    const int64_t g = c->group, G = c->groups;
    const __m256i table = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                           0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i low = _mm256_set1_epi8(0x0f), iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256 full = _mm256_set1_ps((float)g), last = _mm256_set1_ps((float)(c->k - g * (G - 1)));
    const __m256 two = _mm256_set1_ps(2.0f);
    for (int64_t jv = 0; jv < c->jp; jv += 8) {
        if (jv >= c->j) break;
        const __m256i keep = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(c->j - jv)), iota);
        for (int64_t ib = begin; ib < end; ++ib) {
            const uint32_t *ar[BIN_R];
            const float *ba[BIN_R];
            const int64_t i0 = bin_group_rows(c, ib, ar, ba);
            __m256 acc[BIN_R];
            for (int r = 0; r < BIN_R; ++r) acc[r] = _mm256_setzero_ps();
#define BIN_GROUP_ADD8(r, count, q)                                                                  \
    acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(ba[r][q]), bbv),                           \
                             _mm256_fnmadd_ps(two, _mm256_cvtepi32_ps(count), q == G - 1 ? last : full), acc[r])
            if (g <= 32) {
                const int per = (int)(32 / g);
                const __m256i mask = _mm256_set1_epi32(g == 32 ? -1 : (int)((1u << g) - 1));
                for (int64_t w = 0, q0 = 0; q0 < G; ++w, q0 += per) {
                    __m256i bv = _mm256_loadu_si256((const __m256i *)(c->bt + w * c->jp + jv));
                    __m256i x[BIN_R];
                    for (int r = 0; r < BIN_R; ++r) x[r] = _mm256_xor_si256(_mm256_set1_epi32((int)ar[r][w]), bv);
                    int64_t n = G - q0 < per ? G - q0 : per;
                    for (int64_t s = 0; s < n; ++s) {
                        int64_t q = q0 + s;
                        const __m128i shift = _mm_cvtsi32_si128((int)(s * g));
                        __m256 bbv = _mm256_loadu_ps(c->bbt + q * c->jp + jv);
                        for (int r = 0; r < BIN_R; ++r)
                            BIN_GROUP_ADD8(r, bin_popcnt32_avx2(_mm256_and_si256(_mm256_srl_epi32(x[r], shift), mask),
                                                                table, low), q);
                    }
                }
            } else {
                const int64_t per = g / 32;
                for (int64_t q = 0; q < G; ++q) {
                    __m256i p[BIN_R];
                    for (int r = 0; r < BIN_R; ++r) p[r] = _mm256_setzero_si256();
                    int64_t w1 = (q + 1) * per < c->words32 ? (q + 1) * per : c->words32;
                    for (int64_t w = q * per; w < w1; ++w) {
                        __m256i bv = _mm256_loadu_si256((const __m256i *)(c->bt + w * c->jp + jv));
                        for (int r = 0; r < BIN_R; ++r)
                            p[r] = _mm256_add_epi32(p[r], bin_popcnt32_avx2(
                                _mm256_xor_si256(_mm256_set1_epi32((int)ar[r][w]), bv), table, low));
                    }
                    __m256 bbv = _mm256_loadu_ps(c->bbt + q * c->jp + jv);
                    for (int r = 0; r < BIN_R; ++r) BIN_GROUP_ADD8(r, p[r], q);
                }
            }
#undef BIN_GROUP_ADD8
            for (int r = 0; r < BIN_R && i0 + r < c->m; ++r)
                _mm256_maskstore_ps(c->y + (i0 + r) * c->j + jv, keep, acc[r]);
        }
    }
}
#endif

/* The grouped product with b's words transposed (see bin_groups_avx512) on the
 * avx512 or avx2 variant (`variant` as hdqt_binary_variant); -1 where this CPU or
 * build cannot run the one asked for, or for other variants (the portable loop per
 * pair in hdqt_binary_matmul_f32 runs those). */
int hdqt_binary_matmul_groups_f32(const uint32_t *a, const float *a_beta, int64_t m, int64_t a_stride32,
                                  const uint32_t *bt, const float *bbt, int64_t j, int64_t jp, int64_t k,
                                  int64_t group, float *y, int variant, int threads) {
#ifdef HDQT_BIN_X86
    int resolved = hdqt_binary_variant(variant);
    if (resolved != BIN_AVX512_V && (resolved != BIN_AVX2_V || !__builtin_cpu_supports("fma"))) return -1;
    if (m <= 0 || j <= 0) return 0;
    bin_group_ctx c = {a, bt, a_beta, bbt, m, j, jp, k, (k + 31) / 32, a_stride32, group, (k + group - 1) / group, y};
    parallel_for((m + BIN_R - 1) / BIN_R, threads, 1, resolved == BIN_AVX512_V ? bin_groups_avx512 : bin_groups_avx2,
                 &c);
    return 0;
#else
    (void)a, (void)a_beta, (void)m, (void)a_stride32, (void)bt, (void)bbt, (void)j, (void)jp, (void)k, (void)group,
        (void)y, (void)variant, (void)threads;
    return -1;
#endif
}

int hdqt_binary_matmul_f32(const uint64_t *a, const float *a_beta, int64_t m, const uint64_t *b,
                           const float *b_beta, int64_t j, int64_t k, int64_t words, int64_t group, float *y,
                           int variant, int threads) {
    int resolved = hdqt_binary_variant(variant);
    if (resolved < 0) return -1;
    if (m <= 0 || j <= 0) return 0;
    int64_t g = group > 0 && group < k ? group : 0;
    bin_product_ctx c = {a, b, a_beta, b_beta, m, j, k, words, g, g ? (k + g - 1) / g : 1, y,
                         bin_block_for(resolved)};
    if (g == 0)
        parallel_for((m + BIN_R - 1) / BIN_R, threads, 1, bin_rows, &c);
    else
        parallel_for(m, threads, 4, bin_groups, &c);
    return 0;
}
