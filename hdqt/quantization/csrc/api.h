/* The functions that native.py calls through ctypes: the one declaration of each.
 *
 * kernels.c includes this file before the definitions, so the compiler rejects a
 * definition whose types differ from its line here; native.py reads the same lines
 * to declare each function's ctypes argument and result types. Keep one
 * declaration per statement, in the plain form below (types from: void, int,
 * int64_t, uint64_t, float, double, and pointers to float, double, int or bytes).
 */
#ifndef HDQT_API_H
#define HDQT_API_H

#include <stdint.h>

/* rounding.c */
void hdqt_sr_quantize_f32(const float *x, float *out, int64_t n, float scale, float qmin, float qmax,
                          uint64_t seed, int threads);
void hdqt_rtn_quantize_f32(const float *x, float *out, int64_t n, float scale, float qmin, float qmax,
                           int threads);
int hdqt_quantize_f32(const float *x, float *out, int64_t n, int stochastic, int sign_mode, double clip_ratio,
                      double signed_max, double unsigned_max, uint64_t seed, double *scale_out, int threads);

/* hadamard.c, im2col.c */
float hdqt_fwht_rows_f32(float *x, int64_t rows, int64_t row_len, int64_t p, int threads);
int hdqt_fwht_quantize_f32(const float *x, int64_t sr, int64_t sc, int64_t group, int64_t sg, float *out,
                           int64_t rows, int64_t row_len, int64_t p, int stochastic, double clip_ratio, double qmax,
                           uint64_t seed, double *scale_out, int threads);
float hdqt_im2col_fwht_f32(const float *x, float *out, int64_t B, int64_t C, int64_t H, int64_t W, int64_t kh,
                           int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw,
                           int64_t OH, int64_t OW, int64_t p, int64_t channel_major, int threads);

/* matmul.c, matmul_int8.c */
/* saturation (the forward products): NULL, or 2 doubles that receive how many tile
 * sums of the stored outputs saturated, and the sum of |sum| - limit over them. */
void hdqt_tiled_matmul_f32(const float *A, int64_t sm, int64_t sk, const float *B, float *Y, int64_t M, int64_t K,
                           int64_t J, int64_t tile, float limit, double *saturation, int threads);
int hdqt_tiled_matmul_i8(const float *A, int64_t sm, int64_t sk, const float *B, int b_transposed, float *Y,
                         int64_t M, int64_t K, int64_t J, int64_t tile, float limit, double *saturation,
                         int threads);

/* conv.c, conv_int8.c */
int hdqt_conv_tiled_f32(const float *x, const float *wt, float *y, int64_t B, int64_t C, int64_t H, int64_t W,
                        int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh,
                        int64_t dw, int64_t OH, int64_t OW, int64_t N, int64_t tile, float limit, double *saturation,
                        int threads);
int hdqt_conv_tiled_i8(const float *x, const float *wt, float *y, int64_t B, int64_t C, int64_t H, int64_t W,
                       int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw,
                       int64_t OH, int64_t OW, int64_t N, int64_t tile, float limit, double *saturation,
                       int threads);

/* conv_weight_grad.c (allow_int16: build the columns on int16 where that is exact, the
 * same values; 0: float32 builds only) */
float hdqt_conv_cols_amax_f32(const float *x, int64_t B, int64_t C, int64_t H, int64_t W, int64_t kh, int64_t kw,
                              int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw, int64_t OH,
                              int64_t OW, int64_t p, int allow_int16, int threads);
int hdqt_conv_dw_sr_f32(const float *x, const float *gq, float *dw_out, int64_t N, int64_t B, int64_t C, int64_t H,
                        int64_t W, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh,
                        int64_t dw, int64_t OH, int64_t OW, int64_t p, float scale, float qmin, float qmax,
                        uint64_t seed, int use_int8, int allow_int16, int threads);

/* binary.c: HadaNets' bit-packed signs and their product (variant: 0 auto, 1 portable,
 * 2 avx2, 3 avx512, 4 neon; hdqt_binary_variant gives what a request runs, or -1) */
void hdqt_binary_pack_betas_f32(const float *x, int64_t outer, int64_t inner, int64_t k, int64_t so, int64_t si,
                                int64_t sk, int64_t group, uint64_t *bits, int64_t words, float *betas,
                                int variant, int threads);
void hdqt_binary_pack_conv_f32(const float *x, int64_t B, int64_t C, int64_t H, int64_t W, int64_t kh, int64_t kw,
                               int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw, int64_t OH,
                               int64_t OW, int64_t group, uint64_t *bits, int64_t words, float *betas, int threads);
void hdqt_binary_pack_f32(const float *x, int64_t outer, int64_t inner, int64_t k, int64_t so, int64_t si,
                          int64_t sk, uint64_t *bits, int64_t words, int threads);
int hdqt_binary_matmul_f32(const uint64_t *a, const float *a_beta, int64_t m, const uint64_t *b,
                           const float *b_beta, int64_t j, int64_t k, int64_t words, int64_t group, float *y,
                           int variant, int threads);
int hdqt_binary_matmul_groups_f32(const uint32_t *a, const float *a_beta, int64_t m, int64_t a_stride32,
                                  const uint32_t *bt, const float *bbt, int64_t j, int64_t jp, int64_t k,
                                  int64_t group, float *y, int variant, int threads);
int hdqt_binary_variant(int requested);

/* packing.c: what a backward keeps, packed in one pass (pack_* return 1 if a code is negative) */
int hdqt_pack_nibbles_f32(const float *codes, int64_t n, uint8_t *out, int threads);
void hdqt_unpack_nibbles_f32(const uint8_t *packed, int64_t n, int is_signed, float *out, int threads);
int hdqt_pack_bytes_f32(const float *codes, int64_t n, uint8_t *out, int threads);
void hdqt_unpack_bytes_f32(const uint8_t *bytes, int64_t n, int is_signed, float *out, int threads);
void hdqt_relu_mask_f32(const float *x, float *y, int64_t n, uint8_t *bits, int threads);
void hdqt_mask_grad_f32(const float *grad, const uint8_t *bits, int64_t n, float *out, int threads);

/* linear.c: a quantized linear layer's forward and backward, one call each (fused_linear.py) */
int hdqt_linear_forward_f32(const float *x, int x_transposed, const float *w, int64_t batch, int64_t in_features,
                            int64_t out_features, int x_stochastic, int x_sign_mode, double x_clip, double x_smax,
                            double x_umax, uint64_t x_seed, int w_stochastic, int w_sign_mode, double w_clip,
                            double w_smax, double w_umax, uint64_t w_seed, int64_t tile, float limit,
                            double *saturation, int use_int8, float *y, int batch_major, uint8_t *x_packed,
                            int x_nibbles, uint8_t *w_packed, int w_nibbles, double *scales, int *negative,
                            int threads);
int hdqt_linear_backward_f32(const float *grad, int64_t gs0, int64_t gs1, int64_t batch, int64_t in_features,
                             int64_t out_features, const uint8_t *x_packed, int x_nibbles, int x_signed,
                             int x_transposed, double x_scale, const uint8_t *w_packed, int w_nibbles,
                             int w_signed, double w_scale, int64_t p_out,
                             int64_t p_batch, double extra_dx, double extra_dw, int a_stochastic, double a_clip,
                             double a_qmax, uint64_t a_seed, int b_stochastic, double b_clip, double b_qmax,
                             uint64_t b_seed, int c_stochastic, double c_clip, double c_qmax, uint64_t c_seed,
                             int d_stochastic, double d_clip, double d_qmax, uint64_t d_seed, int use_int8,
                             float *grad_x, float *grad_w, int threads);

/* common.h, int8_variant.h: what this build and CPU run */
int hdqt_int8_dot_available(void);
int hdqt_int8_variant(void);
int hdqt_int8_variants(void);
int hdqt_kernel_variant(void);

#endif
