// Fast CPU kernels for DeepSeek-V4 FP4 (e2m1) expert weights, reading the packed format directly.
// The same GEMV machinery runs the `dsv4 quantize` int3 / int2 formats (tiles in lowbit.h); the linear
// and the fused MoE call take each projection's format, so one MoE layer may mix them (q3: int3
// gate/up, FP4 down).
//
// Weight format (spec §3.4): int8 [out, in/2], low nibble = element 2i, high nibble = 2i+1;
// UE8M0 scale bytes [out, in/32], value 2^(byte-127). Nothing is ever dequantized to a matrix:
// each 64-byte run of a row is decoded in registers and consumed at once, so the kernels stream
// the packed bytes from memory exactly once per call (memory bandwidth is the limit at decode).
//
// Code paths, picked at compile time (the library is built with -march=native):
//  * AVX-512 BF16 (Zen 4, Sapphire Rapids, Cooper Lake): nibbles -> bf16 words with one vpermw
//    (a 16-entry table, duplicated so index bit 4 is a don't-care), then vdpbf16ps against the
//    activations in bf16. Every e2m1 value is exact in bf16 and so is every product, so the result
//    is an fp32 accumulation like the reference. Activations that are not exactly bf16 (plain fp32
//    runs) are split into 3 bf16 parts hi+mid+lo that sum to the fp32 value exactly.
//    The block scale is applied once per 32 inputs with one FMA on the per-block partial sums.
//  * AVX-512F without BF16 (Skylake-X .. Ice Lake): nibbles -> fp32 with vpermps, FMA in fp32.
//  * AVX2 + FMA: nibbles -> int8 (2x value) with pshufb, widened to fp32, FMA in fp32.
//  * portable scalar fallback.
// Activations are "prepared" once per call (permuted to match the decode order, converted/split),
// so the inner loops never shuffle activations. Rows are processed a few at a time (a tile) and
// the next tile's rows are software-prefetched into L2: the hardware prefetchers alone ramp up
// too slowly on 1-2 KB rows (single-thread DRAM streaming went from ~9 to ~25 GB/s on Zen 4).
// Work is split into items claimed through an atomic counter (see parallel_items).
// Prefill (FP4_GEMM_MIN or more tokens against the same rows, bf16 path): the rows are decoded
// once into bf16 panels with the scales folded in, and a register-blocked GEMM runs over all the
// tokens (bf16_tiles.h), instead of re-decoding them for every 4 tokens. With the AMX tile unit
// (Sapphire Rapids and later) this starts at FP4_AMX_MIN tokens and runs on TDPBF16PS (amx_tiles.h).

#include "common.h"  // the ISA ladder: DSV4_PATH_BF16 / _AVX512 / _AVX2 / _SCALAR
#include "bf16_tiles.h"  // the prefill GEMM of the bf16 path
#include "amx_tiles.h"   // ... and on the AMX tile unit

namespace {

const float kFp4Values[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                              -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

#if defined(__SSE__) || defined(__x86_64__)
// fp32 paths walk a row in 32-input blocks (16 bytes): at each cache line of row `row`, also
// fetch the same line of the row one tile ahead, and that row's scales (see gemv_tile, bf16 path).
inline void prefetch_next_tile(const uint8_t* w, const uint8_t* s, int64_t row, int64_t rb, int64_t sb, int64_t b) {
    if ((b & 3) == 0) _mm_prefetch(reinterpret_cast<const char*>(w + row * rb + 16 * b), _MM_HINT_T1);
    if ((b & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(s + row * sb + b), _MM_HINT_T1);
}
#endif

inline float silu(float g) { return g / (1.0f + std::exp(-g)); }

// ===================================================================================== the paths
//
// Each path defines:
//   XT                      the prepared activation element type
//   kChunk                  inputs per layout chunk (the K padding unit)
//   prep_chunk(v, parts, Kp, dst, c)   write chunk c of one prepared row from kChunk floats
//   gemv_tile<R, TB>(...)   R rows x TB tokens over the whole input dimension
// A prepared row holds `parts` copies of Kp elements (Kp = K rounded up to kChunk).

const char* kIsa = DSV4_ISA;

#if DSV4_PATH_AVX512 || DSV4_PATH_AVX2
using XT = float;
constexpr int64_t kChunk = 32;

// The fp32 SIMD paths, blocks of 32 inputs: even inputs first (low nibbles), then odd ones (high nibbles).
void prep_chunk(const float* v, int parts, int64_t Kp, XT* dst, int64_t c) {
    (void)parts; (void)Kp;
    for (int64_t i = 0; i < kChunk; ++i) dst[c * kChunk + (i & 1) * 16 + (i >> 1)] = v[i];
}
#endif

#if DSV4_PATH_BF16
using XT = uint16_t;
constexpr int64_t kChunk = 128;
// Word 32*v + j of a chunk holds input 4*j + v: the decode below yields exactly that order.
// kDeinterleave[v]: vpermt2w indices that gather inputs 4j + v (j < 16) from two 32-word vectors.
struct Deinterleave {
    alignas(64) uint16_t idx[4][32];
    Deinterleave() {
        for (int v = 0; v < 4; ++v)
            for (int j = 0; j < 32; ++j) idx[v][j] = static_cast<uint16_t>(j < 16 ? 4 * j + v : 0);
    }
};
const Deinterleave kDeinterleave;

void prep_chunk(const float* v, int parts, int64_t Kp, XT* dst, int64_t c) {
    __m512i words[3][4];
    bf16_parts128(v, parts, words);
    for (int q = 0; q < parts; ++q)
        for (int u = 0; u < 4; ++u) {
            const __m512i idx = _mm512_load_si512(kDeinterleave.idx[u]);
            const __m512i lo = _mm512_permutex2var_epi16(words[q][0], idx, words[q][1]);  // inputs 4j + u, j < 16
            const __m512i hi = _mm512_permutex2var_epi16(words[q][2], idx, words[q][3]);  // j = 16..31
            _mm512_storeu_si512(dst + q * Kp + c * kChunk + 32 * u,
                                _mm512_inserti64x4(lo, _mm512_castsi512_si256(hi), 1));
        }
}

alignas(64) const uint16_t kBf16Table[32] = {
    0x0000, 0x3f00, 0x3f80, 0x3fc0, 0x4000, 0x4040, 0x4080, 0x40c0,
    0x8000, 0xbf00, 0xbf80, 0xbfc0, 0xc000, 0xc040, 0xc080, 0xc0c0,
    0x0000, 0x3f00, 0x3f80, 0x3fc0, 0x4000, 0x4040, 0x4080, 0x40c0,
    0x8000, 0xbf00, 0xbf80, 0xbfc0, 0xc000, 0xc040, 0xc080, 0xc0c0};

// vpshufb control: dword i (128-bit lane L = i/4) gets scale byte L into bits 16..23.
alignas(64) const uint8_t kScaleCtrl[64] = {
    0x80, 0x80, 0, 0x80, 0x80, 0x80, 0, 0x80, 0x80, 0x80, 0, 0x80, 0x80, 0x80, 0, 0x80,
    0x80, 0x80, 1, 0x80, 0x80, 0x80, 1, 0x80, 0x80, 0x80, 1, 0x80, 0x80, 0x80, 1, 0x80,
    0x80, 0x80, 2, 0x80, 0x80, 0x80, 2, 0x80, 0x80, 0x80, 2, 0x80, 0x80, 0x80, 2, 0x80,
    0x80, 0x80, 3, 0x80, 0x80, 0x80, 3, 0x80, 0x80, 0x80, 3, 0x80, 0x80, 0x80, 3, 0x80};

#ifndef PF_HINT
#define PF_HINT _MM_HINT_T1  // into L2: T0 (L1) measured 2x slower on Zen 4
#endif
// R rows x TB tokens over the whole K. w: first row's packed bytes, s: its scale bytes.
// xs[t]: prepared row of token t; y[t][r] receives the dot product of row r with token t.
// Decode of 64 bytes: the 32 words w_j = byte(2j) | byte(2j+1) << 8; (w_j >> 4v) & 15 is the
// nibble of input 4j + v, so four shifts + four vpermw give 128 bf16 weights in a known order.
// vdpbf16ps pairs words (2i, 2i+1) -> lane i, inputs 8i + v and 8i + 4 + v: block i/4.
// The hardware prefetchers ramp up too slowly on 2 KB rows: each chunk fetches the same chunk of the
// next tile's rows (R rows further on, one tile ahead in time), and while c < scale_lines their scales.
template <int R, int TB>
inline void gemv_tile(const uint8_t* w, const uint8_t* s, int64_t K, int64_t Kp, int parts,
                      const XT* const* xs, float* const* y, int64_t yoff) {
    const int64_t rb = K / 2, sb = K / 32, scale_lines = (sb + 63) / 64;
    const __m512i tbl = _mm512_load_si512(kBf16Table);
    const __m512i sctrl = _mm512_load_si512(kScaleCtrl);
    gemv_tile_loop<R, TB>(K, kChunk, Kp, parts, xs, y, yoff, [&](int64_t c, auto full, __m512bh (&v)[R][4],
                                                                  __m512 (&sc)[R]) DSV4_ALWAYS_INLINE {
        for (int r = 0; r < R; ++r) {
            _mm_prefetch(reinterpret_cast<const char*>(w + (R + r) * rb + 64 * c), PF_HINT);
            if (c < scale_lines) _mm_prefetch(reinterpret_cast<const char*>(s + (R + r) * sb + 64 * c), PF_HINT);
            __m512i wr, sr;
            if constexpr (decltype(full)::value) {
                wr = _mm512_loadu_si512(w + r * rb + 64 * c);
                int32_t s4;
                std::memcpy(&s4, s + r * sb + 4 * c, 4);
                sr = _mm512_set1_epi32(s4);
            } else {  // the tail: K % 128 inputs left (a multiple of 32)
                const int64_t left = K - c * kChunk;
                wr = _mm512_maskz_loadu_epi8((1ull << (left / 2)) - 1, w + r * rb + 64 * c);
                const __mmask16 ms = static_cast<__mmask16>((1u << (left / 32)) - 1);
                sr = _mm512_broadcastd_epi32(_mm_maskz_loadu_epi8(ms, s + r * sb + 4 * c));
            }
            v[r][0] = (__m512bh)_mm512_permutexvar_epi16(wr, tbl);
            v[r][1] = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(wr, 4), tbl);
            v[r][2] = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(wr, 8), tbl);
            v[r][3] = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(wr, 12), tbl);
            sc[r] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_shuffle_epi8(sr, sctrl), 7));
        }
    });
}

// Whether the block scales of rows [r, r + rows) of an FP4 weight fold into bf16 exponents
// exactly: every byte in [2, 252] (e2m1 exponents are -1..2, so the sums stay normal).
inline bool fp4_foldable(const uint8_t* S, int64_t K, int64_t r, int rows) {
    const int64_t n = rows * (K / 32);
    const uint8_t* s = S + r * (K / 32);
    const __m512i two = _mm512_set1_epi8(2), span = _mm512_set1_epi8(static_cast<char>(250));
    for (int64_t i = 0; i < n; i += 64) {  // b - 2 <= 250 (unsigned): b in [2, 252]
        const __mmask64 m = n - i >= 64 ? ~0ull : (1ull << (n - i)) - 1;
        const __m512i b = _mm512_sub_epi8(_mm512_maskz_loadu_epi8(m, s + i), two);
        if (_mm512_mask_cmpgt_epu8_mask(m, b, span) != 0) return false;
    }
    return true;
}

// Chunks [c0, c1) of rows r..r+3 of FP4 weight W -> panel[4][stride] bf16 words in the prepared order,
// each times its block scale, folded into the exponent (the rows must be fp4_foldable). Rows past
// `rows` are zero. Each chunk's load prefetches the bytes `ahead` bytes further on (the same chunk
// of a later row, or a later chunk of the same row), so they have landed when their turn comes.
inline void fp4_panel(const uint8_t* W, const uint8_t* S, int64_t K, int64_t r, int rows, uint16_t* panel,
                      int64_t stride, int64_t c0, int64_t c1, int64_t ahead) {
    const int64_t rb = K / 2, sb = K / 32, nfull = K / kChunk;
    const __m512i tbl = _mm512_load_si512(kBf16Table);
    const __m512i mag = _mm512_set1_epi16(0x7fff);
    // word j of each decoded vector holds input 4j + v: block j / 8 of the chunk
    const __m512i block_of_word = _mm512_set_epi16(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2,
                                                   1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    for (int i = 0; i < 4; ++i) {
        uint16_t* dst = panel + i * stride;
        if (i >= rows) {
            std::memset(dst + kChunk * c0, 0, static_cast<size_t>(kChunk * (c1 - c0)) * 2);
            continue;
        }
        const uint8_t* w = W + (r + i) * rb;
        const uint8_t* s = S + (r + i) * sb;
        for (int64_t c = c0; c < c1; ++c) {
            _mm_prefetch(reinterpret_cast<const char*>(w + ahead + 64 * c), PF_HINT);
            if ((c & 15) == 0) _mm_prefetch(reinterpret_cast<const char*>(s + 4 * sb + 4 * c), PF_HINT);
            __m512i wr;
            __m128i s4;
            if (c < nfull) {
                wr = _mm512_loadu_si512(w + 64 * c);
                s4 = _mm_cvtsi32_si128(*reinterpret_cast<const int32_t*>(s + 4 * c));
            } else {  // tail: K % 128 inputs left (a multiple of 32); masked-off bytes decode to +0
                const int64_t left = K - c * kChunk;
                wr = _mm512_maskz_loadu_epi8((1ull << (left / 2)) - 1, w + 64 * c);
                s4 = _mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << (left / 32)) - 1), s + 4 * c);
            }
            const __m128i e4 = _mm_slli_epi16(_mm_sub_epi16(_mm_cvtepu8_epi16(s4), _mm_set1_epi16(127)), 7);
            const __m512i ev = _mm512_permutexvar_epi16(block_of_word, _mm512_castsi128_si512(e4));
            for (int q = 0; q < 4; ++q) {
                const __m512i v = _mm512_permutexvar_epi16(_mm512_srli_epi16(wr, 4 * q), tbl);
                _mm512_storeu_si512(dst + kChunk * c + 32 * q,
                                    _mm512_mask_add_epi16(v, _mm512_test_epi16_mask(v, mag), v, ev));
            }
        }
    }
}

#elif DSV4_PATH_AVX512

// fp32 path for AVX-512 CPUs without BF16 (Skylake-X .. Ice Lake): 16 bytes -> 16 dwords, and
// vpermps (which reads only the low 4 index bits) maps each nibble to its float value directly.
template <int R, int TB>
inline void gemv_tile(const uint8_t* w, const uint8_t* s, int64_t K, int64_t Kp, int parts,
                      const XT* const* xs, float* const* y, int64_t yoff) {
    (void)Kp; (void)parts;
    const int64_t rb = K / 2, sb = K / 32;
    const __m512 tbl = _mm512_loadu_ps(kFp4Values);
    __m512 acc[R][TB];
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < TB; ++t) acc[r][t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < K / 32; ++b) {
        __m512 lo[R], hi[R], sc[R];
        for (int r = 0; r < R; ++r) {
            prefetch_next_tile(w, s, R + r, rb, sb, b);
            const __m512i d =
                _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * rb + 16 * b)));
            lo[r] = _mm512_permutexvar_ps(d, tbl);
            hi[r] = _mm512_permutexvar_ps(_mm512_srli_epi32(d, 4), tbl);
            sc[r] = _mm512_set1_ps(ue8m0(s[r * sb + b]));
        }
        for (int t = 0; t < TB; ++t) {
            const __m512 x0 = _mm512_loadu_ps(xs[t] + 32 * b), x1 = _mm512_loadu_ps(xs[t] + 32 * b + 16);
            for (int r = 0; r < R; ++r)
                acc[r][t] = _mm512_fmadd_ps(_mm512_fmadd_ps(hi[r], x1, _mm512_mul_ps(lo[r], x0)), sc[r], acc[r][t]);
        }
    }
    for (int t = 0; t < TB; ++t)
        for (int r = 0; r < R; ++r) y[t][yoff + r] = _mm512_reduce_add_ps(acc[r][t]);
}

#elif DSV4_PATH_AVX2

// acc[r][t] += scale_r * (decoded block row r . inputs 32b..32b+31 of token t); the decoded block
// is f[r][0..3] = 8 values each, in the order the inputs were prepared (shared with lowbit.h).
template <int R, int TB>
inline void fma_block_avx2(const __m256 (&f)[R][4], const __m256 (&sc)[R], const XT* const* xs, int64_t b,
                           __m256 (&acc)[R][TB]) {
    for (int t = 0; t < TB; ++t) {
        const float* xp = xs[t] + 32 * b;
        const __m256 x0 = _mm256_loadu_ps(xp), x1 = _mm256_loadu_ps(xp + 8);
        const __m256 x2 = _mm256_loadu_ps(xp + 16), x3 = _mm256_loadu_ps(xp + 24);
        for (int r = 0; r < R; ++r) {
            __m256 p = _mm256_mul_ps(f[r][0], x0);
            p = _mm256_fmadd_ps(f[r][1], x1, p);
            p = _mm256_fmadd_ps(f[r][2], x2, p);
            p = _mm256_fmadd_ps(f[r][3], x3, p);
            acc[r][t] = _mm256_fmadd_ps(p, sc[r], acc[r][t]);
        }
    }
}

// y[t][yoff + r] = horizontal sum of acc[r][t].
template <int R, int TB>
inline void store_sums_avx2(const __m256 (&acc)[R][TB], float* const* y, int64_t yoff) {
    for (int t = 0; t < TB; ++t)
        for (int r = 0; r < R; ++r) {
            __m128 v = _mm_add_ps(_mm256_castps256_ps128(acc[r][t]), _mm256_extractf128_ps(acc[r][t], 1));
            v = _mm_add_ps(v, _mm_movehl_ps(v, v));
            v = _mm_add_ss(v, _mm_movehdup_ps(v));
            y[t][yoff + r] = _mm_cvtss_f32(v);
        }
}

template <int R, int TB>
inline void gemv_tile(const uint8_t* w, const uint8_t* s, int64_t K, int64_t Kp, int parts,
                      const XT* const* xs, float* const* y, int64_t yoff) {
    (void)Kp; (void)parts;
    const int64_t rb = K / 2, sb = K / 32;
    // 2 x e2m1 value as int8 (exact small integers); the scale gets the 1/2.
    const __m128i lut = _mm_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
    const __m128i lowmask = _mm_set1_epi8(0x0f);
    __m256 acc[R][TB];
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < TB; ++t) acc[r][t] = _mm256_setzero_ps();
    const int64_t nb = K / 32;
    for (int64_t b = 0; b < nb; ++b) {
        __m256 f[R][4];
        __m256 sc[R];
        for (int r = 0; r < R; ++r) {
            prefetch_next_tile(w, s, R + r, rb, sb, b);
            const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * rb + 16 * b));
            const __m128i lo = _mm_shuffle_epi8(lut, _mm_and_si128(bytes, lowmask));
            const __m128i hi = _mm_shuffle_epi8(lut, _mm_and_si128(_mm_srli_epi16(bytes, 4), lowmask));
            f[r][0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
            f[r][1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)));
            f[r][2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
            f[r][3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)));
            sc[r] = _mm256_set1_ps(0.5f * ue8m0(s[r * sb + b]));
        }
        fma_block_avx2<R, TB>(f, sc, xs, b, acc);
    }
    store_sums_avx2<R, TB>(acc, y, yoff);
}

#else
using XT = float;
constexpr int64_t kChunk = 32;

void prep_chunk(const float* v, int parts, int64_t Kp, XT* dst, int64_t c) {
    (void)parts; (void)Kp;
    for (int64_t i = 0; i < kChunk; ++i) dst[c * kChunk + i] = v[i];
}

template <int R, int TB>
inline void gemv_tile(const uint8_t* w, const uint8_t* s, int64_t K, int64_t Kp, int parts,
                      const XT* const* xs, float* const* y, int64_t yoff) {
    (void)Kp; (void)parts;
    const int64_t rb = K / 2, sb = K / 32;
    for (int r = 0; r < R; ++r) {
        float acc[TB] = {};
        for (int64_t b = 0; b < K / 32; ++b) {
            float wv[32];
            const uint8_t* wb = w + r * rb + 16 * b;
            for (int i = 0; i < 16; ++i) {
                wv[2 * i] = kFp4Values[wb[i] & 15];
                wv[2 * i + 1] = kFp4Values[wb[i] >> 4];
            }
            const float sc = ue8m0(s[r * sb + b]);
            for (int t = 0; t < TB; ++t) {
                const float* xp = xs[t] + 32 * b;
                float p = 0.0f;
                for (int i = 0; i < 32; ++i) p += wv[i] * xp[i];
                acc[t] += p * sc;
            }
        }
        for (int t = 0; t < TB; ++t) y[t][yoff + r] = acc[t];
    }
}
#endif

inline int64_t padded(int64_t K) { return (K + kChunk - 1) / kChunk * kChunk; }

// Prepare one activation row (K floats) into dst (parts x Kp elements).
void prep_row(const float* x, int64_t K, int parts, XT* dst) {
    const int64_t Kp = padded(K);
    float v[kChunk];
    for (int64_t c = 0; c < Kp / kChunk; ++c) {
        const int64_t n = std::min<int64_t>(kChunk, K - c * kChunk);
        std::memcpy(v, x + c * kChunk, n * sizeof(float));
        for (int64_t i = n; i < kChunk; ++i) v[i] = 0.0f;
        prep_chunk(v, parts, Kp, dst, c);
    }
}

// How many bf16 parts represent these values exactly (1 when they already are bf16).
int parts_needed(const float* x, int64_t n) {
#if DSV4_PATH_BF16
    for (int64_t i = 0; i < n; ++i)
        if (f2u(x[i]) & 0xffffu) return 3;
#else
    (void)x; (void)n;
#endif
    return 1;
}

// Rows [r0, r1) of W (K inputs) against T tokens: y[t][r - r0 + yoff]. xs: prepared rows.
template <int R>
void gemv_rows_r(const uint8_t* W, const uint8_t* S, int64_t K, int64_t r, int parts,
                 const XT* const* xs, int T, float* const* y, int64_t yoff) {
    const uint8_t* w = W + r * (K / 2);
    const uint8_t* s = S + r * (K / 32);
    int t = 0;
    for (; t + 4 <= T; t += 4) gemv_tile<R, 4>(w, s, K, padded(K), parts, xs + t, y + t, yoff);
    switch (T - t) {
        case 3: gemv_tile<R, 3>(w, s, K, padded(K), parts, xs + t, y + t, yoff); break;
        case 2: gemv_tile<R, 2>(w, s, K, padded(K), parts, xs + t, y + t, yoff); break;
        case 1: gemv_tile<R, 1>(w, s, K, padded(K), parts, xs + t, y + t, yoff); break;
        default: break;
    }
}

void gemv_rows(const uint8_t* W, const uint8_t* S, int64_t K, int64_t r0, int64_t r1, int parts,
               const XT* const* xs, int T, float* const* y) {
    int64_t r = r0;
#if DSV4_PATH_BF16
    if (T == 1) {
        for (; r + 4 <= r1; r += 4) gemv_rows_r<4>(W, S, K, r, parts, xs, T, y, r - r0);
    } else {
        for (; r + 2 <= r1; r += 2) gemv_rows_r<2>(W, S, K, r, parts, xs, T, y, r - r0);
    }
#else
    for (; r + 2 <= r1; r += 2) gemv_rows_r<2>(W, S, K, r, parts, xs, T, y, r - r0);
#endif
    for (; r < r1; ++r) gemv_rows_r<1>(W, S, K, r, parts, xs, T, y, r - r0);
}

}  // namespace

#include "lowbit.h"

namespace {

// Weight formats of the kernels below: FP4 e2m1 (+ UE8M0 scales) and the `dsv4 quantize` int3 / int2
// (+ bf16 scales, lowbit.h). The codes are the bits per weight.
constexpr int kFmtFp4 = 4, kFmtInt3 = 3, kFmtInt2 = 2;

inline bool known_format(int fmt) { return fmt == kFmtFp4 || fmt == kFmtInt3 || fmt == kFmtInt2; }

// Bytes per weight row / per scale row of a K-input row in format fmt.
inline int64_t row_bytes(int fmt, int64_t K) {
    return fmt == kFmtFp4 ? K / 2 : K / 32 * (fmt == kFmtInt3 ? 12 : 8);
}
inline int64_t scale_row_bytes(int fmt, int64_t K) { return fmt == kFmtFp4 ? K / 32 : K / 16; }
// Bytes streamed per weight (codes and scales), for the thread count heuristics.
inline double bytes_per_weight(int fmt) { return static_cast<double>(row_bytes(fmt, 32) + scale_row_bytes(fmt, 32)) / 32; }

#ifndef FP4_GEMM_MIN
#define FP4_GEMM_MIN 6  // tokens per weight row from which the panel GEMM beats the on-the-fly tiles
#endif
#ifndef FP4_AMX_MIN
#define FP4_AMX_MIN 3  // the same on the AMX tile unit (Sapphire Rapids: on-the-fly wins at 2, AMX at 3)
#endif

// Tokens per weight row from which FP4 rows take the panel GEMM on this CPU.
inline int fp4_gemm_min() { return panel_threshold(FP4_AMX_MIN, FP4_GEMM_MIN); }

#if DSV4_PATH_BF16
#if DSV4_AMX
// fp4_gemm_rows on the tile unit (amx_panel_rows): rows whose scales fold are decoded into 32-row panels,
// prefetching the same chunk of the next panel's rows; the others run the on-the-fly tiles.
void fp4_amx_rows(const uint8_t* W, const uint8_t* S, int64_t K, int64_t r0, int64_t r1, int parts,
                  const XT* const* xs, int T, float* const* y, Panel& panel) {
    amx_panel_rows<1>(
        padded(K), r0, r1, parts, xs, T, y, panel,
        [&](int64_t row, int n) { return fp4_foldable(S, K, row, n); },
        [&](int64_t row, int n, uint16_t* dst, int64_t stride, int64_t c0, int64_t c1) {
            fp4_panel(W, S, K, row, n, dst, stride, c0, c1, kAmxRows * (K / 2));
        },
        [&](int64_t row, int64_t yoff) { gemv_rows_r<1>(W, S, K, row, parts, xs, T, y, yoff); });
}
#endif

// Rows [r0, r1) of FP4 weight W against T tokens through the panel GEMM, K block by K block
// (gemm_k_blocks): y[t][r - r0]. Rows whose scales do not fold take the on-the-fly tiles.
void fp4_gemm_rows(const uint8_t* W, const uint8_t* S, int64_t K, int64_t r0, int64_t r1, int parts,
                   const XT* const* xs, int T, float* const* y, Panel& panel) {
#if DSV4_AMX
    if (amx_ready()) return fp4_amx_rows(W, S, K, r0, r1, parts, xs, T, y, panel);
#endif
    const int64_t Kp = padded(K);
    std::vector<char> folds;
    for (int64_t r = r0; r < r1; r += kPanelRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kPanelRows, r1 - r));
        folds.push_back(fp4_foldable(S, K, r, rows));
        if (!folds.back())  // scales the fold cannot take: the on-the-fly tiles (exact for any scale)
            for (int i = 0; i < rows; ++i) gemv_rows_r<1>(W, S, K, r + i, parts, xs, T, y, r - r0 + i);
    }
    gemm_k_blocks(Kp / kChunk, [&](int64_t c0, int64_t c1) {
        const uint16_t* wr[kPanelRows];
        for (int i = 0; i < kPanelRows; ++i) wr[i] = panel.w.get() + i * Kp;
        for (int64_t r = r0, p = 0; r < r1; r += kPanelRows, ++p) {
            if (!folds[p]) continue;
            const int rows = static_cast<int>(std::min<int64_t>(kPanelRows, r1 - r));
            // the same chunk of the next panel's row: its GEMM gives the fetch time to land
            fp4_panel(W, S, K, r, rows, panel.w.get(), Kp, c0, c1, 4 * (K / 2));
            gemm_tokens(wr, 4 * c0, 4 * c1, Kp, parts, xs, T, y, r - r0, rows, c0 > 0);
        }
    });
}
#endif

#ifndef LOWBIT_AMX_MIN
#define LOWBIT_AMX_MIN 8  // tokens from which int3 / int2 rows take the AMX panel GEMM (measured crossover)
#endif

// Tokens per weight row from which rows of format fmt take a panel GEMM on this CPU (a huge
// number: never; int3 / int2 only on the AMX tile unit).
inline int panel_min(int fmt) {
    return fmt == kFmtFp4 ? fp4_gemm_min() : panel_threshold(LOWBIT_AMX_MIN, 1 << 30);
}

// Rows [r0, r1) of W (format fmt, K inputs) against T tokens: y[t][r - r0]. With a panel and at
// least panel_min(fmt) tokens, the panel GEMM; otherwise the on-the-fly tiles.
inline void rows_fmt(int fmt, const void* W, const void* S, int64_t K, int64_t r0, int64_t r1, int parts,
                     const XT* const* xs, int T, float* const* y, Panel* panel = nullptr) {
    const auto* w = static_cast<const uint8_t*>(W);
#if DSV4_PATH_BF16
    if (panel != nullptr && panel->w && T >= panel_min(fmt)) {
#if DSV4_AMX
        if (fmt == kFmtInt3)
            return lowbit_amx_rows<3>(w, static_cast<const uint16_t*>(S), K, r0, r1, parts, xs, T, y, *panel);
        if (fmt == kFmtInt2)
            return lowbit_amx_rows<2>(w, static_cast<const uint16_t*>(S), K, r0, r1, parts, xs, T, y, *panel);
#endif
        return fp4_gemm_rows(w, static_cast<const uint8_t*>(S), K, r0, r1, parts, xs, T, y, *panel);
    }
#else
    (void)panel;
#endif
    if (fmt == kFmtInt3) {
        lowbit_rows<3>(w, static_cast<const uint16_t*>(S), K, r0, r1, parts, xs, T, y);
    } else if (fmt == kFmtInt2) {
        lowbit_rows<2>(w, static_cast<const uint16_t*>(S), K, r0, r1, parts, xs, T, y);
    } else {
        gemv_rows(w, static_cast<const uint8_t*>(S), K, r0, r1, parts, xs, T, y);
    }
}

// Prefetch (into L2) the first `rows` rows of a weight block starting at row r0: packed bytes
// and scales.
inline void prefetch_rows(int fmt, const void* W, const void* S, int64_t K, int64_t r0, int64_t rows) {
#if defined(__SSE__) || defined(__x86_64__)
    const int64_t rb = row_bytes(fmt, K), sb = scale_row_bytes(fmt, K);
    const auto* w = static_cast<const char*>(W) + r0 * rb;
    const auto* s = static_cast<const char*>(S) + r0 * sb;
    for (int64_t off = 0; off < rows * rb; off += 64) _mm_prefetch(w + off, _MM_HINT_T1);
    for (int64_t off = 0; off < rows * sb; off += 64) _mm_prefetch(s + off, _MM_HINT_T1);
#else
    (void)fmt; (void)W; (void)S; (void)K; (void)r0; (void)rows;
#endif
}

// y[n, o] = sum_i xq[n, i] * dequant(W)[o, i] for a weight in format fmt (see dsv4_fp4_linear).
int quant_linear(int fmt, const float* x, int64_t N, int64_t K, const void* W, const void* S, int64_t O, float* y,
                 int act_quant, int nthreads) {
    if (K % 32 || N < 0 || O < 0 || !known_format(fmt)) return -1;
    if (N == 0 || O == 0) return 0;
    try {
        const int nt = threads_for(nthreads, static_cast<double>(O) * K * bytes_per_weight(fmt) * ((N + 63) / 64));
        const int64_t Kp = padded(K);
        std::vector<float> xq;
        const float* xin = x;
        if (act_quant) {
            xq.resize(static_cast<size_t>(N * K));
            for (int64_t i = 0; i < N; ++i) fake_quant_row(x + i * K, K, 128, xq.data() + i * K);
            xin = xq.data();
        }
        const int parts = parts_needed(xin, N * K);
        Buf xb;
        XT* xp = aligned_new<XT>(static_cast<size_t>(N * parts * Kp));
        xb.p = xp;
        std::vector<const XT*> xs(N);
#pragma omp parallel for num_threads(nt) schedule(static) if (N * K >= (1 << 18))
        for (int64_t t = 0; t < N; ++t) prep_row(xin + t * K, K, parts, xp + t * parts * Kp);
        for (int64_t t = 0; t < N; ++t) xs[t] = xp + t * parts * Kp;
        // Row chunks: small enough to balance, large enough to stream; tokens in blocks of 64
        // so one chunk's rows stay in cache while the token blocks reuse them.
        const int64_t chunk = std::max<int64_t>(16, std::min<int64_t>(256, (O / (8 * nt)) / 16 * 16));
        const int64_t nchunks = (O + chunk - 1) / chunk;
        const int64_t TBLK = 64;
        struct Scratch { std::vector<float> ybuf; std::vector<float*> yp; Panel panel; };
        parallel_items(
            nt, nchunks,
            [&] {
                return Scratch{std::vector<float>(static_cast<size_t>(TBLK * chunk)), std::vector<float*>(TBLK),
                               Panel(N >= panel_min(fmt) ? Kp : 0)};
            },
            [&](int64_t ci, Scratch& sc) {
                const int64_t r0 = ci * chunk, r1 = std::min(O, r0 + chunk);
                for (int64_t t0 = 0; t0 < N; t0 += TBLK) {
                    const int T = static_cast<int>(std::min<int64_t>(TBLK, N - t0));
                    for (int t = 0; t < T; ++t) sc.yp[t] = sc.ybuf.data() + t * chunk;
                    rows_fmt(fmt, W, S, K, r0, r1, parts, xs.data() + t0, T, sc.yp.data(), &sc.panel);
                    for (int t = 0; t < T; ++t)
                        std::memcpy(y + (t0 + t) * O + r0, sc.yp[t], (r1 - r0) * sizeof(float));
                }
            },
            [&](int64_t ci) { prefetch_rows(fmt, W, S, K, ci * chunk, std::min<int64_t>(4, O - ci * chunk)); });
    } catch (const std::bad_alloc&) {
        return -3;
    }
    return 0;
}

}  // namespace

// ===================================================================================== C ABI

extern "C" {

const char* dsv4_fp4_isa(void) { return kIsa; }

// Whether the prefill GEMMs run on the AMX tile unit (amx_state in amx_tiles.h).
const char* dsv4_amx_state(void) { return amx_state(); }

int dsv4_max_threads(void) { return pick_threads(0); }

// formats.fake_quant_fp8(x, block) for x [n, d] float32 (bit-exact); out may alias x.
void dsv4_fake_quant_fp8(const float* x, int64_t n, int64_t d, int64_t block, float* out) {
    for (int64_t i = 0; i < n; ++i) fake_quant_row(x + i * d, d, block, out + i * d);
}

// y[n, o] = sum_i xq[n, i] * dequant(W)[o, i] with xq = fake_quant_fp8(x, 128) if act_quant.
// x [N, K] float32, W [O, K/2] packed e2m1, S [O, K/32] UE8M0, y [N, O] float32. K % 32 == 0.
int dsv4_fp4_linear(const float* x, int64_t N, int64_t K, const void* W, const void* S, int64_t O,
                    float* y, int act_quant, int nthreads) {
    return quant_linear(kFmtFp4, x, N, K, W, S, O, y, act_quant, nthreads);
}

// The same for the `dsv4 quantize` formats: bits = 3 (int3, W [O, K/32*12]) or 2 (int2, W [O, K/32*8]),
// S [O, K/32] bf16 scales (lowbit.h).
int dsv4_lowbit_linear(const float* x, int64_t N, int64_t K, const void* W, const void* S, int64_t O, float* y,
                       int act_quant, int nthreads, int bits) {
    if (bits != kFmtInt3 && bits != kFmtInt2) return -1;
    return quant_linear(bits, x, N, K, W, S, O, y, act_quant, nthreads);
}

// Routed experts of one MoE layer in one call (spec §2.8), out [N, D] float32 (overwritten):
//   out[t] = sum_{slot} w2_e( silu(min(w1_e x, L)) * clamp(w3_e x, -L, L) * rw[t, slot] ),
// e = idx[t, slot]; L <= 0: no clamp. act_quant: FP8 fake-quant (block 128) of x and of the hidden
// state before w2. round_bf16: mimic bf16 activations (the reference's x.dtype round trips: gate,
// up, hidden and each expert output rounded to bf16). Tokens are grouped by expert so each
// selected expert's weights are read once. w*/s*: int64 arrays [E] of data addresses
// (w1, w3: [I, D/2] + [I, D/32]; w2: [D, I/2] + [D, I/32]).
//
// Scheduling: one list of work items, claimed through an atomic counter: "up" items (expert,
// 128 hidden rows of w1 and w3 -> hidden state) and "down" items (expert, output rows of w2 ->
// per-pair outputs). A down item of expert e waits (yielding the CPU) until all up items of e are
// done; the list puts e's down items after the up items of the next expert, so that wait is
// almost never taken. There is no barrier: when a thread is preempted (a busy machine), the
// others keep taking items instead of waiting at a barrier for it. Per-pair outputs are summed
// into `out` at the end in the reference's order (expert id, then token/slot), so the result does
// not depend on the thread count.
// f1, f3, f2: formats of the w1, w3 and w2 projections (4 FP4, 3 int3, 2 int2; dsv4_quant_moe).
// Returns 0, -1 bad shapes, -2 expert id out of range, -3 out of memory.
int dsv4_quant_moe(const float* x, int64_t N, int64_t D, int64_t I, const int64_t* idx, const float* rw, int64_t k,
                   const int64_t* w1, const int64_t* s1, const int64_t* w3, const int64_t* s3, const int64_t* w2,
                   const int64_t* s2, int64_t E, float limit, int act_quant, int round_bf16, float* out,
                   int nthreads, int f1, int f3, int f2) {
    if (D % 32 || I % 32 || N < 0 || k < 0 || E < 0) return -1;
    if (!known_format(f1) || !known_format(f3) || !known_format(f2)) return -1;
    if (N == 0) return 0;
    std::memset(out, 0, static_cast<size_t>(N * D) * sizeof(float));
    if (k == 0) return 0;
    const int64_t P = N * k;
    for (int64_t p = 0; p < P; ++p)
        if (idx[p] < 0 || idx[p] >= E) return -2;
    try {
        // Group (token, slot) pairs by expert: ascending expert id, then pair order (= torch.where).
        std::vector<int64_t> start(E + 1, 0);
        for (int64_t p = 0; p < P; ++p) ++start[idx[p] + 1];
        for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
        std::vector<int64_t> pairs(P);
        {
            std::vector<int64_t> fill(start.begin(), start.end() - 1);
            for (int64_t p = 0; p < P; ++p) pairs[fill[idx[p]]++] = p;
        }
        std::vector<int64_t> used;
        int64_t max_pairs = 0;
        for (int64_t e = 0; e < E; ++e)
            if (start[e + 1] > start[e]) {
                used.push_back(e);
                max_pairs = std::max(max_pairs, start[e + 1] - start[e]);
            }
        const int64_t nused = static_cast<int64_t>(used.size());
        const double per_expert = I * D * (bytes_per_weight(f1) + bytes_per_weight(f3) + bytes_per_weight(f2));
        const int nt = threads_for(nthreads, static_cast<double>(nused) * per_expert);

        // Prepared activations (one row per token) and hidden states (one row per pair).
        std::vector<float> xq;
        const float* xin = x;
        if (act_quant) {
            xq.resize(static_cast<size_t>(N * D));
            dsv4_fake_quant_fp8(x, N, D, 128, xq.data());
            xin = xq.data();
        }
        const int xparts = parts_needed(xin, N * D);
#if DSV4_PATH_BF16
        const int hp = (act_quant || round_bf16) ? 1 : 3;  // hidden states exactly bf16, or split in 3
#else
        const int hp = 1;
#endif
        const int64_t Dp = padded(D), Ip = padded(I);
        Buf xb, hb, yb;
        XT* xp = aligned_new<XT>(static_cast<size_t>(N * xparts * Dp));
        xb.p = xp;
        XT* hbuf = aligned_new<XT>(static_cast<size_t>(P * hp * Ip));
        hb.p = hbuf;
        float* ybuf = aligned_new<float>(static_cast<size_t>(P * D));  // per-pair expert outputs
        yb.p = ybuf;
#pragma omp parallel for num_threads(nt) schedule(static) if (N * D >= (1 << 18))
        for (int64_t t = 0; t < N; ++t) prep_row(xin + t * D, D, xparts, xp + t * xparts * Dp);

        // Work list: up(e0), up(e1), down(e0), up(e2), down(e1), ..., down(e_last).
        const int64_t HC = 128;  // hidden rows per up item (one act-quant block)
        const int64_t nhc = (I + HC - 1) / HC;
        const int64_t OC = std::max<int64_t>(16, std::min<int64_t>(128, (D / (4 * nt)) / 16 * 16));
        const int64_t noc = (D + OC - 1) / OC;
        struct Item { int64_t ue, r0; bool down; };
        std::vector<Item> items;
        items.reserve(static_cast<size_t>(nused * (nhc + noc)));
        for (int64_t ui = 0; ui <= nused; ++ui) {
            if (ui < nused)
                for (int64_t c = 0; c < nhc; ++c) items.push_back({ui, c * HC, false});
            if (ui >= 1)
                for (int64_t c = 0; c < noc; ++c) items.push_back({ui - 1, c * OC, true});
        }
        const int64_t nitems = static_cast<int64_t>(items.size());
        std::unique_ptr<std::atomic<int64_t>[]> up_done(new std::atomic<int64_t>[nused]);
        for (int64_t ui = 0; ui < nused; ++ui) up_done[ui].store(0);
        struct Scratch {
            std::vector<float> g, u, hv;
            std::vector<const XT*> xs;
            std::vector<float*> gp, up, yp;
            Panel panel;
        };
        const size_t mp = static_cast<size_t>(max_pairs);
        parallel_items(
            nt, nitems,
            [&] {
                return Scratch{std::vector<float>(mp * HC), std::vector<float>(mp * HC),
                               std::vector<float>(static_cast<size_t>(std::max<int64_t>(HC, kChunk))),
                               std::vector<const XT*>(mp), std::vector<float*>(mp), std::vector<float*>(mp),
                               std::vector<float*>(mp),
                               Panel(max_pairs >= std::min({panel_min(f1), panel_min(f3), panel_min(f2)}) ? std::max(Dp, Ip) : 0)};
            },
            [&](int64_t it, Scratch& sc) {
                const Item item = items[it];
                const int64_t e = used[item.ue];
                const int64_t q0 = start[e], T = start[e + 1] - start[e];
                if (!item.down) {  // hidden rows [r0, r1) of expert e for all its pairs
                    const int64_t r0 = item.r0, r1 = std::min(I, r0 + HC), n = r1 - r0;
                    for (int64_t j = 0; j < T; ++j) {
                        sc.xs[j] = xp + (pairs[q0 + j] / k) * xparts * Dp;
                        sc.gp[j] = sc.g.data() + j * HC;
                        sc.up[j] = sc.u.data() + j * HC;
                    }
                    rows_fmt(f1, reinterpret_cast<const void*>(w1[e]), reinterpret_cast<const void*>(s1[e]), D,
                             r0, r1, xparts, sc.xs.data(), static_cast<int>(T), sc.gp.data(), &sc.panel);
                    rows_fmt(f3, reinterpret_cast<const void*>(w3[e]), reinterpret_cast<const void*>(s3[e]), D,
                             r0, r1, xparts, sc.xs.data(), static_cast<int>(T), sc.up.data(), &sc.panel);
                    float* hv = sc.hv.data();
                    for (int64_t j = 0; j < T; ++j) {
                        const float rwt = rw[pairs[q0 + j]];
                        for (int64_t i = 0; i < n; ++i) {
                            float gv = sc.gp[j][i], uv = sc.up[j][i];
                            if (round_bf16) { gv = bf16_round(gv); uv = bf16_round(uv); }
                            if (limit > 0) {
                                gv = std::min(gv, limit);
                                uv = std::min(limit, std::max(-limit, uv));
                            }
                            const float h = silu(gv) * uv * rwt;
                            hv[i] = round_bf16 ? bf16_round(h) : h;
                        }
                        if (act_quant) fake_quant_row(hv, n, 128, hv);
                        for (int64_t i = n; i < static_cast<int64_t>(sc.hv.size()); ++i) hv[i] = 0.0f;
                        XT* dst = hbuf + (q0 + j) * hp * Ip;
                        for (int64_t c = r0 / kChunk; c * kChunk < std::min(r0 + HC, Ip); ++c)
                            prep_chunk(hv + (c * kChunk - r0), hp, Ip, dst, c);
                    }
                    up_done[item.ue].fetch_add(1, std::memory_order_release);
                } else {  // output rows [o0, o1) of expert e for all its pairs
                    wait_for(up_done[item.ue], nhc);
                    const int64_t o0 = item.r0, o1 = std::min(D, o0 + OC);
                    for (int64_t j = 0; j < T; ++j) {
                        sc.yp[j] = ybuf + (q0 + j) * D + o0;
                        sc.xs[j] = hbuf + (q0 + j) * hp * Ip;
                    }
                    rows_fmt(f2, reinterpret_cast<const void*>(w2[e]), reinterpret_cast<const void*>(s2[e]), I,
                             o0, o1, hp, sc.xs.data(), static_cast<int>(T), sc.yp.data(), &sc.panel);
                }
            },
            [&](int64_t it) {
                const Item item = items[it];
                const int64_t e = used[item.ue];
                if (!item.down) {
                    const int64_t rows = std::min<int64_t>(4, I - item.r0);
                    prefetch_rows(f1, reinterpret_cast<const void*>(w1[e]), reinterpret_cast<const void*>(s1[e]), D,
                                  item.r0, rows);
                    prefetch_rows(f3, reinterpret_cast<const void*>(w3[e]), reinterpret_cast<const void*>(s3[e]), D,
                                  item.r0, rows);
                } else {
                    prefetch_rows(f2, reinterpret_cast<const void*>(w2[e]), reinterpret_cast<const void*>(s2[e]), I,
                                  item.r0, std::min<int64_t>(4, D - item.r0));
                }
            });

        // out[t] = sum of its pairs' outputs in expert order (index_add_ order of the reference).
        std::vector<int64_t> tstart(N + 1, 0), tlist(P);
        for (int64_t q = 0; q < P; ++q) ++tstart[pairs[q] / k + 1];
        for (int64_t t = 0; t < N; ++t) tstart[t + 1] += tstart[t];
        {
            std::vector<int64_t> fill(tstart.begin(), tstart.end() - 1);
            for (int64_t q = 0; q < P; ++q) tlist[fill[pairs[q] / k]++] = q;
        }
#pragma omp parallel for num_threads(nt) schedule(static) if (P * D >= (1 << 20))
        for (int64_t t = 0; t < N; ++t) {
            float* dst = out + t * D;
            for (int64_t a = tstart[t]; a < tstart[t + 1]; ++a) {
                const float* src = ybuf + tlist[a] * D;
                if (round_bf16) {
                    for (int64_t i = 0; i < D; ++i) dst[i] += bf16_round(src[i]);
                } else {
                    for (int64_t i = 0; i < D; ++i) dst[i] += src[i];
                }
            }
        }
    } catch (const std::bad_alloc&) {
        return -3;
    }
    return 0;
}

// The FP4-only entry point (all three projections e2m1 + UE8M0).
int dsv4_fp4_moe(const float* x, int64_t N, int64_t D, int64_t I, const int64_t* idx, const float* rw, int64_t k,
                 const int64_t* w1, const int64_t* s1, const int64_t* w3, const int64_t* s3, const int64_t* w2,
                 const int64_t* s2, int64_t E, float limit, int act_quant, int round_bf16, float* out,
                 int nthreads) {
    return dsv4_quant_moe(x, N, D, I, idx, rw, k, w1, s1, w3, s3, w2, s2, E, limit, act_quant, round_bf16, out,
                          nthreads, kFmtFp4, kFmtFp4, kFmtFp4);
}

}  // extern "C"
