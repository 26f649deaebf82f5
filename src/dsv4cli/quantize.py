"""`dsv4 quantize` engine: rewrite a checkpoint's linears in the formats a recipe names.

The output is an official-layout checkpoint whose config.json carries the recipe (key
`recipe.QUANT_KEY`), so `ModelArgs.linear_format` and the schema know every linear's stored
format and the normal loader runs it; `quantization.json` next to it repeats the recipe with
the per-format counts and sizes. Tensors are streamed in checkpoint order through
`io.writer.write_checkpoint` (at most about one shard in memory): each linear whose stored
format changes is dequantized (`kernels.ref.dequantize_weight`) and requantized
(`quant_formats`), everything else is copied. The whole output is built in a temporary
sibling directory and moved into place at the end (`io.writer.move_into_place`); on any
failure nothing is left behind.

An importance matrix (`imatrix.Imatrix`) weights the scale search of the routed experts and,
with `boost_fraction`, moves the most sensitive layers one format up (`imatrix.boost_layers`).
No printing here: `progress(done, total)` reports bytes written.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dsv4cli.errors import CheckpointError, UsageError
from dsv4cli.formats import quantize_fp8_blocks
from dsv4cli.imatrix import Imatrix, boost_layers
from dsv4cli.io.checkpoint import Checkpoint
from dsv4cli.io.dsv4_layout import Dsv4Checkpoint, open_checkpoint
from dsv4cli.io.schema import TensorSpec, checkpoint_specs
from dsv4cli.io.writer import DEFAULT_MAX_SHARD_BYTES, checkpoint_order, move_into_place, write_checkpoint
from dsv4cli.kernels.ref import dequantize_weight
from dsv4cli.quant_formats import LOWBIT, quantize_fp4_search, quantize_lowbit
from dsv4cli.recipe import Recipe

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


def stored_format(weight: TensorSpec, scale: TensorSpec | None) -> str:
    """Format name of a linear from its weight/scale specs: fp8, fp4, int3, int2 or bf16."""
    if weight.dtype == "F8_E4M3":
        return "fp8"
    if weight.dtype == "I8":
        return "fp4"
    if weight.dtype == "U8" and scale is not None:
        per_block = weight.shape[1] // scale.shape[1]
        return next(fmt for fmt, (_, nbytes, _) in LOWBIT.items() if nbytes == per_block)
    return "bf16"


def requantize(weight: torch.Tensor, scale: torch.Tensor | None, fmt: str,
               importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One linear's stored tensors in any format -> (weight, scale) in `fmt`."""
    dense = dequantize_weight(weight, scale)
    if fmt in LOWBIT:
        return quantize_lowbit(dense, fmt, importance)
    if fmt == "fp4":
        return quantize_fp4_search(dense, importance)
    if fmt == "fp8":
        return quantize_fp8_blocks(dense)
    if fmt == "bf16":
        return dense.to(torch.bfloat16), None
    raise ValueError(f"unknown target format {fmt!r}")


def quantize_checkpoint(src: str | Path, out: str | Path, recipe: Recipe, *, imatrix: Imatrix | None = None,
                        boost_fraction: float = 0.0, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                        force: bool = False, progress: Callable[[int, int], None] | None = None) -> QuantizeResult:
    """Write `src` quantized per `recipe` to `out` (atomically); see the module docstring."""
    src, out = Path(src), Path(out).absolute()
    _check_paths(src, out, force)
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
        plan = _plan(src_specs, out_specs)
        total = sum(spec.nbytes for spec in out_specs.values())
        staging = out.with_name(f"{out.name}.quantizing")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            write_checkpoint(_tensors(source, out_specs, plan, imatrix), args, staging,
                             max_shard_bytes=max_shard_bytes, overwrite=True,
                             tokenizer_dir=src if (src / "tokenizer.json").is_file() else None,
                             progress=None if progress is None else lambda _name, done: progress(done, total))
            result = QuantizeResult(path=out, recipe=recipe, source_bytes=_weights_bytes(src),
                                    output_bytes=_weights_bytes(staging), formats=_format_counts(out_specs),
                                    converted=len(plan), boosted_layers=boosted,
                                    imatrix=imatrix is not None)
            (staging / RECIPE_FILE).write_text(json.dumps(result.to_json(), indent=2) + "\n", encoding="utf-8")
            if imatrix is not None:
                imatrix.save(staging / IMATRIX_FILE)
            move_into_place(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    finally:
        source.close()
    return result


def _check_paths(src: Path, out: Path, force: bool) -> None:
    if not src.is_dir():
        raise CheckpointError(f"no checkpoint directory at {src}", "point to a directory with config.json")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a directory", "choose another output path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise CheckpointError(f"{out} already exists and is not empty", "choose another directory or pass --force")
    if out.resolve() == src.resolve():
        raise UsageError("the output directory is the source checkpoint", "write the quantized copy elsewhere")


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


def _tensors(source: Checkpoint | Dsv4Checkpoint, out_specs: dict[str, TensorSpec], plan: dict[str, str],
             imatrix: Imatrix | None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) in checkpoint order; converted linears computed when their weight comes up."""
    pending: dict[str, torch.Tensor] = {}
    for name in checkpoint_order(out_specs):
        if name in pending:
            yield name, pending.pop(name)
            continue
        base = name.rpartition(".")[0]
        if base not in plan:
            yield name, source.get(name)
            continue
        scale = source.get(base + ".scale") if base + ".scale" in source else None
        importance = imatrix.importance(base) if imatrix is not None else None
        weight, new_scale = requantize(source.get(base + ".weight"), scale, plan[base], importance)
        produced = {base + ".weight": weight}
        if new_scale is not None:
            produced[base + ".scale"] = new_scale
        yield name, produced.pop(name)
        pending.update(produced)
    if pending:
        raise CheckpointError(f"quantizer produced tensors the schema does not list: {sorted(pending)[:3]}",
                              "this is a bug in dsv4 quantize")


def _format_counts(specs: dict[str, TensorSpec]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name, spec in specs.items():
        if name.endswith(".weight") and spec.dtype in ("F8_E4M3", "I8", "U8"):
            fmt = stored_format(spec, specs.get(name[: -len(".weight")] + ".scale"))
            counts[fmt] = counts.get(fmt, 0) + 1
    return dict(sorted(counts.items()))


def _weights_bytes(directory: Path) -> int:
    """Bytes of the checkpoint's .safetensors files (the size on disk that matters)."""
    return sum(p.stat().st_size for p in Path(directory).glob("*.safetensors"))
