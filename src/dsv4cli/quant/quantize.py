"""`dsv4 quantize` engine: rewrite a checkpoint's linears in the formats a recipe names.

The output is an official-layout checkpoint whose config.json carries the recipe (key
`recipe.QUANT_KEY`), so `ModelArgs.linear_format` and the schema know every linear's stored
format and the normal loader runs it; `quantization.json` next to it repeats the recipe with
the per-format counts and sizes. The output is planned up front and written shard by shard
through `convert.write_plan`, like `dsv4 convert`: each linear whose stored format changes is
dequantized (`kernels.ref.dequantize_weight`) and requantized (`quant_formats`) when its shard is
written, everything else is copied. The output is built in `<OUT>.dsv4-quantize-partial/` and
renamed to OUT at the end; an interrupted run (Ctrl-C, SIGKILL, a full disk) resumes after its last
finished shard when the same command is run again.

An importance matrix (`imatrix.Imatrix`) weights the scale search of the routed experts and,
with `boost_fraction`, moves the most sensitive layers one format up (`boost.boost_layers`).
No printing here: `progress(done, total)` reports bytes written.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dsv4cli.errors import CheckpointError, ModelNotFound, UsageError
from dsv4cli.fsutil import check_output_dir, write_json
from dsv4cli.io.checkpoint import Checkpoint
from dsv4cli.io.convert import (
    ConversionPlan,
    PlannedTensor,
    passthrough,
    single,
    source_generation_config,
    tokenizer_files,
    write_plan,
)
from dsv4cli.io.dsv4_layout import Dsv4Checkpoint, open_checkpoint
from dsv4cli.io.schema import TensorSpec, checkpoint_specs
from dsv4cli.io.writer import DEFAULT_MAX_SHARD_BYTES, checkpoint_order
from dsv4cli.model.recipe import Recipe
from dsv4cli.quant.boost import boost_layers
from dsv4cli.quant.imatrix import Imatrix
from dsv4cli.quant.requantize import requantize, stored_format

RECIPE_FILE = "quantization.json"
IMATRIX_FILE = "imatrix.safetensors"


@dataclass
class QuantizeResult:
    """What `quantize_checkpoint` wrote."""

    path: Path
    recipe: Recipe
    source_bytes: int
    output_bytes: int
    formats: dict[str, int] = field(default_factory=dict)  # stored format -> number of linears
    converted: int = 0  # linears whose format changed
    boosted_layers: tuple[int, ...] = ()
    imatrix: bool = False  # whether an importance matrix weighted the experts' scale search

    @property
    def ratio(self) -> float:
        return self.output_bytes / self.source_bytes if self.source_bytes else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "recipe": self.recipe.to_config(), "source_bytes": self.source_bytes,
                "output_bytes": self.output_bytes, "ratio": round(self.ratio, 4), "formats": self.formats,
                "converted_linears": self.converted, "boosted_layers": list(self.boosted_layers),
                "imatrix": self.imatrix}


def quantize_checkpoint(src: str | Path, out: str | Path, recipe: Recipe, *, imatrix: Imatrix | None = None,
                        boost_fraction: float = 0.0, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                        force: bool = False, progress: Callable[[int, int], None] | None = None) -> QuantizeResult:
    """Write `src` quantized per `recipe` to `out` (atomically, resumable); see the module docstring."""
    src, out = Path(src).absolute(), Path(out).absolute()
    if not src.is_dir():
        raise ModelNotFound(f"no checkpoint directory at {src}", "point to a directory with config.json")
    check_output_dir(out, [src], force)
    source = open_checkpoint(src)
    try:
        if source.args.quantization is not None:
            raise UsageError(f"{src} is already quantized (recipe {source.args.quantization.name!r})",
                             "quantize the original checkpoint")
        boosted: tuple[int, ...] = ()
        if imatrix is not None and boost_fraction > 0:
            recipe, boosted = boost_layers(source, recipe, imatrix, boost_fraction)
        args = source.args.replace(quantization=recipe)
        src_specs = checkpoint_specs(source.args, include_mtp=source.has_mtp)
        out_specs = checkpoint_specs(args, include_mtp=source.has_mtp)
        formats = _plan(src_specs, out_specs)
        result = QuantizeResult(path=out, recipe=recipe, source_bytes=_tensor_bytes(src_specs),
                                output_bytes=_tensor_bytes(out_specs),
                                formats=_format_counts(out_specs), converted=len(formats), boosted_layers=boosted,
                                imatrix=imatrix is not None)
        plan = ConversionPlan(f"quantize {recipe.name}", _planned_tensors(source, out_specs, formats, imatrix),
                              args.to_hf_config(), source_generation_config(source), tokenizer_files(source),
                              written_files=_side_files(result, imatrix))
        identity = {"config": args.to_hf_config(), "imatrix": imatrix.digest() if imatrix is not None else None}
        write_plan(plan, source, out, "quantize", max_shard_bytes=max_shard_bytes, force=force, progress=progress,
                   identity=identity)
    finally:
        source.close()
    return result


def _side_files(result: QuantizeResult, imatrix: Imatrix | None) -> dict[str, Callable[[Path], None]]:
    """quantization.json (the result, without the output's path: the directory may move) and the imatrix used."""
    report = {key: value for key, value in result.to_json().items() if key != "path"}
    files: dict[str, Callable[[Path], None]] = {RECIPE_FILE: lambda path: write_json(path, report)}
    if imatrix is not None:
        files[IMATRIX_FILE] = imatrix.save
    return files


def _plan(src_specs: dict[str, TensorSpec], out_specs: dict[str, TensorSpec]) -> dict[str, str]:
    """Linear name (without .weight) -> target format, for every linear whose stored format changes."""
    plan = {}
    for name, spec in out_specs.items():
        if not name.endswith(".weight"):
            continue
        base = name[: -len(".weight")]
        before, after = src_specs[name], spec
        fmt_before = stored_format(before, src_specs.get(base + ".scale"))
        fmt_after = stored_format(after, out_specs.get(base + ".scale"))
        if fmt_before != fmt_after:
            plan[base] = fmt_after
    return plan


def _planned_tensors(source: Checkpoint | Dsv4Checkpoint, out_specs: dict[str, TensorSpec], formats: dict[str, str],
                     imatrix: Imatrix | None) -> list[PlannedTensor]:
    """Every output tensor in checkpoint order: copied, or requantized when its linear changes format."""
    converted = _Requantized(source, formats, imatrix)
    tensors = []
    for name in checkpoint_order(out_specs):
        base, _, leaf = name.rpartition(".")
        spec = out_specs[name]
        if base in formats:
            tensors.append(PlannedTensor(name, spec, single(spec, name, functools.partial(converted.part, base, leaf))))
        else:
            tensors.append(passthrough(source, name))
    return tensors


class _Requantized:
    """Each converted linear's (weight, scale), computed once when the first of the two is written and
    forgotten once both are (shards order tensors by dtype width, so the two need not be adjacent)."""

    def __init__(self, source: Checkpoint | Dsv4Checkpoint, formats: dict[str, str], imatrix: Imatrix | None):
        self.source, self.formats, self.imatrix = source, formats, imatrix
        self.pending: dict[str, dict[str, torch.Tensor]] = {}

    def part(self, base: str, leaf: str) -> torch.Tensor:
        if base not in self.pending:
            self.pending[base] = self._convert(base)
        parts = self.pending[base]
        if leaf not in parts:
            raise CheckpointError(f"the quantizer produced no {base}.{leaf}", "this is a bug in dsv4 quantize")
        tensor = parts.pop(leaf)
        if not parts:
            del self.pending[base]
        return tensor

    def _convert(self, base: str) -> dict[str, torch.Tensor]:
        scale = self.source.get(base + ".scale") if base + ".scale" in self.source else None
        importance = self.imatrix.importance(base) if self.imatrix is not None else None
        weight, new_scale = requantize(self.source.get(base + ".weight"), scale, self.formats[base], importance)
        return {"weight": weight} if new_scale is None else {"weight": weight, "scale": new_scale}


def _format_counts(specs: dict[str, TensorSpec]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name, spec in specs.items():
        if name.endswith(".weight") and spec.dtype in ("F8_E4M3", "I8", "U8"):
            fmt = stored_format(spec, specs.get(name[: -len(".weight")] + ".scale"))
            counts[fmt] = counts.get(fmt, 0) + 1
    return dict(sorted(counts.items()))


def _tensor_bytes(specs: dict[str, TensorSpec]) -> int:
    """Bytes of the tensors' data (what the shards hold, without their headers)."""
    return sum(spec.nbytes for spec in specs.values())
