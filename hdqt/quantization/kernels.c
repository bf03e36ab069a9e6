/* Fused CPU kernels for the quantization engine, loaded through ctypes.
 *
 * What torch would run as several passes over memory, or cannot express:
 *   - the dynamic per-tensor quantizer (range, grid, nearest or stochastic
 *     rounding) in one call,
 *   - the Walsh-Hadamard transform of contiguous rows (all log2(p) butterfly
 *     stages while a row is in cache), returning max|result|,
 *   - im2col fused with that transform (the plain columns are never written),
 *   - the tiled product whose per-tile partial sums saturate (register-blocked),
 *     and the convolution built on it as an implicit GEMM,
 *   - the weight gradient of a convolution: columns gathered, transformed,
 *     rounded and multiplied in cache, never materialised,
 *   - the same products on 8-bit integer dot products where the operands fit
 *     in bytes, with bit-identical results (AVX512-VNNI, AVX-VNNI, AVX2 or ARM
 *     sdot, chosen at run time: csrc/int8_variant.h).
 * Everything else stays in torch.
 *
 * Threads: OpenMP, built against the libgomp.so.1 that torch has already loaded,
 * so the kernels run on torch's own thread pool (a second pool would spin-wait
 * against it); without OpenMP, pthreads created per call. The caller passes the
 * thread count (torch.get_num_threads()), and small inputs run on the calling
 * thread.
 *
 * Randomness: a counter-based generator, the MurmurHash3 32-bit finaliser over
 * the element index, keyed by the seed. One round: a second cost 40% more time
 * in rounding (a standalone C loop: 0.53 against 0.32 ns a value) and changes
 * nothing the tests measure (mean, spread, seeds). It
 * is stateless, so the result does not depend on how the elements are split
 * over threads, and it vectorises. The 64-bit seed is drawn by the caller from
 * its torch.Generator.
 *
 * Layout: one file per family in csrc/, included below as a single translation
 * unit, so that the small static helpers (the thread split, the row transform,
 * the register-blocked product) inline across families.
 *
 * Vector code: gcc builds x86-64-v4 (AVX-512 F/BW/DQ/VL), x86-64-v3 (AVX2, FMA)
 * and baseline clones of the hot loops and picks one at load time
 * (target_clones), so the cached library runs on any x86-64 machine.
 */
#include "csrc/api.h" /* the exported functions, declared once (native.py reads it too) */
#include "csrc/common.h"
#include "csrc/rounding.c"
#include "csrc/hadamard.c"
#include "csrc/im2col.c"
#include "csrc/int8_common.c"
#include "csrc/int8_pack.c"
#include "csrc/int8_x86.c"
#include "csrc/int8_arm.c"
#include "csrc/conv_weight_grad.c"
#include "csrc/matmul.c"
#include "csrc/matmul_int8.c"
#include "csrc/conv.c"
#include "csrc/conv_int8.c"
#include "csrc/binary.c"
#include "csrc/packing.c"
#include "csrc/linear.c"
