"""Building blocks shared by every DeepSeek-V4 block: numerics switches, norms, linears, RoPE.

Parameters are registered under the official checkpoint names (spec §3.3) so a
state dict maps 1:1 onto the files; they are created on whatever device is current
(the loader uses `meta` and assigns the memory-mapped tensors afterwards).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from dsv4cli import kernels
from dsv4cli.formats.lowbit import LOWBIT
from dsv4cli.model.args import ModelArgs, yarn_correction_range


@dataclass(frozen=True)
class Numerics:
    """How faithfully to simulate the official numerics (spec §6.5).

    The defaults reproduce the official inference code: bf16 activations, FP8
    activation quantization in front of FP8/FP4 linears, FP8 fake-quant of the KV
    rows, Hadamard + FP4 fake-quant in the lightning indexer. `plain()` turns the
    simulations off (what transformers computes).
    """

    act_dtype: torch.dtype = torch.bfloat16
    fp8_act_quant: bool = True
    kv_fp8_quant: bool = True
    indexer_fp4_quant: bool = True

    @classmethod
    def plain(cls, act_dtype: torch.dtype = torch.float32) -> Numerics:
        return cls(act_dtype=act_dtype, fp8_act_quant=False, kv_fp8_quant=False, indexer_fp4_quant=False)


def _frozen(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Unweighted RMS normalisation over the last dim, computed in float32."""
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)


class RMSNorm(nn.Module):
    """Weighted RMSNorm; float32 maths, result in the input dtype (weights stored bf16)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = _frozen(dim, dtype=torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (rms_normalize(x, self.eps) * self.weight.float()).to(x.dtype)


WEIGHT_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp8": torch.float8_e4m3fn, "fp4": torch.int8,
                 "int3": torch.uint8, "int2": torch.uint8}
#: formats whose inputs get the FP8 activation simulation (`Numerics.fp8_act_quant`)
QUANTIZED_FORMATS = ("fp8", "fp4", "int3", "int2")


class Linear(nn.Module):
    """A linear layer in any stored format: fp8 (+ 128x128 scales), fp4 (packed, + 1x32 scales),
    int3 / int2 (packed, + bf16 1x32 scales; `dsv4 quantize`), bf16 or fp32. `act_quant` enables
    the FP8 activation simulation for quantized weights."""

    def __init__(self, in_features: int, out_features: int, fmt: str, act_quant: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        self.act_quant = act_quant and fmt in QUANTIZED_FORMATS
        if fmt in LOWBIT:
            self.weight = _frozen(out_features, in_features // 32 * LOWBIT[fmt][1], dtype=torch.uint8)
            self.scale = _frozen(out_features, in_features // 32, dtype=torch.bfloat16)
        elif fmt == "fp4":
            self.weight = _frozen(out_features, in_features // 2, dtype=torch.int8)
            self.scale = _frozen(out_features, in_features // 32, dtype=torch.float8_e8m0fnu)
        elif fmt == "fp8":
            self.weight = _frozen(out_features, in_features, dtype=torch.float8_e4m3fn)
            self.scale = _frozen(-(-out_features // 128), -(-in_features // 128), dtype=torch.float8_e8m0fnu)
        else:
            self.weight = _frozen(out_features, in_features, dtype=WEIGHT_DTYPES[fmt])
            self.scale = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.weight, self.scale, self.act_quant)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.fmt}"


class Embedding(nn.Module):
    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.weight = _frozen(vocab_size, dim, dtype=torch.bfloat16)

    def forward(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return nn.functional.embedding(ids, self.weight).to(dtype)


# --------------------------------------------------------------------------- RoPE


def rope_inv_freq(args: ModelArgs, compressed: bool) -> torch.Tensor:
    """Per-pair inverse frequencies (spec §2.6): base `rope_theta` without YaRN for
    sliding-only layers; `compress_rope_theta` with YaRN (no mscale) for compressed ones."""
    dim = args.rope_head_dim
    base = args.compress_rope_theta if compressed else args.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if compressed:
        low, high = yarn_correction_range(args, base)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        smooth = 1 - ramp
        freqs = freqs / args.rope_factor * (1 - smooth) + freqs * smooth
    return freqs


class Rotary:
    """cos/sin of one RoPE frequency set at given positions (float32, as the reference)."""

    def __init__(self, inv_freq: torch.Tensor):
        self.inv_freq = inv_freq

    def at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.float()[..., None] * self.inv_freq.to(positions.device)
        return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate the last 2*len(cos) dims of x in interleaved pairs (x[2i], x[2i+1]); `kernels.rope`, whose
    reference twin `ref.rope` holds the maths (spec §2.6; `inverse`: the conjugate rotation of §2.3 step 6)."""
    return kernels.rope(x, cos, sin, inverse)


def softmax_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
