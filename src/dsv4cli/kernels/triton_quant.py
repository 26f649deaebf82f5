"""Triton activation quantization: FP8 e4m3 and FP4 e2m1 with power-of-two scales (spec §2.11, §3.4, §6.1).

GPU twins of `formats.fake_quant_fp8` / `formats.fake_quant_fp4` (the official `act_quant` /
`fp4_act_quant`): per row, per `block` columns, scale s = 2**ceil(log2(amax / max_code)) with
amax floored (1e-4 for FP8, 6 * 2**-126 for FP4), values rounded to nearest-even on the e4m3
grid (saturating at 448) or the e2m1 grid (clamped at 6). All rounding is integer/exact float
arithmetic in the kernel (no fp8 casts), so results are bit-identical on the GPU and under the
Triton interpreter. The ceil is exact (exponent bits, like the official `fast_log2_ceil`);
`formats.pow2_scale` takes the ceil of a float32 `log2`, which rounds down when amax / max_code is
within a few ulps above a power of two, so only there (never seen on random data) the two differ.

This module also holds the Triton guard shared by the other `triton_*` modules: importing it
never fails when triton is missing; launching a kernel then raises `RuntimeError`.
"""

from __future__ import annotations

import os

import torch

from dsv4cli.formats import official as formats
from dsv4cli.kernels import ref

try:  # the package works without triton; only launching kernels needs it
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - exercised by the import-guard test
    triton = None
    tl = None

HAS_TRITON = triton is not None
#: Triton decides interpreter vs compiler when `@triton.jit` runs, i.e. when this module is imported.
INTERPRET = HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def jit(fn):
    """`triton.jit` when triton is installed; otherwise the plain function (never launched)."""
    return triton.jit(fn) if HAS_TRITON else fn


def runs_here(*tensors: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on these tensors: CUDA tensors, or any under the interpreter."""
    if not HAS_TRITON:
        return False
    return INTERPRET or all(t.is_cuda for t in tensors)


def check_runnable(*tensors: torch.Tensor) -> None:
    """Raise a clear error instead of a Triton crash when the kernels cannot run here."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed (pip install 'dsv4cli[triton]')")
    if not runs_here(*tensors):
        raise RuntimeError("Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before importing triton)")


def dot_dtype(dtype: torch.dtype):
    """Operand type of `tl.dot`: the activation's 16-bit type on the GPU, float32 under the
    interpreter (it cannot do bf16 arithmetic) or for float32 activations."""
    if INTERPRET or dtype not in (torch.bfloat16, torch.float16):
        return tl.float32
    return tl.bfloat16 if dtype == torch.bfloat16 else tl.float16


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision: 'ieee' when the operands are float32 (no TF32 rounding)."""
    return "ieee" if dot_dtype(dtype) == tl.float32 else "tf32"


# --------------------------------------------------------------------------- device helpers


@jit
def exp2i(k):
    """2.0**k as float32 for integer k in [-127, 127], built from the exponent bits (exact)."""
    normal = (tl.maximum(k, -126) + 127) << 23
    bits = tl.where(k < -126, 0x400000, normal)
    return bits.to(tl.float32, bitcast=True)


@jit
def pow2_scale_exp(amax, MAX_EXP: tl.constexpr, MAX_MANT: tl.constexpr):
    """Exact ceil(log2(amax / max_code)) for positive normal amax, clamped at -127.

    max_code = (1 + MAX_MANT / 2**23) * 2**MAX_EXP; amax <= max_code * 2**k compares exponent
    and mantissa bits, so no division or log2 rounding is involved.
    """
    bits = amax.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127
    k = e - MAX_EXP + ((bits & 0x7FFFFF) > MAX_MANT).to(tl.int32)
    return tl.maximum(k, -127)


@jit
def round_half_even(t):
    """Round t >= 0 to the nearest integer, ties to even (floor-based, exact for t < 2**23)."""
    f = tl.floor(t)
    d = t - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return f + up.to(tl.float32)


@jit
def round_e4m3(y):
    """y (|y| <= 448) rounded to nearest-even on the e4m3 grid, as float32; the sign (and -0) kept."""
    a = tl.abs(y)
    e = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    step = tl.maximum(e, -6) - 3  # e4m3: 3 mantissa bits; subnormal spacing 2**-9
    r = round_half_even(a * exp2i(-step)) * exp2i(step)
    return tl.where(y.to(tl.int32, bitcast=True) < 0, -r, r)


@jit
def e4m3_bits(r):
    """The e4m3 byte of an exactly representable float32 value r."""
    rb = r.to(tl.int32, bitcast=True)
    a = tl.abs(r)
    e = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    normal = ((e + 7) << 3) | ((a.to(tl.int32, bitcast=True) >> 20) & 7)
    sub = (a * 512.0).to(tl.int32)
    code = tl.where(e >= -6, normal, sub) | ((rb >> 24) & 0x80)
    return code.to(tl.uint8)


@jit
def cast_rne(x, DTYPE: tl.constexpr):
    """float32 -> DTYPE rounding to nearest-even (bf16 rounded with integer ops first, because the
    interpreter truncates float32 -> bf16; on the GPU the extra step is a no-op)."""
    if DTYPE == tl.bfloat16:  # noqa: SIM300 - a constexpr compared at compile time
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        x = bits.to(tl.float32, bitcast=True)
    return x.to(DTYPE)


@jit
def round_e2m1(y):
    """y rounded to nearest-even on the e2m1 grid (|v| in {0, .5, 1, 1.5, 2, 3, 4, 6}), clamped at 6."""
    a = tl.minimum(tl.abs(y), 6.0)
    v = tl.where(a <= 5.0, 4.0, 6.0)
    v = tl.where(a < 3.5, 3.0, v)
    v = tl.where(a <= 2.5, 2.0, v)
    v = tl.where(a < 1.75, 1.5, v)
    v = tl.where(a <= 1.25, 1.0, v)
    v = tl.where(a < 0.75, 0.5, v)
    v = tl.where(a <= 0.25, 0.0, v)
    return tl.where(y < 0, -v, v)


@jit
def e2m1_value(code):
    """Decode e2m1 codes (int, 0..15; bit 3 = sign) to float32 (spec §3.4 table)."""
    mag = code & 7
    e = mag >> 1
    m = mag & 1
    normal = (((e + 126) << 23) | (m << 22)).to(tl.float32, bitcast=True)
    v = tl.where(e == 0, m.to(tl.float32) * 0.5, normal)
    return tl.where((code & 8) != 0, -v, v)


@jit
def ue8m0_value(byte):
    """Decode UE8M0 scale bytes (uint8) to float32 2**(byte - 127)."""
    return exp2i(byte.to(tl.int32) - 127)


# --------------------------------------------------------------------------- kernels


@jit
def _quant_kernel(x_ptr, fake_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_fm, stride_qm, stride_sm, amax_floor,
                  BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, FP4: tl.constexpr,
                  WRITE_FAKE: tl.constexpr, WRITE_Q: tl.constexpr):
    """One program = BLOCK_M rows x one quantization block of BLOCK columns."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = (rows < M)[:, None] & (cols < K)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), amax_floor)
    if FP4:
        k = pow2_scale_exp(amax, 2, 0x400000)  # 6 = 1.5 * 2**2
    else:
        k = pow2_scale_exp(amax, 8, 0x600000)  # 448 = 1.75 * 2**8
    scale = exp2i(k)
    y = x * exp2i(-k)[:, None]  # exact: division by a power of two
    if FP4:
        r = round_e2m1(y)
    else:
        r = round_e4m3(tl.minimum(tl.maximum(y, -448.0), 448.0))
    if WRITE_FAKE:
        fake = r * scale[:, None]
        tl.store(fake_ptr + rows[:, None] * stride_fm + cols[None, :],
                 fake.to(fake_ptr.dtype.element_ty), mask=mask)
    if WRITE_Q:
        tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :], e4m3_bits(r), mask=mask)
        tl.store(s_ptr + rows * stride_sm + tl.program_id(1), scale, mask=rows < M)


# --------------------------------------------------------------------------- launchers


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as a 2-D [rows, last dim] view with unit column stride (copies only if needed)."""
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _launch_quant(x2: torch.Tensor, block: int, fp4: bool, amax_floor: float, fake: torch.Tensor | None,
                  q: torch.Tensor | None, s: torch.Tensor | None) -> None:
    if block & (block - 1) or block < 16:
        raise ValueError(f"quantization block must be a power of two >= 16, got {block}")
    m, k = x2.shape
    if m == 0 or k == 0:
        return
    amax_floor = amax_floor if amax_floor > 0 else 2.0**-126  # formats.pow2_scale's floor
    block_m = 4 if INTERPRET else max(1, min(16, 4096 // block))
    grid = (triton.cdiv(m, block_m), triton.cdiv(k, block))
    dummy = x2
    _quant_kernel[grid](
        x2, fake if fake is not None else dummy, q if q is not None else dummy, s if s is not None else dummy,
        m, k, x2.stride(0), fake.stride(0) if fake is not None else 0, q.stride(0) if q is not None else 0,
        s.stride(0) if s is not None else 0, float(amax_floor),
        BLOCK=block, BLOCK_M=block_m, FP4=fp4, WRITE_FAKE=fake is not None, WRITE_Q=q is not None,
    )


def act_quant_fp8(x: torch.Tensor, block: int = formats.FP8_BLOCK, amax_floor: float = 1e-4
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 activation quantization (official `act_quant`, ue8m0 scales): x [..., K] ->
    (q float8_e4m3fn [..., K], scale float32 [..., ceil(K/block)]); q * scale = `fake_quant_fp8(x)`."""
    check_runnable(x)
    x2 = _rows(x)
    m, k = x2.shape
    q = torch.empty((m, k), dtype=torch.uint8, device=x.device)
    s = torch.empty((m, triton.cdiv(k, block)), dtype=torch.float32, device=x.device)
    _launch_quant(x2, block, False, amax_floor, None, q, s)
    return q.view(torch.float8_e4m3fn).view(x.shape), s.view(*x.shape[:-1], s.shape[-1])


def fake_quant_fp8(x: torch.Tensor, block: int, amax_floor: float = 1e-4) -> torch.Tensor:
    """Bit-exact Triton twin of `formats.fake_quant_fp8` (e4m3 quantize-dequantize, x's dtype)."""
    check_runnable(x)
    x2 = _rows(x)
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    _launch_quant(x2, block, False, amax_floor, out, None, None)
    return out.view(x.shape)


def fake_quant_fp4(x: torch.Tensor, block: int = formats.FP4_BLOCK) -> torch.Tensor:
    """Bit-exact Triton twin of `formats.fake_quant_fp4` (e2m1 quantize-dequantize, x's dtype)."""
    check_runnable(x)
    x2 = _rows(x)
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    _launch_quant(x2, block, True, formats.FP4_MAX * 2.0**-126, out, None, None)
    return out.view(x.shape)


def act_quant_fp8_ref(x: torch.Tensor, block: int = formats.FP8_BLOCK, amax_floor: float = 1e-4
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch twin of `act_quant_fp8` built on `formats` (same outputs)."""
    k = x.shape[-1]
    pad = -k % block
    xf = torch.nn.functional.pad(x.float(), (0, pad)).reshape(*x.shape[:-1], -1, block)
    scale = formats.pow2_scale(xf.abs().amax(-1, keepdim=True), formats.FP8_MAX, floor=amax_floor)
    q = (xf / scale).clamp(-formats.FP8_MAX, formats.FP8_MAX).to(torch.float8_e4m3fn)
    return q.flatten(-2)[..., :k], scale.squeeze(-1)


# --------------------------------------------------------------------------- registry ops


def kv_fp8_quant(x: torch.Tensor, rope_head_dim: int) -> torch.Tensor:
    """Registry op (twin of `ref.kv_fp8_quant`): FP8 fake-quant (block 64) of the non-RoPE dims."""
    if not runs_here(x):
        return ref.kv_fp8_quant(x, rope_head_dim)
    out = x.contiguous().clone()
    nope = out.view(-1, x.shape[-1])[:, : x.shape[-1] - rope_head_dim]
    _launch_quant(nope, 64, False, 1e-4, nope, None, None)
    return out


def indexer_fp4_quant(x: torch.Tensor) -> torch.Tensor:
    """Registry op (twin of `ref.indexer_fp4_quant`): Hadamard rotation (torch) then Triton FP4 fake-quant."""
    if not runs_here(x):
        return ref.indexer_fp4_quant(x)
    return fake_quant_fp4((x.float() @ ref.hadamard(x.shape[-1], x.device)).to(x.dtype), formats.FP4_BLOCK)
