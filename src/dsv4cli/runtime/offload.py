"""Routed experts split between a fast device and host memory, per a `PlacementPlan`.

Per MoE layer and step, each selected expert runs where it is cheapest:

* resident experts (the plan's hot set) always run on the device;
* host experts run on the CPU for small batches (decode: moving an expert costs more than
  computing one token with it), or are copied into a fixed pool of device slots for large
  batches (prefill: the copy is amortised over many tokens). The slot pool is an LRU or LFU
  cache keyed by (layer, expert); after each layer the next layer's likely experts (its
  router applied to this layer's input) are prefetched into slots.

Hits, misses and bytes moved are counted. The device may be the CPU itself (no GPU): then a
"copy" to the device is the same tensor (`.to("cpu")` is a no-op) while the cache decisions and
the bytes a GPU would move are counted as for a GPU; this is how CI exercises every path.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from dsv4cli import kernels
from dsv4cli.kernels.experts import ExpertTable
from dsv4cli.model.transformer import Transformer
from dsv4cli.runtime.placement import CACHE_POLICIES, PlacementPlan

ExpertKey = tuple[int, int]  # (layer, expert)


@dataclass
class OffloadStats:
    hits: int = 0  # host experts found in a device slot
    misses: int = 0  # host experts not in a slot (copied into one, or run on the CPU when the slots are full)
    bytes_moved: int = 0  # host -> device bytes
    cpu_expert_calls: int = 0  # (layer, expert) evaluations on the CPU
    device_expert_calls: int = 0
    prefetched: int = 0

    @property
    def hit_rate(self) -> float | None:
        looked_up = self.hits + self.misses
        return self.hits / looked_up if looked_up else None


class SlotCache:
    """`n_slots` device copies of host experts with LRU, LFU or MRU eviction.

    MRU suits prefills that need more host experts per pass than there are slots: layers are
    visited in a cycle, and LRU then evicts exactly what the next pass needs first (no hits at
    all), while MRU keeps the earlier layers' experts in place for the next chunk."""

    def __init__(self, n_slots: int, device: torch.device, policy: str = "lru"):
        if policy not in CACHE_POLICIES:
            raise ValueError(f"unknown cache policy {policy!r}")
        self.n_slots, self.device, self.policy = n_slots, device, policy
        self.entries: OrderedDict[ExpertKey, tuple[torch.Tensor, ...]] = OrderedDict()
        self.uses: dict[ExpertKey, int] = {}

    def get(self, key: ExpertKey) -> tuple[torch.Tensor, ...] | None:
        tensors = self.entries.get(key)
        if tensors is not None:
            self.entries.move_to_end(key)
            self.uses[key] = self.uses.get(key, 0) + 1
        return tensors

    def put(self, key: ExpertKey, host: tuple[torch.Tensor, ...], keep: set[ExpertKey]) -> tuple[torch.Tensor, ...]:
        """Copy `host` tensors into a slot (evicting one not in `keep`); returns the device tensors."""
        if len(self.entries) >= self.n_slots:
            victims = [k for k in self.entries if k not in keep]
            if not victims:
                raise RuntimeError("every slot is in use by the current step")
            if self.policy == "lfu":
                victim = min(victims, key=lambda k: self.uses.get(k, 0))
            else:
                victim = victims[-1] if self.policy == "mru" else victims[0]
            del self.entries[victim]
        copied = tuple(t.to(self.device, non_blocking=True) for t in host)
        self.entries[key] = copied
        self.uses[key] = self.uses.get(key, 0) + 1
        return copied


class OffloadedExperts:
    """Runs every MoE layer of `model` under `plan`; attach with `attach()`, detach with `detach()`."""

    def __init__(self, model: Transformer, plan: PlacementPlan, device: torch.device | str,
                 decode_max_tokens: int = 8, policy: str = "lru", prefetch: bool = True):
        self.model, self.plan, self.device = model, plan, torch.device(device)
        self.decode_max_tokens, self.prefetch = decode_max_tokens, prefetch
        self.stats = OffloadStats()
        self.slots = SlotCache(plan.staging_slots, self.device, policy)
        self.host: list[list[tuple[torch.Tensor, ...]]] = []
        self.host_tables: list[ExpertTable] = []  # every expert of a layer, host memory, global ids
        self.resident: list[dict[int, tuple[torch.Tensor, ...]]] = []
        self.resident_tables: list[ExpertTable | None] = []  # the resident experts, ids in sorted order
        for layer_id, layer in enumerate(model.layers):
            table = layer.ffn.expert_table()
            self.host.append(list(table.experts))
            self.host_tables.append(table)
            resident = {e: tuple(t.to(self.device) for t in table.experts[e])
                        for e in sorted(plan.gpu_experts.get(layer_id, []))}
            self.resident.append(resident)
            self.resident_tables.append(ExpertTable.from_experts(list(resident.values())) if resident else None)

    def attach(self) -> OffloadedExperts:
        self.model.use_routed_experts(self)
        return self

    def detach(self) -> None:
        if self.model.routed_experts is self:
            self.model.use_routed_experts(None)

    # ------------------------------------------------------------------ step
    def run(self, layer_id: int, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor
                  ) -> torch.Tensor:
        """Sum of the selected experts' outputs for one layer, float32 [N, D] on x's device."""
        selected = sorted(set(indices.flatten().tolist()))
        resident = self.resident[layer_id]
        on_device = {e: resident[e] for e in selected if e in resident}
        host_ids = [e for e in selected if e not in resident]
        staged = {}
        if x.shape[0] > self.decode_max_tokens and self.slots.n_slots > 0:
            staged = self._stage(layer_id, host_ids)
        # decode, or more host experts than slots: the rest runs on the CPU
        on_cpu = [e for e in host_ids if e not in staged]
        # the CPU half's inputs are copied out first, so that the CPU computes while the device
        # half is in flight (CUDA kernels are asynchronous; a later device->host copy would wait)
        cpu_part = self._gather(x, weights, indices, on_cpu, None, torch.device("cpu"))
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        if staged:  # a one-off table of resident + staged experts
            on_device.update(staged)
            ids = sorted(on_device)
            self._run(out, self._gather(x, weights, indices, ids, ids, self.device),
                      ExpertTable.from_experts([on_device[e] for e in ids]))
        elif on_device:
            self._run(out, self._gather(x, weights, indices, sorted(on_device), sorted(resident), self.device),
                      self.resident_tables[layer_id])
        self._run(out, cpu_part, self.host_tables[layer_id])
        self.stats.device_expert_calls += len(on_device)
        self.stats.cpu_expert_calls += len(on_cpu)
        if self.prefetch and x.shape[0] > self.decode_max_tokens:
            self._prefetch_next(layer_id, x)
        return out

    def _stage(self, layer_id: int, expert_ids: list[int]) -> dict[int, tuple[torch.Tensor, ...]]:
        """Device copies of as many of `expert_ids` as the slots hold (hits first, then copies)."""
        staged: dict[int, tuple[torch.Tensor, ...]] = {}
        for e in expert_ids:
            tensors = self.slots.get((layer_id, e))
            if tensors is not None:
                self.stats.hits += 1
                staged[e] = tensors
        for e in expert_ids:
            if e in staged:
                continue
            self.stats.misses += 1  # also when the slots are full: then it runs on the CPU instead
            if len(staged) >= self.slots.n_slots:
                continue
            host = self.host[layer_id][e]
            staged[e] = self.slots.put((layer_id, e), host, keep={(layer_id, k) for k in staged})
            self.stats.bytes_moved += sum(t.numel() * t.element_size() for t in host)
        return staged

    def _prefetch_next(self, layer_id: int, x: torch.Tensor) -> None:
        """Copy the experts the next layer's router would pick for `x` into free or stale slots."""
        if layer_id + 1 >= len(self.model.layers):
            return
        gate = self.model.layers[layer_id + 1].ffn.gate
        if gate.is_hash:
            return
        scores = gate.scores(x) + gate.bias.float()
        likely = torch.topk(scores, gate.args.n_activated_experts, dim=-1).indices.flatten().tolist()
        resident = self.resident[layer_id + 1]
        wanted = [e for e in dict.fromkeys(likely) if e not in resident][: self.slots.n_slots // 2]
        fetched: set[ExpertKey] = set()  # kept: MRU eviction would otherwise evict the previous prefetch
        for e in wanted:
            key = (layer_id + 1, e)
            fetched.add(key)
            if key not in self.slots.entries:
                self.slots.put(key, self.host[layer_id + 1][e], keep=fetched)
                self.stats.bytes_moved += sum(t.numel() * t.element_size() for t in self.host[layer_id + 1][e])
                self.stats.prefetched += 1

    @staticmethod
    def _gather(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, expert_ids: list[int],
                table_ids: list[int] | None, device: torch.device) -> tuple[torch.Tensor, ...] | None:
        """(token rows, inputs, route weights, table entries) on `device` of the (token, expert) pairs whose
        expert is in `expert_ids`; table entry i is expert `table_ids[i]` (None: expert i)."""
        if not expert_ids:
            return None
        wanted = torch.tensor(expert_ids, device=indices.device)
        token, slot = torch.where(torch.isin(indices, wanted))
        chosen = indices[token, slot]
        if table_ids is not None:
            chosen = torch.searchsorted(torch.tensor(table_ids, device=indices.device), chosen)
        return token, x[token].to(device), weights[token, slot, None].to(device), chosen[:, None].to(device)

    def _run(self, out: torch.Tensor, part: tuple[torch.Tensor, ...] | None, table: ExpertTable) -> None:
        """out += the experts' outputs for one gathered part."""
        if part is None:
            return
        token, xs, ws, entries = part
        moe = self.model.layers[0].ffn.experts[0]
        y = kernels.moe_experts(xs, ws, entries, table, moe.swiglu_limit, moe.w1.act_quant)
        out.index_add_(0, token, y.to(out.device))
