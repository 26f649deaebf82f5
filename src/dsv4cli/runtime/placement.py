"""Where each part of the model lives: a placement plan from the config and the memory budgets.

Attention, norms, routers, shared experts, embeddings and the KV cache go to the
accelerator when there is one (they are used by every token); routed experts are split
between a GPU-resident set, chosen from expert activation frequencies (hot experts
first), and host memory (RAM, or the memory-mapped files when RAM is short). The plan
is plain data: it can be printed, saved as JSON and loaded back (every key checked on load).
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from dsv4cli.errors import DsvError, OutOfMemory, UsageError
from dsv4cli.fsutil import atomic_write_text
from dsv4cli.io.schema import checkpoint_specs
from dsv4cli.model.args import ModelArgs
from dsv4cli.model.cache import CacheLayout, ModelCache
from dsv4cli.units import human_bytes

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
        experts = (self.n_gpu_experts + self.staging_slots) * self.expert_bytes
        on_device = self.dense_bytes + self.kv_cache_bytes + experts
        host = "host RAM" if self.host_mode == "ram" else "the memory-mapped files"
        pretend = " (host memory standing in for a GPU)" if self.device == "cpu" else ""
        return (f"placement: dense weights and KV cache on {self.device}{pretend}, {self.n_gpu_experts:,} routed "
                f"experts resident there + {self.staging_slots} staging slots ({human_bytes(on_device)}), "
                f"{self.n_host_experts:,} in {host}")

    def to_json(self) -> str:
        data = asdict(self)
        data["version"] = PLAN_VERSION
        data["gpu_experts"] = {str(k): v for k, v in self.gpu_experts.items()}
        return json.dumps(data, indent=2)

    @classmethod
    def from_json(cls, text: str, source: str = "") -> PlacementPlan:
        """Parse and validate a plan document; InvalidPlan names `source` (the file) and the first bad key."""
        try:
            return cls(**_plan_fields(_parse(text)))
        except _Problem as problem:
            where = f"invalid placement plan {source}" if source else "invalid placement plan"
            raise InvalidPlan(f"{where}: {problem}", PLAN_HINT) from None

    def save(self, path: str | Path) -> None:
        """Write the plan as JSON (a temporary file renamed into place); UsageError if it cannot be written."""
        path = Path(path)
        try:
            atomic_write_text(path, self.to_json() + "\n")
        except (OSError, DsvError) as exc:
            raise UsageError(f"cannot write placement plan {path}: {getattr(exc, 'strerror', None) or exc}",
                             "check the directory exists and is writable") from None

    @classmethod
    def load(cls, path: str | Path) -> PlacementPlan:
        """Read and validate a plan file; InvalidPlan (one line naming the file) for anything wrong with it."""
        return cls.from_json(_read_plan_text(Path(path)), str(path))


class InvalidPlan(UsageError):
    """A placement plan file that cannot be read or does not hold a valid plan."""


PLAN_HINT = "write one with {opt:save_plan}"
#: far above any real plan (DeepSeek-V4 Pro with every expert listed is a few hundred KB)
MAX_PLAN_BYTES = 64 << 20
HOST_MODES = ("ram", "mmap")
#: integer fields and their smallest valid value
_INTEGERS = {"context": 1, "dense_bytes": 0, "kv_cache_bytes": 0, "expert_bytes": 0, "n_layers": 1,
             "n_experts": 1, "staging_slots": 0, "gpu_budget_bytes": 0, "cpu_budget_bytes": 0}
_CHOICES = {"host_mode": HOST_MODES, "cache_policy": CACHE_POLICIES}


class _Problem(Exception):
    """What is wrong with one key of a plan document (becomes an InvalidPlan naming the file)."""


def _read_plan_text(path: Path) -> str:
    """The file's text; InvalidPlan if it cannot be read, is too large or is not UTF-8."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_PLAN_BYTES + 1)
    except OSError as exc:
        raise InvalidPlan(f"cannot read placement plan {path}: {exc.strerror or exc}",
                          "check the path, or write a plan with {opt:save_plan}") from None
    if len(raw) > MAX_PLAN_BYTES:
        raise InvalidPlan(f"invalid placement plan {path}: larger than {MAX_PLAN_BYTES >> 20} MiB", PLAN_HINT)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidPlan(f"invalid placement plan {path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
                          f"{exc.start})", PLAN_HINT) from None


def _parse(text: str) -> Any:
    """The JSON document; _Problem if it is not valid JSON."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise _Problem(f"not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    except RecursionError:
        raise _Problem("not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # e.g. an integer with thousands of digits
        raise _Problem(f"not valid JSON ({_clip(str(exc))})") from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """`json.loads` hook: an object, refusing a key given twice (JSON would silently keep the last)."""
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise _Problem(f"key {_show(key)} appears twice in one object")
        data[key] = value
    return data


def _plan_fields(data: Any) -> dict[str, Any]:
    """The PlacementPlan keyword arguments of a parsed document, every key checked; _Problem otherwise."""
    if not isinstance(data, dict):
        raise _Problem(f"the document must be a JSON object, not {_describe(data)}")
    _check_keys(data)
    fields_ = {name: _integer(name, data[name], low) for name, low in _INTEGERS.items() if name in data}
    fields_["device"] = _device(data["device"])
    fields_.update({name: _choice(name, data[name], options) for name, options in _CHOICES.items() if name in data})
    if "warnings" in data:
        fields_["warnings"] = _strings("warnings", data["warnings"])
    if "gpu_experts" in data:
        fields_["gpu_experts"] = _gpu_experts(data["gpu_experts"], fields_["n_layers"], fields_["n_experts"])
    return fields_


def _check_keys(data: dict[str, Any]) -> None:
    """The version is this one (first: another version may have other keys); no required key is missing and
    no unknown key is present."""
    if "version" not in data:
        raise _Problem('missing key "version"')
    version = data["version"]
    if type(version) is not int or version != PLAN_VERSION:
        raise _Problem(f"unsupported plan version {_describe(version)} (expected {PLAN_VERSION})")
    known = {f.name for f in fields(PlacementPlan)}
    required = [f.name for f in fields(PlacementPlan) if f.default is MISSING and f.default_factory is MISSING]
    missing = [name for name in required if name not in data]
    if missing:
        raise _Problem(f"missing key {_show(missing[0])}")
    unknown = sorted(set(data) - known - {"version"})
    if unknown:
        raise _Problem(f"unknown key {_show(unknown[0])}")


def _integer(key: str, value: Any, low: int) -> int:
    if type(value) is not int or value < low:
        raise _Problem(f"{key} must be an integer >= {low}, not {_describe(value)}")
    return value


def _device(value: Any) -> str:
    if not isinstance(value, str) or not is_valid_device(value):
        raise _Problem(f"device must be cpu or cuda:N, not {_describe(value)}")
    return value


def _choice(key: str, value: Any, options: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in options:
        raise _Problem(f"{key} must be one of {', '.join(options)}, not {_describe(value)}")
    return value


def _strings(key: str, value: Any) -> list[str]:
    if not isinstance(value, list):
        raise _Problem(f"{key} must be a list of strings, not {_describe(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise _Problem(f"{key}[{i}] must be a string, not {_describe(item)}")
    return list(value)


def _gpu_experts(value: Any, n_layers: int, n_experts: int) -> dict[int, list[int]]:
    """{"layer": [expert ids]} -> {layer: ids}: layers below n_layers, distinct ids below n_experts."""
    if not isinstance(value, dict):
        raise _Problem(f'gpu_experts must be an object {{"layer": [expert ids]}}, not {_describe(value)}')
    out: dict[int, list[int]] = {}
    for key, ids in value.items():
        layer = int(key) if key.isascii() and key.isdigit() and len(key) <= 18 else -1
        if not 0 <= layer < n_layers:
            raise _Problem(f"gpu_experts key {_show(key)} must be a layer number below n_layers ({n_layers})")
        if layer in out:
            raise _Problem(f"gpu_experts names layer {layer} twice")
        out[layer] = _expert_ids(f"gpu_experts[{_show(key)}]", ids, n_experts)
    return out


def _expert_ids(where: str, ids: Any, n_experts: int) -> list[int]:
    if not isinstance(ids, list):
        raise _Problem(f"{where} must be a list of expert ids, not {_describe(ids)}")
    for i, e in enumerate(ids):
        if type(e) is not int or not 0 <= e < n_experts:
            raise _Problem(f"{where}[{i}] must be an expert id in 0..{n_experts - 1} (n_experts), not {_describe(e)}")
    if len(set(ids)) != len(ids):
        raise _Problem(f"{where} lists an expert twice")
    return list(ids)


def _describe(value: Any) -> str:
    """A JSON value in a few words, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    return _show(value)


def _show(value: Any) -> str:
    """A string or number as JSON, shortened to fit in one line."""
    return _clip(json.dumps(value))


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_valid_device(device: str) -> bool:
    """Whether `device` is "cpu", "cuda" or "cuda:N" (what plans and --device accept)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
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
    per_token = ModelCache.bytes_per_token(args, 2, CacheLayout.official(args))  # the compact pools
    kv = int(per_token * context) + args.n_layers * args.window_size * args.head_dim * 2
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
                f"the GPU budget of {human_bytes(gpu_budget_bytes)} cannot hold the dense weights and "
                f"KV cache ({human_bytes(dense + kv + reserve)} with reserve)",
                "lower {opt:ctx}, raise {opt:gpu_memory}, or run on the CPU ({opt:device} cpu)")
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
            f"host experts need {human_bytes(host_needed)} but the CPU budget is "
            f"{human_bytes(cpu_budget_bytes)}: experts are read from the memory-mapped files on demand "
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
