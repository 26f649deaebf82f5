"""Generation engine on the tiny model: greedy decoding, prompt cache reuse, budget, stops, cancellation."""

from __future__ import annotations

import threading

import pytest
import torch

from dsv4cli.engine import engine as engine_module
from dsv4cli.engine.engine import ContextFull, ContextTooLarge, Engine, NonFiniteLogits, cache_bytes
from dsv4cli.engine.events import GenerationStats, TokenEvent
from dsv4cli.engine.sampling import SamplingParams
from dsv4cli.errors import CheckpointError, OutOfMemory, UsageError
from dsv4cli.model.layers import Numerics
from dsv4cli.model.presets import PRESETS
from dsv4cli.runtime.loader import build_model
from tests.conftest import tiny_model, tiny_tensors

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def model():
    return tiny_model("tiny", Numerics.plain(torch.float32))


def run(engine: Engine, prompt: list[int], **kwargs) -> tuple[list[TokenEvent], GenerationStats]:
    events = list(engine.generate(prompt, **kwargs))
    assert isinstance(events[-1], GenerationStats)
    return events[:-1], events[-1]


def ids(events: list[TokenEvent]) -> list[int]:
    return [e.token_id for e in events]


def greedy_reference(model, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model.full_logits(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def prompt_of(n: int, seed: int = 0) -> list[int]:
    return torch.randint(3, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_greedy_generation_matches_full_recompute(model):
    engine = Engine(model, max_context=256, prefill_chunk=16)
    prompt = prompt_of(37)
    events, stats = run(engine, prompt, sampling=GREEDY, max_tokens=12)
    assert ids(events) == greedy_reference(model, prompt, 12)
    assert [e.index for e in events] == list(range(12))
    assert stats.prompt_tokens == 37 and stats.generated_tokens == 12 and stats.finish_reason == "length"
    assert stats.cached_tokens == 0 and stats.time_to_first_token > 0 and stats.peak_memory_bytes > 0


def test_next_turn_extending_the_conversation_reuses_the_cache(model):
    engine = Engine(model, max_context=256)
    first = prompt_of(30)
    events, _ = run(engine, first, sampling=GREEDY, max_tokens=5)
    second = first + ids(events) + prompt_of(10, seed=1)
    events2, stats = run(engine, second, sampling=GREEDY, max_tokens=6)
    assert stats.cached_tokens == 30 + 4  # prompt + generated tokens fed back (the last one was not)
    assert ids(events2) == greedy_reference(model, second, 6)


def test_diverging_prompt_resumes_from_a_snapshot(model):
    engine = Engine(model, max_context=256)
    first = prompt_of(40)
    run(engine, first, sampling=GREEDY, max_tokens=8)
    # the next prompt rewrites the end of the last one (as dropping earlier reasoning does)
    second = first[:-1] + prompt_of(20, seed=2)
    events, stats = run(engine, second, sampling=GREEDY, max_tokens=6)
    assert stats.cached_tokens == 39
    assert ids(events) == greedy_reference(model, second, 6)
    third = prompt_of(15, seed=3)  # unrelated: starts over
    events, stats = run(engine, third, sampling=GREEDY, max_tokens=4)
    assert stats.cached_tokens == 0 and ids(events) == greedy_reference(model, third, 4)


def test_regenerate_same_prompt_with_seed_is_identical(model):
    engine = Engine(model, max_context=256)
    prompt = prompt_of(25)
    a, _ = run(engine, prompt, sampling=SamplingParams(seed=11), max_tokens=10)
    b, stats = run(engine, prompt, sampling=SamplingParams(seed=11), max_tokens=10)
    assert ids(a) == ids(b) and stats.cached_tokens == 24


def test_reasoning_budget_forces_think_end(model):
    engine = Engine(model, max_context=256)
    think_end = 499
    events, stats = run(engine, prompt_of(10), sampling=SamplingParams(seed=0), max_tokens=12, reasoning=True,
                        think_end_id=think_end, reasoning_budget=4)
    assert events[4].token_id == think_end and events[4].forced
    assert not any(e.forced for e in events[:4] + events[5:])
    assert stats.reasoning_tokens == 4


def test_stop_token_ends_generation(model):
    engine = Engine(model, max_context=256)
    prompt = prompt_of(20)
    expected = greedy_reference(model, prompt, 6)
    events, stats = run(engine, prompt, sampling=GREEDY, max_tokens=20, stop=[expected[2]])
    assert ids(events) == expected[: expected.index(expected[2]) + 1]
    assert stats.finish_reason == "stop"


def test_cancel_between_decode_steps(model):
    engine = Engine(model, max_context=256)
    cancel = threading.Event()
    seen = []
    for event in engine.generate(prompt_of(12), sampling=GREEDY, max_tokens=50, cancel=cancel):
        seen.append(event)
        if isinstance(event, TokenEvent) and event.index == 2:
            cancel.set()
    assert isinstance(seen[-1], GenerationStats) and seen[-1].finish_reason == "cancelled"
    assert len(seen) == 4
    cancel_before = threading.Event()
    cancel_before.set()
    events, stats = run(engine, prompt_of(12), cancel=cancel_before)
    assert events == [] and stats.finish_reason == "cancelled"
    assert stats.prefill_cancelled and stats.prefill_tokens_per_second == 0.0
    assert not seen[-1].prefill_cancelled  # that one was cancelled after its prefill


def test_context_limits(model):
    engine = Engine(model, max_context=32)
    with pytest.raises(ContextFull, match="does not fit") as full:
        run(engine, prompt_of(40))
    assert (full.value.prompt_tokens, full.value.max_context) == (40, 32)
    assert "--" not in full.value.one_line() and "/clear" not in full.value.one_line()  # callers add their hints
    events, stats = run(engine, prompt_of(28), sampling=GREEDY, max_tokens=100)
    assert len(events) == 4 and stats.finish_reason == "length"
    with pytest.raises(UsageError, match="empty"):
        run(engine, [])


@pytest.mark.parametrize("kwargs", [{"max_tokens": 0}, {"max_tokens": -1}, {"reasoning_budget": -3}])
def test_non_positive_limits_are_refused(model, kwargs):
    engine = Engine(model, max_context=64)
    with pytest.raises(UsageError, match="at least"):
        run(engine, prompt_of(5), reasoning=True, think_end_id=499, **kwargs)


def test_nan_weights_fail_with_a_clear_error_and_reset_the_cache():
    clean = tiny_tensors("tiny")
    tensors = {**clean, "norm.weight": torch.full_like(clean["norm.weight"], float("nan"))}
    broken = build_model(PRESETS["tiny"], tensors.__getitem__, Numerics.plain(torch.float32))
    engine = Engine(broken, max_context=64)
    for sampling in (GREEDY, SamplingParams(seed=0)):
        with pytest.raises(NonFiniteLogits, match="NaN logits at token 1 of the reply") as caught:
            run(engine, prompt_of(9), sampling=sampling)
        assert isinstance(caught.value, CheckpointError) and "corrupt" in caught.value.message
        assert engine.cached_ids == [] and engine.cache.pos == 0  # the next call starts clean


def test_a_context_too_large_for_memory_is_refused_before_allocating(model, monkeypatch):
    assert cache_bytes(model, 256) == Engine(model, max_context=256).cache.nbytes
    assert cache_bytes(model, 10**20) > 10**20  # beyond what torch can describe: estimated
    monkeypatch.setattr(engine_module, "available_bytes", lambda device: 2**20)
    with pytest.raises(ContextTooLarge) as caught:
        Engine(model, max_context=1_000_000)
    message = caught.value.message
    assert isinstance(caught.value, OutOfMemory) and "--" not in caught.value.one_line()
    assert message.startswith("a 1,000,000-token context needs ") and "1.05 MB is available" in message


def test_prefill_progress_reports_each_chunk_of_a_long_prompt(model):
    engine = Engine(model, max_context=256, prefill_chunk=8)
    calls: list[tuple[int, int]] = []
    run(engine, prompt_of(30), max_tokens=1, prefill_progress=lambda done, total: calls.append((done, total)))
    assert calls == [(0, 30), (8, 30), (16, 30), (24, 30)]
    calls.clear()
    run(engine, prompt_of(6, seed=1), max_tokens=1, prefill_progress=lambda done, total: calls.append((done, total)))
    assert calls == []  # one chunk: nothing to report


def test_a_prompt_cache_budget_keeps_several_conversations_reusable(model):
    """A server's engine: conversation A, then B, then A again resumes A's prefix (its pools were copied, B
    rewrote the live ones), and the answer is what a fresh engine gives; the shared-pool engine of a chat
    has to start A over."""
    a, b = prompt_of(150, seed=1), prompt_of(140, seed=2)
    a_next = [*a, *prompt_of(20, seed=3)]
    served = Engine(model, max_context=256, prefill_chunk=32, prompt_cache_bytes=1 << 30)
    chat = Engine(model, max_context=256, prefill_chunk=32)
    for engine in (served, chat):
        run(engine, a, sampling=GREEDY, max_tokens=3)
        run(engine, b, sampling=GREEDY, max_tokens=3)
    events, stats = run(served, a_next, sampling=GREEDY, max_tokens=6)
    assert stats.cached_tokens == len(a) and ids(events) == greedy_reference(model, a_next, 6)
    assert served.cached_prefixes == 6 and served.prompt_cache_used_bytes > 0
    events, stats = run(chat, a_next, sampling=GREEDY, max_tokens=6)
    assert stats.cached_tokens == 0 and ids(events) == greedy_reference(model, a_next, 6)


def test_the_prompt_cache_evicts_the_least_recently_used_prefixes_within_its_budget(model):
    a, b = prompt_of(150, seed=1), prompt_of(140, seed=2)
    probe = Engine(model, max_context=256, prefill_chunk=32, prompt_cache_bytes=1 << 30)
    run(probe, a, sampling=GREEDY, max_tokens=1)
    one_conversation = probe.prompt_cache_used_bytes  # its two snapshots (the prompt and the prompt less one)
    engine = Engine(model, max_context=256, prefill_chunk=32, prompt_cache_bytes=one_conversation + 1024)
    run(engine, a, sampling=GREEDY, max_tokens=1)
    run(engine, b, sampling=GREEDY, max_tokens=1)
    assert engine.prompt_cache_used_bytes <= one_conversation + 1024 and engine.evicted_prefixes >= 2
    _, stats = run(engine, [*a, 7, 8], sampling=GREEDY, max_tokens=1)
    assert stats.cached_tokens == 0  # A was evicted: B was used last
    _, stats = run(engine, [*b, 7, 8], sampling=GREEDY, max_tokens=1)
    assert stats.cached_tokens == 0  # ... and A's new prompt then pushed B out
    nothing = Engine(model, max_context=256, prefill_chunk=32, prompt_cache_bytes=0)
    run(nothing, a, sampling=GREEDY, max_tokens=1)
    assert nothing.cached_prefixes == 0
    with pytest.raises(UsageError, match="at least 0 bytes"):
        Engine(model, max_context=256, prompt_cache_bytes=-1)
