"""`dsv4 convert`: rewrite a checkpoint into another layout, streaming, restartable and atomic.

Targets:

* `dsv4` — our runtime layout (`io/dsv4_layout.py`): dense tensors unchanged, each MoE
  layer's routed experts packed into one `[experts, bytes_per_expert]` uint8 blob.
* `fp8-experts` — the official format with the routed experts converted losslessly from
  FP4 (packed e2m1, one UE8M0 scale per row per 32 inputs) to FP8 e4m3 with one UE8M0
  scale per 128x128 block (spec §3.6); config `expert_dtype: "fp8"`.
* `hf-bf16` — dequantized BF16 in transformers' naming (`io/hf_export.py`), MTP dropped.

Every output tensor is planned up front from the source headers (name, dtype, shape,
shard) and produced lazily, in pieces, while its shard file is written: memory holds one
tensor (one expert row for the blobs, one stacked-expert slice for hf-bf16) at a time.
The output is built in `<OUT>.dsv4-convert-partial/` (marked as dsv4's, see `fsutil`); after each
finished shard a small progress file there records it, so re-running the same command after an
interruption skips finished shards, unless a source file changed meanwhile. When everything is
written the directory is renamed to OUT in one step; on error OUT is untouched and the partial
directory stays for resuming (`--force` discards it). `dsv4 quantize` writes through the same
machinery (`write_plan`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dsv4cli.errors import CheckpointError, DsvError, UsageError
from dsv4cli.formats.official import FP4_BLOCK, FP4_VALUES, FP8_BLOCK, unpack_fp4
from dsv4cli.fsutil import (
    check_free_space,
    check_output_dir,
    disk_errors,
    empty_staging,
    locked,
    move_into_place,
    open_resumable_staging,
    write_json,
)
from dsv4cli.io.checkpoint import CONFIG_NAME, INDEX_NAME, MTP_PREFIX, SINGLE_FILE_NAME, Checkpoint
from dsv4cli.io.dsv4_layout import (
    EXPERT_NAME_RE,
    LAYOUT_NAME,
    Dsv4Checkpoint,
    ExpertLayout,
    blob_name,
    layout_document,
    open_checkpoint,
)
from dsv4cli.io.hf_export import transformers_config, transformers_name
from dsv4cli.io.safetensors_file import SAFETENSORS_DTYPES, encode_header, write_safetensors_file
from dsv4cli.io.schema import DTYPE_BYTES, TensorSpec, checkpoint_specs
from dsv4cli.io.writer import (
    DEFAULT_MAX_SHARD_BYTES,
    GENERATION_CONFIG_NAME,
    TOKENIZER_FILES,
    checkpoint_order,
    generation_config,
    shard_file_name,
)
from dsv4cli.kernels.ref import dequantize_weight

TARGETS = ("dsv4", "fp8-experts", "hf-bf16")
PARTIAL_SUFFIX = ".dsv4-convert-partial"  # partial_dir(out, "convert")
PROGRESS_NAME = "convert-progress.json"
CONVERT_VERSION = 1
#: Shard data starts on a page boundary (the header is padded with spaces, as safetensors allows).
DATA_ALIGN = 4096
#: FP4 -> FP8: the block scale is the largest sub-scale / 2**6, so every e2m1 value (|v| <= 6) times
#: its power-of-two offset (<= 2**6) stays <= 384 < 448, the e4m3 maximum (official convert.py).
MAX_OFFSET_BITS = 6
#: From offset 2**-17 down, no nonzero e2m1 value (>= 0.5) times the offset is an e4m3 number (>= 2**-9).
_MIN_OFFSET = -17
_E8M0_NAN = 255

ProgressCallback = Callable[[int, int], None]
Producer = Callable[[], Iterable[torch.Tensor]]


# ======================================================================= plan


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor: its name and spec, and how to produce its bytes (in pieces, in order)."""

    name: str
    spec: TensorSpec
    produce: Producer


@dataclass
class Shard:
    name: str
    tensors: list[PlannedTensor]  # in file order
    header: bytes = b""

    @property
    def data_bytes(self) -> int:
        return sum(t.spec.nbytes for t in self.tensors)

    @property
    def file_bytes(self) -> int:
        return 8 + len(self.header) + self.data_bytes


@dataclass
class ConversionPlan:
    """Everything a target writes: planned tensors, config and small side files."""

    target: str
    tensors: list[PlannedTensor]
    config: dict[str, Any]
    generation_config: dict[str, Any]
    copied_files: list[Path] = field(default_factory=list)  # tokenizer files, copied as they are
    side_files: dict[str, dict[str, Any]] = field(default_factory=dict)  # extra JSON files
    shard_metadata: dict[str, str] = field(default_factory=lambda: {"format": "pt"})
    written_files: dict[str, Callable[[Path], None]] = field(default_factory=dict)  # name -> writes that file


def single(spec: TensorSpec, name: str, make: Callable[[], torch.Tensor]) -> Producer:
    """A producer yielding one whole tensor, checked against `spec`."""

    def produce() -> Iterator[torch.Tensor]:
        tensor = make()
        actual = (SAFETENSORS_DTYPES.get(tensor.dtype, str(tensor.dtype)), tuple(tensor.shape))
        if actual != (spec.dtype, spec.shape):
            raise CheckpointError(f"{name} is {actual[0]}{list(actual[1])}, expected {spec.dtype}{list(spec.shape)}",
                                  "the source checkpoint is inconsistent; re-download it")
        yield tensor

    return produce


# ================================================================== FP4 -> FP8


def fp4_to_fp8_blocks(packed: torch.Tensor, scale: torch.Tensor, name: str = "weight"
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed FP4 `[out, in/2]` + UE8M0 `[out, in/32]` -> e4m3 `[out, in]` + UE8M0 `[ceil(out/128), ceil(in/128)]`.

    Exact (spec §3.6): per 128x128 block the new scale exponent is the largest 32-column
    sub-scale exponent minus 6 (floored at the smallest UE8M0 value), and each e2m1 value
    becomes the e4m3 number value * 2**offset, offset = its sub-scale exponent minus the block
    exponent (<= 6, so |value| <= 6 * 64 = 384 < 448). The e4m3 bytes come from a table that
    holds only exact results; a value that e4m3 cannot hold exactly (sub-scales within one
    block more than ~2**14 apart) raises `CheckpointError` instead of rounding.
    """
    out_f = packed.shape[0]
    groups_per_block = FP8_BLOCK // FP4_BLOCK
    exponents = scale.view(torch.uint8).to(torch.int32)  # [out, in/32]
    n_groups = exponents.shape[1]
    if bool((exponents == _E8M0_NAN).any()):
        raise CheckpointError(f"{name}: a scale is NaN (UE8M0 byte 255)", "the source checkpoint is corrupt")
    block_rows, block_cols = -(-out_f // FP8_BLOCK), -(-n_groups // groups_per_block)
    padded = exponents.new_zeros(block_rows * FP8_BLOCK, block_cols * groups_per_block)
    padded[:out_f, :n_groups] = exponents
    block_max = padded.view(block_rows, FP8_BLOCK, block_cols, groups_per_block).amax(dim=(1, 3))
    block_exponent = (block_max - MAX_OFFSET_BITS).clamp(min=0)  # [rows, cols]
    per_group = block_exponent.repeat_interleave(FP8_BLOCK, 0)[:out_f]
    per_group = per_group.repeat_interleave(groups_per_block, 1)[:, :n_groups]
    row = ((exponents - per_group).clamp(min=_MIN_OFFSET) - _MIN_OFFSET) * 256  # table row per 32 columns
    packed_bytes = packed.view(torch.uint8).view(out_f, n_groups, FP4_BLOCK // 2)
    fp8 = torch.empty(out_f, n_groups * FP4_BLOCK, dtype=torch.uint8)
    for start in range(0, out_f, FP8_BLOCK):  # one block row at a time keeps the temporaries small
        band = slice(start, start + FP8_BLOCK)
        entry = (row[band, :, None] + packed_bytes[band].to(torch.int32)).view(-1)
        pairs = _e4m3_pair_table().index_select(0, entry).view(torch.int16)  # low nibble, high nibble
        if bool((pairs < 0).any()):
            raise CheckpointError(f"{name}: FP4 -> FP8 would lose precision (the 32-column scales inside one "
                                  "128x128 block are too far apart)",
                                  "keep the FP4 experts (e.g. {opt:to} dsv4); fp8-experts needs a lossless source")
        fp8[band] = pairs.to(torch.uint8).view(-1, fp8.shape[1])
    fp8 = fp8.view(torch.float8_e4m3fn)
    return fp8, block_exponent.to(torch.uint8).view(torch.float8_e8m0fnu)


def dequantize_fp4_bf16(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`formats.dequantize_fp4_rows(packed, scale).to(bfloat16)`, bit for bit (the same float32
    products), with a per-byte lookup instead of unpacking nibbles (several times faster)."""
    out_f, n_groups = scale.shape
    pairs = _fp4_pair_values().index_select(0, packed.view(torch.uint8).reshape(-1).to(torch.int32))
    values = pairs.view(torch.float32).view(out_f, n_groups, FP4_BLOCK)
    multipliers = torch.exp2(scale.view(torch.uint8).float() - 127.0)
    return (values * multipliers[..., None]).view(out_f, n_groups * FP4_BLOCK).to(torch.bfloat16)


@functools.cache
def _fp4_pair_values() -> torch.Tensor:
    """Packed byte -> its two e2m1 values (low nibble first) as float32 bits, one int64 per byte."""
    values = FP4_VALUES[unpack_fp4(torch.arange(256, dtype=torch.uint8)).long()]  # [256, 2]
    return values.contiguous().view(torch.int64).reshape(-1)


@functools.cache
def _e4m3_pair_table() -> torch.Tensor:
    """At (offset - _MIN_OFFSET) * 256 + packed byte: the two int16 e4m3 bytes (low nibble first) of the
    byte's e2m1 values times 2**offset, each -1 where no e4m3 number equals the product."""
    offsets = torch.arange(_MIN_OFFSET, MAX_OFFSET_BITS + 1, dtype=torch.float32)
    values = FP4_VALUES[unpack_fp4(torch.arange(256, dtype=torch.uint8)).long()]  # [256, 2]
    exact = values[None] * torch.exp2(offsets)[:, None, None]
    fp8 = exact.to(torch.float8_e4m3fn)
    table = fp8.view(torch.uint8).to(torch.int16)
    table[fp8.float() != exact] = -1
    return table.view(torch.int32).reshape(-1)  # both nibbles' entries in one int32, looked up per byte


# ====================================================================== targets


def plan_conversion(source: Checkpoint | Dsv4Checkpoint, target: str) -> ConversionPlan:
    """The output of `target` for `source` (checks that the combination makes sense)."""
    if target == "dsv4":
        return _plan_dsv4(source)
    if target == "fp8-experts":
        return _plan_fp8_experts(source)
    if target == "hf-bf16":
        return _plan_hf_bf16(source)
    raise UsageError(f"unknown conversion target {target!r}", f"choose one of: {', '.join(TARGETS)}")


def _plan_dsv4(source: Checkpoint | Dsv4Checkpoint) -> ConversionPlan:
    if isinstance(source, Dsv4Checkpoint):
        raise UsageError(f"{source.model_dir} is already in the dsv4 layout", "nothing to convert")
    args = source.args
    layout = ExpertLayout.for_args(args)
    blob_spec = TensorSpec("U8", (args.n_routed_experts, layout.bytes_per_expert))
    tensors, packed = [], set()
    for name in checkpoint_order(checkpoint_specs(args, include_mtp=source.has_mtp)):
        match = EXPERT_NAME_RE.match(name)
        if match is None:
            tensors.append(passthrough(source, name))
        elif match["prefix"] not in packed:
            packed.add(match["prefix"])
            tensors.append(PlannedTensor(blob_name(match["prefix"]), blob_spec,
                                         functools.partial(_blob_rows, layout, source, match["prefix"])))
    document = layout_document(layout, args, source.has_mtp, source_fingerprint(source))
    return ConversionPlan("dsv4", tensors, _read_json(source.model_dir / CONFIG_NAME),
                          source_generation_config(source), tokenizer_files(source), {LAYOUT_NAME: document},
                          {"format": "pt", "dsv4_layout": str(document["version"])})


def _blob_rows(layout: ExpertLayout, source: Checkpoint | Dsv4Checkpoint, prefix: str) -> Iterator[torch.Tensor]:
    for expert in range(source.args.n_routed_experts):
        yield from layout.row_chunks(source.get, prefix, expert)


def _plan_fp8_experts(source: Checkpoint | Dsv4Checkpoint) -> ConversionPlan:
    args = source.args
    if args.expert_dtype != "fp4":
        raise UsageError(f"{source.model_dir} stores its routed experts as {args.expert_dtype}, not fp4",
                         "fp8-experts converts FP4 experts; this checkpoint needs no conversion")
    out_args = args.replace(expert_dtype="fp8")
    specs = checkpoint_specs(out_args, include_mtp=source.has_mtp)

    @functools.lru_cache(maxsize=2)
    def converted(linear: str) -> tuple[torch.Tensor, torch.Tensor]:
        return fp4_to_fp8_blocks(source.get(f"{linear}.weight"), source.get(f"{linear}.scale"), linear)

    tensors = []
    for name in checkpoint_order(specs):
        if EXPERT_NAME_RE.match(name) is None:
            tensors.append(passthrough(source, name))
            continue
        linear, _, leaf = name.rpartition(".")
        make = functools.partial(_pick, converted, linear, 0 if leaf == "weight" else 1)
        tensors.append(PlannedTensor(name, specs[name], single(specs[name], name, make)))
    return ConversionPlan("fp8-experts", tensors, out_args.to_hf_config(), source_generation_config(source),
                          tokenizer_files(source))


def _pick(convert: Callable[[str], tuple[torch.Tensor, torch.Tensor]], linear: str, index: int) -> torch.Tensor:
    return convert(linear)[index]


def _plan_hf_bf16(source: Checkpoint | Dsv4Checkpoint) -> ConversionPlan:
    """transformers' names and dtypes, as `hf_export.transformers_tensors` yields them; the stacked
    experts are produced one expert at a time instead of stacked in memory."""
    args = source.args
    tensors = []
    for name, spec in checkpoint_specs(args, include_mtp=False, experts=range(0)).items():
        if name.endswith(".scale"):
            continue
        target = transformers_name(name)
        if target is None:
            raise CheckpointError(f"no transformers name for {name}", "this dsv4 cannot export this checkpoint")
        out_spec = TensorSpec(spec.dtype if spec.dtype in ("I64", "F32") else "BF16", spec.shape)
        make = functools.partial(_dense, source, name)
        tensors.append(PlannedTensor(target, out_spec, single(out_spec, target, make)))
        if name.endswith("ffn.gate.weight"):
            tensors += _hf_stacked_experts(source, name[: -len(".gate.weight")], target[: -len(".gate.weight")])
    return ConversionPlan("hf-bf16", tensors, transformers_config(args), source_generation_config(source),
                          tokenizer_files(source))


def _dense(source: Checkpoint | Dsv4Checkpoint, name: str) -> torch.Tensor:
    """`hf_export`'s rule: quantized weights dequantized to bf16, int64/float32 kept, the rest bf16."""
    tensor = source.get(name)
    if tensor.dtype == torch.int8:
        return dequantize_fp4_bf16(tensor, source.get(name[: -len("weight")] + "scale"))
    if tensor.dtype == torch.float8_e4m3fn:
        return dequantize_weight(tensor, source.get(name[: -len("weight")] + "scale")).to(torch.bfloat16)
    if tensor.dtype in (torch.int64, torch.float32):
        return tensor
    return tensor.to(torch.bfloat16)


def _hf_stacked_experts(source: Checkpoint | Dsv4Checkpoint, ffn: str, mlp: str) -> list[PlannedTensor]:
    """`mlp.experts.gate_up_proj` [E, 2I, D] (w1 rows then w3 rows) and `down_proj` [E, D, I] (w2)."""
    args = source.args
    n, d, inter = args.n_routed_experts, args.dim, args.moe_inter_dim

    def gate_up() -> Iterator[torch.Tensor]:
        for e in range(n):
            yield torch.cat([_dense(source, f"{ffn}.experts.{e}.w1.weight"),
                             _dense(source, f"{ffn}.experts.{e}.w3.weight")])

    def down() -> Iterator[torch.Tensor]:
        for e in range(n):
            yield _dense(source, f"{ffn}.experts.{e}.w2.weight")

    return [PlannedTensor(f"{mlp}.experts.gate_up_proj", TensorSpec("BF16", (n, 2 * inter, d)), gate_up),
            PlannedTensor(f"{mlp}.experts.down_proj", TensorSpec("BF16", (n, d, inter)), down)]


def passthrough(source: Checkpoint | Dsv4Checkpoint, name: str) -> PlannedTensor:
    spec = source.spec(name)
    return PlannedTensor(name, spec, single(spec, name, functools.partial(source.get, name)))


# ====================================================================== sharding


def assign_shards(tensors: list[PlannedTensor], max_shard_bytes: int, metadata: dict[str, str]) -> list[Shard]:
    """Pack tensors in order into shards of at most `max_shard_bytes` (a bigger tensor gets a shard of
    its own); MTP tensors start a new shard. Within a shard: blobs first, then widest dtype first."""
    groups: list[list[PlannedTensor]] = []
    size = 0
    for t in tensors:
        starts_mtp = bool(groups) and t.name.startswith(MTP_PREFIX) and not groups[-1][-1].name.startswith(MTP_PREFIX)
        if not groups or starts_mtp or size + t.spec.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.spec.nbytes
    shards = []
    for i, group in enumerate(groups, start=1):
        ordered = sorted(group, key=lambda t: (t.spec.dtype != "U8", -DTYPE_BYTES[t.spec.dtype]))
        shards.append(Shard(shard_file_name(i, len(groups)), ordered, _shard_header(ordered, metadata)))
    return shards


def _shard_header(tensors: list[PlannedTensor], metadata: dict[str, str]) -> bytes:
    return encode_header([(t.name, t.spec) for t in tensors], metadata, align=DATA_ALIGN)


def write_shard(path: Path, shard: Shard, on_bytes: Callable[[int], None]) -> None:
    """Write `shard` to `path` (`write_safetensors_file`: a partial name, synced, renamed into place)."""
    write_safetensors_file(path, shard.header, _checked_pieces(shard), on_bytes)


def _checked_pieces(shard: Shard) -> Iterator[torch.Tensor]:
    """Every planned tensor's pieces in order, each tensor checked to produce exactly its spec's bytes."""
    for t in shard.tensors:
        written = 0
        for piece in t.produce():
            written += piece.numel() * piece.element_size()
            yield piece
        if written != t.spec.nbytes:
            raise CheckpointError(f"{t.name}: produced {written} bytes, expected {t.spec.nbytes}",
                                  "the source checkpoint is inconsistent; re-download it")


# ==================================================================== the service


def convert_checkpoint(src: str | Path, out: str | Path, target: str, *,
                       max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, force: bool = False,
                       progress: ProgressCallback | None = None,
                       on_shard: Callable[[Path], None] | None = None) -> Path:
    """Convert checkpoint `src` into `out` in layout `target`; return `out`.

    `progress(done_bytes, total_bytes)` follows the tensor bytes (finished shards of a
    resumed run count as done); `on_shard(path)` is called after each shard is recorded.
    """
    if target not in TARGETS:
        raise UsageError(f"unknown conversion target {target!r}", f"choose one of: {', '.join(TARGETS)}")
    if max_shard_bytes <= 0:
        raise UsageError("the maximum shard size must be positive")
    src, out = Path(src).absolute(), Path(out).absolute()
    check_output_dir(out, [src], force)
    source = open_checkpoint(src)
    try:
        plan = plan_conversion(source, target)
        write_plan(plan, source, out, "convert", max_shard_bytes=max_shard_bytes, force=force, progress=progress,
                   on_shard=on_shard)
    finally:
        source.close()
    return out


def partial_dir(out: Path, purpose: str) -> Path:
    """Where `dsv4 <purpose>` builds `out`: a marked sibling kept across interruptions for resuming."""
    return out.with_name(f"{out.name}.dsv4-{purpose}-partial")


def write_plan(plan: ConversionPlan, source: Checkpoint | Dsv4Checkpoint, out: Path, purpose: str, *,
               max_shard_bytes: int, force: bool, progress: ProgressCallback | None = None,
               on_shard: Callable[[Path], None] | None = None, identity: dict[str, Any] | None = None) -> Path:
    """Write `plan` as a checkpoint directory `out`, restartably: shards go into `partial_dir(out)`,
    recorded one by one, and the finished directory is renamed to `out` in one step.

    A re-run with the same plan from the same, unchanged source files resumes after the last
    finished shard; `identity` (e.g. a quantization recipe) joins the resume fingerprint. `force`
    discards an earlier partial run. Disk errors become one-line errors that keep the partial output.
    """
    shards = assign_shards(plan.tensors, max_shard_bytes, plan.shard_metadata)
    partial = partial_dir(out, purpose)
    fingerprint = _fingerprint(plan.target, source, shards, identity or {})
    hint = f"re-run the same command to resume from {partial}"
    if not partial.exists():  # a fresh run: refuse a disk that clearly cannot hold the output, before writing
        check_free_space(out.parent, sum(s.file_bytes for s in shards), f"writing {out}")
    with disk_errors(f"writing {partial}", hint):
        open_resumable_staging(partial, purpose)
        with locked(partial, f"another `dsv4 {purpose}`"):
            try:
                _write_all(partial, plan, shards, fingerprint, force, progress, on_shard)
            except DsvError as err:
                err.hint = (err.hint + "; " if err.hint else "") + f"partial output kept in {partial} for resuming"
                raise
            move_into_place(partial, out)
    return out


def _write_all(tmp: Path, plan: ConversionPlan, shards: list[Shard], fingerprint: str, force: bool,
               progress: ProgressCallback | None, on_shard: Callable[[Path], None] | None) -> None:
    finished = _resume_state(tmp, fingerprint, force, shards)
    total = sum(s.data_bytes for s in shards)
    done = sum(s.data_bytes for s in shards if s.name in finished)
    check_free_space(tmp, sum(s.file_bytes for s in shards if s.name not in finished), f"finishing {tmp}")

    def advance(nbytes: int) -> None:
        nonlocal done
        done += nbytes
        if progress is not None:
            progress(done, total)

    advance(0)
    for shard in shards:
        if shard.name in finished:
            continue
        write_shard(tmp / shard.name, shard, advance)
        finished[shard.name] = shard.file_bytes
        _write_progress(tmp, fingerprint, finished)
        if on_shard is not None:
            on_shard(tmp / shard.name)
    _write_small_files(tmp, plan, shards)
    (tmp / PROGRESS_NAME).unlink()


def _write_small_files(tmp: Path, plan: ConversionPlan, shards: list[Shard]) -> None:
    weight_map = {t.name: s.name for s in shards for t in s.tensors}
    total = sum(s.data_bytes for s in shards)
    write_json(tmp / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map}, sort_keys=True)
    write_json(tmp / CONFIG_NAME, plan.config)
    write_json(tmp / GENERATION_CONFIG_NAME, plan.generation_config)
    for name, document in plan.side_files.items():
        write_json(tmp / name, document)
    for path in plan.copied_files:
        shutil.copyfile(path, tmp / path.name)
    for name, write in plan.written_files.items():
        write(tmp / name)


# ---------------------------------------------------------------- restartability


def _resume_state(tmp: Path, fingerprint: str, force: bool, shards: list[Shard]) -> dict[str, int]:
    """Finished shards (name -> file size) of an earlier run of the same conversion; otherwise
    empty the (dsv4-made) directory and start over."""
    state = None if force else _read_progress(tmp)
    if state is None or state.get("fingerprint") != fingerprint:
        empty_staging(tmp)
        _write_progress(tmp, fingerprint, {})
        return {}
    expected = {s.name: s.file_bytes for s in shards}
    finished = {}
    for name, size in state.get("finished", {}).items():
        path = tmp / name
        if expected.get(name) == size and path.is_file() and path.stat().st_size == size:
            finished[name] = size
    return finished


def _read_progress(tmp: Path) -> dict[str, Any] | None:
    try:
        state = json.loads((tmp / PROGRESS_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return state if isinstance(state, dict) and isinstance(state.get("finished"), dict) else None


def _write_progress(tmp: Path, fingerprint: str, finished: dict[str, int]) -> None:
    write_json(tmp / PROGRESS_NAME, {"version": CONVERT_VERSION, "fingerprint": fingerprint, "finished": finished})


def _fingerprint(target: str, source: Checkpoint | Dsv4Checkpoint, shards: list[Shard],
                 identity: dict[str, Any]) -> str:
    """Identifies one conversion: the source (down to each file's size and modification time), the
    target, `identity`, and the exact planned output files."""
    digest = hashlib.sha256(json.dumps({"version": CONVERT_VERSION, "target": target, "identity": identity,
                                        "source": source_fingerprint(source),
                                        "files": source_file_stamps(source.model_dir)},
                                       sort_keys=True, default=str).encode())
    for shard in shards:
        digest.update(shard.name.encode() + b"\0" + shard.header)
    return digest.hexdigest()


def source_file_stamps(model_dir: Path) -> list[tuple[str, int, int]]:
    """(name, size, mtime in ns) of every file of a checkpoint directory: a source that changed
    since an interrupted run (a re-download, an edited config) no longer matches its partial output."""
    stamps = []
    for path in sorted(model_dir.iterdir()):
        if path.is_file():
            stat = path.stat()
            stamps.append((path.name, stat.st_size, stat.st_mtime_ns))
    return stamps


def source_fingerprint(source: Checkpoint | Dsv4Checkpoint) -> dict[str, Any]:
    """Total tensor bytes and the SHA-256 of the index (or of the single file's header)."""
    index = source.model_dir / INDEX_NAME
    if index.is_file():
        digest, index_file = hashlib.sha256(index.read_bytes()).hexdigest(), INDEX_NAME
    else:
        with open(source.model_dir / SINGLE_FILE_NAME, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            digest, index_file = hashlib.sha256(f.read(header_len)).hexdigest(), SINGLE_FILE_NAME + " header"
    return {"total_size": source.total_bytes, "index_file": index_file, "index_sha256": digest}


# ------------------------------------------------------------------------- files


def source_generation_config(source: Checkpoint | Dsv4Checkpoint) -> dict[str, Any]:
    path = source.model_dir / GENERATION_CONFIG_NAME
    return _read_json(path) if path.is_file() else generation_config(source.args)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}", "re-download the checkpoint") from None


def tokenizer_files(source: Checkpoint | Dsv4Checkpoint) -> list[Path]:
    return [source.model_dir / name for name in TOKENIZER_FILES if (source.model_dir / name).is_file()]

