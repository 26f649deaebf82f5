"""Bit-exact codecs for the number formats of the official checkpoint (spec §3.4, §3.5, §2.11).

* UE8M0 scales: one byte per block, value 2**(byte - 127) (`torch.float8_e8m0fnu`).
* FP8 weights: `float8_e4m3fn` with one UE8M0 scale per 128x128 block.
* FP4 weights: e2m1 codes packed two per int8 byte along the input dimension,
  low nibble = even element, with one UE8M0 scale per row per 32 inputs.

Scales are multipliers: value = decoded code * scale. Every scale the encoders
produce is a power of two rounded up from amax / max_code, as the reference does
with `scale_fmt="ue8m0"`.
"""

from __future__ import annotations

import math

import torch

FP8_MAX = 448.0
FP4_MAX = 6.0
FP8_BLOCK = 128
FP4_BLOCK = 32

#: e2m1 code -> value; bit 3 is the sign.
FP4_VALUES = torch.tensor(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
)
# Midpoints between neighbouring magnitudes; a tie rounds to the even code.
_FP4_MIDPOINTS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])


def pow2_scale(amax: torch.Tensor, max_code: float, floor: float = 0.0) -> torch.Tensor:
    """Smallest power of two s with amax / s <= max_code (the UE8M0 rounding)."""
    amax = amax.float().clamp(min=floor if floor > 0 else torch.finfo(torch.float32).tiny)
    # exact ceil(log2(v)) from the float's bits, as the reference's fast_log2_ceil: v = m * 2**e, m in [0.5, 1)
    mantissa, exponent = torch.frexp(amax / max_code)
    ceil_log2 = exponent - (mantissa == 0.5).to(exponent.dtype)
    return torch.exp2(ceil_log2.float().clamp(min=-127.0))


def scale_to_ue8m0(scale: torch.Tensor) -> torch.Tensor:
    """Encode power-of-two float scales as `float8_e8m0fnu` bytes (exact)."""
    exponent = torch.log2(scale.float()).round().to(torch.int32)
    if exponent.numel() and (exponent.min() < -127 or exponent.max() > 127):
        raise ValueError("scale exponent out of the UE8M0 range [-127, 127]")
    return (exponent + 127).to(torch.uint8).view(torch.float8_e8m0fnu)


def ue8m0_to_float(scale: torch.Tensor) -> torch.Tensor:
    """Decode UE8M0 scales (float8_e8m0fnu or raw uint8 bytes) to float32."""
    if scale.dtype == torch.float8_e8m0fnu:
        scale = scale.view(torch.uint8)
    if scale.dtype != torch.uint8:
        return scale.float()
    return torch.exp2(scale.to(torch.float32) - 127.0)


# ---------------------------------------------------------------------------- FP8


def quantize_fp8_blocks(weight: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D weight to e4m3 with one UE8M0 scale per block x block tile.

    Returns (`[out, in]` float8_e4m3fn, `[ceil(out/block), ceil(in/block)]` float8_e8m0fnu).
    """
    out_f, in_f = weight.shape
    rows, cols = math.ceil(out_f / block), math.ceil(in_f / block)
    padded = weight.float().new_zeros(rows * block, cols * block)
    padded[:out_f, :in_f] = weight.float()
    tiles = padded.view(rows, block, cols, block)
    scale = pow2_scale(tiles.abs().amax(dim=(1, 3)), FP8_MAX)
    q = (tiles / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    q = q.view(rows * block, cols * block)[:out_f, :in_f].to(torch.float8_e4m3fn)
    return q, scale_to_ue8m0(scale)


def dequantize_fp8_blocks(weight: torch.Tensor, scale: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    """Inverse of `quantize_fp8_blocks`: e4m3 weight times its block scale, as float32."""
    out_f, in_f = weight.shape
    s = ue8m0_to_float(scale)
    s = s.repeat_interleave(block, 0)[:out_f].repeat_interleave(block, 1)[:, :in_f]
    return weight.float() * s


# ---------------------------------------------------------------------------- FP4


def fp4_codes(values: torch.Tensor) -> torch.Tensor:
    """Round float values (already divided by their scale, |v| <= 6) to e2m1 codes 0..15."""
    magnitude = values.abs().clamp(max=FP4_MAX)
    code = torch.bucketize(magnitude, _FP4_MIDPOINTS.to(values.device), right=False)
    on_midpoint = (code < 7) & (magnitude == _FP4_MIDPOINTS.to(values.device)[code.clamp(max=6)])
    code = code + (on_midpoint & (code % 2 == 1)).to(code.dtype)
    return (code | (values < 0).to(code.dtype) << 3).to(torch.uint8)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """Pack e2m1 codes `[..., 2n]` into int8 bytes `[..., n]`; element 2i in the low nibble."""
    codes = codes.to(torch.uint8)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed.view(torch.int8)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Unpack int8 bytes `[..., n]` into e2m1 codes `[..., 2n]` (uint8)."""
    b = packed.view(torch.uint8)
    return torch.stack([b & 0x0F, b >> 4], dim=-1).flatten(-2)


def quantize_fp4_rows(weight: torch.Tensor, block: int = FP4_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D weight to packed e2m1 with one UE8M0 scale per row per `block` inputs.

    Returns (`[out, in/2]` int8, `[out, in/block]` float8_e8m0fnu).
    """
    out_f, in_f = weight.shape
    if in_f % block:
        raise ValueError(f"FP4 rows need in_features divisible by {block}, got {in_f}")
    groups = weight.float().view(out_f, in_f // block, block)
    scale = pow2_scale(groups.abs().amax(-1), FP4_MAX)
    codes = fp4_codes((groups / scale[..., None]).view(out_f, in_f))
    return pack_fp4(codes), scale_to_ue8m0(scale)


def dequantize_fp4_rows(packed: torch.Tensor, scale: torch.Tensor, block: int = FP4_BLOCK) -> torch.Tensor:
    """Inverse of `quantize_fp4_rows`: decoded e2m1 values times their scale, as float32."""
    values = FP4_VALUES.to(packed.device)[unpack_fp4(packed).long()]
    s = ue8m0_to_float(scale).repeat_interleave(block, -1)
    return values * s


# ------------------------------------------------------------ activation fake-quant


def fake_quant_fp8(x: torch.Tensor, block: int, amax_floor: float = 1e-4) -> torch.Tensor:
    """Per-token, per-`block`-column e4m3 quantize-dequantize with power-of-two scales.

    The reference's `act_quant(..., scale_fmt="ue8m0", inplace=True)`: used on linear
    inputs (block 128) and on the non-RoPE KV dims (block 64). Returns x's dtype.
    """
    xf = _blocks(x, block)
    scale = pow2_scale(xf.abs().amax(-1, keepdim=True), FP8_MAX, floor=amax_floor)
    q = (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    return _unblocks(q * scale, x)


def fake_quant_fp4(x: torch.Tensor, block: int = FP4_BLOCK) -> torch.Tensor:
    """Per-`block` e2m1 quantize-dequantize with power-of-two scales (the reference's
    `fp4_act_quant(..., inplace=True)`; amax floored at 6 * 2**-126)."""
    xf = _blocks(x, block)
    scale = pow2_scale(xf.abs().amax(-1, keepdim=True), FP4_MAX, floor=FP4_MAX * 2.0**-126)
    codes = fp4_codes(xf / scale)
    return _unblocks(FP4_VALUES.to(x.device)[codes.long()] * scale, x)


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """View the last dim as blocks of `block` (zero-padded when not a multiple), float32."""
    pad = -x.shape[-1] % block
    xf = torch.nn.functional.pad(x.float(), (0, pad)) if pad else x.float()
    return xf.reshape(*x.shape[:-1], -1, block)


def _unblocks(blocks: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return blocks.flatten(-2)[..., : like.shape[-1]].to(like.dtype)


def hadamard_matrix(n: int, device=None) -> torch.Tensor:
    """Orthonormal Sylvester (Walsh) Hadamard matrix of size n (a power of two)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    h = torch.ones(1, 1, device=device)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)
