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
    int narrow;       /* use tmm_block_narrow (see narrow_vectors) */
    sat_slot *sat;    /* this worker's saturation counts, or NULL: no counting */
    sat_slot *slots;  /* the call's per-worker slots (NULL: no counting); tmm_range points sat at one */
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

/* Saturation counts (with a non-NULL sat), branch-free: with 8-bit accumulators
 * nearly every register block holds some saturated sum (a 4-bit layer saturates
 * 1-5% of its tile sums, and a block holds 128), so a test that skips the
 * counting would rarely skip it. Per row of a block, before the clamp: the sums
 * with |sum| > limit (NaN is not) on the lanes that are stored (a per-row mask,
 * zero for rows past M, which repeat row m0) add 1 to cnt and |sum| to ex; the
 * limit comes off once per count in sat_collect. Written with GCC vector
 * operations, which compile to and, compare, and, subtract, and, add per row in
 * every clone (lane loops of several statements were left scalar). ex holds one
 * tile (exact while a tile's |sums| over the block's rows stay below 2^24: each
 * below 2^21) and is widened into double per tile; cnt and the widened sums go
 * into the worker's slot once per block (SAT_FLUSH). */
typedef int32_t vi16 __attribute__((vector_size(64)));
typedef double vd8 __attribute__((vector_size(64)));
typedef float vf8 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));

/* A row's counts: the lanes of `valid` where |v| > limit (limit: a vector). */
#define SAT_ROW(cnt, ex, v, limit, valid, magnitude)                                                   \
    do {                                                                                               \
        __typeof__(valid) abs_ = (__typeof__(valid))(v) & (magnitude);                                 \
        __typeof__(valid) over_ = ((__typeof__(v))abs_ > (limit)) & (valid);                           \
        (cnt) -= over_;                                                                                \
        (ex) += (__typeof__(v))(abs_ & over_);                                                         \
    } while (0)

/* The lanes that are stored, as a mask of n int32 lanes (-1 on the first `lanes`). */
static inline __attribute__((always_inline)) void sat_lanes(int32_t *mask, int n, int64_t lanes) {
    for (int i = 0; i < n; ++i) mask[i] = i < lanes ? -1 : 0;
}

/* Adds a register block's per-lane counts and sums of |sum| (as n vectors of
 * doubles, each of `width` lanes) to the worker's slot. */
#define SAT_FLUSH(sat, counts, sums, n, width)                                                         \
    do {                                                                                               \
        for (int q_ = 0; q_ < (n); ++q_) {                                                             \
            __typeof__((sums)[0]) c_, s_;                                                              \
            memcpy(&c_, (sat)->count + q_ * (width), sizeof c_);                                       \
            memcpy(&s_, (sat)->sum + q_ * (width), sizeof s_);                                         \
            c_ += (counts)[q_], s_ += (sums)[q_];                                                      \
            memcpy((sat)->count + q_ * (width), &c_, sizeof c_);                                       \
            memcpy((sat)->sum + q_ * (width), &s_, sizeof s_);                                         \
        }                                                                                              \
    } while (0)

/* Y[:, j:j+lanes] from a (K x 16) strip of B: row k of the strip starts at
 * b_strip + koff[k], or at b_strip + k * ldb without a table; mr (<= MR) rows of
 * A per register block. Inlined into the clones below with constant arguments, so
 * that the address rule and the block height are resolved at compile time. */
static inline __attribute__((always_inline)) void tmm_block(const tmm_ctx *c, const float *b_strip,
                                                           const int64_t *koff, int64_t ldb, int64_t j,
                                                           int64_t lanes, const int mr) {
    const float lim = c->limit;
    sat_slot *const sat = c->sat;
    vi16 stored; /* with sat: the lanes that are stored */
    {
        int32_t m[NV];
        sat_lanes(m, NV, lanes);
        memcpy(&stored, m, sizeof m);
    }
    const vi16 magnitude = (vi16){0} + 0x7fffffff; /* the bits of |x| */
    const vf16 limit = (vf16){0} + lim;
    for (int64_t m0 = 0; m0 < c->M; m0 += mr) {
        int64_t rows = c->M - m0 < mr ? c->M - m0 : mr;
        const float *a[MR]; /* rows past M repeat row m0: computed, not stored (no data-dependent loop) */
        for (int r = 0; r < mr; ++r) a[r] = c->A + (m0 + (r < rows ? r : 0)) * c->sm;
        vf16 total[MR];
        for (int r = 0; r < mr; ++r) total[r] = (vf16){0};
        vi16 cnt = (vi16){0}; /* with sat: the block's saturated sums and the sum of their |sum|, per lane */
        vd8 exd[2] = {(vd8){0}, (vd8){0}};
        vi16 valid[MR]; /* the stored lanes of each row (none past M) */
        for (int r = 0; r < mr; ++r) valid[r] = r < rows ? stored : (vi16){0};
        for (int64_t k0 = 0; k0 < c->K; k0 += c->tile) {
            int64_t k1 = k0 + c->tile < c->K ? k0 + c->tile : c->K;
            vf16 acc[MR];
            for (int r = 0; r < mr; ++r) acc[r] = (vf16){0};
            for (int64_t k = k0; k < k1; ++k) {
                vf16 b;
                memcpy(&b, b_strip + (koff ? koff[k] : k * ldb), sizeof b);
                for (int r = 0; r < mr; ++r) acc[r] += a[r][k * c->sk] * b;
            }
            if (sat == NULL) {
                for (int r = 0; r < mr; ++r) {
                    CLAMP16(acc[r], lim);
                    total[r] += acc[r];
                }
                continue;
            }
            vf16 ex = (vf16){0}, ex_odd = (vf16){0}; /* two chains of adds, not one of mr */
            for (int r = 0; r < mr; r += 2) {
                SAT_ROW(cnt, ex, acc[r], limit, valid[r], magnitude);
                if (r + 1 < mr) SAT_ROW(cnt, ex_odd, acc[r + 1], limit, valid[r + 1], magnitude);
            }
            ex += ex_odd;
            for (int r = 0; r < mr; ++r) {
                CLAMP16(acc[r], lim);
                total[r] += acc[r];
            }
            vf8 half[2];
            memcpy(half, &ex, sizeof half);
            exd[0] += __builtin_convertvector(half[0], vd8), exd[1] += __builtin_convertvector(half[1], vd8);
        }
        if (sat != NULL) {
            vi8 half[2];
            memcpy(half, &cnt, sizeof half);
            vd8 counts[2] = {__builtin_convertvector(half[0], vd8), __builtin_convertvector(half[1], vd8)};
            SAT_FLUSH(sat, counts, exd, 2, 8);
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
    typedef int32_t vin __attribute__((vector_size(HDQT_NARROW_BYTES)));
    const float lim = c->limit;
    sat_slot *const sat = c->sat;
    typedef double vdn __attribute__((vector_size(2 * HDQT_NARROW_BYTES)));
    vin stored[NP]; /* with sat: the lanes that are stored */
    {
        int32_t m[NV];
        sat_lanes(m, NV, lanes);
        memcpy(stored, m, sizeof m);
    }
    const vin magnitude = (vin){0} + 0x7fffffff;
    const vfn limit = (vfn){0} + lim;
    for (int64_t m0 = 0; m0 < c->M; m0 += MRN) {
        int64_t rows = c->M - m0 < MRN ? c->M - m0 : MRN;
        const float *a[MRN]; /* rows past M repeat row m0: computed, not stored */
        for (int r = 0; r < MRN; ++r) a[r] = c->A + (m0 + (r < rows ? r : 0)) * c->sm;
        float total[MRN][NV];
        memset(total, 0, sizeof total);
        vin cnt[NP]; /* with sat: the block's saturated sums and the sum of their |sum|, per lane */
        vdn exd[NP];
        for (int q = 0; q < NP; ++q) cnt[q] = (vin){0}, exd[q] = (vdn){0};
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
            if (sat != NULL) {
                vfn ex[NP]; /* as in tmm_block, on the NP pieces of each row */
                for (int q = 0; q < NP; ++q) ex[q] = (vfn){0};
                for (int r = 0; r < MRN; ++r)
                    for (int q = 0; q < NP; ++q)
                        SAT_ROW(cnt[q], ex[q], acc[r][q], limit, r < rows ? stored[q] : (vin){0}, magnitude);
                for (int q = 0; q < NP; ++q) exd[q] += __builtin_convertvector(ex[q], vdn);
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
        if (sat != NULL) {
            vdn counts[NP];
            for (int q = 0; q < NP; ++q) counts[q] = __builtin_convertvector(cnt[q], vdn);
            SAT_FLUSH(sat, counts, exd, NP, NL);
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
    tmm_ctx local = *(const tmm_ctx *)arg;
    local.sat = local.slots != NULL ? &local.slots[worker] : NULL;
    const tmm_ctx *c = &local;
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
                        if (c->sat != NULL && fabsf(acc) > c->limit) c->sat->count[0] += 1.0, c->sat->sum[0] += fabsf(acc);
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

/* saturation: NULL, or 2 doubles that receive how many tile sums of valid outputs
 * saturated (|sum| > limit) and the sum of |sum| - limit over them. */
void hdqt_tiled_matmul_f32(const float *A, int64_t sm, int64_t sk, const float *B, float *Y, int64_t M, int64_t K,
                           int64_t J, int64_t tile, float limit, double *saturation, int threads) {
    sat_slot slots[HDQT_MAX_THREADS];
    if (saturation != NULL) memset(slots, 0, sizeof slots);
    tmm_ctx c = {A, B, Y, sm, sk, M, K, J, tile, limit, narrow_vectors(), NULL, saturation != NULL ? slots : NULL};
    int64_t units = (J + NV - 1) / NV;
    int64_t work_per_unit = M * K * NV;
    int64_t grain = work_per_unit > 0 ? ((int64_t)1 << 20) / work_per_unit + 1 : units;
    parallel_for(units, threads, grain, tmm_range, &c);
    sat_collect(slots, limit, saturation);
}
