"""Triton GEMMs for the stored weight formats: FP8 block-scaled and FP4 grouped over experts (spec §2.8, §2.11).

* `fp8_linear`: the official `fp8_gemm`: activations quantized to e4m3 per 128 columns
  (`triton_quant.act_quant_fp8`), one fp8 x fp8 `tl.dot` per 128-wide K block, rescaled by
  sA[m, k] * sB[n // 128, k] and accumulated in float32. Without `act_quant` the activation
  stays as it is and only sB applies.
* `fp4_grouped_linear`: a MoE-style grouped GEMM: rows sorted by expert and padded per expert
  to BLOCK_M (no host sync: the grid is an upper bound, spare programs exit), one program per
  (row block of one expert, output tile). Nibbles are decoded in the kernel (low nibble = even
  input), times the UE8M0 scale of their 32 inputs, float32 accumulation. Expert weights are a
  stacked `[E, out, in/2]` tensor or a table of per-expert pointers (`ExpertWeights`).
* `moe_experts_triton`: routed experts for a batch: FP8 fake-quant of x, one fused w1/w3 pass
  with clamp-SwiGLU * route weight in the epilogue, fake-quant of the hidden state, w2, and the
  sum over each token's k selections; the twin of summing `ref.swiglu_expert` (`moe_experts_ref`).
* `lowbit_dequantize` / `lowbit_linear`: the `dsv4 quantize` int3 / int2 formats (`quant_formats`):
  a kernel decodes the packed codes times their bf16 block scales into a matrix (bit-exact with
  `quant_formats.dequantize_lowbit`), then one float32 GEMM; not fused, for the dense linears.
  Routed int3/int2 experts on the GPU take `ref.moe_experts` (torch dequantization per call):
  there is no grouped int3/int2 Triton kernel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dsv4cli.formats import official as formats
from dsv4cli.kernels import ref
from dsv4cli.kernels.triton_quant import (
    INTERPRET,
    act_quant_fp8,
    cast_rne,
    check_runnable,
    dot_dtype,
    dot_precision,
    e2m1_value,
    fake_quant_fp8,
    jit,
    runs_here,
    tl,
    triton,
    ue8m0_value,
)

ACT_BLOCK = formats.FP8_BLOCK


# --------------------------------------------------------------------------- FP8 block-scaled GEMM


@jit
def _fp8_gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, M, N, K,
                     stride_am, stride_asm, stride_bn, stride_bsn, stride_cm,
                     A_SCALED: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """C[M,N] = sum_kb dot(A_kb, B_kb^T) * sA[m,kb] * sB[n//128,kb]; BLOCK_K = 128 (one scale block)."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok, n_ok = rm < M, rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k = kb * BLOCK_K + rk
        a = tl.load(a_ptr + rm[:, None] * stride_am + k[None, :], mask=m_ok[:, None] & (k < K)[None, :], other=0.0)
        b = tl.load(b_ptr + rn[:, None] * stride_bn + k[None, :], mask=n_ok[:, None] & (k < K)[None, :], other=0.0)
        sb = ue8m0_value(tl.load(bs_ptr + (rn // 128) * stride_bsn + kb, mask=n_ok, other=127))
        if A_SCALED:  # e4m3 x e4m3 tensor-core MMA (the interpreter upcasts exactly)
            part = tl.dot(a, tl.trans(b))
            sa = tl.load(as_ptr + rm * stride_asm + kb, mask=m_ok, other=0.0)
            acc += part * sa[:, None] * sb[None, :]
        else:
            part = tl.dot(a.to(tl.float32).to(DOT), tl.trans(b.to(tl.float32).to(DOT)), input_precision=PRECISION)
            acc += part * sb[None, :]
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :], cast_rne(acc, c_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def ue8m0_bytes(scale: torch.Tensor) -> torch.Tensor:
    """Scales as raw UE8M0 bytes (uint8): e8m0 tensors are reinterpreted, float power-of-two scales encoded."""
    if scale.dtype == torch.uint8:
        return scale
    if scale.dtype == torch.float8_e8m0fnu:
        return scale.view(torch.uint8)
    return formats.scale_to_ue8m0(scale).view(torch.uint8)


def fp8_supported(device: torch.device) -> bool:
    """Triton's e4m3 type (pointers, casts, MMA) needs sm_89+ (Ada, Hopper, Blackwell); the interpreter has it."""
    return INTERPRET or (device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9))


def _gemm_blocks(m: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): small row tiles at decode, larger at prefill (no spills on sm_90)."""
    if INTERPRET:
        return 16, 32, 4
    return (16, 64, 4) if m <= 16 else (64, 128, 8) if m <= 256 else (128, 128, 8)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, act_quant: bool = False) -> torch.Tensor:
    """y = x @ W.T for an FP8 weight [out,in] with UE8M0 block scales [ceil(out/128), ceil(in/128)].

    Same result as `ref.linear` (up to float32 summation order); output in x's dtype. Needs sm_89+.
    """
    check_runnable(x, weight)
    if not fp8_supported(x.device):
        raise RuntimeError("fp8_linear needs a GPU with e4m3 support (sm_89+)")
    x2 = x.reshape(-1, x.shape[-1])
    m, k = x2.shape
    n = weight.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out.view(*x.shape[:-1], n)
    bs = ue8m0_bytes(scale).contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    if act_quant:
        a, sa = act_quant_fp8(x2, ACT_BLOCK)
    else:
        a, sa = (x2 if x2.stride(-1) == 1 else x2.contiguous()), x2.new_empty(1, dtype=torch.float32)
    block_m, block_n, warps = _gemm_blocks(m)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _fp8_gemm_kernel[grid](
        a, sa, w, bs, out, m, n, k, a.stride(0), sa.stride(0), w.stride(0), bs.stride(0), out.stride(0),
        A_SCALED=act_quant, DOT=dot_dtype(x.dtype), PRECISION=dot_precision(x.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=ACT_BLOCK, num_warps=warps,
    )
    return out.view(*x.shape[:-1], n)


# --------------------------------------------------------------------------- FP4 grouped GEMM


@dataclass(frozen=True)
class ExpertWeights:
    """FP4 weights of E experts (spec §3.4): `weight` uint8 [E,out,in/2] and `scale` uint8 [E,out,in/32]
    when stacked, or int64 pointer tables [E] to per-expert tensors of those shapes (`from_list`)."""

    weight: torch.Tensor
    scale: torch.Tensor
    out_features: int
    in_features: int
    stacked: bool
    keepalive: tuple = ()

    @property
    def n_experts(self) -> int:
        return self.weight.shape[0]

    @classmethod
    def from_stacked(cls, weight: torch.Tensor, scale: torch.Tensor) -> ExpertWeights:
        """Stacked `[E, out, in/2]` int8 weights and `[E, out, in/32]` e8m0 scales."""
        e, out_f, half = weight.shape
        if scale.shape != (e, out_f, 2 * half // formats.FP4_BLOCK):
            raise ValueError(f"scale shape {tuple(scale.shape)} does not match weight {tuple(weight.shape)}")
        w, s = weight.contiguous().view(torch.uint8), ue8m0_bytes(scale).contiguous()
        return cls(w, s, out_f, 2 * half, True)

    @classmethod
    def from_list(cls, weights: Sequence[torch.Tensor], scales: Sequence[torch.Tensor]) -> ExpertWeights:
        """Per-expert `[out, in/2]` / `[out, in/32]` tensors addressed through pointer tables (no copy)."""
        ws = [w.contiguous().view(torch.uint8) for w in weights]
        ss = [ue8m0_bytes(s).contiguous() for s in scales]
        if len({tuple(w.shape) for w in ws}) != 1 or len({tuple(s.shape) for s in ss}) != 1:
            raise ValueError("all experts must share one weight shape and one scale shape")
        device = ws[0].device
        wt = torch.tensor([w.data_ptr() for w in ws], dtype=torch.int64, device=device)
        st = torch.tensor([s.data_ptr() for s in ss], dtype=torch.int64, device=device)
        return cls(wt, st, ws[0].shape[0], 2 * ws[0].shape[1], False, (tuple(ws), tuple(ss)))


@dataclass(frozen=True)
class Routing:
    """Rows grouped by expert for the grouped kernels (built once, shared by w1/w3 and w2).

    `sorted_rows` [n_blocks * BLOCK_M]: row ids grouped by expert, each group padded to BLOCK_M
    with `n_rows` (no row); `block_expert` [n_blocks]: the expert of each block, -1 = spare block.
    """

    sorted_rows: torch.Tensor
    block_expert: torch.Tensor
    n_rows: int
    block_m: int


def group_rows(expert_ids: torch.Tensor, n_experts: int, block_m: int) -> Routing:
    """Sort rows by expert and pad every expert's group to a multiple of `block_m` (no host sync)."""
    ids = expert_ids.reshape(-1).long()
    n = ids.numel()
    max_blocks = triton.cdiv(n, block_m) + min(n_experts, n)
    counts = torch.bincount(ids, minlength=n_experts)
    blocks = (counts + block_m - 1) // block_m
    order = torch.argsort(ids, stable=True)
    sorted_ids = ids[order]
    group_start = torch.cumsum(counts, 0) - counts
    padded_start = (torch.cumsum(blocks, 0) - blocks) * block_m
    slot = torch.arange(n, device=ids.device) - group_start[sorted_ids] + padded_start[sorted_ids]
    sorted_rows = torch.full((max_blocks * block_m,), n, dtype=torch.int32, device=ids.device)
    sorted_rows[slot] = order.to(torch.int32)
    block_ids = torch.arange(max_blocks, device=ids.device)
    block_expert = torch.searchsorted(torch.cumsum(blocks, 0), block_ids, right=True)
    block_expert = torch.where(block_expert < n_experts, block_expert, -1).to(torch.int32)
    return Routing(sorted_rows, block_expert, n, block_m)


@jit
def _fp4_tile(acc, x_even, x_odd, w_rows, s_rows, k0, kh, n_ok, K, DOT: tl.constexpr, PRECISION: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += x[:, k0:k0+BK] @ W[:, k0:k0+BK]^T for one packed FP4 tile (even/odd inputs split)."""
    k_ok = (k0 + 2 * kh) < K
    packed = tl.load(w_rows + (k0 // 2 + kh)[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
    g = tl.arange(0, BLOCK_K // 32)  # one UE8M0 scale per 32 inputs = 16 packed bytes
    sbyte = tl.load(s_rows + (k0 // 32 + g)[None, :], mask=n_ok[:, None] & ((k0 + 32 * g) < K)[None, :], other=127)
    scale = tl.reshape(tl.broadcast_to(ue8m0_value(sbyte)[:, :, None], (BLOCK_N, BLOCK_K // 32, 16)),
                       (BLOCK_N, BLOCK_K // 2))
    code = packed.to(tl.int32)
    w_lo = (e2m1_value(code & 15) * scale).to(DOT)
    w_hi = (e2m1_value((code >> 4) & 15) * scale).to(DOT)
    acc = tl.dot(x_even, tl.trans(w_lo), acc, input_precision=PRECISION)
    return tl.dot(x_odd, tl.trans(w_hi), acc, input_precision=PRECISION)


@jit
def _expert_rows(w_ptr, s_ptr, expert, rn, stride_we, stride_wn, stride_se, stride_sn, PTR_TABLE: tl.constexpr):
    """Pointers to rows `rn` of expert `expert`'s packed weight and scales: from a table of per-expert
    base addresses (PTR_TABLE) or from one stacked tensor."""
    if PTR_TABLE:
        w_base = tl.load(w_ptr + expert).to(tl.pointer_type(tl.uint8))
        s_base = tl.load(s_ptr + expert).to(tl.pointer_type(tl.uint8))
    else:
        w_base = w_ptr + expert.to(tl.int64) * stride_we
        s_base = s_ptr + expert.to(tl.int64) * stride_se
    return w_base + rn[:, None].to(tl.int64) * stride_wn, s_base + rn[:, None].to(tl.int64) * stride_sn


@jit
def _fp4_grouped_kernel(x_ptr, w_ptr, s_ptr, w3_ptr, s3_ptr, out_ptr, rw_ptr, rows_ptr, block_expert_ptr,
                        n_rows, N, K, x_div, stride_xm, stride_we, stride_wn, stride_se, stride_sn, stride_om,
                        swiglu_limit,
                        PTR_TABLE: tl.constexpr, SWIGLU: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[row] = x[row // x_div] @ W[e]^T for the rows of one expert block; with SWIGLU, the
    epilogue is clamp-SwiGLU(x W1^T, x W3^T) * route weight[row] (spec §2.8)."""
    expert = tl.load(block_expert_ptr + tl.program_id(0))
    if expert >= 0:
        rows = tl.load(rows_ptr + tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M))
        r_ok = rows < n_rows
        src = tl.where(r_ok, rows, 0) // x_div
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        kh = tl.arange(0, BLOCK_K // 2)
        w_rows, s_rows = _expert_rows(w_ptr, s_ptr, expert, rn, stride_we, stride_wn, stride_se, stride_sn, PTR_TABLE)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if SWIGLU:
            w3_rows, s3_rows = _expert_rows(w3_ptr, s3_ptr, expert, rn, stride_we, stride_wn, stride_se, stride_sn,
                                            PTR_TABLE)
            acc3 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        x_rows = x_ptr + src[:, None].to(tl.int64) * stride_xm
        for k0 in range(0, K, BLOCK_K):
            x_mask = r_ok[:, None] & ((k0 + 2 * kh) < K)[None, :]
            x_even = tl.load(x_rows + (k0 + 2 * kh)[None, :], mask=x_mask, other=0.0).to(tl.float32).to(DOT)
            x_odd = tl.load(x_rows + (k0 + 2 * kh + 1)[None, :], mask=x_mask, other=0.0).to(tl.float32).to(DOT)
            acc = _fp4_tile(acc, x_even, x_odd, w_rows, s_rows, k0, kh, n_ok, K, DOT, PRECISION, BLOCK_N, BLOCK_K)
            if SWIGLU:
                acc3 = _fp4_tile(acc3, x_even, x_odd, w3_rows, s3_rows, k0, kh, n_ok, K, DOT, PRECISION,
                                 BLOCK_N, BLOCK_K)
        if SWIGLU:
            # the reference rounds each projection to the activation dtype before the float32 SwiGLU
            gate = cast_rne(acc, out_ptr.dtype.element_ty).to(tl.float32)
            up = cast_rne(acc3, out_ptr.dtype.element_ty).to(tl.float32)
            if swiglu_limit > 0:
                gate = tl.minimum(gate, swiglu_limit)
                up = tl.minimum(tl.maximum(up, -swiglu_limit), swiglu_limit)
            rw = tl.load(rw_ptr + rows, mask=r_ok, other=0.0)
            acc = gate * tl.sigmoid(gate) * up * rw[:, None]
        out = out_ptr + rows[:, None].to(tl.int64) * stride_om + rn[None, :]
        tl.store(out, cast_rne(acc, out_ptr.dtype.element_ty), mask=r_ok[:, None] & n_ok[None, :])


def _grouped_blocks(n_rows: int, n_experts: int, swiglu: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) for the grouped kernel; BLOCK_K covers one activation-quant block.

    Chosen so that ptxas reports no spills on sm_90 (two accumulators with SWIGLU); not tuned on a GPU yet.
    """
    if INTERPRET:
        return 16, 32, 64, 4
    per_expert = max(1, n_rows // max(1, min(n_experts, n_rows)))
    if per_expert <= 16:  # decode: weight streaming, a few rows per expert
        return 16, 64, 128, 8 if swiglu else 4
    return (64, 64, 128, 8) if swiglu else (64, 128, 128, 8)


def _launch_grouped(x: torch.Tensor, x_div: int, w: ExpertWeights, routing: Routing, out: torch.Tensor,
                    w3: ExpertWeights | None = None, route_weight: torch.Tensor | None = None,
                    swiglu_limit: float = 0.0) -> None:
    block_m, block_n, block_k, warps = _grouped_blocks(routing.n_rows, w.n_experts, w3 is not None)
    if block_m != routing.block_m:
        raise ValueError(f"routing built for BLOCK_M={routing.block_m}, kernel wants {block_m}")
    stride_we, stride_wn = (w.weight.stride(0), w.weight.stride(1)) if w.stacked else (0, w.in_features // 2)
    stride_se, stride_sn = (w.scale.stride(0), w.scale.stride(1)) if w.stacked else (0, w.in_features // 32)
    grid = (routing.block_expert.numel(), triton.cdiv(w.out_features, block_n))
    _fp4_grouped_kernel[grid](
        x, w.weight, w.scale, (w3 or w).weight, (w3 or w).scale, out,
        route_weight if route_weight is not None else out, routing.sorted_rows, routing.block_expert,
        routing.n_rows, w.out_features, w.in_features, x_div, x.stride(0),
        stride_we, stride_wn, stride_se, stride_sn, out.stride(0), float(swiglu_limit),
        PTR_TABLE=not w.stacked, SWIGLU=w3 is not None, DOT=dot_dtype(x.dtype), PRECISION=dot_precision(x.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
    )


def _as_experts(weight: torch.Tensor | ExpertWeights, scale: torch.Tensor | None) -> ExpertWeights:
    if isinstance(weight, ExpertWeights):
        return weight
    if weight.dim() == 2:
        weight, scale = weight.unsqueeze(0), scale.unsqueeze(0)
    return ExpertWeights.from_stacked(weight, scale)


def fp4_grouped_linear(x: torch.Tensor, weight: torch.Tensor | ExpertWeights, scale: torch.Tensor | None,
                       expert_ids: torch.Tensor, act_quant: bool = False,
                       out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """out[t] = x[t] @ W[expert_ids[t]].T for FP4 expert weights (stacked `[E,out,in/2]` int8 with
    `[E,out,in/32]` e8m0 scales, or an `ExpertWeights`). x [T, in] -> [T, out] in `out_dtype` (x's).

    Row t equals `ref.linear(x[t], W[e], S[e], act_quant)` up to float32 summation order.
    """
    check_runnable(x, expert_ids)
    w = _as_experts(weight, scale)
    if w.in_features % formats.FP4_BLOCK or x.shape[-1] != w.in_features:
        raise ValueError(f"x has {x.shape[-1]} features, weights expect {w.in_features} (a multiple of 32)")
    x2 = x.reshape(-1, x.shape[-1])
    xin = fake_quant_fp8(x2, ACT_BLOCK) if act_quant else x2.contiguous()
    out = torch.empty((x2.shape[0], w.out_features), dtype=out_dtype or x.dtype, device=x.device)
    if x2.shape[0] == 0:
        return out
    routing = group_rows(expert_ids, w.n_experts, _grouped_blocks(x2.shape[0], w.n_experts, False)[0])
    _launch_grouped(xin, 1, w, routing, out)
    return out


def moe_experts_triton(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, w1: ExpertWeights,
                       w2: ExpertWeights, w3: ExpertWeights, swiglu_limit: float, act_quant: bool) -> torch.Tensor:
    """Routed FP4 experts (spec §2.8): sum_j w2[e](clamp-SwiGLU(w1[e] x, w3[e] x) * weights[t,j]) with
    e = indices[t,j]. x [T,D], weights [T,k] float32, indices [T,k] -> float32 [T,D]."""
    check_runnable(x, indices)
    t, k = indices.shape
    out_rows = t * k
    if out_rows == 0:
        return torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    xin = fake_quant_fp8(x, ACT_BLOCK) if act_quant else x.contiguous()
    block_m = _grouped_blocks(out_rows, w1.n_experts, True)[0]
    routing = group_rows(indices, w1.n_experts, block_m)  # row a = (token a // k, selection a % k)
    hidden = torch.empty((out_rows, w1.out_features), dtype=x.dtype, device=x.device)
    rw = weights.reshape(-1).float().contiguous()
    _launch_grouped(xin, k, w1, routing, hidden, w3=w3, route_weight=rw, swiglu_limit=swiglu_limit)
    if act_quant:
        hidden = fake_quant_fp8(hidden, ACT_BLOCK)
    y = torch.empty((out_rows, w2.out_features), dtype=x.dtype, device=x.device)
    _launch_grouped(hidden, 1, w2, routing, y)
    return y.view(t, k, -1).float().sum(1)


def moe_experts_ref(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, w1: Sequence, w2: Sequence,
                    w3: Sequence, swiglu_limit: float, act_quant: bool) -> torch.Tensor:
    """PyTorch twin of `moe_experts_triton`: `ref.swiglu_expert` per used expert, summed (like `MoE.routed`).
    w1/w2/w3: per-expert (weight, scale) pairs."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in torch.unique(indices).tolist():
        token, slot = torch.where(indices == e)
        y = ref.swiglu_expert(x[token], *w1[e], *w2[e], *w3[e], weights[token, slot, None], swiglu_limit, act_quant)
        out.index_add_(0, token, y)
    return out


# --------------------------------------------------------------------------- registry ops


def linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None,
           act_quant: bool = False) -> torch.Tensor:
    """Registry op (twin of `ref.linear`): FP8, FP4 and int3/int2 weights on the Triton kernels, others `F.linear`."""
    if weight.dtype == torch.float8_e4m3fn and runs_here(x, weight) and fp8_supported(x.device):
        return fp8_linear(x, weight, scale, act_quant)
    if weight.dtype == torch.int8 and runs_here(x, weight):
        x2 = x.reshape(-1, x.shape[-1])
        ids = torch.zeros(x2.shape[0], dtype=torch.int32, device=x.device)
        return fp4_grouped_linear(x2, weight, scale, ids, act_quant).view(*x.shape[:-1], weight.shape[0])
    if weight.dtype == torch.uint8 and scale is not None and runs_here(x, weight):
        return lowbit_linear(x, weight, scale, act_quant)
    if weight.dtype in ref.QUANTIZED_DTYPES:
        return ref.linear(x, weight, scale, act_quant)
    return F.linear(x, weight.to(x.dtype))


# --------------------------------------------------------------------------- int3 / int2 (dsv4 quantize)


@jit
def _lowbit_dequant_kernel(w_ptr, s_ptr, out_ptr, O, K, BITS: tl.constexpr, BLOCK_BYTES: tl.constexpr,
                           OFFSET: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[r, k] = (code(r, k) - OFFSET) * scale[r, k // 32]; input k's code sits at bit BITS * (k % 32) of
    its block's BLOCK_BYTES little-endian bytes (read as two bytes, the second only inside the block)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ok = (rows[:, None] < O) & (cols[None, :] < K)
    block = cols // 32
    bit = (cols % 32) * BITS
    byte = block * BLOCK_BYTES + bit // 8
    row_bytes = (K // 32) * BLOCK_BYTES
    base = w_ptr + rows[:, None].to(tl.int64) * row_bytes
    lo = tl.load(base + byte[None, :], mask=ok, other=0).to(tl.int32)
    has_hi = (bit // 8 + 1) < BLOCK_BYTES
    hi = tl.load(base + byte[None, :] + 1, mask=ok & has_hi[None, :], other=0).to(tl.int32)
    code = ((lo | (hi << 8)) >> (bit % 8)[None, :]) & ((1 << BITS) - 1)
    scale = tl.load(s_ptr + rows[:, None].to(tl.int64) * (K // 32) + block[None, :], mask=ok, other=0.0)
    value = (code - OFFSET).to(tl.float32) * scale.to(tl.float32)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], value, mask=ok)


def lowbit_dequantize(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """A stored int3/int2 weight (`U8 [O, K/32 * bytes]`, bf16 scales `[O, K/32]`) -> float32 `[O, K]`."""
    from dsv4cli.formats.lowbit import LOWBIT, lowbit_format

    fmt = lowbit_format(weight, scale)
    if fmt is None:
        raise ValueError(f"not an int3/int2 weight: {weight.dtype}{list(weight.shape)}")
    check_runnable(weight, scale)
    bits, nbytes, offset = LOWBIT[fmt]
    o, k = weight.shape[0], scale.shape[1] * 32
    out = torch.empty(o, k, dtype=torch.float32, device=weight.device)
    block_r, block_k = 16, 128
    grid = (triton.cdiv(o, block_r), triton.cdiv(k, block_k))
    _lowbit_dequant_kernel[grid](weight.contiguous(), scale.contiguous(), out, o, k, BITS=bits, BLOCK_BYTES=nbytes,
                                 OFFSET=offset, BLOCK_R=block_r, BLOCK_K=block_k)
    return out


def lowbit_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, act_quant: bool = False
                  ) -> torch.Tensor:
    """`ref.linear` for int3/int2 weights: the kernel's dequantized matrix, FP8 activation fake-quant when
    asked, a float32 GEMM; output in x's dtype."""
    if act_quant:
        x = fake_quant_fp8(x, ACT_BLOCK)
    return (x.float() @ lowbit_dequantize(weight, scale).T).to(x.dtype)


def swiglu_expert(x: torch.Tensor, w1: torch.Tensor, s1: torch.Tensor | None, w2: torch.Tensor,
                  s2: torch.Tensor | None, w3: torch.Tensor, s3: torch.Tensor | None,
                  route_weight: torch.Tensor | None, swiglu_limit: float, act_quant: bool) -> torch.Tensor:
    """Registry op (twin of `ref.swiglu_expert`): FP4 experts run the fused grouped kernels with E = 1;
    FP8 (shared expert) runs `fp8_linear` three times; other formats and mixes of formats (a `dsv4 quantize`
    recipe may keep one projection's format) go projection by projection through this module's `linear`."""
    dtypes = {w1.dtype, w2.dtype, w3.dtype}
    if dtypes == {torch.int8} and runs_here(x, w1):
        x2 = x.reshape(-1, x.shape[-1])
        n = x2.shape[0]
        rw = route_weight.reshape(n, 1) if route_weight is not None else x2.new_ones(n, 1, dtype=torch.float32)
        ids = torch.zeros(n, 1, dtype=torch.int32, device=x.device)
        out = moe_experts_triton(x2, rw, ids, _as_experts(w1, s1), _as_experts(w2, s2), _as_experts(w3, s3),
                                 swiglu_limit, act_quant)
        return out.view(*x.shape[:-1], out.shape[-1])
    if dtypes != {torch.float8_e4m3fn} or not runs_here(x, w1) or not fp8_supported(x.device):
        return ref.swiglu_with(linear, x, w1, s1, w2, s2, w3, s3, route_weight, swiglu_limit, act_quant)
    return ref.swiglu_with(fp8_linear, x, w1, s1, w2, s2, w3, s3, route_weight, swiglu_limit, act_quant)
