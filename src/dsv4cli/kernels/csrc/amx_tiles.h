// The prefill GEMM on Intel AMX (Sapphire Rapids and later), shared by the FP4 (fp4_cpu.cpp) and
// FP8 (fp8_cpu.cpp) kernels: the same bf16 panels as the vdpbf16ps GEMM of bf16_tiles.h (weights
// decoded once, block scales folded into the exponents), multiplied by the tile unit.
//
// One TDPBF16PS multiplies a 16 x 32 bf16 tile A by a 32 x 16 tile B into a 16 x 16 fp32 tile C:
// 8192 products per instruction, against 32 per vdpbf16ps. Here
//   A = 16 weight rows x 32 words, loaded straight from the panel (row stride amx_stride(Kp)
//       words: one cache line more than the row, so that the 16 rows of a tile do not all fall
//       into one L1 set, as they would at a multiple of 4 KB);
//   B = 32 words x 16 tokens, in the VNNI layout the unit wants: row i holds the word pairs
//       (2i, 2i + 1) of the 16 tokens. amx_pack_tokens writes it once per call, by a 16 x 16
//       dword transpose of the prepared activations;
//   C = y[token][row], transposed on the way out.
// A 2 x 2 block of C tiles (32 rows x 32 tokens) is accumulated over the whole K, so each
// 32-word step loads 2 A + 2 B tiles for 4 multiplies. Products of bf16 values are exact in fp32
// and the unit adds them in fp32 (denormal inputs as zero, like vdpbf16ps: the callers' folds keep
// every weight normal), so the result equals the reference up to the order of the fp32 sums.
//
// Linux hands out the tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM, once per
// process); where the kernel refuses, amx_state() says so and the callers keep the vdpbf16ps GEMM.

#pragma once

#if DSV4_PATH_BF16 && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#define DSV4_AMX 1

#include <sys/syscall.h>
#include <unistd.h>

#include <vector>

namespace {

constexpr int kAmxRows = 32;    // weight rows per panel: two A tiles
constexpr int kAmxTokens = 16;  // tokens per B tile

// Words between panel rows for rows of Kp words.
inline int64_t amx_stride(int64_t Kp) { return Kp + 32; }

// Whether the tile unit is ours: asked once per process (the grant covers every thread).
inline bool amx_ready() {
    static const bool granted = [] {
        constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
        return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
    }();
    return granted;
}
// Palette 1, eight 16-row x 64-byte tiles: C 0..3, A 4..5, B 6..7.
inline void amx_configure() {
    struct alignas(64) Config {
        uint8_t palette, start_row, reserved[14];
        uint16_t colsb[16];
        uint8_t rows[16];
    } cfg{};
    cfg.palette = 1;
    for (int i = 0; i < 8; ++i) {
        cfg.colsb[i] = 64;
        cfg.rows[i] = 16;
    }
    _tile_loadconfig(&cfg);
}

// In place: r[e] becomes dword e of the 16 inputs (r[n].dword[e] -> out[e].dword[n]).
inline void transpose16x16(__m512i (&r)[16]) {
    __m512i t[16];
    for (int i = 0; i < 8; ++i) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; ++i) {  // lane L of r[4i + j]: dword 4L + j of rows 4i .. 4i + 3
        r[4 * i + 0] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    __m512i u[4], v[4], u2[4], v2[4];
    for (int j = 0; j < 4; ++j) {
        u[j] = _mm512_shuffle_i32x4(r[j], r[4 + j], 0x88);        // lanes 0, 2 of rows 0-3, 4-7
        v[j] = _mm512_shuffle_i32x4(r[j], r[4 + j], 0xdd);        // lanes 1, 3
        u2[j] = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0x88);  // the same of rows 8-11, 12-15
        v2[j] = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0xdd);
    }
    for (int j = 0; j < 4; ++j) {
        r[j] = _mm512_shuffle_i32x4(u[j], u2[j], 0x88);
        r[8 + j] = _mm512_shuffle_i32x4(u[j], u2[j], 0xdd);
        r[4 + j] = _mm512_shuffle_i32x4(v[j], v2[j], 0x88);
        r[12 + j] = _mm512_shuffle_i32x4(v[j], v2[j], 0xdd);
    }
}

// The B tiles of T tokens (prepared rows xs[t]: `parts` copies of Kp words), steps = Kp / 32:
// tile (block b of 16 tokens, part q, step s) = 512 words at out + ((b * parts + q) * steps + s) * 512,
// row i = word pairs (32s + 2i, 32s + 2i + 1) of the block's tokens; tokens past T are zero.
inline void amx_pack_tokens(const uint16_t* const* xs, int T, int64_t Kp, int parts, uint16_t* out) {
    const int64_t steps = Kp / 32;
    const int blocks = (T + kAmxTokens - 1) / kAmxTokens;
    for (int b = 0; b < blocks; ++b)
        for (int q = 0; q < parts; ++q)
            for (int64_t s = 0; s < steps; ++s) {
                __m512i r[16];
                for (int n = 0; n < 16; ++n) {
                    const int t = b * kAmxTokens + n;
                    r[n] = t < T ? _mm512_loadu_si512(xs[t] + q * Kp + 32 * s) : _mm512_setzero_si512();
                }
                transpose16x16(r);
                uint16_t* dst = out + ((static_cast<int64_t>(b) * parts + q) * steps + s) * 512;
                for (int i = 0; i < 16; ++i) _mm512_storeu_si512(dst + 32 * i, r[i]);
            }
}

// The packed B tiles of one call's tokens, kept while the same token list comes back (the w1 and
// w3 projections of an MoE item, the row chunks of a dense linear).
struct AmxTokens {
    std::vector<const uint16_t*> key;
    int64_t Kp = 0;
    int parts = 0;
    std::vector<uint16_t> words;  // tile loads and the packing need no alignment

    // The packed tiles of these tokens (packed now unless they are the last ones packed).
    const uint16_t* pack(const uint16_t* const* xs, int T, int64_t kp, int np) {
        if (kp == Kp && np == parts && key.size() == static_cast<size_t>(T) && std::equal(key.begin(), key.end(), xs))
            return words.data();
        const size_t need = static_cast<size_t>((T + kAmxTokens - 1) / kAmxTokens) * kAmxTokens * np * kp;
        if (words.size() < need) words.resize(need);
        amx_pack_tokens(xs, T, kp, np, words.data());
        key.assign(xs, xs + T);
        Kp = kp;
        parts = np;
        return words.data();
    }
};

// C tile (16 rows x 16 tokens, fp32) -> y[t][yoff + r] for r < rows, t < T.
inline void amx_store(const float* c, float* const* y, int64_t yoff, int rows, int T) {
    for (int t = 0; t < T; ++t)
        for (int r = 0; r < rows; ++r) y[t][yoff + r] = c[16 * r + t];
}

#ifndef AMX_KBLK
#define AMX_KBLK 256  // words per K block of the streamed panel (a multiple of 128)
#endif
constexpr int64_t kAmxChunks = AMX_KBLK / 128;

// NA A tiles (16 rows each) x NB B tiles (16 tokens each) over all steps and parts. WP weight
// parts: the panel holds WP stacked panels of kAmxRows rows whose sum is the weight (hi + lo words
// of the int3 / int2 weights, whose scaled values need 10 significant bits), each multiplied by
// the same B tiles. Before the steps of each K block [c0, c1) (in 128-word chunks) it calls
// decode(c0, c1), which fills those words of the panel: they are read back from L1.
template <int NA, int NB, int WP, class Decode>
inline void amx_block(const uint16_t* panel, int64_t Kp, int parts, const uint16_t* b0, const uint16_t* b1,
                      float* const* y, int64_t yoff, int rows, int T, Decode&& decode) {
    const int64_t stride = amx_stride(Kp), steps = Kp / 32;
    _tile_zero(0);
    if constexpr (NB == 2) _tile_zero(1);
    if constexpr (NA == 2) _tile_zero(2);
    if constexpr (NA == 2 && NB == 2) _tile_zero(3);
    for (int64_t c0 = 0; c0 < Kp / 128; c0 += kAmxChunks) {
        const int64_t c1 = std::min(Kp / 128, c0 + kAmxChunks);
        decode(c0, c1);
        for (int64_t s = 4 * c0; s < 4 * c1; ++s)
            for (int q = 0; q < parts; ++q) {
                const int64_t off = (q * steps + s) * 512;
                _tile_loadd(6, b0 + off, 64);
                if constexpr (NB == 2) _tile_loadd(7, b1 + off, 64);
                for (int wp = 0; wp < WP; ++wp) {
                    const uint16_t* a = panel + wp * kAmxRows * stride + 32 * s;
                    _tile_loadd(4, a, 2 * stride);
                    _tile_dpbf16ps(0, 4, 6);
                    if constexpr (NB == 2) _tile_dpbf16ps(1, 4, 7);
                    if constexpr (NA == 2) {
                        _tile_loadd(5, a + 16 * stride, 2 * stride);
                        _tile_dpbf16ps(2, 5, 6);
                        if constexpr (NB == 2) _tile_dpbf16ps(3, 5, 7);
                    }
                }
            }
    }
    alignas(64) float c[256];
    const int r0 = std::min(rows, 16), t0 = std::min(T, 16);
    _tile_stored(0, c, 64);
    amx_store(c, y, yoff, r0, t0);
    if constexpr (NB == 2) {
        _tile_stored(1, c, 64);
        amx_store(c, y + 16, yoff, r0, T - 16);
    }
    if constexpr (NA == 2) {
        _tile_stored(2, c, 64);
        amx_store(c, y, yoff + 16, rows - 16, t0);
    }
    if constexpr (NA == 2 && NB == 2) {
        _tile_stored(3, c, 64);
        amx_store(c, y + 16, yoff + 16, rows - 16, T - 16);
    }
}

// Panel (WP stacked panels of rows <= 32 weight rows, bf16, row stride amx_stride(Kp); rows past
// `rows` zero) x the packed tokens (T of them, `parts` parts) over the whole K: y[t][yoff + r] =
// the dot products. decode(c0, c1) fills chunks [c0, c1) of the panel: for up to 32 tokens (one
// 2 x 2 block of C tiles: an MoE expert's share of a prompt) block by block, each read back from
// L1 at once; for more, all of it first, then every block of 32 tokens reads it from L2.
// The caller has configured the tiles (amx_configure).
template <int WP = 1, class Decode>
inline void amx_gemm_panel(const uint16_t* panel, int64_t Kp, int rows, const uint16_t* packed, int parts, int T,
                           float* const* y, int64_t yoff, Decode&& decode) {
    const int64_t block = parts * (Kp / 32) * 512;  // words of one token block's B tiles
    const auto none = [](int64_t, int64_t) {};
    if (T > 2 * kAmxTokens) decode(0, Kp / 128);
    for (int t = 0; t < T; t += 2 * kAmxTokens) {
        const uint16_t* b0 = packed + (t / kAmxTokens) * block;
        const int n = std::min(2 * kAmxTokens, T - t);
        float* const* yt = y + t;
        const auto run = [&](auto&& fill) {
            if (rows > 16) {
                if (n > 16) amx_block<2, 2, WP>(panel, Kp, parts, b0, b0 + block, yt, yoff, rows, n, fill);
                else amx_block<2, 1, WP>(panel, Kp, parts, b0, nullptr, yt, yoff, rows, n, fill);
            } else {
                if (n > 16) amx_block<1, 2, WP>(panel, Kp, parts, b0, b0 + block, yt, yoff, rows, n, fill);
                else amx_block<1, 1, WP>(panel, Kp, parts, b0, nullptr, yt, yoff, rows, n, fill);
            }
        };
        if (T > 2 * kAmxTokens) run(none);
        else run(decode);
    }
}

}  // namespace

#endif  // DSV4_AMX

namespace {
// "amx": prefill GEMMs run on the tile unit; "denied": built for it, refused by the OS;
// "off": not built for it (no AMX on this CPU or compiler).
inline const char* amx_state() {
#if DSV4_AMX
    return amx_ready() ? "amx" : "denied";
#else
    return "off";
#endif
}

// Scratch of the panel GEMMs of fp4_cpu.cpp and fp8_cpu.cpp (one per thread): kPanelRows rows of
// Kp words for the vdpbf16ps GEMM, or kAmxRows rows and the packed tokens on the tile unit.
struct Panel {
    std::unique_ptr<uint16_t[]> w;
#if DSV4_AMX
    AmxTokens tokens;
#endif
    Panel() = default;
    explicit Panel(int64_t Kp) {  // Kp = 0: no panel (the on-the-fly tiles only)
#if DSV4_AMX
        // two stacked panels on the tile unit (the hi and lo words of int3 / int2 weights)
        const int64_t words = amx_ready() ? 2 * kAmxRows * amx_stride(Kp) : kPanelRows * Kp;
#elif DSV4_PATH_BF16
        const int64_t words = kPanelRows * Kp;
#endif
#if DSV4_PATH_BF16
        if (Kp > 0) w.reset(new uint16_t[static_cast<size_t>(words)]);
#else
        (void)Kp;
#endif
    }
};

// Tokens per weight row from which rows take a panel GEMM: `amx` on the tile unit, `other` elsewhere.
inline int panel_threshold(int amx, int other) {
#if DSV4_AMX
    if (amx_ready()) return amx;
#else
    (void)amx;
#endif
    return other;
}

#if DSV4_AMX
// The panel GEMM of every format on the tile unit: rows [r0, r1) of a weight, kAmxRows at a time, against
// T tokens (prepared rows xs: `parts` copies of Kp words): y[t][r - r0]. For each 4-row group of a panel,
// exact(row, n) says whether its scales fold (or split) exactly into bf16 words; such a group is written
// into the WP stacked panels by decode(row, n, dst, stride, c0, c1) (chunks [c0, c1); dst: the group's
// first row in the first panel, the next panel kAmxRows * stride words on). The other groups are zero in
// the panel and afterwards take one_row(row, yoff) each: the on-the-fly tiles, exact for any scale.
template <int WP, class Exact, class Decode, class OneRow>
void amx_panel_rows(int64_t Kp, int64_t r0, int64_t r1, int parts, const uint16_t* const* xs, int T,
                    float* const* y, Panel& scratch, Exact exact, Decode decode, OneRow one_row) {
    const uint16_t* packed = scratch.tokens.pack(xs, T, Kp, parts);
    uint16_t* panel = scratch.w.get();
    const int64_t stride = amx_stride(Kp);
    constexpr int kGroups = kAmxRows / kPanelRows;
    amx_configure();
    for (int64_t r = r0; r < r1; r += kAmxRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kAmxRows, r1 - r));
        unsigned decoded = 0, fallback = 0;  // bit g: group g (rows 4g .. 4g + 3) is / is not in the panel
        for (int g = 0; g < kGroups; ++g) {
            const int first = g * kPanelRows, n = std::max(0, std::min(kPanelRows, rows - first));
            if (n > 0 && exact(r + first, n)) {
                decoded |= 1u << g;
                continue;
            }
            for (int p = 0; p < WP; ++p)
                std::memset(panel + (p * kAmxRows + first) * stride, 0, static_cast<size_t>(kPanelRows * stride) * 2);
            if (n > 0) fallback |= 1u << g;
        }
        amx_gemm_panel<WP>(panel, Kp, rows, packed, parts, T, y, r - r0, [&](int64_t c0, int64_t c1) {
            for (int g = 0; g < kGroups; ++g)
                if (decoded & (1u << g))
                    decode(r + g * kPanelRows, std::min(kPanelRows, rows - g * kPanelRows),
                           panel + g * kPanelRows * stride, stride, c0, c1);
        });
        for (int g = 0; g < kGroups; ++g)
            if (fallback & (1u << g))
                for (int i = g * kPanelRows; i < std::min(rows, (g + 1) * kPanelRows); ++i) one_row(r + i, r - r0 + i);
    }
    _tile_release();
}
#endif

}  // namespace
