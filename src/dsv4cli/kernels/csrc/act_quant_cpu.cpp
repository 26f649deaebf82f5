// The activation fake-quants of the attention caches, bit for bit, on float32 or bf16 rows:
//   dsv4_kv_fp8_quant   = ref.kv_fp8_quant: FP8 e4m3 (block 64, power-of-two scales) on the non-RoPE
//                         dims of each KV row, the RoPE dims copied (spec §2.4);
//   dsv4_fake_quant_fp4 = formats.fake_quant_fp4(x, 32): e2m1 (block 32), as on the indexer's queries
//                         and keys after their Hadamard rotation (spec §2.5).
// Each is a handful of flops per value; done by torch it is some 20-50 small ops per call, once per
// layer and token in decode.

#include "common.h"

namespace {

// formats.pow2_scale(amax, 6, floor=6 * 2^-126): 2^ceil(log2(max(amax, floor) / 6)), at least 2^-127.
inline float fp4_block_scale(float amax) {
    const float floor = 6.0f * 0x1p-126f;
    const float a = amax < floor ? floor : amax;
    int e = 0;
    const float m = std::frexp(a / 6.0f, &e);  // a / 6 = m * 2^e, m in [0.5, 1)
    int c = e - (m == 0.5f ? 1 : 0);
    if (c < -127) c = -127;
    return std::ldexp(1.0f, c);
}

// formats.fp4_codes of one value: the nearest e2m1 magnitude (ties to the even code), bit 3 the sign.
inline int e2m1_code(float q) {
    static const float kMidpoints[7] = {0.25f, 0.75f, 1.25f, 1.75f, 2.5f, 3.5f, 5.0f};
    const float magnitude = std::min(std::fabs(q), 6.0f);
    int code = 0;
    while (code < 7 && magnitude > kMidpoints[code]) ++code;
    if (code < 7 && magnitude == kMidpoints[code] && (code & 1)) ++code;
    return code | (q < 0.0f ? 8 : 0);
}

const float kE2m1Values[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                               -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

}  // namespace

extern "C" {

// x, out [n, d] (contiguous, float32 or bf16 as `bf16` says; out may alias x): the first d - rope values of
// each row fake-quantized to FP8 in blocks of 64, the last `rope` copied. Returns 0, -1 bad sizes, -3 no memory.
int dsv4_kv_fp8_quant(const void* x, int64_t n, int64_t d, int64_t rope, int bf16, void* out) {
    if (n < 0 || d < 0 || rope < 0 || rope > d) return -1;
    try {
        std::vector<float> row(static_cast<size_t>(d));
        const int64_t nope = d - rope;
        for (int64_t i = 0; i < n; ++i) {
            for (int64_t j = 0; j < d; ++j) row[j] = value_at(x, i * d + j, bf16);
            fake_quant_row(row.data(), nope, 64, row.data());
            for (int64_t j = 0; j < d; ++j) store_at(out, i * d + j, row[j], bf16);
        }
    } catch (const std::bad_alloc&) {
        return -3;
    }
    return 0;
}

// x, out [n, d] (d a multiple of 32; float32 or bf16; out may alias x): formats.fake_quant_fp4(x, 32) per row.
int dsv4_fake_quant_fp4(const void* x, int64_t n, int64_t d, int bf16, void* out) {
    if (n < 0 || d < 0 || d % 32 != 0) return -1;
    float block[32];
    for (int64_t b0 = 0; b0 < n * d; b0 += 32) {
        float amax = 0.0f;
        for (int j = 0; j < 32; ++j) {
            block[j] = value_at(x, b0 + j, bf16);
            amax = std::max(amax, std::fabs(block[j]));
        }
        const float s = fp4_block_scale(amax);
        for (int j = 0; j < 32; ++j) store_at(out, b0 + j, kE2m1Values[e2m1_code(block[j] / s)] * s, bf16);
    }
    return 0;
}

}  // extern "C"
