"""Native dense-weight CPU kernels (`cpu.linear`, `cpu.grouped_linear`, `cpu.swiglu_expert` on FP8 e4m3
and bf16 weights) against their reference twins.

Float32 accumulation order differs from the reference matmul, so results are compared with
max |diff| / max |reference| < 1e-5 (bf16 outputs: one bf16 ulp). The decode of every e4m3 code
is checked exactly. Like tests/test_kernels_cpu.py, the AVX-512F, AVX2 and scalar variants are
built too (when the CPU can run them) so every code path the CPU can execute is checked.
"""

from __future__ import annotations

import math

import pytest
import torch

from dsv4cli import kernels
from dsv4cli.formats.official import fake_quant_fp8, quantize_fp4_rows, quantize_fp8_blocks
from dsv4cli.kernels import cpu, ref
from tests.native_builds import VARIANTS, native, variant_id, variant_kernels

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=VARIANTS, ids=variant_id)
def lib(request) -> cpu.NativeKernels:
    return variant_kernels(request.param)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp(min=1e-30)).item()


def fp8(rows: int, cols: int, g: torch.Generator, float_scales: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Random e4m3 codes (NaN codes 0x7f/0xff excluded) with power-of-two block scales near 1/sqrt(cols)."""
    codes = torch.randint(0, 256, (rows, cols), dtype=torch.uint8, generator=g)
    codes[(codes & 0x7F) == 0x7F] = 0x7E
    base = 127 - 6 - round(math.log2(cols) / 2)
    scale = torch.randint(base - 1, base + 2, (-(-rows // 128), -(-cols // 128)), dtype=torch.uint8, generator=g)
    scale = scale.view(torch.float8_e8m0fnu)
    return codes.view(torch.float8_e4m3fn), (scale.float() if float_scales else scale)


def kernel_linear(lib: cpu.NativeKernels, x: torch.Tensor, w: torch.Tensor, s: torch.Tensor,
                  act_quant: bool, threads: int = 1) -> torch.Tensor:
    n, k = x.shape
    y = lib.fp8_linear(x.float().reshape(n, 1, k).contiguous(), w, cpu._fp8_scale(s), act_quant, threads)
    return y.view(n, w.shape[0])


# ------------------------------------------------------------------------------ linear

#: (N, in, out): non-multiples of 128 in both dims, N = 1..40 (tiles of 4, 2 and 1 tokens and
#: rows; from FP8_GEMM_MIN tokens the panel GEMM: on AMX, panels of 32 rows and one of 12 against token
#: blocks of 16 + 16 + 8, and one of 16 rows against 16 + 5); (1, 4096, 1031) is big enough
#: (> 1 MB of weights) to run on several threads; (1, 1024, 4096): one token against rows under 4 KB, whose
#: 256-row work items take each tile's 4 rows a quarter apart, from two 128-row scale blocks
LINEAR_SHAPES = [(1, 256, 64), (2, 200, 130), (3, 77, 5), (5, 1000, 257), (7, 129, 300), (33, 384, 33),
                 (1, 4096, 1031), (17, 64, 1), (40, 200, 300), (21, 129, 16), (1, 1024, 4096)]


@native
@pytest.mark.parametrize("bf16_x", [False, True], ids=["fp32x", "bf16x"])
@pytest.mark.parametrize("act_quant", [False, True])
@pytest.mark.parametrize(("n", "k", "o"), LINEAR_SHAPES)
def test_linear_matches_reference(lib, n, k, o, act_quant, bf16_x):
    g = torch.Generator().manual_seed(n * 1000 + k + o)
    w, s = fp8(o, k, g, float_scales=o % 2 == 1)
    x = torch.randn(n, k, generator=g) * 3
    if bf16_x:  # exactly-bf16 activations take the one-part path of the bf16 kernel
        x = x.bfloat16().float()
    xq = fake_quant_fp8(x, 128) if act_quant else x
    want = xq @ ref.dequantize_weight(w, s).T
    assert rel_err(kernel_linear(lib, x, w, s, act_quant, cpu.threads()), want) < 1e-5


@native
def test_every_code_decodes_exactly(lib):
    """One-hot activations read single weights: y must equal the dequantized matrix bit for bit
    (zeros, subnormals 2^-9.., the largest code 448, both signs; all in one row block)."""
    codes = torch.arange(256, dtype=torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0  # NaN codes: see the next test
    w = torch.stack([codes, codes.flip(0), codes.roll(77)]).view(torch.float8_e4m3fn)  # [3, 256]
    for exponent in (120, 127, 131):
        s = torch.tensor([[exponent, exponent - 3]], dtype=torch.uint8).view(torch.float8_e8m0fnu)
        want = ref.dequantize_weight(w, s).T
        assert torch.equal(kernel_linear(lib, torch.eye(256), w, s, False), want)  # batched (GEMM) path
        assert torch.equal(kernel_linear(lib, torch.eye(256)[:5], w, s, False), want[:5])  # decode path


@native
@pytest.mark.parametrize("n", [1, 40])
def test_scales_that_are_not_powers_of_two(lib, n):
    """float32 scales (e.g. the Base models' checkpoints) need not be powers of two: no exponent folding."""
    g = torch.Generator().manual_seed(n)
    w, s = fp8(300, 260, g, float_scales=True)
    s = s * torch.rand(s.shape, generator=g).add(0.5)
    x = torch.randn(n, 260, generator=g)
    assert rel_err(kernel_linear(lib, x, w, s, True), fake_quant_fp8(x, 128) @ ref.dequantize_weight(w, s).T) < 1e-5


@native
def test_nan_codes(lib):
    """NaN codes propagate on the bf16 and scalar paths; the F16C ones (documented) read them as +-480."""
    w = torch.tensor([[0x7F, 0x38], [0xFF, 0x38]], dtype=torch.uint8).view(torch.float8_e4m3fn)
    s = torch.full((1, 1), 127, dtype=torch.uint8)
    got = kernel_linear(lib, torch.tensor([[1.0, 1.0]]), w, s, False)
    if lib.fp8_isa in ("avx512bf16", "scalar"):
        assert got.isnan().all()
    else:
        assert got.tolist() == [[481.0, -479.0]]


@native
def test_public_linear_dtypes_and_batch_dims():
    g = torch.Generator().manual_seed(1)
    w, s = quantize_fp8_blocks(torch.randn(200, 300, generator=g) * 0.02)  # the real encoder's output
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(2, 3, 300, generator=g) * 2).to(dtype)
        for act_quant in (False, True):
            got, want = cpu.linear(x, w, s, act_quant), ref.linear(x, w, s, act_quant)
            assert got.shape == want.shape == (2, 3, 200) and got.dtype == dtype
            if dtype == torch.float32:
                assert rel_err(got, want) < 1e-5
            else:
                assert ((got.float() - want.float()).abs() <= want.float().abs() * 2**-7 + 1e-6).all()


@native
def test_thread_count_does_not_change_the_result():
    g = torch.Generator().manual_seed(2)
    w, s = fp8(1100, 2000, g)  # 2.2 MB: several threads
    lib = cpu.load()
    for tokens in (6, 40):  # decode tiles and the batched (GEMM) path
        x = torch.randn(tokens, 2000, generator=g)
        one = kernel_linear(lib, x, w, s, True, 1)
        assert rel_err(one, fake_quant_fp8(x, 128) @ ref.dequantize_weight(w, s).T) < 1e-5
        for n in (2, 3, 5):
            assert torch.equal(kernel_linear(lib, x, w, s, True, n), one)


# ------------------------------------------------------------------------- bf16 weights


@native
@pytest.mark.parametrize("bf16_x", [False, True], ids=["fp32x", "bf16x"])
@pytest.mark.parametrize(("n", "k", "o"), [(1, 256, 64), (3, 77, 5), (5, 1000, 257), (33, 129, 40), (2, 4096, 300),
                                           (24, 256, 9)])
def test_bf16_weights_match_reference(lib, n, k, o, bf16_x):
    g = torch.Generator().manual_seed(n + k + o)
    w = (torch.randn(o, k, generator=g) * 0.05).bfloat16()
    x = torch.randn(n, k, generator=g) * 3
    if bf16_x:
        x = x.bfloat16().float()
    got = lib.bf16_linear(x.reshape(n, 1, k).contiguous(), w, cpu.threads()).view(n, o)
    assert rel_err(got, x @ w.float().T) < 1e-5
    eye = torch.eye(k)[: min(k, 64)]  # one-hot rows read single weights: exact
    assert torch.equal(lib.bf16_linear(eye.reshape(-1, 1, k).contiguous(), w, 1).view(-1, o), w.float().T[:64])


@native
def test_public_bf16_linear_and_grouped():
    g = torch.Generator().manual_seed(6)
    w = torch.randn(96, 200, generator=g).bfloat16()
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(2, 3, 200, generator=g) * 2).to(dtype)
        got, want = cpu.linear(x, w), ref.linear(x, w)
        assert got.shape == want.shape and got.dtype == dtype
        assert rel_err(got, want) < (1e-5 if dtype == torch.float32 else 2**-7)
        xs = x.view(2, 3, 1, 200).expand(2, 3, 4, 200)
        got, want = cpu.grouped_linear(xs, w), ref.grouped_linear(xs, w)
        assert got.shape == want.shape == (2, 3, 4, 24) and got.dtype == dtype
        assert rel_err(got, want) < (1e-5 if dtype == torch.float32 else 2**-7)


# ------------------------------------------------------------------------ grouped linear


def test_reference_grouped_linear_is_the_old_projection():
    """ref.grouped_linear reproduces Attention._project_out's former dequantize + einsum bit for bit."""
    g = torch.Generator().manual_seed(3)
    groups, rank, din = 4, 128, 256
    w, s = quantize_fp8_blocks(torch.randn(groups * rank, din, generator=g))
    for dtype in (torch.bfloat16, torch.float32):
        o = torch.randn(2, 5, groups, din, generator=g).to(dtype)
        old = torch.einsum("bsgd,grd->bsgr", o, ref.dequantize_weight(w, s).to(dtype).view(groups, rank, -1))
        assert torch.equal(ref.grouped_linear(o, w, s), old)


@native
@pytest.mark.parametrize(("groups", "rank", "din", "lead"), [(8, 128, 512, (1, 1)), (3, 96, 200, (2, 7)),
                                                             (2, 65, 129, (33,))])
def test_grouped_linear_matches_reference(lib, groups, rank, din, lead):
    g = torch.Generator().manual_seed(groups * 100 + rank)
    w, s = fp8(groups * rank, din, g)
    x = torch.randn(*lead, groups, din, generator=g)
    want = torch.einsum("...gd,grd->...gr", x, ref.dequantize_weight(w, s).view(groups, rank, din))
    got = lib.fp8_linear(x.reshape(-1, groups, din).contiguous(), w, s.view(torch.uint8), False, 2)
    assert rel_err(got.view(want.shape), want) < 1e-5
    if lib is cpu.load():  # the public wrapper, bf16 and fp32 (native build only)
        for dtype in (torch.float32, torch.bfloat16):
            xd = x.to(dtype)
            got, want = cpu.grouped_linear(xd, w, s), ref.grouped_linear(xd, w, s)
            assert got.shape == want.shape == (*lead, groups, rank) and got.dtype == dtype
            assert rel_err(got, want) < (1e-5 if dtype == torch.float32 else 2**-7)


# ------------------------------------------------------------------------- shared expert


@native
@pytest.mark.parametrize("act_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_expert_matches_reference(act_quant, dtype):
    g = torch.Generator().manual_seed(7)
    dim, inter = 384, 200
    w1, s1 = quantize_fp8_blocks(torch.randn(inter, dim, generator=g) * 0.05)
    w3, s3 = quantize_fp8_blocks(torch.randn(inter, dim, generator=g) * 0.05)
    w2, s2 = quantize_fp8_blocks(torch.randn(dim, inter, generator=g) * 0.05)
    x = (torch.randn(5, dim, generator=g) * 2).to(dtype)
    for route, limit in ((None, 0.0), (torch.rand(5, 1, generator=g), 0.3)):
        got = cpu.swiglu_expert(x, w1, s1, w2, s2, w3, s3, route, limit, act_quant)
        want = ref.swiglu_expert(x, w1, s1, w2, s2, w3, s3, route, limit, act_quant)
        assert got.dtype == want.dtype == torch.float32 and got.shape == want.shape
        if dtype == torch.float32:
            assert rel_err(got, want) < 1e-5
        else:  # the hidden state is rounded to bf16: a rounding may flip by an ulp
            assert rel_err(got, want) < 2e-2
            assert (got - want).abs().median() <= want.abs().median() * 1e-2


@native
def test_registry_routes_the_native_ops():
    assert "grouped_linear" in kernels.OPS
    try:
        kernels.select("cpu")
        for op in ("linear", "grouped_linear", "swiglu_expert", "moe_experts"):
            assert kernels.active()[op].endswith(f"cpu.{op}")
    finally:
        kernels.reset()
    assert kernels.active()["grouped_linear"].endswith("ref.grouped_linear")


# ------------------------------------------------------------------------------- fallbacks


def test_other_formats_and_inputs_use_the_reference():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(96, 256, generator=g)
    w8, s8 = quantize_fp8_blocks(w)
    x = torch.randn(3, 256, generator=g)
    xh = x.half()  # dtypes the kernel does not take
    assert torch.equal(cpu.linear(xh, w8, s8, True), ref.linear(xh, w8, s8, True))
    assert torch.equal(cpu.linear(x, w), ref.linear(x, w))  # fp32 weights
    xg = x.clone().requires_grad_(True)
    assert torch.equal(cpu.linear(xg, w8, s8), ref.linear(xg, w8, s8))
    bad_scale = s8[:, :1]  # wrong scale shape: the reference decides
    with pytest.raises(RuntimeError):
        cpu.linear(x, w8, bad_scale)
    xs = torch.randn(2, 4, 64, generator=g)
    wb = w.view(4 * 24, 256)[:, :64].contiguous()
    assert torch.equal(cpu.grouped_linear(xs, wb), ref.grouped_linear(xs, wb))  # fp32 weights
    assert torch.equal(cpu.grouped_linear(xs.half(), *quantize_fp8_blocks(wb)),
                       ref.grouped_linear(xs.half(), *quantize_fp8_blocks(wb)))


def test_grouped_linear_fp4_runs_natively(monkeypatch):
    """FP4 grouped weights (`dsv4 quantize` dense fp4 for wo_a) take the native FP4 GEMV per group:
    the same products as the reference, summed in another order."""
    g = torch.Generator().manual_seed(4)
    xs = torch.randn(2, 4, 64, generator=g)
    w4, s4 = quantize_fp4_rows(torch.randn(96, 64, generator=g))
    expected = ref.grouped_linear(xs, w4, s4)

    def boom(*args, **kwargs):
        raise AssertionError("FP4 grouped_linear must not fall back to the reference")

    monkeypatch.setattr(ref, "grouped_linear", boom)
    torch.testing.assert_close(cpu.grouped_linear(xs, w4, s4), expected, rtol=1e-5, atol=1e-4)


def test_kernels_ref_env_disables_native(monkeypatch):
    monkeypatch.setenv(cpu.ENV_KERNELS, "ref")

    def boom(*args, **kwargs):
        raise AssertionError("the native library must not be used with DSV4_KERNELS=ref")

    monkeypatch.setattr(cpu, "load", boom)
    g = torch.Generator().manual_seed(5)
    w8, s8 = quantize_fp8_blocks(torch.randn(256, 128, generator=g))
    x = torch.randn(2, 128, generator=g)
    assert torch.equal(cpu.linear(x, w8, s8, True), ref.linear(x, w8, s8, True))
    xs = x.view(2, 2, 64)
    w8g, s8g = quantize_fp8_blocks(torch.randn(256, 64, generator=g))
    assert torch.equal(cpu.grouped_linear(xs, w8g, s8g), ref.grouped_linear(xs, w8g, s8g))
