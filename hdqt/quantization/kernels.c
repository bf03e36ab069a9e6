/* Fused CPU kernels for the quantization engine, loaded through ctypes.
 *
 * Only two hot spots live here, both memory-bound chains that torch runs as
 * several passes: stochastic rounding (scale, draw, add, floor, clamp) and the
 * Walsh-Hadamard transform of contiguous rows (log2(p) butterfly stages, done
 * while the row is in cache). Everything else stays in torch.
 *
 * The kernels are single-threaded on purpose: a second OpenMP runtime next to
 * torch's spin-waits against torch's own thread pool and slows training down.
 * The random numbers come from a counter-based generator (SplitMix64 finaliser
 * of seed + index * golden ratio), reproducible from the seed, which the caller
 * draws from its torch.Generator.
 */
#include <math.h>
#include <stdint.h>

static inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

void hdqt_sr_quantize_f32(const float *x, float *out, int64_t n, float inv_scale,
                          float qmin, float qmax, uint64_t seed) {

    for (int64_t i = 0; i < n; ++i) {
        uint64_t r = mix64(seed + (uint64_t)i * 0x9e3779b97f4a7c15ULL);
        float u = (float)(r >> 40) * (1.0f / 16777216.0f); /* 24 random bits in [0, 1) */
        float v = x[i] * inv_scale;
        v = v < qmin ? qmin : (v > qmax ? qmax : v);
        v = floorf(v + u);
        out[i] = v > qmax ? qmax : v; /* guards float rounding of v + u at the top */
    }
}

void hdqt_fwht_rows_f32(float *x, int64_t rows, int64_t p) {

    for (int64_t row = 0; row < rows; ++row) {
        float *r = x + row * p;
        for (int64_t h = 1; h < p; h <<= 1) {
            for (int64_t i = 0; i < p; i += h << 1) {
                for (int64_t j = i; j < i + h; ++j) {
                    float a = r[j], b = r[j + h];
                    r[j] = a + b;
                    r[j + h] = a - b;
                }
            }
        }
    }
}
