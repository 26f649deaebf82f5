"""Placement plans: budgets, hot-expert choice, mmap fallback, save/load."""

from __future__ import annotations

import pytest

from dsv4cli.errors import OutOfMemory, UsageError
from dsv4cli.model.presets import PRESETS
from dsv4cli.runtime.placement import GPU_RESERVE_BYTES, PlacementPlan, model_bytes, plan_placement

FLASH = PRESETS["flash"]
GIB = 1 << 30


def test_flash_sizes():
    dense, expert = model_bytes(FLASH)
    assert expert == 3 * (2048 * 2048 + 2048 * 128) + 0  # w1, w3 packed + scales, w2 the same size
    assert round(dense / 1e9, 1) == 8.8  # everything but routed experts, without MTP
    assert round(expert * 256 * 43 / 1e9, 1) == 147.2


def test_cpu_only_plan_keeps_everything_in_ram_when_it_fits():
    plan = plan_placement(FLASH, cpu_budget_bytes=200 * GIB, context=32768)
    assert plan.device == "cpu" and plan.n_gpu_experts == 0 and plan.host_mode == "ram" and not plan.warnings


def test_short_ram_falls_back_to_mmap_and_says_so():
    plan = plan_placement(FLASH, cpu_budget_bytes=64 * GIB)
    assert plan.host_mode == "mmap" and "memory-mapped" in plan.warnings[0]


def test_gpu_plan_fills_the_budget_with_the_hottest_experts():
    dense, expert = model_bytes(FLASH)
    freq = {layer: [0.0] * 256 for layer in range(43)}
    freq[5][17] = 0.9
    freq[40][200] = 0.8
    plan = plan_placement(FLASH, device="cuda:0", gpu_budget_bytes=24 * GIB, cpu_budget_bytes=256 * GIB,
                          context=8192, frequencies=freq)
    used = dense + plan.kv_cache_bytes + GPU_RESERVE_BYTES + (plan.n_gpu_experts + plan.staging_slots) * expert
    assert used <= 24 * GIB and 24 * GIB - used < expert
    assert plan.is_on_gpu(5, 17) and plan.is_on_gpu(40, 200)
    assert plan.n_gpu_experts + plan.n_host_experts == 43 * 256
    assert plan.staging_slots == 32


def test_uniform_spread_without_frequencies():
    plan = plan_placement(FLASH, device="cuda:0", gpu_budget_bytes=40 * GIB, context=8192)
    counts = [len(plan.gpu_experts.get(layer, [])) for layer in range(43)]
    assert max(counts) - min(counts) <= 1


def test_gpu_too_small_is_a_clear_error():
    with pytest.raises(OutOfMemory, match="cannot hold the dense weights"):
        plan_placement(FLASH, device="cuda:0", gpu_budget_bytes=8 * GIB)


def test_plan_round_trips_through_json(tmp_path):
    plan = plan_placement(FLASH, device="cuda:0", gpu_budget_bytes=30 * GIB, context=8192)
    plan.save(tmp_path / "plan.json")
    assert PlacementPlan.load(tmp_path / "plan.json") == plan
    (tmp_path / "bad.json").write_text('{"version": 99}')
    with pytest.raises(UsageError, match="version"):
        PlacementPlan.load(tmp_path / "bad.json")
    with pytest.raises(UsageError, match="cannot read"):
        PlacementPlan.load(tmp_path / "missing.json")
    assert any("routed experts on the GPU" in row[0] for row in plan.rows())


def test_routing_counts_feed_the_plan(tmp_path):
    import torch

    from dsv4cli.model.layers import Numerics
    from dsv4cli.runtime.placement import frequencies_from_counts
    from dsv4cli.runtime.profiling import count_routes, load_counts, save_counts
    from tests.conftest import tiny_model

    model = tiny_model("tiny", Numerics.plain(torch.float32))
    counts = count_routes(model, [[5, 6, 7, 8, 9], list(range(10, 40))])
    args = PRESETS["tiny"]
    assert set(counts) == set(range(args.n_layers))
    assert all(sum(row) == 35 * args.n_activated_experts for row in counts.values())
    assert all(layer.ffn.gate._observer is None for layer in model.layers)  # counting switched off again
    assert load_counts(save_counts(counts, tmp_path / "c.json")) == counts
    freq = frequencies_from_counts(counts)
    hottest = min(((-f, layer, e) for layer, row in freq.items() for e, f in enumerate(row)))[1:]
    _, expert = model_bytes(args)
    roomy = plan_placement(args, device="cuda:0", context=64, gpu_budget_bytes=1 << 40, staging_slots=0)
    exactly_one = roomy.dense_bytes + roomy.kv_cache_bytes + GPU_RESERVE_BYTES + expert
    plan = plan_placement(args, device="cuda:0", context=64, frequencies=freq, gpu_budget_bytes=exactly_one,
                          staging_slots=0)
    assert plan.gpu_experts == {hottest[0]: [hottest[1]]}


def test_plan_command_json(tmp_path):
    import json

    from tests.test_cli import dsv4

    result = dsv4("plan", "flash", "--device", "cuda:0", "--gpu-memory", "24GB", "--cpu-memory", "192GB",
                  "--ctx", "65536", "--json", "--save", str(tmp_path / "p.json"))
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["device"] == "cuda:0" and data["staging_slots"] == 32 and data["host_mode"] == "ram"
    assert PlacementPlan.load(tmp_path / "p.json").to_json() == json.dumps(data, indent=2)
    bad = dsv4("plan", "flash", "--device", "tpu")
    assert bad.returncode == 2 and "--device" in bad.stderr
