"""Open and validate a DeepSeek-V4 checkpoint directory in the official format (spec §3.1).

A checkpoint is `config.json` plus either `model.safetensors.index.json` with the shards
it names, or one `model.safetensors`. `Checkpoint.open` checks everything that needs
only the headers (shards present, index and shard headers agree, every tensor's name,
dtype and shape equal `checkpoint_specs(args)`) before any tensor data is touched;
`verify_data` additionally reads every byte.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from dsv4cli.errors import CheckpointError, ModelNotFound
from dsv4cli.io.safetensors_file import SafetensorsFile
from dsv4cli.io.schema import TensorSpec, checkpoint_specs
from dsv4cli.model.args import ModelArgs

CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"
#: written beside the random checkpoints of `dsv4 synth` (weights for tests and benchmarks, no tokenizer)
SYNTH_MARKER = "dsv4-synth.json"
SINGLE_FILE_NAME = "model.safetensors"
MTP_PREFIX = "mtp."
_REDOWNLOAD = "re-download the checkpoint"
_MISMATCH_HINT = "re-download the checkpoint, or use the config.json that came with it"
_PREVIEW = 5


class Checkpoint:
    """A validated checkpoint: lazy zero-copy tensors from memory-mapped shards."""

    def __init__(self, model_dir: Path, args: ModelArgs, weight_map: dict[str, str],
                 files: dict[str, SafetensorsFile]):
        self.model_dir = model_dir
        self.args = args
        self._files = files
        # storage order: shard by shard, by data offset, so loading reads sequentially
        self._weight_map = {name: shard for shard, f in sorted(files.items()) for name in f.names()
                            if weight_map.get(name) == shard}
        self.has_mtp = any(name.startswith(MTP_PREFIX) for name in self._weight_map)

    # -------------------------------------------------------------------- open
    @classmethod
    def open(cls, model_dir: str | Path, *, args: ModelArgs | None = None, validate: bool = True
             ) -> Checkpoint:
        """Open `model_dir`; with `validate`, check all headers against the config (cheap)."""
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise ModelNotFound(f"no checkpoint directory at {model_dir}",
                                "point to a directory with config.json and *.safetensors")
        args = args if args is not None else ModelArgs.from_file(model_dir / CONFIG_NAME)
        weight_map = _read_weight_map(model_dir)
        files = _open_shards(model_dir, sorted(set(weight_map.values())))
        try:
            _check_index_matches_shards(model_dir, weight_map, files)
            checkpoint = cls(model_dir, args, weight_map, files)
            if validate:
                checkpoint.validate()
        except BaseException:
            for f in files.values():
                f.close()
            raise
        return checkpoint

    # ---------------------------------------------------------------- validate
    def validate(self, mode: str = "headers") -> None:
        """Check names/dtypes/shapes against `checkpoint_specs` ("headers"), and with
        mode="data" also read every byte (`verify_data`)."""
        if mode not in ("headers", "data"):
            raise ValueError(f"validate mode must be 'headers' or 'data', got {mode!r}")
        problems = self._spec_problems()
        if problems and self._transformers_named():
            raise CheckpointError(f"{self.model_dir} is a checkpoint in transformers' layout (tensors named "
                                  "model.layers.*, as dsv4's hf-bf16 export writes them); dsv4 runs the "
                                  "official DeepSeek-V4 layout and its own dsv4 layout",
                                  "load this one with transformers (DeepseekV4ForCausalLM), and give dsv4 the "
                                  "official checkpoint it was made from")
        if problems:
            raise CheckpointError(f"{self.model_dir} does not match its config: " + "; ".join(problems),
                                  _MISMATCH_HINT)
        if mode == "data":
            self.verify_data()

    def _transformers_named(self) -> bool:
        """Whether the tensors carry transformers' names (model.layers.*, lm_head) instead of the official ones."""
        names = list(self._weight_map)
        return bool(names) and sum(n.startswith(("model.", "lm_head.")) for n in names) > len(names) // 2

    def verify_data(self, progress: Callable[[int, int], None] | None = None) -> int:
        """Read every tensor byte of every shard (plain reads); return the bytes read.

        `progress(done_bytes, total_bytes)` is called after each shard.
        """
        total = sum(f.data_size for f in self._files.values())
        done = 0
        for shard in sorted(self._files):
            done += self._files[shard].verify_data()
            if progress is not None:
                progress(done, total)
        return done

    def _spec_problems(self) -> list[str]:
        specs = checkpoint_specs(self.args, include_mtp=True)
        mtp_expected = [n for n in specs if n.startswith(MTP_PREFIX)]
        problems, reported = [], set()
        if self.has_mtp and mtp_expected:
            absent = [n for n in mtp_expected if n not in self._weight_map]
            if absent:
                problems.append(f"partial MTP: {len(absent)} of {len(mtp_expected)} mtp.* tensors "
                                f"missing ({_preview(absent)}); keep all of them or none")
                reported.update(absent)
        if not self.has_mtp:
            specs = {n: s for n, s in specs.items() if not n.startswith(MTP_PREFIX)}
        missing = [n for n in specs if n not in self._weight_map and n not in reported]
        if missing:
            problems.append(f"{_count(missing, 'tensor')} missing: {_preview(missing)}")
        unexpected = [n for n in self._weight_map if n not in specs]
        if unexpected:
            where = [f"{n} in {self._weight_map[n]}" for n in unexpected]
            problems.append(f"{_count(unexpected, 'unexpected tensor')}: {_preview(where)}")
        return problems + self._format_problems(specs)

    def _format_problems(self, specs: dict[str, TensorSpec]) -> list[str]:
        wrong_dtype, wrong_shape = [], []
        for name, shard in self._weight_map.items():
            expected = specs.get(name)
            if expected is None:
                continue
            actual = self._files[shard].spec(name)
            if actual.dtype != expected.dtype:
                wrong_dtype.append(f"{name} in {shard} is {actual.dtype}, expected {expected.dtype}")
            elif actual.shape != expected.shape:
                wrong_shape.append(f"{name} in {shard} has shape {list(actual.shape)}, "
                                   f"expected {list(expected.shape)}")
        problems = []
        if wrong_dtype:
            problems.append(f"{_count(wrong_dtype, 'tensor')} with the wrong dtype: {_preview(wrong_dtype)}")
        if wrong_shape:
            problems.append(f"{_count(wrong_shape, 'tensor')} with the wrong shape: {_preview(wrong_shape)}")
        return problems

    # ----------------------------------------------------------------- queries
    def names(self) -> list[str]:
        """All tensor names in storage order (shard by shard, by offset)."""
        return list(self._weight_map)

    def __contains__(self, name: object) -> bool:
        return name in self._weight_map

    def __len__(self) -> int:
        return len(self._weight_map)

    def shard_of(self, name: str) -> Path:
        return self.model_dir / self._shard_name(name)

    def shards(self) -> list[Path]:
        return [self.model_dir / shard for shard in sorted(self._files)]

    def spec(self, name: str) -> TensorSpec:
        return self._files[self._shard_name(name)].spec(name)

    def get(self, name: str) -> torch.Tensor:
        """Tensor `name`: a lazy zero-copy view of its memory-mapped shard (read-only)."""
        return self._files[self._shard_name(name)].get(name)

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data (the index's `total_size`)."""
        return sum(self.spec(name).nbytes for name in self._weight_map)

    def _shard_name(self, name: str) -> str:
        try:
            return self._weight_map[name]
        except KeyError:
            raise CheckpointError(f"checkpoint {self.model_dir} has no tensor {name!r}",
                                  "check the tensor name") from None

    # --------------------------------------------------------------- lifecycle
    def close(self) -> None:
        for f in self._files.values():
            f.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.model_dir)!r}, tensors={len(self)}, shards={len(self._files)})"


# -------------------------------------------------------------------- helpers


def _read_weight_map(model_dir: Path) -> dict[str, str]:
    """tensor name -> shard file name, from the index or a single `model.safetensors`."""
    index_path = model_dir / INDEX_NAME
    if index_path.is_file():
        return _parse_index(index_path)
    single = model_dir / SINGLE_FILE_NAME
    if single.is_file():
        with SafetensorsFile(single) as f:
            return {name: SINGLE_FILE_NAME for name in f.names()}
    raise CheckpointError(f"{model_dir} has neither {INDEX_NAME} nor {SINGLE_FILE_NAME}",
                          "download the complete checkpoint (index and shards)")


def _parse_index(index_path: Path) -> dict[str, str]:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{index_path} is not valid JSON: {exc}", f"{_REDOWNLOAD} index") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path} has no (or an empty) weight_map", f"{_REDOWNLOAD} index")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not _is_plain_relative(shard):
            raise CheckpointError(f"{index_path}: tensor {name} maps to an invalid shard path {shard!r}",
                                  f"{_REDOWNLOAD} index")
    return weight_map


def _is_plain_relative(shard: str) -> bool:
    path = PurePosixPath(shard)
    return bool(shard) and not path.is_absolute() and ".." not in path.parts


def _open_shards(model_dir: Path, shard_names: Iterable[str]) -> dict[str, SafetensorsFile]:
    shard_names = list(shard_names)
    absent = [s for s in shard_names if not (model_dir / s).is_file()]
    if absent:
        raise CheckpointError(f"{model_dir}: {_count(absent, 'shard')} named in the index "
                              f"{'is' if len(absent) == 1 else 'are'} missing: {_preview(absent)}",
                              f"{_REDOWNLOAD} (the missing shards)")
    files: dict[str, SafetensorsFile] = {}
    try:
        for shard in shard_names:
            files[shard] = SafetensorsFile(model_dir / shard)
    except BaseException:
        for f in files.values():
            f.close()
        raise
    return files


def _check_index_matches_shards(model_dir: Path, weight_map: dict[str, str],
                                files: dict[str, SafetensorsFile]) -> None:
    not_in_shard = [f"{name} (in {shard})" for name, shard in weight_map.items() if name not in files[shard]]
    if not_in_shard:
        raise CheckpointError(f"{model_dir}: {_count(not_in_shard, 'tensor')} listed in the index "
                              f"but absent from the shard: {_preview(not_in_shard)}",
                              f"{_REDOWNLOAD} (index and shards disagree)")
    not_in_index = [f"{name} (in {shard})" for shard, f in files.items() for name in f.names()
                    if weight_map.get(name) != shard]
    if not_in_index:
        raise CheckpointError(f"{model_dir}: {_count(not_in_index, 'tensor')} stored in a shard but "
                              f"not listed there by the index: {_preview(not_in_index)}",
                              f"{_REDOWNLOAD} (index and shards disagree)")


def _count(items: list[Any], noun: str) -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


def _preview(items: list[str], limit: int = _PREVIEW) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")
