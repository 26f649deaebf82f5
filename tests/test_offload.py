"""The offload runtime with the CPU standing in for the device: every path, exact results, cache accounting."""

from __future__ import annotations

import torch

from dsv4cli.model.layers import Numerics
from dsv4cli.model.presets import PRESETS
from dsv4cli.runtime.offload import OffloadedExperts, SlotCache
from dsv4cli.runtime.placement import PlacementPlan
from tests.conftest import tiny_model

ARGS = PRESETS["tiny"]


def plan(resident: dict[int, list[int]], slots: int) -> PlacementPlan:
    return PlacementPlan(device="cpu", context=512, dense_bytes=0, kv_cache_bytes=0, expert_bytes=1,
                         n_layers=ARGS.n_layers, n_experts=ARGS.n_routed_experts, gpu_experts=resident,
                         staging_slots=slots)


def ids(seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, ARGS.vocab_size, (1, seq), generator=torch.Generator().manual_seed(seed))


def test_prefill_and_decode_paths_give_the_plain_results():
    model = tiny_model("tiny", Numerics.plain(torch.float32))
    tokens = ids(60)
    with torch.no_grad():
        expected = model.full_logits(tokens)
        offload = OffloadedExperts(model, plan({1: [0, 3], 3: [5]}, slots=6), "cpu", decode_max_tokens=4).attach()
        cache = model.new_cache(1, 60)
        prefill = model(tokens[:, :50], cache, last_only=False)  # 50 tokens: host experts staged into slots
        decode = torch.cat([model(tokens[:, p:p + 1], cache, last_only=False) for p in range(50, 60)], 1)
        offload.detach()
    assert torch.allclose(torch.cat([prefill, decode], 1), expected, atol=1e-4)
    s = offload.stats
    assert s.misses > 0 and s.bytes_moved > 0 and s.cpu_expert_calls > 0 and s.device_expert_calls > 0
    assert s.prefetched > 0


def test_second_prefill_hits_the_slot_cache():
    model = tiny_model("tiny", Numerics.plain(torch.float32))
    offload = OffloadedExperts(model, plan({}, slots=ARGS.n_layers * ARGS.n_routed_experts), "cpu",
                               prefetch=False).attach()
    with torch.no_grad():
        model.full_logits(ids(40))
        first = (offload.stats.hits, offload.stats.misses)
        model.full_logits(ids(40))
    offload.detach()
    assert first[0] == 0 and first[1] > 0
    assert offload.stats.misses == first[1] and offload.stats.hits == first[1]
    assert offload.stats.hit_rate == 0.5


def test_lru_and_lfu_eviction():
    host = (torch.zeros(4),)
    lru = SlotCache(2, torch.device("cpu"), "lru")
    lru.put((0, 1), host, set())
    lru.put((0, 2), host, set())
    lru.get((0, 1))
    lru.put((0, 3), host, set())  # evicts (0, 2): least recently used
    assert set(lru.entries) == {(0, 1), (0, 3)}
    lfu = SlotCache(2, torch.device("cpu"), "lfu")
    lfu.put((0, 1), host, set())
    lfu.put((0, 2), host, set())
    for _ in range(3):
        lfu.get((0, 2))
    lfu.put((0, 3), host, set())  # evicts (0, 1): least frequently used
    assert set(lfu.entries) == {(0, 2), (0, 3)}
    lfu.put((0, 4), host, keep={(0, 2)})  # (0, 2) is needed by this step: (0, 3) goes
    assert set(lfu.entries) == {(0, 2), (0, 4)}


def test_engine_reports_the_hit_rate():
    from dsv4cli.engine.engine import Engine
    from dsv4cli.engine.events import GenerationStats

    model = tiny_model("tiny", Numerics.plain(torch.float32))
    OffloadedExperts(model, plan({}, slots=8), "cpu", decode_max_tokens=2).attach()
    try:
        events = list(Engine(model, 128).generate(ids(30)[0].tolist(), max_tokens=3))
    finally:
        model.routed_experts.detach()
    stats = events[-1]
    assert isinstance(stats, GenerationStats) and stats.expert_cache_hit_rate is not None


def test_mru_keeps_earlier_layers_when_a_pass_needs_more_than_the_slots():
    """Layers visited in a cycle, each needing 3 host experts, 4 slots: LRU never hits, MRU does."""
    host = (torch.zeros(4),)

    def hits(policy: str) -> int:
        cache, count = SlotCache(4, torch.device("cpu"), policy), 0
        for _ in range(4):  # four prefill passes
            for layer in range(3):
                keep: set = set()
                for e in range(3):
                    if cache.get((layer, e)) is not None:
                        count += 1
                    else:
                        cache.put((layer, e), host, keep)
                    keep.add((layer, e))
        return count

    assert hits("lru") == 0
    assert hits("mru") == 5  # of 36 lookups; LRU evicts exactly what the next pass needs first


def test_plan_cache_policy_round_trip_and_validation():
    import pytest

    from dsv4cli.errors import UsageError

    saved = plan({}, 2)
    saved.cache_policy = "mru"
    assert PlacementPlan.from_json(saved.to_json()).cache_policy == "mru"
    saved.cache_policy = "fifo"
    with pytest.raises(UsageError, match="cache_policy must be one of"):
        PlacementPlan.from_json(saved.to_json())
