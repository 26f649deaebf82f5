// Long-context attention kernels (spec §2.3 step 5, §2.5, §2.7): the lightning indexer's scores with
// its top-k selection, and sparse attention with the sink over rows read in place from the window and
// from the compressed pool (dense rows or the compact FP8 rows of formats/kvcache.py). Nothing copies
// the pool: each call decodes only the rows it reads, tile by tile, into float32 scratch.
//
// Element kinds: 0 = float32, 1 = bfloat16, 2 = compact FP4 indexer keys (codes, then one UE8M0
// scale per 32), 3 = compact FP8 KV rows (e4m3 non-RoPE dims, bf16 RoPE dims, one UE8M0 scale per 64).
// Paths follow the ISA ladder of common.h: AVX-512 (both AVX-512 levels), AVX2, scalar.

#include "common.h"

namespace {

constexpr int KIND_F32 = 0, KIND_BF16 = 1, KIND_FP4_INDEX = 2, KIND_FP8_KV = 3;
constexpr int64_t INDEX_TILE = 16;  // indexer entries scored together (one AVX-512 / two AVX2 vectors)
constexpr int64_t ATTN_TILE = 16;   // KV rows decoded and scored together (fp32 tile in L1)

inline float bf16_to_f32(uint16_t h) { return u2f(static_cast<uint32_t>(h) << 16); }

struct Tables {
    float e4m3[256];
    float e2m1[16];
    Tables() {
        for (int b = 0; b < 256; ++b) {
            const int sign = b >> 7, exp = (b >> 3) & 15, man = b & 7;
            float v;
            if (exp == 15 && man == 7) v = NAN;
            else if (exp == 0) v = std::ldexp(static_cast<float>(man), -9);
            else v = std::ldexp(1.0f + man / 8.0f, exp - 7);
            e4m3[b] = sign ? -v : v;
        }
        const float mags[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
        for (int c = 0; c < 16; ++c) e2m1[c] = (c & 8) ? -mags[c & 7] : mags[c & 7];
    }
};
const Tables& tables() {
    static const Tables t;
    return t;
}

// One stored row (kind, `d` values; rope dims last for KIND_FP8_KV) -> float32.
inline void decode_row(const uint8_t* row, int kind, int64_t d, int64_t rope, float* out) {
    if (kind == KIND_F32) {
        std::memcpy(out, row, d * sizeof(float));
    } else if (kind == KIND_BF16) {
        const uint16_t* h = reinterpret_cast<const uint16_t*>(row);
        for (int64_t i = 0; i < d; ++i) out[i] = bf16_to_f32(h[i]);
    } else if (kind == KIND_FP4_INDEX) {
        const float* lut = tables().e2m1;
        const uint8_t* scales = row + d / 2;
        for (int64_t b0 = 0; b0 < d; b0 += 32) {
            const float sc = ue8m0(scales[b0 / 32]);
            for (int64_t i = b0; i < b0 + 32; i += 2) {
                out[i] = lut[row[i / 2] & 15] * sc;
                out[i + 1] = lut[row[i / 2] >> 4] * sc;
            }
        }
    } else {
        const float* lut = tables().e4m3;
        const int64_t nope = d - rope;
        const uint16_t* r = reinterpret_cast<const uint16_t*>(row + nope);
        const uint8_t* scales = row + nope + 2 * rope;
        for (int64_t b0 = 0; b0 < nope; b0 += 64) {
            const float sc = ue8m0(scales[b0 / 64]);
            for (int64_t i = b0; i < b0 + 64; ++i) out[i] = lut[row[i]] * sc;
        }
        for (int64_t i = 0; i < rope; ++i) out[nope + i] = bf16_to_f32(r[i]);
    }
}

// ------------------------------------------------------------------------------- vector helpers

#if defined(DSV4_PATH_AVX2)
inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}
#endif

// out[j] = a . b[j] for four rows b[0..3] (one pass over a: half the loads of four dots)
inline void dot4(const float* a, const float* const* b, int64_t n, float* out) {
    int64_t i = 0;
    float t0 = 0.0f, t1 = 0.0f, t2 = 0.0f, t3 = 0.0f;
#if defined(DSV4_PATH_BF16) || defined(DSV4_PATH_AVX512)
    __m512 c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
    for (; i + 16 <= n; i += 16) {
        const __m512 x = _mm512_loadu_ps(a + i);
        c0 = _mm512_fmadd_ps(x, _mm512_loadu_ps(b[0] + i), c0);
        c1 = _mm512_fmadd_ps(x, _mm512_loadu_ps(b[1] + i), c1);
        c2 = _mm512_fmadd_ps(x, _mm512_loadu_ps(b[2] + i), c2);
        c3 = _mm512_fmadd_ps(x, _mm512_loadu_ps(b[3] + i), c3);
    }
    t0 = _mm512_reduce_add_ps(c0), t1 = _mm512_reduce_add_ps(c1);
    t2 = _mm512_reduce_add_ps(c2), t3 = _mm512_reduce_add_ps(c3);
#elif defined(DSV4_PATH_AVX2)
    __m256 c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
    for (; i + 8 <= n; i += 8) {
        const __m256 x = _mm256_loadu_ps(a + i);
        c0 = _mm256_fmadd_ps(x, _mm256_loadu_ps(b[0] + i), c0);
        c1 = _mm256_fmadd_ps(x, _mm256_loadu_ps(b[1] + i), c1);
        c2 = _mm256_fmadd_ps(x, _mm256_loadu_ps(b[2] + i), c2);
        c3 = _mm256_fmadd_ps(x, _mm256_loadu_ps(b[3] + i), c3);
    }
    t0 = hsum256(c0), t1 = hsum256(c1), t2 = hsum256(c2), t3 = hsum256(c3);
#endif
    for (; i < n; ++i) {
        t0 += a[i] * b[0][i];
        t1 += a[i] * b[1][i];
        t2 += a[i] * b[2][i];
        t3 += a[i] * b[3][i];
    }
    out[0] = t0, out[1] = t1, out[2] = t2, out[3] = t3;
}

// y = y * keep + sum_j p[j] * x[j] over four rows x[0..3] (one load and store of y per four rows)
inline void scale_add4(float keep, const float* p, const float* const* x, float* y, int64_t n) {
    int64_t i = 0;
#if defined(DSV4_PATH_BF16) || defined(DSV4_PATH_AVX512)
    const __m512 k = _mm512_set1_ps(keep), p0 = _mm512_set1_ps(p[0]), p1 = _mm512_set1_ps(p[1]),
                 p2 = _mm512_set1_ps(p[2]), p3 = _mm512_set1_ps(p[3]);
    for (; i + 16 <= n; i += 16) {
        __m512 acc = _mm512_mul_ps(k, _mm512_loadu_ps(y + i));
        acc = _mm512_fmadd_ps(p0, _mm512_loadu_ps(x[0] + i), acc);
        acc = _mm512_fmadd_ps(p1, _mm512_loadu_ps(x[1] + i), acc);
        acc = _mm512_fmadd_ps(p2, _mm512_loadu_ps(x[2] + i), acc);
        acc = _mm512_fmadd_ps(p3, _mm512_loadu_ps(x[3] + i), acc);
        _mm512_storeu_ps(y + i, acc);
    }
#elif defined(DSV4_PATH_AVX2)
    const __m256 k = _mm256_set1_ps(keep), p0 = _mm256_set1_ps(p[0]), p1 = _mm256_set1_ps(p[1]),
                 p2 = _mm256_set1_ps(p[2]), p3 = _mm256_set1_ps(p[3]);
    for (; i + 8 <= n; i += 8) {
        __m256 acc = _mm256_mul_ps(k, _mm256_loadu_ps(y + i));
        acc = _mm256_fmadd_ps(p0, _mm256_loadu_ps(x[0] + i), acc);
        acc = _mm256_fmadd_ps(p1, _mm256_loadu_ps(x[1] + i), acc);
        acc = _mm256_fmadd_ps(p2, _mm256_loadu_ps(x[2] + i), acc);
        acc = _mm256_fmadd_ps(p3, _mm256_loadu_ps(x[3] + i), acc);
        _mm256_storeu_ps(y + i, acc);
    }
#endif
    for (; i < n; ++i) y[i] = y[i] * keep + p[0] * x[0][i] + p[1] * x[1][i] + p[2] * x[2][i] + p[3] * x[3][i];
}

// scores[t] += sum_h w[h] * relu(q[h] . keys_t[t]) for one tile of INDEX_TILE entries, keys transposed
// [d][INDEX_TILE].
inline void score_tile(const float* q, const float* w, int64_t h, int64_t d, const float* kt, float* scores) {
#if defined(DSV4_PATH_BF16) || defined(DSV4_PATH_AVX512)
    __m512 total = _mm512_loadu_ps(scores);
    int64_t hh = 0;
    for (; hh + 4 <= h; hh += 4) {
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        const float *q0 = q + hh * d, *q1 = q0 + d, *q2 = q1 + d, *q3 = q2 + d;
        for (int64_t i = 0; i < d; ++i) {
            const __m512 k = _mm512_loadu_ps(kt + i * INDEX_TILE);
            a0 = _mm512_fmadd_ps(_mm512_set1_ps(q0[i]), k, a0);
            a1 = _mm512_fmadd_ps(_mm512_set1_ps(q1[i]), k, a1);
            a2 = _mm512_fmadd_ps(_mm512_set1_ps(q2[i]), k, a2);
            a3 = _mm512_fmadd_ps(_mm512_set1_ps(q3[i]), k, a3);
        }
        const __m512 z = _mm512_setzero_ps();
        total = _mm512_fmadd_ps(_mm512_set1_ps(w[hh]), _mm512_max_ps(a0, z), total);
        total = _mm512_fmadd_ps(_mm512_set1_ps(w[hh + 1]), _mm512_max_ps(a1, z), total);
        total = _mm512_fmadd_ps(_mm512_set1_ps(w[hh + 2]), _mm512_max_ps(a2, z), total);
        total = _mm512_fmadd_ps(_mm512_set1_ps(w[hh + 3]), _mm512_max_ps(a3, z), total);
    }
    for (; hh < h; ++hh) {
        __m512 a = _mm512_setzero_ps();
        for (int64_t i = 0; i < d; ++i)
            a = _mm512_fmadd_ps(_mm512_set1_ps(q[hh * d + i]), _mm512_loadu_ps(kt + i * INDEX_TILE), a);
        total = _mm512_fmadd_ps(_mm512_set1_ps(w[hh]), _mm512_max_ps(a, _mm512_setzero_ps()), total);
    }
    _mm512_storeu_ps(scores, total);
#elif defined(DSV4_PATH_AVX2)
    __m256 lo = _mm256_loadu_ps(scores), hi = _mm256_loadu_ps(scores + 8);
    const __m256 z = _mm256_setzero_ps();
    int64_t hh = 0;
    for (; hh + 3 <= h; hh += 3) {
        __m256 a0 = z, b0 = z, a1 = z, b1 = z, a2 = z, b2 = z;
        const float *q0 = q + hh * d, *q1 = q0 + d, *q2 = q1 + d;
        for (int64_t i = 0; i < d; ++i) {
            const __m256 k0 = _mm256_loadu_ps(kt + i * INDEX_TILE), k1 = _mm256_loadu_ps(kt + i * INDEX_TILE + 8);
            const __m256 s0 = _mm256_set1_ps(q0[i]), s1 = _mm256_set1_ps(q1[i]), s2 = _mm256_set1_ps(q2[i]);
            a0 = _mm256_fmadd_ps(s0, k0, a0);
            b0 = _mm256_fmadd_ps(s0, k1, b0);
            a1 = _mm256_fmadd_ps(s1, k0, a1);
            b1 = _mm256_fmadd_ps(s1, k1, b1);
            a2 = _mm256_fmadd_ps(s2, k0, a2);
            b2 = _mm256_fmadd_ps(s2, k1, b2);
        }
        const __m256 w0 = _mm256_set1_ps(w[hh]), w1 = _mm256_set1_ps(w[hh + 1]), w2 = _mm256_set1_ps(w[hh + 2]);
        lo = _mm256_fmadd_ps(w0, _mm256_max_ps(a0, z), lo);
        hi = _mm256_fmadd_ps(w0, _mm256_max_ps(b0, z), hi);
        lo = _mm256_fmadd_ps(w1, _mm256_max_ps(a1, z), lo);
        hi = _mm256_fmadd_ps(w1, _mm256_max_ps(b1, z), hi);
        lo = _mm256_fmadd_ps(w2, _mm256_max_ps(a2, z), lo);
        hi = _mm256_fmadd_ps(w2, _mm256_max_ps(b2, z), hi);
    }
    for (; hh < h; ++hh) {
        __m256 a = z, b = z;
        for (int64_t i = 0; i < d; ++i) {
            const __m256 s = _mm256_set1_ps(q[hh * d + i]);
            a = _mm256_fmadd_ps(s, _mm256_loadu_ps(kt + i * INDEX_TILE), a);
            b = _mm256_fmadd_ps(s, _mm256_loadu_ps(kt + i * INDEX_TILE + 8), b);
        }
        const __m256 wv = _mm256_set1_ps(w[hh]);
        lo = _mm256_fmadd_ps(wv, _mm256_max_ps(a, z), lo);
        hi = _mm256_fmadd_ps(wv, _mm256_max_ps(b, z), hi);
    }
    _mm256_storeu_ps(scores, lo);
    _mm256_storeu_ps(scores + 8, hi);
#else
    for (int64_t hh = 0; hh < h; ++hh) {
        float acc[INDEX_TILE] = {};
        for (int64_t i = 0; i < d; ++i)
            for (int64_t t = 0; t < INDEX_TILE; ++t) acc[t] += q[hh * d + i] * kt[i * INDEX_TILE + t];
        for (int64_t t = 0; t < INDEX_TILE; ++t) scores[t] += w[hh] * std::max(acc[t], 0.0f);
    }
#endif
}

// The `top` best of scores[0..v) (higher score first; on equal scores the smaller id), written as ids
// to out[0..top) with -1 after the v-th: a bounded heap, one pass over the scores.
void select_top(const float* scores, int64_t v, int64_t top, int64_t* out) {
    auto better = [scores](int64_t a, int64_t b) { return scores[a] > scores[b] || (scores[a] == scores[b] && a < b); };
    const int64_t keep = std::min(top, v);
    std::vector<int64_t> heap;
    heap.reserve(keep);
    for (int64_t i = 0; i < v; ++i) {
        if (static_cast<int64_t>(heap.size()) < keep) {
            heap.push_back(i);
            std::push_heap(heap.begin(), heap.end(), better);  // the worst kept entry on top
        } else if (keep > 0 && better(i, heap.front())) {
            std::pop_heap(heap.begin(), heap.end(), better);
            heap.back() = i;
            std::push_heap(heap.begin(), heap.end(), better);
        }
    }
    std::sort(heap.begin(), heap.end(), better);
    for (int64_t j = 0; j < top; ++j) out[j] = j < keep ? heap[j] : -1;
}

}  // namespace

extern "C" {

const char* dsv4_attn_isa() { return DSV4_ISA; }

// Indexer top-k for B*S queries: q [B,S,H,D] f32, w [B,S,H] f32, keys: batch b's entry n at
// keys + b*key_sb + n*key_sn bytes (key_kind 0/1/2), visible [S] (query s sees entries < visible[s]),
// out [B,S,top] int64. `scores` is scratch of B*S*N floats. Returns 0.
int dsv4_indexer_topk(const float* q, const float* w, const uint8_t* keys, int key_kind, int64_t key_sb,
                      int64_t key_sn, int64_t B, int64_t S, int64_t H, int64_t D, int64_t N,
                      const int64_t* visible, int64_t top, int64_t* out, float* scores, int nthreads) {
    const int64_t tiles = (N + INDEX_TILE - 1) / INDEX_TILE;
    const int64_t queries_per_item = std::max<int64_t>(1, std::min<int64_t>(8, S));
    const int64_t qgroups = (S + queries_per_item - 1) / queries_per_item;
    const int64_t tiles_per_item = std::max<int64_t>(1, std::min<int64_t>(tiles, 64));
    const int64_t tgroups = (tiles + tiles_per_item - 1) / tiles_per_item;
    const int nt = std::max(1, std::min<int>(pick_threads(nthreads), static_cast<int>(B * qgroups * tgroups)));
    std::memset(scores, 0, sizeof(float) * B * S * std::max<int64_t>(N, 1));
    parallel_items(
        nt, B * qgroups * tgroups,
        [&] { return std::vector<float>((INDEX_TILE + 1) * D + INDEX_TILE); },
        [&](int64_t item, std::vector<float>& scratch) {
            const int64_t b = item / (qgroups * tgroups), rest = item % (qgroups * tgroups);
            const int64_t s0 = (rest / tgroups) * queries_per_item, s1 = std::min(S, s0 + queries_per_item);
            const int64_t t0 = (rest % tgroups) * tiles_per_item, t1 = std::min(tiles, t0 + tiles_per_item);
            int64_t seen = 0;
            for (int64_t s = s0; s < s1; ++s) seen = std::max(seen, std::min(N, visible[s]));
            float* kt = scratch.data();
            float* row = kt + INDEX_TILE * D;
            float* tile_scores = row + D;
            for (int64_t t = t0; t < t1; ++t) {
                const int64_t n0 = t * INDEX_TILE;
                if (n0 >= seen) break;
                const int64_t count = std::min(INDEX_TILE, N - n0);
                for (int64_t j = 0; j < INDEX_TILE; ++j) {
                    if (j < count) decode_row(keys + b * key_sb + (n0 + j) * key_sn, key_kind, D, 0, row);
                    else std::fill(row, row + D, 0.0f);
                    for (int64_t i = 0; i < D; ++i) kt[i * INDEX_TILE + j] = row[i];
                }
                for (int64_t s = s0; s < s1; ++s) {
                    if (n0 >= visible[s]) continue;
                    std::fill(tile_scores, tile_scores + INDEX_TILE, 0.0f);
                    score_tile(q + ((b * S + s) * H) * D, w + (b * S + s) * H, H, D, kt, tile_scores);
                    float* dst = scores + (b * S + s) * N + n0;
                    for (int64_t j = 0; j < count; ++j) dst[j] = tile_scores[j];
                }
            }
        },
        [](int64_t) {});
    const int nt2 = std::max(1, std::min<int>(pick_threads(nthreads), static_cast<int>(B * S)));
    parallel_items(
        nt2, B * S, [] { return 0; },
        [&](int64_t item, int&) {
            const int64_t v = std::max<int64_t>(0, std::min(N, visible[item % S]));
            select_top(scores + item * N, v, top, out + item * top);
        },
        [](int64_t) {});
    return 0;
}

// Sparse attention with the sink over two sources: the local rows (local_kind 0/1, row n of batch b at
// local + b*local_sb + n*local_sn bytes; lists local_idx + b*lidx_sb + s*lidx_ss, W entries) and the pool
// (pool_kind 0/1/3; pool_idx likewise, K entries; K = 0: no pool). q and out: [B,S,H,D] of act_kind 0/1,
// contiguous. Index -1 = skip. Returns 0.
int dsv4_cached_attn(const uint8_t* q, int act_kind, int64_t B, int64_t S, int64_t H, int64_t D,
                     const uint8_t* local, int local_kind, int64_t local_sb, int64_t local_sn,
                     const int64_t* local_idx, int64_t lidx_sb, int64_t lidx_ss, int64_t W,
                     const uint8_t* pool, int pool_kind, int64_t pool_sb, int64_t pool_sn,
                     const int64_t* pool_idx, int64_t pidx_sb, int64_t pidx_ss, int64_t K, int64_t rope,
                     const float* sink, float softmax_scale, uint8_t* out, int nthreads) {
    // Heads per work item: all of them where there are queries enough for every thread (each item decodes
    // its rows once), fewer (multiples of 4) to give every thread work on short calls such as one decode step.
    const int want = pick_threads(nthreads);
    const int64_t splits = std::max<int64_t>(1, (want + B * S - 1) / (B * S));
    const int64_t head_group = std::max<int64_t>(4, (H + splits - 1) / splits + 3) / 4 * 4;
    const int64_t hgroups = (H + head_group - 1) / head_group;
    const int64_t items = B * S * hgroups;
    const int nt = std::max(1, std::min<int>(want, static_cast<int>(items)));
    const int64_t esize = act_kind == KIND_F32 ? 4 : 2;
    parallel_items(
        nt, items,
        [&] { return std::vector<float>(ATTN_TILE * D + head_group * (2 * D + ATTN_TILE + 2)); },
        [&](int64_t item, std::vector<float>& scratch) {
            const int64_t b = item / (S * hgroups), s = (item / hgroups) % S, h0 = (item % hgroups) * head_group;
            const int64_t hn = std::min(head_group, H - h0);
            float* rows = scratch.data();
            float* qf = rows + ATTN_TILE * D;
            float* acc = qf + head_group * D;
            float* logits = acc + head_group * D;  // [head_group][ATTN_TILE]
            float* peak = logits + head_group * ATTN_TILE;
            float* denom = peak + head_group;
            for (int64_t h = 0; h < hn; ++h) {
                decode_row(q + (((b * S + s) * H) + h0 + h) * D * esize, act_kind, D, 0, qf + h * D);
                peak[h] = sink[h0 + h];  // the running max starts at the sink logit
                denom[h] = 0.0f;
            }
            std::fill(acc, acc + head_group * D, 0.0f);
            const int64_t* lidx = local_idx + b * lidx_sb + s * lidx_ss;
            const int64_t* pidx = K > 0 ? pool_idx + b * pidx_sb + s * pidx_ss : nullptr;
            int64_t listed[ATTN_TILE];
            int from_pool[ATTN_TILE];
            int64_t pos = 0;
            while (pos < W + K) {
                int64_t count = 0;
                for (; pos < W + K && count < ATTN_TILE; ++pos) {
                    const bool in_pool = pos >= W;
                    const int64_t id = in_pool ? pidx[pos - W] : lidx[pos];
                    if (id < 0) continue;
                    listed[count] = id;
                    from_pool[count] = in_pool;
                    ++count;
                }
                if (count == 0) continue;
                for (int64_t t = 0; t < count; ++t) {
                    if (from_pool[t]) decode_row(pool + b * pool_sb + listed[t] * pool_sn, pool_kind, D, rope, rows + t * D);
                    else decode_row(local + b * local_sb + listed[t] * local_sn, local_kind, D, 0, rows + t * D);
                }
                for (int64_t t = count; t < (count + 3) / 4 * 4; ++t)  // pad to whole groups of four rows
                    std::fill(rows + t * D, rows + (t + 1) * D, 0.0f);
                const int64_t padded = (count + 3) / 4 * 4;
                for (int64_t h = 0; h < hn; ++h) {
                    float* lg = logits + h * ATTN_TILE;
                    float m = peak[h];
                    for (int64_t t = 0; t < padded; t += 4) {
                        const float* four[4] = {rows + t * D, rows + (t + 1) * D, rows + (t + 2) * D, rows + (t + 3) * D};
                        dot4(qf + h * D, four, D, lg + t);
                    }
                    for (int64_t t = 0; t < count; ++t) {
                        lg[t] *= softmax_scale;
                        m = std::max(m, lg[t]);
                    }
                    const float keep = std::exp(peak[h] - m);
                    denom[h] *= keep;
                    float p[ATTN_TILE];
                    for (int64_t t = 0; t < padded; ++t) {
                        p[t] = t < count ? std::exp(lg[t] - m) : 0.0f;
                        denom[h] += p[t];
                    }
                    float* a = acc + h * D;
                    for (int64_t t = 0; t < padded; t += 4) {
                        const float* four[4] = {rows + t * D, rows + (t + 1) * D, rows + (t + 2) * D, rows + (t + 3) * D};
                        scale_add4(t == 0 ? keep : 1.0f, p + t, four, a, D);
                    }
                    peak[h] = m;
                }
            }
            for (int64_t h = 0; h < hn; ++h) {
                const float total = denom[h] + std::exp(sink[h0 + h] - peak[h]);
                const float* a = acc + h * D;
                uint8_t* dst = out + (((b * S + s) * H) + h0 + h) * D * esize;
                if (act_kind == KIND_F32) {
                    float* o = reinterpret_cast<float*>(dst);
                    for (int64_t i = 0; i < D; ++i) o[i] = a[i] / total;
                } else {
                    uint16_t* o = reinterpret_cast<uint16_t*>(dst);
                    for (int64_t i = 0; i < D; ++i) o[i] = bf16_bits(a[i] / total);
                }
            }
        },
        [](int64_t) {});
    return 0;
}

}  // extern "C"
