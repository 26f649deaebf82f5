// How fast one core reads memory, by access pattern: the roofline of a 1-token decode kernel.
//
//   g++ -O2 -march=native benchmarks/read_streams.cpp -o /tmp/read_streams && taskset -c 0 /tmp/read_streams
//
// A decode GEMV reads each weight byte once. One core's read rate depends on how many sequential
// streams it has in flight (each stream gets its own hardware prefetch), so this measures
//   * S streams: S equal parts of a 512 MiB buffer read side by side, 128 bytes of each in turn;
//   * 4-row tiles, as the GEMV tiles read weights: rows of `row` bytes, 128 bytes of each of 4 rows
//     in turn, the 4 rows adjacent (one stream when 4 rows fit in a 4 KB page) or a quarter of the
//     buffer apart (4 streams).
// Prints medians of 5 rounds in GB/s. The loads are summed so that none can be skipped.

#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace {

#if defined(__AVX512F__)
using Vec = __m512i;
inline Vec load(const uint8_t* p) { return _mm512_loadu_si512(p); }
inline Vec add(Vec a, Vec b) { return _mm512_add_epi64(a, b); }
inline Vec zero() { return _mm512_setzero_si512(); }
#else
using Vec = __m256i;
inline Vec load(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline Vec add(Vec a, Vec b) { return _mm256_add_epi64(a, b); }
inline Vec zero() { return _mm256_setzero_si256(); }
#endif
constexpr int kMaxStreams = 16;

inline int64_t lanes_sum(Vec a) {
    int64_t v[sizeof(Vec) / 8];
    std::memcpy(v, &a, sizeof(Vec));
    int64_t sum = 0;
    for (int64_t x : v) sum += x;
    return sum;
}
constexpr int64_t kStep = 128;  // bytes of one stream read before moving to the next

inline Vec read128(const uint8_t* p, Vec acc) {
    for (int64_t o = 0; o < kStep; o += static_cast<int64_t>(sizeof(Vec))) acc = add(acc, load(p + o));
    return acc;
}

// `streams` (1..kMaxStreams) equal parts of [p, p + n), read side by side.
int64_t read_streams(const uint8_t* p, int64_t n, int streams) {
    Vec acc[kMaxStreams];
    for (int s = 0; s < streams; ++s) acc[s] = zero();
    const int64_t part = n / streams / kStep * kStep;
    for (int64_t i = 0; i < part; i += kStep)
        for (int s = 0; s < streams; ++s) acc[s] = read128(p + s * part + i, acc[s]);
    int64_t sum = 0;
    for (int s = 0; s < streams; ++s) sum += lanes_sum(acc[s]);
    return sum;
}

// 4-row tiles over rows of `row` bytes: tile i reads rows i*4..i*4+3 (adjacent) or i, i+q, i+2q, i+3q
// (strided, q = a quarter of the rows), each row whole, 128 bytes of each row in turn.
int64_t read_tiles(const uint8_t* p, int64_t n, int64_t row, bool strided) {
    Vec acc[4] = {zero(), zero(), zero(), zero()};
    const int64_t rows = n / row / 4 * 4, q = rows / 4;
    for (int64_t i = 0; i < q; ++i) {
        const uint8_t* r[4];
        for (int k = 0; k < 4; ++k) r[k] = p + (strided ? i + k * q : 4 * i + k) * row;
        for (int64_t c = 0; c < row; c += kStep)
            for (int k = 0; k < 4; ++k) acc[k] = read128(r[k] + c, acc[k]);
    }
    return lanes_sum(add(add(acc[0], acc[1]), add(acc[2], acc[3])));
}

double seconds() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

template <class F>
double median_gbps(int64_t bytes, int rounds, int64_t& sink, F&& run) {
    std::vector<double> rates;
    for (int i = 0; i < rounds; ++i) {
        const double t = seconds();
        sink += run();
        rates.push_back(static_cast<double>(bytes) / (seconds() - t) / 1e9);
    }
    std::sort(rates.begin(), rates.end());
    return rates[rates.size() / 2];
}

}  // namespace

int main() {
    const int64_t n = int64_t{512} << 20;
    const int rounds = 5;
    auto* p = static_cast<uint8_t*>(std::aligned_alloc(4096, static_cast<size_t>(n)));
    if (p == nullptr) {
        std::fprintf(stderr, "error: cannot allocate 512 MiB\n");
        return 1;
    }
    std::memset(p, 1, static_cast<size_t>(n));
    int64_t sink = 0;
    std::printf("| streams | GB/s |\n|---:|---:|\n");
    for (int s : {1, 2, 4, 8, 16})
        std::printf("| %d | %.2f |\n", s, median_gbps(n, rounds, sink, [&] { return read_streams(p, n, s); }));
    std::printf("\n| 4-row tile, row bytes | adjacent rows GB/s | strided rows GB/s |\n|---:|---:|---:|\n");
    for (int64_t row : {512, 1024, 2048, 4096, 8192}) {
        const double a = median_gbps(n, rounds, sink, [&] { return read_tiles(p, n, row, false); });
        const double b = median_gbps(n, rounds, sink, [&] { return read_tiles(p, n, row, true); });
        std::printf("| %lld | %.2f | %.2f |\n", static_cast<long long>(row), a, b);
    }
    std::printf("\n(checksum %lld)\n", static_cast<long long>(sink));
    std::free(p);
    return 0;
}
