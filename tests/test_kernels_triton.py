"""Triton kernels vs their PyTorch twins (spec §2.2, §2.3, §2.8, §2.11, §3.4, §6.1).

Triton picks interpreter or compiler when `@triton.jit` decorates a kernel, i.e. when the
`dsv4cli.kernels.triton_*` modules are imported, so TRITON_INTERPRET=1 has to be set before that
import and must not leak into other test modules. The `check_*` functions therefore run in child
processes (this file run as a script with the flag in their environment, split over two workers)
on tiny CPU shapes, and each is reported as its own test. A third child compiles every kernel
configuration the wrappers launch for sm_90 (Triton -> cubin, nothing runs), which the interpreter
cannot check. The `gpu`-marked tests run in-process at V4-Flash shapes and are skipped without CUDA
(the interpreter is far too slow for those).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from dsv4cli.formats import official as formats
from dsv4cli.kernels import ref

CHECKS: dict[str, Callable[[], None]] = {}


def check(fn: Callable[[], None]) -> Callable[[], None]:
    """Register an interpreter parity check (runs in a child process with TRITON_INTERPRET=1)."""
    CHECKS[fn.__name__] = fn
    return fn


def bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bit patterns (so -0.0 != 0.0 and NaNs compare)."""
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def wide_range(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    """Random values over ~10 decades (so e4m3 subnormals, saturation-free blocks and tiny blocks all occur),
    with one all-zero row and a few exact zeros / negative zeros."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * torch.logspace(-7, 3, shape[-1])
    flat = x.view(-1, shape[-1])
    flat[0] = 0.0
    if flat.shape[0] > 1:
        flat[1, :3] = torch.tensor([0.0, -0.0, 1e-30])
    return x.to(dtype)


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol_frac: float = 0.0) -> None:
    """allclose in float32 with an absolute tolerance relative to the largest expected magnitude."""
    expected = expected.float()
    atol = atol_frac * float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual.float(), expected, rtol=rtol, atol=atol)


def act_tol(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol fraction) for outputs in `dtype` computed in float32 in another summation order."""
    return (1e-5, 1e-6) if dtype == torch.float32 else (2**-7, 2**-8)


# ----------------------------------------------------------------------------- quantization


@check
def check_fake_quant_fp8_bit_exact():
    from dsv4cli.kernels import triton_quant as tq

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for shape, block in (((5, 300), 128), ((3, 2, 64), 64), ((7, 96), 32)):
            x = wide_range(*shape, dtype=dtype)
            if dtype == torch.float16:
                x = x.clamp(-6e4, 6e4)
            got, want = tq.fake_quant_fp8(x, block), formats.fake_quant_fp8(x, block)
            assert torch.equal(bits(got), bits(want)), (dtype, shape)
    # every e4m3 value, every midpoint (ties to even) and its float32 neighbours; scale 1 (amax exactly 448)
    values = torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    mids = (values[:-1] + values[1:]) / 2
    near = [torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1)]
    grid = torch.cat([values, mids, *near])
    grid = torch.cat([grid, -grid, torch.zeros(-2 * grid.numel() % 127)]).view(-1, 127)
    grid = torch.cat([torch.full((grid.shape[0], 1), 448.0), grid], dim=1)
    assert torch.equal(bits(tq.fake_quant_fp8(grid, 128)), bits(formats.fake_quant_fp8(grid, 128)))
    floor0 = torch.zeros(2, 64)
    assert torch.equal(bits(tq.fake_quant_fp8(floor0, 64, 0.0)), bits(formats.fake_quant_fp8(floor0, 64, 0.0)))


@check
def check_fake_quant_fp4_bit_exact():
    from dsv4cli.kernels import triton_quant as tq

    for dtype in (torch.float32, torch.bfloat16):
        for shape in ((5, 96), (2, 3, 64)):
            x = wide_range(*shape, dtype=dtype, seed=1)
            assert torch.equal(bits(tq.fake_quant_fp4(x, 32)), bits(formats.fake_quant_fp4(x, 32))), (dtype, shape)
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0]).repeat(4)
    grid = torch.cat([torch.linspace(-6, 6, 32 * 63), ties, -ties]).view(-1, 32).clone()
    grid[:, 0] = 6.0  # scale 1: the grid values are the e2m1 inputs themselves
    assert torch.equal(bits(tq.fake_quant_fp4(grid)), bits(formats.fake_quant_fp4(grid)))
    tiny = torch.full((1, 32), 1e-39)  # amax floor 6 * 2**-126
    assert torch.equal(bits(tq.fake_quant_fp4(tiny)), bits(formats.fake_quant_fp4(tiny)))


@check
def check_act_quant_fp8_matches_reference():
    from dsv4cli.kernels import triton_quant as tq

    for dtype, shape, block in ((torch.float32, (6, 300), 128), (torch.bfloat16, (2, 3, 128), 128),
                                (torch.float32, (4, 100), 64)):
        x = wide_range(*shape, dtype=dtype, seed=2)
        q, s = tq.act_quant_fp8(x, block)
        q_ref, s_ref = tq.act_quant_fp8_ref(x, block)
        assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
        assert s.shape == (*x.shape[:-1], -(-x.shape[-1] // block))
        assert torch.equal(bits(q), bits(q_ref)) and torch.equal(s, s_ref)
        if x.shape[-1] % block == 0:  # q * scale is the fake-quantized activation
            fake = (q.float().unflatten(-1, (-1, block)) * s[..., None]).flatten(-2).to(dtype)
            assert torch.equal(bits(fake), bits(formats.fake_quant_fp8(x, block)))


@check
def check_pow2_scale_is_exact_ceil():
    """The kernel's scale is the exact 2**ceil(log2(amax/448)) (official `fast_log2_ceil`)."""
    from dsv4cli.kernels import triton_quant as tq

    amax = torch.tensor([448.0, 449.0, 1.0, 448.0 * 2.0**-10, 1e-5])
    nudged = torch.nextafter(torch.tensor(448.0 * 2.0**-10), torch.tensor(1.0))  # just above a power of two
    amax = torch.cat([amax, nudged.view(1)])
    x = torch.zeros(amax.numel(), 128)
    x[:, 5] = amax
    _, s = tq.act_quant_fp8(x, 128)
    expected = torch.tensor([1.0, 2.0, 2.0**-8, 2.0**-10, 2.0**-22, 2.0**-9])  # 1e-5 is floored at 1e-4
    assert torch.equal(s[:, 0], expected), s[:, 0]


@check
def check_kv_and_indexer_quant_ops():
    from dsv4cli.kernels import triton_quant as tq

    kv = wide_range(2, 3, 192, dtype=torch.bfloat16, seed=3)
    assert torch.equal(bits(tq.kv_fp8_quant(kv, 64)), bits(ref.kv_fp8_quant(kv, 64)))
    x = torch.randn(3, 5, 64).to(torch.bfloat16)
    assert torch.equal(bits(tq.indexer_fp4_quant(x)), bits(ref.indexer_fp4_quant(x)))


@check
def check_rope():
    from dsv4cli.kernels import triton_rope

    g = torch.Generator().manual_seed(9)
    angles = torch.rand(3, 8, generator=g) * 100
    cos, sin = angles.cos(), angles.sin()
    for x, c, s in ((torch.randn(2, 3, 4, 48, generator=g).to(torch.bfloat16), cos[:, None], sin[:, None]),
                    (torch.randn(2, 3, 16, generator=g), cos, sin),  # RoPE on every dim
                    (torch.randn(1, 3, 40, generator=g).to(torch.bfloat16), cos, sin)):
        for inverse in (False, True):
            got, want = triton_rope.rope(x, c, s, inverse), ref.rope(x, c, s, inverse)
            assert got.dtype == want.dtype and got.shape == want.shape
            ulp = 2.0**-7 if x.dtype == torch.bfloat16 else 1e-6  # the last bit of a rounding (or a fused add)
            torch.testing.assert_close(got.float(), want.float(), rtol=ulp, atol=1e-6)
    odd = torch.randn(2, 3, 4, 48, generator=g)  # 4-D angles: the reference's broadcasting
    assert torch.equal(triton_rope.rope(odd, cos[None, :, None], sin[None, :, None]),
                       ref.rope(odd, cos[None, :, None], sin[None, :, None]))


# ----------------------------------------------------------------------------- GEMMs


def fp4_experts(n_experts: int, out_f: int, in_f: int, seed: int, std: float = 0.1) -> list:
    g = torch.Generator().manual_seed(seed)
    return [formats.quantize_fp4_rows(torch.randn(out_f, in_f, generator=g) * std) for _ in range(n_experts)]


def stacked(pairs: list):
    from dsv4cli.kernels.triton_gemm import ExpertWeights

    return ExpertWeights.from_stacked(torch.stack([w for w, _ in pairs]), torch.stack([s for _, s in pairs]))


@check
def check_fp8_linear():
    from dsv4cli.kernels import triton_gemm as tg

    torch.manual_seed(0)
    for m, n, k in ((3, 40, 200), (17, 130, 256), (1, 16, 128)):
        wq, ws = formats.quantize_fp8_blocks(torch.randn(n, k) * 0.05)
        for dtype in (torch.float32, torch.bfloat16):
            x = (torch.randn(2, m, k) * 2).to(dtype)
            for act_quant in (False, True):
                y = tg.fp8_linear(x, wq, ws, act_quant)
                assert y.shape == (2, m, n) and y.dtype == dtype
                assert_close_scaled(y, ref.linear(x, wq, ws, act_quant), *act_tol(dtype))


@check
def check_fp4_grouped_linear():
    from dsv4cli.kernels import triton_gemm as tg

    pairs = fp4_experts(5, 48, 96, seed=1)  # 96 inputs: not a multiple of the 64-wide K tile
    weight, scale = torch.stack([w for w, _ in pairs]), torch.stack([s for _, s in pairs])
    ids = torch.tensor([3, 0, 3, 3, 1, 4, 4, 0] + [3] * 16)  # expert 3 spans two row blocks; 2 unused
    table = tg.ExpertWeights.from_list([w for w, _ in pairs], [s for _, s in pairs])
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(ids.numel(), 96).to(dtype)
        for act_quant in (False, True):
            y = tg.fp4_grouped_linear(x, weight, scale, ids, act_quant)
            expected = torch.cat([ref.linear(x[i:i + 1], *pairs[e], act_quant) for i, e in enumerate(ids.tolist())])
            assert_close_scaled(y, expected, *act_tol(dtype))
            assert torch.equal(tg.fp4_grouped_linear(x, table, None, ids, act_quant), y)  # pointer-addressed
    assert tg.fp4_grouped_linear(torch.zeros(0, 96), weight, scale, ids[:0]).shape == (0, 48)


@check
def check_lowbit_dequantize_and_linear():
    """int3/int2 (`dsv4 quantize`): the Triton decoder is bit-exact with `dequantize_lowbit`; the linear matches
    `ref.linear` (odd shapes: partial row and column tiles)."""
    from dsv4cli.formats.lowbit import dequantize_lowbit, quantize_lowbit
    from dsv4cli.kernels import triton_gemm as tg

    g = torch.Generator().manual_seed(7)
    for fmt in ("int3", "int2"):
        for o, k in ((5, 96), (33, 256)):
            q, s = quantize_lowbit(torch.randn(o, k, generator=g), fmt)
            assert torch.equal(bits(tg.lowbit_dequantize(q, s)), bits(dequantize_lowbit(q, s))), (fmt, o, k)
            x = torch.randn(3, k, generator=g)
            for act_quant in (False, True):
                torch.testing.assert_close(tg.linear(x, q, s, act_quant), ref.linear(x, q, s, act_quant),
                                           rtol=1e-5, atol=1e-5)


@check
def check_group_rows_layout():
    from dsv4cli.kernels.triton_gemm import group_rows

    ids = torch.tensor([2, 0, 2, 2, 2, 5, 0, 2])  # expert 2: 5 rows -> two blocks of 4
    r = group_rows(ids, 6, 4)
    experts = r.block_expert.tolist()
    assert experts[:4] == [0, 2, 2, 5] and all(e == -1 for e in experts[4:])
    rows = r.sorted_rows.view(-1, 4)
    for block, e in enumerate(experts):
        real = [v for v in rows[block].tolist() if v < ids.numel()]
        assert all(ids[v] == e for v in real)
    assert sorted(v for v in r.sorted_rows.tolist() if v < ids.numel()) == list(range(ids.numel()))


@check
def check_moe_experts():
    from dsv4cli.kernels import triton_gemm as tg

    dim, inter, n_experts = 64, 32, 6
    w1, w3 = fp4_experts(n_experts, inter, dim, 2, 0.2), fp4_experts(n_experts, inter, dim, 3, 0.2)
    w2 = fp4_experts(n_experts, dim, inter, 4, 0.2)
    g = torch.Generator().manual_seed(5)
    indices = torch.randint(0, n_experts - 1, (7, 3), generator=g)  # expert 5 never used
    indices[0] = torch.tensor([2, 2, 1])  # duplicate selection within a token
    weights = torch.rand(7, 3, generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(7, dim, generator=g) * 3).to(dtype)
        for limit, act_quant in ((1.0, False), (1.0, True), (0.0, True)):
            y = tg.moe_experts_triton(x, weights, indices, stacked(w1), stacked(w2), stacked(w3), limit, act_quant)
            expected = tg.moe_experts_ref(x, weights, indices, w1, w2, w3, limit, act_quant)
            assert y.dtype == torch.float32
            assert_close_scaled(y, expected, *act_tol(dtype))


@check
def check_registry_ops():
    from dsv4cli import kernels
    from dsv4cli.kernels import triton_ops

    assert triton_ops.usable(force=True) and kernels.install(triton_ops.implementations())
    try:
        assert all(v.startswith("dsv4cli.kernels.triton_") for v in kernels.active().values())
        x = torch.randn(2, 3, 64).to(torch.bfloat16)
        w8, s8 = formats.quantize_fp8_blocks(torch.randn(40, 64) * 0.1)
        w4, s4 = formats.quantize_fp4_rows(torch.randn(40, 64) * 0.1)
        wb = torch.randn(40, 64, dtype=torch.bfloat16)
        for w, s in ((w8, s8), (w4, s4), (wb, None)):
            assert_close_scaled(kernels.linear(x, w, s, True), ref.linear(x, w, s, True), *act_tol(x.dtype))
        rw = torch.rand(6, 1)
        xf = x.view(6, 64)
        for fmt in ("fp4", "fp8"):
            quant = formats.quantize_fp4_rows if fmt == "fp4" else formats.quantize_fp8_blocks
            up, gate, down = quant(torch.randn(32, 64) * 0.2), quant(torch.randn(32, 64) * 0.2), quant(
                torch.randn(64, 32) * 0.2)
            args = (xf, *gate, *down, *up, rw, 1.5, True)
            assert_close_scaled(kernels.swiglu_expert(*args), ref.swiglu_expert(*args), *act_tol(x.dtype))
    finally:
        kernels.reset()


# ----------------------------------------------------------------------------- attention and mHC


def index_lists(b: int, s: int, k: int, n: int, g: torch.Generator, skip: float = 0.3) -> torch.Tensor:
    """[b,s,k] distinct row indices of kv (the model's lists never repeat a row), a fraction -1."""
    order = torch.rand(b, s, max(n, k), generator=g).argsort(-1)[..., :k]
    idx = torch.where(order < n, order, -1)
    return idx.masked_fill(torch.rand(b, s, k, generator=g) < skip, -1)


@check
def check_sparse_attn():
    from dsv4cli.kernels import triton_attn

    g = torch.Generator().manual_seed(6)
    b, s, h, d = 2, 3, 5, 40  # H, D and K all off the block sizes
    for n, k in ((30, 37), (100, 20)):  # the reference's dense path (N <= 2K) and its gather path
        for dtype in (torch.float32, torch.bfloat16):
            q = torch.randn(b, s, h, d, generator=g).to(dtype)
            kv = torch.randn(b, n, d, generator=g).to(dtype)
            sink = torch.randn(h, generator=g)
            idx = index_lists(b, s, k, n, g)
            idx[0, 1] = -1  # every index skipped: only the sink remains -> output 0
            y = triton_attn.sparse_attn(q, kv, sink, idx, d**-0.5)
            assert_close_scaled(y, ref.sparse_attn(q, kv, sink, idx, d**-0.5), *act_tol(dtype))
            assert torch.equal(y[0, 1].float(), torch.zeros(h, d))


@check
def check_cached_attn():
    from dsv4cli.formats.kvcache import encode_kv_rows
    from dsv4cli.kernels import triton_longctx

    g = torch.Generator().manual_seed(8)
    b, s, h, d, rope = 2, 3, 5, 128, 64
    for n_pool, k in ((30, 37), (100, 20), (12, 0)):
        for dtype in (torch.float32, torch.bfloat16):
            q = torch.randn(b, s, h, d, generator=g).to(dtype)
            local = torch.randn(b, 9, d, generator=g).to(dtype)
            local_idx = index_lists(1, s, 6, 9, g)
            pool = ref.kv_fp8_quant(torch.randn(b, n_pool, d, generator=g).to(dtype), rope)
            pool_idx = index_lists(b, s, k, n_pool, g)
            sink = torch.randn(h, generator=g)
            for stored in (pool, encode_kv_rows(pool, rope)):
                if stored.dtype == torch.uint8 and dtype == torch.float32:
                    continue  # compact rows are the bf16 model's
                y = triton_longctx.cached_attn(q, local, local_idx, stored, pool_idx, sink, d**-0.5, rope)
                want = ref.cached_attn(q, local, local_idx, stored, pool_idx, sink, d**-0.5, rope)
                assert_close_scaled(y, want, *act_tol(dtype))
            empty = torch.full_like(local_idx, -1)
            y = triton_longctx.cached_attn(q, local, empty, pool, torch.full_like(pool_idx, -1), sink, d**-0.5, rope)
            assert torch.equal(y.float(), torch.zeros(b, s, h, d))


@check
def check_indexer_topk():
    from dsv4cli.formats.kvcache import encode_index_rows
    from dsv4cli.kernels import triton_longctx

    g = torch.Generator().manual_seed(9)
    for b, s, h, d, n, topk, integer in ((1, 1, 4, 32, 50, 8, True), (2, 5, 5, 64, 33, 5, False),
                                         (1, 4, 3, 32, 10, 16, True)):
        if integer:  # exact scores: many ties, which must go to the earlier entry
            q = torch.randint(-2, 3, (b, s, h, d), generator=g).float()
            keys = torch.randint(-1, 2, (b, n, d), generator=g).float()
            weights = torch.randint(0, 3, (b, s, h), generator=g).float()
        else:
            q, keys, weights = torch.randn(b, s, h, d, generator=g), torch.randn(b, n, d, generator=g), torch.rand(
                b, s, h, generator=g)
        keys[:, ::5] = 0
        visible = torch.randint(0, n + 1, (s,), generator=g)
        for stored in (keys, encode_index_rows(keys)):
            got = triton_longctx.indexer_topk(q, weights, stored, visible, topk)
            assert torch.equal(got, ref.indexer_topk(q, weights, stored, visible, topk)), (b, s, n, stored.dtype)


@check
def check_hc_split_sinkhorn():
    from dsv4cli.kernels import triton_hc

    g = torch.Generator().manual_seed(7)
    for n, iters in ((4, 20), (2, 20), (3, 5), (4, 1)):
        mixes = torch.randn(3, 7, (2 + n) * n, generator=g) * 2
        scale, base = torch.randn(3, generator=g), torch.randn((2 + n) * n, generator=g)
        got = triton_hc.hc_split_sinkhorn(mixes, scale, base, n, iters, 1e-6)
        want = ref.hc_split_sinkhorn(mixes, scale, base, n, iters, 1e-6)
        for a, e in zip(got, want, strict=True):
            assert a.shape == e.shape and a.dtype == torch.float32
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- compile check (sm_90, no GPU)


def compile_launches() -> dict[str, str | None]:
    """Compile (Triton -> PTX -> cubin via the bundled ptxas) every kernel launch made by representative calls
    at GPU tile sizes, for sm_90, without a GPU: launches are intercepted, nothing runs. Catches what the
    interpreter cannot (compile-time typing, fp8 support, layouts). Uses Triton internals; skipped if they move."""
    import traceback

    import triton

    from dsv4cli.kernels import triton_attn, triton_gemm, triton_hc, triton_quant

    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, make_backend
        from triton.runtime.jit import JITFunction, create_function_from_signature

        JITFunction._pack_args  # noqa: B018 - the private helpers this check relies on
    except (ImportError, AttributeError) as e:
        return {"compile": f"SKIP: this Triton's compile internals differ ({e!r})"}
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    results: dict[str, str | None] = {}

    def compile_only(self, *args, grid, warmup, **kwargs):
        bound, spec, options = create_function_from_signature(self.signature, self.params, backend)(*args, **kwargs)
        options, sig, consts, attrs = self._pack_args(backend, kwargs, bound, spec, options)
        config = ", ".join(f"{self.params[path[0]].name}={v}" for path, v in sorted(consts.items()))
        name = f"{self.fn.__name__}({config}, num_warps={options.num_warps})"
        if name not in results:
            try:
                triton.compile(ASTSource(self, sig, consts, attrs), target=target, options=options.__dict__)
                results[name] = None
            except Exception:
                results[name] = traceback.format_exc()[-3000:]

    JITFunction.run = compile_only
    from dsv4cli.kernels import triton_longctx

    for module in (triton_quant, triton_gemm, triton_attn, triton_hc, triton_longctx):
        module.runs_here = lambda *tensors: True
    triton_quant.check_runnable = triton_gemm.check_runnable = lambda *tensors: None
    triton_gemm.fp8_supported = lambda device: True

    bf16 = torch.bfloat16
    triton_quant.fake_quant_fp4(torch.randn(8, 512).to(bf16))
    triton_quant.kv_fp8_quant(torch.randn(2, 3, 512).to(bf16), 64)
    wq, ws = formats.quantize_fp8_blocks(torch.randn(256, 512))
    for rows, dtype in ((4, bf16), (64, bf16), (512, bf16), (4, torch.float32)):  # every fp8 GEMM tile config
        for act_quant in (False, True):
            triton_gemm.fp8_linear(torch.randn(rows, 512).to(dtype), wq, ws, act_quant)
    w4 = [formats.quantize_fp4_rows(torch.randn(256, 512)) for _ in range(3)]
    w4t = [formats.quantize_fp4_rows(torch.randn(512, 256)) for _ in range(3)]
    table = triton_gemm.ExpertWeights.from_list([w for w, _ in w4], [s for _, s in w4])
    for rows in (4, 512):  # decode and prefill tiles; stacked and pointer-table weights
        idx = torch.randint(0, 3, (rows, 2))
        x = torch.randn(rows, 512).to(bf16)
        triton_gemm.moe_experts_triton(x, torch.rand(rows, 2), idx, stacked(w4), stacked(w4t), stacked(w4), 10.0, True)
        triton_gemm.fp4_grouped_linear(x, table, None, idx[:, 0], False)
    from dsv4cli.formats.lowbit import quantize_lowbit

    for fmt in ("int3", "int2"):
        triton_gemm.lowbit_dequantize(*quantize_lowbit(torch.randn(64, 512), fmt))
    for d, dtype in ((512, bf16), (128, torch.float32)):
        triton_attn.sparse_attn(torch.randn(1, 2, 64, d).to(dtype), torch.randn(1, 100, d).to(dtype), torch.randn(64),
                                torch.randint(0, 100, (1, 2, 64)), d**-0.5)
    triton_hc.hc_split_sinkhorn(torch.randn(5, 24), torch.randn(3), torch.randn(24), 4, 20, 1e-6)
    from dsv4cli.kernels import triton_rope

    triton_rope.runs_here = lambda *tensors: True
    angles = torch.rand(4, 32)
    for x in (torch.randn(1, 4, 64, 512).to(bf16), torch.randn(1, 4, 128)):
        triton_rope.rope(x, angles.cos()[:, None] if x.dim() == 4 else angles.cos(),
                         angles.sin()[:, None] if x.dim() == 4 else angles.sin(), True)
    from dsv4cli.formats.kvcache import encode_index_rows, encode_kv_rows

    q, local = torch.randn(1, 1, 64, 512).to(bf16), torch.randn(1, 129, 512).to(bf16)
    pool = encode_kv_rows(torch.randn(1, 600, 512).to(bf16), 64)
    for stored in (pool, torch.randn(1, 600, 512).to(bf16)):  # compact and dense pools
        triton_longctx.cached_attn(q, local, torch.arange(128)[None, None], stored, torch.arange(512)[None, None],
                                   torch.randn(64), 512**-0.5, 64)
    for keys in (encode_index_rows(torch.randn(1, 300, 128)), torch.randn(1, 300, 128).to(bf16)):
        triton_longctx.indexer_topk(torch.randn(1, 2, 64, 128).to(bf16), torch.rand(1, 2, 64), keys,
                                    torch.tensor([300, 300]), 64)
    return results


# ----------------------------------------------------------------------------- child-process driver


def worker_main(mode: str, out: Path, names: list[str]) -> None:
    """Child entry point: `interpret` runs the named checks, `compile` the sm_90 compile check;
    writes {name: traceback or None} as JSON to `out`."""
    import traceback

    results = compile_launches() if mode == "compile" else {}
    for name in names:
        try:
            CHECKS[name]()
            results[name] = None
        except Exception:
            results[name] = traceback.format_exc()
    out.write_text(json.dumps(results))


def _selected(session: pytest.Session, test_name: str) -> set:
    """Parameters (or True) of the collected items of `test_name` in this module."""
    items = [item for item in session.items
             if getattr(item, "originalname", None) == test_name and item.module.__name__ == __name__]
    return {item.callspec.params["name"] if hasattr(item, "callspec") else True for item in items}


@pytest.fixture(scope="module")
def children(request: pytest.FixtureRequest) -> dict[str, str | None]:
    """Run the selected interpreter checks (TRITON_INTERPRET=1, two workers) and the compile check in parallel
    child processes; {name: failure traceback or None}."""
    pytest.importorskip("triton")
    names = sorted(_selected(request.session, "test_interpreted"))
    base = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    base.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    n_workers = max(1, min(2, os.cpu_count() or 1, len(names)))
    jobs = [("interpret", names[w::n_workers]) for w in range(n_workers) if names[w::n_workers]]
    if _selected(request.session, "test_kernels_compile_for_sm90"):
        jobs.append(("compile", []))
    results: dict[str, str | None] = {}
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for i, (mode, group) in enumerate(jobs):
            out = Path(tmp) / f"results{i}.json"
            env = {**base, "TRITON_INTERPRET": "1"} if mode == "interpret" else base
            cmd = [sys.executable, __file__, mode, str(out), *group]
            procs.append((subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT), out, mode))
        for proc, out, mode in procs:
            log, _ = proc.communicate(timeout=900)
            if proc.returncode or not out.exists():
                results[mode] = f"{mode} worker failed ({proc.returncode}):\n{log.decode(errors='replace')[-4000:]}"
            else:
                results.update(json.loads(out.read_text()))
                results.setdefault(mode, None)
    return results


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_interpreted(name: str, children: dict[str, str | None]) -> None:
    """Parity of one Triton kernel with its twin, run by the Triton interpreter on CPU."""
    failure = children.get("interpret") or children[name]
    if failure is not None:
        pytest.fail(failure, pytrace=False)


def test_kernels_compile_for_sm90(children: dict[str, str | None]) -> None:
    """Every kernel configuration the wrappers launch compiles for Hopper (no GPU needed)."""
    failure = children.get("compile")
    if failure is not None and failure.startswith("SKIP: "):
        pytest.skip(failure[6:])
    if failure is not None:
        pytest.fail(failure, pytrace=False)
    compiled = {k: v for k, v in children.items() if "(" in k}
    assert len(compiled) >= 10, sorted(compiled)
    kernels = {name.split("(")[0] for name in compiled}
    assert {"_cached_attn_kernel", "_index_scores_kernel", "_sparse_attn_kernel"} <= kernels, sorted(kernels)
    failed = {k: v for k, v in compiled.items() if v is not None}
    if failed:
        pytest.fail("\n\n".join(f"{k}:\n{v}" for k, v in failed.items()), pytrace=False)


def test_package_imports_without_triton() -> None:
    """With triton unimportable the modules still import, ops fall back to `ref`, launches fail clearly."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from dsv4cli.kernels import ref, triton_attn, triton_gemm, triton_hc, triton_ops, triton_quant\n"
        "assert not triton_quant.HAS_TRITON and not triton_ops.available() and not triton_ops.usable(force=True)\n"
        "m = torch.randn(2, 24); s = torch.randn(3); b = torch.randn(24)\n"
        "got, want = triton_hc.hc_split_sinkhorn(m, s, b, 4, 3, 1e-6), ref.hc_split_sinkhorn(m, s, b, 4, 3, 1e-6)\n"
        "assert all(torch.equal(a, e) for a, e in zip(got, want))\n"
        "try:\n"
        "    triton_quant.fake_quant_fp8(torch.randn(2, 128), 128)\n"
        "except RuntimeError as e:\n"
        "    assert 'triton is not installed' in str(e)\n"
        "else:\n"
        "    raise AssertionError('expected RuntimeError')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_register_is_a_noop_without_cuda() -> None:
    pytest.importorskip("triton")
    from dsv4cli import kernels
    from dsv4cli.kernels import triton_ops

    before = kernels.active()
    assert not triton_ops.available() and not triton_ops.usable()
    kernels.select("auto")
    assert not any("triton" in v for v in kernels.active().values())
    kernels.reset()
    assert kernels.active() == before


# ----------------------------------------------------------------------------- GPU, V4-Flash shapes

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def cuda_triton():
    pytest.importorskip("triton")
    torch.manual_seed(0)
    return torch.device("cuda")


@pytest.mark.parametrize("block", [128, 64, 32])
@pytest.mark.usefixtures("cuda_triton")
@pytest.mark.gpu
@requires_cuda
def test_gpu_fake_quant_bit_exact(block: int) -> None:
    from dsv4cli.kernels import triton_quant as tq

    x = wide_range(512, 4096, dtype=torch.bfloat16).cuda()
    assert torch.equal(bits(tq.fake_quant_fp8(x, block)), bits(formats.fake_quant_fp8(x, block)))
    assert torch.equal(bits(tq.fake_quant_fp4(x, 32)), bits(formats.fake_quant_fp4(x, 32)))
    q, s = tq.act_quant_fp8(x, block)
    q_ref, s_ref = tq.act_quant_fp8_ref(x, block)
    assert torch.equal(bits(q), bits(q_ref)) and torch.equal(s, s_ref)
    kv = wide_range(2, 128, 512, dtype=torch.bfloat16).cuda()
    assert torch.equal(bits(tq.kv_fp8_quant(kv, 64)), bits(ref.kv_fp8_quant(kv, 64)))


@pytest.mark.parametrize("m", [1, 8, 512])
@pytest.mark.parametrize("act_quant", [False, True])
@pytest.mark.usefixtures("cuda_triton")
@pytest.mark.gpu
@requires_cuda
def test_gpu_fp8_linear_flash_shapes(m: int, act_quant: bool) -> None:
    from dsv4cli.kernels import triton_gemm as tg

    for out_f, in_f in ((1024, 4096), (4096, 8192), (512, 4096)):  # wq_a, wo_b, wkv
        wq, ws = formats.quantize_fp8_blocks(torch.randn(out_f, in_f, device="cuda") * 0.02)
        x = torch.randn(m, in_f, device="cuda").to(torch.bfloat16)
        assert_close_scaled(tg.fp8_linear(x, wq, ws, act_quant), ref.linear(x, wq, ws, act_quant), 2**-6, 2**-7)


@pytest.mark.parametrize("tokens", [1, 4, 256])
@pytest.mark.usefixtures("cuda_triton")
@pytest.mark.gpu
@requires_cuda
def test_gpu_moe_experts_flash_shapes(tokens: int) -> None:
    from dsv4cli.kernels import triton_gemm as tg

    dim, inter, n_experts, top_k = 4096, 2048, 16, 6

    def experts(out_f: int, in_f: int) -> list:
        return [formats.quantize_fp4_rows(torch.randn(out_f, in_f, device="cuda") * 0.02) for _ in range(n_experts)]

    w1, w3, w2 = experts(inter, dim), experts(inter, dim), experts(dim, inter)
    x = torch.randn(tokens, dim, device="cuda").to(torch.bfloat16)
    indices = torch.stack([torch.randperm(n_experts, device="cuda")[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, device="cuda")
    got = tg.moe_experts_triton(x, weights, indices, stacked(w1), stacked(w2), stacked(w3), 10.0, True)
    want = tg.moe_experts_ref(x, weights, indices, w1, w2, w3, 10.0, True)
    assert_close_scaled(got, want, 2**-6, 2**-7)
    table = [tg.ExpertWeights.from_list([w for w, _ in p], [s for _, s in p]) for p in (w1, w2, w3)]
    assert_close_scaled(tg.moe_experts_triton(x, weights, indices, *table, 10.0, True), got, 1e-6, 1e-6)
    y = tg.fp4_grouped_linear(x, stacked(w1), None, indices[:, 0], act_quant=True)
    want = torch.cat([ref.linear(x[i:i + 1], *w1[e], True) for i, e in enumerate(indices[:, 0].tolist())])
    assert_close_scaled(y, want, 2**-6, 2**-7)


@pytest.mark.parametrize("seq", [1, 4])
@pytest.mark.usefixtures("cuda_triton")
@pytest.mark.gpu
@requires_cuda
def test_gpu_sparse_attn_flash_shapes(seq: int) -> None:
    from dsv4cli.kernels import triton_attn

    b, h, d, n, k = 2, 64, 512, 1152, 640  # 128 window + 512 compressed picks
    q = torch.randn(b, seq, h, d, device="cuda").to(torch.bfloat16)
    kv = torch.randn(b, n, d, device="cuda").to(torch.bfloat16)
    sink = torch.randn(h, device="cuda")
    idx = index_lists(b, seq, k, n, torch.Generator().manual_seed(0)).cuda()
    idx[..., 500:] = -1
    idx[0, 0] = -1
    got = triton_attn.sparse_attn(q, kv, sink, idx, d**-0.5)
    assert_close_scaled(got, ref.sparse_attn(q, kv, sink, idx, d**-0.5), 2**-5, 2**-6)
    assert torch.equal(got[0, 0].float(), torch.zeros(h, d, device="cuda"))


@pytest.mark.usefixtures("cuda_triton")
@pytest.mark.gpu
@requires_cuda
def test_gpu_hc_split_sinkhorn_flash_shapes() -> None:
    from dsv4cli.kernels import triton_hc

    mixes = torch.randn(2, 1024, 24, device="cuda")
    scale, base = torch.randn(3, device="cuda"), torch.randn(24, device="cuda")
    got = triton_hc.hc_split_sinkhorn(mixes, scale, base, 4, 20, 1e-6)
    want = ref.hc_split_sinkhorn(mixes, scale, base, 4, 20, 1e-6)
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


@pytest.mark.usefixtures("cuda_triton")
@pytest.mark.gpu
@requires_cuda
def test_gpu_register_routes_ops() -> None:
    from dsv4cli import kernels
    from dsv4cli.kernels import triton_ops

    assert triton_ops.available() and kernels.install(triton_ops.implementations())
    try:
        assert all(v.startswith("dsv4cli.kernels.triton_") for v in kernels.active().values())
        x = torch.randn(4, 4096, device="cuda").to(torch.bfloat16)
        wq, ws = formats.quantize_fp8_blocks(torch.randn(1024, 4096, device="cuda") * 0.02)
        assert_close_scaled(kernels.linear(x, wq, ws, True), ref.linear(x, wq, ws, True), 2**-6, 2**-7)
        assert torch.equal(kernels.linear(x.cpu(), wq.cpu(), ws.cpu(), True), ref.linear(x.cpu(), wq.cpu(),
                                                                                       ws.cpu(), True))
    finally:
        kernels.reset()


if __name__ == "__main__":  # child process: python test_kernels_triton.py {interpret|compile} RESULTS.json [CHECK...]
    if (sys.argv[1] == "interpret") != (os.environ.get("TRITON_INTERPRET") == "1"):
        sys.exit("interpret mode needs TRITON_INTERPRET=1 set before triton is imported, compile mode needs it unset")
    worker_main(sys.argv[1], Path(sys.argv[2]), sys.argv[3:])


@pytest.mark.parametrize("seq", [1, 4])
@pytest.mark.usefixtures("cuda_triton")
@pytest.mark.gpu
@requires_cuda
def test_gpu_cached_attn_and_indexer_flash_shapes(seq: int) -> None:
    """Decode/prefill-sized calls at Flash shapes on a 64K-entry compact pool: the Triton twins of the
    long-context ops against the reference on the same GPU tensors."""
    from dsv4cli.formats.kvcache import encode_index_rows, encode_kv_rows
    from dsv4cli.kernels import triton_longctx

    g = torch.Generator().manual_seed(1)
    h, d, n_pool = 64, 512, 65536
    q = torch.randn(1, seq, h, d, generator=g).to(torch.bfloat16).cuda()
    local = torch.randn(1, 128 + seq, d, generator=g).to(torch.bfloat16).cuda()
    local_idx = torch.arange(128, device="cuda").expand(1, seq, -1).contiguous()
    pool = encode_kv_rows(torch.randn(1, n_pool, d, generator=g).to(torch.bfloat16), 64).cuda()
    pool_idx = torch.stack([torch.randperm(n_pool, generator=g)[:512] for _ in range(seq)])[None].cuda()
    sink = torch.randn(h, generator=g).cuda()
    got = triton_longctx.cached_attn(q, local, local_idx, pool, pool_idx, sink, d**-0.5, 64)
    assert_close_scaled(got, ref.cached_attn(q, local, local_idx, pool, pool_idx, sink, d**-0.5, 64), 2**-5, 2**-6)
    iq = ref.indexer_fp4_quant(torch.randn(1, seq, 64, 128, generator=g)).cuda()
    weights = torch.rand(1, seq, 64, generator=g).cuda()
    keys = encode_index_rows(ref.indexer_fp4_quant(torch.randn(1, n_pool, 128, generator=g))).cuda()
    visible = torch.full((seq,), n_pool, device="cuda")
    picked = triton_longctx.indexer_topk(iq, weights, keys, visible, 512)
    want = ref.indexer_topk(iq, weights, keys, visible, 512)
    overlap = (picked[..., :, None] == want[..., None, :]).any(-1).float().mean()
    assert overlap > 0.99  # float32 summation order may swap entries at a near-tie on the border
