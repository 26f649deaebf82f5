"""Every tensor of an official DeepSeek-V4 checkpoint: name, dtype and shape (spec §3.2, §3.3).

The one source of truth for what a checkpoint must contain. The loader validates
against it, the writer produces it, and `dsv4 info` counts parameters from it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

from dsv4cli.formats.lowbit import LOWBIT
from dsv4cli.model.args import CSA, SWA, ModelArgs

#: safetensors dtype string -> bytes per element.
DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F8_E4M3": 1, "F8_E8M0": 1, "I8": 1, "I32": 4, "I64": 8, "U8": 1}


@dataclass(frozen=True)
class TensorSpec:
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES[self.dtype]


def _ceil128(n: int) -> int:
    return -(-n // 128)


def linear_specs(name: str, out_f: int, in_f: int, fmt: str) -> Iterator[tuple[str, TensorSpec]]:
    """Tensors of one linear layer stored in format `fmt` (fp8, fp4, bf16, or int3 / int2 from `dsv4 quantize`)."""
    if fmt == "fp8":
        yield f"{name}.weight", TensorSpec("F8_E4M3", (out_f, in_f))
        yield f"{name}.scale", TensorSpec("F8_E8M0", (_ceil128(out_f), _ceil128(in_f)))
    elif fmt == "fp4":
        yield f"{name}.weight", TensorSpec("I8", (out_f, in_f // 2))
        yield f"{name}.scale", TensorSpec("F8_E8M0", (out_f, in_f // 32))
    elif fmt == "bf16":
        yield f"{name}.weight", TensorSpec("BF16", (out_f, in_f))
    elif fmt in LOWBIT:  # `dsv4 quantize` formats: packed codes + one bf16 scale per 32 inputs
        yield f"{name}.weight", TensorSpec("U8", (out_f, in_f // 32 * LOWBIT[fmt][1]))
        yield f"{name}.scale", TensorSpec("BF16", (out_f, in_f // 32))
    else:
        raise ValueError(f"unknown weight format {fmt!r}")


def expert_specs(args: ModelArgs, prefix: str, expert: int, layer_id: int = 0) -> Iterator[tuple[str, TensorSpec]]:
    """Tensors of routed expert `expert` under `prefix` (e.g. 'layers.3.ffn') of block `layer_id`."""
    d, inter = args.dim, args.moe_inter_dim
    f1, f2, f3 = args.expert_formats(layer_id, expert)
    base = f"{prefix}.experts.{expert}"
    yield from linear_specs(f"{base}.w1", inter, d, f1)
    yield from linear_specs(f"{base}.w2", d, inter, f2)
    yield from linear_specs(f"{base}.w3", inter, d, f3)


def block_specs(args: ModelArgs, prefix: str, layer_id: int, experts: range | None = None
                ) -> Iterator[tuple[str, TensorSpec]]:
    """Tensors of one transformer block (a trunk layer or an MTP layer)."""
    d, h, hd = args.dim, args.n_heads, args.head_dim

    def fmt(rel: str) -> str:
        return args.linear_format(layer_id, rel)

    hc4 = args.hc_mult * d
    ratio = args.layer_ratio(layer_id)
    yield f"{prefix}.attn_norm.weight", TensorSpec("BF16", (d,))
    yield f"{prefix}.ffn_norm.weight", TensorSpec("BF16", (d,))
    for site in ("attn", "ffn"):
        yield f"{prefix}.hc_{site}_fn", TensorSpec("F32", (args.hc_dim, hc4))
        yield f"{prefix}.hc_{site}_base", TensorSpec("F32", (args.hc_dim,))
        yield f"{prefix}.hc_{site}_scale", TensorSpec("F32", (3,))
    a = f"{prefix}.attn"
    yield f"{a}.attn_sink", TensorSpec("F32", (h,))
    yield from linear_specs(f"{a}.wq_a", args.q_lora_rank, d, fmt("attn.wq_a"))
    yield f"{a}.q_norm.weight", TensorSpec("BF16", (args.q_lora_rank,))
    yield from linear_specs(f"{a}.wq_b", h * hd, args.q_lora_rank, fmt("attn.wq_b"))
    yield from linear_specs(f"{a}.wkv", hd, d, fmt("attn.wkv"))
    yield f"{a}.kv_norm.weight", TensorSpec("BF16", (hd,))
    yield from linear_specs(f"{a}.wo_a", args.o_groups * args.o_lora_rank, h * hd // args.o_groups, fmt("attn.wo_a"))
    yield from linear_specs(f"{a}.wo_b", d, args.o_groups * args.o_lora_rank, fmt("attn.wo_b"))
    if ratio != SWA:
        overlap = 2 if ratio == CSA else 1
        c = f"{a}.compressor"
        yield f"{c}.ape", TensorSpec("F32", (ratio, overlap * hd))
        yield f"{c}.wkv.weight", TensorSpec("BF16", (overlap * hd, d))
        yield f"{c}.wgate.weight", TensorSpec("BF16", (overlap * hd, d))
        yield f"{c}.norm.weight", TensorSpec("BF16", (hd,))
    if ratio == CSA:
        ix, ihd = f"{a}.indexer", args.index_head_dim
        yield from linear_specs(f"{ix}.wq_b", args.index_n_heads * ihd, args.q_lora_rank, fmt("attn.indexer.wq_b"))
        yield f"{ix}.weights_proj.weight", TensorSpec("BF16", (args.index_n_heads, d))
        yield f"{ix}.compressor.ape", TensorSpec("F32", (ratio, 2 * ihd))
        yield f"{ix}.compressor.wkv.weight", TensorSpec("BF16", (2 * ihd, d))
        yield f"{ix}.compressor.wgate.weight", TensorSpec("BF16", (2 * ihd, d))
        yield f"{ix}.compressor.norm.weight", TensorSpec("BF16", (ihd,))
    f = f"{prefix}.ffn"
    yield f"{f}.gate.weight", TensorSpec("BF16", (args.n_routed_experts, d))
    if layer_id < args.n_layers and args.is_hash_layer(layer_id):
        yield f"{f}.gate.tid2eid", TensorSpec("I64", (args.vocab_size, args.n_activated_experts))
    else:
        yield f"{f}.gate.bias", TensorSpec("F32", (args.n_routed_experts,))
    for e in experts if experts is not None else range(args.n_routed_experts):
        yield from expert_specs(args, f, e, layer_id)
    yield from linear_specs(f"{f}.shared_experts.w1", args.moe_inter_dim, d, fmt("ffn.shared_experts.w1"))
    yield from linear_specs(f"{f}.shared_experts.w2", d, args.moe_inter_dim, fmt("ffn.shared_experts.w2"))
    yield from linear_specs(f"{f}.shared_experts.w3", args.moe_inter_dim, d, fmt("ffn.shared_experts.w3"))


def mtp_extra_specs(args: ModelArgs, prefix: str, layer_id: int | None = None) -> Iterator[tuple[str, TensorSpec]]:
    d = args.dim
    layer_id = args.n_layers if layer_id is None else layer_id
    yield from linear_specs(f"{prefix}.e_proj", d, d, args.linear_format(layer_id, "e_proj"))
    yield from linear_specs(f"{prefix}.h_proj", d, d, args.linear_format(layer_id, "h_proj"))
    for norm in ("enorm", "hnorm", "norm"):
        yield f"{prefix}.{norm}.weight", TensorSpec("BF16", (d,))
    yield from hc_head_specs(args, prefix + ".")


def hc_head_specs(args: ModelArgs, prefix: str = "") -> Iterator[tuple[str, TensorSpec]]:
    yield f"{prefix}hc_head_fn", TensorSpec("F32", (args.hc_mult, args.hc_mult * args.dim))
    yield f"{prefix}hc_head_base", TensorSpec("F32", (args.hc_mult,))
    yield f"{prefix}hc_head_scale", TensorSpec("F32", (1,))


def checkpoint_specs(args: ModelArgs, include_mtp: bool = True, experts: range | None = None
                     ) -> dict[str, TensorSpec]:
    """Name -> spec of every tensor in the official checkpoint for `args`.

    `experts` restricts routed experts (e.g. `range(1)` to compare with the
    reference TSV, which lists expert 0 only).
    """
    specs: dict[str, TensorSpec] = {}
    for layer in range(args.n_layers):
        specs.update(block_specs(args, f"layers.{layer}", layer, experts))
    if include_mtp:
        for m in range(args.n_mtp_layers):
            prefix = f"mtp.{m}"
            specs.update(block_specs(args, prefix, args.n_layers + m, experts))
            specs.update(mtp_extra_specs(args, prefix, args.n_layers + m))
    specs["embed.weight"] = TensorSpec("BF16", (args.vocab_size, args.dim))
    specs["head.weight"] = TensorSpec("BF16", (args.vocab_size, args.dim))
    specs["norm.weight"] = TensorSpec("BF16", (args.dim,))
    specs.update(hc_head_specs(args))
    return specs


def logical_params(specs: dict[str, TensorSpec]) -> int:
    """Parameter count as DeepSeek reports it: scales excluded, a packed FP4 byte counts as two
    weights, an int3/int2 weight has 32 weights per scale, the hash-routing tables (integers, not
    weights) excluded."""
    total = 0
    for name, spec in specs.items():
        if name.endswith(".scale") or name.endswith(".tid2eid"):
            continue
        if spec.dtype == "U8" and name.endswith(".weight") and name[:-6] + "scale" in specs:
            total += specs[name[:-6] + "scale"].numel * 32
        else:
            total += spec.numel * (2 if spec.dtype == "I8" else 1)
    return total
