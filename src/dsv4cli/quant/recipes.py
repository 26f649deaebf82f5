"""The built-in quantization recipes, and recipes read from JSON files (format: `model.recipe`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dsv4cli.model.recipe import Recipe, RecipeError, parse_recipe

#: The built-in recipes (for an official checkpoint: FP4 experts, FP8 dense linears).
BUILTIN: dict[str, dict[str, Any]] = {
    "q4": {"description": "the official formats (experts fp4, dense fp8): a no-op baseline",
           "experts": "fp4", "dense": "fp8"},
    "q4-dense4": {"description": "official experts, dense linears fp8 -> fp4",
                  "experts": "fp4", "dense": "fp4"},
    "q3": {"description": "gate/up projections int3, down projection (more sensitive) fp4",
           "experts": {"w1": "int3", "w3": "int3", "w2": "fp4"}, "dense": "fp8"},
    "q3-dense4": {"description": "q3 plus dense linears fp8 -> fp4",
                  "experts": {"w1": "int3", "w3": "int3", "w2": "fp4"}, "dense": "fp4"},
    "q2": {"description": "gate/up projections int2, down projection int3",
           "experts": {"w1": "int2", "w3": "int2", "w2": "int3"}, "dense": "fp8"},
}


def load_recipe(spec: str) -> Recipe:
    """A built-in recipe name or a JSON file path -> Recipe."""
    if spec in BUILTIN:
        return parse_recipe({"name": spec, **BUILTIN[spec]})
    path = Path(spec)
    if not path.is_file():
        raise RecipeError(f"{spec!r} is neither a built-in recipe nor a file",
                          f"built-in recipes: {', '.join(BUILTIN)}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc}", "the recipe must be a JSON file") from None
    return parse_recipe(data, default_name=path.stem)
