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
 * the signed slot and B in the unsigned one, B offset by +128 where it is signed,
 * so |pair| <= 2 * max|A| * max(B + offset): 2 * 8 * 15 = 240 for unsigned 4-bit
 * activations and 2 * 8 * (7 + 128) = 2160 for signed ones, far from 32767. Full
 * 8-bit operands would not be safe (2 * 127 * 255 = 64770), nor would a signed B
 * at +128 times |A| > 64 (2 * 255 * 65 > 32767): i8_setup_a checks the bound on
 * the operands of each call and declines (status 1: the float kernel runs). */
INT8_AVX2_TARGET
static inline __m256i i8_dot_avx2(__m256i acc, __m256i b, __m256i a) {
    __m256i pairs = _mm256_maddubs_epi16(b, a);
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

#define I8B_NAME i8_block_avx2
#define I8B_DW_NAME dot_rows_i8_avx2
#define I8B_TARGET INT8_AVX2_TARGET
#define I8B_DOT i8_dot_avx2
#include "int8_block256.h"
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
