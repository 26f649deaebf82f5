"""Placement plans carried out on a loaded model: dense weights moved, experts split, flags resolved,
and the plan reaching `dsv4 chat` and `dsv4 bench` (host memory standing in for the GPU)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from dsv4cli.bench import run as bench
from dsv4cli.bench.run import BenchSettings, render_markdown, run_bench
from dsv4cli.engine.engine import Engine
from dsv4cli.engine.events import GenerationStats
from dsv4cli.engine.sampling import SamplingParams
from dsv4cli.errors import OutOfMemory, UsageError
from dsv4cli.model.layers import Numerics
from dsv4cli.model.moe import RoutedExperts
from dsv4cli.model.presets import PRESETS
from dsv4cli.runtime import apply, options
from dsv4cli.runtime.apply import check_plan, is_routed_expert, move_dense, place_by_options, place_model
from dsv4cli.runtime.loader import load_model
from dsv4cli.runtime.options import PlacementOptions, resolve_plan
from dsv4cli.runtime.placement import PlacementPlan, plan_placement
from tests.conftest import tiny_model

ARGS = PRESETS["tiny"]
MB = 10**6
GREEDY = SamplingParams(temperature=0.0)


def sim_plan(resident: dict[int, list[int]], slots: int, device: str = "cpu", **shape) -> PlacementPlan:
    return PlacementPlan(device=device, context=256, dense_bytes=0, kv_cache_bytes=0, expert_bytes=1,
                         n_layers=shape.get("n_layers", ARGS.n_layers), n_experts=shape.get("n_experts",
                                                                                            ARGS.n_routed_experts),
                         gpu_experts=resident, staging_slots=slots)


def token_ids(seq: int) -> list[int]:
    return torch.randint(0, ARGS.vocab_size, (seq,), generator=torch.Generator().manual_seed(7)).tolist()


def final_stats(events) -> GenerationStats:
    return list(events)[-1]


# ------------------------------------------------------------------ place_model


def test_placed_model_generates_what_the_plain_model_generates():
    plain = tiny_model("tiny", Numerics.plain(torch.float32))
    placed = tiny_model("tiny", Numerics.plain(torch.float32))
    offload = place_model(placed, sim_plan({0: [1, 2], 2: [0]}, slots=5))
    assert offload is not None and placed.routed_experts is offload and isinstance(offload, RoutedExperts)
    prompt = token_ids(40)
    with torch.no_grad():
        expected = [e.token_id for e in Engine(plain, 128).generate(prompt, GREEDY, max_tokens=6)
                    if hasattr(e, "token_id")]
        events = list(Engine(placed, 128).generate(prompt, GREEDY, max_tokens=6))
    assert [e.token_id for e in events[:-1]] == expected
    stats = events[-1]
    assert stats.expert_bytes_moved > 0  # the 40-token prefill staged host experts into slots
    assert stats.expert_cache_hit_rate is not None
    offload.detach()
    assert placed.routed_experts is None and all(layer.ffn._routed is None for layer in placed.layers)


def test_engine_reports_offload_counts_per_call():
    model = tiny_model("tiny", Numerics.plain(torch.float32))
    offload = place_model(model, sim_plan({}, slots=ARGS.n_layers * ARGS.n_routed_experts))
    engine = Engine(model, 128)
    prompt = token_ids(30)
    with torch.no_grad():
        first = final_stats(engine.generate(prompt, max_tokens=1))
        engine.reset()
        second = final_stats(engine.generate(prompt, max_tokens=1))
    offload.detach()
    assert first.expert_cache_hit_rate < 1.0 and first.expert_bytes_moved > 0
    # the same prompt again: every staged expert is still in its slot
    assert second.expert_cache_hit_rate == 1.0 and second.expert_bytes_moved == 0


def test_cpu_plan_without_device_experts_is_a_plain_run():
    model = tiny_model("tiny", Numerics.plain(torch.float32))
    assert place_model(model, sim_plan({}, slots=0)) is None
    assert model.routed_experts is None


def test_move_dense_moves_everything_but_routed_experts_and_mtp():
    model = tiny_model("tiny", Numerics.plain(torch.float32))
    moved = move_dense(model, "meta")
    assert moved > 0
    for name, param in model.named_parameters():
        stays = is_routed_expert(name) or name.startswith("mtp.")
        assert param.device.type == ("cpu" if stays else "meta"), name
    assert is_routed_expert("layers.3.ffn.experts.7.w1.weight")
    assert not is_routed_expert("layers.3.ffn.shared_experts.w1.weight")
    assert not is_routed_expert("mtp.0.ffn.experts.0.w1.weight")


def test_plans_that_do_not_fit_the_model_or_machine_are_refused():
    model = tiny_model("tiny", Numerics.plain(torch.float32))
    with pytest.raises(UsageError, match="plan is for 4 layers x 16 experts"):
        check_plan(model, sim_plan({}, 1, n_experts=16))
    with pytest.raises(UsageError, match="layer 1 expert 99"):
        check_plan(model, sim_plan({1: [99]}, 1))
    with pytest.raises(UsageError, match="unsupported device"):
        check_plan(model, sim_plan({}, 1, device="mps"))
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA GPU is visible"):
            check_plan(model, sim_plan({}, 1, device="cuda:0"))


def test_device_out_of_memory_is_a_clear_error(monkeypatch):
    model = tiny_model("tiny", Numerics.plain(torch.float32))

    def no_room(*_args, **_kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(apply, "move_dense", no_room)
    with pytest.raises(OutOfMemory, match="ran out of memory while placing") as err:
        place_model(model, sim_plan({0: [1]}, 1))
    from dsv4cli.cli.options import FLAG_NAMES

    assert "--gpu-memory" in err.value.one_line(FLAG_NAMES)


# ------------------------------------------------------------------ flags -> plan


def test_simulated_plan_splits_experts_by_the_pretend_budget():
    dense_and_kv = plan_placement(ARGS, context=256).dense_bytes + plan_placement(ARGS, context=256).kv_cache_bytes
    expert = plan_placement(ARGS, context=256).expert_bytes
    budget = dense_and_kv + 10 * expert
    plan = resolve_plan(ARGS, PlacementOptions(simulate=True, gpu_memory=f"{budget}B"), context=256)
    assert plan.device == "cpu" and plan.staging_slots + plan.n_gpu_experts == 10
    assert plan_placement(ARGS, device="cpu", gpu_budget_bytes=budget, context=256).n_gpu_experts == 0


@pytest.mark.parametrize(("flags", "message"), [
    (dict(simulate=True), "--simulate needs --gpu-memory"),
    (dict(simulate=True, gpu_memory="1GB", device="cuda:0"), "--simulate plans for the CPU"),
    (dict(device="cpu", gpu_memory="1GB"), "--gpu-memory needs a GPU"),
    (dict(device="tpu"), "--device must be cpu or cuda:N"),
    (dict(plan=Path("p.json"), device="cpu"), "--plan already says"),
])
def test_contradictory_flags(flags, message):
    """The library names the settings; rendered with the CLI's names they are the flags."""
    from dsv4cli.cli.options import FLAG_NAMES

    with pytest.raises(UsageError) as caught:
        resolve_plan(ARGS, PlacementOptions(**flags), context=256)
    assert message in caught.value.one_line(FLAG_NAMES)


def test_cuda_without_a_gpu_or_budget(monkeypatch):
    monkeypatch.setattr(options, "free_gpu_bytes", lambda device=None: ("cpu", 0))
    with pytest.raises(UsageError, match="no CUDA GPU is visible"):
        resolve_plan(ARGS, PlacementOptions(device="cuda:0"), context=256)
    planned = resolve_plan(ARGS, PlacementOptions(device="cuda:0", gpu_memory="4GB"), context=256)
    assert planned.device == "cuda:0" and planned.n_gpu_experts > 0  # planning for another machine works


def test_saved_plan_and_routing_counts(tmp_path):
    counts = tmp_path / "counts.json"
    counts.write_text(json.dumps({"routing_counts": {"2": [0, 0, 0, 0, 0, 9, 0, 0]}}))
    expert = plan_placement(ARGS, context=256).expert_bytes
    base = plan_placement(ARGS, context=256)
    budget = base.dense_bytes + base.kv_cache_bytes + 33 * expert  # 32 staging slots + 1 resident
    plan = resolve_plan(ARGS, PlacementOptions(simulate=True, gpu_memory=f"{budget}B", counts=counts), context=256)
    assert plan.gpu_experts == {2: [5]}
    plan.save(tmp_path / "plan.json")
    assert resolve_plan(ARGS, PlacementOptions(plan=tmp_path / "plan.json"), context=1) == plan


def test_weights_larger_than_ram_are_announced(tiny_checkpoint, monkeypatch):
    model, checkpoint = load_model(tiny_checkpoint)
    with checkpoint:
        monkeypatch.setattr(apply, "available_ram_bytes", lambda: 1 * MB)
        placement = place_by_options(model, PlacementOptions(), 256, tiny_checkpoint)
    assert placement.offload is None and placement.summary() is None
    assert any("exceed the available RAM" in w and "memory-mapped" in w for w in placement.warnings)


# ------------------------------------------------------------------ chat and bench


def test_bench_reports_hit_rate_and_bytes_moved(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "synth_root", lambda: tmp_path)
    base = plan_placement(ARGS, context=256)
    plan = sim_plan({1: [0, 1, 2]}, slots=4)
    plan.expert_bytes, plan.dense_bytes = base.expert_bytes, base.dense_bytes
    plan.save(tmp_path / "plan.json")
    settings = BenchSettings(synth="tiny", prompt_tokens=(24,), gen_tokens=(3,), repetitions=1, threads=1,
                             stream_bytes=1 << 20, placement=PlacementOptions(plan=tmp_path / "plan.json"))
    report = run_bench(settings)
    data = report.to_dict()
    assert "host memory standing in for a GPU" in data["model"]["placement"]
    pp, tg = data["results"]
    assert pp["expert_bytes_moved_per_token"] > 0 and pp["expert_cache_hit_rate"] is not None
    assert tg["expert_bytes_moved_per_token"] == 0  # decode computes host experts on the CPU: nothing moves
    assert "experts moved per token" in render_markdown(report)


def test_chat_with_a_simulated_plan(tmp_path):
    from tests.test_cli import dsv4

    env = {f"XDG_{k}_HOME": str(tmp_path / k.lower()) for k in ("CACHE", "STATE", "DATA", "CONFIG")}
    plain = dsv4("chat", "-p", "hi", "--json", "--temperature", "0", "-n", "6", "--ctx", "256", env=env)
    assert plain.returncode == 0, plain.stderr
    saved = tmp_path / "plan.json"
    made = dsv4("plan", str(next(Path(env["XDG_CACHE_HOME"]).glob("dsv4/dsv4-demo-*"))), "--simulate",
                "--gpu-memory", "80MB", "--ctx", "256", "--save", str(saved), env=env)
    assert made.returncode == 0, made.stderr
    placed = dsv4("chat", "-p", "hi", "--json", "--temperature", "0", "-n", "6", "--ctx", "256", "--plan",
                  str(saved), env=env)
    assert placed.returncode == 0, placed.stderr
    assert json.loads(placed.stdout)["content"] == json.loads(plain.stdout)["content"]
    shown = dsv4("chat", "-p", "hi", "--temperature", "0", "-n", "2", "--ctx", "256", "--plan", str(saved), env=env)
    assert "placement: dense weights and KV cache on cpu" in shown.stderr
    wrong = dsv4("chat", "-p", "hi", "--device", "cpu", "--gpu-memory", "1GB", env=env)
    assert wrong.returncode == 2 and wrong.stderr.count("\n") == 1 and "--gpu-memory needs a GPU" in wrong.stderr


def test_offload_runs_quantized_experts(tiny_checkpoint, tmp_path):
    """A `dsv4 quantize` q2 checkpoint (int2 w1/w3, int3 w2 experts) through the offload runtime, native kernels."""
    from dsv4cli import kernels
    from dsv4cli.quant.quantize import quantize_checkpoint
    from dsv4cli.quant.recipes import load_recipe

    kernels.select()
    done = quantize_checkpoint(tiny_checkpoint, tmp_path / "q2", load_recipe("q2")).path
    plain, plain_ckpt = load_model(done)
    placed, placed_ckpt = load_model(done)
    with plain_ckpt, placed_ckpt, torch.no_grad():
        assert placed.args.expert_formats(1) == ("int2", "int3", "int2")
        offload = place_model(placed, sim_plan({1: [0, 5], 3: [2]}, slots=4))
        prompt = token_ids(30)
        expected = [e.token_id for e in Engine(plain, 64).generate(prompt, GREEDY, max_tokens=5)
                    if hasattr(e, "token_id")]
        events = list(Engine(placed, 64).generate(prompt, GREEDY, max_tokens=5))
        offload.detach()
    assert [e.token_id for e in events[:-1]] == expected
    assert events[-1].expert_bytes_moved > 0


# ------------------------------------------------------------------ review fixes


def test_prefetch_keeps_what_it_fetched_under_mru():
    model = tiny_model("tiny", Numerics.plain(torch.float32))
    offload = place_model(model, sim_plan({}, slots=4))
    offload.slots.policy = "mru"
    for e in range(4):  # a full cache of another layer's experts
        offload.slots.put((0, e), offload.host[0][e], keep=set())
    x = torch.randn(12, ARGS.dim)
    offload._prefetch_next(1, x)  # layer 2 is learned-routed
    fetched = [key for key in offload.slots.entries if key[0] == 2]
    offload.detach()
    assert len(fetched) == offload.stats.prefetched == 2  # n_slots // 2, none evicted by the next


def test_host_experts_beyond_the_slots_count_as_misses():
    model = tiny_model("tiny", Numerics.plain(torch.float32))
    offload = place_model(model, sim_plan({}, slots=1))
    with torch.no_grad():
        model.full_logits(torch.tensor([token_ids(40)]))
    offload.detach()
    s = offload.stats
    assert s.misses > s.bytes_moved // max(1, sum(t.numel() * t.element_size() for t in offload.host[0][0]))
    assert s.cpu_expert_calls > 0 and s.hit_rate < 0.5


@pytest.mark.parametrize("device", ["cuda:x", "tpu", "cpu:3"])
def test_malformed_devices_are_usage_errors(device, tmp_path):
    with pytest.raises(UsageError, match="device} must be cpu or cuda:N"):
        resolve_plan(ARGS, PlacementOptions(device=device, gpu_memory="4GB"), context=256)
    saved = sim_plan({}, 1)
    saved.device = device
    (tmp_path / "p.json").write_text(saved.to_json())
    with pytest.raises(UsageError, match="invalid placement plan"):
        PlacementPlan.load(tmp_path / "p.json")


def test_a_plan_for_a_shorter_context_is_refused(tiny_checkpoint, tmp_path):
    saved = sim_plan({}, 2)
    saved.save(tmp_path / "p.json")
    model, checkpoint = load_model(tiny_checkpoint)
    with checkpoint, pytest.raises(UsageError, match=r"budgets the KV cache for 256 tokens, .*ctx.* asks for 1,024"):
        place_by_options(model, PlacementOptions(plan=tmp_path / "p.json"), 1024, tiny_checkpoint)


def test_gpu_out_of_memory_is_one_line(monkeypatch, capsys):
    from dsv4cli.runtime import open as runtime_open
    from tests.conftest import run_cli

    def no_room(*_args, **_kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(runtime_open, "open_model", no_room)
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # nothing piped
    code, out, err = run_cli(capsys, "chat", "-p", "hi")
    assert code == 1 and out == "" and err.count("\n") == 1 and "the GPU ran out of memory" in err


def test_plan_profiles_the_demo_by_name(tmp_path, monkeypatch):
    from tests.test_cli import dsv4

    text = tmp_path / "text.txt"
    text.write_text("What is 12 + 30?\n\nHow many letters r are in strawberry?\n")
    env = {f"XDG_{k}_HOME": str(tmp_path / k.lower()) for k in ("CACHE", "STATE", "DATA", "CONFIG")}
    made = dsv4("plan", "demo", "--profile", str(text), "--simulate", "--gpu-memory", "80MB", "--ctx", "256",
                "--json", env=env)
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["device"] == "cpu"
    bad = dsv4("plan", "demo", "--profile", str(text), "--cache-policy", "fifo", env=env)
    assert bad.returncode == 2 and "unknown --cache-policy" in bad.stderr


def test_ram_shortage_is_warned_once(tiny_checkpoint, monkeypatch):
    model, checkpoint = load_model(tiny_checkpoint)
    with checkpoint:
        monkeypatch.setattr(apply, "available_ram_bytes", lambda: 1 * MB)
        placement = place_by_options(model, PlacementOptions(device="cpu", cpu_memory="1MB"), 256, tiny_checkpoint)
    assert len(placement.warnings) == 1 and "memory-mapped files" in placement.warnings[0]


@pytest.mark.parametrize("option, flag", [("gpu_memory", "--gpu-memory"), ("cpu_memory", "--cpu-memory")])
def test_a_memory_budget_without_a_unit_is_refused_with_the_unit_suggested(option, flag):
    from dsv4cli.cli.options import FLAG_NAMES

    with pytest.raises(UsageError) as err:
        resolve_plan(ARGS, PlacementOptions(simulate=True, **{"gpu_memory": "1GB", option: "24"}), context=256)
    assert err.value.one_line(FLAG_NAMES) == (f"{flag} '24' has no unit (write it with one: 24GB (10^9 bytes) "
                                              "or 24GiB (2^30))")


def test_plan_is_a_calculation_that_needs_no_gpu():
    """`dsv4 plan flash --gpu-memory 24GB` (the README's command) plans for a GPU of that size, GPU or not;
    running with --gpu-memory and no GPU is still refused (test_chat_with_a_simulated_plan)."""
    from tests.test_cli import dsv4

    made = dsv4("plan", "flash", "--gpu-memory", "24GB", "--json")
    assert made.returncode == 0, made.stderr
    plan = json.loads(made.stdout)
    assert plan["device"].startswith("cuda") and plan["gpu_budget_bytes"] == 24 * 10**9
    assert plan["kv_cache_bytes"] > 16384 * 3000  # the compact KV of the default 16K context
    table = dsv4("plan", "flash", "--gpu-memory", "24GB")
    assert table.returncode == 0 and "placement plan: flash" in table.stdout
