"""Triton twins of the long-context ops (spec §2.3 step 5, §2.5, §2.7): `cached_attn` (sparse attention
with the sink over the window rows and the pool rows, read in place, compact FP8 rows decoded in
registers) and `indexer_topk` (the indexer's scores as blocked `tl.dot` products over the stored keys,
compact FP4 decoded in registers, then a stable sort per query chunk for the tie rule).

Row kinds (as in csrc/attn_cpu.cpp): 0 = rows in a float dtype, 2 = compact FP4 indexer keys, 3 = compact
FP8 KV rows (`formats.kvcache`). Power-of-two scales are built from exponent bits (`exp2i`), so decoding
is exact.
"""

from __future__ import annotations

import torch

from dsv4cli.formats.kvcache import index_row_bytes, kv_row_bytes
from dsv4cli.kernels import ref
from dsv4cli.kernels.triton_quant import (
    INTERPRET,
    cast_rne,
    dot_dtype,
    dot_precision,
    exp2i,
    jit,
    runs_here,
    tl,
    triton,
)

KIND_FLOAT, KIND_FP4_INDEX, KIND_FP8_KV = 0, 2, 3
#: queries per indexer launch: bounds its [queries, entries] float32 score block to ~64 MB
INDEXER_SCORE_BYTES = 1 << 26


@jit
def _rows(base, ids, valid, d, stride_n, D, NOPE, R, KIND: tl.constexpr):
    """Rows `ids` [BLOCK_N] of a source at `base` (row n at base + n * stride_n, in elements of the
    pointer's type: bytes for the compact kinds) as float32 [BLOCK_N, BLOCK_D]; invalid rows are 0."""
    row = base + ids.to(tl.int64)[:, None] * stride_n
    inside = valid[:, None] & (d < D)[None, :]
    if KIND == 0:
        out = tl.load(row + d[None, :], mask=inside, other=0.0).to(tl.float32)
    elif KIND == 2:
        byte = tl.load(row + d[None, :] // 2, mask=inside, other=0).to(tl.int32)
        code = (byte >> ((d[None, :] % 2) * 4)) & 15
        idx = code & 7
        mag = tl.where(idx < 2, idx.to(tl.float32) * 0.5,
                       (1.0 + (idx & 1).to(tl.float32) * 0.5) * exp2i((idx >> 1) - 1))
        scale = tl.load(row + D // 2 + d[None, :] // 32, mask=inside, other=127).to(tl.int32)
        out = tl.where((code & 8) != 0, -mag, mag) * exp2i(scale - 127)
    else:
        nope = (d < NOPE)[None, :]
        code = tl.load(row + d[None, :], mask=inside & nope, other=0).to(tl.int32)
        e = (code >> 3) & 15
        m = (code & 7).to(tl.float32)
        mag = tl.where(e == 0, m * 0.001953125, (1.0 + m * 0.125) * exp2i(e - 7))
        scale = tl.load(row + NOPE + 2 * R + d[None, :] // 64, mask=inside & nope, other=127).to(tl.int32)
        nope_values = tl.where((code & 128) != 0, -mag, mag) * exp2i(scale - 127)
        r = tl.maximum(d - NOPE, 0)[None, :]
        lo = tl.load(row + NOPE + 2 * r, mask=inside & ~nope, other=0).to(tl.uint32)
        hi = tl.load(row + NOPE + 2 * r + 1, mask=inside & ~nope, other=0).to(tl.uint32)
        rope_values = ((hi << 24) | (lo << 16)).to(tl.float32, bitcast=True)
        out = tl.where(nope, nope_values, rope_values)
    return out


@jit
def _attend(q, m, denom, acc, base, idx_row, K, valid_limit, d, stride_n, D, NOPE, R, softmax_scale,
            KIND: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online-softmax update of (m, denom, acc) [BLOCK_H, BLOCK_D] with the K rows listed at idx_row."""
    for n0 in range(0, K, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        ids = tl.load(idx_row + n, mask=n < K, other=-1)
        valid = (ids >= 0) & (ids < valid_limit)
        rows = _rows(base, tl.where(valid, ids, 0), valid, d, stride_n, D, NOPE, R, KIND)
        logits = tl.dot(q, tl.trans(rows.to(DOT)), input_precision=PRECISION) * softmax_scale
        logits = tl.where(valid[None, :], logits, float("-inf"))
        m_new = tl.maximum(m, tl.max(logits, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(logits - m_new[:, None])
        denom = denom * alpha + tl.sum(p, axis=1)
        acc = tl.dot(p.to(DOT), rows.to(DOT), acc * alpha[:, None], input_precision=PRECISION)
        m = m_new
    return m, denom, acc


@jit
def _query_start(q_ptr, sink_ptr, S, H, D, stride_qb, stride_qs, stride_qh,
                 DOT: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's (batch b, token s, heads h, dims d, their masks), its query rows in DOT, the sink
    logits, and the online softmax's start: the running max at the sink logit (so an empty list gives
    exactly 0), denominator and accumulator zero."""
    b = tl.program_id(0) // S
    s = tl.program_id(0) % S
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    h_ok, d_ok = h < H, d < D
    q_rows = q_ptr + b.to(tl.int64) * stride_qb + s.to(tl.int64) * stride_qs + h[:, None] * stride_qh
    q = tl.load(q_rows + d[None, :], mask=h_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32).to(DOT)
    sink = tl.load(sink_ptr + h, mask=h_ok, other=0.0).to(tl.float32)
    denom = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_D), dtype=tl.float32)
    return b, s, h, d, h_ok, d_ok, q, sink, sink, denom, acc


@jit
def _store_with_sink(out_ptr, b, s, h, d, h_ok, d_ok, sink, m, denom, acc, stride_ob, stride_os, stride_oh):
    """out[b, s, h] = acc / (denom + exp(sink - m)): the sink enters only the denominator."""
    denom += tl.exp(sink - m)
    out = acc / denom[:, None]
    o_rows = out_ptr + b.to(tl.int64) * stride_ob + s.to(tl.int64) * stride_os + h[:, None] * stride_oh
    tl.store(o_rows + d[None, :], cast_rne(out, out_ptr.dtype.element_ty), mask=h_ok[:, None] & d_ok[None, :])


@jit
def _cached_attn_kernel(q_ptr, local_ptr, lidx_ptr, pool_ptr, pidx_ptr, sink_ptr, out_ptr,
                        S, H, D, NOPE, R, W, K, L, P, softmax_scale,
                        stride_qb, stride_qs, stride_qh, stride_lb, stride_ln, stride_lib, stride_lis,
                        stride_pb, stride_pn, stride_pib, stride_pis, stride_ob, stride_os, stride_oh,
                        POOL_KIND: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[b,s,h] = softmax-with-sink attention over the listed local rows, then the listed pool rows."""
    b, s, h, d, h_ok, d_ok, q, sink, m, denom, acc = _query_start(q_ptr, sink_ptr, S, H, D, stride_qb, stride_qs,
                                                                  stride_qh, DOT, BLOCK_H, BLOCK_D)
    m, denom, acc = _attend(q, m, denom, acc, local_ptr + b.to(tl.int64) * stride_lb,
                            lidx_ptr + b.to(tl.int64) * stride_lib + s.to(tl.int64) * stride_lis, W, L, d,
                            stride_ln, D, NOPE, R, softmax_scale, 0, DOT, PRECISION, BLOCK_N)
    m, denom, acc = _attend(q, m, denom, acc, pool_ptr + b.to(tl.int64) * stride_pb,  # K = 0: no pool
                            pidx_ptr + b.to(tl.int64) * stride_pib + s.to(tl.int64) * stride_pis, K, P, d,
                            stride_pn, D, NOPE, R, softmax_scale, POOL_KIND, DOT, PRECISION, BLOCK_N)
    _store_with_sink(out_ptr, b, s, h, d, h_ok, d_ok, sink, m, denom, acc, stride_ob, stride_os, stride_oh)


def _blocks(d: int) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_N, BLOCK_D): heads padded to >= 16, as in `triton_attn`."""
    block_d = max(16, triton.next_power_of_2(d))
    if INTERPRET:
        return 16, 16, block_d
    return 16, 64 if block_d <= 128 else 32, block_d


def cached_attn(q: torch.Tensor, local_kv: torch.Tensor, local_idx: torch.Tensor, pool: torch.Tensor | None,
                pool_idx: torch.Tensor | None, attn_sink: torch.Tensor, softmax_scale: float, rope_dim: int,
                max_chunk_bytes: int = 1 << 28) -> torch.Tensor:
    """Registry op (twin of `ref.cached_attn`); the reference for what it does not take."""
    b, s, h, d = q.shape
    has_pool = pool is not None and pool_idx is not None and pool_idx.shape[-1] > 0
    compact = has_pool and pool.dtype == torch.uint8
    tensors = [q, local_kv, local_idx] + ([pool, pool_idx] if has_pool else [])
    if (not runs_here(*tensors) or (compact and pool.shape[-1] != kv_row_bytes(d, rope_dim))
            or (has_pool and not compact and pool.shape[-1] != d)):
        return ref.cached_attn(q, local_kv, local_idx, pool, pool_idx, attn_sink, softmax_scale, rope_dim,
                               max_chunk_bytes)
    out = torch.empty_like(q)
    if out.numel() == 0:
        return out
    q = q if q.stride(-1) == 1 else q.contiguous()
    local_kv = local_kv if local_kv.stride(-1) == 1 else local_kv.contiguous()
    lidx = local_idx.expand(b, s, -1)
    lidx = lidx if lidx.stride(-1) == 1 else lidx.contiguous()
    if has_pool:
        pool = pool if pool.stride(-1) == 1 else pool.contiguous()
        pidx = pool_idx.expand(b, s, -1)
        pidx = pidx if pidx.stride(-1) == 1 else pidx.contiguous()
    else:
        pool, pidx = local_kv, lidx  # never read (K = 0)
    block_h, block_n, block_d = _blocks(d)
    grid = (b * s, triton.cdiv(h, block_h))
    k = pidx.shape[-1] if has_pool else 0
    _cached_attn_kernel[grid](
        q, local_kv, lidx, pool, pidx, attn_sink.float().contiguous(), out,
        s, h, d, d - rope_dim, rope_dim, lidx.shape[-1], k, local_kv.shape[1], pool.shape[1], float(softmax_scale),
        q.stride(0), q.stride(1), q.stride(2), local_kv.stride(0), local_kv.stride(1), lidx.stride(0), lidx.stride(1),
        pool.stride(0), pool.stride(1), pidx.stride(0), pidx.stride(1), out.stride(0), out.stride(1), out.stride(2),
        POOL_KIND=KIND_FP8_KV if compact else KIND_FLOAT, DOT=dot_dtype(q.dtype), PRECISION=dot_precision(q.dtype),
        BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4 if block_d <= 128 else 8,
    )
    return out


@jit
def _index_scores_kernel(q_ptr, w_ptr, keys_ptr, vis_ptr, out_ptr, S, H, D, N,
                         stride_qb, stride_qs, stride_qh, stride_wb, stride_ws, stride_kb, stride_kn,
                         stride_ob, stride_os,
                         KIND: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[b,s,n] = sum_h w[b,s,h] * relu(q[b,s,h] . key[b,n]) for the visible n, -inf for the others."""
    b = tl.program_id(0) // S
    s = tl.program_id(0) % S
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    q_rows = q_ptr + b.to(tl.int64) * stride_qb + s.to(tl.int64) * stride_qs + h[:, None] * stride_qh
    q = tl.load(q_rows + d[None, :], mask=(h < H)[:, None] & (d < D)[None, :], other=0.0).to(tl.float32)
    w = tl.load(w_ptr + b.to(tl.int64) * stride_wb + s.to(tl.int64) * stride_ws + h, mask=h < H, other=0.0)
    visible = tl.load(vis_ptr + s)
    seen = (n < N) & (n < visible)
    keys = _rows(keys_ptr + b.to(tl.int64) * stride_kb, tl.where(seen, n, 0), seen, d, stride_kn, D, 0, 0, KIND)
    dots = tl.dot(q, tl.trans(keys), input_precision="ieee")
    scores = tl.sum(tl.maximum(dots, 0.0) * w.to(tl.float32)[:, None], axis=0)
    scores = tl.where(seen, scores, float("-inf"))
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + s.to(tl.int64) * stride_os + n, scores, mask=n < N)


def indexer_topk(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor, topk: int,
                 block_entries: int = 8192, max_chunk_bytes: int = 1 << 26) -> torch.Tensor:
    """Registry op (twin of `ref.indexer_topk`): scores by `tl.dot` over blocks of keys (float32 products,
    no TF32), then per chunk of queries a stable descending sort, which keeps the tie rule (earlier entry
    wins). The score block of a chunk fits `INDEXER_SCORE_BYTES`."""
    b, s, h, d = q.shape
    n = keys.shape[1]
    top = min(topk, n)
    compact = keys.dtype == torch.uint8
    if (not runs_here(q, weights, keys, visible) or top == 0 or s == 0
            or keys.shape[-1] != (index_row_bytes(d) if compact else d) or (compact and d % 32)):
        return ref.indexer_topk(q, weights, keys, visible, topk, block_entries, max_chunk_bytes)
    keys = keys if keys.stride(-1) == 1 else keys.contiguous()
    weights = weights.float().contiguous()
    seen = visible.to(torch.int64).contiguous()
    q = q if q.stride(-1) == 1 else q.contiguous()
    block_h, block_d = max(16, triton.next_power_of_2(h)), max(16, triton.next_power_of_2(d))
    block_n = 16 if INTERPRET else 64
    step = max(1, INDEXER_SCORE_BYTES // max(1, 4 * b * n))
    out = torch.empty(b, s, top, dtype=torch.long, device=q.device)
    for s0 in range(0, s, step):
        s1 = min(s, s0 + step)
        scores = torch.empty(b, s1 - s0, n, dtype=torch.float32, device=q.device)
        qs, ws = q[:, s0:s1], weights[:, s0:s1]
        _index_scores_kernel[(b * (s1 - s0), triton.cdiv(n, block_n))](
            qs, ws, keys, seen[s0:s1], scores, s1 - s0, h, d, n,
            qs.stride(0), qs.stride(1), qs.stride(2), ws.stride(0), ws.stride(1), keys.stride(0), keys.stride(1),
            scores.stride(0), scores.stride(1),
            KIND=KIND_FP4_INDEX if compact else KIND_FLOAT, BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_D=block_d,
        )
        picked = scores.sort(dim=-1, descending=True, stable=True).indices[..., :top]
        out[:, s0:s1] = torch.where(picked < seen[s0:s1, None], picked, -1)
    return out
