"""Compact KV-cache rows, the layout serving engines store (spec §2.7, §2.11).

* Main KV entry (head_dim D, RoPE dims R at the end): the D - R non-RoPE dims as `float8_e4m3fn`
  with one UE8M0 scale per 64, then the R RoPE dims as bf16, then the scales, zero-padded to a
  multiple of 8 bytes. Flash/Pro (D 512, R 64): 448 + 128 + 7 + 1 = 584 bytes instead of 1,024.
* Indexer key (D 128): e2m1 codes packed two per byte (low nibble = even element), then one UE8M0
  scale per 32: 64 + 4 = 68 bytes instead of 256.

The model's cache writes already carry the reference's fake-quant (`kv_fp8_quant`: FP8 block 64,
amax floor 1e-4; `indexer_fp4_quant`: FP4 block 32), and a value of the form code * 2**k is re-encoded
to the same code and scale, so storing those rows in this layout and decoding them gives back the
exact bf16 values: the compact cache does not change a logit.
"""

from __future__ import annotations

import torch

from dsv4cli.formats.official import (
    FP4_MAX,
    FP4_VALUES,
    FP8_MAX,
    fp4_codes,
    pack_fp4,
    pow2_scale,
    unpack_fp4,
)

KV_SCALE_BLOCK = 64
INDEX_SCALE_BLOCK = 32
KV_AMAX_FLOOR = 1e-4
INDEX_AMAX_FLOOR = FP4_MAX * 2.0**-126


def kv_row_bytes(head_dim: int, rope_dim: int) -> int:
    """Bytes of one compact main-KV row (584 for D 512, R 64)."""
    nope = head_dim - rope_dim
    raw = nope + 2 * rope_dim + nope // KV_SCALE_BLOCK
    return -(-raw // 8) * 8


def index_row_bytes(head_dim: int) -> int:
    """Bytes of one compact indexer-key row (68 for D 128)."""
    return head_dim // 2 + head_dim // INDEX_SCALE_BLOCK


def compact_kv_supported(head_dim: int, rope_dim: int) -> bool:
    return 0 <= rope_dim < head_dim and (head_dim - rope_dim) % KV_SCALE_BLOCK == 0


def compact_index_supported(head_dim: int) -> bool:
    return head_dim % INDEX_SCALE_BLOCK == 0


def _exponent_bytes(scale: torch.Tensor) -> torch.Tensor:
    """Power-of-two float scales -> UE8M0 bytes (uint8)."""
    return (torch.log2(scale).round().to(torch.int32) + 127).clamp(0, 254).to(torch.uint8)


def _scales_from_bytes(raw: torch.Tensor) -> torch.Tensor:
    return torch.exp2(raw.float() - 127.0)


def encode_kv_rows(x: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """KV rows [..., D] -> compact bytes [..., kv_row_bytes(D, R)] (uint8). The non-RoPE dims are
    rounded exactly as `kv_fp8_quant` does; the RoPE dims are rounded to bf16."""
    head_dim = x.shape[-1]
    nope = head_dim - rope_dim
    blocks = x[..., :nope].float().reshape(*x.shape[:-1], nope // KV_SCALE_BLOCK, KV_SCALE_BLOCK)
    scale = pow2_scale(blocks.abs().amax(-1, keepdim=True), FP8_MAX, floor=KV_AMAX_FLOOR)
    codes = (blocks / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
    rope = x[..., nope:].to(torch.bfloat16).contiguous().view(torch.uint8)
    out = torch.zeros(*x.shape[:-1], kv_row_bytes(head_dim, rope_dim), dtype=torch.uint8, device=x.device)
    out[..., :nope] = codes.flatten(-2)
    out[..., nope:nope + 2 * rope_dim] = rope
    out[..., nope + 2 * rope_dim:nope + 2 * rope_dim + nope // KV_SCALE_BLOCK] = _exponent_bytes(scale[..., 0])
    return out


def decode_kv_rows(rows: torch.Tensor, head_dim: int, rope_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Compact bytes [..., B] -> KV rows [..., D] in `dtype` (inverse of `encode_kv_rows`)."""
    nope = head_dim - rope_dim
    codes = rows[..., :nope].contiguous().view(torch.float8_e4m3fn).float()
    scale = _scales_from_bytes(rows[..., nope + 2 * rope_dim:nope + 2 * rope_dim + nope // KV_SCALE_BLOCK])
    values = (codes.reshape(*rows.shape[:-1], -1, KV_SCALE_BLOCK) * scale[..., None]).flatten(-2)
    rope = rows[..., nope:nope + 2 * rope_dim].contiguous().view(torch.bfloat16).float()
    return torch.cat([values, rope], dim=-1).to(dtype)


def encode_index_rows(x: torch.Tensor) -> torch.Tensor:
    """Indexer keys [..., D] -> compact bytes [..., index_row_bytes(D)] (uint8), rounded exactly as
    the FP4 fake-quant of `indexer_fp4_quant` (after its rotation) does."""
    head_dim = x.shape[-1]
    blocks = x.float().reshape(*x.shape[:-1], head_dim // INDEX_SCALE_BLOCK, INDEX_SCALE_BLOCK)
    scale = pow2_scale(blocks.abs().amax(-1, keepdim=True), FP4_MAX, floor=INDEX_AMAX_FLOOR)
    codes = pack_fp4(fp4_codes(blocks / scale).flatten(-2)).view(torch.uint8)
    return torch.cat([codes, _exponent_bytes(scale[..., 0])], dim=-1)


def decode_index_rows(rows: torch.Tensor, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Compact bytes [..., B] -> indexer keys [..., D] in `dtype` (inverse of `encode_index_rows`)."""
    codes = unpack_fp4(rows[..., :head_dim // 2].contiguous()).long()
    scale = _scales_from_bytes(rows[..., head_dim // 2:head_dim // 2 + head_dim // INDEX_SCALE_BLOCK])
    values = FP4_VALUES.to(rows.device)[codes].reshape(*rows.shape[:-1], -1, INDEX_SCALE_BLOCK)
    return (values * scale[..., None]).flatten(-2).to(dtype)
