// Register tiles of the AVX-512 BF16 path, shared by the FP8 (fp8_cpu.cpp), FP4 (fp4_cpu.cpp) and
// int3 / int2 (lowbit.h) kernels. XT (the prepared activation word) is uint16_t on this path.
//
// * gemv_tile_loop, chunk_dot_scaled / store_sums: the decode-on-the-fly GEMV tiles. A tile
//   decodes a 128-input chunk of R weight rows in registers, then every token's prepared words
//   meet it in vdpbf16ps and one FMA applies the rows' block scales to the partial sums.
//
// * gemm_tile / gemm_tokens: the prefill GEMM, many tokens against the same weight rows. A GEMV
//   tile re-decodes its weights for every few tokens and spends a sixth of its work on per-block
//   scale FMAs. Here the caller decodes kPanelRows rows once into a bf16 panel (L1) in the order of
//   its prepared activations, with the block scales folded into the words' exponents (exact when
//   every scale is a power of two whose sum with the value's exponent stays normal: FP8 and FP4,
//   checked by the callers), and gemm_tile runs vdpbf16ps straight from the panel: per 32 inputs,
//   4 weight + 6 token loads feed 24 dot products. (int3 / int2 scales are arbitrary bf16 values:
//   they cannot be folded, and a tile that applies them per block measured slower than their
//   on-the-fly tiles, which they keep.)
// Products of bf16 values are exact in fp32, so every tile equals the reference up to the order of
// the fp32 sums.

#pragma once

#include <type_traits>

#if DSV4_PATH_BF16

namespace {

// acc[r][t] += sc[r] * (v[r] . token t) over one 128-input chunk: v[r] holds row r's decoded
// chunk (4 vectors of 32 words), xs[t] + off the token's prepared words (`parts` copies, Kp apart).
// Parts > 0 fixes the number of copies at compile time (the loop over them unrolled away).
template <int R, int TB, int Parts = 0>
inline void chunk_dot_scaled(const __m512bh (&v)[R][4], const __m512 (&sc)[R], const uint16_t* const* xs,
                             int64_t off, int64_t Kp, int parts, __m512 (&acc)[R][TB]) {
    const int copies = Parts > 0 ? Parts : parts;
    for (int t = 0; t < TB; ++t) {
        __m512 p[R];
        for (int r = 0; r < R; ++r) p[r] = _mm512_setzero_ps();
        for (int q = 0; q < copies; ++q) {
            const uint16_t* xp = xs[t] + q * Kp + off;
            for (int i = 0; i < 4; ++i) {
                const __m512bh xv = (__m512bh)_mm512_loadu_si512(xp + 32 * i);
                for (int r = 0; r < R; ++r) p[r] = _mm512_dpbf16_ps(p[r], v[r][i], xv);
            }
        }
        for (int r = 0; r < R; ++r) acc[r][t] = _mm512_fmadd_ps(p[r], sc[r], acc[r][t]);
    }
}

// y[t][yoff + r * ys] = the sum of acc[r][t]'s lanes.
template <int R, int TB>
inline void store_sums(const __m512 (&acc)[R][TB], float* const* y, int64_t yoff, int64_t ys = 1) {
    for (int t = 0; t < TB; ++t)
        for (int r = 0; r < R; ++r) y[t][yoff + r * ys] = _mm512_reduce_add_ps(acc[r][t]);
}

// The loop of a decode-on-the-fly GEMV tile: R rows x TB tokens over K inputs, `chunk` inputs at a time.
// decode(c, full, v, sc) writes chunk c of the R rows (v[r]: 4 vectors of 32 words in the prepared order;
// sc[r]: the lanes' block scales); `full` is std::true_type for a whole chunk (plain loads) and
// std::false_type for the K tail (masked loads). The whole chunks have a loop of their own: with the
// tail test inside it, every chunk computed the tail's masks. Activations that are exactly bf16
// (parts == 1, the usual case) get a copy of the loop with the loop over copies unrolled away.
// (One token on Sapphire Rapids, FP4: +10% streaming from DRAM, +17% from L2.) Row r's sums go to
// y[t][yoff + r * ys].
template <int R, int TB, class Decode>
DSV4_ALWAYS_INLINE inline void gemv_tile_loop(int64_t K, int64_t chunk, int64_t Kp, int parts,
                                              const uint16_t* const* xs, float* const* y, int64_t yoff,
                                              Decode&& decode, int64_t ys = 1) {
    const auto run = [&](auto copies) DSV4_ALWAYS_INLINE {
        constexpr int kCopies = decltype(copies)::value;
        __m512 acc[R][TB];
        for (int r = 0; r < R; ++r)
            for (int t = 0; t < TB; ++t) acc[r][t] = _mm512_setzero_ps();
        __m512bh v[R][4];
        __m512 sc[R];
        const int64_t nfull = K / chunk;
        for (int64_t c = 0; c < nfull; ++c) {
            decode(c, std::true_type{}, v, sc);
            chunk_dot_scaled<R, TB, kCopies>(v, sc, xs, c * chunk, Kp, parts, acc);
        }
        if (nfull * chunk < K) {
            decode(nfull, std::false_type{}, v, sc);
            chunk_dot_scaled<R, TB, kCopies>(v, sc, xs, nfull * chunk, Kp, parts, acc);
        }
        store_sums<R, TB>(acc, y, yoff, ys);
    };
    if (parts == 1) {
        run(std::integral_constant<int, 1>{});
    } else {
        run(std::integral_constant<int, 0>{});
    }
}

constexpr int kPanelRows = 4;   // weight rows per panel
constexpr int kGemmTokens = 6;  // tokens per register tile of gemm_tile

// Sums of four vectors: lane i of the result = sum of a_i.
inline __m128 reduce4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
    const __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
    const __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
    const __m512 u = _mm512_add_ps(_mm512_shuffle_ps(t0, t1, _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm512_shuffle_ps(t0, t1, _MM_SHUFFLE(3, 2, 3, 2)));
    const __m128 lo = _mm_add_ps(_mm512_castps512_ps128(u), _mm512_extractf32x4_ps(u, 1));
    const __m128 hi = _mm_add_ps(_mm512_extractf32x4_ps(u, 2), _mm512_extractf32x4_ps(u, 3));
    return _mm_add_ps(lo, hi);
}

// y[t][yoff + r] = (or +=, for the later K blocks) the sum of acc[r][t].
template <int TB>
inline void store_tile(__m512 (&acc)[kPanelRows][TB], float* const* y, int64_t yoff, int rows, bool add) {
    for (int t = 0; t < TB; ++t) {
        alignas(16) float out[4];
        _mm_store_ps(out, reduce4(acc[0][t], acc[1][t], acc[2][t], acc[3][t]));
        for (int r = 0; r < rows; ++r) y[t][yoff + r] = add ? y[t][yoff + r] + out[r] : out[r];
    }
}

// kPanelRows weight rows (bf16, row pointers wr, scales folded in) x TB tokens over words
// [32 * s0, 32 * s1) of the rows: y[t][yoff + r] for r < rows (add: += for a later K block).
// Not inlined: inside a large caller GCC stops unrolling the register tile and spills the
// accumulators (measured: 2.3x slower); one call per tile and K block costs nothing.
template <int TB>
__attribute__((noinline)) void gemm_tile(const uint16_t* const* wr, int64_t s0, int64_t s1, int64_t Kp, int parts,
                      const uint16_t* const* xs, float* const* y, int64_t yoff, int rows, bool add) {
    __m512 acc[kPanelRows][TB];
    for (int r = 0; r < kPanelRows; ++r)
        for (int t = 0; t < TB; ++t) acc[r][t] = _mm512_setzero_ps();
    for (int64_t s = s0; s < s1; ++s) {
        __m512bh wv[kPanelRows];
        for (int r = 0; r < kPanelRows; ++r) wv[r] = (__m512bh)_mm512_loadu_si512(wr[r] + 32 * s);
        for (int q = 0; q < parts; ++q)
            for (int t = 0; t < TB; ++t) {
                const __m512bh xv = (__m512bh)_mm512_loadu_si512(xs[t] + q * Kp + 32 * s);
                for (int r = 0; r < kPanelRows; ++r) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], wv[r], xv);
            }
    }
    store_tile<TB>(acc, y, yoff, rows, add);
}

// Run `tile<TB>(first token)` over T tokens in tiles of at most kMax tokens (kMax <= 6).
template <int kMax, class Tile>
inline void over_tokens(int T, Tile tile) {
    int t = 0;
    for (; t + kMax <= T; t += kMax) tile(std::integral_constant<int, kMax>{}, t);
    switch (T - t) {
        case 5: if constexpr (kMax > 5) tile(std::integral_constant<int, 5>{}, t); break;
        case 4: if constexpr (kMax > 4) tile(std::integral_constant<int, 4>{}, t); break;
        case 3: if constexpr (kMax > 3) tile(std::integral_constant<int, 3>{}, t); break;
        case 2: if constexpr (kMax > 2) tile(std::integral_constant<int, 2>{}, t); break;
        case 1: tile(std::integral_constant<int, 1>{}, t); break;
        default: break;
    }
}

#ifndef GEMM_KBLK
#define GEMM_KBLK 1024  // words per K block (a multiple of 128); see gemm_k_blocks
#endif
constexpr int64_t kGemmKBlock = GEMM_KBLK;

// The K blocks of a panel GEMM over `chunks` 128-word chunks: calls block(c0, c1) in order. The
// callers run every panel of their rows over one K block before the next, so the block of all T
// tokens' activations (T x 2 KB) stays in L2 while each panel slice (4 x 2 KB) sits in L1.
template <class Block>
inline void gemm_k_blocks(int64_t chunks, Block block) {
    const int64_t per = std::max<int64_t>(1, kGemmKBlock / 128);
    for (int64_t c0 = 0; c0 < chunks; c0 += per) block(c0, std::min(chunks, c0 + per));
}

// Folded panel (wr) x T tokens over words [32 * s0, 32 * s1); add: accumulate into y.
inline void gemm_tokens(const uint16_t* const* wr, int64_t s0, int64_t s1, int64_t Kp, int parts,
                        const uint16_t* const* xs, int T, float* const* y, int64_t yoff, int rows, bool add) {
    over_tokens<kGemmTokens>(T, [&](auto tb, int t) {
        gemm_tile<decltype(tb)::value>(wr, s0, s1, Kp, parts, xs + t, y + t, yoff, rows, add);
    });
}

}  // namespace

#endif  // DSV4_PATH_BF16
