"""The chat REPL: command dispatch with a canned session, the prompt loop with piped keys,
and `dsv4 chat` end to end in a pseudo-terminal (real prompt_toolkit, demo model)."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import pexpect
import pytest
from prompt_toolkit.document import Document
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput

from dsv4cli.chat.encoding import ThinkMode
from dsv4cli.chat.session import ChatSession, mode_label
from dsv4cli.demo.model import demo_model_dir
from dsv4cli.engine.events import GenerationStats, TurnResult
from dsv4cli.ui.render import format_stats
from dsv4cli.ui.repl import (
    COMMANDS,
    Repl,
    SlashCompleter,
    block_is_open,
    run_repl,
    transcript_path,
    unwrap_block,
)


# --------------------------------------------------------------------- fakes
class FakeEngine:
    def __init__(self, max_context: int = 16384):
        self.max_context = max_context
        self.resets = 0

    def reset(self) -> None:
        self.resets += 1


class CannedSession(ChatSession):
    """A real ChatSession (settings, modes, transcripts) whose replies are canned, not generated.
    With `interrupt`, the reply sends itself SIGINT (a Ctrl-C) halfway and stops if `cancel` got set."""

    def __init__(self, max_context: int = 16384, reply: str = "canned answer", interrupt: bool = False):
        super().__init__(FakeEngine(max_context), tokenizer=None)
        self.reply = reply
        self.interrupt = interrupt
        self.answered: list[str] = []

    def _respond(self, renderer, cancel, sampling=None):
        self.answered.append(self.messages[-1]["content"])
        renderer.begin_turn(mode_label(self.settings.mode))
        renderer.content(self.reply)
        interrupted = False
        if self.interrupt:
            signal.raise_signal(signal.SIGINT)
            interrupted = cancel.wait(2)
        stats = GenerationStats(prompt_tokens=7, generated_tokens=3, decode_seconds=0.5,
                                finish_reason="cancelled" if interrupted else "stop")
        result = TurnResult(content=self.reply, interrupted=interrupted, stats=stats)
        self._record(result)
        self.last_stats = stats
        renderer.end_turn(result)
        return result


class RecordingRenderer:
    def __init__(self):
        self.events: list[tuple[str, str]] = []

    def begin_turn(self, mode: str) -> None:
        self.events.append(("begin", mode))

    def reasoning(self, text: str) -> None:
        self.events.append(("reasoning", text))

    def content(self, text: str) -> None:
        self.events.append(("content", text))

    def end_turn(self, result: TurnResult) -> None:
        self.events.append(("end", "interrupted" if result.interrupted else "done"))

    def notice(self, msg: str) -> None:
        self.events.append(("notice", msg))

    def warning(self, msg: str) -> None:
        self.events.append(("warning", msg))

    def error(self, msg: str) -> None:
        self.events.append(("error", msg))

    def close(self) -> None:
        self.events.append(("close", ""))

    def of(self, kind: str) -> list[str]:
        return [text for k, text in self.events if k == kind]


@pytest.fixture
def xdg(tmp_path, monkeypatch):
    for name in ("STATE", "DATA", "CONFIG", "CACHE"):
        monkeypatch.setenv(f"XDG_{name}_HOME", str(tmp_path / name.lower()))
    monkeypatch.delenv("DSV4_NO_HISTORY", raising=False)
    return tmp_path


def make_repl(**session_args) -> tuple[Repl, CannedSession, RecordingRenderer]:
    session, renderer = CannedSession(**session_args), RecordingRenderer()
    return Repl(session, renderer), session, renderer


def run(repl: Repl, *lines: str) -> None:
    for line in lines:
        repl.handle(line)


# ----------------------------------------------------------- command dispatch
def test_think_commands_switch_modes_and_warn_about_short_context_for_max():
    repl, session, renderer = make_repl()
    run(repl, "/think max")
    assert session.settings.mode is ThinkMode.THINK_MAX
    assert len(renderer.of("warning")) == 1 and "393,216" in renderer.of("warning")[0]
    run(repl, "/nothink")
    assert session.settings.mode is ThinkMode.NON_THINK
    run(repl, "/think")
    assert session.settings.mode is ThinkMode.THINK_HIGH
    run(repl, "/mode non-think", "/think high")
    assert session.settings.mode is ThinkMode.THINK_HIGH
    run(repl, "/mode think-max")
    assert session.settings.mode is ThinkMode.THINK_MAX and len(renderer.of("warning")) == 2
    assert renderer.of("notice")[-1] == "mode: think-max" and not renderer.of("error")


def test_think_max_on_a_long_context_does_not_warn():
    repl, session, renderer = make_repl(max_context=400_000)
    run(repl, "/think max")
    assert session.settings.mode is ThinkMode.THINK_MAX and not renderer.of("warning")


@pytest.mark.parametrize("line", ["/mode bogus", "/think low", "/nothink now", "/frobnicate", "/set", "/set foo 1",
                                  "/set temperature", "/set temperature hot", "/set temperature -1", "/set top_p 2",
                                  "/set max_tokens 0", "/set max_tokens many", "/set reasoning_budget -3",
                                  "/set seed x", "/regen", "/save", "/load", "/load never-saved", "/read",
                                  "/read /no/such/file", "/clear now", "/stats please", "/set temperature nan",
                                  "/set temperature inf", "/set top_p nan", "/set min_p -inf", "/set top_k 1.5",
                                  "/read /", "/save /", "/load /"])
def test_bad_input_is_one_error_line_and_changes_nothing(xdg, line):
    repl, session, renderer = make_repl()
    before = (session.settings.mode, session.settings.sampling, session.settings.max_tokens)
    run(repl, line)
    assert len(renderer.of("error")) == 1 and "\n" not in renderer.of("error")[0]
    assert (session.settings.mode, session.settings.sampling, session.settings.max_tokens) == before
    assert not repl.done and not session.answered


class FailingSession(CannedSession):
    """A canned session whose next turn raises `error` (after the reply started streaming)."""

    def __init__(self, error: BaseException, **kwargs):
        super().__init__(**kwargs)
        self.error = error

    def _respond(self, renderer, cancel, sampling=None):
        if self.error is not None:
            error, self.error = self.error, None
            renderer.begin_turn(mode_label(self.settings.mode))
            renderer.content("half")
            raise error
        return super()._respond(renderer, cancel, sampling)


@pytest.mark.parametrize("error", [RuntimeError("kernel failed\nsecond line"), MemoryError(), KeyError("k"),
                                   TypeError("bad"), ZeroDivisionError("division by zero")])
def test_any_error_in_a_turn_is_one_line_and_the_conversation_survives(error):
    session, renderer = FailingSession(error), RecordingRenderer()
    repl = Repl(session, renderer)
    session.messages = [{"role": "user", "content": "before"}, {"role": "assistant", "content": "kept"}]
    run(repl, "this turn fails")
    assert len(renderer.of("error")) == 1 and "\n" not in renderer.of("error")[0]
    assert type(error).__name__ in renderer.of("error")[0]
    assert renderer.of("close") and not repl.done
    assert [m["content"] for m in session.messages] == ["before", "kept"]
    run(repl, "next one")
    assert [m["content"] for m in session.messages] == ["before", "kept", "next one", "canned answer"]


def test_a_full_context_suggests_clear_in_the_repl():
    from dsv4cli.engine.engine import ContextFull

    session, renderer = FailingSession(ContextFull(20_000, 16_384)), RecordingRenderer()
    run(Repl(session, renderer), "long")
    assert renderer.of("error") == ["the prompt of 20,000 tokens does not fit the context of 16,384 tokens "
                                    "(/clear to start over, or restart with a larger --ctx)"]


def test_a_reply_cut_inside_the_thinking_trace_is_warned_about():
    class CutSession(CannedSession):
        def _record(self, result):
            result.stopped_in_reasoning = True
            super()._record(result)

    session, renderer = CutSession(reply=""), RecordingRenderer()
    run(Repl(session, renderer), "think")
    assert len(renderer.of("warning")) == 1 and "inside the thinking trace" in renderer.of("warning")[0]
    assert "/set max_tokens" in renderer.of("warning")[0]


def test_lone_surrogates_typed_or_read_are_replaced_not_fatal(xdg, tmp_path):
    repl, session, renderer = make_repl()
    run(repl, "bad \udcff byte", "/system sys \udcff", "/save s")
    assert session.messages[0]["content"] == "bad \ufffd byte" and session.settings.system == "sys \ufffd"
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"caf\xe9\n")
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n")
    run(repl, f"/read {latin1}", f"/read {empty}")
    assert renderer.of("error") == [f"{latin1} is not UTF-8 text (byte 0xe9 at offset 3) (convert it, e.g. with "
                                    "iconv -t utf-8)", f"{empty} is empty (/read sends the file's text as your "
                                    "message)"]
    assert len(session.messages) == 2


@pytest.mark.parametrize("transcript", [
    {"version": 1, "messages": [], "sampling": {"seed": "7"}},
    {"version": 1, "messages": [{"role": "user", "content": 5}]},
    {"version": 1, "messages": [{"role": "user"}], "mode": ["x"]},
    "[[[[",
])
def test_load_of_a_malformed_transcript_keeps_the_conversation_and_the_repl(tmp_path, transcript):
    path = tmp_path / "bad.json"
    path.write_text(transcript if isinstance(transcript, str) else json.dumps(transcript))
    repl, session, renderer = make_repl()
    run(repl, "keep me", f"/load {path}", "/set seed 5", "still here")
    assert len(renderer.of("error")) == 1 and str(path) in renderer.of("error")[0]
    assert [m["content"] for m in session.messages] == ["keep me", "canned answer", "still here", "canned answer"]
    assert session.settings.sampling.seed == 5


def test_unknown_command_points_to_help():
    repl, _, renderer = make_repl()
    run(repl, "/frobnicate x")
    assert renderer.of("error") == ["unknown command /frobnicate (/help lists the commands; start with // to send a /)"]


def test_set_changes_sampling_and_limits():
    repl, session, renderer = make_repl()
    run(repl, "/set temperature 0.5", "/set top_p 0.9", "/set top-k 40", "/set min_p 0.05", "/set seed 7",
        "/set max_tokens 100", "/set reasoning_budget 32")
    sampling = session.settings.sampling
    assert (sampling.temperature, sampling.top_p, sampling.top_k, sampling.min_p, sampling.seed) == (0.5, 0.9, 40,
                                                                                                  0.05, 7)
    assert session.settings.max_tokens == 100 and session.settings.reasoning_budget == 32
    run(repl, "/set reasoning_budget off", "/set seed none")
    assert session.settings.reasoning_budget is None and session.settings.sampling.seed is None
    assert renderer.of("notice")[-2:] == ["reasoning_budget = off", "seed = off"] and not renderer.of("error")


def test_set_stop_adds_sequences_and_off_clears_them():
    repl, session, renderer = make_repl()
    run(repl, "/set stop END", r"/set stop \n\n", "/show")
    assert session.settings.stop == ("END", "\n\n")
    assert renderer.of("notice")[1] == 'stop = "END" "\\n\\n"' and 'stop "END" "\\n\\n"' in renderer.of("notice")[-1]
    run(repl, "/set stop a", "/set stop b", "/set stop c")
    assert renderer.of("error") == ["at most 4 stop sequences, got 5 (/set stop off clears them)"]
    assert len(session.settings.stop) == 4
    run(repl, "/set stop off")
    assert session.settings.stop == () and renderer.of("notice")[-1] == "stop = off"


def test_system_prompt_set_show_clear():
    repl, session, renderer = make_repl()
    run(repl, "/system")
    assert "no system prompt" in renderer.of("notice")[-1]
    run(repl, "/system You are terse.", "/system")
    assert session.settings.system == "You are terse." and renderer.of("notice")[-1] == "system prompt: You are terse."
    run(repl, "/system clear")
    assert session.settings.system is None


def test_show_lists_the_settings():
    repl, _, renderer = make_repl()
    run(repl, "/set max_tokens 99", "/system be brief", "/show")
    shown = "\n".join(renderer.of("notice")[-3:])
    assert "mode think-high" in shown and "16,384" in shown and "be brief" in shown
    assert "temperature 1.0" in shown and "max_tokens 99" in shown and "reasoning_budget off" in shown


def test_messages_blocks_and_escaped_slashes_are_sent():
    repl, session, renderer = make_repl()
    run(repl, "hello", '"""\nline one\nline two\n"""', '"""inline"""', "//etc/passwd is a path", "   ", "")
    assert session.answered == ["hello", "line one\nline two", "inline", "/etc/passwd is a path"]
    assert [m["role"] for m in session.messages] == ["user", "assistant"] * 4
    assert renderer.of("begin") == ["think-high"] * 4 and not renderer.of("error")


def test_block_detection():
    assert block_is_open('"""') and block_is_open('"""\nsome text') and block_is_open('"""start')
    assert not block_is_open('"""\ntext\n"""') and not block_is_open('"""one line"""') and not block_is_open("hi")
    assert not block_is_open('""""""')
    assert unwrap_block('"""\n  keep  indent\n"""') == "keep  indent"


def test_regen_answers_the_last_message_again():
    repl, session, _ = make_repl()
    run(repl, "question", "/regen")
    assert session.answered == ["question", "question"]
    assert [m["role"] for m in session.messages] == ["user", "assistant"]


def test_clear_starts_a_new_conversation():
    repl, session, renderer = make_repl()
    run(repl, "hi", "/clear")
    assert session.messages == [] and session.engine.resets == 1 and renderer.of("notice")[-1] == "new conversation"


def test_save_and_load_round_trip_through_the_sessions_dir(xdg):
    repl, session, renderer = make_repl()
    run(repl, "/nothink", "/system sys", "first", "/save chat1")
    saved = xdg / "data" / "dsv4" / "sessions" / "chat1.json"
    data = json.loads(saved.read_text())
    assert [m["content"] for m in data["messages"]] == ["first", "canned answer"] and data["mode"] == "non-think"
    run(repl, "/clear", "/think", "/system clear", "/load chat1")
    assert [m["content"] for m in session.messages] == ["first", "canned answer"]
    assert session.settings.mode is ThinkMode.NON_THINK and session.settings.system == "sys"
    assert renderer.of("notice")[-1] == f"loaded 2 messages from {saved} (mode non-think)"
    assert not renderer.of("error")


def test_transcript_paths(xdg, tmp_path):
    assert transcript_path("t1") == xdg / "data" / "dsv4" / "sessions" / "t1.json"
    assert transcript_path("dir/t1") == Path("dir/t1")
    assert transcript_path("t1.json") == Path("t1.json")
    assert transcript_path("~/x.json") == Path.home() / "x.json"


def test_load_of_a_bad_file_is_an_error_line(tmp_path):
    repl, session, renderer = make_repl()
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    run(repl, "keep me", f"/load {bad}")
    assert len(renderer.of("error")) == 1 and session.messages[0]["content"] == "keep me"


def test_read_sends_a_file(tmp_path):
    repl, session, _ = make_repl()
    note = tmp_path / "note.txt"
    note.write_text("from a file\n")
    run(repl, f"/read {note}")
    assert session.answered == ["from a file\n"]


def test_stats_line_of_the_last_reply():
    repl, session, renderer = make_repl()
    run(repl, "/stats")
    assert renderer.of("notice")[-1] == "no reply yet"
    run(repl, "hi", "/stats")
    assert renderer.of("notice")[-1] == format_stats(session.last_stats)


def test_help_lists_every_command():
    repl, _, renderer = make_repl()
    run(repl, "/help")
    shown = "\n".join(renderer.of("notice"))
    for name in COMMANDS:
        assert f"/{name}" in shown
    assert "Esc-Enter" in shown and '"""' in shown


@pytest.mark.parametrize("line", ["/exit", "/bye", "/EXIT"])
def test_exit_commands(line):
    repl, _, _ = make_repl()
    run(repl, line)
    assert repl.done


def test_ctrl_c_during_a_reply_cancels_it_and_keeps_the_partial_answer():
    repl, session, renderer = make_repl(interrupt=True)
    handler = signal.getsignal(signal.SIGINT)
    run(repl, "long one")
    assert renderer.of("end") == ["interrupted"] and session.messages[-1]["interrupted"] is True
    assert renderer.of("notice")[-1] == "interrupted: partial answer kept"
    assert signal.getsignal(signal.SIGINT) is handler


def complete(text: str) -> list[str]:
    return [c.text for c in SlashCompleter().get_completions(Document(text), None)]


def test_tab_completion_of_commands_and_arguments(xdg):
    assert complete("/th") == ["/think"]
    assert complete("/") == [f"/{name}" for name in COMMANDS]
    assert complete("/mode think-") == ["think-high", "think-max"]
    assert complete("/think ") == ["high", "max"]
    assert complete("/set t") == ["temperature", "top_p", "top_k"]
    assert complete("/set re") == ["reasoning_budget"]
    assert complete("/set temperature 0") == [] and complete("hello /th") == [] and complete("/nothink ") == []
    CannedSession().save(transcript_path("saved-one"))
    assert complete("/load sa") == ["saved-one"]


# ----------------------------------------------------------- the prompt loop
def drive(keys: str, session: ChatSession | None = None, use_history: bool = True,
          banner: str | None = "test model"):
    """Run the real prompt loop on piped keystrokes; returns (exit code, session, renderer)."""
    session = session or CannedSession()
    renderer = RecordingRenderer()
    with create_pipe_input() as pipe:
        pipe.send_text(keys)
        code = run_repl(session, renderer, banner=banner, use_history=use_history, input=pipe,
                        output=DummyOutput())
    return code, session, renderer


def test_loop_without_a_banner_when_quiet(xdg):
    code, session, renderer = drive("hello\r/exit\r", banner=None)
    assert code == 0 and session.answered == ["hello"]
    assert not any(message.startswith(("dsv4 ·", "mode ", "/help")) for message in renderer.of("notice"))


def test_loop_banner_messages_multiline_and_exit(xdg):
    keys = 'hello\r' + 'two\x1b\rlines\r' + '"""\rin\rblock\r"""\r' + '/think max\r' + '/exit\r'
    code, session, renderer = drive(keys)
    assert code == 0
    assert renderer.events[:3] == [("notice", "dsv4 · test model"),
                                   ("notice", "mode think-high · context 16,384 tokens"),
                                   ("notice", "/help for commands, Ctrl-D to quit")]
    assert session.answered == ["hello", "two\nlines", "in\nblock"]
    assert session.settings.mode is ThinkMode.THINK_MAX and len(renderer.of("warning")) == 1
    history = (xdg / "state" / "dsv4" / "history").read_text()
    assert "+hello" in history and "+/think max" in history and "+in" in history


def test_loop_ctrl_c_at_prompt_hints_and_ctrl_d_quits(xdg):
    code, session, renderer = drive("half typed\x03" + "/bogus\r" + "\x04")
    assert code == 0 and not session.answered
    assert "Ctrl-D or /exit to quit" in renderer.of("notice") and len(renderer.of("error")) == 1


def test_loop_warns_at_start_when_started_in_think_max(xdg):
    session = CannedSession()
    session.set_mode("think-max")
    _, _, renderer = drive("\x04", session)
    assert len(renderer.of("warning")) == 1 and renderer.events.index(("warning", renderer.of("warning")[0])) == 3


def test_loop_without_history_writes_no_file(xdg, monkeypatch):
    drive("hi\r\x04", use_history=False)
    monkeypatch.setenv("DSV4_NO_HISTORY", "1")
    drive("hi\r\x04")
    assert not (xdg / "state" / "dsv4" / "history").exists()


# ------------------------------------------------------ end to end in a pty
ANSI = re.compile(r"\x1b\[[0-9;?<>=]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\x1b[=>78]|\x1b\][^\x07]*\x07|[\r\x07]")


class Terminal:
    """A spawned program in a pseudo-terminal; `expect` waits for text in its output with ANSI codes
    stripped and whitespace collapsed (the renderer styles and wraps lines), after the previous match."""

    def __init__(self, child: pexpect.spawn):
        self.child = child
        self.raw = ""
        self.seen = 0

    def plain(self) -> str:
        return re.sub(r"\s+", " ", ANSI.sub("", self.raw))

    def expect(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            found = self.plain().find(text, self.seen)
            if found >= 0:
                self.seen = found + len(text)
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} did not appear; output so far:\n{self.plain()[-3000:]}")
            self._read()

    def expect_more(self, chars: int, timeout: float = 60) -> None:
        """Wait until `chars` more characters of text appeared after the previous match."""
        deadline = time.monotonic() + timeout
        while len(self.plain()) < self.seen + chars:
            if time.monotonic() > deadline:
                raise AssertionError(f"no new output; output so far:\n{self.plain()[-3000:]}")
            self._read()
        self.seen += chars

    def _read(self) -> None:
        try:
            self.raw += self.child.read_nonblocking(1 << 16, timeout=0.2)
        except pexpect.TIMEOUT:
            pass
        except pexpect.EOF:
            raise AssertionError(f"the program exited; output:\n{self.plain()[-3000:]}") from None

    def command(self, line: str, then: str, timeout: float = 30) -> None:
        """Type `line`, press Enter, wait for `then`."""
        self.child.send(line + "\r")
        self.expect(line)  # the echo, so that `then` is looked for only in what follows
        self.expect(then, timeout)


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory) -> Path:
    """An XDG cache dir holding the demo model, generated once for this module."""
    cache = tmp_path_factory.mktemp("xdg-cache")
    demo_model_dir(cache / "dsv4")
    return cache


@pytest.mark.timeout(180)
def test_chat_end_to_end_in_a_terminal(demo_cache, tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(demo_cache), "XDG_STATE_HOME": str(tmp_path / "state"),
           "XDG_DATA_HOME": str(tmp_path / "data"), "XDG_CONFIG_HOME": str(tmp_path / "config"), "TERM": "xterm",
           "PROMPT_TOOLKIT_NO_CPR": "1"}
    env.pop("DSV4_NO_HISTORY", None)
    env.pop("NO_COLOR", None)
    dsv4 = Path(sys.executable).with_name("dsv4")
    child = pexpect.spawn(str(dsv4), ["chat", "--max-tokens", "40", "--seed", "1"], env=env, dimensions=(24, 100),
                          encoding="utf-8", codec_errors="replace", timeout=30)
    term = Terminal(child)
    try:
        term.expect("built-in demo model", timeout=60)
        term.expect("/help for commands, Ctrl-D to quit")
        term.expect("think-high>")
        term.command("Hello there", "tok/s", timeout=60)  # the stats line under the reply
        term.expect("think-high>")
        term.command("/mode think-max", "think-max works best with a context of at least")
        term.expect("think-max>")
        term.command("/nothink", "non-think>")
        term.command("Tell me more", "tok/s", timeout=60)
        term.expect("non-think>")
        term.command("/save t1", "saved 4 messages to")
        saved = json.loads((tmp_path / "data" / "dsv4" / "sessions" / "t1.json").read_text())
        assert [m["role"] for m in saved["messages"]] == ["user", "assistant"] * 2
        assert saved["messages"][2]["content"] == "Tell me more" and saved["mode"] == "non-think"
        term.command("/clear", "new conversation")
        term.command("/load t1", "loaded 4 messages")
        bad = tmp_path / "data" / "dsv4" / "sessions" / "bad.json"
        bad.write_text(json.dumps({**saved, "sampling": {"seed": "one"}}))
        term.command("/load bad", "invalid contents")  # an error line; the loaded conversation stays
        term.command("/regen", "tok/s", timeout=60)
        term.expect("non-think>")
        term.command("/set max_tokens 100000", "max_tokens = 100000")
        term.command("/set reasoning_budget off", "reasoning_budget = off")
        term.command("/set temperature 50", "temperature = 50")  # near-uniform sampling: the demo never stops
        child.send("Write forever\r")
        term.expect("Write forever")
        term.expect_more(40)  # the answer is streaming
        time.sleep(0.5)
        child.sendintr()
        term.expect("interrupted: partial answer kept", timeout=30)
        term.expect("non-think>")
        reply = term.plain().rsplit("Write forever", 1)[1]
        assert reply.count("interrupted") == 1 and "^C" not in reply  # one notice; no echo under the live region
        child.sendintr()
        term.expect("Ctrl-D or /exit to quit")
        term.expect("non-think>")  # the prompt is up (raw mode): Ctrl-D is a key, not the tty's EOF
        child.sendeof()
        child.expect(pexpect.EOF, timeout=30)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, term.plain()[-3000:]
    history = (tmp_path / "state" / "dsv4" / "history").read_text()
    assert "+/save t1" in history and "+Write forever" in history


def test_trace_reopens_a_collapsed_trace():
    repl, session, renderer = make_repl()
    run(repl, "/trace")
    assert renderer.of("error") == ["no thinking trace in this conversation yet (think-high and think-max replies "
                                    "have one)"]
    session.messages = [{"role": "user", "content": "a"},
                        {"role": "assistant", "content": "x", "reasoning_content": "first trace"},
                        {"role": "user", "content": "b"}, {"role": "assistant", "content": "y"},
                        {"role": "user", "content": "c"},
                        {"role": "assistant", "content": "z", "reasoning_content": "second trace"}]
    run(repl, "/trace", "/trace 2", "/trace 3", "/trace x")
    notices = renderer.of("notice")
    assert notices[-4:] == ["thinking trace 1 of 2 (newest first):", "second trace",
                            "thinking trace 2 of 2 (newest first):", "first trace"]
    assert renderer.of("error")[-2:] == ["there are 2 thinking traces, not 3 (give 1 (the newest) to 2)",
                                         "/trace takes a number, got 'x' (1 is the newest trace, 2 the one before)"]
    run(repl, "/help")
    assert any(line.startswith("/trace [N]") for line in renderer.of("notice"))


def test_quiet_terminal_stops_the_echo_while_a_reply_streams_and_restores_it():
    import termios

    from dsv4cli.ui.repl import quiet_terminal

    master, slave = os.openpty()
    try:
        with os.fdopen(slave, "r", closefd=False) as tty_in:
            before = termios.tcgetattr(slave)[3]
            assert before & termios.ECHO
            with quiet_terminal(tty_in):
                during = termios.tcgetattr(slave)[3]
                assert not during & termios.ECHO and not during & termios.ECHOCTL
            assert termios.tcgetattr(slave)[3] == before
        with quiet_terminal(io.StringIO()):  # not a terminal: nothing to do
            pass
    finally:
        os.close(master)
        os.close(slave)
