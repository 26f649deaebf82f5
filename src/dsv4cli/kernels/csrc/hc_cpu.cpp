// mHC split + Sinkhorn (spec §2.2 step 3): the twin of `ref.hc_split_sinkhorn` for float32 rows on the CPU.
//
// Per token the mixing logits [(2 + n) * n] become pre [n] = sigmoid(.) + eps, post [n] = 2 sigmoid(.) and
// comb [n, n]: a row softmax (+ eps), a column normalisation, then iters - 1 rounds of row and column
// normalisations, each `v / (sum + eps)`, in the reference's order. The work is a few hundred flops per
// token; done by torch it is ~100 small ops per call, which is what a decode step of a small model spends
// its time on. Plain scalar code: n is 4 in the checkpoints.

#include "common.h"

namespace {

inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

void split_sinkhorn_row(const float* mix, int n, const float* scale, const float* base, int iters, float eps,
                        float* pre, float* post, float* comb) {
    for (int i = 0; i < n; ++i) {
        pre[i] = sigmoid(mix[i] * scale[0] + base[i]) + eps;
        post[i] = 2.0f * sigmoid(mix[n + i] * scale[1] + base[n + i]);
    }
    const float* logits = mix + 2 * n;
    const float* bias = base + 2 * n;
    for (int r = 0; r < n; ++r) {
        float* row = comb + r * n;
        float top = -INFINITY;
        for (int c = 0; c < n; ++c) {
            row[c] = logits[r * n + c] * scale[2] + bias[r * n + c];
            top = std::max(top, row[c]);
        }
        float total = 0.0f;
        for (int c = 0; c < n; ++c) {
            row[c] = std::exp(row[c] - top);
            total += row[c];
        }
        for (int c = 0; c < n; ++c) row[c] = row[c] / total + eps;
    }
    auto normalize_columns = [&] {
        for (int c = 0; c < n; ++c) {
            float total = 0.0f;
            for (int r = 0; r < n; ++r) total += comb[r * n + c];
            for (int r = 0; r < n; ++r) comb[r * n + c] /= total + eps;
        }
    };
    normalize_columns();
    for (int it = 1; it < iters; ++it) {
        for (int r = 0; r < n; ++r) {
            float* row = comb + r * n;
            float total = 0.0f;
            for (int c = 0; c < n; ++c) total += row[c];
            for (int c = 0; c < n; ++c) row[c] /= total + eps;
        }
        normalize_columns();
    }
}

}  // namespace

extern "C" {

// mixes [tokens, (2 + n) * n] (row stride `mix_stride` floats), scale [3], base [(2 + n) * n] ->
// pre [tokens, n], post [tokens, n], comb [tokens, n, n], all float32 and contiguous. Returns -1 on bad sizes.
int dsv4_hc_split_sinkhorn(const float* mixes, int64_t tokens, int64_t mix_stride, int n, const float* scale,
                           const float* base, int iters, float eps, float* pre, float* post, float* comb) {
    if (tokens < 0 || n < 1 || n > 64 || iters < 0 || mix_stride < (2 + n) * n) return -1;
    for (int64_t t = 0; t < tokens; ++t)
        split_sinkhorn_row(mixes + t * mix_stride, n, scale, base, iters, eps, pre + t * n, post + t * n,
                           comb + t * n * n);
    return 0;
}

}  // extern "C"
