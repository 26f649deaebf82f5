"""Bit-exact codecs and quantizers for the `dsv4 quantize` weight formats (docs/quality.md).

Two block-scaled integer formats for routed experts, both along the input dimension in blocks of
32 inputs with one signed bfloat16 scale per block (scale tensor `BF16 [out, in/32]`):

* `int3`: codes q in 0..7, value (q - 4) * scale (levels -4..3), 12 bytes per block: the
  block read as a 96-bit little-endian integer holds input i's code at bits 3i..3i+2 (so every
  3 bytes hold 8 codes, byte-aligned).
* `int2`: codes q in 0..3, value (q - 2) * scale (levels -2..1), 8 bytes per block: input i's
  code at bits 2i..2i+1 of the 64-bit little-endian block (byte k: inputs 4k..4k+3).

The weight tensor is `U8 [out, in/32 * 12]` (int3) or `U8 [out, in/32 * 8]` (int2): a row is its
blocks in input order. The scale is signed: the quantizer points the scale's sign so the block's
largest-magnitude weight lands on the extra negative level (-4 / -2), so the asymmetric grid
costs nothing. Both formats are told apart from FP4 (`I8` weights, UE8M0 scales) by dtype and
from each other by bytes per block (`weight.shape[1] / scale.shape[1]`).

The quantizers pick each block's scale by a small search that minimises the squared error,
weighted per input channel by an importance vector (the imatrix: mean square of that input
over calibration tokens) when one is given.
"""

from __future__ import annotations

import torch

from dsv4cli.formats.official import FP4_MAX, FP4_VALUES, fp4_codes, pack_fp4, pow2_scale, scale_to_ue8m0

BLOCK = 32
#: format -> (bits, bytes per 32-input block, code offset: value = code - offset)
LOWBIT = {"int3": (3, 12, 4), "int2": (2, 8, 2)}
#: scale factors tried per block (relative to the peak mapping onto the most negative level)
SEARCH_FACTORS = tuple(0.60 + 0.05 * i for i in range(10))


def bits_per_weight(fmt: str) -> float:
    """Stored bits per weight including scales: int3 3.5, int2 2.5, fp4 4.25, fp8 ~8.0, bf16 16."""
    if fmt in LOWBIT:
        return LOWBIT[fmt][1] * 8 / BLOCK + 16 / BLOCK
    return {"fp4": 4 + 8 / BLOCK, "fp8": 8 + 8 / 128**2, "bf16": 16.0}[fmt]


def lowbit_format(weight: torch.Tensor, scale: torch.Tensor | None) -> str | None:
    """'int3' / 'int2' for a stored low-bit weight and its scale, None for anything else."""
    if weight.dtype != torch.uint8 or scale is None or weight.dim() != 2 or scale.dim() != 2:
        return None
    if scale.shape[0] != weight.shape[0] or scale.shape[1] == 0:
        return None
    per_block, rest = divmod(weight.shape[1], scale.shape[1])
    if rest:
        return None
    return next((fmt for fmt, (_, nbytes, _) in LOWBIT.items() if nbytes == per_block), None)


# ------------------------------------------------------------------------------- packing


def pack_codes(codes: torch.Tensor, fmt: str) -> torch.Tensor:
    """Codes `[..., n]` (uint8, n % 32 == 0) -> packed bytes `[..., n/32 * block bytes]`."""
    bits = LOWBIT[fmt][0]
    if codes.shape[-1] % BLOCK:
        raise ValueError(f"{fmt} packs blocks of {BLOCK} inputs, got {codes.shape[-1]}")
    group = _group_bytes(bits)
    per_group = group * 8 // bits  # byte-aligned groups: 8 int3 codes in 3 bytes, 4 int2 codes in 1 byte
    c = codes.to(torch.int32).reshape(*codes.shape[:-1], -1, per_group) & ((1 << bits) - 1)
    shifts = torch.arange(0, bits * per_group, bits, dtype=torch.int32, device=c.device)
    value = (c << shifts).sum(-1, dtype=torch.int32)
    packed = torch.stack([(value >> (8 * i)) & 255 for i in range(group)], dim=-1).to(torch.uint8)
    return packed.reshape(*codes.shape[:-1], -1)


def _group_bytes(bits: int) -> int:
    return 3 if bits == 3 else 1


def unpack_codes(packed: torch.Tensor, fmt: str) -> torch.Tensor:
    """Inverse of `pack_codes`: bytes `[..., nb * block bytes]` -> codes `[..., nb * 32]` (uint8)."""
    bits, _, _ = LOWBIT[fmt]
    group = _group_bytes(bits)
    per_group = group * 8 // bits
    b = packed.view(torch.uint8).to(torch.int32).reshape(*packed.shape[:-1], -1, group)
    value = sum(b[..., i] << (8 * i) for i in range(group))
    shifts = torch.arange(0, bits * per_group, bits, dtype=torch.int32, device=b.device)
    codes = (value[..., None] >> shifts) & ((1 << bits) - 1)
    return codes.to(torch.uint8).reshape(*packed.shape[:-1], -1)


def dequantize_lowbit(packed: torch.Tensor, scale: torch.Tensor, fmt: str | None = None) -> torch.Tensor:
    """Stored int3/int2 weight + bf16 scales -> float32 `[out, in]`."""
    fmt = fmt or lowbit_format(packed, scale)
    if fmt is None:
        raise ValueError(f"not an int3/int2 weight: {packed.dtype}{list(packed.shape)}, scale "
                         f"{None if scale is None else list(scale.shape)}")
    offset = LOWBIT[fmt][2]
    values = unpack_codes(packed, fmt).float() - offset
    return values * scale.float().repeat_interleave(BLOCK, -1)


# ---------------------------------------------------------------------------- quantizing


def _importance(weight: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
    """Per-input weights of the squared error, [1, nb, 32]: the imatrix plus 1% of its mean
    (no input is ignored), or all ones."""
    in_f = weight.shape[1]
    if importance is None:
        return torch.ones(1, in_f // BLOCK, BLOCK, device=weight.device)
    imp = importance.to(weight.device, torch.float32).clamp(min=0)
    if imp.shape != (in_f,):
        raise ValueError(f"importance has shape {list(imp.shape)}, expected [{in_f}]")
    mean = imp.mean()
    imp = imp + 0.01 * mean if mean > 0 else torch.ones_like(imp)
    return imp.view(1, -1, BLOCK)


def _fit(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, lo: int, hi: int
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes for scale s, then the least-squares scale for those codes (rounded to bf16).
    Returns (levels, bf16 scale as float, weighted error) per block."""
    safe = torch.where(s == 0, torch.ones_like(s), s)
    q = torch.round(x / safe[..., None]).clamp_(lo, hi)
    num = (w * x * q).sum(-1)
    den = (w * q * q).sum(-1)
    fitted = torch.where(den > 0, num / den.clamp(min=1e-30), s)
    fitted = torch.where(fitted * s > 0, fitted, s).to(torch.bfloat16).float()
    err = (w * (x - q * fitted[..., None]) ** 2).sum(-1)
    return q, fitted, err


def quantize_lowbit(weight: torch.Tensor, fmt: str, importance: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize `[out, in]` to int3/int2: (`U8 [out, in/32 * bytes]`, `BF16 [out, in/32]`).

    Per block: the peak (largest |w|, with its sign) maps onto the most negative level at
    scale factors `SEARCH_FACTORS` (below 1 clips the peak); for each candidate the codes are
    rounded, the scale refitted by weighted least squares and rounded to bf16, codes and scale
    refitted once more; the pair with the smallest importance-weighted squared error wins.
    """
    _, _, offset = LOWBIT[fmt]
    lo, hi = -offset, offset - 1
    out_f, in_f = weight.shape
    if in_f % BLOCK:
        raise ValueError(f"{fmt} needs in_features divisible by {BLOCK}, got {in_f}")
    x = weight.float().reshape(out_f, in_f // BLOCK, BLOCK)
    w = _importance(weight, importance)
    peak = x.gather(-1, x.abs().argmax(-1, keepdim=True))[..., 0]
    best_err = torch.full(peak.shape, float("inf"), device=x.device)
    best_q = torch.zeros_like(x)
    best_s = torch.zeros_like(peak)
    for factor in SEARCH_FACTORS:
        q, s, err = _fit(x, w, peak * factor / lo, lo, hi)
        q2, s2, err2 = _fit(x, w, s, lo, hi)
        second = err2 < err
        q, s, err = torch.where(second[..., None], q2, q), torch.where(second, s2, s), torch.minimum(err, err2)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_q = torch.where(better[..., None], q, best_q)
        best_s = torch.where(better, s, best_s)
    codes = (best_q + offset).to(torch.uint8).view(out_f, in_f)
    return pack_codes(codes, fmt), best_s.to(torch.bfloat16)


def quantize_fp4_search(weight: torch.Tensor, importance: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """FP4 (e2m1 + UE8M0 per 32) like `formats.quantize_fp4_rows`, but each block takes the better of
    the power-of-two scale rounded up from amax/6 and half of it (which clips the peak), by
    importance-weighted squared error. Returns (`I8 [out, in/2]`, `F8_E8M0 [out, in/32]`)."""
    out_f, in_f = weight.shape
    if in_f % BLOCK:
        raise ValueError(f"FP4 needs in_features divisible by {BLOCK}, got {in_f}")
    x = weight.float().reshape(out_f, in_f // BLOCK, BLOCK)
    w = _importance(weight, importance)
    table = FP4_VALUES.to(x.device)
    best = None
    for shrink in (1.0, 0.5):
        scale = (pow2_scale(x.abs().amax(-1), FP4_MAX) * shrink).clamp(min=2.0**-127)
        codes = fp4_codes(x / scale[..., None])
        err = (w * (x - table[codes.long()] * scale[..., None]) ** 2).sum(-1)
        if best is None:
            best = (codes, scale, err)
        else:
            better = err < best[2]
            best = (torch.where(better[..., None], codes, best[0]), torch.where(better, scale, best[1]),
                    torch.minimum(err, best[2]))
    codes, scale, _ = best
    return pack_fp4(codes.view(out_f, in_f)), scale_to_ue8m0(scale)
