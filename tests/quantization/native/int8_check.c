/* A standalone check of the int8 kernels against the float32 kernels, bit for bit,
 * for machines where Python and torch are not at hand: built together with
 * kernels.c, for example with a cross compiler and run under an emulator
 * (test_int8_variants.py does that for the aarch64 sdot variant where
 * aarch64-linux-gnu-gcc and qemu-aarch64 exist). Exits 0 when every case agrees and
 * the requested variant (HDQT_INT8) ran; prints each disagreement. */
#include <stdio.h>

#include "../../../hdqt/quantization/kernels.c"

static uint32_t state = 12345u;
static int32_t draw(int32_t lo, int32_t hi) { /* an integer in [lo, hi] */
    state = state * 1664525u + 1013904223u;
    return lo + (int32_t)((state >> 8) % (uint32_t)(hi - lo + 1));
}

static int product_case(int64_t M, int64_t K, int64_t J, int64_t tile, float limit, int32_t alo, int32_t ahi,
                        int32_t blo, int32_t bhi, int transposed) {
    float *A = malloc(M * K * 4), *B = malloc(K * J * 4), *Bt = malloc(K * J * 4);
    float *y8 = malloc(M * J * 4), *y32 = malloc(M * J * 4);
    for (int64_t i = 0; i < M * K; ++i) A[i] = (float)draw(alo, ahi);
    for (int64_t i = 0; i < K * J; ++i) B[i] = (float)draw(blo, bhi);
    for (int64_t k = 0; k < K; ++k)
        for (int64_t j = 0; j < J; ++j) Bt[j * K + k] = B[k * J + j];
    double s8[2] = {-1, -1}, s32[2] = {-1, -1};
    int status = hdqt_tiled_matmul_i8(A, K, 1, transposed ? Bt : B, transposed, y8, M, K, J, tile, limit, s8, 2);
    hdqt_tiled_matmul_f32(A, K, 1, B, y32, M, K, J, tile, limit, s32, 2);
    /* AVX2 may decline operands whose 16-bit pair sums could saturate (the x86
     * packing adds 128 to a signed B; the kernel judges by the values drawn) */
    int32_t a_top = -alo > ahi ? -alo : ahi, b_top = bhi + (blo < 0 ? 128 : 0);
    if (status == 1 && hdqt_int8_variant() == I8_AVX2 && 2 * a_top * b_top > 32767) {
        free(A), free(B), free(Bt), free(y8), free(y32);
        return 0;
    }
    int bad = status != 0 || memcmp(y8, y32, M * J * 4) != 0 || s8[0] != s32[0] || s8[1] != s32[1];
    if (bad)
        printf("product %ldx%ldx%ld tile %ld limit %g A [%d, %d] B [%d, %d]%s: status %d, saturation %g/%g vs %g/%g\n",
               (long)M, (long)K, (long)J, (long)tile, limit, alo, ahi, blo, bhi, transposed ? " (J, K)" : "", status,
               s8[0], s8[1], s32[0], s32[1]);
    free(A), free(B), free(Bt), free(y8), free(y32);
    return bad;
}

static int conv_case(int64_t Bn, int64_t C, int64_t H, int64_t W, int64_t N, int64_t k, int64_t pad, int64_t tile,
                     int32_t xlo, int32_t xhi) {
    int64_t OH = H + 2 * pad - k + 1, OW = W + 2 * pad - k + 1, K = C * k * k;
    float *x = malloc(Bn * C * H * W * 4), *wt = malloc(K * N * 4);
    float *y8 = malloc(Bn * N * OH * OW * 4), *y32 = malloc(Bn * N * OH * OW * 4);
    for (int64_t i = 0; i < Bn * C * H * W; ++i) x[i] = (float)draw(xlo, xhi);
    for (int64_t i = 0; i < K * N; ++i) wt[i] = (float)draw(-7, 7);
    double s8[2], s32[2];
    int status = hdqt_conv_tiled_i8(x, wt, y8, Bn, C, H, W, k, k, 1, 1, pad, pad, 1, 1, OH, OW, N, tile, 127.0f, s8, 2);
    hdqt_conv_tiled_f32(x, wt, y32, Bn, C, H, W, k, k, 1, 1, pad, pad, 1, 1, OH, OW, N, tile, 127.0f, s32, 2);
    int bad = status != 0 || memcmp(y8, y32, Bn * N * OH * OW * 4) != 0 || s8[0] != s32[0] || s8[1] != s32[1];
    if (bad) printf("conv C %ld HxW %ldx%ld N %ld k %ld x [%d, %d]: status %d\n", (long)C, (long)H, (long)W, (long)N,
                    (long)k, xlo, xhi, status);
    free(x), free(wt), free(y8), free(y32);
    return bad;
}

int main(void) {
    const char *want = getenv("HDQT_INT8");
    int variant = hdqt_int8_variant();
    static const char *const names[I8_VARIANTS] = {"none", "avx512vnni", "avxvnni", "avx2", "sdot"};
    printf("int8 variant: %s (HDQT_INT8=%s)\n", names[variant], want ? want : "");
    if (want != NULL && strcmp(want, names[variant]) != 0) return 2;
    const int32_t ranges[][4] = {{-7, 7, 0, 15}, {-8, 7, -7, 7}, {-128, 127, 0, 255}, {-128, 127, -128, 127}};
    const int64_t shapes[][4] = {{33, 130, 47, 32}, {8, 37, 16, 7}, {1, 5, 1, 3}, {17, 64, 100, 1}, {9, 405, 20, 32}};
    int failed = 0, cases = 0;
    for (int r = 0; r < 4; ++r)
        for (int s = 0; s < 5; ++s)
            for (int t = 0; t < 2; ++t)
                for (int l = 0; l < 2; ++l, ++cases)
                    failed += product_case(shapes[s][0], shapes[s][1], shapes[s][2], shapes[s][3], l ? 32767.0f : 127.0f,
                                           ranges[r][0], ranges[r][1], ranges[r][2], ranges[r][3], t);
    for (int r = 0; r < 4; ++r, cases += 2) {
        failed += conv_case(3, 16, 32, 32, 16, 3, 1, 32, ranges[r][2], ranges[r][3]);
        failed += conv_case(2, 3, 17, 21, 9, 5, 2, 10, ranges[r][2], ranges[r][3]);
    }
    printf("int8 check: %d of %d cases agree bit for bit\n", cases - failed, cases);
    return failed != 0;
}
