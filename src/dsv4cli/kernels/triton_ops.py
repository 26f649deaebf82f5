"""Route the op registry (`dsv4cli.kernels`) to the Triton kernels (spec §6.1).

`available()` says whether they can run (triton importable and a CUDA device present);
`register()` swaps every op in `kernels.OPS` to its Triton version. Each Triton op keeps the
signature of its `ref` twin and falls back to it for tensors that are not on the GPU, so a
registered model can still run on the CPU. `kernels.reset()` goes back to the reference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dsv4cli import kernels
from dsv4cli.kernels import triton_attn, triton_gemm, triton_hc, triton_quant


def implementations() -> dict[str, Callable]:
    """Op name -> Triton implementation (same signature as `ref.<name>`)."""
    return {
        "linear": triton_gemm.linear,
        "swiglu_expert": triton_gemm.swiglu_expert,
        "hc_split_sinkhorn": triton_hc.hc_split_sinkhorn,
        "sparse_attn": triton_attn.sparse_attn,
        "kv_fp8_quant": triton_quant.kv_fp8_quant,
        "indexer_fp4_quant": triton_quant.indexer_fp4_quant,
    }


def available() -> bool:
    """True when triton is importable and a CUDA GPU is visible."""
    return triton_quant.HAS_TRITON and torch.cuda.is_available()


def register(force: bool = False) -> bool:
    """Route every registry op to Triton when `available()` (or `force`, e.g. under TRITON_INTERPRET=1).

    Returns whether the ops were switched; the registry is untouched otherwise.
    """
    if not (available() or (force and triton_quant.HAS_TRITON)):
        return False
    for name, fn in implementations().items():
        kernels.use(name, fn)
    return True
