"""Speculative decoding with the MTP layer: the engine's output is plain decoding's (greedy: the same
tokens; sampled: the same distribution), and stopping inside a burst of accepted drafts leaves the cache
exactly where plain decoding leaves it."""

from __future__ import annotations

import pytest
import torch

from dsv4cli.demo import model as demo
from dsv4cli.engine.engine import Engine
from dsv4cli.engine.events import GenerationStats, TokenEvent
from dsv4cli.engine.sampling import SamplingParams
from dsv4cli.engine.speculative import DraftSampler
from dsv4cli.errors import UsageError
from dsv4cli.model.layers import Numerics
from dsv4cli.runtime.loader import load_model
from tests.conftest import tiny_model

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def model():
    return tiny_model("tiny", Numerics.plain(torch.float32))


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
    """The trained demo (its MTP layer learned the arithmetic chats: drafts are mostly kept)."""
    net, checkpoint = load_model(demo.demo_model_dir(tmp_path_factory.mktemp("demo")))
    yield net
    del checkpoint


def run(engine: Engine, prompt: list[int], **kwargs) -> tuple[list[int], GenerationStats]:
    events = list(engine.generate(prompt, **kwargs))
    assert isinstance(events[-1], GenerationStats)
    return [e.token_id for e in events[:-1] if isinstance(e, TokenEvent)], events[-1]


def prompt_of(n: int, seed: int = 0) -> list[int]:
    return torch.randint(3, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("draft", [1, 2, 3])
def test_greedy_drafting_gives_the_plain_greedy_tokens(model, draft):
    # the random tiny model's drafts are mostly wrong: most steps keep a prefix of the verified tokens
    plain = Engine(model, max_context=256, prefill_chunk=16)
    spec = Engine(model, max_context=256, prefill_chunk=16, draft=draft)
    for seed in range(2):
        prompt = prompt_of(23 + seed, seed)
        want, _ = run(plain, prompt, sampling=GREEDY, max_tokens=20)
        got, stats = run(spec, prompt, sampling=GREEDY, max_tokens=20)
        assert got == want
        assert stats.draft_tokens > 0 and stats.draft_acceptance is not None
        assert spec.cached_ids == plain.cached_ids and spec.cache.pos == plain.cache.pos


@pytest.mark.parametrize(("start", "fed", "keep"), [(0, 4, 1), (125, 4, 2), (126, 3, 1), (250, 4, 3), (255, 2, 1),
                                                   (127, 4, 0), (61, 4, 4)])
def test_keeping_a_prefix_of_a_recorded_forward_equals_feeding_only_the_prefix(model, start, fed, keep):
    # windows of 4 (CSA) and 128 (HCA) close at 127 and the 128-row ring wraps: dropped tokens closed
    # windows and overwrote ring rows that the kept state needs
    ids = torch.tensor([prompt_of(start + fed + 6, seed=start)])
    recorded, plain = model.new_cache(1, 512), model.new_cache(1, 512)
    with torch.inference_mode():
        if start:
            model.streams(ids[:, :start], recorded)
            model.streams(ids[:, :start], plain)
        before = recorded.snapshot()
        with recorded.recording() as journal:
            model.streams(ids[:, start:start + fed], recorded)
        assert journal.tokens == fed and journal.writes
        recorded.keep_prefix(before, journal, keep)
        if keep:
            model.streams(ids[:, start:start + keep], plain)
        assert recorded.pos == plain.pos == start + keep
        for got, want in zip(recorded.snapshot(pools=True).tensors + recorded.snapshot(pools=True).pools,
                             plain.snapshot(pools=True).tensors + plain.snapshot(pools=True).pools, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        after = ids[:, start + fed:start + fed + 6]  # and decoding goes on from there alike
        torch.testing.assert_close(model(after, recorded, last_only=False), model(after, plain, last_only=False),
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cannot keep"):
        recorded.keep_prefix(before, journal, fed + 1)


@pytest.fixture(scope="module")
def demo_prompt(tmp_path_factory) -> list[int]:
    from dsv4cli.chat.encoding import ThinkMode, encode_messages
    from dsv4cli.chat.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(demo.packaged_tokenizer_dir(tmp_path_factory.mktemp("tok")))
    text = encode_messages([{"role": "user", "content": "What is 17 + 25?"}], **ThinkMode.NON_THINK.encode_kwargs())
    return tokenizer.encode(text)


def test_trained_demo_keeps_most_drafts_and_matches_plain_greedy(demo_model, demo_prompt):
    prompt = demo_prompt
    want, _ = run(Engine(demo_model, max_context=512), prompt, sampling=GREEDY, max_tokens=24)
    for draft in (1, 2, 3):
        got, stats = run(Engine(demo_model, max_context=512, draft=draft), prompt, sampling=GREEDY, max_tokens=24)
        assert got == want
        # chained drafts (the MTP layer on its own streams) are kept less often than the first
        assert stats.draft_acceptance > (0.6 if draft == 1 else 0.3), (draft, stats.draft_acceptance)


def test_stop_inside_a_burst_leaves_the_cache_where_plain_decoding_does(demo_model, demo_prompt):
    prompt = demo_prompt
    plain = Engine(demo_model, max_context=512)
    reply, _ = run(plain, prompt, sampling=GREEDY, max_tokens=24)
    spec = Engine(demo_model, max_context=512, draft=3)
    for stop_at in (2, 3, 5):  # stop tokens that land inside and at the end of bursts
        stop = [reply[stop_at]]
        want, _ = run(plain, prompt, sampling=GREEDY, max_tokens=24, stop=stop)
        got, stats = run(spec, prompt, sampling=GREEDY, max_tokens=24, stop=stop)
        assert got == want and stats.finish_reason == "stop"
        assert spec.cached_ids == plain.cached_ids and spec.cache.pos == plain.cache.pos
        # and the next turn continues from identical states
        follow = [*prompt, *got, *prompt_of(3, stop_at)]
        assert run(spec, follow, sampling=GREEDY, max_tokens=8)[0] == run(plain, follow, sampling=GREEDY,
                                                                             max_tokens=8)[0]


def test_reasoning_budget_and_token_limit_are_kept_with_drafts(demo_model, demo_prompt):
    prompt = demo_prompt
    think_end = 499
    kwargs = dict(sampling=GREEDY, max_tokens=11, reasoning=True, think_end_id=think_end, reasoning_budget=5)
    want_events = list(Engine(demo_model, max_context=512).generate(prompt, **kwargs))
    got_events = list(Engine(demo_model, max_context=512, draft=3).generate(prompt, **kwargs))
    assert [(e.token_id, e.forced) for e in got_events[:-1]] == [(e.token_id, e.forced) for e in want_events[:-1]]
    assert got_events[-1].generated_tokens == 11 and got_events[-1].reasoning_tokens == 5


def test_sampled_drafting_keeps_the_target_distribution():
    """Speculative sampling's first token follows p whatever the draft distribution q is."""
    p_logits = torch.tensor([2.0, 1.0, 0.5, -1.0, 0.0])
    q_logits = torch.tensor([-1.0, 2.0, 0.0, 1.5, 0.5])  # a poor drafter
    params = SamplingParams(temperature=1.0, seed=5)
    sampler = DraftSampler(params)
    trials = 6000
    counts = torch.zeros(5)
    for _ in range(trials):
        draft, q = sampler.draft(q_logits)
        kept, after = sampler.verify([draft], [q], torch.stack([p_logits, q_logits]))
        counts[draft if kept else after] += 1
    want = p_logits.softmax(-1)
    got = counts / trials
    # ~4.5 standard errors per cell: a wrong rule (e.g. always keeping the draft) misses by > 0.2
    assert (got - want).abs().max() < 4.5 * (want * (1 - want) / trials).sqrt().max(), (got, want)


def test_drafting_needs_the_mtp_layer(model):
    without = tiny_model("tiny", Numerics.plain(torch.float32))
    without.mtp = torch.nn.ModuleList()
    with pytest.raises(UsageError, match="MTP layer"):
        Engine(without, max_context=64, draft=1)
    with pytest.raises(UsageError, match="0 to 3"):
        Engine(model, max_context=64, draft=4)


def test_the_default_draft_length_drafts_only_on_the_cpu_with_an_mtp_layer():
    from dsv4cli.engine.speculative import AUTO_DRAFT, auto_draft

    assert AUTO_DRAFT == 1 and auto_draft(True, True) == AUTO_DRAFT
    assert auto_draft(True, False) == auto_draft(False, True) == auto_draft(False, False) == 0
