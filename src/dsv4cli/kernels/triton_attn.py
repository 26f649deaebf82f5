"""Triton sparse attention over per-query index lists, with the attention sink (spec §2.3 step 5, §6.1).

Twin of `ref.sparse_attn`. One program per (batch, query token, block of heads): the query heads
share the token's index list, so each block of BLOCK_N indices gathers its KV rows once and
feeds an online softmax (running max starts at the sink logit, so rows whose indices are all -1
give exactly 0). K = V (the full head dim, RoPE dims included); the sink enters only the
denominator, unscaled, with no value vector. Logits and the output accumulate in float32.
Rows are gathered per listed index, as in the official kernel (a repeated index would count twice;
the model's lists never repeat one).
"""

from __future__ import annotations

import torch

from dsv4cli.kernels import ref
from dsv4cli.kernels.triton_longctx import _attend, _query_start, _store_with_sink
from dsv4cli.kernels.triton_quant import INTERPRET, dot_dtype, dot_precision, jit, runs_here, tl, triton


@jit
def _sparse_attn_kernel(q_ptr, kv_ptr, sink_ptr, idx_ptr, out_ptr, S, H, N, K, D, softmax_scale,
                        stride_qb, stride_qs, stride_qh, stride_kb, stride_kn, stride_ib, stride_is,
                        stride_ob, stride_os, stride_oh,
                        DOT: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[b,s,h] = sum_i p_i kv[b, idx_i] / (sum_i p_i + exp(sink_h - m)), p_i = exp(scale q.kv_i - m)."""
    b, s, h, d, h_ok, d_ok, q, sink, m, denom, acc = _query_start(q_ptr, sink_ptr, S, H, D, stride_qb, stride_qs,
                                                                  stride_qh, DOT, BLOCK_H, BLOCK_D)
    m, denom, acc = _attend(q, m, denom, acc, kv_ptr + b.to(tl.int64) * stride_kb,
                            idx_ptr + b.to(tl.int64) * stride_ib + s.to(tl.int64) * stride_is, K, N, d,
                            stride_kn, D, D, 0, softmax_scale, 0, DOT, PRECISION, BLOCK_N)  # kind 0: float rows
    _store_with_sink(out_ptr, b, s, h, d, h_ok, d_ok, sink, m, denom, acc, stride_ob, stride_os, stride_oh)


def _blocks(h: int, d: int) -> tuple[int, int, int, int]:
    """(BLOCK_H, BLOCK_N, BLOCK_D, num_warps): heads padded to >= 16 like the official kernel."""
    block_d = max(16, triton.next_power_of_2(d))
    if INTERPRET:
        return 16, 16, block_d, 4
    block_n = 64 if block_d <= 128 else 32
    return 16, block_n, block_d, 4 if block_d <= 128 else 8


def sparse_attn(q: torch.Tensor, kv: torch.Tensor, attn_sink: torch.Tensor, topk_idxs: torch.Tensor,
                softmax_scale: float, max_chunk_bytes: int = 1 << 28) -> torch.Tensor:
    """Registry op (twin of `ref.sparse_attn`): q [B,S,H,D], kv [B,N,D], attn_sink [H], topk_idxs
    [B,S,K] (-1 = skip) -> [B,S,H,D] in q's dtype. `max_chunk_bytes` is the reference's knob (unused)."""
    if not runs_here(q, kv, topk_idxs):
        return ref.sparse_attn(q, kv, attn_sink, topk_idxs, softmax_scale, max_chunk_bytes)
    b, s, h, d = q.shape
    n, k = kv.shape[1], topk_idxs.shape[-1]
    out = torch.empty((b, s, h, d), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    q = q if q.stride(-1) == 1 else q.contiguous()
    kv = kv if kv.stride(-1) == 1 else kv.contiguous()
    idx = topk_idxs if topk_idxs.stride(-1) == 1 else topk_idxs.contiguous()
    idx = idx.expand(b, s, k)
    sink = attn_sink.float().contiguous()
    block_h, block_n, block_d, warps = _blocks(h, d)
    grid = (b * s, triton.cdiv(h, block_h))
    _sparse_attn_kernel[grid](
        q, kv, sink, idx, out, s, h, n, k, d, float(softmax_scale),
        q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1), idx.stride(0), idx.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        DOT=dot_dtype(q.dtype), PRECISION=dot_precision(q.dtype),
        BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps,
    )
    return out
