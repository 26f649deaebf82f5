"""Chat sessions on a V4-architecture model with the real tokenizer: turns, prompt cache, policies, transcripts."""

from __future__ import annotations

import errno
import json
import os
import threading

import pytest
import torch

from dsv4cli.chat.encoding import ThinkMode
from dsv4cli.chat.session import ChatSession, ChatSettings, TranscriptError
from dsv4cli.chat.tokenizer import Tokenizer
from dsv4cli.demo.model import DEMO_ARGS, packaged_tokenizer_dir
from dsv4cli.engine.engine import Engine
from dsv4cli.engine.events import TurnResult
from dsv4cli.engine.sampling import SamplingParams
from dsv4cli.errors import UsageError
from dsv4cli.io.writer import random_tensors
from dsv4cli.model.layers import Numerics
from dsv4cli.runtime.loader import build_model


class Recorder:
    """A renderer that remembers what it was given."""

    def __init__(self, cancel_after: int | None = None, cancel: threading.Event | None = None):
        self.reasoning_text, self.content_text, self.results, self.notices = "", "", [], []
        self.cancel_after, self.cancel, self.deltas = cancel_after, cancel, 0

    def begin_turn(self, mode_label):
        self.mode = mode_label

    def _count(self):
        self.deltas += 1
        if self.cancel_after is not None and self.deltas >= self.cancel_after:
            self.cancel.set()

    def reasoning(self, text):
        self.reasoning_text += text
        self._count()

    def content(self, text):
        self.content_text += text
        self._count()

    def end_turn(self, result: TurnResult):
        self.results.append(result)

    def notice(self, message):
        self.notices.append(message)

    warning = error = notice


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    tokenizer = Tokenizer.from_dir(packaged_tokenizer_dir(tmp_path_factory.mktemp("tok")))
    tensors = dict(random_tensors(DEMO_ARGS, seed=3))
    model = build_model(DEMO_ARGS, tensors.__getitem__, Numerics())
    return model, tokenizer


def session(parts, **settings) -> ChatSession:
    model, tokenizer = parts
    torch.set_grad_enabled(False)
    base = dict(sampling=SamplingParams(seed=0), max_tokens=24, reasoning_budget=8)
    return ChatSession(Engine(model, max_context=2048), tokenizer, ChatSettings(**{**base, **settings}))


def test_thinking_turn_splits_reasoning_and_content_and_streams_what_it_returns(parts):
    chat = session(parts)
    r = Recorder()
    result = chat.send("What is 2+2?", r)
    assert r.mode == "think-high"
    assert result.stats.reasoning_tokens == 8  # the budget forced </think>
    assert r.reasoning_text == result.reasoning and r.content_text == result.content
    assert chat.messages[-1]["role"] == "assistant" and chat.messages[-1]["content"] == result.content
    assert chat.prompt_text().startswith("<｜begin▁of▁sentence｜><｜User｜>What is 2+2?<｜Assistant｜>")


def test_second_turn_reuses_the_prompt_cache(parts):
    chat = session(parts, mode=ThinkMode.NON_THINK)
    chat.send("hello", Recorder())
    second = chat.send("and again", Recorder())
    assert second.stats.cached_tokens > 5
    thinking = session(parts)  # earlier reasoning is dropped: resume from the snapshot before it
    first = thinking.send("hello", Recorder())
    second = thinking.send("and again", Recorder())
    assert second.stats.cached_tokens == first.stats.prompt_tokens - 1


def test_system_prompt_and_modes(parts):
    chat = session(parts, system="Be brief.")
    assert chat.prompt_text() == "<｜begin▁of▁sentence｜>Be brief."
    assert chat.set_mode("max") is not None  # 2048-token context < 384K: warning, mode still switched
    assert chat.settings.mode is ThinkMode.THINK_MAX
    chat.messages.append({"role": "user", "content": "x"})
    assert chat.prompt_text().startswith("<｜begin▁of▁sentence｜>Reasoning Effort: Absolute maximum")
    assert chat.set_mode("non-think") is None


def test_interrupted_answer_is_kept_and_reasoning_dropped(parts):
    chat = session(parts, mode=ThinkMode.NON_THINK, max_tokens=200)
    cancel = threading.Event()
    result = chat.send("tell me a story", Recorder(cancel_after=3, cancel=cancel), cancel)
    assert result.interrupted and result.stats.finish_reason == "cancelled"
    assert chat.messages[-1] == {"role": "assistant", "content": result.content, "interrupted": True}
    assert "interrupted" not in chat.prompt_text()


def test_interrupt_before_any_answer_drops_the_turn(parts):
    chat = session(parts, max_tokens=200, reasoning_budget=100)
    cancel = threading.Event()
    result = chat.send("think hard", Recorder(cancel_after=2, cancel=cancel), cancel)
    assert result.interrupted and result.content == "" and chat.messages == []


def test_failed_turn_leaves_no_user_message(parts):
    model, tokenizer = parts
    chat = ChatSession(Engine(model, max_context=8), tokenizer, ChatSettings())
    with pytest.raises(UsageError, match="does not fit"):
        chat.send("a message far too long for eight tokens of context", Recorder())
    assert chat.messages == []


def test_regenerate_with_a_seed_gives_a_new_reproducible_answer(parts):
    chat = session(parts, mode=ThinkMode.NON_THINK)
    first = chat.send("hi", Recorder()).content
    second = chat.regenerate(Recorder()).content
    assert second != first and len(chat.messages) == 2
    again = session(parts, mode=ThinkMode.NON_THINK)
    again.send("hi", Recorder())
    assert again.regenerate(Recorder()).content == second
    with pytest.raises(UsageError):
        session(parts).regenerate(Recorder())


def test_save_and_load_round_trip(parts, tmp_path):
    chat = session(parts, system="sys", mode=ThinkMode.NON_THINK)
    chat.set_sampling("temperature", "0.5")
    chat.send("hi", Recorder())
    path = chat.save(tmp_path / "s" / "t.json")
    other = session(parts)
    other.load(path)
    assert other.messages == chat.messages and other.settings.system == "sys"
    assert other.settings.mode is ThinkMode.NON_THINK and other.settings.sampling.temperature == 0.5
    assert other.prompt_text() == chat.prompt_text()
    (tmp_path / "bad.json").write_text('{"version": 1, "messages": [{"role": "wizard"}]}')
    with pytest.raises(UsageError, match="invalid"):
        other.load(tmp_path / "bad.json")
    with pytest.raises(UsageError, match="no transcript"):
        other.load(tmp_path / "none.json")
    assert other.messages == chat.messages  # a failed load changes nothing


def test_a_reply_cut_inside_the_thinking_trace_says_so(parts):
    chat = session(parts, max_tokens=3, reasoning_budget=None)
    result = chat.send("think about it", Recorder())
    assert result.stats.finish_reason == "length" and result.stopped_in_reasoning and result.content == ""
    answered = session(parts, mode=ThinkMode.NON_THINK, max_tokens=3).send("hi", Recorder())
    assert not answered.stopped_in_reasoning


# ------------------------------------------------------------ transcripts
GOOD = {"version": 1, "mode": "non-think", "system": None, "sampling": {"seed": 3}, "messages": []}
MALFORMED = {
    "string seed": {**GOOD, "sampling": {"seed": "7"}},
    "NaN temperature": '{"version": 1, "messages": [], "sampling": {"temperature": NaN}}',
    "unknown sampling key": {**GOOD, "sampling": {"nucleus": 1}},
    "sampling not an object": {**GOOD, "sampling": [1]},
    "mode not a string": {**GOOD, "mode": 5},
    "unknown mode": {**GOOD, "mode": "deep"},
    "system not a string": {**GOOD, "system": ["x"]},
    "message not an object": {**GOOD, "messages": [5]},
    "message without a role": {**GOOD, "messages": [{"content": "x"}]},
    "content not text": {**GOOD, "messages": [{"role": "user", "content": 5}]},
    "unknown role": {**GOOD, "messages": [{"role": "wizard", "content": "x"}]},
    "interrupted not a bool": {**GOOD, "messages": [{"role": "assistant", "content": "x", "interrupted": "yes"}]},
    "wrong version": {**GOOD, "version": 2},
    "not an object": [GOOD],
    "missing messages": {"version": 1},
    "invalid JSON": "{not json",
    "deeply nested JSON": "[" * 100_000,
    "not UTF-8": b'{"version": 1, "messages": [], "system": "\xff"}',
}


def write_transcript(path, data) -> None:
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")


def bare_session() -> ChatSession:
    """A session for transcript tests: they touch neither the engine nor the tokenizer."""
    chat = ChatSession(engine=None, tokenizer=None)
    chat.messages = [{"role": "user", "content": "keep me"}, {"role": "assistant", "content": "kept"}]
    return chat


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_loading_a_malformed_transcript_is_one_clear_error_and_changes_nothing(tmp_path, case):
    path = tmp_path / "t.json"
    write_transcript(path, MALFORMED[case])
    chat = bare_session()
    before = (list(chat.messages), chat.settings.sampling, chat.settings.mode)
    with pytest.raises(TranscriptError) as caught:
        chat.load(path)
    assert isinstance(caught.value, ValueError) and str(path) in caught.value.message
    line = caught.value.one_line()
    assert "\n" not in line and len(line) < 400 and "/save" not in line
    assert (chat.messages, chat.settings.sampling, chat.settings.mode) == before


def test_loading_a_directory_or_a_missing_file_is_a_clear_error(tmp_path):
    chat = bare_session()
    with pytest.raises(TranscriptError, match="is a directory"):
        chat.load(tmp_path)
    with pytest.raises(TranscriptError, match="no transcript"):
        chat.load(tmp_path / "none.json")


def test_lone_surrogates_in_a_transcript_become_replacement_characters(tmp_path):
    path = tmp_path / "t.json"
    write_transcript(path, {**GOOD, "messages": [{"role": "user", "content": "bad \\ud800 text"}]})
    path.write_text(path.read_text().replace("\\\\ud800", "\\ud800"))  # a JSON escape of a lone surrogate
    chat = bare_session()
    chat.load(path)
    assert chat.messages[0]["content"] == "bad \ufffd text"
    chat.messages.append({"role": "assistant", "content": "also \udcff here"})
    chat.save(path)  # writes valid UTF-8
    assert json.loads(path.read_bytes().decode("utf-8"))["messages"][1]["content"] == "also \ufffd here"


class FullDiskFile:
    """A file opened for writing on a full disk: every write raises ENOSPC."""

    def __init__(self, handle):
        self.handle = handle

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


def test_save_is_atomic_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    chat = bare_session()
    path = chat.save(tmp_path / "t.json")
    original = path.read_bytes()
    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, *args, **kwargs: FullDiskFile(real_fdopen(fd, *args, **kwargs)))
    chat.messages.append({"role": "user", "content": "more"})
    with pytest.raises(TranscriptError, match="the disk is full") as caught:
        chat.save(path)
    monkeypatch.undo()
    assert "\n" not in caught.value.one_line()
    assert path.read_bytes() == original and sorted(tmp_path.iterdir()) == [path]
    with pytest.raises(TranscriptError, match="is a directory"):
        chat.save(tmp_path)
    (tmp_path / "sub").mkdir()
    with pytest.raises(TranscriptError):
        chat.save(tmp_path / "sub")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["sub", "t.json"]


def test_stop_sequence_ends_the_answer_before_it(parts):
    """The answer stops at the first stop sequence, which is neither shown nor kept; generation ends there
    ("stop"), and the conversation goes on from that answer."""
    plain = session(parts, mode=ThinkMode.NON_THINK, max_tokens=40).send("tell me a story", Recorder())
    text = plain.content
    assert len(text) > 12
    stop = text[len(text) // 2:len(text) // 2 + 3]
    want = text[:text.find(stop)]
    chat = session(parts, mode=ThinkMode.NON_THINK, max_tokens=40, stop=(stop, "\x00never"))
    r = Recorder()
    result = chat.send("tell me a story", r)
    assert result.content == r.content_text == want and stop not in r.content_text
    assert result.stats.finish_reason == "stop" and not result.interrupted
    assert result.stats.generated_tokens < plain.stats.generated_tokens
    assert chat.messages[-1] == {"role": "assistant", "content": want}
    assert chat.send("and then?", Recorder()).stats.cached_tokens > 0
