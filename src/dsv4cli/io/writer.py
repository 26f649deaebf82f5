"""Write checkpoints in exactly the official on-disk format (spec §3.1), streaming and atomically.

Output: `config.json`, `generation_config.json`, `model.safetensors.index.json` and shards
`model-0000i-of-0000K.safetensors` (MTP tensors last, in a shard of their own).
Tensors are written shard by shard, so at most one shard's tensors plus one more
are held in memory; everything goes to a sibling `<out_dir>.dsv4-write-<pid>` directory that
is renamed to `out_dir` only when complete, and removed if anything fails (`fsutil` rules).

`write_random_checkpoint` makes deterministic random weights that keep activations at
a sane scale through the layers; every tensor is drawn from its own seed (derived from
the run seed and the tensor name), so the result does not depend on write order.
"""

from __future__ import annotations

import functools
import hashlib
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from dsv4cli.errors import CheckpointError
from dsv4cli.formats.official import quantize_fp4_rows, quantize_fp8_blocks
from dsv4cli.fsutil import (
    check_free_space,
    check_output_dir,
    disk_errors,
    move_into_place,
    new_staging_dir,
    write_json,
)
from dsv4cli.io.checkpoint import CONFIG_NAME, INDEX_NAME, MTP_PREFIX, SYNTH_MARKER
from dsv4cli.io.safetensors_file import (
    SAFETENSORS_DTYPES,
    TORCH_DTYPES,
    encode_header,
    write_safetensors_file,
)
from dsv4cli.io.schema import TensorSpec, checkpoint_specs
from dsv4cli.model.args import ModelArgs

DEFAULT_MAX_SHARD_BYTES = 4 << 30
GENERATION_CONFIG_NAME = "generation_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
SHARD_METADATA = {"format": "pt"}
#: generation_config.json of the official release, bos/eos filled from the args.
GENERATION_CONFIG_TEMPLATE: dict[str, Any] = {
    "_from_model_config": True, "bos_token_id": None, "eos_token_id": None,
    "do_sample": True, "temperature": 1.0, "top_p": 1.0, "transformers_version": "4.46.3",
}

Progress = Callable[[str, int], None]


# ======================================================================= public API


def write_random_checkpoint(args: ModelArgs, out_dir: str | Path, seed: int = 0, *,
                            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, include_mtp: bool = True,
                            overwrite: bool = False, tokenizer_dir: str | Path | None = None,
                            progress: Progress | None = None) -> Path:
    """Write a random-weight checkpoint for `args` (formats per `args.dtype`/`expert_dtype`).

    Same args + seed give byte-identical files. Returns the checkpoint directory. It carries
    SYNTH_MARKER, so that `dsv4 chat` can say what it is rather than ask for a tokenizer.
    """
    total = sum(spec.nbytes for spec in checkpoint_specs(args, include_mtp=include_mtp).values())
    marker = {"seed": seed, "purpose": "random weights for tests and benchmarks (dsv4 synth)"}
    return write_checkpoint(random_tensors(args, seed, include_mtp=include_mtp), args, out_dir,
                            max_shard_bytes=max_shard_bytes, overwrite=overwrite,
                            tokenizer_dir=tokenizer_dir, progress=progress, expected_bytes=total,
                            extra_json={SYNTH_MARKER: marker})


def write_checkpoint(tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                     args: ModelArgs, out_dir: str | Path, *,
                     max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False,
                     tokenizer_dir: str | Path | None = None, validate: bool = True,
                     progress: Progress | None = None, config: dict[str, Any] | None = None,
                     expected_bytes: int | None = None, extra_json: dict[str, Any] | None = None) -> Path:
    """Write given tensors as an official-format checkpoint in `out_dir` (atomically).

    A mapping is written in checkpoint order (MTP last); an iterable of (name, tensor)
    is streamed in the order given. With `validate`, every tensor must match
    `checkpoint_specs(args)` and all must be present (MTP all or none).
    `progress(name, bytes_so_far)` is called after each tensor. `config` replaces the
    config.json written from `args` (e.g. for transformers-named exports). With `expected_bytes`
    (the tensors' total), a disk that cannot hold them is refused before anything is written.
    `extra_json`: more files to write beside them, name -> JSON value.
    """
    if max_shard_bytes <= 0:
        raise ValueError("max_shard_bytes must be positive")
    items = _ordered_items(tensors, args) if isinstance(tensors, Mapping) else tensors
    out_dir = Path(out_dir).absolute()
    tokenizer_sources = _tokenizer_sources(tokenizer_dir)
    if expected_bytes is not None:
        check_output_dir(out_dir, [], overwrite)
        check_free_space(out_dir.parent, expected_bytes, f"writing {out_dir}")
    with atomic_directory(out_dir, overwrite) as tmp:
        checker = _SpecChecker(args) if validate else None
        shards = _ShardWriter(tmp, max_shard_bytes)
        for name, tensor in items:
            if checker is not None:
                checker.check(name, tensor)
            shards.add(name, tensor)
            if progress is not None:
                progress(name, shards.total_bytes)
        if checker is not None:
            checker.check_complete()
        weight_map = shards.finish()
        write_json(tmp / INDEX_NAME, {"metadata": {"total_size": shards.total_bytes},
                                       "weight_map": weight_map}, sort_keys=True)
        write_json(tmp / CONFIG_NAME, config if config is not None else args.to_hf_config())
        write_json(tmp / GENERATION_CONFIG_NAME, generation_config(args))
        for source in tokenizer_sources:
            shutil.copyfile(source, tmp / source.name)
        for name, value in (extra_json or {}).items():
            write_json(tmp / name, value)
    return out_dir


def write_safetensors(path: str | Path, tensors: Iterable[tuple[str, torch.Tensor]],
                      metadata: dict[str, str] | None = None) -> int:
    """Write one `.safetensors` file by streaming; return its tensor-data bytes.

    Data is laid out widest dtype first (stable otherwise), so with the 8-byte padded
    header every tensor is aligned to its element size, as the reference library does.
    """
    tensors = [(name, _as_cpu_contiguous(name, t)) for name, t in tensors]
    layout = sorted(tensors, key=lambda item: -item[1].element_size())
    entries = [(name, TensorSpec(SAFETENSORS_DTYPES[t.dtype], tuple(t.shape))) for name, t in layout]
    try:
        header = encode_header(entries, metadata)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err.message}", err.hint) from None
    return write_safetensors_file(path, header, (t for _, t in layout if t.numel()))


def shard_file_name(index: int, count: int) -> str:
    """Official shard name, e.g. `model-00001-of-00046.safetensors` (1-based)."""
    return f"model-{index:05d}-of-{count:05d}.safetensors"


def generation_config(args: ModelArgs) -> dict[str, Any]:
    return {**GENERATION_CONFIG_TEMPLATE, "bos_token_id": args.bos_token_id,
            "eos_token_id": args.eos_token_id}


# ================================================================== random weights


def tensor_seed(seed: int, name: str) -> int:
    """Per-tensor seed from the run seed and the name; a `.scale` shares its weight's seed."""
    key = name[: -len(".scale")] + ".weight" if name.endswith(".scale") else name
    digest = hashlib.sha256(f"dsv4/{seed}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def tensor_generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(tensor_seed(seed, name))


def random_tensors(args: ModelArgs, seed: int = 0, include_mtp: bool = True
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, random tensor) for every checkpoint tensor, in checkpoint order, lazily.

    Equal to `random_tensor(spec, name, args, tensor_generator(seed, name))` for each name;
    a quantized weight and its scale are drawn once.
    """
    specs = checkpoint_specs(args, include_mtp=include_mtp)
    pending_scales: dict[str, torch.Tensor] = {}
    for name in checkpoint_order(specs):
        spec = specs[name]
        if name in pending_scales:
            yield name, pending_scales.pop(name)
            continue
        scale_name = name[: -len(".weight")] + ".scale" if name.endswith(".weight") else None
        if scale_name in specs:
            weight, scale = random_linear(spec, tensor_generator(seed, name))
            pending_scales[scale_name] = scale
            yield name, weight
        else:
            yield name, random_tensor(spec, name, args, tensor_generator(seed, name))


def random_tensor(spec: TensorSpec, name: str, args: ModelArgs, generator: torch.Generator) -> torch.Tensor:
    """A random tensor for checkpoint tensor `name` with `spec`'s dtype and shape.

    For a `.scale`, draws the companion weight with `generator` and returns its scale,
    so seed the generator as for the weight (`tensor_generator` does).
    """
    leaf = name.rsplit(".", 1)[-1]
    if name.endswith(".scale") and spec.dtype == "F8_E8M0":
        weight_spec = _all_specs(args).get(name[: -len(".scale")] + ".weight")
        if weight_spec is None:
            raise ValueError(f"no weight for scale tensor {name}")
        tensor = random_linear(weight_spec, generator)[1]
    elif leaf == "tid2eid":
        tensor = _distinct_expert_ids(spec.shape, args.n_routed_experts, generator)
    elif name == "embed.weight":
        tensor = _normal(spec.shape, 1.0, generator)
    elif leaf == "weight" and len(spec.shape) == 1:  # RMSNorm gains
        tensor = 1.0 + _normal(spec.shape, 0.05, generator)
    elif leaf == "weight":  # linears, gate, head (all N(0, 1/in_features))
        tensor = random_linear(spec, generator)[0]
    else:
        tensor = _random_parameter(name, leaf, spec, generator)
    tensor = tensor.to(TORCH_DTYPES[spec.dtype])
    if tuple(tensor.shape) != spec.shape:
        raise ValueError(f"random {name} has shape {tuple(tensor.shape)}, spec says {spec.shape}")
    return tensor


def random_linear(weight_spec: TensorSpec, generator: torch.Generator
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight ~ N(0, 1/in_features) in the format of `weight_spec` -> (weight, scale or None)."""
    if weight_spec.dtype == "F8_E4M3":
        out_f, in_f = weight_spec.shape
        return quantize_fp8_blocks(_normal((out_f, in_f), in_f ** -0.5, generator))
    if weight_spec.dtype == "I8":  # packed FP4: two inputs per byte
        out_f, in_f = weight_spec.shape[0], weight_spec.shape[1] * 2
        return quantize_fp4_rows(_normal((out_f, in_f), in_f ** -0.5, generator))
    if len(weight_spec.shape) != 2:
        raise ValueError(f"a linear weight must be 2-D, got shape {weight_spec.shape}")
    in_f = weight_spec.shape[1]
    weight = _normal(weight_spec.shape, in_f ** -0.5, generator)
    return weight.to(TORCH_DTYPES[weight_spec.dtype]), None


def _random_parameter(name: str, leaf: str, spec: TensorSpec, generator: torch.Generator) -> torch.Tensor:
    """The small float32 parameters: mHC mixing, sinks, positional biases, gate bias."""
    if leaf.startswith("hc_") and leaf.endswith("_fn"):
        return _normal(spec.shape, 0.02, generator)
    if leaf.startswith("hc_") and leaf.endswith("_base"):
        return _normal(spec.shape, 0.1, generator)
    if leaf.startswith("hc_") and leaf.endswith("_scale"):
        return (1.0 + _normal(spec.shape, 0.1, generator)).clamp(min=0.1)
    stds = {"attn_sink": 0.5, "ape": 0.1, "bias": 0.05}
    if leaf in stds:
        return _normal(spec.shape, stds[leaf], generator)
    raise ValueError(f"no random initialiser for tensor {name}")


def _normal(shape: tuple[int, ...], std: float, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float32) * std


def _distinct_expert_ids(shape: tuple[int, ...], n_experts: int, generator: torch.Generator) -> torch.Tensor:
    """Rows of distinct random expert ids in [0, n_experts) (hash-routing table)."""
    rows, per_row = shape
    return torch.rand((rows, n_experts), generator=generator).argsort(dim=1)[:, :per_row].to(torch.int64)


@functools.lru_cache(maxsize=4)
def _all_specs(args: ModelArgs) -> dict[str, TensorSpec]:
    return checkpoint_specs(args, include_mtp=True)


# ====================================================================== ordering


def checkpoint_order(names: Iterable[str]) -> list[str]:
    """Names in the given (checkpoint_specs) order with every `mtp.*` tensor moved last."""
    names = list(names)
    return [n for n in names if not n.startswith(MTP_PREFIX)] + [n for n in names if n.startswith(MTP_PREFIX)]


def _ordered_items(tensors: Mapping[str, torch.Tensor], args: ModelArgs) -> list[tuple[str, torch.Tensor]]:
    known = [n for n in _all_specs(args) if n in tensors]
    others = sorted(set(tensors) - set(known))
    return [(name, tensors[name]) for name in checkpoint_order(known) + others]


# ====================================================================== validation


class _SpecChecker:
    """Checks streamed tensors against `checkpoint_specs(args)`."""

    def __init__(self, args: ModelArgs):
        self.specs = _all_specs(args)
        self.seen: set[str] = set()

    def check(self, name: str, tensor: torch.Tensor) -> None:
        expected = self.specs.get(name)
        if expected is None:
            raise CheckpointError(f"tensor {name} is not part of a checkpoint for this config",
                                  "drop it, or pass validate=False")
        dtype = SAFETENSORS_DTYPES.get(tensor.dtype, str(tensor.dtype))
        if (dtype, tuple(tensor.shape)) != (expected.dtype, expected.shape):
            raise CheckpointError(f"tensor {name} is {dtype}{list(tensor.shape)}, expected "
                                  f"{expected.dtype}{list(expected.shape)}",
                                  "convert it to the expected format")
        if name in self.seen:
            raise CheckpointError(f"tensor {name} is given twice", "pass each tensor once")
        self.seen.add(name)

    def check_complete(self) -> None:
        with_mtp = any(n.startswith(MTP_PREFIX) for n in self.seen)
        missing = [n for n in self.specs if n not in self.seen and (with_mtp or not n.startswith(MTP_PREFIX))]
        if missing:
            shown = ", ".join(missing[:5]) + (f", ... (+{len(missing) - 5} more)" if len(missing) > 5 else "")
            raise CheckpointError(f"{len(missing)} checkpoint tensors were not given: {shown}",
                                  "pass every tensor of the checkpoint (MTP: all or none)")


# ====================================================================== sharding


class _ShardWriter:
    """Packs streamed tensors into shards of at most `max_shard_bytes` (a bigger tensor
    gets a shard of its own); MTP tensors start a new shard. Writes each shard as soon
    as it is full, under a temporary name until the shard count is known."""

    def __init__(self, directory: Path, max_shard_bytes: int):
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self.pending: list[tuple[str, torch.Tensor]] = []
        self.pending_bytes = 0
        self.total_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        previous = self.pending[-1][0] if self.pending else None
        starts_mtp = (previous is not None and name.startswith(MTP_PREFIX)
                      and not previous.startswith(MTP_PREFIX))
        if self.pending and (starts_mtp or self.pending_bytes + nbytes > self.max_shard_bytes):
            self.flush()
        self.pending.append((name, tensor))
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def flush(self) -> None:
        if not self.pending:
            return
        path = self.directory / f"shard-{len(self.written) + 1:05d}.partial"
        write_safetensors(path, self.pending, SHARD_METADATA)
        self.written.append((path, [name for name, _ in self.pending]))
        self.pending, self.pending_bytes = [], 0

    def finish(self) -> dict[str, str]:
        """Write the last shard, give all shards their final names; return the weight map."""
        self.flush()
        if not self.written:
            raise CheckpointError("no tensors to write", "pass at least one tensor")
        weight_map = {}
        for i, (path, names) in enumerate(self.written, start=1):
            final = shard_file_name(i, len(self.written))
            path.rename(self.directory / final)
            weight_map.update(dict.fromkeys(names, final))
        return weight_map


def _as_cpu_contiguous(name: str, tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dtype not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"tensor {name} has dtype {tensor.dtype}, which the checkpoint format "
                              "does not store", f"use one of {', '.join(TORCH_DTYPES)}")
    return tensor.detach().to("cpu").contiguous()


# ====================================================================== files


def _tokenizer_sources(tokenizer_dir: str | Path | None) -> list[Path]:
    if tokenizer_dir is None:
        return []
    tokenizer_dir = Path(tokenizer_dir)
    sources = [tokenizer_dir / name for name in TOKENIZER_FILES if (tokenizer_dir / name).is_file()]
    if not (tokenizer_dir / TOKENIZER_FILES[0]).is_file():
        raise CheckpointError(f"no {TOKENIZER_FILES[0]} in {tokenizer_dir}",
                              "point tokenizer_dir to a directory holding the DeepSeek-V4 tokenizer")
    return sources


@contextmanager
def atomic_directory(out_dir: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a fresh marked staging sibling of `out_dir`; on success move it into place, else delete it.

    `out_dir` is checked first (`fsutil.check_output_dir`): an existing non-empty one needs
    `overwrite` and must be a dsv4 output. Disk errors become one-line `DiskError`s."""
    check_output_dir(out_dir, [], overwrite)
    with disk_errors(f"writing {out_dir}", "free some space or choose another output directory"):
        staging = new_staging_dir(out_dir, "dsv4-write")
        try:
            yield staging
            move_into_place(staging, out_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
