// Fast CPU kernels for DeepSeek-V4's dense weights, reading them as stored: FP8 (e4m3) with
// 128x128 block scales (wq_a, wq_b, wkv, wo_a, wo_b, shared experts, indexer wq_b, ...) and plain
// bf16 (compressor wkv/wgate, indexer weights_proj; bf16 checkpoints).
//
// Weight format (spec §2.11, §3.2): float8_e4m3fn [O, K], one scale per 128x128 block
// S [ceil(O/128), ceil(K/128)] (UE8M0 bytes 2^(b-127), or float32 multipliers):
//   y[n, o] = sum_i x[n, i] * e4m3(W[o, i]) * S[o / 128, i / 128].
// As for FP4, no dequantized matrix is ever written: each 64-byte run of a row is decoded in
// registers and consumed at once, so a call streams the weight bytes from memory once (decode is
// memory-bandwidth bound: 1 byte per weight).
//
// Code paths, picked at compile time (the library is built with -march=native):
//  * AVX-512 BF16 + VBMI (Zen 4, Sapphire Rapids; Cooper Lake lacks VBMI and takes the next path): every e4m3
//    value is exact in bf16, so 64 bytes become 64 bf16 words with two 128-entry byte lookups
//    (vpermi2b: the high and the low byte of the bf16 pattern of the magnitude; the index's bit 7,
//    the sign, is ignored by the instruction), one vpternlog that ORs the sign into the high byte,
//    and two byte interleaves (vpunpck{l,h}bw). Products bf16 x bf16 are exact in fp32; vdpbf16ps
//    sums them per 128-input block and one FMA applies the block scale. fp32 activations that are
//    not exactly bf16 are split into 3 bf16 parts (hi + mid + lo = the fp32 value exactly), as
//    in the FP4 kernel. NaN codes (0x7f, 0xff) decode to NaN like torch.
//  * AVX-512F / AVX2 (+F16C): (sign-extended byte << 7) & 0xbf80 is the IEEE half of e4m3 / 256
//    (subnormals included: e4m3 subnormal m * 2^-9 is the half subnormal m * 2^-17), so vcvtph2ps
//    gives exact fp32 weights; FMA in fp32, x 256 at the end. NaN codes decode to +-480 here.
//  * portable scalar fallback (a 256-entry table; NaN codes are NaN).
// Activations are prepared once per call (converted, split, permuted to the decode order and
// zero-padded to a multiple of 128), so inner loops never shuffle activations; K and O need not be
// multiples of 128 (the K tail is loaded with a byte mask, never past the row).
// Rows are processed a few at a time (a tile) and the rows `kPfTiles` tiles ahead are
// software-prefetched into L2 at the same column, as in the FP4 kernel. Batches of >= 20 tokens
// (prefill) on the bf16 path decode 4 rows once into a panel with the block scales folded in and
// run a 4 x 6 register-blocked GEMM over it (see gemm_rows; NaN codes are not kept there); with the
// AMX tile unit, from 4 tokens, 32-row panels go through TDPBF16PS instead (amx_tiles.h).
// bf16 weights take the same tiles without the decode and the block scales (fp32 paths widen the
// words with a shift); reading 2 bytes per weight instead of converting the matrix to fp32 per call.
// Grouped form (attention's wo_a): G groups, group g multiplies x[:, g, :] by weight rows
// [g*R, (g+1)*R); the plain linear is G = 1.

#include "common.h"
#include "bf16_tiles.h"
#include "amx_tiles.h"


#ifndef FP8_PF_TILES
#define FP8_PF_TILES 2  // prefetch distance in tiles (rows R * FP8_PF_TILES ahead)
#endif

namespace {

constexpr int64_t kBlk = 128;  // scale block in both dims = the decode chunk along K
constexpr int kPfTiles = FP8_PF_TILES;

inline int64_t padded8(int64_t K) { return (K + kBlk - 1) / kBlk * kBlk; }

// e4m3fn byte -> float, exact; 0x7f / 0xff are NaN (the format has no infinities).
float e4m3_value(uint8_t b) {
    const int e = (b >> 3) & 15, m = b & 7;
    float v;
    if (e == 15 && m == 7) {
        v = std::nanf("");
    } else if (e == 0) {
        v = std::ldexp(static_cast<float>(m), -9);
    } else {
        v = std::ldexp(1.0f + m / 8.0f, e - 7);
    }
    return (b & 0x80) ? -v : v;
}

struct Fp8Tables {
    alignas(64) uint8_t hi[128];  // high byte of the bf16 pattern of magnitude code m (0..127)
    alignas(64) uint8_t lo[128];  // low byte
    alignas(64) float value[256];
    Fp8Tables() {
        for (int b = 0; b < 256; ++b) value[b] = e4m3_value(static_cast<uint8_t>(b));
        for (int m = 0; m < 128; ++m) {
            const uint16_t h = bf16_bits(value[m]);  // exact (NaN for m = 127)
            hi[m] = static_cast<uint8_t>(h >> 8);
            lo[m] = static_cast<uint8_t>(h & 0xff);
        }
    }
};
const Fp8Tables kFp8;

inline void prefetch_l2(const void* p) {
#if defined(__SSE__) || defined(__x86_64__)
    _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1);
#else
    (void)p;
#endif
}

// ===================================================================================== the paths
//
// Each path defines:
//   XT                          the prepared activation element type
//   kMaxParts                   bf16 parts a prepared row may need (1 for fp32 paths)
//   prep_chunk(v, parts, Kp, dst, c, natural)  write chunk c (128 inputs) of a prepared row from
//                               128 floats (natural: input order, for bf16 weights)
//   tile<R, TB>(w, sr, K, Kp, parts, xs, y, yoff)   R rows x TB tokens over the whole K
// A prepared row holds `parts` copies of Kp elements (Kp = K rounded up to 128). `w` is the first
// row's bytes (row stride K weights), `sr[r]` the float scales of row r's 128-row block (one per
// chunk); sr == nullptr means bf16 weights.

const char* kIsa = DSV4_ISA;

#if !DSV4_PATH_BF16
using XT = float;
constexpr int kMaxParts = 1;

// The fp32 paths (AVX-512, AVX2, scalar) take the inputs in their natural order.
void prep_chunk(const float* v, int parts, int64_t Kp, XT* dst, int64_t c, bool natural) {
    (void)parts; (void)Kp; (void)natural;
    std::memcpy(dst + c * kBlk, v, kBlk * sizeof(float));
}
#endif

#if DSV4_PATH_BF16
using XT = uint16_t;
constexpr int kMaxParts = 3;

// The chunk_pos order: input i of a chunk (line l = i / 64, lane L = i % 64 / 16, k = i % 16) sits
// where the decode below puts its weight: vpunpcklbw yields inputs 16L + 0..7 as words
// 64l + 8L + 0..7, vpunpckhbw inputs 16L + 8..15 as words 64l + 32 + 8L + 0..7.

// natural: bf16 weights are read in input order, so their activations are not permuted. Each line of
// 64 inputs = 4 x 16 words y0..y3 (inputs 16L..16L+15) is stored as y0.lo y1.lo y2.lo y3.lo y0.hi
// y1.hi y2.hi y3.hi (8 words each): the chunk_pos order.
void prep_chunk(const float* v, int parts, int64_t Kp, XT* dst, int64_t c, bool natural) {
    __m512i words[3][4];
    bf16_parts128(v, parts, words);
    for (int q = 0; q < parts; ++q) {
        uint16_t* out = dst + q * Kp + c * kBlk;
        if (natural) {
            for (int i = 0; i < 4; ++i) _mm512_storeu_si512(out + 32 * i, words[q][i]);
            continue;
        }
        for (int l = 0; l < 2; ++l) {
            const __m512i a = words[q][2 * l], b = words[q][2 * l + 1];  // inputs 64l..64l+31, +32..+63
            const __m256i y0 = _mm512_castsi512_si256(a), y1 = _mm512_extracti64x4_epi64(a, 1);
            const __m256i y2 = _mm512_castsi512_si256(b), y3 = _mm512_extracti64x4_epi64(b, 1);
            auto* o = reinterpret_cast<__m256i*>(out + 64 * l);
            _mm256_storeu_si256(o, _mm256_permute2x128_si256(y0, y1, 0x20));
            _mm256_storeu_si256(o + 1, _mm256_permute2x128_si256(y2, y3, 0x20));
            _mm256_storeu_si256(o + 2, _mm256_permute2x128_si256(y0, y1, 0x31));
            _mm256_storeu_si256(o + 3, _mm256_permute2x128_si256(y2, y3, 0x31));
        }
    }
}

struct Decoder {
    __m512i hi0, hi1, lo0, lo1, sign;
    Decoder()
        : hi0(_mm512_load_si512(kFp8.hi)), hi1(_mm512_load_si512(kFp8.hi + 64)),
          lo0(_mm512_load_si512(kFp8.lo)), lo1(_mm512_load_si512(kFp8.lo + 64)),
          sign(_mm512_set1_epi8(static_cast<char>(0x80))) {}
    // 64 e4m3 bytes -> 64 bf16 words in the chunk_pos order.
    inline void operator()(__m512i b, __m512bh& v0, __m512bh& v1) const {
        __m512i h = _mm512_permutex2var_epi8(hi0, b, hi1);
        h = _mm512_ternarylogic_epi32(h, b, sign, 0xF8);  // h | (b & 0x80)
        const __m512i l = _mm512_permutex2var_epi8(lo0, b, lo1);
        v0 = (__m512bh)_mm512_unpacklo_epi8(l, h);
        v1 = (__m512bh)_mm512_unpackhi_epi8(l, h);
    }
};

inline __mmask64 byte_mask(int64_t n) { return n >= 64 ? ~0ull : (n <= 0 ? 0ull : ((1ull << n) - 1)); }
inline __mmask32 word_mask(int64_t n) {
    return n >= 32 ? ~0u : (n <= 0 ? 0u : static_cast<__mmask32>((1u << n) - 1));
}

// bf16 weights: 256 bytes (128 inputs) per row and chunk, accumulated straight into acc.
template <int R, int TB>
inline void tile_bf16(const uint8_t* w, int64_t K, int64_t Kp, int parts, const XT* const* xs, float* const* y,
                      int64_t yoff, int64_t rs) {
    __m512 acc[R][TB];
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < TB; ++t) acc[r][t] = _mm512_setzero_ps();
    const int64_t nfull = K / kBlk, nchunks = (K + kBlk - 1) / kBlk;
    for (int64_t c = 0; c < nchunks; ++c) {
        __m512bh v[R][4];
        for (int r = 0; r < R; ++r) {
            const uint16_t* row = reinterpret_cast<const uint16_t*>(w) + r * rs * K + kBlk * c;
            const uint16_t* ahead = row + static_cast<int64_t>(kPfTiles) * (rs == 1 ? R : 1) * K;
            for (int i = 0; i < 4; ++i) prefetch_l2(ahead + 32 * i);
            if (c < nfull) {
                for (int i = 0; i < 4; ++i) v[r][i] = (__m512bh)_mm512_loadu_si512(row + 32 * i);
            } else {  // K tail: masked-off words read as +0.0
                const int64_t left = K - c * kBlk;
                for (int i = 0; i < 4; ++i)
                    v[r][i] = (__m512bh)_mm512_maskz_loadu_epi16(word_mask(left - 32 * i), row + 32 * i);
            }
        }
        for (int t = 0; t < TB; ++t)
            for (int q = 0; q < parts; ++q) {
                const XT* xp = xs[t] + q * Kp + c * kBlk;
                for (int i = 0; i < 4; ++i) {
                    const __m512bh xv = (__m512bh)_mm512_loadu_si512(xp + 32 * i);
                    for (int r = 0; r < R; ++r) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], v[r][i], xv);
                }
            }
    }
    for (int t = 0; t < TB; ++t)
        for (int r = 0; r < R; ++r) y[t][yoff + r * rs] = _mm512_reduce_add_ps(acc[r][t]);
}

// The tile's R rows are `rs` rows apart (rs = 1: adjacent), and so are their outputs.
template <int R, int TB>
inline void tile(const uint8_t* w, const float* const* sr, int64_t K, int64_t Kp, int parts, const XT* const* xs,
                 float* const* y, int64_t yoff, int64_t rs = 1) {
    if (sr == nullptr) return tile_bf16<R, TB>(w, K, Kp, parts, xs, y, yoff, rs);
    const Decoder dec;
    gemv_tile_loop<R, TB>(K, kBlk, Kp, parts, xs, y, yoff, [&](int64_t c, auto full, __m512bh (&v)[R][4],
                                                                __m512 (&sc)[R]) DSV4_ALWAYS_INLINE {
        for (int r = 0; r < R; ++r) {
            const uint8_t* row = w + r * rs * K + kBlk * c;
            const uint8_t* ahead = row + static_cast<int64_t>(kPfTiles) * (rs == 1 ? R : 1) * K;
            prefetch_l2(ahead);
            prefetch_l2(ahead + 64);
            __m512i b0, b1;
            if constexpr (decltype(full)::value) {
                b0 = _mm512_loadu_si512(row);
                b1 = _mm512_loadu_si512(row + 64);
            } else {  // the K tail: masked-off bytes read as 0 (= +0.0), never past the row
                const int64_t left = K - c * kBlk;
                b0 = _mm512_maskz_loadu_epi8(byte_mask(left), row);
                b1 = _mm512_maskz_loadu_epi8(byte_mask(left - 64), row + 64);
            }
            dec(b0, v[r][0], v[r][1]);
            dec(b1, v[r][2], v[r][3]);
            sc[r] = _mm512_set1_ps(sr[r][c]);
        }
    }, rs);
}

// ---- small-batch GEMM (prefill): many tokens against the same rows (bf16_tiles.h). For
// T >= gemm_min_tokens(), 4 rows at a time are decoded once into a bf16 panel with the block scale
// folded into each word's exponent (exact: the scales are powers of two, checked per call).
#ifndef FP8_GEMM_MIN
#define FP8_GEMM_MIN 20  // measured crossover on Zen 4: the on-the-fly tiles win below ~16-24 tokens
#endif
#ifndef FP8_AMX_MIN
#define FP8_AMX_MIN 4  // the same on the AMX tile unit (Sapphire Rapids: the two tie at 4 tokens)
#endif
// Tokens from which the rows take the panel GEMM on this CPU.
inline int gemm_min_tokens() { return panel_threshold(FP8_AMX_MIN, FP8_GEMM_MIN); }
constexpr bool kHasGemm = true;
constexpr int kGR = kPanelRows;

// Chunks [c0, c1) of rows r..r+3 (absolute) of FP8 weight `w` -> panel[4][stride] bf16 words in
// chunk_pos order, each times its block scale 2^e (se: e << 7 per block, added to the exponent of
// non-zero words). Rows past `rows` are zero.
inline void decode_panel(const uint8_t* w, const int16_t* se, int64_t SK, int64_t K, int64_t r, int rows,
                         uint16_t* panel, int64_t stride, int64_t c0, int64_t c1) {
    const Decoder dec;
    const int64_t nfull = K / kBlk;
    for (int i = 0; i < kGR; ++i) {
        uint16_t* dst = panel + i * stride;
        if (i >= rows) {
            std::memset(dst + kBlk * c0, 0, static_cast<size_t>(kBlk * (c1 - c0)) * 2);
            continue;
        }
        const uint8_t* row = w + (r + i) * K;
        const int16_t* e = se + ((r + i) / kBlk) * SK;
        for (int64_t c = c0; c < c1; ++c) {
            __m512i b0, b1;
            if (c < nfull) {
                b0 = _mm512_loadu_si512(row + kBlk * c);
                b1 = _mm512_loadu_si512(row + kBlk * c + 64);
            } else {
                const int64_t left = K - c * kBlk;
                b0 = _mm512_maskz_loadu_epi8(byte_mask(left), row + kBlk * c);
                b1 = _mm512_maskz_loadu_epi8(byte_mask(left - 64), row + kBlk * c + 64);
            }
            __m512bh v[4];
            dec(b0, v[0], v[1]);
            dec(b1, v[2], v[3]);
            const __m512i ev = _mm512_set1_epi16(e[c]);
            const __m512i mag = _mm512_set1_epi16(0x7fff);
            for (int j = 0; j < 4; ++j) {
                const __m512i vi = (__m512i)v[j];
                const __mmask32 nz = _mm512_test_epi16_mask(vi, mag);
                _mm512_storeu_si512(dst + kBlk * c + 32 * j, _mm512_mask_add_epi16(vi, nz, vi, ev));
            }
        }
    }
}

#if DSV4_AMX
// gemm_rows on the tile unit (amx_panel_rows): every row's scales fold (checked per call), so every
// 4-row group is decoded (bf16 weights: copied) into the 32-row panels.
void amx_rows(const uint8_t* W, const int16_t* se, int64_t SK, int64_t K, int64_t r0, int64_t r1, int parts,
              const XT* const* xs, int T, float* const* y, Panel& scratch) {
    const uint16_t* wb = reinterpret_cast<const uint16_t*>(W);
    amx_panel_rows<1>(
        padded8(K), r0, r1, parts, xs, T, y, scratch, [](int64_t, int) { return true; },
        [&](int64_t row, int n, uint16_t* dst, int64_t stride, int64_t c0, int64_t c1) {
            if (se != nullptr) return decode_panel(W, se, SK, K, row, n, dst, stride, c0, c1);
            const int64_t a = kBlk * c0, b = kBlk * c1, e = std::min(K, b);
            for (int i = 0; i < kGR; ++i) {
                std::memset(dst + i * stride + a, 0, static_cast<size_t>(b - a) * 2);
                if (i < n && e > a)
                    std::memcpy(dst + i * stride + a, wb + (row + i) * K + a, static_cast<size_t>(e - a) * 2);
            }
        },
        [](int64_t, int64_t) {});
}
#endif

// Rows [r0, r1) against T tokens through the panel GEMM, K block by K block (gemm_k_blocks).
// se == nullptr: bf16 weights, read in place (K % 32 == 0) or through a zero-padded panel copy.

void gemm_rows(const uint8_t* W, const int16_t* se, int64_t SK, int64_t K, int64_t r0, int64_t r1, int parts,
               const XT* const* xs, int T, float* const* y, Panel& scratch) {
#if DSV4_AMX
    if (amx_ready()) return amx_rows(W, se, SK, K, r0, r1, parts, xs, T, y, scratch);
#endif
    uint16_t* panel = scratch.w.get();
    const int64_t Kp = padded8(K);
    const bool direct = se == nullptr && K % 32 == 0;
    const int64_t steps = direct ? K / 32 : Kp / 32;
    const uint16_t* wb = reinterpret_cast<const uint16_t*>(W);
    gemm_k_blocks(Kp / kBlk, [&](int64_t c0, int64_t c1) {
        const int64_t s0 = 4 * c0, s1 = std::min(steps, 4 * c1);
        for (int64_t r = r0; r < r1; r += kGR) {
            const int rows = static_cast<int>(std::min<int64_t>(kGR, r1 - r));
            const uint16_t* wr[kGR];
            if (se != nullptr) {
                decode_panel(W, se, SK, K, r, rows, panel, Kp, c0, c1);
                for (int i = 0; i < kGR; ++i) wr[i] = panel + i * Kp;
            } else if (direct) {
                for (int i = 0; i < kGR; ++i) wr[i] = wb + (r + std::min(i, rows - 1)) * K;
            } else {
                const int64_t a = kBlk * c0, b = kBlk * c1, e = std::min(K, b);
                for (int i = 0; i < kGR; ++i) {
                    uint16_t* dst = panel + i * Kp;
                    std::memset(dst + a, 0, static_cast<size_t>(b - a) * 2);
                    if (i < rows && e > a) std::memcpy(dst + a, wb + (r + i) * K + a, static_cast<size_t>(e - a) * 2);
                    wr[i] = dst;
                }
            }
            if (s1 > s0) gemm_tokens(wr, s0, s1, Kp, parts, xs, T, y, r - r0, rows, c0 > 0);
        }
    });
}

#elif DSV4_PATH_AVX512 || DSV4_PATH_AVX2

// 16 bf16 weights (zero words past the row end).
inline __m256i bf16_words(const uint8_t* p, int64_t left) {
    if (left >= 16) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    alignas(32) uint16_t tmp[16] = {};
    std::memcpy(tmp, p, static_cast<size_t>(left) * 2);
    return _mm256_load_si256(reinterpret_cast<const __m256i*>(tmp));
}

// 16 e4m3 bytes -> 16 IEEE halves of value / 256 (exact, subnormals included).
inline __m256i halves(const uint8_t* p, int64_t left) {
    __m128i b;
    if (left >= 16) {
        b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    } else {  // K tail: zero bytes (+0.0) past the row
        alignas(16) uint8_t tmp[16] = {};
        std::memcpy(tmp, p, static_cast<size_t>(left));
        b = _mm_load_si128(reinterpret_cast<const __m128i*>(tmp));
    }
    return _mm256_and_si256(_mm256_slli_epi16(_mm256_cvtepi8_epi16(b), 7),
                            _mm256_set1_epi16(static_cast<short>(0xbf80)));
}

// Weights times their block scale (exact: powers of two), accumulated in fp32; x 256 at the end.
// wb: bf16 weights (no scale).
template <int R, int TB, bool wb>
inline void tile_impl(const uint8_t* w, const float* const* sr, int64_t K, const XT* const* xs, float* const* y,
                      int64_t yoff) {
    const int64_t esz = wb ? 2 : 1;  // bytes per weight
#if DSV4_PATH_AVX512
    using V = __m512;
    constexpr int64_t kW = 16;
    auto zero = [] { return _mm512_setzero_ps(); };
#else
    using V = __m256;
    constexpr int64_t kW = 8;
    auto zero = [] { return _mm256_setzero_ps(); };
#endif
    V acc[R][TB];
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < TB; ++t) acc[r][t] = zero();
    const int64_t nchunks = (K + kBlk - 1) / kBlk;
    for (int64_t c = 0; c < nchunks; ++c) {
        V sc[R];
        for (int r = 0; r < R; ++r) {
#if DSV4_PATH_AVX512
            sc[r] = _mm512_set1_ps(wb ? 1.0f : sr[r][c]);
#else
            sc[r] = _mm256_set1_ps(wb ? 1.0f : sr[r][c]);
#endif
        }
        for (int64_t j = c * kBlk; j < std::min(K, (c + 1) * kBlk); j += 16) {
            V f[R][16 / kW];
            for (int r = 0; r < R; ++r) {
                const uint8_t* row = w + (r * K + j) * esz;
                if (((j * esz) & 63) == 0) prefetch_l2(row + static_cast<int64_t>(kPfTiles) * R * K * esz);
                if constexpr (wb) {  // bf16 words << 16 = fp32
                    const __m256i h = bf16_words(row, K - j);
#if DSV4_PATH_AVX512
                    f[r][0] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
#else
                    f[r][0] = _mm256_castsi256_ps(
                        _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(h)), 16));
                    f[r][1] = _mm256_castsi256_ps(
                        _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(h, 1)), 16));
#endif
                } else {
                    const __m256i h = halves(row, K - j);
#if DSV4_PATH_AVX512
                    f[r][0] = _mm512_mul_ps(_mm512_cvtph_ps(h), sc[r]);
#else
                    f[r][0] = _mm256_mul_ps(_mm256_cvtph_ps(_mm256_castsi256_si128(h)), sc[r]);
                    f[r][1] = _mm256_mul_ps(_mm256_cvtph_ps(_mm256_extracti128_si256(h, 1)), sc[r]);
#endif
                }
            }
            for (int t = 0; t < TB; ++t) {
                for (int u = 0; u < 16 / kW; ++u) {
#if DSV4_PATH_AVX512
                    const V xv = _mm512_loadu_ps(xs[t] + j + kW * u);
                    for (int r = 0; r < R; ++r) acc[r][t] = _mm512_fmadd_ps(f[r][u], xv, acc[r][t]);
#else
                    const V xv = _mm256_loadu_ps(xs[t] + j + kW * u);
                    for (int r = 0; r < R; ++r) acc[r][t] = _mm256_fmadd_ps(f[r][u], xv, acc[r][t]);
#endif
                }
            }
        }
    }
    for (int t = 0; t < TB; ++t)
        for (int r = 0; r < R; ++r) {
            const float unit = wb ? 1.0f : 256.0f;
#if DSV4_PATH_AVX512
            y[t][yoff + r] = unit * _mm512_reduce_add_ps(acc[r][t]);
#else
            __m128 v = _mm_add_ps(_mm256_castps256_ps128(acc[r][t]), _mm256_extractf128_ps(acc[r][t], 1));
            v = _mm_add_ps(v, _mm_movehl_ps(v, v));
            v = _mm_add_ss(v, _mm_movehdup_ps(v));
            y[t][yoff + r] = unit * _mm_cvtss_f32(v);
#endif
        }
}

template <int R, int TB>
inline void tile(const uint8_t* w, const float* const* sr, int64_t K, int64_t Kp, int parts, const XT* const* xs,
                 float* const* y, int64_t yoff) {
    (void)Kp; (void)parts;
    if (sr == nullptr) {
        tile_impl<R, TB, true>(w, sr, K, xs, y, yoff);
    } else {
        tile_impl<R, TB, false>(w, sr, K, xs, y, yoff);
    }
}

#else

template <int R, int TB>
inline void tile(const uint8_t* w, const float* const* sr, int64_t K, int64_t Kp, int parts, const XT* const* xs,
                 float* const* y, int64_t yoff) {
    (void)Kp; (void)parts;
    const uint16_t* wh = reinterpret_cast<const uint16_t*>(w);
    for (int r = 0; r < R; ++r) {
        float acc[TB] = {};
        for (int64_t c = 0; c * kBlk < K; ++c) {
            float p[TB] = {};
            for (int64_t i = c * kBlk; i < std::min(K, (c + 1) * kBlk); ++i) {
                const float wv = sr ? kFp8.value[w[r * K + i]] : u2f(static_cast<uint32_t>(wh[r * K + i]) << 16);
                for (int t = 0; t < TB; ++t) p[t] += wv * xs[t][i];
            }
            for (int t = 0; t < TB; ++t) acc[t] += sr ? p[t] * sr[r][c] : p[t];
        }
        for (int t = 0; t < TB; ++t) y[t][yoff + r] = acc[t];
    }
}
#endif

#if !DSV4_PATH_BF16
inline int gemm_min_tokens() { return 1 << 30; }  // the fp32 paths decode on the fly for any batch
constexpr bool kHasGemm = false;
constexpr int kGR = 4;
inline void gemm_rows(const uint8_t*, const int16_t*, int64_t, int64_t, int64_t, int64_t, int, const XT* const*, int,
                      float* const*, Panel&) {}
#endif

// Prepare one activation row (K floats) into dst (parts x Kp elements, zero-padded).
void prep_row8(const float* x, int64_t K, int parts, XT* dst, bool natural) {
    const int64_t Kp = padded8(K);
    float v[kBlk];
    for (int64_t c = 0; c < Kp / kBlk; ++c) {
        const int64_t n = std::min<int64_t>(kBlk, K - c * kBlk);
        std::memcpy(v, x + c * kBlk, static_cast<size_t>(n) * sizeof(float));
        for (int64_t i = n; i < kBlk; ++i) v[i] = 0.0f;
        prep_chunk(v, parts, Kp, dst, c, natural);
    }
}

// bf16 parts that represent these values exactly (1 when they already are bf16).
int parts8(const float* x, int64_t n) {
    if (kMaxParts == 1) return 1;
    for (int64_t i = 0; i < n; ++i)
        if (f2u(x[i]) & 0xffffu) return kMaxParts;
    return 1;
}

// The block-scale rows (of sf: float scales [ceil(rows/128), SK]) of weight rows r, r + rs, ...,
// r + (R-1) rs, written to out; nullptr for bf16 weights (sf == nullptr).
template <int R>
inline const float* const* row_scales(const float* sf, int64_t SK, int64_t r, int64_t rs, const float* (&out)[R]) {
    if (sf == nullptr) return nullptr;
    for (int i = 0; i < R; ++i) out[i] = sf + ((r + i * rs) / kBlk) * SK;
    return out;
}

// Rows [r0, r1) (absolute weight rows) against T tokens: y[t][r - r0]. sf: float scales
// [ceil(rows/128), SK] of FP8 weights; nullptr for bf16 weights.
template <int R>
void rows_r(const uint8_t* W, const float* sf, int64_t SK, int64_t K, int64_t r, int parts, const XT* const* xs,
            int T, float* const* y, int64_t yoff) {
    const uint8_t* w = W + r * K * (sf ? 1 : 2);
    const float* srb[R];
    const float* const* sr = row_scales<R>(sf, SK, r, 1, srb);
    const int64_t Kp = padded8(K);
    int t = 0;
    for (; t + 4 <= T; t += 4) tile<R, 4>(w, sr, K, Kp, parts, xs + t, y + t, yoff);
    switch (T - t) {
        case 3: tile<R, 3>(w, sr, K, Kp, parts, xs + t, y + t, yoff); break;
        case 2: tile<R, 2>(w, sr, K, Kp, parts, xs + t, y + t, yoff); break;
        case 1: tile<R, 1>(w, sr, K, Kp, parts, xs + t, y + t, yoff); break;
        default: break;
    }
}

void fp8_rows(const uint8_t* W, const float* sf, int64_t SK, int64_t K, int64_t r0, int64_t r1, int parts,
              const XT* const* xs, int T, float* const* y) {
    int64_t r = r0;
#if DSV4_PATH_BF16
    // One token against rows under 4 KB (FP8 wq_b: 1 KB): 4 adjacent rows are one stream of memory,
    // and one core reads 4 streams ~1.4x faster than one (benchmarks/read_streams.cpp), so a tile
    // takes its 4 rows from the 4 quarters of the range. Each row's sum is the same as before.
    const int64_t row_bytes = K * (sf ? 1 : 2);
    if (T == 1 && row_bytes < 4096 && (r1 - r0) % 16 == 0) {
        const int64_t q = (r1 - r0) / 4;
        for (int64_t i = 0; i < q; ++i) {
            const float* srb[4];
            tile<4, 1>(W + (r0 + i) * row_bytes, row_scales<4>(sf, SK, r0 + i, q, srb), K, padded8(K), parts, xs, y,
                       i, q);
        }
        return;
    }
#endif
    if (T == 1) {
        for (; r + 4 <= r1; r += 4) rows_r<4>(W, sf, SK, K, r, parts, xs, T, y, r - r0);
    } else {
        for (; r + 2 <= r1; r += 2) rows_r<2>(W, sf, SK, K, r, parts, xs, T, y, r - r0);
    }
    for (; r < r1; ++r) rows_r<1>(W, sf, SK, K, r, parts, xs, T, y, r - r0);
}

// Prefetch (into L2) up to `bytes` of rows [r0, r0 + rows) of W (`rb` bytes per row).
inline void prefetch_block(const uint8_t* W, int64_t rb, int64_t r0, int64_t rows, int64_t bytes) {
    const uint8_t* p = W + r0 * rb;
    const int64_t n = std::min(rows * rb, bytes);
    for (int64_t off = 0; off < n; off += 64) prefetch_l2(p + off);
}

// The grouped linear for both formats: S == nullptr means bf16 weights.
int dense_linear(const float* x, int64_t N, int64_t G, int64_t K, const void* W, const void* S, int scale_f32,
                 int64_t R, float* y, int act_quant, int nthreads) {
    if (N < 0 || G < 0 || K < 0 || R < 0) return -1;
    if (N == 0 || G == 0 || R == 0) return 0;
    if (K == 0) {
        std::memset(y, 0, static_cast<size_t>(N * G * R) * sizeof(float));
        return 0;
    }
    try {
        const bool bf16w = S == nullptr;
        const int64_t O = G * R, SO = (O + kBlk - 1) / kBlk, SK = (K + kBlk - 1) / kBlk;
        const int64_t rb = bf16w ? 2 * K : K;  // bytes per weight row
        const uint8_t* w = static_cast<const uint8_t*>(W);
        const int nt = threads_for(nthreads, static_cast<double>(O) * rb * ((N + 63) / 64));
        std::vector<float> sbuf;
        const float* sf = static_cast<const float*>(S);
        if (!bf16w && !scale_f32) {
            sbuf.resize(static_cast<size_t>(SO * SK));
            const uint8_t* s8 = static_cast<const uint8_t*>(S);
            for (int64_t i = 0; i < SO * SK; ++i) sbuf[i] = ue8m0(s8[i]);
            sf = sbuf.data();
        }
        // GEMM path (many tokens): block scales folded into the decoded weights' exponents, which
        // is exact when every scale is a power of two 2^e with |e| <= 100 (e4m3 values stay normal).
        const bool gemm = kHasGemm && N >= gemm_min_tokens();
        std::vector<int16_t> se;
        bool foldable = gemm && !bf16w;
        if (foldable) {
            se.resize(static_cast<size_t>(SO * SK));
            for (int64_t i = 0; i < SO * SK && foldable; ++i) {
                int e = 0;
                const float m = std::frexp(sf[i], &e);  // sf = m * 2^e, m in [0.5, 1)
                foldable = m == 0.5f && e - 1 >= -100 && e - 1 <= 100;
                se[i] = static_cast<int16_t>((e - 1) * 128);
            }
        }
        const int64_t M = N * G;  // activation rows
        std::vector<float> xq;
        const float* xin = x;
        if (act_quant) {
            xq.resize(static_cast<size_t>(M * K));
            for (int64_t i = 0; i < M; ++i) fake_quant_row(x + i * K, K, 128, xq.data() + i * K);
            xin = xq.data();
        }
        const int parts = parts8(xin, M * K);
        const int64_t Kp = padded8(K);
        Buf xb;
        XT* xp = aligned_new<XT>(static_cast<size_t>(M * parts * Kp));
        xb.p = xp;
#pragma omp parallel for num_threads(nt) schedule(static) if (M * K >= (1 << 18))
        for (int64_t m = 0; m < M; ++m) prep_row8(xin + m * K, K, parts, xp + m * parts * Kp, bf16w);

        // Items: (group, chunk of its rows); tokens in blocks of 64 so one chunk's rows stay in
        // cache while the token blocks reuse them.
        const int64_t chunk = std::max<int64_t>(16, std::min<int64_t>(256, (O / (8 * nt)) / 16 * 16));
        const int64_t per_group = (R + chunk - 1) / chunk;
#ifndef FP8_TBLK
#define FP8_TBLK 128  // tokens per block: each panel is decoded once per block
#endif
        const int64_t TBLK = FP8_TBLK;
        struct Scratch { std::vector<const XT*> xs; std::vector<float*> yp; Panel panel; };
        const bool use_gemm = gemm && (bf16w || foldable);
        parallel_items(
            nt, G * per_group,
            [&] {
                return Scratch{std::vector<const XT*>(TBLK), std::vector<float*>(TBLK),
                               Panel(use_gemm ? Kp : 0)};
            },
            [&](int64_t item, Scratch& sc) {
                const int64_t g = item / per_group, a = (item % per_group) * chunk, b = std::min(R, a + chunk);
                for (int64_t t0 = 0; t0 < N; t0 += TBLK) {
                    const int T = static_cast<int>(std::min<int64_t>(TBLK, N - t0));
                    for (int t = 0; t < T; ++t) {
                        sc.xs[t] = xp + ((t0 + t) * G + g) * parts * Kp;
                        sc.yp[t] = y + ((t0 + t) * G + g) * R + a;
                    }
                    if (use_gemm && T >= gemm_min_tokens()) {
                        gemm_rows(w, bf16w ? nullptr : se.data(), SK, K, g * R + a, g * R + b, parts, sc.xs.data(), T,
                                  sc.yp.data(), sc.panel);
                    } else {
                        fp8_rows(w, bf16w ? nullptr : sf, SK, K, g * R + a, g * R + b, parts, sc.xs.data(), T,
                                 sc.yp.data());
                    }
                }
            },
            [&](int64_t item) {
                const int64_t g = item / per_group, a = (item % per_group) * chunk;
                prefetch_block(w, rb, g * R + a, std::min<int64_t>(4, R - a), 16384);
            });
    } catch (const std::bad_alloc&) {
        return -3;
    }
    return 0;
}

}  // namespace

// ===================================================================================== C ABI

extern "C" {

const char* dsv4_fp8_isa(void) { return kIsa; }

// Grouped FP8 linear: y[n, g, r] = sum_i xq[n, g, i] * W[g*R + r, i] * S[(g*R + r) / 128, i / 128],
// xq = fake_quant_fp8(x, 128) per (n, g) row if act_quant. x [N, G, K] float32, W [G*R, K]
// float8_e4m3fn bytes, S [ceil(G*R/128), ceil(K/128)]: UE8M0 bytes (scale_f32 = 0) or float32
// multipliers (scale_f32 = 1); y [N, G, R] float32. The plain linear is G = 1, R = out_features.
// Returns 0, -1 bad shapes, -3 out of memory.
int dsv4_fp8_linear(const float* x, int64_t N, int64_t G, int64_t K, const void* W, const void* S, int scale_f32,
                    int64_t R, float* y, int act_quant, int nthreads) {
    if (S == nullptr) return -1;
    return dense_linear(x, N, G, K, W, S, scale_f32, R, y, act_quant, nthreads);
}

// The same for bf16 weights W [G*R, K] (no scales, no activation quant): y[n, g, r] = x[n, g] . W[g*R + r].
int dsv4_bf16_linear(const float* x, int64_t N, int64_t G, int64_t K, const void* W, int64_t R, float* y,
                     int nthreads) {
    return dense_linear(x, N, G, K, W, nullptr, 0, R, y, 0, nthreads);
}

}  // extern "C"
