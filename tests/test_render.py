"""Renderers: streamed markdown committed once, thinking display modes, colour env, plain/JSON output, stats."""

from __future__ import annotations

import io
import json
import random
import re

import pytest
from rich.console import Console
from rich.markdown import Markdown

import dsv4cli.ui.render as render
from dsv4cli.engine.events import GenerationStats, TurnResult
from dsv4cli.ui.render import (
    JsonRenderer,
    PlainRenderer,
    Renderer,
    TtyRenderer,
    format_stats,
    format_stats_block,
    make_renderer,
    wrap_starts,
)

WIDTH = 80

REPLY = """# Streaming test

This is a long paragraph that goes on and on to make sure it wraps over several lines of the terminal, so that \
the renderer has to commit finished lines while the rest is still streaming in from the model, which can take a \
while when the experts are offloaded to host memory and every step waits on a copy. It also has `inline code`, \
**bold words** and a [link](https://example.com) to check that styled text is committed only when it is closed.

- first item with `code`
- second item with **bold** text
- third item, long enough to wrap onto a second line of the terminal when it is rendered at eighty columns

1. one
2. two
3. three

```python
def hello(name):
    return f"hi {name}"


print(hello("world"))
```

> A quote to finish,
> over two lines.

Final words after the code.
"""


# --------------------------------------------------------------------------- helpers

_CONTROL = re.compile(r"\x1b\[([0-9;?]*)([A-Za-z])|\x1b\]8;[^\x1b\x07]*(?:\x1b\\|\x07)|\r|\n")


def screen(output: str) -> list[str]:
    """Replay terminal output on an endless screen: text, CR, LF, cursor up and erase line (what rich Live uses).

    Returns the visible lines, right-stripped, without trailing empty lines.
    """
    rows: list[list[str]] = [[]]
    row = col = pos = 0

    def put(text: str) -> None:
        nonlocal col
        line = rows[row]
        for char in text:
            if col < len(line):
                line[col] = char
            else:
                line.extend(" " * (col - len(line)))
                line.append(char)
            col += 1

    for match in _CONTROL.finditer(output):
        put(output[pos : match.start()])
        pos = match.end()
        token = match.group()
        if token == "\r":
            col = 0
        elif token == "\n":
            row, col = row + 1, 0
            if row == len(rows):
                rows.append([])
        elif match.group(2) == "A":
            row = max(0, row - int(match.group(1) or 1))
        elif match.group(2) == "K" and match.group(1) == "2":
            rows[row] = []
    put(output[pos:])
    lines = ["".join(r).rstrip() for r in rows]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def live_heights(output: str) -> list[int]:
    """Heights of the live region, read from the cursor moves rich makes to redraw it."""
    redraws = re.finditer(r"\r\x1b\[2K((?:\x1b\[1A\x1b\[2K)*)", output)
    return [m.group(1).count("\x1b[1A") + 1 for m in redraws]


def reference(markdown: str) -> list[str]:
    """The whole reply rendered at once (what the streamed screen must end up showing)."""
    out = io.StringIO()
    Console(file=out, width=WIDTH, force_terminal=True, color_system=None).print(Markdown(markdown))
    lines = screen(out.getvalue())
    while lines and not lines[0]:
        lines.pop(0)
    return lines


def chop(text: str, seed: int = 0, sizes: tuple[int, int] = (1, 3)) -> list[str]:
    rng = random.Random(seed)
    deltas, i = [], 0
    while i < len(text):
        n = rng.randint(*sizes)
        deltas.append(text[i : i + n])
        i += n
    return deltas


class Clock:
    def __init__(self, step: float = 0.0) -> None:
        self.now, self.step = 100.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def tty(show_thinking: str = "collapse", clock: Clock | None = None, **kwargs) -> tuple[TtyRenderer, io.StringIO]:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=WIDTH, color_system="truecolor")
    kwargs.setdefault("show_stats", False)
    renderer = TtyRenderer(console, thinking=show_thinking, clock=clock or Clock(0.01), **kwargs)
    return renderer, out


def stream(renderer, deltas: list[str], result: TurnResult, reasoning: list[str] = ()) -> None:
    renderer.begin_turn("think-high")
    for delta in reasoning:
        renderer.reasoning(delta)
    for delta in deltas:
        renderer.content(delta)
    renderer.end_turn(result)


@pytest.fixture(autouse=True)
def plain_environment(monkeypatch):
    """A predictable terminal: no colour/size overrides leaking in from the environment running the tests."""
    monkeypatch.setenv("TERM", "xterm-256color")
    for name in ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "COLUMNS", "LINES"):
        monkeypatch.delenv(name, raising=False)


# --------------------------------------------------------------------------- streamed markdown


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streamed_markdown_ends_as_the_one_shot_render(seed):
    fence = REPLY.index("```python") + 1
    deltas = chop(REPLY[:fence], seed) + chop(REPLY[fence:], seed)  # the opening fence arrives split
    renderer, out = tty()
    stream(renderer, deltas, TurnResult(content=REPLY))

    shown = screen(out.getvalue())
    expected = reference(REPLY)
    assert shown == expected
    for line in expected:
        if line.strip():
            assert shown.count(line) == expected.count(line), line
    assert max(live_heights(out.getvalue())) <= render.TAIL_LINES


def test_each_committed_line_printed_once_in_the_raw_output():
    """Stronger than the final screen: text outside the live region is written to the terminal only once."""
    renderer, out = tty(clock=Clock(0.0))  # no tail refresh after the first: every line written is a commit
    stream(renderer, chop(REPLY), TurnResult(content=REPLY))
    raw = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\]8;[^\x1b]*\x1b\\", "", out.getvalue())
    for line in ("This is a long paragraph", "first item with", "def hello(name):", "Final words after the code."):
        assert raw.count(line) == 1, line


def test_open_code_fence_stays_in_the_tail_until_closed():
    code = [f"value_{i} = {i} * 2" for i in range(30)]
    head = "Intro line.\n\n```python\n" + "\n".join(code) + "\n"
    renderer, out = tty(clock=Clock(1.0))
    renderer.begin_turn("chat")
    for delta in chop(head):
        renderer.content(delta)

    midway = screen(out.getvalue())
    assert midway.count("Intro line.") == 1
    visible_code = [line for line in midway if "value_" in line]
    assert 0 < len(visible_code) <= render.TAIL_LINES  # only the tail of the open block is shown
    assert "value_29 = 29 * 2" in " ".join(visible_code)

    renderer.content("```\n\nAfter.\n")
    renderer.end_turn(TurnResult(content=head + "```\n\nAfter.\n"))
    final = screen(out.getvalue())
    assert final == reference(head + "```\n\nAfter.\n")
    assert max(live_heights(out.getvalue())) <= render.TAIL_LINES


def test_long_paragraph_lines_are_committed_while_it_streams():
    words = [f"word{i:03d}" for i in range(400)]
    paragraph = " ".join(words)
    renderer, out = tty(clock=Clock(0.06))  # every delta may refresh
    renderer.begin_turn("chat")
    for word in words[:300]:
        renderer.content(word + " ")
        assert max(live_heights(out.getvalue()) or [0]) <= render.TAIL_LINES

    midway = screen(out.getvalue())
    assert midway[0].startswith("word000 word001")  # the start stays visible: committed, not cropped away
    assert " ".join(midway).split() == words[:300]  # nothing duplicated, nothing missing

    renderer.content(" ".join(words[300:]) + "\n")
    renderer.end_turn(TurnResult(content=paragraph))
    assert screen(out.getvalue()) == reference(paragraph)


def test_unbalanced_emphasis_is_not_committed_early():
    text = "Start **" + " ".join(f"bold{i}" for i in range(60)) + "** end of the paragraph with more words after it."
    renderer, out = tty(clock=Clock(0.06))
    stream(renderer, chop(text, sizes=(2, 4)), TurnResult(content=text))
    shown = screen(out.getvalue())
    assert shown == reference(text)
    assert "**" not in " ".join(shown)


def test_cjk_paragraph_wraps_like_the_one_shot_render():
    text = "这是一个很长的段落，用来测试中文文本在终端中的换行。" * 12 + "\n\n结束。\n"
    renderer, out = tty(clock=Clock(0.06))
    stream(renderer, chop(text), TurnResult(content=text))
    assert screen(out.getvalue()) == reference(text)


def test_long_list_commits_items_as_they_finish():
    items = [f"- item number {i} with some text" for i in range(20)]
    text = "\n".join(items) + "\n\nDone.\n"
    renderer, out = tty(clock=Clock(0.06))
    renderer.begin_turn("chat")
    for delta in chop("\n".join(items[:15]) + "\n"):
        renderer.content(delta)
    midway = screen(out.getvalue())
    assert midway[0] == " • item number 0 with some text"
    assert sum("item number" in line for line in midway) == 15
    renderer.content(text[len("\n".join(items[:15]) + "\n") :])
    renderer.end_turn(TurnResult(content=text))
    assert screen(out.getvalue()) == reference(text)


def test_rendering_is_linear_in_the_reply_length(monkeypatch):
    """20,000 characters in 2-character deltas: markdown is never re-rendered from the start of the reply."""
    sizes: list[int] = []

    class CountingMarkdown(Markdown):
        def __init__(self, markup: str, *args, **kwargs) -> None:
            sizes.append(len(markup))
            super().__init__(markup, *args, **kwargs)

    monkeypatch.setattr(render, "Markdown", CountingMarkdown)
    sentence = "Streaming stays linear: finished lines are printed once and only the tail is redrawn each frame. "
    section = "## Section\n\n" + sentence * 5 + "\n\n- item with `code`\n- item two\n\n```python\nprint(1)\n```\n\n"
    reply = (section * 40)[:20_000]
    renderer, out = tty(clock=Clock(0.001))  # 2,000 characters a second, 20 fps: one frame every 50 deltas
    stream(renderer, [reply[i : i + 2] for i in range(0, len(reply), 2)], TurnResult(content=reply))

    assert sum(sizes) < 5 * len(reply)
    assert max(sizes) < 2_000  # every single render is bounded, whatever the reply length
    assert screen(out.getvalue()) == reference(reply)


def test_every_frame_renders_a_bounded_tail(monkeypatch):
    sizes: list[int] = []

    class CountingMarkdown(Markdown):
        def __init__(self, markup: str, *args, **kwargs) -> None:
            sizes.append(len(markup))
            super().__init__(markup, *args, **kwargs)

    monkeypatch.setattr(render, "Markdown", CountingMarkdown)
    reply = "A sentence that keeps going without a paragraph break, for a while. " * 30 + "\n\nEnd.\n"
    renderer, out = tty(clock=Clock(1.0))  # every delta is a new frame
    stream(renderer, [reply[i : i + 2] for i in range(0, len(reply), 2)], TurnResult(content=reply))
    assert max(sizes) < 1_000 < len(reply)
    assert len(sizes) < 3 * len(reply) / 2  # about one tail render per delta, plus the commits
    assert screen(out.getvalue()) == reference(reply)


def test_raw_text_answer_without_markdown():
    text = "Some **not bold** text\n# not a heading\n" + "x " * 100
    renderer, out = tty(markdown=False)
    stream(renderer, chop(text), TurnResult(content=text))
    shown = screen(out.getvalue())
    assert shown[:2] == ["Some **not bold** text", "# not a heading"]
    assert " ".join(shown[2:]).split() == ["x"] * 100
    assert all(len(line) <= WIDTH for line in shown)


# --------------------------------------------------------------------------- thinking


def test_collapse_replaces_the_trace_with_a_summary():
    trace = ["pondering ", "the question\n", "and more pondering\n"] * 10
    clock = Clock()
    renderer, out = tty("collapse", clock=clock)
    renderer.begin_turn("think-high")
    for delta in trace:
        clock.now += 0.1
        renderer.reasoning(delta)
    clock.now += 0.1
    renderer.content("The answer.")
    renderer.end_turn(TurnResult(content="The answer.", reasoning="".join(trace)))
    shown = screen(out.getvalue())
    assert "pondering" in out.getvalue()  # it was streamed…
    assert not any("pondering" in line or "Thinking" in line for line in shown)  # …and cleared
    assert shown[0] == "Thought for 3.0 s"  # time only: the answer started before the token count was known
    assert shown[1] == "The answer."
    assert max(live_heights(out.getvalue())) <= render.TAIL_LINES


def test_summary_counts_tokens_when_reasoning_ends_with_the_turn():
    clock = Clock()
    renderer, out = tty("collapse", clock=clock)
    renderer.begin_turn("think-max")
    renderer.reasoning("h")
    clock.now += 1.5
    renderer.reasoning("mm")
    renderer.end_turn(TurnResult(reasoning="hmm", stats=GenerationStats(reasoning_tokens=812)))
    assert screen(out.getvalue()) == ["Thought for 1.5 s · 812 tokens"]


def test_keep_leaves_the_trace_visible():
    trace = "first thought\nsecond thought, " + "long " * 30 + "\n"
    renderer, out = tty("keep")
    stream(renderer, ["Answer."], TurnResult(content="Answer."), reasoning=chop(trace))
    shown = screen(out.getvalue())
    assert shown[0] == "Thinking…"
    assert shown[1:3] == ["first thought", "second thought, " + "long " * 12 + "long"]
    assert shown.count("first thought") == 1
    assert shown[-3].startswith("Thought for ")
    assert shown[-2:] == ["", "Answer."]


def test_hide_never_shows_the_trace():
    renderer, out = tty("hide")
    stream(renderer, ["Answer."], TurnResult(content="Answer."), reasoning=["secret ", "pondering"])
    assert "pondering" not in out.getvalue()
    shown = screen(out.getvalue())
    assert shown[0].startswith("Thought for ") and shown[1] == "Answer."


def test_reasoning_given_only_in_the_result_is_summarised_with_its_stats():
    renderer, out = tty("collapse")
    stats = GenerationStats(reasoning_tokens=40, reasoning_seconds=2.5)
    stream(renderer, [], TurnResult(content="Done.", reasoning="thoughts", stats=stats))
    assert screen(out.getvalue()) == ["Thought for 2.5 s · 40 tokens", "Done."]
    renderer.end_turn(TurnResult(reasoning="thoughts", stats=GenerationStats(reasoning_tokens=3)))
    assert screen(out.getvalue())[-1] == "Thought · 3 tokens"  # no timing known


# --------------------------------------------------------------------------- colour and terminals


def _colour_codes(output: str) -> list[str]:
    params = [p for m in re.finditer(r"\x1b\[([0-9;]*)m", output) for p in m.group(1).split(";")]
    return [p for p in params if re.fullmatch(r"3[0-8]|4[0-8]|9[0-7]|10[0-7]", p)]


@pytest.mark.parametrize("no_color", [False, True])
def test_no_color_is_respected(monkeypatch, no_color):
    monkeypatch.setenv("FORCE_COLOR", "1")  # a terminal, for a console the renderer creates itself
    if no_color:
        monkeypatch.setenv("NO_COLOR", "1")
    out = io.StringIO()
    renderer = TtyRenderer(file=out, clock=Clock(0.01))
    reply = "# Title\n\n```python\nprint('x')\n```\n"
    stream(renderer, chop(reply), TurnResult(content=reply, stats=GenerationStats(prompt_tokens=5)))
    renderer.warning("careful")
    assert bool(_colour_codes(out.getvalue())) is not no_color
    assert "\x1b[" in out.getvalue()  # still a terminal (cursor control, dim)


def test_dumb_terminal_gets_no_escape_codes(monkeypatch):
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.setenv("TERM", "dumb")
    out = io.StringIO()
    renderer = TtyRenderer(file=out, clock=Clock(0.01))
    stream(renderer, chop(REPLY), TurnResult(content=REPLY), reasoning=["pondering\n"])
    assert "\x1b" not in out.getvalue()
    lines = out.getvalue().splitlines()
    assert "pondering" not in out.getvalue()
    assert lines[0].startswith("Thought for ")
    assert [line.rstrip() for line in lines[1:]] == reference(REPLY)


# --------------------------------------------------------------------------- turn trailer


def test_interrupted_marker_tool_calls_and_malformed_warning():
    call = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    result = TurnResult(
        content="Partial answ",
        interrupted=True,
        tool_calls=[call],
        malformed=True,
        problems=["unclosed tool call", "bad parameter"],
        stats=GenerationStats(prompt_tokens=12, generated_tokens=3, finish_reason="cancelled"),
    )
    renderer, out = tty(show_stats=True)
    stream(renderer, ["Partial", " answ"], result)
    assert screen(out.getvalue()) == [
        "Partial answ",  # no marker of its own: the REPL gives the one interrupt notice
        'tool call get_weather {"city": "Paris"}',
        "warning: malformed model output: unclosed tool call; bad parameter",
        "prompt 12 tok · gen 3 tok",
    ]


def test_notices_warnings_errors_on_the_tty():
    renderer, out = tty()
    renderer.notice("mode: think-max")
    renderer.warning("context below 384K")
    renderer.error("out of memory")
    assert screen(out.getvalue()) == ["mode: think-max", "warning: context below 384K", "error: out of memory"]


def test_close_restores_an_abandoned_turn():
    renderer, out = tty()
    renderer.begin_turn("chat")
    renderer.content("half a line")
    renderer.close()
    renderer.close()
    raw = out.getvalue()
    assert raw.rfind("\x1b[?25h") > raw.rfind("\x1b[?25l")  # cursor shown again
    assert screen(raw) == ["half a line"]  # what was generated stays on screen
    renderer.begin_turn("chat")
    renderer.content("next\n")
    renderer.end_turn(TurnResult(content="next\n"))
    assert screen(out.getvalue()) == ["half a line", "next"]


# --------------------------------------------------------------------------- stats


def test_stats_line_full():
    stats = GenerationStats(
        prompt_tokens=1234,
        cached_tokens=1000,
        generated_tokens=512,
        prefill_seconds=234 / 410,
        decode_seconds=511 / 9.8,
        time_to_first_token=3.1,
        peak_memory_bytes=61_200_000_000,
        expert_cache_hit_rate=0.93,
    )
    assert format_stats(stats) == (
        "prompt 1,234 tok @ 410 tok/s · cached 1,000 · gen 512 tok @ 9.8 tok/s · TTFT 3.1 s"
        " · experts hit 93% · peak 61.2 GB"
    )


def test_stats_line_omits_unknown_parts():
    assert format_stats(GenerationStats()) == ""
    assert format_stats(GenerationStats(generated_tokens=1, time_to_first_token=0.42)) == "gen 1 tok · TTFT 420 ms"
    assert format_stats(GenerationStats(prompt_tokens=7, finish_reason="length")).endswith("stopped at the token limit")


def test_stats_block_for_verbose():
    block = format_stats_block(GenerationStats(prompt_tokens=10, generated_tokens=5, decode_seconds=2.0))
    assert "prompt tokens:" in block and "decode:" in block and "2.00 tok/s" in block
    assert "expert cache" not in block


# --------------------------------------------------------------------------- plain and JSON


def test_plain_renderer_writes_only_the_answer_to_stdout():
    out, err = io.StringIO(), io.StringIO()
    renderer = PlainRenderer(out, err)
    renderer.notice("loading")
    stream(renderer, ["# Hi", " **there**"], TurnResult(content="# Hi **there**"), reasoning=["secret"])
    assert out.getvalue() == "# Hi **there**\n"
    assert err.getvalue() == "loading\n"


def test_plain_renderer_thinking_stats_and_tool_calls():
    out, err = io.StringIO(), io.StringIO()
    renderer = PlainRenderer(out, err, show_thinking=True, verbose=True)
    call = {"type": "function", "function": {"name": "f", "arguments": "{}"}}
    result = TurnResult(content="done\n", tool_calls=[call], interrupted=True, stats=GenerationStats(prompt_tokens=3))
    stream(renderer, ["do", "ne\n"], result, reasoning=["think", "ing"])
    assert out.getvalue() == 'done\n{"tool_call": {"type": "function", "function": {"name": "f", "arguments": "{}"}}}\n'
    assert err.getvalue() == "thinking\n[interrupted]\n" + format_stats_block(result.stats) + "\n"
    assert "\x1b" not in out.getvalue() + err.getvalue()


def test_plain_renderer_frames_the_trace_on_a_terminal_only():
    """On a terminal stderr the one-shot trace sits between "Thinking..." and "...done thinking."; on a
    pipe (StringIO: not a TTY) it comes bare; stdout carries the answer alone either way."""
    for markers, framed in ((True, "Thinking...\nthinking\n...done thinking.\n\n"), (None, "thinking\n")):
        out, err = io.StringIO(), io.StringIO()
        stream(PlainRenderer(out, err, show_thinking=True, markers=markers), ["Answer."], TurnResult(content="Answer."),
               reasoning=["think", "ing"])
        assert out.getvalue() == "Answer.\n" and err.getvalue() == framed
    out, err = io.StringIO(), io.StringIO()
    stream(PlainRenderer(out, err, markers=True), ["Answer."], TurnResult(content="Answer."), reasoning=["hidden"])
    assert err.getvalue() == ""  # no trace shown, no frame


def test_plain_renderer_empty_answer_and_messages():
    out, err = io.StringIO(), io.StringIO()
    renderer = PlainRenderer(out, err)
    stream(renderer, [], TurnResult(malformed=True, problems=["x"]))
    renderer.warning("w")
    renderer.error("e")
    assert out.getvalue() == ""
    assert err.getvalue() == "warning: malformed model output: x\nwarning: w\nerror: e\n"
    with pytest.raises(TypeError):
        PlainRenderer(out, err, show_thinking="collapse")


def test_json_renderer_prints_one_object():
    out, err = io.StringIO(), io.StringIO()
    renderer = JsonRenderer(out, err)
    stats = GenerationStats(
        prompt_tokens=10,
        cached_tokens=4,
        generated_tokens=6,
        reasoning_tokens=2,
        prefill_seconds=0.5,
        decode_seconds=1.0,
        time_to_first_token=0.6,
        finish_reason="length",
    )
    result = TurnResult(content="héllo ✓", reasoning="r", stats=stats, problems=[])
    renderer.notice("note")
    stream(renderer, ["hé", "llo ✓"], result, reasoning=["r"])
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n") and "héllo ✓" in text
    data = json.loads(text)
    assert set(data) == {
        "mode",
        "content",
        "reasoning",
        "tool_calls",
        "finish_reason",
        "stopped_in_reasoning",
        "interrupted",
        "usage",
        "timings",
        "malformed",
        "problems",
    }
    assert data["usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": 6,
        "cached_tokens": 4,
        "reasoning_tokens": 2,
        "total_tokens": 16,
    }
    assert data["timings"] == {
        "prefill_seconds": 0.5,
        "decode_seconds": 1.0,
        "time_to_first_token": 0.6,
        "prefill_tokens_per_second": 12.0,
        "decode_tokens_per_second": 5.0,
    }
    assert (data["content"], data["finish_reason"], data["interrupted"]) == ("héllo ✓", "length", False)
    assert data["mode"] == "think-high"  # the mode the turn ran in (begin_turn)
    assert err.getvalue() == "note\n"


def test_json_renderer_leads_with_the_request_and_reports_no_rate_for_a_cancelled_prefill():
    out = io.StringIO()
    request = {"model": "demo", "sampling": {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "seed": 3}}
    renderer = JsonRenderer(out, io.StringIO(), request=request)
    stats = GenerationStats(prompt_tokens=900, prefill_seconds=2.0, finish_reason="cancelled", prefill_cancelled=True)
    stream(renderer, [], TurnResult(interrupted=True, stats=stats), reasoning=[])
    data = json.loads(out.getvalue())
    assert list(data)[:3] == ["model", "sampling", "mode"]
    assert data["model"] == "demo" and data["sampling"]["seed"] == 3 and data["mode"] == "think-high"
    # 900 tokens were not prefilled in 2 s: the prefill was cut short, so there is no rate to report
    assert data["timings"]["prefill_tokens_per_second"] is None and data["timings"]["prefill_seconds"] == 2.0
    assert stats.prefill_tokens_per_second == 0.0
    assert "cancelled" in format_stats_block(stats) and "tok/s" not in format_stats(stats)


# --------------------------------------------------------------------------- factory, protocol, wrapping


def test_make_renderer():
    out, err = io.StringIO(), io.StringIO()
    plain = make_renderer("plain", stdout=out, stderr=err, verbose=True, markdown=False)
    assert isinstance(plain, PlainRenderer) and plain.verbose
    assert isinstance(make_renderer("json", stdout=out, show_stats=True), JsonRenderer)
    console = Console(file=io.StringIO(), width=WIDTH)
    assert make_renderer("tty", console=console, thinking="keep", verbose=True).thinking == "keep"
    with pytest.raises(ValueError):
        make_renderer("html")
    with pytest.raises(TypeError):
        make_renderer("tty", colour=True)
    with pytest.raises(ValueError):
        TtyRenderer(console, thinking="fold")


def test_renderers_follow_the_protocol():
    for renderer in (TtyRenderer(Console(file=io.StringIO())), PlainRenderer(), JsonRenderer()):
        assert isinstance(renderer, Renderer)


def test_wrap_starts():
    assert wrap_starts("aaa bbb ccc", 7) == [0, 8]
    assert wrap_starts("x" * 10, 4) == [0, 4, 8]
    assert wrap_starts("中文中文", 4) == [0, 2]  # two cells a character
    assert wrap_starts("", 10) == [0]


def test_prefill_progress_on_a_terminal_and_never_on_a_pipe():
    out, err = io.StringIO(), io.StringIO()
    renderer = PlainRenderer(out, err, markers=True)
    renderer.begin_turn("non-think")
    renderer.prefill(0, 4096)
    renderer.prefill(2048, 4096)
    renderer.content("Answer.")
    renderer.end_turn(TurnResult(content="Answer."))
    assert out.getvalue() == "Answer.\n" and "reading the prompt: 2,048 / 4,096 tokens" in err.getvalue()
    assert err.getvalue().endswith("\r\x1b[2K") and screen(err.getvalue()) == []
    out, err = io.StringIO(), io.StringIO()
    piped = PlainRenderer(out, err)
    piped.begin_turn("non-think")
    piped.prefill(0, 4096)
    piped.end_turn(TurnResult(content="Answer."))
    assert err.getvalue() == "" and out.getvalue() == "Answer.\n"
    renderer, shown = tty()
    renderer.begin_turn("non-think")
    renderer.prefill(0, 4096)
    renderer.prefill(1024, 4096)
    assert "reading the prompt: 1,024 / 4,096 tokens" in shown.getvalue()
    renderer.content("Done.")
    renderer.end_turn(TurnResult(content="Done."))
    assert screen(shown.getvalue()) == ["Done."]
