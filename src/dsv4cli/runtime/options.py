"""From the user's placement flags (`--device`, `--gpu-memory`, `--cpu-memory`, `--plan`, `--counts`,
`--simulate`) to a `PlacementPlan`, the same way for `dsv4 plan`, `dsv4 chat` and `dsv4 bench`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from dsv4cli.errors import UsageError
from dsv4cli.model.args import ModelArgs
from dsv4cli.runtime.placement import PlacementPlan, frequencies_from_counts, is_valid_device, plan_placement
from dsv4cli.units import parse_memory


def available_ram_bytes() -> int:
    """MemAvailable from /proc/meminfo (what the kernel can give without swapping)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def free_gpu_bytes(device: str | None = None) -> tuple[str, int]:
    """(device, free bytes) of `device` (default: the first GPU), or ("cpu", 0) without a GPU."""
    import torch

    if not torch.cuda.is_available():
        return "cpu", 0
    device = device or "cuda:0"
    free, _total = torch.cuda.mem_get_info(torch.device(device))
    return device, int(free)


@dataclass(frozen=True)
class PlacementOptions:
    """The placement flags as given (None = not given)."""

    device: str | None = None
    gpu_memory: str | None = None
    cpu_memory: str | None = None
    plan: Path | None = None
    counts: Path | None = None
    simulate: bool = False  # plan as if host memory were a GPU of --gpu-memory bytes
    cache_policy: str = "mru"  # staging-slot eviction (lru, lfu, mru)

    @property
    def planning_flags_given(self) -> bool:
        """Any flag that computes a plan (the alternative to --plan)."""
        return self.simulate or any(v is not None for v in (self.device, self.gpu_memory, self.cpu_memory,
                                                             self.counts))

    @property
    def given(self) -> bool:
        return self.plan is not None or self.planning_flags_given

    @property
    def cpu_only(self) -> bool:
        """Whether the model will run on the CPU alone: --device cpu, or no placement flags and no GPU."""
        import torch

        return self.device == "cpu" or (not self.given and not torch.cuda.is_available())


def resolve_plan(args: ModelArgs, options: PlacementOptions, context: int,
                 routing_counts: dict[int, list[int]] | None = None, calculation: bool = False) -> PlacementPlan:
    """The plan the flags ask for: a saved one (`--plan`), or one computed from the budgets
    (defaults: the first GPU's free memory when there is a GPU, the available RAM).

    `calculation` (`dsv4 plan`): nothing will run here, so `--gpu-memory` without a visible GPU plans for a
    GPU of that size (cuda:0) instead of being refused."""
    if options.plan is not None:
        if options.planning_flags_given:
            raise UsageError("{opt:plan} already says where everything goes",
                             "drop {opt:device}/{opt:gpu_memory}/{opt:cpu_memory}/{opt:counts}/{opt:simulate}, "
                             "or drop {opt:plan}")
        return PlacementPlan.load(options.plan)
    if options.device is not None and not is_valid_device(options.device):
        raise UsageError(f"{{opt:device}} must be cpu or cuda:N, not {options.device!r}")
    detected, free_gpu = free_gpu_bytes(None if options.device in (None, "cpu") else options.device)
    if options.simulate:
        if options.device not in (None, "cpu"):
            raise UsageError("{opt:simulate} plans for the CPU standing in for a GPU",
                             "drop {opt:device} or use {opt:device} cpu")
        if options.gpu_memory is None:
            raise UsageError("{opt:simulate} needs {opt:gpu_memory} (the size of the pretend GPU)")
        device = "cpu"
    else:
        device = options.device or detected
        if calculation and options.device is None and device == "cpu" and options.gpu_memory is not None:
            device = "cuda:0"
    if device == "cpu" and options.gpu_memory is not None and not options.simulate:
        raise UsageError("{opt:gpu_memory} needs a GPU and none is visible here (or {opt:device} cpu was given)",
                         "add {opt:device} cuda:N to plan for a GPU machine, or {opt:simulate} to let host memory "
                         "stand in for a GPU")
    gpu_budget = parse_memory(options.gpu_memory, "gpu_memory") if options.gpu_memory else free_gpu
    if device != "cpu" and gpu_budget == 0:
        raise UsageError(f"{{opt:device}} {device}, but no CUDA GPU is visible here",
                         "pass {opt:gpu_memory} to plan for another machine, or use {opt:device} cpu")
    cpu_budget = parse_memory(options.cpu_memory, "cpu_memory") if options.cpu_memory else available_ram_bytes()
    if routing_counts is None and options.counts is not None:
        from dsv4cli.runtime.profiling import load_counts

        routing_counts = load_counts(options.counts)
    return plan_placement(args, device=device, gpu_budget_bytes=gpu_budget, cpu_budget_bytes=cpu_budget,
                          context=context, accelerated=device != "cpu" or options.simulate,
                          cache_policy=options.cache_policy,
                          frequencies=frequencies_from_counts(routing_counts) if routing_counts else None)
