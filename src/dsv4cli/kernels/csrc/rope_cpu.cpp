// RoPE on the CPU (spec §2.6): the twin of `ref.rope` for float32 / bf16 rows, bit for bit. The last 2 * half
// dims of each row turn in interleaved pairs (x[2i], x[2i + 1]) by the angle whose cos / sin the caller gives
// per position; `inverse` turns them back (the attention output, spec §2.3 step 6). The products are rounded
// one by one before the sum, as torch's separate mul and add kernels do (no fused multiply-add). Done by torch
// this is ~16 small ops per call, four or five calls per layer and token.

#include "common.h"

namespace {

// a * b rounded to float on its own: the volatile keeps the compiler from fusing it into an add.
inline float product(float a, float b) {
    volatile float p = a * b;
    return p;
}

}  // namespace

extern "C" {

// x, out [batch, seq, heads, d] (contiguous; float32 or bf16 as `bf16` says), cos / sin [seq, half] float32:
// out = x with dims d - 2 * half .. d - 1 of each row rotated by position s's angles. Returns 0, -1 bad sizes.
int dsv4_rope(const void* x, int64_t batch, int64_t seq, int64_t heads, int64_t d, const float* cos,
              const float* sin, int64_t half, int inverse, int bf16, void* out) {
    if (batch < 0 || seq < 0 || heads < 0 || half < 0 || 2 * half > d) return -1;
    const int64_t nope = d - 2 * half, esz = bf16 ? 2 : 4;
    for (int64_t b = 0; b < batch; ++b)
        for (int64_t s = 0; s < seq; ++s) {
            const float* c = cos + s * half;
            const float* sn = sin + s * half;
            for (int64_t h = 0; h < heads; ++h) {
                const int64_t row = ((b * seq + s) * heads + h) * d;
                std::memcpy(static_cast<char*>(out) + row * esz, static_cast<const char*>(x) + row * esz,
                            static_cast<size_t>(nope * esz));
                for (int64_t i = 0; i < half; ++i) {
                    const float a = value_at(x, row + nope + 2 * i, bf16);
                    const float v = value_at(x, row + nope + 2 * i + 1, bf16);
                    const float si = inverse ? -sn[i] : sn[i];
                    store_at(out, row + nope + 2 * i, product(a, c[i]) - product(v, si), bf16);
                    store_at(out, row + nope + 2 * i + 1, product(a, si) + product(v, c[i]), bf16);
                }
            }
        }
    return 0;
}

}  // extern "C"
