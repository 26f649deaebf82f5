"""The dsv4 runtime layout: the official checkpoint with each layer's routed experts packed into one blob.

Written by `dsv4 convert --to dsv4`. Non-expert tensors keep their official names, dtypes
and bytes. The routed experts of one MoE layer become a single uint8 tensor
`layers.{L}.ffn.experts.packed` (MTP: `mtp.{M}.ffn.experts.packed`) of shape
`[n_routed_experts, bytes_per_expert]`. Row e holds expert e's `w1 | w3 | w2` weights, then
their scales, each at a fixed offset (64-byte aligned; rows padded to 4 KiB), so one expert
is one contiguous byte range: a single copy moves it into a GPU slot, and w1/w3 sit next to
each other for a fused gate/up pass.

`dsv4_layout.json` records the format version, the per-expert byte layout and the source
checkpoint (total tensor bytes, SHA-256 of its index). `Dsv4Checkpoint` reads the layout
back behind the same interface as the official `Checkpoint` (`args`, `get`, `names`,
`has_mtp`, `close`): expert tensors are served under their official names as zero-copy
views into the blob rows, so `load_model` works unchanged.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dsv4cli.errors import CheckpointError
from dsv4cli.io.checkpoint import Checkpoint
from dsv4cli.io.safetensors_file import TORCH_DTYPES
from dsv4cli.io.schema import DTYPE_BYTES, TensorSpec, checkpoint_specs, expert_specs
from dsv4cli.model.args import ModelArgs

LAYOUT_NAME = "dsv4_layout.json"
LAYOUT_FORMAT = "dsv4-packed-experts"
LAYOUT_VERSION = 1
BLOB_SUFFIX = "experts.packed"
#: Row stride (bytes per expert) is a multiple of this: page-aligned rows for fast host -> GPU copies.
ROW_ALIGN = 4096
#: Every tensor inside a row starts at a multiple of this.
TENSOR_ALIGN = 64
#: Order of an expert's tensors inside its row (bf16 experts have no scales).
EXPERT_PARTS = ("w1.weight", "w3.weight", "w2.weight", "w1.scale", "w3.scale", "w2.scale")
EXPERT_NAME_RE = re.compile(
    r"^(?P<prefix>(?:layers|mtp)\.\d+\.ffn)\.experts\.(?P<expert>\d+)\.(?P<part>w[123]\.(?:weight|scale))$")
_RECONVERT = "re-run {opt:convert_to_dsv4} from the official checkpoint"


def is_dsv4_layout(model_dir: str | Path) -> bool:
    return (Path(model_dir) / LAYOUT_NAME).is_file()


def open_checkpoint(model_dir: str | Path) -> Checkpoint | Dsv4Checkpoint:
    """The checkpoint in `model_dir`: official layout, or the dsv4 layout if `dsv4_layout.json` is there."""
    if is_dsv4_layout(model_dir):
        return Dsv4Checkpoint.open(model_dir)
    return Checkpoint.open(model_dir)


def blob_name(ffn_prefix: str) -> str:
    """`layers.3.ffn` -> `layers.3.ffn.experts.packed`."""
    return f"{ffn_prefix}.{BLOB_SUFFIX}"


def moe_prefixes(args: ModelArgs, include_mtp: bool) -> list[str]:
    """The `*.ffn` prefix of every MoE layer (trunk layers, then MTP layers)."""
    prefixes = [f"layers.{layer}.ffn" for layer in range(args.n_layers)]
    if include_mtp:
        prefixes += [f"mtp.{m}.ffn" for m in range(args.n_mtp_layers)]
    return prefixes


def _align(n: int, to: int) -> int:
    return -(-n // to) * to


# ======================================================================= layout


@dataclass(frozen=True)
class ExpertSlice:
    """One expert tensor inside a blob row: `part` (e.g. 'w1.weight') at byte `offset`."""

    part: str
    offset: int
    spec: TensorSpec

    @property
    def end(self) -> int:
        return self.offset + self.spec.nbytes


@dataclass(frozen=True)
class ExpertLayout:
    """Byte layout of one blob row (shared by all experts of all layers)."""

    bytes_per_expert: int
    slices: tuple[ExpertSlice, ...]

    @classmethod
    def for_args(cls, args: ModelArgs) -> ExpertLayout:
        specs = {name.split(".experts.0.", 1)[1]: spec for name, spec in expert_specs(args, "x", 0)}
        slices, offset = [], 0
        for part in (p for p in EXPERT_PARTS if p in specs):
            offset = _align(offset, TENSOR_ALIGN)
            slices.append(ExpertSlice(part, offset, specs[part]))
            offset += specs[part].nbytes
        return cls(_align(offset, ROW_ALIGN), tuple(slices))

    def slice(self, part: str) -> ExpertSlice:
        for s in self.slices:
            if s.part == part:
                return s
        raise KeyError(part)

    def view(self, row: torch.Tensor, part: str) -> torch.Tensor:
        """Expert tensor `part` as a zero-copy view of a uint8 blob row."""
        s = self.slice(part)
        return row[s.offset:s.end].view(TORCH_DTYPES[s.spec.dtype]).view(s.spec.shape)

    def row_chunks(self, get_tensor: Callable[[str], torch.Tensor], ffn_prefix: str, expert: int
                   ) -> Iterator[torch.Tensor]:
        """The bytes of one blob row, as uint8 pieces (tensors and zero padding) in order."""
        position = 0
        for s in self.slices:
            if s.offset > position:
                yield torch.zeros(s.offset - position, dtype=torch.uint8)
            tensor = get_tensor(f"{ffn_prefix}.experts.{expert}.{s.part}")
            yield tensor.contiguous().reshape(-1).view(torch.uint8)
            position = s.end
        if self.bytes_per_expert > position:
            yield torch.zeros(self.bytes_per_expert - position, dtype=torch.uint8)

    def pack_row(self, get_tensor: Callable[[str], torch.Tensor], ffn_prefix: str, expert: int) -> torch.Tensor:
        """One blob row as a uint8 tensor `[bytes_per_expert]`."""
        return torch.cat(list(self.row_chunks(get_tensor, ffn_prefix, expert)))

    def to_json(self) -> dict[str, Any]:
        return {"bytes_per_expert": self.bytes_per_expert,
                "tensors": [{"name": s.part, "offset": s.offset, "nbytes": s.spec.nbytes, "dtype": s.spec.dtype,
                             "shape": list(s.spec.shape)} for s in self.slices]}

    @classmethod
    def from_json(cls, data: Any, where: Path) -> ExpertLayout:
        def bad(why: str) -> CheckpointError:
            return CheckpointError(f"{where}: invalid expert layout ({why})", _RECONVERT)

        try:
            slices = tuple(ExpertSlice(t["name"], int(t["offset"]), TensorSpec(t["dtype"], tuple(t["shape"])))
                           for t in data["tensors"])
            layout = cls(int(data["bytes_per_expert"]), slices)
        except (KeyError, TypeError, ValueError) as exc:
            raise bad(f"missing or malformed field: {exc}") from None
        for s in slices:
            if s.spec.dtype not in DTYPE_BYTES or s.spec.dtype not in TORCH_DTYPES:
                raise bad(f"{s.part} has unknown dtype {s.spec.dtype!r}")
            if s.offset < 0 or s.offset % DTYPE_BYTES[s.spec.dtype] or s.end > layout.bytes_per_expert:
                raise bad(f"{s.part} at offset {s.offset} does not fit an aligned place in a "
                          f"{layout.bytes_per_expert}-byte row")
        ordered = sorted(slices, key=lambda s: s.offset)
        for a, b in itertools.pairwise(ordered):
            if a.end > b.offset:
                raise bad(f"{a.part} overlaps {b.part}")
        return layout

    def problems(self, args: ModelArgs) -> list[str]:
        """How this layout disagrees with the expert tensors the config needs."""
        expected = {name.split(".experts.0.", 1)[1]: spec for name, spec in expert_specs(args, "x", 0)}
        have = {s.part: s.spec for s in self.slices}
        problems = [f"no {p}" for p in expected if p not in have]
        problems += [f"unexpected {p}" for p in have if p not in expected]
        problems += [f"{p} is {have[p].dtype}{list(have[p].shape)}, the config needs "
                     f"{spec.dtype}{list(spec.shape)}" for p, spec in expected.items() if p in have and have[p] != spec]
        return problems


def layout_document(layout: ExpertLayout, args: ModelArgs, include_mtp: bool, source: dict[str, Any]
                    ) -> dict[str, Any]:
    """The contents of `dsv4_layout.json`."""
    return {
        "format": LAYOUT_FORMAT,
        "version": LAYOUT_VERSION,
        "blob_dtype": "U8",
        "row_order": "w1 | w3 | w2 weights, then their scales",
        "n_experts": args.n_routed_experts,
        "blobs": [blob_name(p) for p in moe_prefixes(args, include_mtp)],
        "expert": layout.to_json(),
        "source": source,
    }


# ======================================================================= reader


class Dsv4Checkpoint:
    """A validated dsv4-layout checkpoint with the official checkpoint's reading interface."""

    def __init__(self, model_dir: Path, inner: Checkpoint, layout: ExpertLayout, source: dict[str, Any]):
        self.model_dir = model_dir
        self.args = inner.args
        self.layout = layout
        self.source = source
        self._inner = inner
        self._blobs: dict[str, torch.Tensor] = {}
        self.blob_names = [n for n in inner.names() if n.endswith("." + BLOB_SUFFIX)]
        self._blob_set = set(self.blob_names)
        self.has_mtp = inner.has_mtp

    @classmethod
    def open(cls, model_dir: str | Path, *, validate: bool = True) -> Dsv4Checkpoint:
        model_dir = Path(model_dir)
        document = read_layout_document(model_dir)
        inner = Checkpoint.open(model_dir, validate=False)
        try:
            layout = ExpertLayout.from_json(document.get("expert"), model_dir / LAYOUT_NAME)
            checkpoint = cls(model_dir, inner, layout, document.get("source", {}))
            if validate:
                checkpoint.validate()
        except BaseException:
            inner.close()
            raise
        return checkpoint

    # ------------------------------------------------------------- validation
    def validate(self) -> None:
        """Check the layout, the blobs and every other tensor against the config (headers only)."""
        problems = [f"expert layout: {p}" for p in self.layout.problems(self.args)]
        problems += self._blob_problems() + self._dense_problems()
        if problems:
            raise CheckpointError(f"{self.model_dir} is not a valid dsv4-layout checkpoint: " + "; ".join(problems),
                                  _RECONVERT)

    def _blob_problems(self) -> list[str]:
        expected_shape = (self.args.n_routed_experts, self.layout.bytes_per_expert)
        problems = []
        for prefix in moe_prefixes(self.args, self.has_mtp):
            name = blob_name(prefix)
            if name not in self._inner:
                problems.append(f"expert blob {name} is missing")
                continue
            spec = self._inner.spec(name)
            if spec.dtype != "U8" or spec.shape != expected_shape:
                problems.append(f"expert blob {name} is {spec.dtype}{list(spec.shape)}, expected "
                                f"U8{list(expected_shape)} (experts x bytes_per_expert)")
        return problems

    def _dense_problems(self) -> list[str]:
        specs = checkpoint_specs(self.args, include_mtp=self.has_mtp, experts=range(0))
        problems = []
        missing = [n for n in specs if n not in self._inner]
        if missing:
            problems.append(f"{len(missing)} tensors missing: {_preview(missing)}")
        unexpected = [n for n in self._inner.names() if n not in specs and n not in self._blob_set]
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected tensors: {_preview(unexpected)}")
        wrong = [f"{n} is {self._inner.spec(n).dtype}{list(self._inner.spec(n).shape)}, expected "
                 f"{s.dtype}{list(s.shape)}" for n, s in specs.items() if n in self._inner and self._inner.spec(n) != s]
        if wrong:
            problems.append(f"{len(wrong)} tensors with the wrong dtype or shape: {_preview(wrong)}")
        return problems

    # ---------------------------------------------------------------- queries
    def names(self) -> list[str]:
        """Official tensor names in storage order; each blob expands to its experts' tensors."""
        names = []
        for name in self._inner.names():
            if name in self._blob_set:
                prefix = name[: -len(BLOB_SUFFIX) - 1]
                names += [f"{prefix}.experts.{e}.{s.part}" for e in range(self.args.n_routed_experts)
                          for s in self.layout.slices]
            else:
                names.append(name)
        return names

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        try:
            located = self._locate_expert(name)
        except CheckpointError:
            return False
        return located is not None or (name in self._inner and name not in self._blob_set)

    def __len__(self) -> int:
        per_blob = self.args.n_routed_experts * len(self.layout.slices)
        return len(self._inner) - len(self.blob_names) + len(self.blob_names) * per_blob

    def spec(self, name: str) -> TensorSpec:
        located = self._locate_expert(name)
        if located is not None:
            return self.layout.slice(located[2]).spec
        return self._inner.spec(name)

    def get(self, name: str) -> torch.Tensor:
        """Tensor `name` (official naming): a zero-copy view of the memory-mapped shards."""
        located = self._locate_expert(name)
        if located is None:
            return self._inner.get(name)
        blob, expert, part = located
        return self.layout.view(self._blob(blob)[expert], part)

    def blob(self, ffn_prefix: str) -> torch.Tensor:
        """The `[experts, bytes_per_expert]` uint8 blob of MoE layer `ffn_prefix` (e.g. 'layers.3.ffn')."""
        return self._blob(blob_name(ffn_prefix))

    def shard_of(self, name: str) -> Path:
        located = self._locate_expert(name)
        return self._inner.shard_of(located[0] if located else name)

    def shards(self) -> list[Path]:
        return self._inner.shards()

    @property
    def total_bytes(self) -> int:
        return self._inner.total_bytes

    def _locate_expert(self, name: str) -> tuple[str, int, str] | None:
        """(blob name, expert index, part) for an expert tensor name; None for other names."""
        match = EXPERT_NAME_RE.match(name)
        if match is None:
            return None
        blob, expert, part = blob_name(match["prefix"]), int(match["expert"]), match["part"]
        if blob not in self._blob_set or expert >= self.args.n_routed_experts or part not in {
                s.part for s in self.layout.slices}:
            raise CheckpointError(f"checkpoint {self.model_dir} has no tensor {name!r}", "check the tensor name")
        return blob, expert, part

    def _blob(self, name: str) -> torch.Tensor:
        if name not in self._blobs:
            self._blobs[name] = self._inner.get(name)
        return self._blobs[name]

    # -------------------------------------------------------------- lifecycle
    def close(self) -> None:
        self._blobs.clear()
        self._inner.close()

    def __enter__(self) -> Dsv4Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Dsv4Checkpoint({str(self.model_dir)!r}, blobs={len(self.blob_names)})"


def read_layout_document(model_dir: Path) -> dict[str, Any]:
    """Parse `dsv4_layout.json` and check its format and version."""
    path = model_dir / LAYOUT_NAME
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{model_dir} has no {LAYOUT_NAME}", "is this a dsv4-layout checkpoint?") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}", _RECONVERT) from None
    if not isinstance(document, dict) or document.get("format") != LAYOUT_FORMAT:
        raise CheckpointError(f"{path} does not describe a {LAYOUT_FORMAT} layout", _RECONVERT)
    version = document.get("version")
    if version != LAYOUT_VERSION:
        raise CheckpointError(f"{path} has layout version {version!r}; this dsv4 reads version {LAYOUT_VERSION}",
                              f"upgrade dsv4, or {_RECONVERT}")
    return document


def _preview(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")

