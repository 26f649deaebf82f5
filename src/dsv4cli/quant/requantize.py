"""Rewriting one stored linear in another format: the step `dsv4 quantize` repeats for every linear."""

from __future__ import annotations

import torch

from dsv4cli.formats.lowbit import LOWBIT, quantize_fp4_search, quantize_lowbit
from dsv4cli.formats.official import quantize_fp8_blocks
from dsv4cli.io.schema import TensorSpec
from dsv4cli.kernels.ref import dequantize_weight


def stored_format(weight: TensorSpec, scale: TensorSpec | None) -> str:
    """Format name of a linear from its weight/scale specs: fp8, fp4, int3, int2 or bf16."""
    if weight.dtype == "F8_E4M3":
        return "fp8"
    if weight.dtype == "I8":
        return "fp4"
    if weight.dtype == "U8" and scale is not None:
        per_block = weight.shape[1] // scale.shape[1]
        return next(fmt for fmt, (_, nbytes, _) in LOWBIT.items() if nbytes == per_block)
    return "bf16"


def requantize(weight: torch.Tensor, scale: torch.Tensor | None, fmt: str,
               importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One linear's stored tensors in any format -> (weight, scale) in `fmt`."""
    dense = dequantize_weight(weight, scale)
    if fmt in LOWBIT:
        return quantize_lowbit(dense, fmt, importance)
    if fmt == "fp4":
        return quantize_fp4_search(dense, importance)
    if fmt == "fp8":
        return quantize_fp8_blocks(dense)
    if fmt == "bf16":
        return dense.to(torch.bfloat16), None
    raise ValueError(f"unknown target format {fmt!r}")
