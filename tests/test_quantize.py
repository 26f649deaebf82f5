"""`dsv4 quantize`: int3/int2 codecs (hand-made bytes), native kernel parity, recipes, the
streaming quantizer on the tiny checkpoint, calibration (imatrix), the quality evaluation and
the CLI. The quality bounds are measured on the tiny random-weight model (docs/quality.md)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from dsv4cli import kernels
from dsv4cli.errors import CheckpointError, ConfigError, UsageError
from dsv4cli.formats.lowbit import (
    bits_per_weight,
    dequantize_lowbit,
    lowbit_format,
    pack_codes,
    quantize_lowbit,
    unpack_codes,
)
from dsv4cli.formats.official import quantize_fp4_rows
from dsv4cli.io.checkpoint import Checkpoint
from dsv4cli.io.describe import summarize
from dsv4cli.kernels import cpu, ref
from dsv4cli.kernels.experts import ExpertTable
from dsv4cli.model.args import ModelArgs
from dsv4cli.model.recipe import QUANT_KEY, RecipeError, parse_recipe
from dsv4cli.quant.boost import boost_layers
from dsv4cli.quant.imatrix import Imatrix, collect_imatrix
from dsv4cli.quant.quality import compare_logits, default_text, evaluate_quality, text_tokens
from dsv4cli.quant.quantize import IMATRIX_FILE, RECIPE_FILE, quantize_checkpoint
from dsv4cli.quant.recipes import load_recipe
from dsv4cli.runtime.loader import load_model
from tests.conftest import run_cli
from tests.native_builds import HAS_CXX, VARIANTS, variant_id, variant_kernels

RECIPES = ("q4", "q4-dense4", "q3", "q3-dense4", "q2")
EVAL_TOKENS = 192
#: bounds for the 4-bit recipe (dense FP8 -> FP4) on the tiny random model, 192 tokens of the packaged text
KL_BOUND_4BIT = 0.15
TOP1_BOUND_4BIT = 0.30


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------ codecs


def test_int3_packing_hand_made_bytes():
    codes = torch.zeros(1, 32, dtype=torch.uint8)
    codes[0, :8] = torch.arange(8)
    packed = pack_codes(codes, "int3")
    # sum(i << 3i, i < 8) = 0xFAC688, little-endian; codes 8..31 are 0
    assert packed.tolist() == [[0x88, 0xC6, 0xFA] + [0] * 9]
    codes[0, 31] = 5  # bits 93..95: byte 11, bits 5..7
    assert pack_codes(codes, "int3")[0, 11].item() == 5 << 5
    assert torch.equal(unpack_codes(pack_codes(codes, "int3"), "int3"), codes)


def test_int2_packing_hand_made_bytes():
    codes = torch.tensor([[0, 1, 2, 3] + [3, 0, 0, 0] + [0] * 24], dtype=torch.uint8)
    assert pack_codes(codes, "int2").tolist() == [[0xE4, 0x03, 0, 0, 0, 0, 0, 0]]
    assert torch.equal(unpack_codes(pack_codes(codes, "int2"), "int2"), codes)


def test_dequantize_hand_made_block():
    packed = torch.tensor([[0xE4, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.uint8)  # int2 codes 0, 1, 2, 3, then 0s
    scale = torch.tensor([[-0.5]], dtype=torch.bfloat16)
    values = dequantize_lowbit(packed, scale)
    assert values[0, :4].tolist() == [1.0, 0.5, -0.0, -0.5]  # (code - 2) * -0.5
    assert values[0, 4:].eq(1.0).all()
    assert lowbit_format(packed, scale) == "int2"
    assert lowbit_format(torch.zeros(1, 12, dtype=torch.uint8), scale) == "int3"
    assert lowbit_format(torch.zeros(1, 10, dtype=torch.uint8), scale) is None
    assert bits_per_weight("int3") == 3.5 and bits_per_weight("int2") == 2.5


@pytest.mark.parametrize("fmt", ["int3", "int2"])
def test_random_round_trip_and_quantizer_error(fmt):
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 8 if fmt == "int3" else 4, (3, 5, 96), dtype=torch.uint8, generator=g)
    assert torch.equal(unpack_codes(pack_codes(codes, fmt), fmt), codes)
    w = torch.randn(64, 256, generator=g)
    q, s = quantize_lowbit(w, fmt)
    assert q.dtype == torch.uint8 and s.dtype == torch.bfloat16 and s.shape == (64, 8)
    rel = ((dequantize_lowbit(q, s) - w).norm() / w.norm()).item()
    assert rel < (0.18 if fmt == "int3" else 0.36)
    # an importance vector moves the error away from the channels it marks
    imp = torch.ones(256)
    imp[::4] = 100.0  # within every block: a constant factor per block would change nothing
    qi, si = quantize_lowbit(w, fmt, imp)
    err = (dequantize_lowbit(q, s) - w).pow(2).sum(0)
    err_i = (dequantize_lowbit(qi, si) - w).pow(2).sum(0)
    assert (err_i * imp).sum() < (err * imp).sum()


# ----------------------------------------------------------------------- native kernels


@pytest.fixture(scope="module", params=VARIANTS, ids=variant_id)
def lib(request) -> cpu.NativeKernels:
    return variant_kernels(request.param)


@pytest.mark.parametrize("fmt", ["int3", "int2"])
@pytest.mark.parametrize(("n", "k", "o"), [(1, 256, 64), (5, 160, 33), (9, 1024, 7), (14, 160, 33),
                                           (40, 160, 300), (17, 96, 45)])  # the last two: AMX panels
def test_lowbit_linear_matches_reference(lib, fmt, n, k, o):
    g = torch.Generator().manual_seed(n + k + o)
    q, s = quantize_lowbit(torch.randn(o, k, generator=g), fmt)
    x = torch.randn(n, k, generator=g)
    for act_quant in (False, True):
        want = ref.linear(x, q, s, act_quant)
        got = lib.lowbit_linear(x, q, s, 3 if fmt == "int3" else 2, act_quant, 1)
        assert (got - want).abs().max() <= 2e-6 * want.abs().max()


@pytest.mark.parametrize("fmt", ["int3", "int2"])
@pytest.mark.parametrize("n", [3, 40])
def test_lowbit_scales_outside_the_split_range(lib, fmt, n):
    """The AMX panel splits value x scale into two bf16 words, exact while both stay normal; rows with
    scales below 2^-100 or from 2^100 on take the on-the-fly tiles, and every row still matches."""
    g = torch.Generator().manual_seed(n)
    q, s = quantize_lowbit(torch.randn(42, 160, generator=g), fmt)
    s = s.clone()
    s[3] *= 2.0**-122  # its lo words would be denormal
    s[35, 1] *= 2.0**105
    x = torch.randn(n, 160, generator=g)
    x[:, 32:64] *= 2.0**-100  # keeps the huge block's products finite
    want = ref.linear(x, q, s, False)
    got = lib.lowbit_linear(x, q, s, 3 if fmt == "int3" else 2, False, 1)
    assert torch.isfinite(want).all()
    per_row = (got - want).abs().amax(0) / want.abs().amax(0)  # row 3 is ~2^-122 of the others
    assert (per_row < 1e-5).all(), per_row


def _experts(formats: tuple[str, str], n: int, dim: int, inter: int, seed: int) -> list[tuple[torch.Tensor, ...]]:
    """n experts with w1/w3 in formats[0] and w2 in formats[1]."""
    g = torch.Generator().manual_seed(seed)

    def make(fmt, rows, cols):
        w = torch.randn(rows, cols, generator=g) / cols ** 0.5
        return quantize_fp4_rows(w) if fmt == "fp4" else quantize_lowbit(w, fmt)

    out = []
    for _ in range(n):
        (w1, s1), (w2, s2), (w3, s3) = make(formats[0], inter, dim), make(formats[1], dim, inter), make(formats[0],
                                                                                                        inter, dim)
        out.append((w1, s1, w2, s2, w3, s3))
    return out


@pytest.mark.parametrize("formats", [("int3", "fp4"), ("int2", "int3"), ("fp4", "int2"), ("int3", "int3")])
@pytest.mark.parametrize("tokens", [6, 40])  # 40: ~16 per expert, the panel GEMM (prefill)
def test_fused_moe_with_mixed_projection_formats(lib, formats, tokens):
    table = ExpertTable.from_experts(_experts(formats, 5, 160, 96, seed=1))
    bits = {"fp4": 4, "int3": 3, "int2": 2}
    assert table.native and table.bits == (bits[formats[0]], bits[formats[0]], bits[formats[1]])
    g = torch.Generator().manual_seed(2)
    x = torch.randn(tokens, 160, generator=g)
    weights, indices = torch.rand(tokens, 2, generator=g), torch.randint(0, 5, (tokens, 2), generator=g)
    for act_quant in (False, True):
        want = ref.moe_experts(x, weights, indices, table, 10.0, act_quant)
        got = lib.quant_moe(x, weights, indices, table, 10.0, act_quant, False, 1)
        assert (got - want).abs().max() <= 2e-6 * want.abs().max()


def test_experts_with_different_formats_use_the_reference():
    experts = _experts(("int3", "fp4"), 2, 64, 64, seed=3) + _experts(("int2", "int3"), 2, 64, 64, seed=4)
    table = ExpertTable.from_experts(experts)
    assert not table.native
    x = torch.randn(3, 64)
    weights, indices = torch.rand(3, 2), torch.tensor([[0, 2], [1, 3], [3, 0]])
    assert torch.equal(cpu.moe_experts(x, weights, indices, table, 0.0, False),
                       ref.moe_experts(x, weights, indices, table, 0.0, False))


# ----------------------------------------------------------------------------- recipes


def test_recipe_resolution_and_errors():
    recipe = parse_recipe({"name": "r", "experts": {"w1": "int2", "w3": "int2", "w2": "int3"}, "dense": "fp4",
                           "layers": {"0-1": {"experts": {"w2": "fp4"}}, "mtp": {"experts": "keep"}},
                           "keep": ["layers.3.attn.*"]})
    args = ModelArgs(n_layers=4, compress_ratios=(0, 4, 128, 4, 0), quantization=recipe)
    assert args.expert_formats(0) == ("int2", "fp4", "int2")
    assert args.expert_formats(2) == ("int2", "int3", "int2")
    assert args.expert_formats(4) == ("fp4", "fp4", "fp4")  # the MTP layer keeps the source format
    assert args.linear_format(2, "attn.wq_a") == "fp4" and args.linear_format(3, "attn.wq_a") == "fp8"
    assert ModelArgs.from_hf_config(args.to_hf_config()) == args
    for bad in ({"experts": "int5"}, {"dense": "int3"}, {"layers": {"x": {}}}, {"layers": {"3-1": {}}},
                {"colour": 1}, {"keep": "layers.*"}, []):
        with pytest.raises(RecipeError):
            parse_recipe(bad)
    with pytest.raises(ConfigError, match="names layer 9"):
        ModelArgs(n_layers=4, compress_ratios=(0, 4, 128, 4, 0),
                  quantization=parse_recipe({"layers": {"9": {"dense": "fp4"}}}))


# ------------------------------------------------------------------ quantized checkpoints


@pytest.fixture(scope="module")
def quantized(tiny_checkpoint, tmp_path_factory):
    """Every built-in recipe applied to the tiny checkpoint, with its quality report."""
    root = tmp_path_factory.mktemp("quantized")
    out = {}
    for name in RECIPES:
        result = quantize_checkpoint(tiny_checkpoint, root / name, load_recipe(name))
        steps: list[tuple[int, int]] = []
        report = evaluate_quality(tiny_checkpoint, result.path, max_tokens=EVAL_TOKENS, seq_len=96,
                                  progress=lambda done, total, steps=steps: steps.append((done, total)))
        assert steps and steps[-1][0] == steps[-1][1] >= report.tokens  # window by window, then all done
        assert [d for d, _ in steps] == sorted(d for d, _ in steps)
        out[name] = (result, report)
    return out


def test_quantized_checkpoints_validate_and_load(quantized):
    for name, (result, _) in quantized.items():
        with Checkpoint.open(result.path) as ckpt:
            ckpt.validate("data")
            assert ckpt.args.quantization.name == name
        config = json.loads((result.path / "config.json").read_text())
        assert config[QUANT_KEY]["name"] == name
        written = json.loads((result.path / RECIPE_FILE).read_text())
        assert written["output_bytes"] == result.output_bytes and written["formats"] == result.formats
        assert not list(result.path.parent.glob(f"{name}.*"))  # no staging leftovers
    assert quantized["q3"][0].formats == {"fp4": 40, "fp8": 44, "int3": 80}
    with Checkpoint.open(quantized["q3"][0].path) as ckpt:
        assert summarize(ckpt.args).expert_dtype == "q3: w1 int3, w2 fp4, w3 int3"
    assert quantized["q2"][0].formats == {"fp8": 44, "int2": 80, "int3": 40}


def test_sizes_shrink_with_bits(quantized):
    size = {name: result.output_bytes for name, (result, _) in quantized.items()}
    assert size["q4"] == quantized["q4"][0].source_bytes  # the official formats: a copy
    assert size["q3-dense4"] < size["q3"] < size["q4"] and size["q2"] < size["q3"]
    assert size["q4-dense4"] < size["q4"]


def test_kl_grows_as_bits_shrink(quantized):
    kl = {name: report.kl_mean for name, (_, report) in quantized.items()}
    top1 = {name: report.top1_agreement for name, (_, report) in quantized.items()}
    assert kl["q4"] == 0.0 and top1["q4"] == 1.0
    assert 0 < kl["q3"] < kl["q2"]
    assert kl["q3"] < kl["q3-dense4"]
    assert kl["q4-dense4"] < KL_BOUND_4BIT and top1["q4-dense4"] > TOP1_BOUND_4BIT
    for _, report in quantized.values():
        assert report.tokens == EVAL_TOKENS and report.folded_ids and report.ppl_quantized > 1


def test_quantized_model_runs_on_native_kernels(quantized):
    path = quantized["q2"][0].path
    model, ckpt = load_model(path, with_mtp=False)
    try:
        ids = torch.arange(1, 17)[None]
        want = model.full_logits(ids)
        if HAS_CXX:
            kernels.select("cpu")
            assert kernels.active()["moe_experts"].endswith("cpu.moe_experts")
            # the native mHC Sinkhorn's exp differs from torch's by an ulp, which bf16 rounding amplifies here;
            # it is checked call by call (test_kernels_cpu) and end to end in float32 (test_model)
            kernels.use("hc_split_sinkhorn", ref.hc_split_sinkhorn)
            model.layers[2].ffn._table = None
            got = model.full_logits(ids)
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
            assert model.layers[2].ffn.expert_table().bits == (2, 2, 3)
    finally:
        ckpt.close()


def test_compare_logits_by_hand():
    orig = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    kl, agree, nll_p, nll_q = compare_logits(orig, orig.flip(-1), torch.tensor([1]))
    p = torch.softmax(orig[0], -1)
    assert kl[0].item() == pytest.approx(float((p * (p.log() - p.flip(-1).log())).sum()), rel=1e-5)
    assert kl[1].item() == 0.0 and agree.tolist() == [0.0, 1.0]
    assert nll_p.item() == pytest.approx(-float(p[1].log()), rel=1e-5)
    assert nll_q.item() == pytest.approx(-float(p[0].log()), rel=1e-5)


# -------------------------------------------------------------------------- calibration


def test_imatrix_collect_save_load_and_boost(tiny_checkpoint, tmp_path):
    model, ckpt = load_model(tiny_checkpoint, with_mtp=False)
    try:
        ids, folded = text_tokens(default_text(), tiny_checkpoint, model.args.vocab_size)
        matrix = collect_imatrix(model, ids[:96], seq_len=48)
        assert model.routed_experts is None  # the hook is given back
        assert all(layer.ffn._routed is None for layer in model.layers)
        assert sum(n for name, n in matrix.counts.items() if name.startswith("layers.1.") and name.endswith(".w1")) \
            == 96 * model.args.n_activated_experts
        imp = matrix.importance("layers.1.ffn.experts.0.w3")
        assert imp is None or (imp.shape == (256,) and (imp >= 0).all())
        assert matrix.importance("layers.1.ffn.experts.0.w2") is None or \
            matrix.importance("layers.1.ffn.experts.0.w2").shape == (128,)
        recipe, chosen = boost_layers(ckpt, load_recipe("q2"), matrix, 0.25)
    finally:
        ckpt.close()
    assert folded and len(chosen) == 1
    args = ModelArgs.from_hf_config({**json.loads((tiny_checkpoint / "config.json").read_text()),
                                     QUANT_KEY: recipe.to_config()})
    assert args.expert_formats(chosen[0]) == ("int3", "fp4", "int3")
    matrix.save(tmp_path / "im.safetensors")
    again = Imatrix.load(tmp_path / "im.safetensors")
    assert again.counts == matrix.counts
    for name in matrix.sums:
        torch.testing.assert_close(again.importance(name), matrix.importance(name))
    (tmp_path / "bad.safetensors").write_bytes(b"\x01")
    with pytest.raises(CheckpointError):
        Imatrix.load(tmp_path / "bad.safetensors")


# ------------------------------------------------------------------------------ the CLI




def test_cli_quantize_calibrate_eval_json(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DSV4_KERNELS", "ref")
    calib = tmp_path / "calib.txt"
    calib.write_text(default_text()[:600], encoding="utf-8")
    out = tmp_path / "q3"
    code, stdout, stderr = run_cli(capsys, "quantize", str(tiny_checkpoint), str(out), "--recipe", "q3",
                                   "--calibration-text", str(calib), "--boost-layers", "0.25", "--eval",
                                   "--eval-tokens", "64", "--json")
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["quantize"]["recipe"]["name"] == "q3+imatrix" and len(report["quantize"]["boosted_layers"]) == 1
    assert report["quantize"]["output_bytes"] < report["quantize"]["source_bytes"] and report["quantize"]["imatrix"]
    assert report["quality"]["kl_mean"] > 0 and report["quality"]["tokens"] == 64
    assert (out / IMATRIX_FILE).is_file()
    # re-use the imatrix; plain-text summary
    code, stdout, _ = run_cli(capsys, "quantize", str(tiny_checkpoint), str(tmp_path / "q2"), "--recipe", "q2",
                              "--imatrix", str(out / IMATRIX_FILE), "--boost-layers", "0")
    assert code == 0 and "% of the source's" in stdout and "recipe q2: " in stdout and "(imatrix)" in stdout
    code, stdout, _ = run_cli(capsys, "quantize", str(tiny_checkpoint), str(tmp_path / "q2"), "--eval-only",
                              "--eval-tokens", "32")
    assert code == 0 and "top-1 agreement" in stdout and "KL(original || quantized)" in stdout


def test_cli_errors_leave_no_output(tiny_checkpoint, tmp_path, capsys):
    def one_line_error(code, expected_code, stderr, text):
        assert code == expected_code and stderr.count("\n") == 1 and stderr.startswith("dsv4: error:")
        assert text in stderr

    out = tmp_path / "out"
    code, _, stderr = run_cli(capsys, "quantize", str(tmp_path / "missing"), str(out))
    one_line_error(code, 2, stderr, "no model")
    code, _, stderr = run_cli(capsys, "quantize", str(tiny_checkpoint), str(out), "--recipe", "q5")
    one_line_error(code, 2, stderr, "built-in recipes: q4")
    bad = tmp_path / "bad.json"
    bad.write_text('{"experts": "int7"}')
    code, _, stderr = run_cli(capsys, "quantize", str(tiny_checkpoint), str(out), "--recipe", str(bad))
    one_line_error(code, 2, stderr, "unknown expert format 'int7'")
    code, _, stderr = run_cli(capsys, "quantize", str(tiny_checkpoint), str(out), "--imatrix", str(bad),
                              "--calibration-text", str(bad))
    one_line_error(code, 2, stderr, "not both")
    # a corrupt source: a shard cut short
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_checkpoint, corrupt)
    shard = sorted(corrupt.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    code, _, stderr = run_cli(capsys, "quantize", str(corrupt), str(out))
    one_line_error(code, 1, stderr, "truncated")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json", "corrupt"]  # nothing partial
    # a failure while writing keeps the marked partial output, and the same command resumes from it
    with pytest.raises(RuntimeError, match="disk full"):
        def fail(done, total):
            if done:
                raise RuntimeError("disk full")
        quantize_checkpoint(tiny_checkpoint, out, load_recipe("q3"), progress=fail, max_shard_bytes=1 << 20)
    partial = tmp_path / "out.dsv4-quantize-partial"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json", "corrupt", partial.name]
    assert (partial / ".dsv4-staging.json").is_file() and not out.exists()
    quantize_checkpoint(tiny_checkpoint, out, load_recipe("q3"), max_shard_bytes=1 << 20)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json", "corrupt", "out"]
    shutil.rmtree(out)
    # an already quantized source, an occupied output
    done = quantize_checkpoint(tiny_checkpoint, tmp_path / "q3", load_recipe("q3")).path
    with pytest.raises(UsageError, match="already quantized"):
        quantize_checkpoint(done, out, load_recipe("q2"))
    code, _, stderr = run_cli(capsys, "quantize", str(tiny_checkpoint), str(done))
    one_line_error(code, 2, stderr, "already exists")
