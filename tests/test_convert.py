"""`dsv4 convert`: the three targets on the tiny preset, losslessness, zero-copy reads of the dsv4
layout, restart after an interruption, bounded memory, errors and CLI exit codes."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from dsv4cli.cli.convert import parse_size, progress_bar, register
from dsv4cli.errors import CheckpointError, ConfigError, ModelNotFound, UsageError
from dsv4cli.formats.official import dequantize_fp4_rows, dequantize_fp8_blocks, pack_fp4
from dsv4cli.io.checkpoint import INDEX_NAME, Checkpoint
from dsv4cli.io.convert import (
    PARTIAL_SUFFIX,
    PROGRESS_NAME,
    TARGETS,
    convert_checkpoint,
    dequantize_fp4_bf16,
    fp4_to_fp8_blocks,
)
from dsv4cli.io.dsv4_layout import (
    EXPERT_NAME_RE,
    LAYOUT_NAME,
    Dsv4Checkpoint,
    ExpertLayout,
    open_checkpoint,
)
from dsv4cli.io.safetensors_file import SafetensorsFile
from dsv4cli.io.schema import checkpoint_specs
from dsv4cli.io.writer import random_tensor, tensor_generator, write_checkpoint, write_safetensors
from dsv4cli.model.layers import Numerics
from dsv4cli.model.presets import PRESETS
from dsv4cli.runtime.loader import load_model
from tests.conftest import run_cli, tiny_tensors

ARGS = PRESETS["tiny"]
SMALL_SHARDS = 1 << 20


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def token_ids() -> torch.Tensor:
    return torch.randint(0, ARGS.vocab_size, (1, 48), generator=torch.Generator().manual_seed(3))


def logits_of(model_dir: Path) -> torch.Tensor:
    model, checkpoint = load_model(model_dir, Numerics.plain(torch.float32))
    with checkpoint, torch.no_grad():
        return model.full_logits(token_ids())


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """The tiny preset in the official layout (same bytes as `write_random_checkpoint`), with a tokenizer file."""
    path = write_checkpoint(tiny_tensors("tiny"), ARGS, tmp_path_factory.mktemp("src") / "tiny")
    (path / "tokenizer.json").write_text('{"model": "stand-in"}')
    return path


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("converted")
    return {target: convert_checkpoint(source, base / target, target, max_shard_bytes=2 << 20) for target in TARGETS}


@pytest.fixture(scope="module")
def official_logits(source) -> torch.Tensor:
    return logits_of(source)


# ------------------------------------------------------------------ FP4 -> FP8


def crafted_fp4(out_f: int, in_f: int, spread: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random codes (all 16, -0 included) with sub-scale exponents up to `spread` below the block maximum;
    one 32-column group of zeros with the smallest scale byte and a block whose maximum is below 6."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (out_f, in_f), generator=g, dtype=torch.uint8)
    codes[0, :32] = 0
    exponents = 120 - torch.randint(0, spread + 1, (out_f, in_f // 32), generator=g)
    exponents[0, 0] = 0
    last_rows, last_groups = (out_f - 1) // 128 * 128, (in_f // 32 - 1) // 4 * 4
    low = exponents[last_rows:, last_groups:]  # the last 128x128 block: largest exponent below 6
    low.copy_(torch.randint(0, 6, low.shape, generator=g))
    return pack_fp4(codes), exponents.to(torch.uint8).view(torch.float8_e8m0fnu)


def assert_same_values(packed, scale, fp8, fp8_scale):
    before = dequantize_fp4_rows(packed, scale)
    after = dequantize_fp8_blocks(fp8, fp8_scale)
    assert torch.equal(before.view(torch.int32), after.view(torch.int32))  # bit for bit, signs of zeros too


@pytest.mark.parametrize("shape", [(256, 256), (200, 320), (128, 64)])
def test_fp4_to_fp8_is_exact_for_scale_spreads_up_to_2_pow_14(shape):
    packed, scale = crafted_fp4(*shape, spread=14)
    fp8, fp8_scale = fp4_to_fp8_blocks(packed, scale)
    assert fp8.dtype == torch.float8_e4m3fn and tuple(fp8.shape) == shape
    assert tuple(fp8_scale.shape) == (-(-shape[0] // 128), -(-shape[1] // 128))
    assert fp8.float().abs().max() <= 384
    assert_same_values(packed, scale, fp8, fp8_scale)


def test_fp4_to_fp8_block_scale_is_max_sub_scale_over_64():
    packed, scale = crafted_fp4(256, 256, spread=6)
    _, fp8_scale = fp4_to_fp8_blocks(packed, scale)
    exps = scale.view(torch.uint8).int()
    assert fp8_scale.view(torch.uint8)[0, 0] == exps[:128, :4].max() - 6


def test_fp4_to_fp8_rejects_what_e4m3_cannot_hold():
    codes = torch.full((128, 128), 2, dtype=torch.uint8)  # 1.0: exact even 2**15 below the block maximum
    exponents = torch.full((128, 4), 120, dtype=torch.uint8)
    exponents[5, 2] = 105
    fp8, fp8_scale = fp4_to_fp8_blocks(pack_fp4(codes), exponents.view(torch.float8_e8m0fnu))
    assert_same_values(pack_fp4(codes), exponents.view(torch.float8_e8m0fnu), fp8, fp8_scale)
    codes[5, 70] = 1  # 0.5 * 2**(6 - 15) = 2**-10 < the smallest e4m3 subnormal
    with pytest.raises(CheckpointError, match="lose precision"):
        fp4_to_fp8_blocks(pack_fp4(codes), exponents.view(torch.float8_e8m0fnu), "w")


def test_fast_fp4_dequantization_matches_formats_bit_for_bit():
    g = torch.Generator().manual_seed(1)
    packed = pack_fp4(torch.randint(0, 16, (64, 256), generator=g, dtype=torch.uint8))
    scale = torch.arange(0, 255, dtype=torch.uint8)[torch.randint(0, 255, (64, 8), generator=g)]
    scale = scale.view(torch.float8_e8m0fnu)  # every finite UE8M0 value: subnormal, huge, overflow to inf
    expected = dequantize_fp4_rows(packed, scale).to(torch.bfloat16)
    assert torch.equal(dequantize_fp4_bf16(packed, scale).view(torch.int16), expected.view(torch.int16))


# ---------------------------------------------------------------- fp8-experts


def test_fp8_experts_are_lossless_and_the_rest_is_unchanged(source, converted):
    with Checkpoint.open(source) as before, Checkpoint.open(converted["fp8-experts"]) as after:
        assert after.args == ARGS.replace(expert_dtype="fp8")
        assert set(after.names()) == set(before.names())
        n_experts = 0
        for name in before.names():
            if not name.endswith(".weight") or EXPERT_NAME_RE.match(name) is None:
                if EXPERT_NAME_RE.match(name) is None:
                    assert torch.equal(after.get(name).view(torch.uint8), before.get(name).view(torch.uint8)), name
                continue
            scale = name[: -len("weight")] + "scale"
            assert after.get(name).dtype == torch.float8_e4m3fn
            assert_same_values(before.get(name), before.get(scale), after.get(name), after.get(scale))
            n_experts += 1
        assert n_experts == (ARGS.n_layers + 1) * ARGS.n_routed_experts * 3
    config = json.loads((converted["fp8-experts"] / "config.json").read_text())
    assert config["expert_dtype"] == "fp8" and config == ARGS.replace(expert_dtype="fp8").to_hf_config()


def test_fp8_experts_give_identical_logits(converted, official_logits):
    assert torch.equal(logits_of(converted["fp8-experts"]), official_logits)


# ------------------------------------------------------------------ dsv4 layout


def test_dsv4_layout_loads_to_identical_logits(converted, official_logits):
    assert torch.equal(logits_of(converted["dsv4"]), official_logits)


def test_dsv4_layout_serves_every_official_tensor(source, converted):
    with Checkpoint.open(source) as official, Dsv4Checkpoint.open(converted["dsv4"]) as packed:
        assert packed.args == official.args and packed.has_mtp
        assert sorted(packed.names()) == sorted(official.names()) and len(packed) == len(official)
        for name in official.names():
            assert name in packed
            got, expected = packed.get(name), official.get(name)
            assert got.dtype == expected.dtype and got.shape == expected.shape, name
            assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8)), name
            assert packed.spec(name) == official.spec(name)
        assert "layers.0.ffn.experts.8.w1.weight" not in packed
        assert "layers.0.ffn.experts.packed" not in packed


def test_dsv4_expert_tensors_are_zero_copy_views_of_one_row(converted):
    with Dsv4Checkpoint.open(converted["dsv4"]) as packed:
        layout, blob = packed.layout, packed.blob("layers.2.ffn")
        assert blob.dtype == torch.uint8 and tuple(blob.shape) == (ARGS.n_routed_experts, layout.bytes_per_expert)
        row_start = blob.data_ptr() + 5 * layout.bytes_per_expert
        parts = {}
        for s in layout.slices:
            t = packed.get(f"layers.2.ffn.experts.5.{s.part}")
            assert t.untyped_storage().data_ptr() == blob.untyped_storage().data_ptr()  # no copy
            assert t.data_ptr() == row_start + s.offset
            assert t.data_ptr() + t.nbytes <= row_start + layout.bytes_per_expert
            parts[s.part] = s
        assert [s.part for s in layout.slices] == ["w1.weight", "w3.weight", "w2.weight",
                                                   "w1.scale", "w3.scale", "w2.scale"]
        assert parts["w3.weight"].offset == parts["w1.weight"].end  # w1 | w3 adjacent for the fused pass
        assert layout.bytes_per_expert % 4096 == 0
        shard = SafetensorsFile(packed.shard_of("layers.2.ffn.experts.5.w1.weight"))
        assert shard.byte_range("layers.2.ffn.experts.packed")[0] % 4096 == 0  # page-aligned rows on disk
        expected_row = layout.pack_row(packed.get, "layers.2.ffn", 5)
        assert torch.equal(blob[5], expected_row)


def test_dsv4_layout_file_records_layout_and_source(source, converted):
    document = json.loads((converted["dsv4"] / LAYOUT_NAME).read_text())
    assert document["version"] == 1 and document["n_experts"] == ARGS.n_routed_experts
    assert document["blobs"][-1] == "mtp.0.ffn.experts.packed" and len(document["blobs"]) == ARGS.n_layers + 1
    assert document["expert"] == ExpertLayout.for_args(ARGS).to_json()
    index = source / INDEX_NAME
    assert document["source"]["index_sha256"] == hashlib.sha256(index.read_bytes()).hexdigest()
    assert document["source"]["total_size"] == json.loads(index.read_text())["metadata"]["total_size"]
    assert json.loads((converted["dsv4"] / "config.json").read_text()) == json.loads(
        (source / "config.json").read_text())
    assert (converted["dsv4"] / "tokenizer.json").read_text() == '{"model": "stand-in"}'


def _edit_layout(model_dir: Path, edit) -> None:
    path = model_dir / LAYOUT_NAME
    document = json.loads(path.read_text())
    edit(document)
    path.write_text(json.dumps(document))


def _drop_blob(model_dir: Path, name: str) -> None:
    index = json.loads((model_dir / INDEX_NAME).read_text())
    shard = index["weight_map"].pop(name)
    with SafetensorsFile(model_dir / shard) as f:
        kept = [(n, f.get(n).clone()) for n in f.names() if n != name]
    write_safetensors(model_dir / shard, kept)
    (model_dir / INDEX_NAME).write_text(json.dumps(index))


@pytest.mark.parametrize(("corrupt", "pattern"), [
    (lambda d: _edit_layout(d, lambda doc: doc.update(version=2)), "layout version 2"),
    (lambda d: _edit_layout(d, lambda doc: doc["expert"].update(bytes_per_expert=57344)),
     r"expert blob layers\.0\.ffn\.experts\.packed is U8\[8, 53248\], expected U8\[8, 57344\]"),
    (lambda d: _edit_layout(d, lambda doc: doc["expert"]["tensors"][0].update(shape=[64, 128])),
     r"w1\.weight is I8\[64, 128\], the config needs I8\[128, 128\]"),
    (lambda d: _drop_blob(d, "layers.3.ffn.experts.packed"), r"expert blob layers\.3\.ffn\.experts\.packed is missing"),
])
def test_dsv4_layout_validation_errors(converted, tmp_path, corrupt, pattern):
    copy = Path(shutil.copytree(converted["dsv4"], tmp_path / "copy"))
    corrupt(copy)
    with pytest.raises(CheckpointError, match=pattern) as info:
        load_model(copy)
    assert "\n" not in info.value.one_line() and info.value.hint


def test_dsv4_layout_without_mtp(tmp_path):
    trunk = {n: t for n, t in tiny_tensors("tiny").items() if not n.startswith("mtp.")}
    src = write_checkpoint(trunk, ARGS, tmp_path / "src")
    out = convert_checkpoint(src, tmp_path / "out", "dsv4")
    assert json.loads((out / LAYOUT_NAME).read_text())["blobs"][-1] == "layers.3.ffn.experts.packed"
    model, checkpoint = load_model(out)
    with checkpoint:
        assert not checkpoint.has_mtp and sorted(checkpoint.names()) == sorted(trunk)
        assert len(model.mtp) == 0


def test_open_checkpoint_picks_the_layout(source, converted):
    with open_checkpoint(source) as official, open_checkpoint(converted["dsv4"]) as packed:
        assert type(official) is Checkpoint and type(packed) is Dsv4Checkpoint


# ---------------------------------------------------------------------- hf-bf16


def test_hf_bf16_matches_hf_export_and_transformers_logits(source, converted, official_logits):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    from dsv4cli.io.hf_export import transformers_config, transformers_tensors

    out = converted["hf-bf16"]
    ours = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}
    with Checkpoint.open(source) as ckpt:
        expected = dict(transformers_tensors(ckpt.args, ckpt.get))
    assert ours.keys() == expected.keys()
    assert all(ours[k].dtype == expected[k].dtype and torch.equal(ours[k], expected[k]) for k in ours)
    assert json.loads((out / "config.json").read_text()) == transformers_config(ARGS)

    transformers.logging.set_verbosity_error()
    model = transformers.DeepseekV4ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        hf_logits = model(token_ids()).logits
    assert (hf_logits - official_logits).abs().max().item() < 1e-4


def test_dsv4_names_its_own_hf_bf16_export_instead_of_missing_tensors(converted):
    """The export is for transformers: opening it in dsv4 says so, not "210 tensors missing"."""
    with pytest.raises(CheckpointError, match="transformers' layout") as err:
        Checkpoint.open(converted["hf-bf16"])
    assert "tensors missing" not in err.value.message and "DeepseekV4ForCausalLM" in err.value.hint


# -------------------------------------------------------------- restart, force


class StopAfter:
    """An `on_shard` hook that records finished shards and fails after `limit` of them."""

    def __init__(self, limit: int | None = None):
        self.limit, self.seen = limit, []

    def __call__(self, path: Path) -> None:
        self.seen.append(path.name)
        if self.limit is not None and len(self.seen) >= self.limit:
            raise RuntimeError("simulated crash")


@pytest.mark.parametrize("target", ["fp8-experts", "dsv4"])
def test_interrupted_conversion_resumes_and_matches_a_clean_run(source, tmp_path, target):
    out = tmp_path / "out"
    partial = tmp_path / f"out{PARTIAL_SUFFIX}"
    with pytest.raises(RuntimeError, match="simulated crash"):
        convert_checkpoint(source, out, target, max_shard_bytes=SMALL_SHARDS, on_shard=StopAfter(3))
    assert not out.exists() and partial.is_dir()
    finished = json.loads((partial / PROGRESS_NAME).read_text())["finished"]
    assert len(finished) == 3
    before = {name: (partial / name).stat() for name in finished}

    progress: list[tuple[int, int]] = []
    resumed = StopAfter()
    convert_checkpoint(source, out, target, max_shard_bytes=SMALL_SHARDS, on_shard=resumed,
                       progress=lambda done, total: progress.append((done, total)))
    assert not partial.exists()
    assert not set(resumed.seen) & set(finished) and len(resumed.seen) >= 2
    for name, stat in before.items():
        now = (out / name).stat()
        assert (now.st_ino, now.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns), f"{name} was rewritten"
    total = json.loads((out / INDEX_NAME).read_text())["metadata"]["total_size"]
    assert progress[0][0] > 0 and progress[-1] == (total, total)  # finished shards count as done
    assert all(a[0] <= b[0] for a, b in itertools.pairwise(progress))

    clean = convert_checkpoint(source, tmp_path / "clean", target, max_shard_bytes=SMALL_SHARDS)
    assert files_of(out) == files_of(clean)


def test_force_discards_partial_work_and_replaces_out(source, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        convert_checkpoint(source, out, "dsv4", max_shard_bytes=SMALL_SHARDS, on_shard=StopAfter(2))
    again = StopAfter()
    convert_checkpoint(source, out, "dsv4", max_shard_bytes=SMALL_SHARDS, force=True, on_shard=again)
    n_shards = len(set(json.loads((out / INDEX_NAME).read_text())["weight_map"].values()))
    assert len(again.seen) == n_shards  # nothing reused
    replaced = StopAfter()
    convert_checkpoint(source, out, "dsv4", max_shard_bytes=SMALL_SHARDS * 4, force=True, on_shard=replaced)
    assert len(set(json.loads((out / INDEX_NAME).read_text())["weight_map"].values())) == len(replaced.seen)
    assert not any(p.name.startswith("out.") for p in tmp_path.iterdir())


def test_a_different_command_does_not_reuse_partial_shards(source, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        convert_checkpoint(source, out, "dsv4", max_shard_bytes=SMALL_SHARDS, on_shard=StopAfter(2))
    fresh = StopAfter()
    convert_checkpoint(source, out, "dsv4", max_shard_bytes=SMALL_SHARDS * 2, on_shard=fresh)
    assert len(fresh.seen) == len(set(json.loads((out / INDEX_NAME).read_text())["weight_map"].values()))


def test_failure_mid_conversion_keeps_out_absent_and_names_the_partial_dir(source, tmp_path, monkeypatch):
    import dsv4cli.io.convert as convert_module

    def lossy(packed, scale, name="weight"):
        raise CheckpointError(f"{name}: FP4 -> FP8 would lose precision", "keep the FP4 experts")

    monkeypatch.setattr(convert_module, "fp4_to_fp8_blocks", lossy)
    with pytest.raises(CheckpointError) as info:
        convert_checkpoint(source, tmp_path / "out", "fp8-experts")
    assert not (tmp_path / "out").exists()
    assert f"out{PARTIAL_SUFFIX}" in info.value.hint and "\n" not in info.value.one_line()


# --------------------------------------------------------------- bounded memory


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


class PeakSampler(threading.Thread):
    """Samples the process's anonymous resident memory (file-backed mmap pages excluded) in the background."""

    def __init__(self):
        super().__init__(daemon=True)
        self.start_bytes = self.peak = rss_anon()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, rss_anon())
            time.sleep(0.005)

    def growth(self) -> int:
        self.done.set()
        self.join()
        return max(self.peak, rss_anon()) - self.start_bytes


@pytest.fixture(scope="module")
def many_experts(tmp_path_factory) -> Path:
    """`tiny` with 128 experts (~38 MB), sharded at 2 MB; expert tensors reuse the tiny ones (fast to build)."""
    args = ARGS.replace(n_routed_experts=128)
    base = tiny_tensors("tiny")

    def tensors():
        for name, spec in checkpoint_specs(args).items():
            match = EXPERT_NAME_RE.match(name)
            if match:
                yield name, base[f"{match['prefix']}.experts.{int(match['expert']) % 8}.{match['part']}"]
            elif name in base and tuple(base[name].shape) == spec.shape:
                yield name, base[name]
            else:
                yield name, random_tensor(spec, name, args, tensor_generator(0, name))

    return write_checkpoint(tensors(), args, tmp_path_factory.mktemp("big") / "src", max_shard_bytes=2 << 20)


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs /proc (Linux)")
@pytest.mark.parametrize("target", TARGETS)
def test_peak_memory_stays_bounded(source, many_experts, tmp_path, target):
    source_bytes = json.loads((many_experts / INDEX_NAME).read_text())["metadata"]["total_size"]
    convert_checkpoint(source, tmp_path / "warmup", target)  # one-time allocations (tables, caches)
    sampler = PeakSampler()
    sampler.start()
    out = convert_checkpoint(many_experts, tmp_path / "out", target, max_shard_bytes=2 << 20)
    growth = sampler.growth()
    out_bytes = json.loads((out / INDEX_NAME).read_text())["metadata"]["total_size"]
    assert source_bytes > 30e6 and out_bytes > 30e6
    assert growth < 12e6, f"peak anonymous memory grew by {growth / 1e6:.1f} MB"


# ----------------------------------------------------------------------- errors


def _truncated(source: Path, tmp_path: Path) -> Path:
    copy = Path(shutil.copytree(source, tmp_path / "truncated"))
    shard = next(copy.glob("model-*.safetensors"))
    os.truncate(shard, shard.stat().st_size - 100)
    return copy


@pytest.mark.parametrize(("make_src", "target", "error", "pattern"), [
    (lambda s, t, c: t / "missing", "dsv4", ModelNotFound, "no checkpoint directory"),
    (lambda s, t, c: Path(os.makedirs(t / "empty") or t / "empty"), "dsv4", ConfigError, "no config file"),
    (lambda s, t, c: _truncated(s, t), "fp8-experts", CheckpointError, "truncated"),
    (lambda s, t, c: c["fp8-experts"], "fp8-experts", UsageError, "as fp8, not fp4"),
    (lambda s, t, c: c["dsv4"], "dsv4", UsageError, "already in the dsv4 layout"),
    (lambda s, t, c: s, "bf16", UsageError, "unknown conversion target"),
])
def test_bad_input_is_one_line_error_and_leaves_nothing(source, converted, tmp_path, make_src, target, error,
                                                        pattern):
    src = make_src(source, tmp_path, converted)
    with pytest.raises(error, match=pattern) as info:
        convert_checkpoint(src, tmp_path / "out", target)
    assert "\n" not in info.value.one_line()
    assert not (tmp_path / "out").exists() and not (tmp_path / f"out{PARTIAL_SUFFIX}").exists()


def test_out_exists_or_is_the_source(source, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="already exists"):
        convert_checkpoint(source, out, "dsv4")
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(UsageError, match="holds files dsv4 did not write"):
        convert_checkpoint(source, out, "dsv4", force=True)
    assert (out / "keep.txt").read_text() == "mine"
    for inside_or_around in (source, source.parent, source / "sub"):
        with pytest.raises(UsageError, match="overlaps the source"):
            convert_checkpoint(source, inside_or_around, "dsv4", force=True)


def test_dsv4_layout_converts_onwards(converted, tmp_path):
    out = convert_checkpoint(converted["dsv4"], tmp_path / "fp8", "fp8-experts", max_shard_bytes=2 << 20)
    assert files_of(out) == files_of(converted["fp8-experts"])


# -------------------------------------------------------------------------- CLI


def test_parse_size():
    assert parse_size("4GB") == 4 * 10**9 and parse_size("4GiB") == 4 << 30
    assert parse_size("1.5MB") == 1_500_000 and parse_size("1048576") == 1 << 20 and parse_size("2 kib") == 2048
    for bad in ("", "4XB", "-1GB", "0"):
        with pytest.raises(UsageError):
            parse_size(bad)




def test_cli_convert_and_exit_codes(source, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(capsys, "convert", str(source), str(out), "--to", "dsv4", "--max-shard-size", "2MB")
    assert code == 0 and stdout.strip() == str(out) and stderr == ""  # no bar: stderr is not a terminal
    assert len(set(json.loads((out / INDEX_NAME).read_text())["weight_map"].values())) > 1
    code, _, stderr = run_cli(capsys, "convert", str(source), str(out), "--to", "dsv4")
    assert code == 2 and re.fullmatch(r"dsv4: error: .*already exists.*--force.*\n", stderr)
    code, _, _ = run_cli(capsys, "convert", str(source), str(out), "--to", "dsv4", "--force")
    assert code == 0
    code, _, stderr = run_cli(capsys, "convert", str(tmp_path / "nope"), str(tmp_path / "o2"), "--to", "dsv4")
    assert code == 2 and stderr.count("\n") == 1 and "no model" in stderr
    code, _, stderr = run_cli(capsys, "convert", str(source), str(tmp_path / "o3"), "--to", "int4")
    assert code == 2 and "choose one of: dsv4, fp8-experts, hf-bf16" in stderr
    code, _, stderr = run_cli(capsys, "convert", str(source), str(tmp_path / "o4"), "--to", "dsv4",
                              "--max-shard-size", "lots")
    assert code == 2 and "invalid size" in stderr


def test_progress_bar_draws_on_a_terminal_only():
    with progress_bar(False) as update:
        assert update is None
    with progress_bar(True) as update:
        update(0, 100)
        update(100, 100)


def test_progress_bar_starts_from_the_resumed_point_with_its_label(monkeypatch):
    """A resumed run's first update is a starting point (reset), not a burst of speed that makes the time
    left look like nothing; the bar carries the command's label."""
    from rich import progress as rich_progress

    calls = []
    add_task = rich_progress.Progress.add_task
    monkeypatch.setattr(rich_progress.Progress, "add_task",
                        lambda self, label, **kw: calls.append(("task", label)) or add_task(self, label, **kw))
    monkeypatch.setattr(rich_progress.Progress, "reset", lambda self, task, **kw: calls.append(("reset", kw)))
    monkeypatch.setattr(rich_progress.Progress, "update", lambda self, task, **kw: calls.append(("update", kw)))
    with progress_bar(True, "quantizing") as update:
        update(600, 1000)
        update(700, 1000)
    assert calls == [("task", "quantizing"), ("reset", {"total": 1000, "completed": 600}),
                     ("update", {"completed": 700, "total": 1000})]


def test_register_is_idempotent():
    import typer

    app = typer.Typer()
    register(app)
    register(app)
    assert [c.name for c in app.registered_commands] == ["convert"]


def test_a_changed_source_restarts_instead_of_resuming(source, tmp_path):
    """Partial shards made from a source file that has since changed (a re-download, an edited file:
    same names and sizes, new modification time) are discarded, not mixed into the new output."""
    src = tmp_path / "src"
    shutil.copytree(source, src)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="simulated crash"):
        convert_checkpoint(src, out, "dsv4", max_shard_bytes=SMALL_SHARDS, on_shard=StopAfter(2))
    shard = sorted(src.glob("*.safetensors"))[-1]
    stat = shard.stat()
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    again = StopAfter()
    convert_checkpoint(src, out, "dsv4", max_shard_bytes=SMALL_SHARDS, on_shard=again)
    assert sorted(again.seen) == sorted(p.name for p in out.glob("model-*.safetensors"))
