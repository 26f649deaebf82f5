"""Checkpoint writer -> reader round trips, corruption handling, zero-copy and atomic writes."""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dsv4cli.errors import CheckpointError, ConfigError, UsageError
from dsv4cli.formats.official import dequantize_fp4_rows, dequantize_fp8_blocks
from dsv4cli.io.checkpoint import INDEX_NAME, Checkpoint
from dsv4cli.io.safetensors_file import TORCH_DTYPES, SafetensorsFile
from dsv4cli.io.schema import checkpoint_specs
from dsv4cli.io.writer import (
    random_tensor,
    tensor_generator,
    write_checkpoint,
    write_random_checkpoint,
    write_safetensors,
)
from dsv4cli.model.args import ModelArgs
from dsv4cli.model.presets import PRESETS

ARGS = PRESETS["tiny"]
SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return write_random_checkpoint(ARGS, tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture
def ckpt_copy(tiny_dir, tmp_path) -> Path:
    """A private copy of the tiny checkpoint that a test may corrupt."""
    return Path(shutil.copytree(tiny_dir, tmp_path / "copy"))


# ------------------------------------------------------------------- helpers


def read_shard(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {name: f.get_tensor(name).clone() for name in f.keys()}  # noqa: SIM118


def rewrite_shard(model_dir: Path, shard: str, edit) -> None:
    """Load a shard, let `edit(tensors)` change the dict in place, write it back and fix the index."""
    tensors = read_shard(model_dir / shard)
    edit(tensors)
    write_safetensors(model_dir / shard, tensors.items())
    index_path = model_dir / INDEX_NAME
    index = json.loads(index_path.read_text())
    weight_map = {n: s for n, s in index["weight_map"].items() if s != shard}
    weight_map.update(dict.fromkeys(tensors, shard))
    index["weight_map"] = weight_map
    index_path.write_text(json.dumps(index))


def edit_header(path: Path, edit) -> None:
    """Rewrite a shard's JSON header through `edit(header)`, keeping the data bytes."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def edit_index(model_dir: Path, edit) -> None:
    index_path = model_dir / INDEX_NAME
    index = json.loads(index_path.read_text())
    edit(index)
    index_path.write_text(json.dumps(index))


def open_fails(model_dir: Path, *patterns: str) -> str:
    with pytest.raises(CheckpointError) as info:
        Checkpoint.open(model_dir)
    message = info.value.one_line()
    for pattern in patterns:
        assert re.search(pattern, message), f"{pattern!r} not in {message!r}"
    assert info.value.hint
    return message


# ---------------------------------------------------------------- round trip


def test_round_trip_matches_specs(tiny_dir):
    specs = checkpoint_specs(ARGS)
    with Checkpoint.open(tiny_dir) as ckpt:
        assert ckpt.args == ARGS
        assert ckpt.has_mtp
        assert set(ckpt.names()) == set(specs)
        assert all(ckpt.spec(name) == spec for name, spec in specs.items())
        assert [p.name for p in ckpt.shards()] == [SHARD1, SHARD2]
        mtp_shards = {ckpt.shard_of(n).name for n in specs if n.startswith("mtp.")}
        assert mtp_shards == {SHARD2}
        assert ckpt.shard_of("embed.weight").name == SHARD1
        for name in ("embed.weight", "layers.0.ffn.gate.tid2eid", "layers.1.ffn.experts.3.w2.scale"):
            t = ckpt.get(name)
            assert t.dtype == TORCH_DTYPES[specs[name].dtype]
            assert tuple(t.shape) == specs[name].shape
        assert ckpt.verify_data() == ckpt.total_bytes
        ckpt.validate(mode="data")


def test_values_equal_per_tensor_random_tensor(tiny_dir):
    names = ["layers.1.attn.wq_b.weight", "layers.1.attn.wq_b.scale", "layers.2.ffn.experts.5.w1.scale",
             "layers.0.ffn.gate.tid2eid", "mtp.0.hc_attn_fn", "norm.weight", "head.weight"]
    with Checkpoint.open(tiny_dir) as ckpt:
        for name in names:
            expected = random_tensor(ckpt.spec(name), name, ARGS, tensor_generator(0, name))
            assert torch.equal(ckpt.get(name).view(torch.uint8), expected.view(torch.uint8)), name


def test_index_config_and_generation_config(tiny_dir):
    index = json.loads((tiny_dir / INDEX_NAME).read_text())
    specs = checkpoint_specs(ARGS)
    assert set(index) == {"metadata", "weight_map"}
    assert index["metadata"]["total_size"] == sum(s.nbytes for s in specs.values())
    assert set(index["weight_map"]) == set(specs)
    assert ModelArgs.from_file(tiny_dir) == ARGS
    assert json.loads((tiny_dir / "config.json").read_text()) == ARGS.to_hf_config()
    generation = json.loads((tiny_dir / "generation_config.json").read_text())
    assert generation == {"_from_model_config": True, "bos_token_id": 0, "eos_token_id": 1,
                          "do_sample": True, "temperature": 1.0, "top_p": 1.0,
                          "transformers_version": "4.46.3"}  # the official Flash file
    with Checkpoint.open(tiny_dir) as ckpt:
        assert ckpt.total_bytes == index["metadata"]["total_size"]


def test_deterministic_per_seed(tiny_dir, tmp_path):
    same = write_random_checkpoint(ARGS, tmp_path / "same", seed=0)
    other = write_random_checkpoint(ARGS, tmp_path / "other", seed=1)
    files = sorted(p.name for p in tiny_dir.iterdir())
    assert files == sorted(p.name for p in same.iterdir())
    for name in files:
        assert (tiny_dir / name).read_bytes() == (same / name).read_bytes(), name
    assert (tiny_dir / SHARD1).read_bytes() != (other / SHARD1).read_bytes()
    assert (tiny_dir / SHARD2).read_bytes() != (other / SHARD2).read_bytes()


def test_write_checkpoint_from_read_tensors_is_byte_identical(tiny_dir, tmp_path):
    with Checkpoint.open(tiny_dir) as ckpt:
        tensors = {name: ckpt.get(name) for name in ckpt.names()}
        out = write_checkpoint(tensors, ARGS, tmp_path / "copy")
    for name in (SHARD1, SHARD2, INDEX_NAME, "config.json"):
        assert (out / name).read_bytes() == (tiny_dir / name).read_bytes(), name


def test_readable_by_reference_safe_open(tiny_dir):
    names = {"layers.1.attn.wq_a.weight": torch.float8_e4m3fn,
             "layers.1.attn.wq_a.scale": torch.float8_e8m0fnu,
             "layers.3.ffn.experts.0.w3.weight": torch.int8,
             "layers.3.ffn.experts.0.w3.scale": torch.float8_e8m0fnu,
             "layers.0.ffn.gate.tid2eid": torch.int64,
             "layers.2.attn.compressor.ape": torch.float32,
             "embed.weight": torch.bfloat16}
    with Checkpoint.open(tiny_dir) as ckpt:
        for shard in ckpt.shards():
            with safe_open(str(shard), framework="pt") as f:
                assert set(f.keys()) == {n for n in ckpt.names() if ckpt.shard_of(n) == shard}
                assert f.metadata() == {"format": "pt"}
        for name, dtype in names.items():
            with safe_open(str(ckpt.shard_of(name)), framework="pt") as f:
                reference = f.get_tensor(name)
            mine = ckpt.get(name)
            assert mine.dtype == reference.dtype == dtype
            assert torch.equal(mine.view(torch.uint8), reference.view(torch.uint8)), name


def test_tensors_are_zero_copy_views_of_the_mapping(tiny_dir):
    with SafetensorsFile(tiny_dir / SHARD1) as f:
        start, end = f.mapped_range()
        for name in ("embed.weight", "layers.0.hc_attn_fn", "layers.1.attn.wq_b.scale"):
            a, b = f.get(name), f.get(name)
            assert a.data_ptr() == b.data_ptr() == start + f.byte_range(name)[0]
            assert start <= a.data_ptr() and a.data_ptr() + a.numel() * a.element_size() <= end
        kept = f.get("norm.weight")
    assert f.closed
    assert kept.float().mean().item() == pytest.approx(1.0, abs=0.1)  # still valid after close
    with pytest.raises(CheckpointError, match="closed"):
        f.get("norm.weight")


def test_checkpoint_without_mtp_is_accepted(tmp_path):
    out = write_random_checkpoint(ARGS, tmp_path / "nomtp", include_mtp=False)
    with Checkpoint.open(out) as ckpt:
        assert not ckpt.has_mtp
        assert set(ckpt.names()) == set(checkpoint_specs(ARGS, include_mtp=False))
    assert [p.name for p in out.glob("*.safetensors")] == ["model-00001-of-00001.safetensors"]


@pytest.mark.parametrize("variant", ["bf16", "fp8-experts", "tiny-mix"])
def test_other_formats_round_trip(tmp_path, variant):
    args = {"bf16": ARGS.replace(dtype="bf16", expert_dtype="bf16"),
            "fp8-experts": ARGS.replace(expert_dtype="fp8"),
            "tiny-mix": PRESETS["tiny-mix"]}[variant]
    out = write_random_checkpoint(args, tmp_path / variant, seed=3)
    with Checkpoint.open(out) as ckpt:
        assert ckpt.args == args
        specs = checkpoint_specs(args)
        assert {n: ckpt.spec(n) for n in ckpt.names()} == specs
        name = "layers.1.ffn.experts.0.w1.weight"
        assert ckpt.get(name).dtype == TORCH_DTYPES[specs[name].dtype]


def test_single_model_safetensors_without_index(tiny_dir, tmp_path):
    model_dir = tmp_path / "single"
    model_dir.mkdir()
    shutil.copy(tiny_dir / "config.json", model_dir)
    tensors = {**read_shard(tiny_dir / SHARD1), **read_shard(tiny_dir / SHARD2)}
    write_safetensors(model_dir / "model.safetensors", tensors.items())
    with Checkpoint.open(model_dir) as ckpt:
        assert ckpt.shard_of("embed.weight").name == "model.safetensors"
        assert len(ckpt) == len(checkpoint_specs(ARGS))


def test_small_shards(tmp_path):
    limit = 1 << 20
    out = write_random_checkpoint(ARGS, tmp_path / "small", max_shard_bytes=limit)
    shards = sorted(out.glob("*.safetensors"))
    count = len(shards)
    assert count > 3
    expected = [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    assert [p.name for p in shards] == expected
    with Checkpoint.open(out) as ckpt:
        for shard in shards:
            with SafetensorsFile(shard) as f:
                assert f.data_size <= limit or len(f) == 1
        assert ckpt.get("embed.weight").shape == (ARGS.vocab_size, ARGS.dim)


def test_random_weights_are_numerically_sane(tiny_dir):
    with Checkpoint.open(tiny_dir) as ckpt:
        fp8 = dequantize_fp8_blocks(ckpt.get("layers.1.attn.wq_b.weight"),
                                    ckpt.get("layers.1.attn.wq_b.scale"))
        assert fp8.std().item() * ARGS.q_lora_rank ** 0.5 == pytest.approx(1.0, rel=0.1)
        fp4 = dequantize_fp4_rows(ckpt.get("layers.1.ffn.experts.2.w2.weight"),
                                  ckpt.get("layers.1.ffn.experts.2.w2.scale"))
        assert fp4.shape == (ARGS.dim, ARGS.moe_inter_dim)
        assert fp4.std().item() * ARGS.moe_inter_dim ** 0.5 == pytest.approx(1.0, rel=0.15)
        assert ckpt.get("embed.weight").float().std().item() == pytest.approx(1.0, rel=0.05)
        assert ckpt.get("head.weight").float().std().item() * ARGS.dim ** 0.5 == pytest.approx(1.0, rel=0.05)
        norm = ckpt.get("layers.2.attn_norm.weight").float()
        assert (norm - 1).abs().max().item() < 0.3
        for name in ("layers.0.hc_attn_scale", "hc_head_scale", "mtp.0.hc_head_scale"):
            assert (ckpt.get(name) > 0).all()
        tid2eid = ckpt.get("layers.0.ffn.gate.tid2eid")
        assert tid2eid.min() >= 0 and tid2eid.max() < ARGS.n_routed_experts
        assert all(len(set(row)) == len(row) for row in tid2eid.tolist())


def test_tokenizer_files_are_copied(tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text('{"fake": true}')
    (tok / "tokenizer_config.json").write_text("{}")
    out = write_random_checkpoint(ARGS, tmp_path / "with_tok", tokenizer_dir=tok)
    assert (out / "tokenizer.json").read_text() == '{"fake": true}'
    assert (out / "tokenizer_config.json").read_text() == "{}"
    with pytest.raises(CheckpointError, match=r"tokenizer\.json"):
        write_random_checkpoint(ARGS, tmp_path / "bad_tok", tokenizer_dir=tmp_path / "nowhere")
    assert not (tmp_path / "bad_tok").exists()


# ------------------------------------------------------------------ corruption


def test_truncated_shard(ckpt_copy):
    path = ckpt_copy / SHARD2
    path.write_bytes(path.read_bytes()[:-100])
    open_fails(ckpt_copy, SHARD2, "truncated", "re-download", r"tensor \S+ and later are cut off")


def test_header_length_larger_than_file(ckpt_copy):
    path = ckpt_copy / SHARD1
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(raw) + 10) + raw[8:])
    open_fails(ckpt_copy, SHARD1, "header length")


def test_invalid_json_header(ckpt_copy):
    path = ckpt_copy / SHARD1
    raw = bytearray(path.read_bytes())
    raw[8] = ord("x")
    path.write_bytes(bytes(raw))
    open_fails(ckpt_copy, SHARD1, "invalid JSON")


def test_overlapping_offsets(ckpt_copy):
    shifted = []

    def overlap(header):
        entries = sorted((v["data_offsets"], k) for k, v in header.items() if k != "__metadata__")
        offsets, name = entries[1]
        header[name]["data_offsets"] = [offsets[0] - 1, offsets[1] - 1]
        shifted.append(name)

    edit_header(ckpt_copy / SHARD1, overlap)
    open_fails(ckpt_copy, SHARD1, re.escape(shifted[0]), "overlaps")


@pytest.mark.parametrize("field, value, pattern", [
    ("dtype", "F64", "unsupported dtype"),
    ("shape", [3], "bytes for"),
    ("data_offsets", [5], "data_offsets"),
])
def test_corrupt_header_entry(ckpt_copy, field, value, pattern):
    name = "layers.0.attn_norm.weight"
    edit_header(ckpt_copy / SHARD1, lambda header: header[name].__setitem__(field, value))
    open_fails(ckpt_copy, SHARD1, re.escape(name), pattern)


def test_missing_tensor(ckpt_copy):
    rewrite_shard(ckpt_copy, SHARD1, lambda t: t.pop("layers.1.attn.wq_a.scale"))
    open_fails(ckpt_copy, r"1 tensor missing", re.escape("layers.1.attn.wq_a.scale"))


def test_partial_mtp(ckpt_copy):
    rewrite_shard(ckpt_copy, SHARD2, lambda t: t.pop("mtp.0.e_proj.weight"))
    open_fails(ckpt_copy, "partial MTP", re.escape("mtp.0.e_proj.weight"))


def test_unexpected_tensor(ckpt_copy):
    rewrite_shard(ckpt_copy, SHARD1, lambda t: t.__setitem__("layers.0.extra.weight", torch.zeros(4)))
    open_fails(ckpt_copy, "unexpected tensor", re.escape("layers.0.extra.weight"), SHARD1)


def test_wrong_dtype(ckpt_copy):
    name = "layers.0.attn_norm.weight"
    rewrite_shard(ckpt_copy, SHARD1, lambda t: t.__setitem__(name, t[name].float()))
    open_fails(ckpt_copy, "wrong dtype", re.escape(name), SHARD1, "F32, expected BF16")


def test_wrong_shape(ckpt_copy):
    name = "layers.2.attn.compressor.ape"
    rewrite_shard(ckpt_copy, SHARD1, lambda t: t.__setitem__(name, t[name][:, :-2].contiguous()))
    open_fails(ckpt_copy, "wrong shape", re.escape(name), SHARD1)


def test_index_points_to_missing_shard(ckpt_copy):
    missing = "model-00009-of-00009.safetensors"
    edit_index(ckpt_copy, lambda i: i["weight_map"].__setitem__("norm.weight", missing))
    open_fails(ckpt_copy, re.escape(missing), "missing")


def test_index_lists_tensor_absent_from_shard(ckpt_copy):
    edit_index(ckpt_copy, lambda i: i["weight_map"].__setitem__("norm.weight", SHARD2))
    open_fails(ckpt_copy, re.escape("norm.weight"), SHARD2)


def test_invalid_index(ckpt_copy):
    (ckpt_copy / INDEX_NAME).write_text("{not json")
    open_fails(ckpt_copy, INDEX_NAME, "JSON")
    (ckpt_copy / INDEX_NAME).write_text('{"metadata": {}}')
    open_fails(ckpt_copy, "weight_map")


def test_missing_config_is_config_error(ckpt_copy):
    (ckpt_copy / "config.json").unlink()
    with pytest.raises(ConfigError, match="config"):
        Checkpoint.open(ckpt_copy)


def test_missing_index_and_no_single_file(ckpt_copy):
    (ckpt_copy / INDEX_NAME).unlink()
    open_fails(ckpt_copy, INDEX_NAME, "model.safetensors")


def test_config_that_does_not_match_the_tensors(ckpt_copy):
    config = json.loads((ckpt_copy / "config.json").read_text())
    config["moe_intermediate_size"] = 64
    (ckpt_copy / "config.json").write_text(json.dumps(config))
    open_fails(ckpt_copy, "wrong shape", "experts")


def test_truncated_after_open(ckpt_copy):
    with Checkpoint.open(ckpt_copy) as ckpt:
        path = ckpt.shard_of("mtp.0.norm.weight")
        last = [n for n in ckpt.names() if ckpt.shard_of(n) == path][-1]  # names() is storage order
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size - 8)
        with pytest.raises(CheckpointError, match="truncated"):
            ckpt.verify_data()
        with pytest.raises(CheckpointError, match=re.escape(last)):
            ckpt.get(last)


# ------------------------------------------------------------------ atomic writes


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if any(tag in p.name for tag in (".dsv4-", ".replaced-", ".tmp")))


def test_exception_mid_write_leaves_nothing(tmp_path):
    def failing_stream():
        for i in range(50):
            yield f"t{i}", torch.zeros(1024)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        write_checkpoint(failing_stream(), ARGS, tmp_path / "out", max_shard_bytes=16 << 10, validate=False)
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []


def test_validation_error_mid_write_leaves_nothing(tiny_dir, tmp_path):
    with Checkpoint.open(tiny_dir) as ckpt:
        tensors = {name: ckpt.get(name) for name in ckpt.names()}
    tensors["norm.weight"] = torch.ones(ARGS.dim + 1, dtype=torch.bfloat16)
    with pytest.raises(CheckpointError, match=r"norm\.weight"):
        write_checkpoint(tensors, ARGS, tmp_path / "out")
    del tensors["layers.0.attn.wq_a.weight"], tensors["norm.weight"]
    with pytest.raises(CheckpointError, match="not given"):
        write_checkpoint(tensors, ARGS, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []


def test_refuses_to_overwrite_unless_asked(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(UsageError, match="already exists"):
        write_random_checkpoint(ARGS, out)
    with pytest.raises(UsageError, match="did not write"):  # overwrite replaces only what dsv4 wrote
        write_random_checkpoint(ARGS, out, overwrite=True)
    assert (out / "precious.txt").read_text() == "keep me"
    mine = tmp_path / "mine"
    write_random_checkpoint(ARGS, mine, seed=1)
    write_random_checkpoint(ARGS, mine, overwrite=True)
    assert (mine / INDEX_NAME).is_file()
    assert leftovers(tmp_path) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    write_random_checkpoint(ARGS, empty)  # an empty directory is fine without overwrite
    assert (empty / "config.json").is_file()
