"""Native FP4 CPU kernels (`dsv4cli.kernels.cpu`) against their reference twins.

Float32 accumulation order differs from the reference matmul, so results are compared with
max |diff| / max |reference| < 1e-5 (bf16 activations: one bf16 ulp per element). The library
is compiled once into the user's kernel cache; the AVX-512F, AVX2 and scalar variants are built too
(when the CPU can run them) so every code path the CPU can execute is checked.
"""

from __future__ import annotations

import functools
import math
import stat

import pytest
import torch

from dsv4cli import kernels
from dsv4cli.errors import DsvError
from dsv4cli.formats.official import fake_quant_fp4, fake_quant_fp8, quantize_fp4_rows
from dsv4cli.io.safetensors_file import SafetensorsFile
from dsv4cli.io.writer import write_safetensors
from dsv4cli.kernels import cpu, ref
from tests.native_builds import VARIANTS, native, variant_id, variant_kernels

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=VARIANTS, ids=variant_id)
def lib(request) -> cpu.NativeKernels:
    return variant_kernels(request.param)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp(min=1e-30)).item()


def fp4(rows: int, cols: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random packed e2m1 codes (every byte is valid) with scales near 1/sqrt(cols)."""
    codes = torch.randint(-128, 128, (rows, cols // 2), dtype=torch.int8, generator=g)
    base = 127 - 2 - round(math.log2(cols) / 2)
    scale = torch.randint(base - 1, base + 2, (rows, cols // 32), dtype=torch.uint8, generator=g)
    return codes, scale.view(torch.float8_e8m0fnu)


@functools.cache
def expert_list(n: int, dim: int, inter: int, seed: int) -> tuple[tuple[torch.Tensor, ...], ...]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        w1, s1 = fp4(inter, dim, g)
        w2, s2 = fp4(dim, inter, g)
        w3, s3 = fp4(inter, dim, g)
        out.append((w1, s1, w2, s2, w3, s3))
    return tuple(out)


def routing(n: int, k: int, n_experts: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, k, generator=g) + 0.1, torch.randint(0, n_experts, (n, k), generator=g)


# ------------------------------------------------------------------------------ linear

#: (N, in, out); (5, 4096, 1024) is big enough (> 1 MB of weights) to run on several threads;
#: (40, 160, 37) and (17, 256, 300) run the panel GEMM (on AMX: panels of 32 rows and a partial
#: one, token blocks of 16 and a partial one)
LINEAR_SHAPES = [(1, 256, 64), (7, 4096, 96), (3, 160, 33), (33, 96, 7), (2, 2048, 1), (5, 4096, 1024),
                 (40, 160, 37), (17, 256, 300)]


@native
@pytest.mark.parametrize("act_quant", [False, True])
@pytest.mark.parametrize(("n", "k", "o"), LINEAR_SHAPES)
def test_linear_matches_reference(lib, n, k, o, act_quant):
    g = torch.Generator().manual_seed(n * 1000 + k + o)
    w, s = fp4(o, k, g)
    x = torch.randn(n, k, generator=g) * 3
    xq = x if not act_quant else fake_quant_fp8(x, 128)
    got = lib.fp4_linear(x, w, s.view(torch.uint8), act_quant, cpu.threads())
    assert rel_err(got, xq @ ref.dequantize_weight(w, s).T) < 1e-5
    if lib is cpu.load():  # the public wrapper (native build only)
        assert rel_err(cpu.linear(x, w, s, act_quant), ref.linear(x, w, s, act_quant)) < 1e-5


@native
@pytest.mark.parametrize("n", [2, 3, 5, 6, 13, 40])  # around the panel GEMM thresholds (AMX 3, else 6)
def test_linear_scales_outside_the_fold_range(lib, n):
    """Rows whose UE8M0 scales the panel GEMM cannot fold into bf16 exponents (bytes 1 and 253) take
    the on-the-fly tiles; each row must still match the reference exactly up to summation order.
    (On AMX they sit in the first and second 4-row group of a 32-row panel, and in the last group
    of the partial panel after it.)"""
    g = torch.Generator().manual_seed(n)
    k, o = 256, 42
    w, s = fp4(o, k, g)
    s = s.view(torch.uint8).clone()
    s[1] = 1    # 2^-126: folded, every word would leave the normal range
    s[40] = 1
    s[6, 3] = 253  # 2^126 in one block only
    w[6, 48:64] &= 0x55  # |e2m1| <= 3 in that block (first bit of each nibble's magnitude cleared)
    x = torch.randn(n, k, generator=g)
    x[:, 96:128] *= 2.0**-100  # keeps the 2^126 block's products finite and normal
    want = x @ ref.dequantize_weight(w, s.view(torch.float8_e8m0fnu)).T
    got = lib.fp4_linear(x, w, s, False, 1)
    assert torch.isfinite(want).all()
    # per output column (row 1's values are ~2^-120 of the others), no floor on the denominator
    per_row = (got - want).abs().amax(0) / want.abs().amax(0)
    assert (per_row < 1e-5).all(), per_row


@native
def test_linear_bf16_and_batch_dims():
    g = torch.Generator().manual_seed(1)
    w, s = quantize_fp4_rows(torch.randn(48, 256, generator=g))  # the real encoder's output
    x = torch.randn(2, 3, 256, generator=g).to(torch.bfloat16)
    for act_quant in (False, True):
        got, want = cpu.linear(x, w, s, act_quant), ref.linear(x, w, s, act_quant)
        assert got.shape == want.shape == (2, 3, 48) and got.dtype == torch.bfloat16
        assert ((got.float() - want.float()).abs() <= want.float().abs() * 2**-7 + 1e-6).all()


def test_linear_falls_back_for_other_formats():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 256, generator=g)
    w = torch.randn(64, 256, generator=g)
    assert torch.equal(cpu.linear(x, w), ref.linear(x, w))  # fp32 weights: the reference
    w4, s4 = quantize_fp4_rows(w)
    xh = x.half()  # dtypes the kernel does not take go to the reference
    assert torch.equal(cpu.linear(xh, w4, s4), ref.linear(xh, w4, s4))


# --------------------------------------------------------------------------- fake quant


@native
def test_fake_quant_fp8_bit_exact(lib):
    g = torch.Generator().manual_seed(3)
    rows = [torch.randn(300, generator=g) * 10.0 ** torch.empty(1).uniform_(-6, 4, generator=g).item()
            for _ in range(40)]
    powers = 448.0 * 2.0 ** torch.arange(-30, 12, dtype=torch.float32)
    near = torch.cat([powers, torch.nextafter(powers, powers * 2), torch.nextafter(powers, powers * 0)])
    special = torch.tensor([0.0, -0.0, 1e-4, 5e-5, 448.0, -448.0, 449.0, 2.0**-9, 3 * 2.0**-10, 1e30])
    for i, amax in enumerate(near.tolist()):  # block maxima right at / next to power-of-two bounds
        r = torch.randn(300, generator=g).clamp(-1, 1) * amax
        r[i % 300] = amax
        rows.append(r)
    rows.append(torch.cat([special, torch.zeros(290)]))
    x = torch.stack(rows)
    # midpoints between e4m3 neighbours at the block's scale (ties must go to even)
    ties = (torch.arange(1, 300, dtype=torch.float32) * 2.0**-10)
    x = torch.cat([x, torch.cat([ties, torch.tensor([448.0])])[None]])
    assert torch.equal(lib.fake_quant_fp8(x, 128), fake_quant_fp8(x, 128))
    assert torch.equal(lib.fake_quant_fp8(x[:, :200], 64), fake_quant_fp8(x[:, :200], 64))


# ------------------------------------------------------------------------------- MoE

@functools.cache
def moe_case(e: int, d: int, i: int, n: int, k: int, limit: float, act_quant: bool):
    """(table, x, weights, indices, reference output) of one MoE case, shared by all variants."""
    table = cpu.ExpertTable.from_experts(expert_list(e, d, i, seed=e * 31 + d))
    weights, indices = routing(n, k, e, seed=n)
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(d)) * 2
    return table, x, weights, indices, cpu.moe_experts_ref(x, weights, indices, table, limit, act_quant)


MOE_CASES = [  # (experts, dim, inter, tokens, k)
    (5, 256, 128, 1, 6),
    (7, 384, 160, 7, 6),   # tails: 384 and 160 are not multiples of 256 / 128
    (3, 128, 96, 4, 6),    # fewer experts than slots: experts selected twice by one token
    (9, 512, 256, 13, 3),
    (3, 384, 160, 40, 2),  # ~27 tokens per expert: the panel GEMM (prefill), with K tails
]


@native
@pytest.mark.parametrize("act_quant", [False, True])
@pytest.mark.parametrize("limit", [0.0, 0.25])
@pytest.mark.parametrize(("e", "d", "i", "n", "k"), MOE_CASES)
def test_moe_matches_reference(lib, e, d, i, n, k, limit, act_quant):
    table, x, weights, indices, want = moe_case(e, d, i, n, k, limit, act_quant)
    got = lib.fp4_moe(x, weights, indices, table, limit, act_quant, False, cpu.threads())
    assert got.shape == (n, d) and got.dtype == torch.float32
    assert rel_err(got, want) < 1e-5


@native
def test_moe_duplicate_selection_and_public_wrapper():
    e, d, i = 4, 256, 128
    table = cpu.ExpertTable.from_experts(expert_list(e, d, i, seed=5))
    indices = torch.tensor([[1, 1, 3], [3, 1, 1], [0, 0, 0]])  # same expert in several slots
    weights = torch.rand(3, 3, generator=torch.Generator().manual_seed(0))
    x = torch.randn(3, d, generator=torch.Generator().manual_seed(1))
    for act_quant in (False, True):
        want = cpu.moe_experts_ref(x, weights, indices, table, 0.5, act_quant)
        assert rel_err(cpu.moe_experts(x, weights, indices, table, 0.5, act_quant), want) < 1e-5


@native
def test_moe_bf16_activations():
    e, d, i = 5, 256, 128
    table = cpu.ExpertTable.from_experts(expert_list(e, d, i, seed=6))
    weights, indices = routing(6, 4, e, seed=6)
    x = torch.randn(6, d, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    for act_quant in (False, True):
        got = cpu.moe_experts(x, weights, indices, table, 0.5, act_quant)
        want = cpu.moe_experts_ref(x, weights, indices, table, 0.5, act_quant)
        # each expert output is rounded to bf16 like the reference: a rounding may flip by an ulp
        assert rel_err(got, want) < 2e-2
        assert (got - want).abs().median() <= want.abs().median() * 1e-3


@native
def test_moe_thread_count_does_not_change_the_result():
    # ~3 MB of selected weights: enough for the kernel to use several threads (>= 512 KB each)
    table = cpu.ExpertTable.from_experts(expert_list(7, 512, 512, seed=7))
    weights, indices = routing(9, 6, 7, seed=7)
    x = torch.randn(9, 512, generator=torch.Generator().manual_seed(7))
    lib = cpu.load()
    one = lib.fp4_moe(x, weights, indices, table, 1.0, False, False, 1)
    assert rel_err(one, cpu.moe_experts_ref(x, weights, indices, table, 1.0, False)) < 1e-5
    for n in (2, 3, 5):
        assert torch.equal(lib.fp4_moe(x, weights, indices, table, 1.0, False, False, n), one)
        assert torch.equal(lib.fp4_moe(x, weights, indices, table, 1.0, True, False, n),
                           lib.fp4_moe(x, weights, indices, table, 1.0, True, False, 1))


@native
def test_moe_token_chunks(monkeypatch):
    monkeypatch.setattr(cpu, "MOE_TOKEN_CHUNK", 4)
    table = cpu.ExpertTable.from_experts(expert_list(5, 128, 64, seed=8))
    weights, indices = routing(11, 2, 5, seed=8)
    x = torch.randn(11, 128, generator=torch.Generator().manual_seed(8))
    want = cpu.moe_experts_ref(x, weights, indices, table, 0.0, False)
    assert rel_err(cpu.moe_experts(x, weights, indices, table, 0.0, False), want) < 1e-5


@native
def test_moe_weights_from_memory_mapped_safetensors(tmp_path):
    e, d, i = 5, 256, 128
    experts = expert_list(e, d, i, seed=9)
    names = ("w1.weight", "w1.scale", "w2.weight", "w2.scale", "w3.weight", "w3.scale")
    path = tmp_path / "experts.safetensors"
    write_safetensors(path, [(f"experts.{j}.{name}", t)
                             for j, ex in enumerate(experts) for name, t in zip(names, ex, strict=True)])
    with SafetensorsFile(path) as f:
        start, end = f.mapped_range()
        mapped = [tuple(f.get(f"experts.{j}.{name}") for name in names) for j in range(e)]
        assert all(start <= t.data_ptr() < end for ex in mapped for t in ex)  # zero-copy views
        table = cpu.ExpertTable.from_experts(mapped)
        assert all(start <= int(p) < end for p in table.pointers[0])
        weights, indices = routing(7, 6, e, seed=9)
        x = torch.randn(7, d, generator=torch.Generator().manual_seed(9))
        want = cpu.moe_experts_ref(x, weights, indices, cpu.ExpertTable.from_experts(experts), 1.0, True)
        assert rel_err(cpu.moe_experts(x, weights, indices, table, 1.0, True), want) < 1e-5
        del table, mapped


@native
def test_moe_stacked_experts_are_zero_copy():
    experts = expert_list(4, 128, 64, seed=13)
    stacked = [torch.stack([ex[j] for ex in experts]) for j in range(6)]
    table = cpu.ExpertTable.from_stacked(*stacked)
    assert table.native and table.num_experts == 4 and (table.dim, table.inter_dim) == (128, 64)
    assert int(table.pointers[0][1]) == stacked[0][1].data_ptr()  # w1 of expert 1, no copy
    weights, indices = routing(5, 3, 4, seed=13)
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(13))
    want = cpu.moe_experts_ref(x, weights, indices, cpu.ExpertTable.from_experts(experts), 0.0, True)
    assert rel_err(cpu.moe_experts(x, weights, indices, table, 0.0, True), want) < 1e-5


@native
def test_moe_bad_expert_index():
    table = cpu.ExpertTable.from_experts(expert_list(3, 64, 32, seed=10))
    x = torch.randn(2, 64)
    with pytest.raises(IndexError):
        cpu.moe_experts(x, torch.ones(2, 2), torch.tensor([[0, 3], [1, 2]]), table, 0.0, False)


def test_moe_non_fp4_experts_use_the_reference():
    g = torch.Generator().manual_seed(11)
    experts = [tuple(t for w in (torch.randn(32, 64, generator=g), torch.randn(64, 32, generator=g),
                                 torch.randn(32, 64, generator=g)) for t in (w.bfloat16(), None))
               for _ in range(3)]
    table = cpu.ExpertTable.from_experts(experts)
    assert not table.native
    weights, indices = routing(4, 2, 3, seed=11)
    x = torch.randn(4, 64, generator=g)
    want = cpu.moe_experts_ref(x, weights, indices, table, 0.0, False)
    assert torch.equal(cpu.moe_experts(x, weights, indices, table, 0.0, False), want)


# ------------------------------------------------------------------- mHC split + Sinkhorn


def sinkhorn_inputs(lead: tuple[int, ...], n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    width = (2 + n) * n
    return (torch.randn(*lead, width, generator=g) * 3, torch.randn(3, generator=g),
            torch.randn(width, generator=g))


@native
@pytest.mark.parametrize(("lead", "n", "iters"), [((1, 1), 4, 20), ((2, 9), 4, 20), ((5,), 3, 7), ((3,), 2, 1),
                                                  ((4,), 4, 0), ((0,), 4, 20)])
def test_hc_split_sinkhorn_matches_reference(lib, lead, n, iters):
    mixes, scale, base = sinkhorn_inputs(lead, n, seed=n * 100 + iters)
    want = ref.hc_split_sinkhorn(mixes, scale, base, n, iters, 1e-6)
    width = (2 + n) * n
    got = lib.hc_split_sinkhorn(mixes.reshape(-1, width), scale, base, n, iters, 1e-6)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.view(w.shape), w, rtol=2e-6, atol=1e-7)
    for g, w in zip(cpu.hc_split_sinkhorn(mixes, scale, base, n, iters, 1e-6), want, strict=True):
        assert g.shape == w.shape and g.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=2e-6, atol=1e-7)


@native
def test_hc_split_sinkhorn_strided_and_bf16_inputs():
    mixes, scale, base = sinkhorn_inputs((6, 30), 4, seed=3)
    strided = mixes[:, ::2, :]  # rows 2 * 24 floats apart: copied to rows the kernel reads
    single = mixes[2:3, 5:6]  # one row, whose stride is not its width
    for x in (strided, single, mixes.bfloat16(), mixes[..., :24].transpose(0, 1)):
        want = ref.hc_split_sinkhorn(x, scale.bfloat16(), base, 4, 20, 1e-6)
        for g, w in zip(cpu.hc_split_sinkhorn(x, scale.bfloat16(), base, 4, 20, 1e-6), want, strict=True):
            torch.testing.assert_close(g, w, rtol=2e-6, atol=1e-7)


def test_hc_split_sinkhorn_falls_back_for_shapes_the_kernel_does_not_take(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the native kernel must not be called")

    monkeypatch.setattr(cpu, "load", boom)
    mixes, scale, base = sinkhorn_inputs((3,), 4, seed=5)
    for args in ((mixes.double(), scale, base, 4, 20, 1e-6), (mixes.requires_grad_(), scale, base, 4, 20, 1e-6)):
        for g, w in zip(cpu.hc_split_sinkhorn(*args), ref.hc_split_sinkhorn(*args), strict=True):
            assert torch.equal(g, w)
    wide = torch.randn(3, 30)  # 30 values are no (2 + n) * n split for n = 4
    with pytest.raises(RuntimeError):
        ref.hc_split_sinkhorn(wide, scale, base, 4, 20, 1e-6)
    with pytest.raises(RuntimeError):
        cpu.hc_split_sinkhorn(wide, scale, base, 4, 20, 1e-6)


# ------------------------------------------------------------------ linear plans


@native
def test_linear_plans_are_reused_and_follow_their_weight():
    g = torch.Generator().manual_seed(14)
    w = torch.randn(48, 64, generator=g).bfloat16()
    x = torch.randn(3, 64, generator=g)
    first = cpu._plan(w, None, 64, 1)
    assert first is not None and cpu._plan(w, None, 64, 1) is first
    torch.testing.assert_close(cpu.linear(x, w), ref.linear(x, w), rtol=1e-5, atol=1e-5)
    scale = torch.ones(48, 2)  # the same weight with a scale: a plan of its own, not the scale-less one
    assert cpu._plan(w, scale, 64, 1) is not first
    w.data = torch.randn(32, 64, generator=g).bfloat16()  # new memory and shape under the same tensor
    torch.testing.assert_close(cpu.linear(x, w), ref.linear(x, w), rtol=1e-5, atol=1e-5)
    assert cpu.linear(x, w).shape == (3, 32)


# ------------------------------------------------------------------ cache fake-quants


def quant_edge_rows(d: int, seed: int) -> torch.Tensor:
    """Random rows at many scales, plus exact e2m1 / e4m3 midpoints, zeros, -0.0 and tiny blocks."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(7, d, generator=g) * torch.logspace(-30, 8, 7)[:, None]
    x[1, :32] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0,
                              6.0, -6.0, 0.0, -0.0, 3.0, 0.5] + [1.0] * 12)
    x[2, :64] = 0.0
    x[3, 32:64] = -0.0
    x[4, :32] = 1e-39  # subnormal block: the amax floors
    return x


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_fp8_quant_matches_reference_bit_for_bit(lib, dtype):
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    for d, rope in ((128, 64), (512, 64), (96, 32), (64, 64)):
        x = quant_edge_rows(d, seed=d + rope).to(dtype)
        want = ref.kv_fp8_quant(x, rope)
        got = lib.kv_fp8_quant(x.contiguous(), rope)
        assert got.dtype == dtype and torch.equal(got.view(bits), want.view(bits))


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_quant_fp4_matches_reference_bit_for_bit(lib, dtype):
    for d in (32, 128, 512):
        x = quant_edge_rows(d, seed=d).to(dtype)
        want = fake_quant_fp4(x, 32)
        got = lib.fake_quant_fp4(x.contiguous())
        bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
        assert got.dtype == dtype and torch.equal(got.view(bits), want.view(bits))


@native
def test_cache_quant_ops_match_reference_on_model_shapes():
    g = torch.Generator().manual_seed(21)
    kv = torch.randn(1, 3, 512, generator=g).bfloat16()
    assert torch.equal(cpu.kv_fp8_quant(kv, 64), ref.kv_fp8_quant(kv, 64))
    assert torch.equal(cpu.kv_fp8_quant(kv[:, :, ::2], 32), ref.kv_fp8_quant(kv[:, :, ::2], 32))  # strided rows
    q = torch.randn(1, 2, 8, 128, generator=g).bfloat16()
    assert torch.equal(cpu.indexer_fp4_quant(q), ref.indexer_fp4_quant(q))
    assert torch.equal(cpu.indexer_fp4_quant(q.float()), ref.indexer_fp4_quant(q.float()))


def test_cache_quant_ops_fall_back_for_inputs_the_kernels_do_not_take(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the native kernel must not be called")

    monkeypatch.setattr(cpu, "load", boom)
    x = torch.randn(2, 96, dtype=torch.float64)
    assert torch.equal(cpu.kv_fp8_quant(x, 32), ref.kv_fp8_quant(x, 32))
    x32 = x.float()
    assert torch.equal(cpu.kv_fp8_quant(x32, 0), ref.kv_fp8_quant(x32, 0))  # no RoPE dims: as the reference
    odd = torch.randn(2, 48)  # no power-of-two Hadamard size
    with pytest.raises(ValueError):
        cpu.indexer_fp4_quant(odd)
    assert torch.equal(cpu.indexer_fp4_quant(x[:, :64]), ref.indexer_fp4_quant(x[:, :64]))


def rope_angles(seq: int, half: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    angles = torch.rand(seq, half, generator=g) * 1e4  # large positions: cos / sin of every size and sign
    return angles.cos(), angles.sin()


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_matches_reference_bit_for_bit(lib, dtype):
    g = torch.Generator().manual_seed(4)
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    for b, s, h, d, half in ((1, 1, 4, 64, 32), (2, 5, 3, 96, 16), (1, 3, 1, 64, 32), (2, 2, 2, 40, 0)):
        x = (torch.randn(b, s, h, d, generator=g) * 30).to(dtype)
        cos, sin = rope_angles(s, max(half, 1), seed=d)
        cos, sin = cos[:, :half].contiguous(), sin[:, :half].contiguous()
        for inverse in (False, True):
            want = ref.rope(x, cos[:, None], sin[:, None], inverse) if half else x
            got = lib.rope(x, cos, sin, h, inverse)
            assert got.dtype == dtype and torch.equal(got.view(bits), want.view(bits))


@native
def test_rope_op_takes_the_model_layouts_and_falls_back_otherwise():
    g = torch.Generator().manual_seed(8)
    cos, sin = rope_angles(3, 8, seed=1)
    q = torch.randn(2, 3, 4, 32, generator=g).bfloat16()  # [B, S, H, D] with cos[:, None]
    kv = torch.randn(2, 3, 32, generator=g).bfloat16()  # [B, S, D] with cos
    for x, c, s_ in ((q, cos[:, None], sin[:, None]), (kv, cos, sin), (q.float(), cos[:, None], sin[:, None]),
                     (q, cos[:, None].expand(3, 4, 8), sin[:, None].expand(3, 4, 8)),  # per-head angles: reference
                     (q[..., ::2], cos[:, None, :4], sin[:, None, :4])):  # strided rows, fewer pairs
        for inverse in (False, True):
            assert torch.equal(cpu.rope(x, c, s_, inverse), ref.rope(x, c, s_, inverse))
    assert torch.equal(kernels_rope_fallback := cpu.rope(q.double(), cos[:, None], sin[:, None]),
                       ref.rope(q.double(), cos[:, None], sin[:, None]))
    assert kernels_rope_fallback.dtype == torch.float64


def test_native_kernels_are_registered_for_the_cache_quants():
    if not cpu.available():
        pytest.skip("no native kernels")
    ops = cpu.implementations()
    assert ops["kv_fp8_quant"] is cpu.kv_fp8_quant and ops["indexer_fp4_quant"] is cpu.indexer_fp4_quant
    assert ops["rope"] is cpu.rope


# ------------------------------------------------------------------ switches and errors


def test_kernels_ref_env_disables_native(monkeypatch):
    monkeypatch.setenv(cpu.ENV_KERNELS, "ref")

    def boom(*args, **kwargs):
        raise AssertionError("the native library must not be used with DSV4_KERNELS=ref")

    monkeypatch.setattr(cpu, "load", boom)
    assert not cpu.available()
    assert cpu.implementations() == {}
    table = cpu.ExpertTable.from_experts(expert_list(3, 64, 32, seed=12))
    weights, indices = routing(2, 2, 3, seed=12)
    x = torch.randn(2, 64)
    w1, s1 = table.experts[0][:2]
    assert torch.equal(cpu.linear(x, w1, s1, True), ref.linear(x, w1, s1, True))
    assert torch.equal(cpu.moe_experts(x, weights, indices, table, 0.0, True),
                       cpu.moe_experts_ref(x, weights, indices, table, 0.0, True))


def test_missing_compiler_raises_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv(cpu.ENV_CXX, str(tmp_path / "no-such-g++"))
    with pytest.raises(cpu.KernelBuildError) as info:
        cpu.build(out_dir=tmp_path)
    err = info.value
    assert isinstance(err, DsvError)
    assert "no C++ compiler found" in err.message and "DSV4_KERNELS=ref" in err.hint
    assert "\n" not in err.one_line()
    assert not cpu.available()  # the same compiler setting through load(): reported, not raised
    with pytest.raises(cpu.KernelBuildError):
        cpu.load()


def test_failing_compile_raises_a_clear_error(tmp_path):
    fake = tmp_path / "fake-g++"
    fake.write_text('#!/bin/sh\nif [ "$1" = "--version" ]; then echo "fake 1.0"; exit 0; fi\n'
                    'echo "fp4_cpu.cpp:1:1: error: boom" >&2\nexit 1\n')
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    with pytest.raises(cpu.KernelBuildError) as info:
        cpu.build(cxx=str(fake), out_dir=tmp_path / "cache")
    assert "failed" in info.value.message and "error: boom" in info.value.message
    assert "\n" not in info.value.one_line()
    assert not list((tmp_path / "cache").glob("*.so*"))  # no half-written library left behind


@native
def test_build_is_cached_and_registers(tmp_path):
    path = cpu.build()
    assert path.exists() and path.parent == cpu.cache_dir()
    assert cpu.build() == path  # second call: no rebuild
    assert cpu.available()
    try:
        assert kernels.install(cpu.implementations())
        assert kernels.active()["linear"].endswith("cpu.linear")
    finally:
        kernels.reset()


def test_threads_setting():
    try:
        cpu.set_threads(3)
        assert cpu.threads() == 3
        cpu.set_threads(None)
        assert cpu.threads() == torch.get_num_threads()
    finally:
        cpu.set_threads(None)
