"""Plain PyTorch reference twins of every DeepSeek-V4 op (spec §6.1, §2.11).

Readable, device-agnostic, and the oracle for the fast kernels' parity tests: each
fast kernel keeps the signature of its twin here. Quantized ops dequantize the
stored weight, optionally fake-quantize the activation exactly like the official
`act_quant` (FP8 e4m3, power-of-two scale per 128 inputs), and multiply in float32.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from dsv4cli.formats.kvcache import decode_index_rows, decode_kv_rows
from dsv4cli.formats.lowbit import dequantize_lowbit
from dsv4cli.formats.official import (
    dequantize_fp4_rows,
    dequantize_fp8_blocks,
    fake_quant_fp4,
    fake_quant_fp8,
    hadamard_matrix,
)

ACT_QUANT_BLOCK = 128
#: stored weight dtypes that `dequantize_weight` decodes: FP8, packed FP4 (int8), int3/int2 (uint8)
QUANTIZED_DTYPES = (torch.float8_e4m3fn, torch.int8, torch.uint8)


def dequantize_weight(weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Stored weight -> float32 matrix, whatever its on-disk format."""
    if weight.dtype == torch.float8_e4m3fn:
        return dequantize_fp8_blocks(weight, scale)
    if weight.dtype == torch.int8:
        return dequantize_fp4_rows(weight, scale)
    if weight.dtype == torch.uint8:
        return dequantize_lowbit(weight, scale)  # int3 / int2 (`dsv4 quantize`)
    return weight.float()


def linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None,
           act_quant: bool = False) -> torch.Tensor:
    """y = x @ W.T for any stored format; output in x's dtype.

    FP8/FP4/int3/int2 weights: `act_quant` simulates the reference's FP8 activation quantization
    (`fp8_gemm` / `fp4_gemm` inputs). Float weights: a plain `F.linear` in x's dtype.
    """
    if weight.dtype in QUANTIZED_DTYPES:
        if act_quant:
            x = fake_quant_fp8(x, ACT_QUANT_BLOCK)
        return (x.float() @ dequantize_weight(weight, scale).T).to(x.dtype)
    return F.linear(x, weight.to(x.dtype))


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Grouped projection (attention's wo_a, spec §2.3 step 7): x [..., G, din], weight [G*r, din]
    (any stored format) -> [..., G, r] in x's dtype; group g uses weight rows g*r..(g+1)*r-1.

    The weight is dequantized and rounded to x's dtype, no activation quant: the reference runs
    wo_a in bf16.
    """
    w = dequantize_weight(weight, scale).to(x.dtype)
    return torch.einsum("...gd,grd->...gr", x, w.view(x.shape[-2], -1, x.shape[-1]))


def swiglu_expert(x: torch.Tensor, w1: torch.Tensor, s1: torch.Tensor | None, w2: torch.Tensor,
                  s2: torch.Tensor | None, w3: torch.Tensor, s3: torch.Tensor | None,
                  route_weight: torch.Tensor | None, swiglu_limit: float, act_quant: bool) -> torch.Tensor:
    """One expert (spec §2.8): w2(clamp-SwiGLU(w1 x, w3 x) * route_weight), float32 out.

    The gate is clamped from above only, the up projection on both sides; the routing
    weight multiplies before w2, as in the reference.
    """
    return swiglu_with(linear, x, w1, s1, w2, s2, w3, s3, route_weight, swiglu_limit, act_quant)


def swiglu_with(linear_fn, x: torch.Tensor, w1: torch.Tensor, s1: torch.Tensor | None, w2: torch.Tensor,
                s2: torch.Tensor | None, w3: torch.Tensor, s3: torch.Tensor | None,
                route_weight: torch.Tensor | None, swiglu_limit: float, act_quant: bool) -> torch.Tensor:
    """`swiglu_expert` with the three projections done by `linear_fn` (a backend's `linear`)."""
    gate = linear_fn(x, w1, s1, act_quant).float()
    up = linear_fn(x, w3, s3, act_quant).float()
    if swiglu_limit > 0:
        gate = gate.clamp(max=swiglu_limit)
        up = up.clamp(-swiglu_limit, swiglu_limit)
    hidden = F.silu(gate) * up
    if route_weight is not None:
        hidden = hidden * route_weight
    return linear_fn(hidden.to(x.dtype), w2, s2, act_quant).float()


def moe_experts(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, experts, swiglu_limit: float,
                act_quant: bool) -> torch.Tensor:
    """Sum of the selected routed experts' outputs, float32 [N, D] (spec §2.8).

    x [N, D], weights/indices [N, k]; `experts.experts[e]` = (w1, s1, w2, s2, w3, s3) of expert e
    (an `ExpertTable`). One batched `swiglu_expert` call per expert that any token selected.
    """
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    counts = torch.bincount(indices.flatten(), minlength=len(experts.experts)).tolist()
    for expert_id, count in enumerate(counts):
        if count == 0:
            continue
        token, slot = torch.where(indices == expert_id)
        w1, s1, w2, s2, w3, s3 = experts.experts[expert_id]
        y = swiglu_expert(x[token], w1, s1, w2, s2, w3, s3, weights[token, slot, None], swiglu_limit, act_quant)
        out.index_add_(0, token, y)
    return out


def hc_split_sinkhorn(mixes: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, hc_mult: int,
                      iters: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mHC weights from the mixing logits (spec §2.2 step 3): pre [..,n], post [..,n], comb [..,n,n].

    comb is pushed toward a doubly-stochastic matrix by `iters` Sinkhorn steps
    (softmax over rows, then column / row normalisations).
    """
    n = hc_mult
    mixes, scale, base = mixes.float(), scale.float(), base.float()
    pre = torch.sigmoid(mixes[..., :n] * scale[0] + base[:n]) + eps
    post = 2 * torch.sigmoid(mixes[..., n:2 * n] * scale[1] + base[n:2 * n])
    comb = (mixes[..., 2 * n:] * scale[2] + base[2 * n:]).unflatten(-1, (n, n))
    comb = comb.softmax(-1) + eps
    comb = comb / (comb.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + eps)
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
    return pre, post, comb


def sparse_attn(q: torch.Tensor, kv: torch.Tensor, attn_sink: torch.Tensor, topk_idxs: torch.Tensor,
                softmax_scale: float, max_chunk_bytes: int = 1 << 28) -> torch.Tensor:
    """Attention of each query over the KV rows its index list names, with a sink (spec §2.3 step 5).

    q [B,S,H,D], kv [B,N,D] (K = V), attn_sink [H] (a logit in the softmax denominator only),
    topk_idxs [B,S,K] rows of kv, -1 = skip. Returns [B,S,H,D] in q's dtype. Queries are
    processed in chunks so the gathered rows stay under `max_chunk_bytes`.
    """
    b, s, h, d = q.shape
    n, k = kv.shape[1], topk_idxs.shape[-1]
    # Index lists hold no duplicates, so attending densely over all N rows with the listed ones
    # unmasked is the same sum; it is cheaper than gathering K rows per query when N is small.
    dense = n <= 2 * k
    out = []
    per_query = (n * h if dense else k * d) * 4
    step = max(1, max_chunk_bytes // max(1, b * per_query))
    sink = attn_sink.float().view(1, 1, h)
    kv_f = kv.float()
    for start in range(0, s, step):
        idx = topk_idxs[:, start:start + step]
        valid = idx >= 0
        qs = q[:, start:start + step].float()
        if dense:
            rows = kv_f
            allowed = torch.zeros(b, idx.shape[1], n + 1, dtype=torch.bool, device=q.device)
            allowed.scatter_(2, torch.where(valid, idx, n), True)
            logits = torch.einsum("bshd,bnd->bshn", qs, rows) * softmax_scale
            logits = logits.masked_fill(~allowed[:, :, None, :n], float("-inf"))
        else:
            rows = torch.gather(kv_f, 1, idx.clamp(min=0).flatten(1)[..., None].expand(-1, -1, d))
            rows = rows.view(b, idx.shape[1], k, d)
            logits = torch.einsum("bshd,bskd->bshk", qs, rows) * softmax_scale
            logits = logits.masked_fill(~valid[:, :, None, :], float("-inf"))
        peak = torch.maximum(logits.amax(-1), sink)
        probs = torch.exp(logits - peak[..., None])
        denom = probs.sum(-1) + torch.exp(sink - peak)
        pattern = "bshn,bnd->bshd" if dense else "bshk,bskd->bshd"
        out.append((torch.einsum(pattern, probs, rows) / denom[..., None]).to(q.dtype))
    return torch.cat(out, dim=1)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate the last 2*len(cos) dims of x in interleaved pairs (x[2i], x[2i+1]) (spec §2.6).

    cos/sin [..., rd/2] (float32) must broadcast against x's leading dims. `inverse` applies the
    conjugate rotation (used to de-rotate the attention output, spec §2.3 step 6).
    """
    rd = 2 * cos.shape[-1]
    if inverse:
        sin = -sin
    pairs = x[..., -rd:].float().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((a * cos - b * sin, a * sin + b * cos), -1).flatten(-2).to(x.dtype)
    return torch.cat([x[..., :-rd], rotated], dim=-1)


def rope_heads(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> int:
    """Heads per position when (x, cos, sin) is one of the model's RoPE layouts, which the fast kernels take:
    x [..., S, H, D] with cos / sin [S, 1, half] (H heads), or x [..., S, D] with cos / sin [S, half] (1);
    float32 angles on x's device, 0 < 2 * half <= D. 0 for anything else (left to `rope`)."""
    if (x.dim() < 2 or cos.dim() not in (2, 3) or sin.shape != cos.shape or cos.dtype != torch.float32
            or sin.dtype != torch.float32 or cos.device != x.device or sin.device != x.device
            or not 0 < 2 * cos.shape[-1] <= x.shape[-1]):
        return 0
    if cos.dim() == 2:
        return 1 if x.shape[-2] == cos.shape[0] else 0
    return x.shape[-2] if cos.shape[1] == 1 and x.dim() >= 3 and x.shape[-3] == cos.shape[0] else 0


def kv_fp8_quant(x: torch.Tensor, rope_head_dim: int) -> torch.Tensor:
    """FP8 fake-quant of the non-RoPE dims of KV rows (block 64); RoPE dims stay as they are."""
    nope = fake_quant_fp8(x[..., :-rope_head_dim], 64)
    return torch.cat([nope, x[..., -rope_head_dim:]], dim=-1)


@functools.lru_cache(maxsize=16)
def _hadamard_on(n: int, device: str) -> torch.Tensor:
    with torch.inference_mode(False):  # a normal tensor, usable outside inference mode too
        return hadamard_matrix(n, device=device)


def hadamard(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """`hadamard_matrix(n)` on `device`, built once per size and device (read-only: callers must not modify it)."""
    return _hadamard_on(n, str(device))


def indexer_fp4_quant(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Hadamard rotation of the last dim, then FP4 fake-quant (block 32) (spec §2.5)."""
    return fake_quant_fp4((x.float() @ hadamard(x.shape[-1], x.device)).to(x.dtype), 32)


def kv_rows(pool: torch.Tensor, rows: torch.Tensor, head_dim: int, rope_dim: int) -> torch.Tensor:
    """Rows `rows` (any index shape, >= 0) of one sequence's main-KV pool [P, D or compact bytes], float32."""
    picked = pool[rows]
    if pool.dtype == torch.uint8:
        return decode_kv_rows(picked, head_dim, rope_dim, torch.float32)
    return picked.float()


def index_keys(keys: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Indexer keys [..., D or compact bytes] as float32 [..., D]."""
    if keys.dtype == torch.uint8:
        return decode_index_rows(keys, head_dim, torch.float32)
    return keys.float()


def indexer_topk(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor, topk: int,
                 block_entries: int = 8192, max_chunk_bytes: int = 1 << 26) -> torch.Tensor:
    """The lightning indexer's choice (spec §2.5): for each query the `topk` entries with the largest
    sum_h w_h * relu(q_h . k), among the entries it sees.

    q [B,S,H,D], weights [B,S,H] float32, keys [B,N,D] (or compact FP4 rows, `formats.kvcache`),
    visible [S]: query s sees entries w < visible[s]. Returns [B,S,min(topk,N)] entry ids in order of
    falling score, -1 where fewer are visible. Ties go to the earlier entry, so the choice does not
    depend on how a sequence was chunked. Scores are computed in blocks of `block_entries` entries (and
    of queries, under `max_chunk_bytes`) and merged into a running top-k: no [S, N] score matrix.
    """
    b, s, h, d = q.shape
    n = keys.shape[1]
    top = min(topk, n)
    out = torch.full((b, s, top), -1, dtype=torch.long, device=q.device)
    if top == 0 or s == 0:
        return out
    block = max(1, min(n, block_entries))
    step = max(1, max_chunk_bytes // max(1, 4 * b * h * block))
    for s0 in range(0, s, step):
        s1 = min(s, s0 + step)
        qs, ws, seen = q[:, s0:s1].float(), weights[:, s0:s1, :, None].float(), visible[s0:s1, None]
        best_scores = best_ids = None
        for n0 in range(0, n, block):
            n1 = min(n, n0 + block)
            k = index_keys(keys[:, n0:n1], d)
            scores = (torch.relu(torch.einsum("bshd,btd->bsht", qs, k)) * ws).sum(2)
            ids = torch.arange(n0, n1, device=q.device).expand(b, s1 - s0, -1)
            scores = scores.masked_fill(ids >= seen, float("-inf"))
            if best_scores is not None:
                # The running best come first, in score order with ties by id, and all have smaller ids
                # than this block: a stable sort of the two keeps the global tie rule.
                scores, ids = torch.cat([best_scores, scores], -1), torch.cat([best_ids, ids], -1)
            order = scores.sort(dim=-1, descending=True, stable=True).indices[..., :top]
            best_scores, best_ids = scores.gather(-1, order), ids.gather(-1, order)
        out[:, s0:s1] = torch.where(best_ids < seen, best_ids, -1)
    return out


def cached_attn(q: torch.Tensor, local_kv: torch.Tensor, local_idx: torch.Tensor, pool: torch.Tensor | None,
                pool_idx: torch.Tensor | None, attn_sink: torch.Tensor, softmax_scale: float, rope_dim: int,
                max_chunk_bytes: int = 1 << 28) -> torch.Tensor:
    """`sparse_attn` over two KV sources read in place (spec §2.3 step 5, §2.7): the window rows
    `local_kv` [B,L,D] (activation dtype) with `local_idx` [B or 1,S,W], and a compressed pool [B,P,D]
    (or compact rows, `formats.kvcache`) with `pool_idx` [B,S,K] (None: no pool). -1 = skip.

    Only the listed pool rows are read (and decoded); the pool is never copied whole.
    """
    b, s, h, d = q.shape
    local_idx = local_idx.expand(b, s, -1)
    if pool is None or pool_idx is None or pool_idx.shape[-1] == 0:
        return sparse_attn(q, local_kv, attn_sink, local_idx, softmax_scale, max_chunk_bytes)
    k_local, k_pool = local_idx.shape[-1], pool_idx.shape[-1]
    per_query = (k_local + k_pool) * d * 4 + h * (k_local + k_pool) * 8
    step = max(1, max_chunk_bytes // max(1, b * per_query))
    sink = attn_sink.float().view(1, 1, h)
    out = []
    for start in range(0, s, step):
        li, pi = local_idx[:, start:start + step], pool_idx[:, start:start + step]
        rows = torch.cat([
            torch.stack([local_kv[i][li[i].clamp(min=0)].float() for i in range(b)]),
            torch.stack([kv_rows(pool[i], pi[i].clamp(min=0), d, rope_dim) for i in range(b)]),
        ], dim=2)
        valid = torch.cat([li >= 0, pi >= 0], dim=-1)
        logits = torch.einsum("bshd,bskd->bshk", q[:, start:start + step].float(), rows) * softmax_scale
        logits = logits.masked_fill(~valid[:, :, None, :], float("-inf"))
        peak = torch.maximum(logits.amax(-1), sink)
        probs = torch.exp(logits - peak[..., None])
        denom = probs.sum(-1) + torch.exp(sink - peak)
        out.append((torch.einsum("bshk,bskd->bshd", probs, rows) / denom[..., None]).to(q.dtype))
    return torch.cat(out, dim=1)
