"""Triton RoPE (spec §2.6, §6.1 `rope`): the twin of `ref.rope` for the model's layouts (`ref.rope_heads`).

One program turns BLOCK_R rows (one row: one head of one position): the first D - 2*half values are copied,
the last 2*half turned in interleaved pairs by the position's cos / sin (sin negated for `inverse`), in float32,
stored in x's dtype.
"""

from __future__ import annotations

import torch

from dsv4cli.kernels import ref
from dsv4cli.kernels.triton_quant import INTERPRET, jit, runs_here, tl, triton


@jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, rows, seq, heads, d, nope, half, sign,
                 BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < rows
    start = r.to(tl.int64)[:, None] * d
    j = tl.arange(0, BLOCK_N)[None, :]
    keep = r_ok[:, None] & (j < nope)
    tl.store(out_ptr + start + j, tl.load(x_ptr + start + j, mask=keep), mask=keep)
    i = tl.arange(0, BLOCK_H)[None, :]
    pair_ok = r_ok[:, None] & (i < half)
    angle = ((r // heads) % seq).to(tl.int64)[:, None] * half + i
    c = tl.load(cos_ptr + angle, mask=pair_ok, other=0.0)
    s = tl.load(sin_ptr + angle, mask=pair_ok, other=0.0) * sign
    even = start + nope + 2 * i
    a = tl.load(x_ptr + even, mask=pair_ok, other=0.0).to(tl.float32)
    b = tl.load(x_ptr + even + 1, mask=pair_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + even, (a * c - b * s).to(out_ptr.dtype.element_ty), mask=pair_ok)
    tl.store(out_ptr + even + 1, (a * s + b * c).to(out_ptr.dtype.element_ty), mask=pair_ok)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Registry op (twin of `ref.rope`); the reference off the GPU or for other layouts."""
    heads = ref.rope_heads(x, cos, sin) if runs_here(x, cos, sin) else 0
    if not heads or x.dtype not in (torch.float32, torch.bfloat16):
        return ref.rope(x, cos, sin, inverse)
    seq, half, d = cos.shape[0], cos.shape[-1], x.shape[-1]
    xc = x.contiguous()
    out = torch.empty_like(xc)
    rows = xc.numel() // d
    if rows:
        block_r = 4 if INTERPRET else 16
        nope = d - 2 * half
        _rope_kernel[(triton.cdiv(rows, block_r),)](
            xc, cos.reshape(seq, half).contiguous(), sin.reshape(seq, half).contiguous(), out, rows, seq, heads, d,
            nope, half, -1.0 if inverse else 1.0, BLOCK_R=block_r, BLOCK_N=triton.next_power_of_2(max(nope, 1)),
            BLOCK_H=triton.next_power_of_2(half),
        )
    return out.view(x.shape)
