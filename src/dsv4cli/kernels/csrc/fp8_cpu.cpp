// Fast CPU kernels for DeepSeek-V4 FP8 (e4m3) weights with 128x128 block scales, reading the
// stored bytes directly (the dense projections: wq_a, wq_b, wkv, wo_a, wo_b, shared experts, ...).
//
// Weight format (spec §2.11, §3.2): float8_e4m3fn [O, K], one scale per 128x128 block
// S [ceil(O/128), ceil(K/128)] (UE8M0 bytes 2^(b-127), or float32 multipliers):
//   y[n, o] = sum_i x[n, i] * e4m3(W[o, i]) * S[o / 128, i / 128].
// As for FP4, no dequantized matrix is ever written: each 64-byte run of a row is decoded in
// registers and consumed at once, so a call streams the weight bytes from memory once (decode is
// memory-bandwidth bound: 1 byte per weight).
//
// Code paths, picked at compile time (the library is built with -march=native):
//  * AVX-512 BF16 + VBMI (Zen 4, Sapphire Rapids, Ice Lake has VBMI but no BF16): every e4m3
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
//  * portable scalar fallback (a 256-entry table).
// Activations are prepared once per call (converted, split, permuted to the decode order and
// zero-padded to a multiple of 128), so inner loops never shuffle activations; K and O need not be
// multiples of 128 (the K tail is loaded with a byte mask, never past the row).
// Rows are processed a few at a time (a tile) and the rows `kPfTiles` tiles ahead are
// software-prefetched into L2 at the same column, as in the FP4 kernel.
// Grouped form (attention's wo_a): G groups, group g multiplies x[:, g, :] by weight rows
// [g*R, (g+1)*R); the plain linear is G = 1.

#include "common.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512BF16__) && \
    defined(__AVX512VBMI__)
#define FP8_PATH_BF16 1
#elif defined(__AVX512F__) && defined(__AVX2__) && defined(__F16C__)
#define FP8_PATH_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define FP8_PATH_AVX2 1
#else
#define FP8_PATH_SCALAR 1
#endif

#ifndef FP8_PF_TILES
#define FP8_PF_TILES 2  // prefetch distance in tiles (rows R * FP8_PF_TILES ahead)
#endif

namespace {

constexpr int64_t kBlk = 128;  // scale block in both dims = the decode chunk along K
constexpr int kPfTiles = FP8_PF_TILES;

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
//   prep_chunk(v, parts, Kp, dst, c)  write chunk c (128 inputs) of a prepared row from 128 floats
//   tile<R, TB>(w, sr, K, Kp, parts, xs, y, yoff)   R rows x TB tokens over the whole K
// A prepared row holds `parts` copies of Kp elements (Kp = K rounded up to 128). `w` is the first
// row's bytes (row stride K), `sr[r]` the float scales of row r's 128-row block (one per chunk).

#if FP8_PATH_BF16
using XT = uint16_t;
constexpr int kMaxParts = 3;
const char* kIsa = "avx512bf16";

// Input i of a chunk (line l = i / 64, lane L = i % 64 / 16, k = i % 16) sits where the decode
// below puts its weight: vpunpcklbw yields inputs 16L + 0..7 as words 8L + 0..7, vpunpckhbw
// inputs 16L + 8..15 as words 32 + 8L + 0..7.
inline int64_t chunk_pos(int64_t i) {
    const int64_t l = i >> 6, j = i & 63, L = j >> 4, k = j & 15;
    return l * 64 + (k < 8 ? 8 * L + k : 32 + 8 * L + (k - 8));
}

void prep_chunk(const float* v, int parts, int64_t Kp, XT* dst, int64_t c) {
    for (int64_t i = 0; i < kBlk; ++i) {
        const int64_t pos = c * kBlk + chunk_pos(i);
        float r = v[i];
        for (int p = 0; p < parts; ++p) {
            const uint16_t h = bf16_bits(r);
            dst[p * Kp + pos] = h;
            r -= u2f(static_cast<uint32_t>(h) << 16);
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

template <int R, int TB>
inline void tile(const uint8_t* w, const float* const* sr, int64_t K, int64_t Kp, int parts, const XT* const* xs,
                 float* const* y, int64_t yoff) {
    const Decoder dec;
    __m512 acc[R][TB];
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < TB; ++t) acc[r][t] = _mm512_setzero_ps();
    const int64_t nfull = K / kBlk, nchunks = (K + kBlk - 1) / kBlk;
    for (int64_t c = 0; c < nchunks; ++c) {
        __m512bh v[R][4];
        __m512 sc[R];
        for (int r = 0; r < R; ++r) {
            const uint8_t* row = w + r * K + kBlk * c;
            const uint8_t* ahead = row + static_cast<int64_t>(kPfTiles) * R * K;
            prefetch_l2(ahead);
            prefetch_l2(ahead + 64);
            __m512i b0, b1;
            if (c < nfull) {
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
        for (int t = 0; t < TB; ++t) {
            __m512 p[R];
            for (int r = 0; r < R; ++r) p[r] = _mm512_setzero_ps();
            for (int q = 0; q < parts; ++q) {
                const XT* xp = xs[t] + q * Kp + c * kBlk;
                for (int i = 0; i < 4; ++i) {
                    const __m512bh xv = (__m512bh)_mm512_loadu_si512(xp + 32 * i);
                    for (int r = 0; r < R; ++r) p[r] = _mm512_dpbf16_ps(p[r], v[r][i], xv);
                }
            }
            for (int r = 0; r < R; ++r) acc[r][t] = _mm512_fmadd_ps(p[r], sc[r], acc[r][t]);
        }
    }
    for (int t = 0; t < TB; ++t)
        for (int r = 0; r < R; ++r) y[t][yoff + r] = _mm512_reduce_add_ps(acc[r][t]);
}

#elif FP8_PATH_AVX512 || FP8_PATH_AVX2
using XT = float;
constexpr int kMaxParts = 1;
#if FP8_PATH_AVX512
const char* kIsa = "avx512f";
#else
const char* kIsa = "avx2";
#endif

void prep_chunk(const float* v, int parts, int64_t Kp, XT* dst, int64_t c) {
    (void)parts; (void)Kp;
    std::memcpy(dst + c * kBlk, v, kBlk * sizeof(float));
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
    return _mm256_and_si256(_mm256_slli_epi16(_mm256_cvtepi8_epi16(b), 7), _mm256_set1_epi16(static_cast<short>(0xbf80)));
}

// Weights times their block scale (exact: powers of two), accumulated in fp32; x 256 at the end.
template <int R, int TB>
inline void tile(const uint8_t* w, const float* const* sr, int64_t K, int64_t Kp, int parts, const XT* const* xs,
                 float* const* y, int64_t yoff) {
    (void)Kp; (void)parts;
#if FP8_PATH_AVX512
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
#if FP8_PATH_AVX512
            sc[r] = _mm512_set1_ps(sr[r][c]);
#else
            sc[r] = _mm256_set1_ps(sr[r][c]);
#endif
        }
        for (int64_t j = c * kBlk; j < std::min(K, (c + 1) * kBlk); j += 16) {
            V f[R][16 / kW];
            for (int r = 0; r < R; ++r) {
                const uint8_t* row = w + r * K + j;
                if ((j & 63) == 0) prefetch_l2(row + static_cast<int64_t>(kPfTiles) * R * K);
                const __m256i h = halves(row, K - j);
#if FP8_PATH_AVX512
                f[r][0] = _mm512_mul_ps(_mm512_cvtph_ps(h), sc[r]);
#else
                f[r][0] = _mm256_mul_ps(_mm256_cvtph_ps(_mm256_castsi256_si128(h)), sc[r]);
                f[r][1] = _mm256_mul_ps(_mm256_cvtph_ps(_mm256_extracti128_si256(h, 1)), sc[r]);
#endif
            }
            for (int t = 0; t < TB; ++t) {
                for (int u = 0; u < 16 / kW; ++u) {
#if FP8_PATH_AVX512
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
#if FP8_PATH_AVX512
            y[t][yoff + r] = 256.0f * _mm512_reduce_add_ps(acc[r][t]);
#else
            __m128 v = _mm_add_ps(_mm256_castps256_ps128(acc[r][t]), _mm256_extractf128_ps(acc[r][t], 1));
            v = _mm_add_ps(v, _mm_movehl_ps(v, v));
            v = _mm_add_ss(v, _mm_movehdup_ps(v));
            y[t][yoff + r] = 256.0f * _mm_cvtss_f32(v);
#endif
        }
}

#else
using XT = float;
constexpr int kMaxParts = 1;
const char* kIsa = "scalar";

void prep_chunk(const float* v, int parts, int64_t Kp, XT* dst, int64_t c) {
    (void)parts; (void)Kp;
    std::memcpy(dst + c * kBlk, v, kBlk * sizeof(float));
}

template <int R, int TB>
inline void tile(const uint8_t* w, const float* const* sr, int64_t K, int64_t Kp, int parts, const XT* const* xs,
                 float* const* y, int64_t yoff) {
    (void)Kp; (void)parts;
    for (int r = 0; r < R; ++r) {
        float acc[TB] = {};
        for (int64_t c = 0; c * kBlk < K; ++c) {
            float p[TB] = {};
            for (int64_t i = c * kBlk; i < std::min(K, (c + 1) * kBlk); ++i) {
                const float wv = kFp8.value[w[r * K + i]];
                for (int t = 0; t < TB; ++t) p[t] += wv * xs[t][i];
            }
            for (int t = 0; t < TB; ++t) acc[t] += p[t] * sr[r][c];
        }
        for (int t = 0; t < TB; ++t) y[t][yoff + r] = acc[t];
    }
}
#endif

inline int64_t padded8(int64_t K) { return (K + kBlk - 1) / kBlk * kBlk; }

// Prepare one activation row (K floats) into dst (parts x Kp elements, zero-padded).
void prep_row8(const float* x, int64_t K, int parts, XT* dst) {
    const int64_t Kp = padded8(K);
    float v[kBlk];
    for (int64_t c = 0; c < Kp / kBlk; ++c) {
        const int64_t n = std::min<int64_t>(kBlk, K - c * kBlk);
        std::memcpy(v, x + c * kBlk, static_cast<size_t>(n) * sizeof(float));
        for (int64_t i = n; i < kBlk; ++i) v[i] = 0.0f;
        prep_chunk(v, parts, Kp, dst, c);
    }
}

// bf16 parts that represent these values exactly (1 when they already are bf16).
int parts8(const float* x, int64_t n) {
    if (kMaxParts == 1) return 1;
    for (int64_t i = 0; i < n; ++i)
        if (f2u(x[i]) & 0xffffu) return kMaxParts;
    return 1;
}

// Rows [r0, r1) (absolute weight rows) against T tokens: y[t][r - r0]. sf: float scales
// [ceil(rows/128), SK].
template <int R>
void rows_r(const uint8_t* W, const float* sf, int64_t SK, int64_t K, int64_t r, int parts, const XT* const* xs,
            int T, float* const* y, int64_t yoff) {
    const uint8_t* w = W + r * K;
    const float* sr[R];
    for (int i = 0; i < R; ++i) sr[i] = sf + ((r + i) / kBlk) * SK;
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
    if (T == 1) {
        for (; r + 4 <= r1; r += 4) rows_r<4>(W, sf, SK, K, r, parts, xs, T, y, r - r0);
    } else {
        for (; r + 2 <= r1; r += 2) rows_r<2>(W, sf, SK, K, r, parts, xs, T, y, r - r0);
    }
    for (; r < r1; ++r) rows_r<1>(W, sf, SK, K, r, parts, xs, T, y, r - r0);
}

// Prefetch (into L2) up to `bytes` of rows [r0, r0 + rows) of W.
inline void prefetch_block(const uint8_t* W, int64_t K, int64_t r0, int64_t rows, int64_t bytes) {
    const uint8_t* p = W + r0 * K;
    const int64_t n = std::min(rows * K, bytes);
    for (int64_t off = 0; off < n; off += 64) prefetch_l2(p + off);
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
    if (N < 0 || G < 0 || K < 0 || R < 0) return -1;
    if (N == 0 || G == 0 || R == 0) return 0;
    if (K == 0) {
        std::memset(y, 0, static_cast<size_t>(N * G * R) * sizeof(float));
        return 0;
    }
    try {
        const int64_t O = G * R, SO = (O + kBlk - 1) / kBlk, SK = (K + kBlk - 1) / kBlk;
        const uint8_t* w = static_cast<const uint8_t*>(W);
        const int nt = threads_for(nthreads, static_cast<double>(O) * K * ((N + 63) / 64));
        std::vector<float> sbuf;
        const float* sf = static_cast<const float*>(S);
        if (!scale_f32) {
            sbuf.resize(static_cast<size_t>(SO * SK));
            const uint8_t* s8 = static_cast<const uint8_t*>(S);
            for (int64_t i = 0; i < SO * SK; ++i) sbuf[i] = ue8m0(s8[i]);
            sf = sbuf.data();
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
        for (int64_t m = 0; m < M; ++m) prep_row8(xin + m * K, K, parts, xp + m * parts * Kp);

        // Items: (group, chunk of its rows); tokens in blocks of 64 so one chunk's rows stay in
        // cache while the token blocks reuse them.
        const int64_t chunk = std::max<int64_t>(16, std::min<int64_t>(256, (O / (8 * nt)) / 16 * 16));
        const int64_t per_group = (R + chunk - 1) / chunk;
        const int64_t TBLK = 64;
        struct Scratch { std::vector<const XT*> xs; std::vector<float*> yp; };
        parallel_items(
            nt, G * per_group,
            [&] { return Scratch{std::vector<const XT*>(TBLK), std::vector<float*>(TBLK)}; },
            [&](int64_t item, Scratch& sc) {
                const int64_t g = item / per_group, a = (item % per_group) * chunk, b = std::min(R, a + chunk);
                for (int64_t t0 = 0; t0 < N; t0 += TBLK) {
                    const int T = static_cast<int>(std::min<int64_t>(TBLK, N - t0));
                    for (int t = 0; t < T; ++t) {
                        sc.xs[t] = xp + ((t0 + t) * G + g) * parts * Kp;
                        sc.yp[t] = y + ((t0 + t) * G + g) * R + a;
                    }
                    fp8_rows(w, sf, SK, K, g * R + a, g * R + b, parts, sc.xs.data(), T, sc.yp.data());
                }
            },
            [&](int64_t item) {
                const int64_t g = item / per_group, a = (item % per_group) * chunk;
                prefetch_block(w, K, g * R + a, std::min<int64_t>(4, R - a), 16384);
            });
    } catch (const std::bad_alloc&) {
        return -3;
    }
    return 0;
}

}  // extern "C"
