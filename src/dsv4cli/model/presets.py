"""Named model configurations: the real Flash/Pro shapes and small ones for tests and benchmarks.

* `tiny`, `tiny-mix`: a few layers that cover every block kind (sliding-only, CSA with
  the indexer, HCA; hash-routed and learned MoE; the MTP layer) at CPU-test sizes.
* `flash-slice`, `pro-slice`: the real Flash/Pro dimensions with fewer layers and
  experts, for benchmarks that need real per-layer costs.
"""

from __future__ import annotations

from dsv4cli.errors import UsageError
from dsv4cli.model.args import ModelArgs

FLASH = ModelArgs()
PRO = ModelArgs(
    dim=7168, moe_inter_dim=3072, n_layers=61, n_heads=128, n_routed_experts=384, route_scale=2.5,
    q_lora_rank=1536, o_groups=16, index_topk=1024,
    compress_ratios=(128, 128, *([4, 128] * 29), 4, 0),
)

_TINY_COMMON = dict(
    vocab_size=512, dim=256, moe_inter_dim=128, n_heads=4, n_routed_experts=8, n_activated_experts=2,
    q_lora_rank=128, head_dim=128, rope_head_dim=64, o_groups=2, o_lora_rank=128, window_size=8,
    index_n_heads=32, index_head_dim=64, index_topk=4, original_seq_len=256, rope_factor=4.0,
)

PRESETS: dict[str, ModelArgs] = {
    "flash": FLASH,
    "pro": PRO,
    # layers: sliding, CSA, HCA, CSA (+ sliding MTP); hash routing in layers 0-1.
    "tiny": ModelArgs(**_TINY_COMMON, n_layers=4, n_hash_layers=2, compress_ratios=(0, 4, 128, 4, 0)),
    # another mix: CSA first, two streams, one hash layer, 8 heads in 4 groups.
    "tiny-mix": ModelArgs(**{**_TINY_COMMON, "n_heads": 8, "o_groups": 4, "hc_mult": 2, "route_scale": 2.5},
                          n_layers=5, n_hash_layers=1, compress_ratios=(4, 128, 0, 128, 4, 0)),
    "flash-slice": FLASH.replace(n_layers=4, n_routed_experts=32, compress_ratios=(0, 4, 128, 4, 0)),
    "pro-slice": PRO.replace(n_layers=4, n_routed_experts=32, compress_ratios=(128, 4, 128, 4, 0)),
}


def get_preset(name: str) -> ModelArgs:
    try:
        return PRESETS[name]
    except KeyError:
        raise UsageError(f"unknown model preset {name!r}", f"choose one of: {', '.join(PRESETS)}") from None


def shrink(args: ModelArgs, layers: int | None = None, experts: int | None = None) -> ModelArgs:
    """`args` with fewer layers (the layer schedule cut to fit) and/or a different expert count."""
    if layers is not None:
        if layers < 1:
            raise UsageError("{opt:layers} must be at least 1")
        if layers > args.n_layers:
            raise UsageError(f"{{opt:layers}} {layers} exceeds the model's {args.n_layers} layers")
        ratios = (*args.compress_ratios[:layers], *args.compress_ratios[args.n_layers:])
        args = args.replace(n_layers=layers, compress_ratios=ratios, n_hash_layers=min(args.n_hash_layers, layers))
    if experts is not None:
        if experts < args.n_activated_experts:
            raise UsageError(f"{{opt:experts}} must be at least {args.n_activated_experts}")
        args = args.replace(n_routed_experts=experts)
    return args
