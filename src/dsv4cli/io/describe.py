"""What a model is: sizes, parameter counts and memory costs derived from its config (for `dsv4 info`)."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass

from dsv4cli.io.schema import checkpoint_specs, logical_params
from dsv4cli.model.args import CSA, HCA, SWA, ModelArgs
from dsv4cli.model.cache import CacheLayout, ModelCache


@dataclass(frozen=True)
class ModelSummary:
    layers: int
    sliding_layers: int
    csa_layers: int
    hca_layers: int
    hash_layers: int
    mtp_layers: int
    hidden_size: int
    heads: int
    routed_experts: int
    experts_per_token: int
    expert_dtype: str
    params_total: int  # incl. MTP
    params_trunk: int
    params_active: int  # per token, trunk only (selected + shared experts, everything else)
    tensors: int
    bytes_total: int
    bytes_routed_experts: int
    bytes_by_dtype: dict[str, int]
    routed_expert_bytes_per_token: int  # read per decoded token (trunk)
    cache_bytes_per_token: float  # compressed pools in the compact layout of the official numerics
    cache_bytes_per_token_bf16: float  # the same pools in bf16 (plain numerics)

    def to_dict(self) -> dict:
        return asdict(self)


def expert_formats_label(args: ModelArgs) -> str:
    """'fp4' for an official checkpoint; for a `dsv4 quantize` one the recipe and each projection's
    formats over the trunk layers, e.g. 'q3+imatrix: w1 int3/fp4, w2 fp4, w3 int3/fp4'."""
    if args.quantization is None:
        return args.expert_dtype
    parts = []
    for proj in ("w1", "w2", "w3"):
        formats = dict.fromkeys(args.linear_format(layer, f"ffn.experts.0.{proj}") for layer in range(args.n_layers))
        parts.append(f"{proj} {'/'.join(formats)}")
    return f"{args.quantization.name}: {', '.join(parts)}"


def summarize(args: ModelArgs) -> ModelSummary:
    specs = checkpoint_specs(args)
    trunk = checkpoint_specs(args, include_mtp=False)
    expert0 = {n: s for n, s in trunk.items() if ".experts.0." in n}
    per_expert_params = logical_params(expert0) // args.n_layers
    per_expert_bytes = sum(s.nbytes for s in expert0.values()) // args.n_layers
    routed_params = per_expert_params * args.n_routed_experts * args.n_layers
    bytes_by_dtype: Counter[str] = Counter()
    for spec in specs.values():
        bytes_by_dtype[spec.dtype] += spec.nbytes
    ratios = args.compress_ratios[: args.n_layers]
    trunk_params = logical_params(trunk)
    return ModelSummary(
        layers=args.n_layers,
        sliding_layers=ratios.count(SWA),
        csa_layers=ratios.count(CSA),
        hca_layers=ratios.count(HCA),
        hash_layers=args.n_hash_layers,
        mtp_layers=args.n_mtp_layers,
        hidden_size=args.dim,
        heads=args.n_heads,
        routed_experts=args.n_routed_experts,
        experts_per_token=args.n_activated_experts,
        expert_dtype=expert_formats_label(args),
        params_total=logical_params(specs),
        params_trunk=trunk_params,
        params_active=trunk_params - routed_params + per_expert_params * args.n_activated_experts * args.n_layers,
        tensors=len(specs),
        bytes_total=sum(s.nbytes for s in specs.values()),
        bytes_routed_experts=sum(s.nbytes for n, s in specs.items() if ".experts." in n),
        bytes_by_dtype=dict(sorted(bytes_by_dtype.items())),
        routed_expert_bytes_per_token=per_expert_bytes * args.n_activated_experts * args.n_layers,
        cache_bytes_per_token=ModelCache.bytes_per_token(args, 2, CacheLayout.official(args)),
        cache_bytes_per_token_bf16=ModelCache.bytes_per_token(args),
    )
