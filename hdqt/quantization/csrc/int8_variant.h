/* Which 8-bit integer dot-product kernels this build has, which of them this CPU
 * runs, and which one a call uses. Included by common.h; not compiled on its own.
 *
 * The variants, in order of preference (each bit-identical to the float32 kernels):
 *   1 avx512vnni  vpdpbusd on 512-bit registers (x86-64, AVX512-VNNI)
 *   2 avxvnni     the VEX-encoded vpdpbusd on 256-bit registers (AVX-VNNI: newer
 *                 client CPUs without AVX-512)
 *   3 avx2        vpmaddubsw + vpmaddwd on 256-bit registers (any AVX2 CPU); exact
 *                 only while its 16-bit pair sums cannot saturate, checked per call
 *   4 sdot        the ARMv8.2 dot product (signed bytes, 128-bit registers)
 * HDQT_INT8 chooses: "0" none, a variant's name that one (where this CPU runs it;
 * otherwise the preferred one, and native.py says why), anything else the
 * preferred one. Read at each call, like HDQT_VECTORS. */
#ifndef HDQT_INT8_VARIANT_H
#define HDQT_INT8_VARIANT_H

#include <strings.h>

#define I8_NONE 0
#define I8_AVX512VNNI 1
#define I8_AVXVNNI 2
#define I8_AVX2 3
#define I8_SDOT 4
#define I8_VARIANTS 5

#if defined(__x86_64__) && defined(__GNUC__) && !defined(HDQT_NO_INT8)
#include <cpuid.h>
#include <immintrin.h>
#define HDQT_INT8 1 /* the AVX512-VNNI kernels (matmul_int8.c, conv_int8.c) */
#define INT8_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
#define HDQT_INT8_AVX2 1 /* the 256-bit kernels (int8_x86.c) */
#define INT8_AVX2_TARGET __attribute__((target("avx2,fma")))
/* the VEX vpdpbusd intrinsic (_mm256_dpbusd_avx_epi32) came with GCC 11 and Clang 12 */
#if (defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11)
#define HDQT_INT8_AVXVNNI 1
#define INT8_AVXVNNI_TARGET __attribute__((target("avx2,fma,avxvnni")))
#endif
/* the portable packing (int8_pack.c) runs only for the 256-bit variants: AVX2 code */
#define INT8_PACK_TARGET INT8_AVX2_TARGET
#endif

#if defined(__aarch64__) && defined(__GNUC__) && !defined(HDQT_NO_INT8) && (defined(__linux__) || defined(__APPLE__))
#include <arm_neon.h>
#define HDQT_INT8_SDOT 1 /* int8_arm.c */
#ifdef __clang__
#define INT8_SDOT_TARGET __attribute__((target("dotprod")))
#else
#define INT8_SDOT_TARGET __attribute__((target("arch=armv8.2-a+dotprod")))
#endif
#define INT8_PACK_TARGET
#ifdef __linux__
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20) /* the kernel's bit for the dot product instructions */
#endif
#endif
#endif

#if defined(HDQT_INT8) || defined(HDQT_INT8_SDOT)
#define HDQT_INT8_ANY 1
#endif

/* Whether this build has variant v and this CPU runs it. */
static int i8_supported(int v) {
#ifdef HDQT_INT8
    __builtin_cpu_init();
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (v == I8_AVX512VNNI)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
    if (v == I8_AVX2) return avx2;
#ifdef HDQT_INT8_AVXVNNI
    if (v == I8_AVXVNNI) {
        unsigned a = 0, b = 0, c = 0, d = 0; /* CPUID leaf 7, sub-leaf 1: EAX bit 4 is AVX-VNNI */
        return avx2 && __get_cpuid_count(7, 1, &a, &b, &c, &d) && (a >> 4 & 1u);
    }
#endif
#endif
#ifdef HDQT_INT8_SDOT
    if (v == I8_SDOT) {
#ifdef __linux__
        return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#else
        return 1; /* macOS on arm64: every Apple M-series core has the dot product */
#endif
    }
#endif
    (void)v;
    return 0;
}

/* The variant a call uses now (HDQT_INT8, see above); I8_NONE for none. */
static int i8_variant_now(void) {
    static const char *const names[I8_VARIANTS] = {"0", "avx512vnni", "avxvnni", "avx2", "sdot"};
    const char *want = getenv("HDQT_INT8");
    if (want != NULL && strcmp(want, "0") == 0) return I8_NONE;
    for (int v = 1; want != NULL && v < I8_VARIANTS; ++v)
        if (strcasecmp(want, names[v]) == 0 && i8_supported(v)) return v;
    for (int v = 1; v < I8_VARIANTS; ++v)
        if (i8_supported(v)) return v;
    return I8_NONE;
}

/* 1 when this build and CPU run some int8 kernel (whatever HDQT_INT8 says). */
int hdqt_int8_dot_available(void) {
    for (int v = 1; v < I8_VARIANTS; ++v)
        if (i8_supported(v)) return 1;
    return 0;
}

/* The int8 variant that a product would use now (0: none), HDQT_INT8 applied. */
int hdqt_int8_variant(void) {
    return i8_variant_now();
}

/* The variants this build and CPU run, as bits 1 << variant. */
int hdqt_int8_variants(void) {
    int bits = 0;
    for (int v = 1; v < I8_VARIANTS; ++v) bits |= i8_supported(v) << v;
    return bits;
}

#endif
