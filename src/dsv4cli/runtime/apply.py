"""Carry out a `PlacementPlan` on a loaded model: dense weights to the plan's device, routed
experts split between that device and host memory by the offload runtime.

The model comes from `load_model` on the CPU (memory-mapped weights). Dense tensors of the
trunk (attention, norms, routers, shared experts, embedding, head, mHC) are copied to the
device; routed experts stay where they are (host RAM or the mapped files) and the
`OffloadedExperts` runtime copies the plan's resident set to the device and runs the rest.
A plan whose device is "cpu" but that names resident experts or staging slots runs the same
machinery with host memory standing in for the GPU (`dsv4 plan --simulate`): the cache decisions
and the bytes a GPU would move are counted for real; the copies themselves are no-ops (the tensors
already live in host memory), so speeds exclude copy costs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dsv4cli.errors import OutOfMemory, UsageError
from dsv4cli.model.transformer import Transformer
from dsv4cli.runtime.offload import OffloadedExperts
from dsv4cli.runtime.options import PlacementOptions, available_ram_bytes, resolve_plan
from dsv4cli.runtime.placement import PlacementPlan
from dsv4cli.units import human_bytes


def is_routed_expert(name: str) -> bool:
    """Whether parameter `name` belongs to a routed expert of the trunk ('layers.3.ffn.experts.7.w1.weight')."""
    return name.startswith("layers.") and ".ffn.experts." in name


def check_plan(model: Transformer, plan: PlacementPlan) -> None:
    """The plan was made for this model's shape and names a device this machine has."""
    args = model.args
    if (plan.n_layers, plan.n_experts) != (args.n_layers, args.n_routed_experts):
        raise UsageError(f"the placement plan is for {plan.n_layers} layers x {plan.n_experts} experts, the model has "
                         f"{args.n_layers} x {args.n_routed_experts}", "make a plan for this model with `dsv4 plan`")
    bad = [(layer, e) for layer, ids in plan.gpu_experts.items() for e in ids
           if not 0 <= layer < args.n_layers or not 0 <= e < args.n_routed_experts]
    if bad:
        raise UsageError(f"the placement plan names experts the model does not have, e.g. layer {bad[0][0]} "
                         f"expert {bad[0][1]}", "make a plan for this model with `dsv4 plan`")
    device = torch.device(plan.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"the placement plan puts weights on {plan.device} but no CUDA GPU is visible",
                             "re-plan with {opt:plan_on_cpu}, or check the driver (nvidia-smi)")
        if (device.index or 0) >= torch.cuda.device_count():
            raise UsageError(f"the placement plan names {plan.device}; this machine has "
                             f"{torch.cuda.device_count()} GPU(s)", "re-plan with `dsv4 plan`")
    elif device.type != "cpu":
        raise UsageError(f"unsupported device {plan.device!r} in the placement plan", "use cpu or cuda:N")


def move_dense(model: Transformer, device: torch.device | str) -> int:
    """Copy every trunk tensor except the routed experts to `device`; returns the bytes moved.

    The MTP block stays where it is: generation does not run it (it is for speculative decoding).
    """
    device = torch.device(device)
    moved = 0
    for name, param in list(model.named_parameters()):
        if is_routed_expert(name) or name.startswith("mtp.") or param.device == device:
            continue
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        setattr(owner, leaf, nn.Parameter(param.detach().to(device), requires_grad=False))
        moved += param.numel() * param.element_size()
    return moved


def place_model(model: Transformer, plan: PlacementPlan, *, prefetch: bool = True) -> OffloadedExperts | None:
    """Apply `plan` to `model` (loaded on the CPU). Returns the attached offload runtime, or None
    when the plan keeps everything in host memory (plain CPU execution: nothing to do)."""
    check_plan(model, plan)
    device = torch.device(plan.device)
    if device.type == "cpu" and not plan.gpu_experts and not plan.staging_slots:
        return None
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)  # Triton launches on the current device
        move_dense(model, device)
        return OffloadedExperts(model, plan, device, policy=plan.cache_policy, prefetch=prefetch).attach()
    except torch.OutOfMemoryError:
        raise OutOfMemory(f"{plan.device} ran out of memory while placing the model "
                          f"({plan.n_gpu_experts} resident experts, {plan.staging_slots} staging slots)",
                          "lower {opt:gpu_memory} or {opt:ctx} (other processes may be using the GPU)") from None


@dataclass
class Placement:
    """What `place_by_options` did: the plan (None: plain CPU run), the attached runtime, warnings."""

    plan: PlacementPlan | None = None
    offload: OffloadedExperts | None = None
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str | None:
        return self.plan.summary() if self.offload is not None else None

    def detach(self) -> None:
        if self.offload is not None:
            self.offload.detach()


def place_by_options(model: Transformer, options: PlacementOptions, context: int, model_dir: Path) -> Placement:
    """Place `model` as the flags say; without flags, on the GPU when one is visible, else on the
    CPU, reading the memory-mapped files (warned about when they exceed the available RAM)."""
    placement = Placement()
    if options.given or torch.cuda.is_available():
        placement.plan = resolve_plan(model.args, options, context)
        if placement.plan.context < context:
            raise UsageError(f"the placement plan budgets the KV cache for {placement.plan.context:,} tokens, "
                             f"{{opt:ctx}} asks for {context:,}",
                             f"re-plan with `dsv4 plan {{opt:ctx}} {context}`, or lower {{opt:ctx}}")
        placement.warnings.extend(placement.plan.warnings)
        placement.offload = place_model(model, placement.plan)
    already_warned = placement.plan is not None and placement.plan.host_mode == "mmap"
    if placement.offload is None and not already_warned:
        weights = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
        ram = available_ram_bytes()
        if weights > ram:
            placement.warnings.append(
                f"the weights ({human_bytes(weights)}) exceed the available RAM ({human_bytes(ram)}): they are "
                "read from the memory-mapped files on demand, so speed is limited by the disk")
    return placement
