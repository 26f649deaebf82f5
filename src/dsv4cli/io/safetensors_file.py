"""A minimal, validating safetensors reader with zero-copy memory-mapped tensors.

File layout: 8-byte little-endian header length N, N bytes of JSON header
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`),
then the data buffer; offsets are relative to the buffer start.

`SafetensorsFile` checks the whole header up front, keeps the file mapped read-only
and hands out tensors that are views of the mapping (no copy, no read until touched).
Closing drops the mapping; tensors already handed out keep it alive until they die.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dsv4cli.errors import CheckpointError
from dsv4cli.io.schema import DTYPE_BYTES, TensorSpec

#: safetensors dtype string -> torch dtype.
TORCH_DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E8M0": torch.float8_e8m0fnu,
    "I8": torch.int8,
    "U8": torch.uint8,
    "I32": torch.int32,
    "I64": torch.int64,
}
#: torch dtype -> safetensors dtype string (what the writer emits).
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}

#: Same limit as the reference `safetensors` library.
MAX_HEADER_BYTES = 100_000_000
METADATA_KEY = "__metadata__"
_REDOWNLOAD = "re-download this shard"


@dataclass(frozen=True)
class TensorEntry:
    """One header entry: dtype, shape and byte range inside the data buffer."""

    spec: TensorSpec
    begin: int
    end: int


class SafetensorsFile:
    """One `.safetensors` file, header-validated and memory-mapped read-only."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        header_len, header, file_size = _read_header(self.path)
        self.metadata: dict[str, str] = _parse_metadata(self.path, header.pop(METADATA_KEY, None))
        self._entries = _parse_entries(self.path, header)
        self.data_start = 8 + header_len
        self.data_size = max((e.end for e in self._entries.values()), default=0)
        if file_size < self.data_start + self.data_size:
            cut = next(n for n, e in self._entries.items() if self.data_start + e.end > file_size)
            raise CheckpointError(
                f"{self.path} is truncated: {file_size} bytes, the header needs "
                f"{self.data_start + self.data_size} (tensor {cut} and later are cut off)", _REDOWNLOAD)
        self._mmap: mmap.mmap | None = _map(self.path)

    # ------------------------------------------------------------------ queries
    def names(self) -> list[str]:
        """Tensor names in data-offset order."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def spec(self, name: str) -> TensorSpec:
        return self._entry(name).spec

    def byte_range(self, name: str) -> tuple[int, int]:
        """Absolute [begin, end) file offsets of tensor `name`'s bytes."""
        entry = self._entry(name)
        return self.data_start + entry.begin, self.data_start + entry.end

    @property
    def closed(self) -> bool:
        return self._mmap is None

    def mapped_range(self) -> tuple[int, int]:
        """[start, end) virtual addresses of the mapping (tensors from `get` lie inside)."""
        mm = self._require_open()
        start = _frombuffer(mm, torch.uint8, len(mm), 0).data_ptr()
        return start, start + len(mm)

    # ------------------------------------------------------------------ tensors
    def get(self, name: str) -> torch.Tensor:
        """Tensor `name` as a zero-copy view of the mapping (copied only if misaligned).

        The view is backed by read-only memory: do not write to it.
        """
        mm = self._require_open()
        entry = self._entry(name)
        begin, end = self.data_start + entry.begin, self.data_start + entry.end
        if mm.size() < end:  # shrunk since open: touching the pages would SIGBUS
            raise CheckpointError(f"{self.path} was truncated after it was opened "
                                  f"(tensor {name} needs bytes up to {end})", _REDOWNLOAD)
        dtype = TORCH_DTYPES[entry.spec.dtype]
        if entry.spec.numel == 0:
            return torch.empty(entry.spec.shape, dtype=dtype)
        itemsize = DTYPE_BYTES[entry.spec.dtype]
        if begin % itemsize:
            raw = _frombuffer(mm, torch.uint8, end - begin, begin).clone()
            return raw.view(dtype).view(entry.spec.shape)
        return _frombuffer(mm, dtype, entry.spec.numel, begin).view(entry.spec.shape)

    def verify_data(self, chunk_bytes: int = 64 << 20) -> int:
        """Read every data byte with plain reads (not the mapping); return the bytes read.

        Raises `CheckpointError` if the file became shorter or cannot be read.
        """
        end = self.data_start + self.data_size
        done = self.data_start
        buffer = memoryview(bytearray(min(chunk_bytes, max(end - done, 1))))
        try:
            with open(self.path, "rb", buffering=0) as f:
                f.seek(done)
                while done < end:
                    got = f.readinto(buffer[: min(len(buffer), end - done)])
                    if not got:
                        break
                    done += got
        except OSError as exc:
            raise CheckpointError(f"cannot read {self.path}: {exc}", _REDOWNLOAD) from exc
        if done < end:
            raise CheckpointError(f"{self.path} is truncated: data ends at byte {done}, "
                                  f"the header needs {end}", _REDOWNLOAD)
        return end - self.data_start

    # ---------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Drop the mapping. Tensors already returned stay valid (they hold it)."""
        self._mmap = None

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SafetensorsFile({str(self.path)!r}, tensors={len(self)})"

    # ---------------------------------------------------------------- internals
    def _entry(self, name: str) -> TensorEntry:
        try:
            return self._entries[name]
        except KeyError:
            raise CheckpointError(f"{self.path} has no tensor named {name!r}",
                                  "check the tensor name") from None

    def _require_open(self) -> mmap.mmap:
        if self._mmap is None:
            raise CheckpointError(f"{self.path} is closed", "open the file again before reading")
        return self._mmap


# ---------------------------------------------------------------------- parsing


def _read_header(path: Path) -> tuple[int, dict[str, Any], int]:
    """Return (header length, parsed JSON header, file size) after sanity checks."""
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            if file_size < 8:
                raise CheckpointError(f"{path} is too short to be a safetensors file "
                                      f"({file_size} bytes)", _REDOWNLOAD)
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len == 0 or header_len > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path} has an invalid header length {header_len}",
                                      f"not a safetensors file or corrupt: {_REDOWNLOAD}")
            if 8 + header_len > file_size:
                raise CheckpointError(f"{path} is truncated: header length {header_len} exceeds "
                                      f"the file size {file_size}", _REDOWNLOAD)
            raw = f.read(header_len)
    except FileNotFoundError:
        raise CheckpointError(f"shard {path} does not exist", "re-download the checkpoint") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}", "check the file permissions") from exc
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path} has a corrupt header (invalid JSON: {exc})", _REDOWNLOAD) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupt header (not a JSON object)", _REDOWNLOAD)
    return header_len, header, file_size


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """JSON object hook that rejects duplicate keys (two tensors with one name)."""
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen.add(key)
    return dict(pairs)


def _parse_metadata(path: Path, metadata: Any) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise CheckpointError(f"{path} has a corrupt header: {METADATA_KEY} must map strings to strings",
                              _REDOWNLOAD)
    return dict(metadata)


def _parse_entries(path: Path, header: dict[str, Any]) -> dict[str, TensorEntry]:
    """Validate every tensor entry; return them ordered by data offset."""
    entries = {name: _parse_entry(path, name, info) for name, info in header.items()}
    ordered = sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end))
    expected_begin, previous = 0, None
    for name, entry in ordered:
        if entry.begin < expected_begin:
            raise CheckpointError(f"{path}: tensor {name} (bytes {entry.begin}-{entry.end}) overlaps "
                                  f"tensor {previous} (ends at {expected_begin})", _REDOWNLOAD)
        if entry.begin > expected_begin:
            raise CheckpointError(f"{path}: gap before tensor {name} (starts at byte {entry.begin}, "
                                  f"previous data ends at {expected_begin})", _REDOWNLOAD)
        expected_begin, previous = entry.end, name
    return dict(ordered)


def _parse_entry(path: Path, name: str, info: Any) -> TensorEntry:
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: tensor {name} has a corrupt header entry ({why})", _REDOWNLOAD)

    if not isinstance(info, dict):
        raise bad("not a JSON object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in TORCH_DTYPES:
        raise bad(f"unsupported dtype {dtype!r}; known: {', '.join(TORCH_DTYPES)}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise bad(f"shape {shape!r} is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets)
            or offsets[0] > offsets[1]):
        raise bad(f"data_offsets {offsets!r} is not [begin, end] with 0 <= begin <= end")
    spec = TensorSpec(dtype, tuple(shape))
    expected = math.prod(spec.shape) * DTYPE_BYTES[dtype]
    if offsets[1] - offsets[0] != expected:
        raise bad(f"{offsets[1] - offsets[0]} bytes for {dtype}{list(shape)}, expected {expected}")
    return TensorEntry(spec, offsets[0], offsets[1])


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# ---------------------------------------------------------------------- mapping


def _map(path: Path) -> mmap.mmap:
    try:
        with open(path, "rb") as f:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot memory-map {path}: {exc}", "check the file and free address space") \
            from exc


def _frombuffer(mm: mmap.mmap, dtype: torch.dtype, count: int, offset: int) -> torch.Tensor:
    """`torch.frombuffer` on the read-only mapping, without the non-writable warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        try:
            return torch.frombuffer(mm, dtype=dtype, count=count, offset=offset)
        except (TypeError, RuntimeError):  # dtypes frombuffer cannot build directly
            raw = torch.frombuffer(mm, dtype=torch.uint8, count=count * dtype.itemsize, offset=offset)
            return raw.view(dtype)


# ======================================================================= writing


def encode_header(entries: list[tuple[str, TensorSpec]], metadata: dict[str, str] | None, align: int = 8) -> bytes:
    """The JSON header of a safetensors file holding `entries` (name, spec) back to back in that order,
    padded with spaces so that the data starts on a multiple of `align` bytes (as the format allows)."""
    header: dict[str, Any] = {METADATA_KEY: dict(metadata)} if metadata else {}
    offset = 0
    for name, spec in entries:
        if name == METADATA_KEY:
            raise CheckpointError(f"{METADATA_KEY} is reserved, not a tensor name", "rename the tensor")
        if name in header:
            raise CheckpointError(f"tensor {name} is given twice", "pass each tensor once")
        header[name] = {"dtype": spec.dtype, "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return raw + b" " * (-(8 + len(raw)) % align)


def write_safetensors_file(path: str | Path, header: bytes, pieces, on_bytes=None) -> int:
    """Write a safetensors file from its encoded header and the data as tensors or byte pieces, in order:
    to `<path>.partial`, fsynced, then renamed onto `path` (never a half-written file under the final name).
    `on_bytes(n)` follows the data written; returns the data bytes."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    written = 0
    try:
        with open(partial, "wb") as f:
            f.write(len(header).to_bytes(8, "little"))
            f.write(header)
            for piece in pieces:
                data = piece.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
                f.write(data.data)
                written += data.nbytes
                if on_bytes is not None:
                    on_bytes(data.nbytes)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return written
