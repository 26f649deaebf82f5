"""Giving the layers an importance matrix shows to be most sensitive one expert format more (`--boost-layers`)."""

from __future__ import annotations

import math

from dsv4cli.kernels import ref
from dsv4cli.model.recipe import PROJECTIONS, parse_recipe
from dsv4cli.quant.imatrix import Imatrix
from dsv4cli.quant.requantize import requantize

UPGRADE = {"int2": "int3", "int3": "fp4"}
#: experts per layer whose error `boost_layers` measures (the most used ones)
BOOST_SAMPLE = 4


def layer_error(source, layer_id: int, formats: tuple[str, str, str], imatrix: Imatrix) -> float:
    """Importance-weighted squared quantization error of layer `layer_id`'s most used experts
    (up to `BOOST_SAMPLE`) in `formats` (w1, w2, w3), summed over their rows."""
    args = source.args
    prefix = f"layers.{layer_id}.ffn.experts"
    experts = sorted(range(args.n_routed_experts), key=lambda e: -imatrix.tokens_seen(f"{prefix}.{e}.w1"))
    total = 0.0
    for e in experts[:BOOST_SAMPLE]:
        for proj, fmt in zip(("w1", "w2", "w3"), formats, strict=True):
            name = f"{prefix}.{e}.{proj}"
            imp = imatrix.importance(name)
            if imp is None or fmt not in UPGRADE:
                continue
            scale = source.get(name + ".scale") if name + ".scale" in source else None
            dense = ref.dequantize_weight(source.get(name + ".weight"), scale)
            w, s = requantize(source.get(name + ".weight"), scale, fmt, imp)
            total += float(((dense - ref.dequantize_weight(w, s)).pow(2) * imp).sum())
    return total


def boost_layers(source, recipe, imatrix: Imatrix, fraction: float):
    """(recipe with the ceil(fraction * n_layers) most sensitive trunk layers' expert formats one
    step up, those layers). Layers whose experts are already FP4 or better are not candidates."""
    args = source.args.replace(quantization=recipe)
    errors = {}
    for layer_id in range(args.n_layers):
        formats = args.expert_formats(layer_id)
        if any(f in UPGRADE for f in formats):
            errors[layer_id] = layer_error(source, layer_id, formats, imatrix)
    count = min(len(errors), math.ceil(fraction * args.n_layers))
    chosen = sorted(sorted(errors, key=lambda lid: -errors[lid])[:count])
    if not chosen:
        return recipe, ()
    config = recipe.to_config()
    layers = dict(config.get("layers", {}))
    for layer_id in chosen:
        formats = dict(zip(("w1", "w2", "w3"), args.expert_formats(layer_id), strict=True))
        layers[str(layer_id)] = {**layers.get(str(layer_id), {}),
                                 "experts": {p: UPGRADE.get(formats[p], formats[p]) for p in PROJECTIONS}}
    config["layers"] = layers
    config["name"] = f"{recipe.name}+imatrix"
    return parse_recipe(config), tuple(chosen)
