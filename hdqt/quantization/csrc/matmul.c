/* The tiled product whose per-tile partial sums saturate (float32 operands).
 * Part of the one translation unit that kernels.c includes (static helpers are
 * shared across files); not compiled on its own.
 */
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
    int narrow; /* use tmm_block_narrow (see narrow_vectors) */
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
 * b_strip + koff[k], or at b_strip + k * ldb without a table; mr (<= MR) rows of
 * A per register block. Inlined into the clones below with constant arguments, so
 * that the address rule and the block height are resolved at compile time. */
static inline __attribute__((always_inline)) void tmm_block(const tmm_ctx *c, const float *b_strip,
                                                           const int64_t *koff, int64_t ldb, int64_t j,
                                                           int64_t lanes, const int mr) {
    const float lim = c->limit;
    for (int64_t m0 = 0; m0 < c->M; m0 += mr) {
        int64_t rows = c->M - m0 < mr ? c->M - m0 : mr;
        const float *a[MR]; /* rows past M repeat row m0: computed, not stored (no data-dependent loop) */
        for (int r = 0; r < mr; ++r) a[r] = c->A + (m0 + (r < rows ? r : 0)) * c->sm;
        vf16 total[MR];
        for (int r = 0; r < mr; ++r) total[r] = (vf16){0};
        for (int64_t k0 = 0; k0 < c->K; k0 += c->tile) {
            int64_t k1 = k0 + c->tile < c->K ? k0 + c->tile : c->K;
            vf16 acc[MR];
            for (int r = 0; r < mr; ++r) acc[r] = (vf16){0};
            for (int64_t k = k0; k < k1; ++k) {
                vf16 b;
                memcpy(&b, b_strip + (koff ? koff[k] : k * ldb), sizeof b);
                for (int r = 0; r < mr; ++r) acc[r] += a[r][k * c->sk] * b;
            }
            for (int r = 0; r < mr; ++r) {
                CLAMP16(acc[r], lim);
                total[r] += acc[r];
            }
        }
        for (int r = 0; r < rows; ++r) memcpy(c->Y + (m0 + r) * c->J + j, &total[r], (size_t)lanes * sizeof(float));
    }
}

/* tmm_block on narrow vectors (vfn, see common.h): each 16-lane strip as NP
 * pieces, 4 rows of A per block, the totals in memory. The same sums in the same
 * order as tmm_block. */
#ifdef HDQT_NARROW_BYTES
#define MRN 4 /* rows of A per block */

NARROW_TARGET
static void tmm_block_narrow(const tmm_ctx *c, const float *b_strip, const int64_t *koff, int64_t ldb, int64_t j,
                             int64_t lanes) {
    const float lim = c->limit;
    for (int64_t m0 = 0; m0 < c->M; m0 += MRN) {
        int64_t rows = c->M - m0 < MRN ? c->M - m0 : MRN;
        const float *a[MRN]; /* rows past M repeat row m0: computed, not stored */
        for (int r = 0; r < MRN; ++r) a[r] = c->A + (m0 + (r < rows ? r : 0)) * c->sm;
        float total[MRN][NV];
        memset(total, 0, sizeof total);
        for (int64_t k0 = 0; k0 < c->K; k0 += c->tile) {
            int64_t k1 = k0 + c->tile < c->K ? k0 + c->tile : c->K;
            vfn acc[MRN][NP];
            for (int r = 0; r < MRN; ++r)
                for (int q = 0; q < NP; ++q) acc[r][q] = (vfn){0};
            for (int64_t k = k0; k < k1; ++k) {
                const float *bk = b_strip + (koff ? koff[k] : k * ldb);
                vfn b[NP];
                for (int q = 0; q < NP; ++q) memcpy(&b[q], bk + q * NL, sizeof b[q]);
                for (int r = 0; r < MRN; ++r) {
                    float av = a[r][k * c->sk];
                    for (int q = 0; q < NP; ++q) acc[r][q] += av * b[q];
                }
            }
            for (int r = 0; r < MRN; ++r) {
                for (int q = 0; q < NP; ++q) {
                    float t[NL];
                    memcpy(t, &acc[r][q], sizeof t);
                    for (int i = 0; i < NL; ++i) {
                        float v = t[i] < lim ? t[i] : lim;
                        total[r][q * NL + i] += v > -lim ? v : -lim;
                    }
                }
            }
        }
        for (int r = 0; r < rows; ++r) memcpy(c->Y + (m0 + r) * c->J + j, total[r], (size_t)lanes * sizeof(float));
    }
}
#endif

HDQT_CLONES
static void tmm_vector_block(const tmm_ctx *c, const float *b_strip, int64_t ldb, int64_t j, int64_t lanes) {
#ifdef HDQT_NARROW_BYTES
    if (c->narrow) {
        tmm_block_narrow(c, b_strip, NULL, ldb, j, lanes);
        return;
    }
#endif
    tmm_block(c, b_strip, NULL, ldb, j, lanes, MR);
}

HDQT_CLONES
static void tmm_vector_block_offsets(const tmm_ctx *c, const float *b_strip, const int64_t *koff, int64_t j,
                                     int64_t lanes) {
#ifdef HDQT_NARROW_BYTES
    if (c->narrow) {
        tmm_block_narrow(c, b_strip, koff, 0, j, lanes);
        return;
    }
#endif
    tmm_block(c, b_strip, koff, 0, j, lanes, MR);
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
    tmm_ctx c = {A, B, Y, sm, sk, M, K, J, tile, limit, narrow_vectors()};
    int64_t units = (J + NV - 1) / NV;
    int64_t work_per_unit = M * K * NV;
    int64_t grain = work_per_unit > 0 ? ((int64_t)1 << 20) / work_per_unit + 1 : units;
    parallel_for(units, threads, grain, tmm_range, &c);
}
