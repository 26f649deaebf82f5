"""Quantization recipes: which stored format each quantizable linear of a checkpoint gets.

A recipe is a JSON object (a file, or one of `quant.recipes.BUILTIN`):

    {"name": "my-q3",
     "experts": {"w1": "int3", "w3": "int3", "w2": "fp4"},   # or one format for all three
     "dense": "fp4",                                          # the FP8 non-expert linears
     "layers": {"0-2": {"experts": {"w2": "int3"}}, "mtp": {"experts": "keep"}},
     "keep": ["layers.0.attn.*", "*.shared_experts.*"]}

Expert formats: fp4, int3, int2; dense formats: fp8, fp4; "keep" (or leaving a key out) keeps
the source checkpoint's format. `layers` keys are trunk layer indices ("3"), inclusive ranges
("0-2"), comma lists of both ("0-2,7") or "mtp" (every MTP layer); a later key overrides an
earlier one. `keep` lists fnmatch patterns of linear names (`layers.3.ffn.experts.7.w2`,
`layers.0.attn.wq_a`, `mtp.0.e_proj`) that keep their source format whatever the rest says.

The quantized checkpoint stores its recipe in config.json under `QUANT_KEY`;
`ModelArgs.quantization` holds it and `ModelArgs.linear_format` resolves each linear's format. This
module is the recipe's schema (part of the model config); `quant.recipes` holds the built-in recipes
and reads recipe files.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Any

from dsv4cli.errors import UsageError

QUANT_KEY = "dsv4_quantization"
RECIPE_VERSION = 1
PROJECTIONS = ("w1", "w2", "w3")
EXPERT_FORMATS = ("fp4", "int3", "int2")
DENSE_FORMATS = ("fp8", "fp4")
KEEP = "keep"
_TOP_KEYS = {"name", "version", "experts", "dense", "layers", "keep", "description"}
_RULE_KEYS = {"experts", "dense"}
_LAYER_KEY_RE = re.compile(r"^\d+(-\d+)?$")
_HINT = "see docs/quality.md for the recipe format"

class RecipeError(UsageError):
    """A recipe that cannot be parsed or does not make sense."""


@dataclass(frozen=True)
class LayerRule:
    """Formats for a set of layers: `layers` (trunk indices) and/or every MTP layer."""

    key: str
    layers: frozenset[int]
    mtp: bool
    experts: tuple[tuple[str, str], ...]  # (projection, format)
    dense: str | None

    def applies(self, layer: int | None) -> bool:
        """layer: trunk index, or None for an MTP layer."""
        return self.mtp if layer is None else layer in self.layers


@dataclass(frozen=True)
class Recipe:
    """A parsed recipe (hashable, so `ModelArgs` stays hashable)."""

    name: str
    experts: tuple[tuple[str, str], ...]
    dense: str | None
    layers: tuple[LayerRule, ...] = ()
    keep: tuple[str, ...] = ()
    description: str = ""

    # ------------------------------------------------------------- resolving
    def expert_format(self, name: str, layer: int | None, projection: str, base: str) -> str:
        """Format of routed-expert linear `name` (e.g. layers.3.ffn.experts.7.w2); `base` = source format."""
        if self._kept(name):
            return base
        fmt = dict(self.experts).get(projection, KEEP)
        for rule in self.layers:
            if rule.applies(layer):
                fmt = dict(rule.experts).get(projection, fmt)
        return base if fmt == KEEP else fmt

    def dense_format(self, name: str, layer: int | None, base: str) -> str:
        """Format of an FP8 (source `base`) non-expert linear `name` (e.g. layers.0.attn.wq_a)."""
        if self._kept(name):
            return base
        fmt = self.dense or KEEP
        for rule in self.layers:
            if rule.applies(layer) and rule.dense is not None:
                fmt = rule.dense
        return base if fmt == KEEP else fmt

    def _kept(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.keep)

    def max_layer(self) -> int:
        """Highest trunk layer index any rule names (-1 if none)."""
        return max((max(r.layers) for r in self.layers if r.layers), default=-1)

    def formats_used(self) -> set[str]:
        used = {f for _, f in self.experts} | ({self.dense} if self.dense else set())
        for rule in self.layers:
            used |= {f for _, f in rule.experts} | ({rule.dense} if rule.dense else set())
        return used - {KEEP}

    # ---------------------------------------------------------- serialising
    def to_config(self) -> dict[str, Any]:
        """The JSON object stored in config.json (and accepted back by `parse_recipe`)."""
        out: dict[str, Any] = {"version": RECIPE_VERSION, "name": self.name}
        if self.description:
            out["description"] = self.description
        out["experts"] = dict(self.experts)
        if self.dense is not None:
            out["dense"] = self.dense
        if self.layers:
            out["layers"] = {r.key: _rule_json(r) for r in self.layers}
        if self.keep:
            out["keep"] = list(self.keep)
        return out


def _rule_json(rule: LayerRule) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if rule.experts:
        out["experts"] = dict(rule.experts)
    if rule.dense is not None:
        out["dense"] = rule.dense
    return out


# =========================================================================== parsing


def parse_recipe(data: Any, default_name: str = "custom") -> Recipe:
    """Validate a recipe JSON object; raises `RecipeError` (one line) on anything wrong."""
    if not isinstance(data, dict):
        raise RecipeError(f"a recipe must be a JSON object, got {type(data).__name__}", _HINT)
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise RecipeError(f"recipe has unknown keys {unknown}", f"known keys: {', '.join(sorted(_TOP_KEYS))}")
    version = data.get("version", RECIPE_VERSION)
    if version != RECIPE_VERSION:
        raise RecipeError(f"recipe version {version!r} is not supported", f"this dsv4 reads version {RECIPE_VERSION}")
    name = data.get("name", default_name)
    if not isinstance(name, str) or not name:
        raise RecipeError("recipe 'name' must be a non-empty string", _HINT)
    description = data.get("description", "")
    if not isinstance(description, str):
        raise RecipeError("recipe 'description' must be a string", _HINT)
    experts = _experts(data.get("experts", {}), "experts")
    dense = _dense(data.get("dense"), "dense")
    layers = _layers(data.get("layers", {}))
    keep = data.get("keep", [])
    if not isinstance(keep, list) or not all(isinstance(p, str) and p for p in keep):
        raise RecipeError("recipe 'keep' must be a list of tensor name patterns", 'e.g. ["layers.0.*"]')
    return Recipe(name=name, experts=experts, dense=dense, layers=layers, keep=tuple(keep), description=description)


def _experts(value: Any, where: str) -> tuple[tuple[str, str], ...]:
    if isinstance(value, str):
        value = dict.fromkeys(PROJECTIONS, value)
    if not isinstance(value, dict):
        raise RecipeError(f"recipe '{where}' must be a format or an object {{w1, w2, w3: format}}", _HINT)
    bad = sorted(set(value) - set(PROJECTIONS))
    if bad:
        raise RecipeError(f"recipe '{where}' has unknown projections {bad}", "use w1 (gate), w3 (up), w2 (down)")
    for proj, fmt in value.items():
        if fmt not in (*EXPERT_FORMATS, KEEP):
            raise RecipeError(f"recipe '{where}.{proj}': unknown expert format {fmt!r}",
                              f"choose one of: {', '.join((*EXPERT_FORMATS, KEEP))}")
    return tuple(sorted(value.items()))


def _dense(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if value not in (*DENSE_FORMATS, KEEP):
        raise RecipeError(f"recipe '{where}': unknown dense format {value!r}",
                          f"choose one of: {', '.join((*DENSE_FORMATS, KEEP))}")
    return value


def _layers(value: Any) -> tuple[LayerRule, ...]:
    if not isinstance(value, dict):
        raise RecipeError("recipe 'layers' must be an object {\"0-2\": {...}}", _HINT)
    rules = []
    for key, rule in value.items():
        layers, mtp = parse_layer_key(key)
        if not isinstance(rule, dict):
            raise RecipeError(f"recipe 'layers.{key}' must be an object with 'experts' and/or 'dense'", _HINT)
        unknown = sorted(set(rule) - _RULE_KEYS)
        if unknown:
            raise RecipeError(f"recipe 'layers.{key}' has unknown keys {unknown}", "use 'experts' and 'dense'")
        rules.append(LayerRule(key, layers, mtp, _experts(rule.get("experts", {}), f"layers.{key}.experts"),
                               _dense(rule.get("dense"), f"layers.{key}.dense")))
    return tuple(rules)


def parse_layer_key(key: str) -> tuple[frozenset[int], bool]:
    """'0-2,7' -> ({0, 1, 2, 7}, False); 'mtp' -> ((), True)."""
    layers: set[int] = set()
    mtp = False
    for part in str(key).replace(" ", "").split(","):
        if part == "mtp":
            mtp = True
        elif _LAYER_KEY_RE.match(part):
            first, _, last = part.partition("-")
            lo, hi = int(first), int(last or first)
            if hi < lo:
                raise RecipeError(f"recipe layer range {part!r} is empty", "write ranges low-high, e.g. 0-2")
            layers.update(range(lo, hi + 1))
        else:
            raise RecipeError(f"recipe layer key {key!r} is not understood",
                              "use layer indices, ranges and 'mtp', e.g. \"0-2,7\" or \"mtp\"")
    return frozenset(layers), mtp
