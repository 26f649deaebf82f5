"""Measure how often the router picks each expert, to place the hot ones on the GPU."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch

from dsv4cli.errors import UsageError
from dsv4cli.fsutil import disk_errors, write_json
from dsv4cli.model.transformer import Transformer


@torch.inference_mode()
def count_routes(model: Transformer, sequences: Iterable[list[int]], chunk: int = 256) -> dict[int, list[int]]:
    """Run token sequences through the trunk and count expert selections per layer."""
    counts = torch.zeros(model.args.n_layers, model.args.n_routed_experts, dtype=torch.int64)

    def count(layer_id: int, indices: torch.Tensor) -> None:
        counts[layer_id] += torch.bincount(indices.flatten(), minlength=model.args.n_routed_experts).cpu()

    model.observe_routing(count)
    try:
        for ids in sequences:
            if not ids:
                continue
            cache = model.new_cache(1, max_len=len(ids))
            for start in range(0, len(ids), chunk):
                model.streams(torch.tensor([ids[start:start + chunk]], device=model.device), cache)
        return {i: row.tolist() for i, row in enumerate(counts)}
    finally:
        model.observe_routing(None)


def save_counts(counts: dict[int, list[int]], path: str | Path) -> Path:
    path = Path(path)
    with disk_errors(f"writing the routing counts {path}", "check the directory exists and is writable"):
        write_json(path, {"routing_counts": {str(k): v for k, v in counts.items()}})
    return path


def load_counts(path: str | Path) -> dict[int, list[int]]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))["routing_counts"]
        return {int(k): [int(c) for c in v] for k, v in data.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UsageError(f"cannot read routing counts from {path}: {exc}",
                         "write them with {opt:save_counts}") from None
