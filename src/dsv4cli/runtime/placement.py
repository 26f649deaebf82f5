"""Where each part of the model lives: a placement plan from the config and the memory budgets.

Attention, norms, routers, shared experts, embeddings and the KV cache go to the
accelerator when there is one (they are used by every token); routed experts are split
between a GPU-resident set, chosen from expert activation frequencies (hot experts
first), and host memory (RAM, or the memory-mapped files when RAM is short). The plan
is plain data: it can be printed, saved as JSON and loaded back.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from dsv4cli.errors import OutOfMemory, UsageError
from dsv4cli.io.schema import checkpoint_specs
from dsv4cli.model.args import ModelArgs
from dsv4cli.model.cache import ModelCache

PLAN_VERSION = 1
CACHE_POLICIES = ("lru", "lfu", "mru")
#: GPU bytes kept free for activations, allocator slack and kernels' workspaces.
GPU_RESERVE_BYTES = 2 << 30
#: Expert slots on the GPU for staging host experts during prefill (per plan, shared by layers).
DEFAULT_STAGING_SLOTS = 32


@dataclass
class PlacementPlan:
    device: str  # "cpu" or "cuda:N": where dense weights, caches and GPU experts live
    context: int
    dense_bytes: int  # everything but routed experts
    kv_cache_bytes: int
    expert_bytes: int  # one routed expert (w1, w2, w3 and their scales)
    n_layers: int
    n_experts: int
    gpu_experts: dict[int, list[int]] = field(default_factory=dict)  # layer -> resident expert ids
    staging_slots: int = 0
    host_mode: str = "ram"  # "ram" (fits in the CPU budget) or "mmap" (read from the files on demand)
    cache_policy: str = "mru"  # eviction of the staging slots: lru, lfu or mru (see runtime.offload.SlotCache)
    gpu_budget_bytes: int = 0
    cpu_budget_bytes: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def n_gpu_experts(self) -> int:
        return sum(len(v) for v in self.gpu_experts.values())

    @property
    def n_host_experts(self) -> int:
        return self.n_layers * self.n_experts - self.n_gpu_experts

    def is_on_gpu(self, layer: int, expert: int) -> bool:
        return expert in self.gpu_experts.get(layer, ())

    def rows(self) -> list[tuple[str, str, int]]:
        """(what, where, bytes) lines for printing."""
        dense_where = self.device
        host = "host RAM" if self.host_mode == "ram" else "memory-mapped files (read on demand)"
        return [
            ("attention, norms, routers, shared experts, embeddings", dense_where, self.dense_bytes),
            (f"KV cache ({self.context:,} tokens)", dense_where, self.kv_cache_bytes),
            (f"routed experts on the GPU ({self.n_gpu_experts:,})", self.device if self.n_gpu_experts else "-",
             self.n_gpu_experts * self.expert_bytes),
            (f"GPU staging slots for host experts ({self.staging_slots})", self.device if self.staging_slots else "-",
             self.staging_slots * self.expert_bytes),
            (f"routed experts in host memory ({self.n_host_experts:,})", host, self.n_host_experts * self.expert_bytes),
        ]

    def summary(self) -> str:
        """One line for the chat banner: what runs where."""
        gib = 2**30
        experts = (self.n_gpu_experts + self.staging_slots) * self.expert_bytes
        on_device = self.dense_bytes + self.kv_cache_bytes + experts
        host = "host RAM" if self.host_mode == "ram" else "the memory-mapped files"
        pretend = " (host memory standing in for a GPU)" if self.device == "cpu" else ""
        return (f"placement: dense weights and KV cache on {self.device}{pretend}, {self.n_gpu_experts:,} routed "
                f"experts resident there + {self.staging_slots} staging slots ({on_device / gib:.1f} GiB), "
                f"{self.n_host_experts:,} in {host}")

    def to_json(self) -> str:
        data = asdict(self)
        data["version"] = PLAN_VERSION
        data["gpu_experts"] = {str(k): v for k, v in self.gpu_experts.items()}
        return json.dumps(data, indent=2)

    @classmethod
    def from_json(cls, text: str) -> PlacementPlan:
        try:
            data = json.loads(text)
            if data.pop("version", None) != PLAN_VERSION:
                raise ValueError(f"unsupported plan version (expected {PLAN_VERSION})")
            data["gpu_experts"] = {int(k): list(v) for k, v in data["gpu_experts"].items()}
            plan = cls(**data)
            if not is_valid_device(plan.device):
                raise ValueError(f"device must be cpu or cuda:N, not {plan.device!r}")
            if plan.cache_policy not in CACHE_POLICIES:
                raise ValueError(f"cache_policy must be one of {', '.join(CACHE_POLICIES)}")
            return plan
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise UsageError(f"invalid placement plan: {exc}", "write one with `dsv4 plan --save`") from None

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_json() + "\n", encoding="utf-8")
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> PlacementPlan:
        try:
            return cls.from_json(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise UsageError(f"cannot read placement plan {path}: {exc.strerror}",
                             "check the path, or write a plan with `dsv4 plan MODEL --save FILE`") from None


def is_valid_device(device: str) -> bool:
    """Whether `device` is "cpu", "cuda" or "cuda:N" (what plans and --device accept)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        return False
    return parsed.type == "cuda" or (parsed.type == "cpu" and parsed.index is None)


def model_bytes(args: ModelArgs) -> tuple[int, int]:
    """(dense bytes = everything but routed experts, bytes of one routed expert)."""
    specs = checkpoint_specs(args, include_mtp=False, experts=range(0))
    dense = sum(s.nbytes for s in specs.values())
    one = checkpoint_specs(args.replace(n_layers=1, n_hash_layers=0, compress_ratios=(0, 0)),
                           include_mtp=False, experts=range(1))
    expert = sum(s.nbytes for n, s in one.items() if ".experts.0." in n)
    return dense, expert


def plan_placement(args: ModelArgs, *, device: str = "cpu", gpu_budget_bytes: int = 0,
                   cpu_budget_bytes: int | None = None, context: int = 16384,
                   frequencies: dict[int, list[float]] | None = None,
                   staging_slots: int = DEFAULT_STAGING_SLOTS, accelerated: bool | None = None,
                   cache_policy: str = "mru") -> PlacementPlan:
    """Decide where everything goes. `frequencies[layer][expert]` = how often the router picks it
    (any scale); without them experts are spread evenly over the layers. `accelerated` (default:
    device is not the CPU) splits the experts by `gpu_budget_bytes`; with device "cpu" that makes
    host memory stand in for a GPU of that size (to measure the expert cache without one)."""
    accelerated = device != "cpu" if accelerated is None else accelerated
    dense, expert = model_bytes(args)
    kv = int(ModelCache.bytes_per_token(args) * context) + args.n_layers * args.window_size * args.head_dim * 2
    total_experts = args.n_layers * args.n_routed_experts
    plan = PlacementPlan(device=device, context=context, dense_bytes=dense, kv_cache_bytes=kv, expert_bytes=expert,
                         n_layers=args.n_layers, n_experts=args.n_routed_experts,
                         gpu_budget_bytes=gpu_budget_bytes, cpu_budget_bytes=cpu_budget_bytes or 0,
                         cache_policy=cache_policy)
    host_needed = total_experts * expert
    if accelerated:
        reserve = GPU_RESERVE_BYTES if device != "cpu" else 0  # a pretend GPU needs no workspace
        free = gpu_budget_bytes - dense - kv - reserve
        if free < 0:
            raise OutOfMemory(
                f"the GPU budget of {gpu_budget_bytes / 2**30:.1f} GiB cannot hold the dense weights and "
                f"KV cache ({(dense + kv + reserve) / 2**30:.1f} GiB with reserve)",
                "lower --ctx, raise --gpu-memory, or run on the CPU (--device cpu)")
        plan.staging_slots = min(staging_slots, free // expert, total_experts)
        free -= plan.staging_slots * expert
        n_gpu = min(int(free // expert), total_experts)
        plan.gpu_experts = _choose_hot_experts(args, n_gpu, frequencies)
        host_needed = (total_experts - plan.n_gpu_experts) * expert
    else:
        host_needed += dense + kv
    if cpu_budget_bytes is not None and host_needed > cpu_budget_bytes:
        plan.host_mode = "mmap"
        plan.warnings.append(
            f"host experts need {host_needed / 2**30:.1f} GiB but the CPU budget is "
            f"{cpu_budget_bytes / 2**30:.1f} GiB: experts are read from the memory-mapped files on demand "
            "(works, but decode is limited by disk speed)")
    return plan


def _choose_hot_experts(args: ModelArgs, count: int, frequencies: dict[int, list[float]] | None
                        ) -> dict[int, list[int]]:
    """The `count` most frequently routed (layer, expert) pairs; round-robin over layers without data."""
    if count <= 0:
        return {}
    if frequencies:
        ranked = sorted(((float(freq), layer, e) for layer, row in frequencies.items() for e, freq in enumerate(row)),
                        key=lambda t: (-t[0], t[1], t[2]))
        picked = [(layer, e) for _, layer, e in ranked[:count]]
    else:
        picked = [(layer, e) for e in range(args.n_routed_experts) for layer in range(args.n_layers)][:count]
    chosen: dict[int, list[int]] = {}
    for layer, e in picked:
        chosen.setdefault(layer, []).append(e)
    return {layer: sorted(ids) for layer, ids in sorted(chosen.items())}


def frequencies_from_counts(counts: dict[str, Any]) -> dict[int, list[float]]:
    """Normalise a saved routing-count file ({"layer": [count per expert]}) to frequencies."""
    out = {}
    for layer, row in counts.items():
        total = float(sum(row)) or 1.0
        out[int(layer)] = [c / total for c in row]
    return out
