/* Compact storage of what a backward keeps (packing.py, mask_relu.py), one pass each:
 * float32 codes -> two 4-bit codes a byte or one byte a code, and back; ReLU's output
 * with its 1-bit mask; a gradient under that mask. The same bytes and values as the
 * torch reference in packing.py / mask_relu.py (the tests compare them bit for bit),
 * which takes 4-6 small integer kernels a tensor where these take one.
 * Part of the one translation unit that kernels.c includes; not compiled on its own.
 */

typedef struct {
    const float *x;
    float *out;
    uint8_t *bytes;
    const uint8_t *in;
    int64_t n, half;
    int is_signed;
    uint32_t negative[HDQT_MAX_THREADS];
} pack_ctx;

/* Byte i = code i + 16 * code (i + half), modulo 256, half = ceil(n / 2): the sum of
 * packing.pack_nibbles (code i in the low nibble, two's complement when negative; the
 * high nibble then also carries code i's borrow, which unpacking takes back). */
/* Locals with restrict throughout: a byte store may alias anything (char type), so
 * with the pointers read through the context the loops neither vectorise nor hoist. */
HDQT_CLONES
static void nibble_pack_range(void *arg, int64_t begin, int64_t end, int worker) {
    pack_ctx *c = (pack_ctx *)arg;
    const float *restrict lo = c->x, *restrict hi = c->x + c->half;
    uint8_t *restrict bytes = c->bytes;
    int64_t pairs = c->n - c->half, stop = end < pairs ? end : pairs;
    uint32_t negative = 0;
    for (int64_t i = begin; i < stop; ++i) {
        int32_t a = (int32_t)lo[i], b = (int32_t)hi[i];
        negative |= (uint32_t)(a | b) >> 31;
        bytes[i] = (uint8_t)(a + 16 * b);
    }
    for (int64_t i = stop > begin ? stop : begin; i < end; ++i) { /* the odd code, alone */
        int32_t a = (int32_t)lo[i];
        negative |= (uint32_t)a >> 31;
        bytes[i] = (uint8_t)a;
    }
    c->negative[worker] = negative;
}

/* Whether any code is negative, over the workers that ran. */
static int any_negative(const pack_ctx *c, int used) {
    uint32_t negative = 0;
    for (int t = 0; t < used; ++t) negative |= c->negative[t];
    return negative != 0;
}

/* codes: n float32 integers, all in [-8, 7] or all in [0, 15]; out: ceil(n/2) bytes.
 * Returns 1 if a code is negative (the "auto" sign of the nibbles), else 0. */
int hdqt_pack_nibbles_f32(const float *codes, int64_t n, uint8_t *out, int threads) {
    pack_ctx c = {.x = codes, .bytes = out, .n = n, .half = (n + 1) / 2};
    int used = parallel_for(c.half, threads, ELEMENT_GRAIN, nibble_pack_range, &c);
    return any_negative(&c, used);
}

HDQT_CLONES
static void nibble_unpack_range(void *arg, int64_t begin, int64_t end, int worker) {
    (void)worker;
    const pack_ctx *c = (const pack_ctx *)arg;
    const uint8_t *restrict in = c->in;
    float *restrict lo = c->out, *restrict hi = c->out + c->half;
    int64_t pairs = c->n - c->half, stop = end < pairs ? end : pairs;
    if (c->is_signed) {
        for (int64_t i = begin; i < stop; ++i) {
            int32_t low = (int32_t)(int8_t)(uint8_t)(in[i] << 4) >> 4; /* the low nibble, sign-extended */
            lo[i] = (float)low;
            hi[i] = (float)((int32_t)(int8_t)(uint8_t)(in[i] - low) >> 4); /* 16 * high code, / 16 */
        }
    } else {
        for (int64_t i = begin; i < stop; ++i) lo[i] = (float)(in[i] & 15), hi[i] = (float)(in[i] >> 4);
    }
    for (int64_t i = stop > begin ? stop : begin; i < end; ++i) /* the odd code */
        lo[i] = (float)(c->is_signed ? (int32_t)(int8_t)(uint8_t)(in[i] << 4) >> 4 : in[i] & 15);
}

/* The n codes hdqt_pack_nibbles_f32 stored in packed (ceil(n/2) bytes), as float32. */
void hdqt_unpack_nibbles_f32(const uint8_t *packed, int64_t n, int is_signed, float *out, int threads) {
    pack_ctx c = {.in = packed, .out = out, .n = n, .half = (n + 1) / 2, .is_signed = is_signed};
    parallel_for(c.half, threads, ELEMENT_GRAIN, nibble_unpack_range, &c);
}

HDQT_CLONES
static void byte_pack_range(void *arg, int64_t begin, int64_t end, int worker) {
    pack_ctx *c = (pack_ctx *)arg;
    const float *restrict x = c->x;
    uint8_t *restrict bytes = c->bytes;
    uint32_t negative = 0;
    for (int64_t i = begin; i < end; ++i) {
        int32_t a = (int32_t)x[i];
        negative |= (uint32_t)a >> 31;
        bytes[i] = (uint8_t)a;
    }
    c->negative[worker] = negative;
}

/* codes: n float32 integers, all in [-128, 127] or all in [0, 255]; out: n bytes (the
 * codes in int8 or uint8, as torch's conversion writes them). Returns 1 if a code is
 * negative, else 0. */
int hdqt_pack_bytes_f32(const float *codes, int64_t n, uint8_t *out, int threads) {
    pack_ctx c = {.x = codes, .bytes = out, .n = n};
    int used = parallel_for(n, threads, ELEMENT_GRAIN, byte_pack_range, &c);
    return any_negative(&c, used);
}

HDQT_CLONES
static void byte_unpack_range(void *arg, int64_t begin, int64_t end, int worker) {
    (void)worker;
    const pack_ctx *c = (const pack_ctx *)arg;
    const uint8_t *restrict in = c->in;
    float *restrict out = c->out;
    if (c->is_signed)
        for (int64_t i = begin; i < end; ++i) out[i] = (float)(int8_t)in[i];
    else
        for (int64_t i = begin; i < end; ++i) out[i] = (float)in[i];
}

/* The n bytes of hdqt_pack_bytes_f32 as float32 codes (int8 when is_signed, else uint8). */
void hdqt_unpack_bytes_f32(const uint8_t *bytes, int64_t n, int is_signed, float *out, int threads) {
    pack_ctx c = {.in = bytes, .out = out, .n = n, .is_signed = is_signed};
    parallel_for(n, threads, ELEMENT_GRAIN, byte_unpack_range, &c);
}

/* ------------------------------------------------------------- ReLU masks */

/* Masks go through a chunk of one flag byte an element, so that the elementwise loops
 * vectorise (a bit loop per byte compiled to branches: ~7 ns an element on random
 * signs), and 8 flags (0 or 1) become one byte by a multiply: bit j <- byte j of the
 * word (packing.py's _GATHER_BITS), and back by the opposite trick. */
#define MASK_CHUNK 512 /* elements: a multiple of 8 */
static const uint64_t GATHER_BITS = 0x0102040810204080ull, REPEAT_BYTE = 0x0101010101010101ull,
                      SELECT_BITS = 0x8040201008040201ull;

/* torch.relu on CPU: x < 0 gives +0, anything else (NaN and -0 included) itself. The
 * mask is the output cast to bool: nonzero (NaN included). Element 8i+j in bit j of
 * byte i, padding bits 0 (packing.pack_bits). Ranges are in chunks. */
HDQT_CLONES
static void relu_mask_range(void *arg, int64_t begin, int64_t end, int worker) {
    (void)worker;
    const pack_ctx *c = (const pack_ctx *)arg;
    const float *restrict x = c->x;
    float *restrict y = c->out;
    uint8_t *restrict bits = c->bytes;
    uint8_t flags[MASK_CHUNK] __attribute__((aligned(64)));
    for (int64_t chunk = begin; chunk < end; ++chunk) {
        int64_t first = chunk * MASK_CHUNK, count = c->n - first < MASK_CHUNK ? c->n - first : MASK_CHUNK;
        for (int64_t k = 0; k < count; ++k) {
            float v = x[first + k], r = v < 0.0f ? 0.0f : v;
            y[first + k] = r;
            flags[k] = r != 0.0f;
        }
        for (int64_t k = count; k < (count + 7) / 8 * 8; ++k) flags[k] = 0;
        for (int64_t b = 0; b < (count + 7) / 8; ++b) {
            uint64_t word;
            memcpy(&word, flags + 8 * b, 8);
            bits[first / 8 + b] = (uint8_t)((word * GATHER_BITS) >> 56);
        }
    }
}

/* y = relu(x) over n floats, and its mask in ceil(n/8) bytes of bits. */
void hdqt_relu_mask_f32(const float *x, float *y, int64_t n, uint8_t *bits, int threads) {
    pack_ctx c = {.x = x, .out = y, .bytes = bits, .n = n};
    parallel_for((n + MASK_CHUNK - 1) / MASK_CHUNK, threads, 64, relu_mask_range, &c);
}

typedef struct {
    const float *grad;
    float *out;
    const uint8_t *bits;
    int64_t n;
} mask_grad_ctx;

/* threshold_backward(grad, mask, 0): grad where the bit is set, +0 elsewhere (a select
 * on the bits of the float: NaN and -0 pass unchanged). Ranges are in chunks. */
HDQT_CLONES
static void mask_grad_range(void *arg, int64_t begin, int64_t end, int worker) {
    (void)worker;
    const mask_grad_ctx *c = (const mask_grad_ctx *)arg;
    /* the floats read and written as their bit patterns: may_alias keeps that within
     * the aliasing rules (a plain uint32_t* to float memory is not) */
    typedef uint32_t float_bits __attribute__((may_alias));
    const float_bits *restrict grad = (const float_bits *)c->grad;
    float_bits *restrict out = (float_bits *)c->out;
    const uint8_t *restrict bits = c->bits;
    uint8_t flags[MASK_CHUNK] __attribute__((aligned(64)));
    for (int64_t chunk = begin; chunk < end; ++chunk) {
        int64_t first = chunk * MASK_CHUNK, count = c->n - first < MASK_CHUNK ? c->n - first : MASK_CHUNK;
        for (int64_t b = 0; b < (count + 7) / 8; ++b) {
            uint64_t word = ((uint64_t)bits[first / 8 + b] * REPEAT_BYTE) & SELECT_BITS;
            memcpy(flags + 8 * b, &word, 8); /* byte j: bit j of the mask byte, in place */
        }
        for (int64_t k = 0; k < count; ++k) out[first + k] = grad[first + k] & -(uint32_t)(flags[k] != 0);
    }
}

/* out = grad where the mask's bit is set, else +0, over n floats. */
void hdqt_mask_grad_f32(const float *grad, const uint8_t *bits, int64_t n, float *out, int threads) {
    mask_grad_ctx c = {grad, out, bits, n};
    parallel_for((n + MASK_CHUNK - 1) / MASK_CHUNK, threads, 64, mask_grad_range, &c);
}
