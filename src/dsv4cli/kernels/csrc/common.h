// Helpers shared by the native CPU kernels (fp4_cpu.cpp, fp8_cpu.cpp): scalar number-format
// helpers (bf16 rounding, the FP8 activation fake-quant), aligned scratch buffers and the
// thread scheduling (parallel_items). Everything is in an anonymous namespace: each translation
// unit gets its own copy, and only the extern "C" entry points are exported.

#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <thread>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#include <immintrin.h>
#endif

// The one ISA ladder of every kernel file: the best level the compiler targets (-march=native), so
// that on one CPU the FP4, FP8 and int3/int2 kernels always run the same level.
//   DSV4_PATH_BF16    AVX-512 F/BW/VL/VBMI + BF16 dot products (Zen 4, Sapphire Rapids)
//   DSV4_PATH_AVX512  AVX-512 F with AVX2/FMA/F16C, fp32 maths (Skylake-X .. Ice Lake)
//   DSV4_PATH_AVX2    AVX2 + FMA + F16C (Haswell .. Zen 3)
//   DSV4_PATH_SCALAR  everything else
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512BF16__) && \
    defined(__AVX512VBMI__)
#define DSV4_PATH_BF16 1
#define DSV4_ISA "avx512bf16"
#elif defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define DSV4_PATH_AVX512 1
#define DSV4_ISA "avx512f"
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define DSV4_PATH_AVX2 1
#define DSV4_ISA "avx2"
#else
#define DSV4_PATH_SCALAR 1
#define DSV4_ISA "scalar"
#endif

// Forces the inlining of the small lambdas the tiles hand to a shared loop (gemv_tile_loop): left as
// calls, their register arrays would go through memory.
#define DSV4_ALWAYS_INLINE __attribute__((always_inline))

namespace {

// ------------------------------------------------------------------------------- scalar helpers

inline uint32_t f2u(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float u2f(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

// UE8M0 byte -> float (2^(b-127)); byte 0 is the subnormal 2^-127, 255 is +inf like torch.exp2(128).
inline float ue8m0(uint8_t b) {
    if (b == 0) return u2f(0x00400000u);
    return u2f(static_cast<uint32_t>(b) << 23);
}

// Round to bfloat16 (nearest, ties to even); NaN stays NaN.
inline uint16_t bf16_bits(float f) {
    uint32_t u = f2u(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
}
inline float bf16_round(float f) { return u2f(static_cast<uint32_t>(bf16_bits(f)) << 16); }

// Element i of a float32 or bf16 array (`bf16` says which), as float; and storing one (bf16: rounded to nearest even).
inline float value_at(const void* p, int64_t i, bool bf16) {
    if (bf16) return u2f(static_cast<uint32_t>(static_cast<const uint16_t*>(p)[i]) << 16);
    return static_cast<const float*>(p)[i];
}

inline void store_at(void* p, int64_t i, float v, bool bf16) {
    if (bf16) {
        static_cast<uint16_t*>(p)[i] = bf16_bits(v);
    } else {
        static_cast<float*>(p)[i] = v;
    }
}

#if DSV4_PATH_BF16
// The prepared activations of the bf16 paths: 128 floats, each as `parts` bf16 words whose sum
// approximates it ever closer (each part rounds what the earlier ones left; 3 parts are exact).
// words[q][i] holds part q of inputs 32i..32i+31 in input order (vcvtne2ps2bf16 rounds to nearest
// even like bf16_bits; the bf16 dot products that consume the words treat subnormals as zero).
inline void bf16_parts128(const float* v, int parts, __m512i (&words)[3][4]) {
    __m512 r[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm512_loadu_ps(v + 16 * i);
    for (int q = 0; q < parts; ++q)
        for (int i = 0; i < 4; ++i) {
            const __m512i w = (__m512i)_mm512_cvtne2ps_pbh(r[2 * i + 1], r[2 * i]);
            words[q][i] = w;
            if (q + 1 < parts) {  // what this part left, for the next one
                const __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(w)), 16));
                const __m512 hi = _mm512_castsi512_ps(
                    _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(w, 1)), 16));
                r[2 * i] = _mm512_sub_ps(r[2 * i], lo);
                r[2 * i + 1] = _mm512_sub_ps(r[2 * i + 1], hi);
            }
        }
}
#endif

// float -> float8_e4m3fn -> float, round to nearest even, for |v| <= 448 (the caller clamps).
inline float e4m3_round(float v) {
    const float a = std::fabs(v);
    float r;
    if (a < 0.015625f) {  // below the smallest normal 2^-6: fixed step 2^-9
        const float magic = 16384.0f;  // 2^14: adding it rounds to a multiple of 2^-9 (RNE)
        volatile float t = a + magic;  // volatile: keep the rounding add/sub pair as written
        r = t - magic;
    } else {
        uint32_t u = f2u(a);
        u += 0x7ffffu + ((u >> 20) & 1u);  // keep 3 mantissa bits, ties to even
        u &= 0xfff00000u;
        r = u2f(u);
    }
    return std::copysign(r, v);
}

// Power-of-two scale of formats.pow2_scale(amax, 448, floor=1e-4): 2^ceil(log2(max(amax,1e-4)/448)),
// with the ceil taken exactly from the float's bits (the reference's fast_log2_ceil).
inline float fp8_block_scale(float amax) {
    float a = amax < 1e-4f ? 1e-4f : amax;
    if (!(a == a)) a = 1e-4f;  // NaN-free guard; torch would propagate NaN
    int e = 0;
    const float m = std::frexp(a / 448.0f, &e);  // a / 448 = m * 2^e, m in [0.5, 1)
    int c = e - (m == 0.5f ? 1 : 0);
    if (c < -127) c = -127;
    return std::ldexp(1.0f, c);
}

#if defined(__AVX512F__)
// e4m3_round of 16 values (|v| <= 448), bit for bit.
inline __m512 e4m3_round16(__m512 v) {
    const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
    const __m512 a = _mm512_castsi512_ps(_mm512_andnot_si512(sign, _mm512_castps_si512(v)));
    const __m512 magic = _mm512_set1_ps(16384.0f);
    const __m512 sub = _mm512_sub_ps(_mm512_add_ps(a, magic), magic);  // multiples of 2^-9 (RNE)
    __m512i u = _mm512_castps_si512(a);
    u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7ffff),
                                             _mm512_and_si512(_mm512_srli_epi32(u, 20), _mm512_set1_epi32(1))));
    u = _mm512_and_si512(u, _mm512_set1_epi32(static_cast<int>(0xfff00000u)));
    const __mmask16 small = _mm512_cmp_ps_mask(a, _mm512_set1_ps(0.015625f), _CMP_LT_OQ);
    const __m512 r = _mm512_mask_blend_ps(small, _mm512_castsi512_ps(u), sub);
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(r), _mm512_and_si512(_mm512_castps_si512(v), sign)));
}

inline __mmask16 mask16(int64_t n) { return n >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << n) - 1); }
#endif

// formats.fake_quant_fp8 on one row of n values, blocks of `block`, in place allowed.
inline void fake_quant_row(const float* x, int64_t n, int64_t block, float* out) {
#if defined(__AVX512F__)
    if (block % 16 == 0) {
        for (int64_t b0 = 0; b0 < n; b0 += block) {
            const int64_t len = std::min(n, b0 + block) - b0;
            __m512 amax = _mm512_setzero_ps();
            for (int64_t i = 0; i < len; i += 16)
                amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_maskz_loadu_ps(mask16(len - i), x + b0 + i)));
            const float s = fp8_block_scale(_mm512_reduce_max_ps(amax));
            const __m512 vs = _mm512_set1_ps(s), lim = _mm512_set1_ps(448.0f);
            for (int64_t i = 0; i < len; i += 16) {
                const __mmask16 m = mask16(len - i);
                __m512 q = _mm512_div_ps(_mm512_maskz_loadu_ps(m, x + b0 + i), vs);
                q = _mm512_min_ps(lim, _mm512_max_ps(_mm512_sub_ps(_mm512_setzero_ps(), lim), q));
                _mm512_mask_storeu_ps(out + b0 + i, m, _mm512_mul_ps(e4m3_round16(q), vs));
            }
        }
        return;
    }
#endif
    for (int64_t b0 = 0; b0 < n; b0 += block) {
        const int64_t b1 = std::min(n, b0 + block);
        float amax = 0.0f;
        for (int64_t i = b0; i < b1; ++i) amax = std::max(amax, std::fabs(x[i]));
        const float s = fp8_block_scale(amax);
        for (int64_t i = b0; i < b1; ++i) {
            float q = x[i] / s;
            q = std::min(448.0f, std::max(-448.0f, q));
            out[i] = e4m3_round(q) * s;
        }
    }
}

// Wait until `c` reaches `target`: spin briefly, then give the CPU away (the thread we wait for
// may be waiting for this very core on a busy machine).
inline void wait_for(const std::atomic<int64_t>& c, int64_t target) {
    for (int spins = 0; c.load(std::memory_order_acquire) < target; ++spins) {
        if (spins < 2000) {
#if defined(__x86_64__) || defined(__i386__)
            _mm_pause();
#endif
        } else {
            std::this_thread::yield();
        }
    }
}

template <class T>
T* aligned_new(size_t n) {
    size_t bytes = (n * sizeof(T) + 63) / 64 * 64;
    if (bytes == 0) bytes = 64;
    void* p = std::aligned_alloc(64, bytes);
    if (!p) throw std::bad_alloc();
    return static_cast<T*>(p);
}

struct Buf {
    void* p = nullptr;
    ~Buf() { std::free(p); }
};

inline int64_t team_size() {
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}

inline int pick_threads(int nthreads) {
#ifdef _OPENMP
    return nthreads > 0 ? nthreads : omp_get_max_threads();
#else
    (void)nthreads;
    return 1;
#endif
}

// Threads worth waking for a call that streams `bytes` of weights: at least 512 KB each. Every
// thread of an OpenMP team must reach the end of the region, and waking one costs microseconds
// (milliseconds when the machine is busy), so small calls stay on fewer threads.
inline int threads_for(int nthreads, double bytes) {
    const double per = 512.0 * 1024.0;
    const int most = static_cast<int>(std::min(1e6, std::max(1.0, bytes / per)));
    return std::max(1, std::min(pick_threads(nthreads), most));
}

// Run work(item, scratch) for every item in [0, n) on nt threads (scratch = make(), one per
// thread). Items are claimed through an atomic counter and the team joins on a yielding wait,
// not on OpenMP's spinning barrier: on a busy machine a preempted thread then costs its own
// item only, instead of milliseconds of spinning on the core it is queued for.
// Each thread claims its next item before working on the current one and calls ahead(next) so
// the start of the next item's weights can be prefetched (a fresh item would otherwise begin with
// a full DRAM round trip per row).
template <class Make, class Work, class Ahead>
void parallel_items(int nt, int64_t n, Make make, Work work, Ahead ahead) {
    std::atomic<int64_t> next{0}, finished{0};
#pragma omp parallel num_threads(nt)
    {
        auto scratch = make();
        int64_t it = next.fetch_add(1);
        while (it < n) {
            const int64_t nx = next.fetch_add(1);
            if (nx < n) ahead(nx);
            work(it, scratch);
            it = nx;
        }
        finished.fetch_add(1, std::memory_order_acq_rel);
        wait_for(finished, team_size());
    }
}

}  // namespace
