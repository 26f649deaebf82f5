// int3 / int2 weight tiles for the FP4 kernel file (fp4_cpu.cpp includes this after its code paths):
// the `dsv4 quantize` formats (quant_formats.py), decoded in registers like FP4, never to a matrix.
//
// Format, per row: K/32 blocks in input order, one signed bf16 scale per block (S [O, K/32] bf16).
//   int3 block = 12 bytes, a 96-bit little-endian integer: input i's code at bits 3i..3i+2.
//                Value = (code - 4) * scale.
//   int2 block =  8 bytes, a 64-bit little-endian integer: input i's code at bits 2i..2i+1.
//                Value = (code - 2) * scale.
// Every value (code - offset) is a small integer, exact in bf16, int8 and fp32, so the paths below
// reproduce the reference's products exactly (sums differ only in order, as for FP4).
//
// The tiles consume the activations in the FP4 path's prepared order (prep_chunk), so one
// prepared row feeds FP4, int3 and int2 weights alike (the fused MoE mixes them per projection):
//  * AVX-512 BF16: a 128-input chunk = 4 blocks. int3: one masked 48-byte load, vpermd puts block L in
//    128-bit lane L, vpshufb gives word 8L + k the two bytes holding the 12 bits of inputs 4k..4k+3
//    (odd k start at bit 4: shifted down once), so word j holds inputs 4j..4j+3 at 3-bit steps; per
//    v one shift + vpermw (a 32-entry table: bits 3..4 are don't-cares) yields the bf16 values. int2:
//    the 32 bytes zero-extended to words, one shift + vpermw per v. Word j at shift v = input 4j + v,
//    the FP4 order; vdpbf16ps lanes 4L..4L+3 belong to block L, which takes its scale with one FMA.
//  * AVX-512F / AVX2: 32-input blocks, even inputs then odd ones (the FP4 order): int3 codes come from
//    bytes gathered with pshufb and per-lane variable shifts, int2 codes from shifts (AVX-512F) or
//    byte blends (AVX2), then vpermps / pshufb lookups.
//  * scalar: a plain decode.
// Prefill on the AMX tile unit (LOWBIT_AMX_MIN tokens or more): the scales cannot be folded into the
// exponents as FP4's can, so each scaled value is written as two bf16 words hi + lo that sum to it
// exactly (lowbit_panel) and both panels go through TDPBF16PS against the same tokens.

#pragma once

namespace {

template <int B>
constexpr int64_t lb_block_bytes() { return B == 3 ? 12 : 8; }
template <int B>
constexpr int lb_offset() { return B == 3 ? 4 : 2; }

inline float bf16_value(uint16_t h) { return u2f(static_cast<uint32_t>(h) << 16); }

#if DSV4_PATH_BF16

struct LowbitTables {
    alignas(64) uint16_t i3[32];  // word table indexed by the low 5 bits: entry e = (e & 7) - 4
    alignas(64) uint16_t i2[32];  // entry e = (e & 3) - 2
    LowbitTables() {
        for (int e = 0; e < 32; ++e) {
            i3[e] = bf16_bits(static_cast<float>((e & 7) - 4));
            i2[e] = bf16_bits(static_cast<float>((e & 3) - 2));
        }
    }
};
const LowbitTables kLowbit;
constexpr __mmask32 kOddWords = 0xAAAAAAAAu;

// vpshufb control: word k of each 128-bit lane (one int3 block) = bytes floor(1.5k), floor(1.5k) + 1,
// which hold the 12 bits of inputs 4k..4k+3 (from bit 0 for even k, bit 4 for odd k).
alignas(64) const uint8_t kInt3WordCtrl[64] = {
    0, 1, 1, 2, 3, 4, 4, 5, 6, 7, 7, 8, 9, 10, 10, 11, 0, 1, 1, 2, 3, 4, 4, 5, 6, 7, 7, 8, 9, 10, 10, 11,
    0, 1, 1, 2, 3, 4, 4, 5, 6, 7, 7, 8, 9, 10, 10, 11, 0, 1, 1, 2, 3, 4, 4, 5, 6, 7, 7, 8, 9, 10, 10, 11};
// vpshufb control: dword i of 128-bit lane L = bf16 scale word L << 16 (scales broadcast to every lane).
alignas(64) const uint8_t kBf16ScaleCtrl[64] = {
    0x80, 0x80, 0, 1, 0x80, 0x80, 0, 1, 0x80, 0x80, 0, 1, 0x80, 0x80, 0, 1,
    0x80, 0x80, 2, 3, 0x80, 0x80, 2, 3, 0x80, 0x80, 2, 3, 0x80, 0x80, 2, 3,
    0x80, 0x80, 4, 5, 0x80, 0x80, 4, 5, 0x80, 0x80, 4, 5, 0x80, 0x80, 4, 5,
    0x80, 0x80, 6, 7, 0x80, 0x80, 6, 7, 0x80, 0x80, 6, 7, 0x80, 0x80, 6, 7};

inline __mmask64 lb_mask(int64_t n) { return n >= 64 ? ~0ull : ((1ull << n) - 1); }

// The codes of one 128-input chunk (`blocks` <= 4 blocks at p) as words: word j holds the codes of
// inputs 4j .. 4j + 3 at B-bit steps (the FP4 order: shift by B * v, then vpermw, gives input 4j + v).
template <int B>
inline __m512i lowbit_words(const uint8_t* p, int64_t blocks) {
    constexpr int64_t bb = lb_block_bytes<B>();
    if constexpr (B == 3) {
        const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 2, 3, 4, 5, 5, 6, 7, 8, 8, 9, 10, 11, 11);
        const __m512i raw = _mm512_maskz_loadu_epi8(lb_mask(blocks * bb), p);
        const __m512i bytes2 = _mm512_shuffle_epi8(_mm512_permutexvar_epi32(lanes, raw),
                                                   _mm512_load_si512(kInt3WordCtrl));
        return _mm512_mask_mov_epi16(bytes2, kOddWords, _mm512_srli_epi16(bytes2, 4));
    } else {
        return _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(static_cast<__mmask32>(lb_mask(blocks * bb)), p));
    }
}

// R rows x TB tokens over the whole K; w: first row's packed bytes, s: its bf16 scales.
template <int B, int R, int TB>
inline void lowbit_tile(const uint8_t* w, const uint16_t* s, int64_t K, int64_t Kp, int parts,
                        const XT* const* xs, float* const* y, int64_t yoff) {
    constexpr int64_t bb = lb_block_bytes<B>(), cb = 4 * bb;  // bytes per block / per 128-input chunk
    const int64_t rb = K / 32 * bb, sb = K / 32;
    const __m512i tbl = _mm512_load_si512(B == 3 ? kLowbit.i3 : kLowbit.i2);
    const __m512i sctrl = _mm512_load_si512(kBf16ScaleCtrl);
    gemv_tile_loop<R, TB>(K, kChunk, Kp, parts, xs, y, yoff, [&](int64_t c, auto full, __m512bh (&v)[R][4],
                                                                  __m512 (&sc)[R]) DSV4_ALWAYS_INLINE {
        constexpr bool kFull = decltype(full)::value;
        const int64_t blocks = kFull ? 4 : K / 32 - 4 * c;
        for (int r = 0; r < R; ++r) {
            const uint8_t* p = w + r * rb + cb * c;
            _mm_prefetch(reinterpret_cast<const char*>(p + R * rb), PF_HINT);
            if ((c & 7) == 0) _mm_prefetch(reinterpret_cast<const char*>(s + (R + r) * sb + 4 * c), PF_HINT);
            __m512i sr;
            if constexpr (kFull) {
                int64_t s8;
                std::memcpy(&s8, s + r * sb + 4 * c, 8);
                sr = _mm512_set1_epi64(s8);
            } else {
                const __m128i s4 = _mm_maskz_loadu_epi16(static_cast<__mmask8>((1u << blocks) - 1), s + r * sb + 4 * c);
                sr = _mm512_broadcastq_epi64(s4);
            }
            sc[r] = _mm512_castsi512_ps(_mm512_shuffle_epi8(sr, sctrl));
            const __m512i words = lowbit_words<B>(p, blocks);
            for (int q = 0; q < 4; ++q)
                v[r][q] = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(words, B * q), tbl);
        }
    });
}

#if DSV4_AMX
// Whether rows [r, r + rows) of a low-bit weight split exactly into hi + lo bf16 panels: every
// scale is zero or of magnitude in [2^-100, 2^100) (bf16 exponent field 27..226), so both parts
// stay normal (the tile unit reads denormals as zero).
inline bool lowbit_splittable(const uint16_t* S, int64_t K, int64_t r, int rows) {
    const int64_t n = rows * (K / 32);
    const uint16_t* s = S + r * (K / 32);
    const __m512i mag = _mm512_set1_epi16(0x7fff), lo = _mm512_set1_epi16(27 << 7),
                  hi = _mm512_set1_epi16(227 << 7);
    for (int64_t i = 0; i < n; i += 32) {
        const __mmask32 m = n - i >= 32 ? ~0u : (1u << (n - i)) - 1;
        const __m512i a = _mm512_and_si512(_mm512_maskz_loadu_epi16(m, s + i), mag);
        const __mmask32 zero = _mm512_cmpeq_epi16_mask(a, _mm512_setzero_si512());
        const __mmask32 in_range = _mm512_cmpge_epu16_mask(a, lo) & _mm512_cmplt_epu16_mask(a, hi);
        if ((m & ~(zero | in_range)) != 0) return false;
    }
    return true;
}

// fp32 lanes -> bf16 (nearest, ties to even) in the high half of each dword, low half zero
// (finite values only).
inline __m512i bf16_high(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    return _mm512_and_si512(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd)),
                            _mm512_set1_epi32(static_cast<int>(0xffff0000u)));
}

// Chunks [c0, c1) of rows r..r+3 of a low-bit weight -> the hi and lo panels ([4][stride] words each,
// the FP4 order): value * scale = hi + lo exactly (a 3-bit integer times a bf16 scale needs at most
// 10 significant bits: hi takes the nearest 8, lo the rest). The rows must be lowbit_splittable.
// Rows past `rows` are zero; so are the inputs past K (their scales load as zero).
template <int B>
inline void lowbit_panel(const uint8_t* W, const uint16_t* S, int64_t K, int64_t r, int rows, uint16_t* hi,
                         uint16_t* lo, int64_t stride, int64_t c0, int64_t c1, int64_t ahead) {
    constexpr int64_t bb = lb_block_bytes<B>(), cb = 4 * bb;
    const int64_t rb = K / 32 * bb, sb = K / 32;
    const __m512i tbl = _mm512_load_si512(B == 3 ? kLowbit.i3 : kLowbit.i2);
    const __m512i top = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
    // word j of each decoded vector holds input 4j + v: block j / 8 of the chunk
    const __m512i block_of_word = _mm512_set_epi16(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2,
                                                   1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    for (int i = 0; i < 4; ++i) {
        uint16_t* dh = hi + i * stride;
        uint16_t* dl = lo + i * stride;
        if (i >= rows) {
            std::memset(dh + kChunk * c0, 0, static_cast<size_t>(kChunk * (c1 - c0)) * 2);
            std::memset(dl + kChunk * c0, 0, static_cast<size_t>(kChunk * (c1 - c0)) * 2);
            continue;
        }
        const uint8_t* w = W + (r + i) * rb;
        const uint16_t* s = S + (r + i) * sb;
        for (int64_t c = c0; c < c1; ++c) {
            _mm_prefetch(reinterpret_cast<const char*>(w + ahead + cb * c), PF_HINT);
            const int64_t blocks = std::min<int64_t>(4, K / 32 - 4 * c);
            const __m128i s4 = _mm_maskz_loadu_epi16(static_cast<__mmask8>((1u << blocks) - 1), s + 4 * c);
            const __m512i sw = _mm512_permutexvar_epi16(block_of_word, _mm512_castsi128_si512(s4));
            const __m512 se = _mm512_castsi512_ps(_mm512_slli_epi32(sw, 16));
            const __m512 so = _mm512_castsi512_ps(_mm512_and_si512(sw, top));
            const __m512i words = lowbit_words<B>(w + cb * c, blocks);
            for (int q = 0; q < 4; ++q) {
                const __m512i v = _mm512_permutexvar_epi16(_mm512_srli_epi16(words, B * q), tbl);
                const __m512 pe = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), se);  // even words
                const __m512 po = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_and_si512(v, top)), so);  // odd words
                const __m512i he = bf16_high(pe), ho = bf16_high(po);
                const __m512i le = _mm512_castps_si512(_mm512_sub_ps(pe, _mm512_castsi512_ps(he)));
                const __m512i lo_o = _mm512_castps_si512(_mm512_sub_ps(po, _mm512_castsi512_ps(ho)));
                _mm512_storeu_si512(dh + kChunk * c + 32 * q, _mm512_or_si512(_mm512_srli_epi32(he, 16), ho));
                _mm512_storeu_si512(dl + kChunk * c + 32 * q,
                                    _mm512_or_si512(_mm512_srli_epi32(le, 16), _mm512_and_si512(lo_o, top)));
            }
        }
    }
}
#endif

#elif DSV4_PATH_AVX512 || DSV4_PATH_AVX2

// The 12 bytes of an int3 block (never reading past it).
inline __m128i int3_block(const uint8_t* p) {
    int32_t last;
    std::memcpy(&last, p + 8, 4);
    return _mm_insert_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)), last, 2);
}
// pshufb controls: word p (p = 0..7, then 8..15) = bytes 6p/8 and 6p/8 + 1 of an int3 block, whose bits
// from (6p % 8) on hold the codes of inputs 2p and 2p+1 (0x80: zero; input 31 ends in byte 11).
const __m128i kInt3PairLo = _mm_setr_epi8(0, 1, 0, 1, 1, 2, 2, 3, 3, 4, 3, 4, 4, 5, 5, 6);
const __m128i kInt3PairHi = _mm_setr_epi8(6, 7, 6, 7, 7, 8, 8, 9, 9, 10, 9, 10, 10, 11, 11, -128);

#endif

#if DSV4_PATH_AVX512

struct LowbitTables {
    alignas(64) float f3[16];  // entry e = (e & 7) - 4 (vpermps reads 4 index bits)
    alignas(64) float f2[16];  // entry e = (e & 3) - 2
    LowbitTables() {
        for (int e = 0; e < 16; ++e) {
            f3[e] = static_cast<float>((e & 7) - 4);
            f2[e] = static_cast<float>((e & 3) - 2);
        }
    }
};
const LowbitTables kLowbit;

template <int B, int R, int TB>
inline void lowbit_tile(const uint8_t* w, const uint16_t* s, int64_t K, int64_t Kp, int parts,
                        const XT* const* xs, float* const* y, int64_t yoff) {
    (void)Kp; (void)parts;
    constexpr int64_t bb = lb_block_bytes<B>();
    const int64_t rb = K / 32 * bb, sb = K / 32;
    const __m512 tbl = _mm512_load_ps(B == 3 ? kLowbit.f3 : kLowbit.f2);
    const __m128i dup = _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    const __m512i cnt_even = B == 3 ? _mm512_setr_epi32(0, 6, 4, 2, 0, 6, 4, 2, 0, 6, 4, 2, 0, 6, 4, 2)
                                    : _mm512_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
    const __m512i cnt_odd = _mm512_add_epi32(cnt_even, _mm512_set1_epi32(B == 3 ? 3 : 2));
    __m512 acc[R][TB];
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < TB; ++t) acc[r][t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < K / 32; ++b) {
        __m512 fe[R], fo[R], sc[R];
        for (int r = 0; r < R; ++r) {
            const uint8_t* p = w + r * rb + bb * b;
            if (((bb * b) & 63) < bb) _mm_prefetch(reinterpret_cast<const char*>(p + R * rb), _MM_HINT_T1);
            if ((b & 31) == 0) _mm_prefetch(reinterpret_cast<const char*>(s + (R + r) * sb + b), _MM_HINT_T1);
            __m512i d;
            if constexpr (B == 3) {  // dword p = the 16 bits from byte 6p/8: inputs 2p, 2p+1 at bit (6p % 8)
                const __m128i blk = int3_block(p);
                d = _mm512_cvtepu16_epi32(_mm256_set_m128i(_mm_shuffle_epi8(blk, kInt3PairHi),
                                                           _mm_shuffle_epi8(blk, kInt3PairLo)));
            } else {  // dword p = byte p/2: inputs 2p, 2p+1 at bit 4(p & 1)
                d = _mm512_cvtepu8_epi32(_mm_shuffle_epi8(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)), dup));
            }
            fe[r] = _mm512_permutexvar_ps(_mm512_srlv_epi32(d, cnt_even), tbl);
            fo[r] = _mm512_permutexvar_ps(_mm512_srlv_epi32(d, cnt_odd), tbl);
            sc[r] = _mm512_set1_ps(bf16_value(s[r * sb + b]));
        }
        for (int t = 0; t < TB; ++t) {
            const __m512 x0 = _mm512_loadu_ps(xs[t] + 32 * b), x1 = _mm512_loadu_ps(xs[t] + 32 * b + 16);
            for (int r = 0; r < R; ++r)
                acc[r][t] = _mm512_fmadd_ps(_mm512_fmadd_ps(fo[r], x1, _mm512_mul_ps(fe[r], x0)), sc[r], acc[r][t]);
        }
    }
    for (int t = 0; t < TB; ++t)
        for (int r = 0; r < R; ++r) y[t][yoff + r] = _mm512_reduce_add_ps(acc[r][t]);
}

#elif DSV4_PATH_AVX2

template <int B, int R, int TB>
inline void lowbit_tile(const uint8_t* w, const uint16_t* s, int64_t K, int64_t Kp, int parts,
                        const XT* const* xs, float* const* y, int64_t yoff) {
    (void)Kp; (void)parts;
    constexpr int64_t bb = lb_block_bytes<B>();
    const int64_t rb = K / 32 * bb, sb = K / 32;
    const __m128i lut2 = _mm_setr_epi8(-2, -1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m128i dup = _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    const __m128i odd = _mm_setr_epi8(0, -1, 0, -1, 0, -1, 0, -1, 0, -1, 0, -1, 0, -1, 0, -1);
    const __m128i m3 = _mm_set1_epi8(3);
    const __m256 tbl3 = _mm256_setr_ps(-4.0f, -3.0f, -2.0f, -1.0f, 0.0f, 1.0f, 2.0f, 3.0f);
    const __m256i cnt3 = _mm256_setr_epi32(0, 6, 4, 2, 0, 6, 4, 2);
    const __m256i cnt3_odd = _mm256_add_epi32(cnt3, _mm256_set1_epi32(3));
    __m256 acc[R][TB];
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < TB; ++t) acc[r][t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < K / 32; ++b) {
        __m256 f[R][4];
        __m256 sc[R];
        for (int r = 0; r < R; ++r) {
            const uint8_t* p = w + r * rb + bb * b;
            if (((bb * b) & 63) < bb) _mm_prefetch(reinterpret_cast<const char*>(p + R * rb), _MM_HINT_T1);
            if ((b & 31) == 0) _mm_prefetch(reinterpret_cast<const char*>(s + (R + r) * sb + b), _MM_HINT_T1);
            if constexpr (B == 3) {  // dword p = 16 bits from byte 6p/8; vpermps reads the low 3 index bits
                const __m128i blk = int3_block(p);
                const __m256i d0 = _mm256_cvtepu16_epi32(_mm_shuffle_epi8(blk, kInt3PairLo));  // p = 0..7
                const __m256i d1 = _mm256_cvtepu16_epi32(_mm_shuffle_epi8(blk, kInt3PairHi));  // p = 8..15
                f[r][0] = _mm256_permutevar8x32_ps(tbl3, _mm256_srlv_epi32(d0, cnt3));
                f[r][1] = _mm256_permutevar8x32_ps(tbl3, _mm256_srlv_epi32(d1, cnt3));
                f[r][2] = _mm256_permutevar8x32_ps(tbl3, _mm256_srlv_epi32(d0, cnt3_odd));
                f[r][3] = _mm256_permutevar8x32_ps(tbl3, _mm256_srlv_epi32(d1, cnt3_odd));
            } else {
                const __m128i d = _mm_shuffle_epi8(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)), dup);
                // even inputs 2p: byte p/2, bits 4(p&1); odd inputs 2p+1: bits 4(p&1) + 2
                const __m128i e = _mm_blendv_epi8(_mm_and_si128(d, m3), _mm_and_si128(_mm_srli_epi16(d, 4), m3), odd);
                const __m128i o = _mm_blendv_epi8(_mm_and_si128(_mm_srli_epi16(d, 2), m3),
                                                  _mm_and_si128(_mm_srli_epi16(d, 6), m3), odd);
                const __m128i ve = _mm_shuffle_epi8(lut2, e), vo = _mm_shuffle_epi8(lut2, o);
                f[r][0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(ve));
                f[r][1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(ve, 8)));
                f[r][2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(vo));
                f[r][3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(vo, 8)));
            }
            sc[r] = _mm256_set1_ps(bf16_value(s[r * sb + b]));
        }
        fma_block_avx2<R, TB>(f, sc, xs, b, acc);
    }
    store_sums_avx2<R, TB>(acc, y, yoff);
}

#elif DSV4_PATH_SCALAR

template <int B, int R, int TB>
inline void lowbit_tile(const uint8_t* w, const uint16_t* s, int64_t K, int64_t Kp, int parts,
                        const XT* const* xs, float* const* y, int64_t yoff) {
    (void)Kp; (void)parts;
    constexpr int64_t bb = lb_block_bytes<B>();
    const int64_t rb = K / 32 * bb, sb = K / 32;
    for (int r = 0; r < R; ++r) {
        float acc[TB] = {};
        for (int64_t b = 0; b < K / 32; ++b) {
            const uint8_t* p = w + r * rb + bb * b;
            float wv[32];
            for (int i = 0; i < 32; ++i) {
                const int bit = B * i;  // the code's bits: bit .. bit + B - 1 of the little-endian block
                const int two = p[bit >> 3] | ((bit >> 3) + 1 < bb ? p[(bit >> 3) + 1] << 8 : 0);
                const int code = (two >> (bit & 7)) & ((1 << B) - 1);
                wv[i] = static_cast<float>(code - lb_offset<B>());
            }
            const float sc = bf16_value(s[r * sb + b]);
            for (int t = 0; t < TB; ++t) {
                const float* xp = xs[t] + 32 * b;
                float pr = 0.0f;
                for (int i = 0; i < 32; ++i) pr += wv[i] * xp[i];
                acc[t] += pr * sc;
            }
        }
        for (int t = 0; t < TB; ++t) y[t][yoff + r] = acc[t];
    }
}
#endif

// Rows [r0, r1) of an int3 (B = 3) or int2 (B = 2) weight against T prepared tokens (as gemv_rows).
template <int B, int R>
void lowbit_rows_r(const uint8_t* W, const uint16_t* S, int64_t K, int64_t r, int parts, const XT* const* xs,
                   int T, float* const* y, int64_t yoff) {
    const uint8_t* w = W + r * (K / 32 * lb_block_bytes<B>());
    const uint16_t* s = S + r * (K / 32);
    int t = 0;
    for (; t + 4 <= T; t += 4) lowbit_tile<B, R, 4>(w, s, K, padded(K), parts, xs + t, y + t, yoff);
    switch (T - t) {
        case 3: lowbit_tile<B, R, 3>(w, s, K, padded(K), parts, xs + t, y + t, yoff); break;
        case 2: lowbit_tile<B, R, 2>(w, s, K, padded(K), parts, xs + t, y + t, yoff); break;
        case 1: lowbit_tile<B, R, 1>(w, s, K, padded(K), parts, xs + t, y + t, yoff); break;
        default: break;
    }
}

template <int B>
void lowbit_rows(const uint8_t* W, const uint16_t* S, int64_t K, int64_t r0, int64_t r1, int parts,
                 const XT* const* xs, int T, float* const* y) {
    int64_t r = r0;
#if DSV4_PATH_BF16
    if (T == 1) {
        for (; r + 4 <= r1; r += 4) lowbit_rows_r<B, 4>(W, S, K, r, parts, xs, T, y, r - r0);
    }
#endif
    for (; r + 2 <= r1; r += 2) lowbit_rows_r<B, 2>(W, S, K, r, parts, xs, T, y, r - r0);
    for (; r < r1; ++r) lowbit_rows_r<B, 1>(W, S, K, r, parts, xs, T, y, r - r0);
}

#if DSV4_AMX
// Rows [r0, r1) against T tokens on the AMX tile unit (amx_panel_rows): y[t][r - r0]. Each 32-row panel is
// decoded into hi and lo words (lowbit_panel) and both meet the same packed tokens; 4-row groups with
// scales that do not split take the on-the-fly tiles.
template <int B>
void lowbit_amx_rows(const uint8_t* W, const uint16_t* S, int64_t K, int64_t r0, int64_t r1, int parts,
                     const XT* const* xs, int T, float* const* y, Panel& panel) {
    const int64_t rb = K / 32 * lb_block_bytes<B>();
    amx_panel_rows<2>(
        padded(K), r0, r1, parts, xs, T, y, panel,
        [&](int64_t row, int n) { return lowbit_splittable(S, K, row, n); },
        [&](int64_t row, int n, uint16_t* hi, int64_t stride, int64_t c0, int64_t c1) {
            lowbit_panel<B>(W, S, K, row, n, hi, hi + kAmxRows * stride, stride, c0, c1, kAmxRows * rb);
        },
        [&](int64_t row, int64_t yoff) { lowbit_rows_r<B, 1>(W, S, K, row, parts, xs, T, y, yoff); });
}
#endif

}  // namespace
