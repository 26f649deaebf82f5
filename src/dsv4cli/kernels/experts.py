"""`ExpertTable`: the routed experts of one MoE layer, in the form the fused expert kernels take."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

SCALE_DTYPES = (torch.float8_e8m0fnu, torch.uint8)
#: `dsv4 quantize` formats: bytes per 32 inputs -> bits per weight (the kernels' format codes)
LOWBIT_BITS = {12: 3, 8: 2}
FP4_BITS = 4


def fp4_operands_ok(weight: torch.Tensor, scale: torch.Tensor | None, in_features: int) -> bool:
    return (weight.dtype == torch.int8 and scale is not None and scale.dtype in SCALE_DTYPES
            and weight.device.type == "cpu" and scale.device.type == "cpu" and weight.dim() == 2
            and in_features % 32 == 0 and weight.shape[1] * 2 == in_features
            and tuple(scale.shape) == (weight.shape[0], in_features // 32))


def lowbit_operands_ok(weight: torch.Tensor, scale: torch.Tensor | None, in_features: int) -> int:
    """3 (int3) or 2 (int2) for a CPU low-bit weight `[out, in/32 * bytes]` with bf16 scales `[out, in/32]`, else 0."""
    if (weight.dtype != torch.uint8 or scale is None or scale.dtype != torch.bfloat16 or weight.dim() != 2
            or weight.device.type != "cpu" or scale.device.type != "cpu" or in_features % 32 or in_features == 0
            or tuple(scale.shape) != (weight.shape[0], in_features // 32)):
        return 0
    per_block, rest = divmod(weight.shape[1], in_features // 32)
    return 0 if rest else LOWBIT_BITS.get(per_block, 0)


def kernel_bits(weight: torch.Tensor, scale: torch.Tensor | None, in_features: int) -> int:
    """The native kernels' format code of a CPU weight: 4 FP4, 3 int3, 2 int2; 0 if they do not take it."""
    if fp4_operands_ok(weight, scale, in_features):
        return FP4_BITS
    return lowbit_operands_ok(weight, scale, in_features)


def in_features_of(weight: torch.Tensor, scale: torch.Tensor | None) -> int:
    """Input width of a stored weight: FP4 packs two per byte, int3/int2 32 per scale, others one per column."""
    if weight.dtype == torch.int8:
        return weight.shape[1] * 2
    if weight.dtype == torch.uint8 and scale is not None and scale.dim() == 2:
        return scale.shape[1] * 32
    return weight.shape[1]


@dataclass
class ExpertTable:
    """The routed experts of one MoE layer, as the fused kernel sees them.

    Built once per layer from per-expert `(w1, s1, w2, s2, w3, s3)` tensors (any location,
    e.g. memory-mapped checkpoint views): holds the tensors (so the addresses stay valid) and
    int64 arrays of their data addresses. `native` is False when some expert is not FP4 on
    CPU; `moe_experts` then uses the reference. The fused kernel also takes the `dsv4 quantize`
    formats: `bits` holds the (w1, w3, w2) format codes (4 FP4, 3 int3, 2 int2), the same for every expert.
    """

    experts: list[tuple[torch.Tensor, ...]]
    dim: int
    inter_dim: int
    native: bool
    pointers: tuple[torch.Tensor, ...] = field(repr=False)  # w1, s1, w3, s3, w2, s2 addresses
    bits: tuple[int, int, int] = (FP4_BITS, FP4_BITS, FP4_BITS)  # kernel format codes of w1, w3, w2
    backend_cache: dict[str, Any] = field(default_factory=dict, repr=False)  # per-backend derived tables

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @classmethod
    def from_experts(cls, experts: Sequence[Sequence[torch.Tensor | None]]) -> ExpertTable:
        """From per-expert `(w1, s1, w2, s2, w3, s3)`; FP4 / int3 / int2 tensors are used in place (no copy if
        contiguous)."""
        experts = [tuple(e) for e in experts]
        if not experts or any(len(e) != 6 for e in experts):
            raise ValueError("ExpertTable needs a non-empty list of (w1, s1, w2, s2, w3, s3) tuples")
        w1, s1 = experts[0][:2]
        inter_dim = w1.shape[0]
        dim = in_features_of(w1, s1)
        first = experts[0]
        bits = (kernel_bits(first[0], first[1], dim), kernel_bits(first[4], first[5], dim),
                kernel_bits(first[2], first[3], inter_dim))
        native = all(bits)
        kept: list[tuple[torch.Tensor, ...]] = []
        for w1, s1, w2, s2, w3, s3 in experts:
            own = (kernel_bits(w1, s1, dim), kernel_bits(w3, s3, dim), kernel_bits(w2, s2, inter_dim))
            ok = (native and own == bits
                  and w1.shape[0] == inter_dim and w3.shape[0] == inter_dim and w2.shape[0] == dim)
            native = native and ok
            if ok:
                w1, w2, w3 = w1.contiguous(), w2.contiguous(), w3.contiguous()
                s1, s2, s3 = (s.contiguous() if s.dtype == torch.bfloat16 else s.contiguous().view(torch.uint8)
                              for s in (s1, s2, s3))
            kept.append((w1, s1, w2, s2, w3, s3))
        if native:
            order = (0, 1, 4, 5, 2, 3)  # the kernel takes w1, s1, w3, s3, w2, s2
            pointers = tuple(torch.tensor([e[i].data_ptr() for e in kept], dtype=torch.int64) for i in order)
        else:
            pointers = ()
            kept = [tuple(e) for e in experts]
        return cls(experts=kept, dim=dim, inter_dim=inter_dim, native=native, pointers=pointers,
                   bits=bits if native else (FP4_BITS, FP4_BITS, FP4_BITS))


    @classmethod
    def from_stacked(cls, w1: torch.Tensor, s1: torch.Tensor, w2: torch.Tensor, s2: torch.Tensor,
                     w3: torch.Tensor, s3: torch.Tensor) -> ExpertTable:
        """Experts stacked along dim 0 (`[E, out, in/2]` weights, `[E, out, in/32]` scales): zero-copy views."""
        return cls.from_experts(list(zip(*(t.unbind(0) for t in (w1, s1, w2, s2, w3, s3)), strict=True)))
