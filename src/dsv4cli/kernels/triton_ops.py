"""Route the op registry (`dsv4cli.kernels`) to the Triton kernels (spec §6.1).

`available()` says whether they can run (triton importable and a CUDA device present);
`implementations()` gives every op of `kernels.OPS` in its Triton version, for `kernels.install`.
Each Triton op keeps the signature of its `ref` twin and falls back to it for tensors that are not
on the GPU, so a registered model can still run on the CPU. `kernels.reset()` goes back to the reference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dsv4cli.kernels import ref, triton_attn, triton_gemm, triton_hc, triton_longctx, triton_quant, triton_rope


def implementations() -> dict[str, Callable]:
    """Op name -> Triton implementation (same signature as `ref.<name>`)."""
    return {
        "linear": triton_gemm.linear,
        "swiglu_expert": triton_gemm.swiglu_expert,
        "moe_experts": moe_experts,
        "grouped_linear": grouped_linear,
        "hc_split_sinkhorn": triton_hc.hc_split_sinkhorn,
        "sparse_attn": triton_attn.sparse_attn,
        "kv_fp8_quant": triton_quant.kv_fp8_quant,
        "indexer_fp4_quant": triton_quant.indexer_fp4_quant,
        "indexer_topk": triton_longctx.indexer_topk,
        "cached_attn": triton_longctx.cached_attn,
        "rope": triton_rope.rope,
    }


def moe_experts(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, experts, swiglu_limit: float,
                act_quant: bool) -> torch.Tensor:
    """Registry twin of `ref.moe_experts` on the grouped Triton kernel; the pointer tables are built
    once per `ExpertTable` and kept on it. Falls back to the reference off the GPU or for experts that are not
    FP4 in all three projections (`dsv4 quantize` int3/int2 experts are dequantized by the reference)."""
    first = experts.experts[0][0]
    all_fp4 = experts.backend_cache.get("triton_all_fp4")
    if all_fp4 is None:  # every expert, every projection (a recipe's `keep` can mix formats in one layer)
        all_fp4 = all(e[i].dtype == torch.int8 for e in experts.experts for i in (0, 2, 4))
        experts.backend_cache["triton_all_fp4"] = all_fp4
    if x.device.type != "cuda" or first.device.type != "cuda" or not all_fp4:
        return ref.moe_experts(x, weights, indices, experts, swiglu_limit, act_quant)
    tables = experts.backend_cache.get("triton")
    if tables is None:
        columns = list(zip(*experts.experts, strict=True))  # w1, s1, w2, s2, w3, s3
        tables = tuple(triton_gemm.ExpertWeights.from_list(columns[i], columns[i + 1]) for i in (0, 2, 4))
        experts.backend_cache["triton"] = tables
    w1, w2, w3 = tables
    return triton_gemm.moe_experts_triton(x, weights, indices, w1, w2, w3, swiglu_limit, act_quant)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Registry twin of `ref.grouped_linear` (the grouped output projection wo_a): one Triton FP8 GEMM per
    group, without activation quantization; the reference off the GPU or when a group's rows do not align
    with the 128-row scale blocks."""
    groups = x.shape[-2]
    rows = weight.shape[0] // groups
    if (x.device.type != "cuda" or weight.dtype != torch.float8_e4m3fn or rows % 128
            or not triton_gemm.fp8_supported(x.device)):
        return ref.grouped_linear(x, weight, scale)
    blocks = rows // 128
    parts = [triton_gemm.fp8_linear(x[..., g, :], weight[g * rows:(g + 1) * rows],
                                    scale[g * blocks:(g + 1) * blocks], False) for g in range(groups)]
    return torch.stack(parts, dim=-2)


def available() -> bool:
    """True when triton is importable and a CUDA GPU is visible."""
    return triton_quant.HAS_TRITON and torch.cuda.is_available()


def usable(force: bool = False) -> bool:
    """Whether the Triton ops can run: `available()`, or with `force` triton alone (TRITON_INTERPRET=1)."""
    return available() or (force and triton_quant.HAS_TRITON)
