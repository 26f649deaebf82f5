"""Official checkpoint -> transformers' `DeepseekV4ForCausalLM` naming, dequantized (spec §3.7).

FP8 and FP4 values times power-of-two scales are exact in bf16, so the export is
lossless. MTP tensors are dropped (transformers does not instantiate MTP).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from dsv4cli.io.schema import checkpoint_specs
from dsv4cli.io.writer import DEFAULT_MAX_SHARD_BYTES, write_checkpoint
from dsv4cli.kernels.ref import dequantize_weight
from dsv4cli.model.args import ModelArgs

_GLOBAL = {
    "embed.weight": "model.embed_tokens.weight",
    "head.weight": "lm_head.weight",
    "norm.weight": "model.norm.weight",
    "hc_head_fn": "model.hc_head.hc_fn",
    "hc_head_base": "model.hc_head.hc_base",
    "hc_head_scale": "model.hc_head.hc_scale",
}
# Suffix within `layers.N.` -> suffix within `model.layers.N.` (checked in this order).
_LAYER = [
    ("attn_norm.weight", "input_layernorm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("hc_attn_fn", "attn_hc.fn"), ("hc_attn_base", "attn_hc.base"), ("hc_attn_scale", "attn_hc.scale"),
    ("hc_ffn_fn", "ffn_hc.fn"), ("hc_ffn_base", "ffn_hc.base"), ("hc_ffn_scale", "ffn_hc.scale"),
    ("attn.attn_sink", "self_attn.sinks"),
    ("attn.wq_a.weight", "self_attn.q_a_proj.weight"),
    ("attn.q_norm.weight", "self_attn.q_a_norm.weight"),
    ("attn.wq_b.weight", "self_attn.q_b_proj.weight"),
    ("attn.wkv.weight", "self_attn.kv_proj.weight"),
    ("attn.kv_norm.weight", "self_attn.kv_norm.weight"),
    ("attn.wo_a.weight", "self_attn.o_a_proj.weight"),
    ("attn.wo_b.weight", "self_attn.o_b_proj.weight"),
    ("attn.indexer.compressor.wkv.weight", "self_attn.compressor.indexer.kv_proj.weight"),
    ("attn.indexer.compressor.wgate.weight", "self_attn.compressor.indexer.gate_proj.weight"),
    ("attn.indexer.compressor.norm.weight", "self_attn.compressor.indexer.kv_norm.weight"),
    ("attn.indexer.compressor.ape", "self_attn.compressor.indexer.position_bias"),
    ("attn.indexer.wq_b.weight", "self_attn.compressor.indexer.q_b_proj.weight"),
    ("attn.indexer.weights_proj.weight", "self_attn.compressor.indexer.scorer.weights_proj.weight"),
    ("attn.compressor.wkv.weight", "self_attn.compressor.kv_proj.weight"),
    ("attn.compressor.wgate.weight", "self_attn.compressor.gate_proj.weight"),
    ("attn.compressor.norm.weight", "self_attn.compressor.kv_norm.weight"),
    ("attn.compressor.ape", "self_attn.compressor.position_bias"),
    ("ffn.gate.weight", "mlp.gate.weight"),
    ("ffn.gate.bias", "mlp.gate.e_score_correction_bias"),
    ("ffn.gate.tid2eid", "mlp.gate.tid2eid"),
    ("ffn.shared_experts.w1.weight", "mlp.shared_experts.gate_proj.weight"),
    ("ffn.shared_experts.w2.weight", "mlp.shared_experts.down_proj.weight"),
    ("ffn.shared_experts.w3.weight", "mlp.shared_experts.up_proj.weight"),
]
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")


def transformers_name(name: str) -> str | None:
    """transformers' name for an official (non-expert, non-scale) tensor; None if dropped."""
    if name in _GLOBAL:
        return _GLOBAL[name]
    match = _LAYER_RE.match(name)
    if not match:
        return None
    layer, rest = match.groups()
    for ours, theirs in _LAYER:
        if rest == ours:
            return f"model.layers.{layer}.{theirs}"
    return None


def transformers_config(args: ModelArgs) -> dict:
    """config.json for the dequantized export (no quantization_config, bf16)."""
    cfg = args.replace(dtype="bf16", expert_dtype="bf16").to_hf_config()
    cfg["torch_dtype"] = "bfloat16"
    return cfg


def transformers_tensors(args: ModelArgs, get_tensor: Callable[[str], torch.Tensor],
                         dtype: torch.dtype = torch.bfloat16) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (transformers name, dequantized tensor) for the whole trunk, one layer at a time."""

    def dense(name: str) -> torch.Tensor:
        tensor = get_tensor(name)
        scale_name = name[: -len("weight")] + "scale"
        if tensor.dtype in (torch.float8_e4m3fn, torch.int8):
            return dequantize_weight(tensor, get_tensor(scale_name)).to(dtype)
        if tensor.dtype in (torch.int64, torch.float32):
            return tensor  # routing table and float32 parameters keep their dtype
        return tensor.to(dtype)

    specs = checkpoint_specs(args, include_mtp=False, experts=range(0))
    for name in specs:
        if name.endswith(".scale"):
            continue
        target = transformers_name(name)
        if target is None:
            raise KeyError(f"no transformers name for {name}")
        yield target, dense(name)
        if name.endswith("ffn.gate.weight"):
            prefix = name[: -len("gate.weight")]
            layer = target[: -len("mlp.gate.weight")]
            yield from _stacked_experts(args, prefix, layer, dense)


def _stacked_experts(args: ModelArgs, prefix: str, layer: str, dense: Callable[[str], torch.Tensor]
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    experts = range(args.n_routed_experts)
    gate_up = torch.stack([torch.cat([dense(f"{prefix}experts.{e}.w1.weight"),
                                      dense(f"{prefix}experts.{e}.w3.weight")]) for e in experts])
    yield f"{layer}mlp.experts.gate_up_proj", gate_up
    yield f"{layer}mlp.experts.down_proj", torch.stack([dense(f"{prefix}experts.{e}.w2.weight") for e in experts])


def write_transformers_checkpoint(args: ModelArgs, get_tensor: Callable[[str], torch.Tensor], out_dir: str | Path,
                                  *, dtype: torch.dtype = torch.bfloat16,
                                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False,
                                  tokenizer_dir: str | Path | None = None) -> Path:
    """Write a dequantized checkpoint that `DeepseekV4ForCausalLM.from_pretrained` loads,
    streaming layer by layer (atomic, sharded like the official files)."""
    return write_checkpoint(transformers_tensors(args, get_tensor, dtype), args, out_dir, validate=False,
                            config=transformers_config(args), max_shard_bytes=max_shard_bytes,
                            overwrite=overwrite, tokenizer_dir=tokenizer_dir)
