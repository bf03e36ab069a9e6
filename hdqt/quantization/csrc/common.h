/* Shared by every kernel file: includes, the clone attribute, the 16-float vector
 * type, the thread helper and small scalar helpers.
 * Part of the one translation unit that kernels.c includes (static helpers are
 * shared across files); not compiled on its own.
 */
#ifndef HDQT_COMMON_H
#define HDQT_COMMON_H

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
/* Elements per worker, at least, for the one-pass elementwise kernels (rounding,
 * scans, packing): about 10-20 us of work, several times what handing a range to
 * one of torch's OpenMP threads costs, and small enough that a layer's activations
 * at batch 128 (128 x 405 = 51840 values) are split over two threads. */
#define ELEMENT_GRAIN ((int64_t)1 << 14)

/* 8-bit integer dot products: the variants this build has and the one a call uses
 * (hdqt_int8_dot_available, hdqt_int8_variant). */
#include "int8_variant.h"

#ifdef HDQT_INT8_ANY
/* Whether a value is an integer in [lo, hi]; NaN is not. */
static inline int fits(float v, float lo, float hi) {
    return v >= lo && v <= hi && (float)(int32_t)v == v;
}
#endif

#ifdef HDQT_INT8
/* The same for 16 floats v (q = their truncation to int32), as a mask over lanes. */
INT8_TARGET
static inline __mmask16 fits16(__m512 v, __m512i q, float lo, float hi, __mmask16 lanes) {
    __mmask16 in = _mm512_mask_cmp_ps_mask(lanes, v, _mm512_set1_ps(lo), _CMP_GE_OQ);
    in = _mm512_mask_cmp_ps_mask(in, v, _mm512_set1_ps(hi), _CMP_LE_OQ);
    return _mm512_mask_cmp_ps_mask(in, _mm512_cvtepi32_ps(q), v, _CMP_EQ_OQ);
}
#endif

/* 16 floats: one AVX-512 register. Elementwise code on it compiles for any
 * instruction set, but where no register holds 64 bytes (AVX2, NEON) GCC keeps
 * such variables in memory: register-blocked kernels written on it ran several
 * times slower there (a -march=x86-64-v3 build: 94 ms against 9 ms for the
 * benchmark's conv forward). The tiled product, the conv dW's multiply and the
 * transform of contiguous rows have narrow variants (vfn below). The conv dW's
 * shared-width rows (build_channel_rows) do not: a narrow version ran no faster on
 * the AVX2 VM (42 ms either way for the benchmark conv's fused dW, 5274159). */
typedef float vf16 __attribute__((vector_size(64)));
#define NV 16 /* lanes of vf16 */
#define MR 8  /* rows of a register block: each vector load feeds MR multiply-adds */

/* Narrow vectors: where no register holds 16 floats, a vf16 variable lives in
 * memory. The register-blocked float kernels then run on vfn, a vector that a
 * register does hold (8 floats on AVX2, 4 on NEON), computing the same sums in
 * the same order. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(HDQT_NO_CLONES)
#define HDQT_NARROW_BYTES 32
#define NARROW_TARGET __attribute__((target("arch=x86-64-v3")))
#elif defined(__AVX2__) && !defined(__AVX512F__) /* a build for AVX2 itself */
#define HDQT_NARROW_BYTES 32
#define NARROW_TARGET
#elif defined(__aarch64__)
#define HDQT_NARROW_BYTES 16
#define NARROW_TARGET
#endif

#ifdef HDQT_NARROW_BYTES
typedef float vfn __attribute__((vector_size(HDQT_NARROW_BYTES)));
#define NL (HDQT_NARROW_BYTES / 4) /* lanes of vfn */
#define NP (NV / NL)               /* vfn pieces of a 16-lane strip */
#endif

/* Whether the register blocks should be narrow: on a CPU without AVX-512 but with
 * AVX2 and FMA, and on aarch64. HDQT_VECTORS=narrow or wide overrides (tests,
 * benchmarks); decided once per kernel call. */
static int narrow_vectors(void) {
    const char *force = getenv("HDQT_VECTORS");
#ifdef HDQT_NARROW_BYTES
    int wide = force != NULL && strcmp(force, "wide") == 0, narrow = force != NULL && strcmp(force, "narrow") == 0;
#if defined(__x86_64__) && !defined(HDQT_NO_CLONES)
    __builtin_cpu_init();
    /* the narrow variants are compiled for AVX2 + FMA: never forced onto a CPU without them */
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (!avx2 || wide) return 0;
    return narrow || !__builtin_cpu_supports("avx512f");
#else
    return !wide; /* built for AVX2 or aarch64: narrow registers */
#endif
#else
    (void)force;
    return 0;
#endif
}

/* What this build runs on this CPU, as bits (native.kernel_variant() spells them
 * out): 1 the x86-64-v4 clones (AVX-512), 2 the x86-64-v3 clones (AVX2 + FMA),
 * 8 narrow register blocks, 16 OpenMP threads, 32 an aarch64 build; the int8 dot
 * products that a product uses now (HDQT_INT8 applied; at most one): 4 AVX512-VNNI,
 * 64 AVX-VNNI, 128 AVX2 (vpmaddubsw), 256 ARM sdot. Neither 1 nor 2 on x86-64: the
 * baseline code. */
int hdqt_kernel_variant(void) {
    int v = 0;
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && !defined(HDQT_NO_CLONES)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512cd") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
        v |= 1;
    else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        v |= 2;
#endif
    static const int int8_bits[I8_VARIANTS] = {0, 4, 64, 128, 256};
    v |= int8_bits[i8_variant_now()];
    if (narrow_vectors()) v |= 8;
#ifdef _OPENMP
    v |= 16;
#endif
#ifdef __aarch64__
    v |= 32;
#endif
    return v;
}

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

/* ------------------------------------------------------- saturation counts */

/* The forward kernels count the tile sums that saturated (|sum| > limit) and by
 * how much (the sum of |sum| - limit over them), for the stored outputs only.
 * Each worker adds into its own slot (index: the worker argument of the range
 * function; whole cache lines, so that workers never write to a shared line),
 * per lane, as vector adds once per register block; the slots are summed once,
 * at the end of the call. Integers in doubles are exact to 2^53. */
typedef struct {
    double count[NV]; /* saturated tile sums, per lane (any split over lanes) */
    double sum[NV];   /* the sum of their |sum| (the excess: this, less the limit per count) */
} __attribute__((aligned(64))) sat_slot;

/* out[0] = the slots' count, out[1] = their excess (out may be NULL: nothing). */
static void sat_collect(const sat_slot *slots, double limit, double *out) {
    if (out == NULL) return;
    double count = 0.0, sum = 0.0;
    for (int t = 0; t < HDQT_MAX_THREADS; ++t)
        for (int i = 0; i < NV; ++i) count += slots[t].count[i], sum += slots[t].sum[i];
    out[0] = count, out[1] = sum - count * limit;
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

#endif
