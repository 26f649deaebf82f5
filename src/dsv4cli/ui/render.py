"""Renderers for assistant turns: rich on a TTY, raw text for pipes, one JSON object for `--json`.

The chat session drives one renderer per turn::

    r.begin_turn("think-high")
    r.reasoning(delta) ...      # streamed thinking text (always before the content)
    r.content(delta) ...        # streamed answer text (never raw DSML)
    r.end_turn(result)          # the finished `TurnResult`

plus `notice`, `warning` and `error` at any time, and `close` to restore the terminal when a turn is abandoned.
Nothing here imports torch or the model (spec 2.6: "core never imports rich", and the reverse).
"""

from __future__ import annotations

import inspect
import itertools
import json
import re
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol, TextIO, runtime_checkable

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderResult
from rich.live import Live
from rich.markdown import Markdown
from rich.segment import Segment
from rich.style import Style
from rich.text import Text

from dsv4cli.engine.events import GenerationStats, TurnResult

if TYPE_CHECKING:
    from markdown_it.token import Token

ThinkingDisplay = Literal["collapse", "keep", "hide"]
RendererKind = Literal["tty", "plain", "json"]
Line = list[Segment]

TAIL_LINES = 6  # the most lines the live (re-drawn) region ever holds
_PARAGRAPH_CUT_AT = 4  # a streaming paragraph taller than this commits all but its last lines...
_PARAGRAPH_KEEP = 2  # ...keeping these in the live tail
_SEP = " · "


@runtime_checkable
class Renderer(Protocol):
    """What the chat session calls; one `begin_turn` … `end_turn` cycle per assistant turn. A renderer may
    also have `prefill(done, total)`: progress through a long prompt before the first token (terminals)."""

    def begin_turn(self, mode_label: str) -> None:
        """A turn starts; `mode_label` (e.g. "think-high") is informational."""

    def reasoning(self, text: str) -> None:
        """A streamed piece of the thinking trace."""

    def content(self, text: str) -> None:
        """A streamed piece of the answer (display text, never DSML)."""

    def end_turn(self, result: TurnResult) -> None:
        """The turn is over: final content, reasoning, tool calls, stats and the interrupted flag."""

    def notice(self, message: str) -> None:
        """An informational line, e.g. "mode: think-max"."""

    def warning(self, message: str) -> None:
        """A warning line."""

    def error(self, message: str) -> None:
        """An error line."""

    def close(self) -> None:
        """Restore the terminal if a turn was abandoned without `end_turn` (idempotent)."""


# --------------------------------------------------------------------------- stats


def _rate(per_second: float) -> str:
    return f"{per_second:,.0f}" if per_second >= 100 else f"{per_second:.1f}"


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s"


def format_stats(stats: GenerationStats) -> str:
    """One muted line: `prompt 1,234 tok @ 410 tok/s · cached 1,000 · gen 512 tok @ 9.8 tok/s · TTFT 3.1 s · …`.

    Parts that are unknown or zero are left out (the expert hit rate is shown whenever it is not None).
    """
    parts = []
    if stats.prompt_tokens:
        rate = stats.prefill_tokens_per_second
        parts.append(f"prompt {stats.prompt_tokens:,} tok" + (f" @ {_rate(rate)} tok/s" if rate > 0 else ""))
    if stats.cached_tokens:
        parts.append(f"cached {stats.cached_tokens:,}")
    if stats.generated_tokens:
        rate = stats.decode_tokens_per_second
        parts.append(f"gen {stats.generated_tokens:,} tok" + (f" @ {_rate(rate)} tok/s" if rate > 0 else ""))
    if stats.time_to_first_token > 0:
        parts.append(f"TTFT {_duration(stats.time_to_first_token)}")
    if stats.expert_cache_hit_rate is not None:
        parts.append(f"experts hit {stats.expert_cache_hit_rate:.0%}")
    if stats.peak_memory_bytes:
        parts.append(f"peak {stats.peak_memory_bytes / 1e9:.1f} GB")
    if stats.finish_reason == "length":
        parts.append("stopped at the token limit")
    return _SEP.join(parts)


def format_stats_block(stats: GenerationStats) -> str:
    """The multi-line `--verbose` block (ollama style), one `label: value` per line."""
    rows = [
        ("prompt tokens", f"{stats.prompt_tokens:,} ({stats.cached_tokens:,} cached)"),
        ("prefill", f"{stats.prefill_seconds:.3f} s, " + ("cancelled" if stats.prefill_cancelled else
                                                          f"{stats.prefill_tokens_per_second:.2f} tok/s")),
        ("generated tokens", f"{stats.generated_tokens:,} ({stats.reasoning_tokens:,} reasoning)"),
        ("decode", f"{stats.decode_seconds:.3f} s, {stats.decode_tokens_per_second:.2f} tok/s"),
        ("time to first token", f"{stats.time_to_first_token:.3f} s"),
    ]
    if stats.expert_cache_hit_rate is not None:
        rows.append(("expert cache hits", f"{stats.expert_cache_hit_rate:.1%}"))
    if stats.peak_memory_bytes:
        rows.append(("peak memory", f"{stats.peak_memory_bytes / 1e9:.2f} GB"))
    rows.append(("finish reason", stats.finish_reason))
    width = max(len(label) for label, _ in rows) + 1
    return "\n".join(f"{label + ':':<{width}} {value}" for label, value in rows)


def prefill_line(done: int, total: int, seconds: float) -> str:
    """`reading the prompt: 2,048 / 8,192 tokens · 85.3 tok/s` (the rate once there is one)."""
    rate = f" · {_rate(done / seconds)} tok/s" if done and seconds > 0 else ""
    return f"reading the prompt: {done:,} / {total:,} tokens{rate}"


def thought_summary(seconds: float | None, tokens: int = 0) -> str:
    """`Thought for 12.3 s · 812 tokens`; each part only when known."""
    timing = f" for {_duration(seconds)}" if seconds is not None else ""
    return f"Thought{timing}" + (f"{_SEP}{tokens:,} tokens" if tokens else "")


def _tool_call_parts(call: dict[str, Any]) -> tuple[str, str]:
    """(name, compact JSON arguments) of an OpenAI-style or flat `{"name", "arguments"}` tool call."""
    function = call.get("function", call)
    name = str(function.get("name", "?"))
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return name, arguments
    return name, json.dumps(arguments, ensure_ascii=False)


def turn_to_json(result: TurnResult, request: dict[str, Any] | None = None) -> dict[str, Any]:
    """The `--json` object for one turn; `request` (model, mode, sampling: what produced it) comes first.
    A prefill cut short by Ctrl-C reports null prefill rates: no prompt was prefilled."""
    s = result.stats
    prefill_rate = None if s.prefill_cancelled else round(s.prefill_tokens_per_second, 3)
    return {
        **(request or {}),
        "content": result.content,
        "reasoning": result.reasoning,
        "tool_calls": result.tool_calls,
        "finish_reason": s.finish_reason,
        "stopped_in_reasoning": result.stopped_in_reasoning,
        "interrupted": result.interrupted,
        "usage": {
            "prompt_tokens": s.prompt_tokens,
            "completion_tokens": s.generated_tokens,
            "cached_tokens": s.cached_tokens,
            "reasoning_tokens": s.reasoning_tokens,
            "total_tokens": s.prompt_tokens + s.generated_tokens,
            **({"draft_tokens": s.draft_tokens, "accepted_draft_tokens": s.accepted_draft_tokens}
               if s.draft_tokens else {}),
        },
        "timings": {
            "prefill_seconds": round(s.prefill_seconds, 4),
            "decode_seconds": round(s.decode_seconds, 4),
            "time_to_first_token": round(s.time_to_first_token, 4),
            "prefill_tokens_per_second": prefill_rate,
            "decode_tokens_per_second": round(s.decode_tokens_per_second, 3),
        },
        "malformed": result.malformed,
        "problems": result.problems,
    }


# --------------------------------------------------------------------------- plain-text line streaming

_WRAP_TOKEN = re.compile(r"\S+\s*|\s+")


def wrap_starts(text: str, width: int) -> list[int]:
    """Offsets where the lines of a greedy word wrap at `width` cells start; over-long words are folded.

    Appending text never moves a break before the last line, which is what lets finished lines be committed.
    """
    width = max(width, 1)
    starts, column = [0], 0
    for match in _WRAP_TOKEN.finditer(text):
        token = match.group()
        word = token.rstrip()
        if column and column + cell_len(word) > width:
            starts.append(match.start())
            column = 0
        for offset, char in enumerate(word):
            char_width = cell_len(char)
            if column and column + char_width > width:
                starts.append(match.start() + offset)
                column = 0
            column += char_width
        column += len(token) - len(word)
    return starts


def _wrap(text: str, width: int) -> list[str]:
    starts = wrap_starts(text, width)
    return [text[a:b].rstrip() for a, b in itertools.pairwise([*starts, len(text)])]


class _Lines:
    """A renderable of pre-rendered lines, each followed by a newline."""

    def __init__(self, lines: Sequence[Line]) -> None:
        self.lines = lines

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        newline = Segment.line()
        for line in self.lines:
            yield from line
            yield newline


class _TextStream:
    """Raw text wrapped to the console width: finished display lines come out once, the open line is the tail."""

    def __init__(self, console: Console, style: str = "") -> None:
        self._console = console
        self._style = Style.parse(style) if style else None
        self.partial = ""

    def _line(self, text: str) -> Line:
        return [Segment(text, self._style)] if text else []

    def feed(self, text: str) -> list[Line]:
        width = self._console.width
        *finished, self.partial = (self.partial + text.replace("\t", "    ").replace("\r", "")).split("\n")
        done = [line for source in finished for line in _wrap(source, width)]
        starts = wrap_starts(self.partial, width)
        if len(starts) > 1:
            done += [self.partial[a:b].rstrip() for a, b in itertools.pairwise(starts)]
            self.partial = self.partial[starts[-1] :]
        return [self._line(line) for line in done]

    def render_tail(self) -> tuple[list[Line], list[Line]]:
        return [], ([self._line(self.partial)] if self.partial else [])

    def finish(self) -> list[Line]:
        lines = [self._line(line) for line in _wrap(self.partial, self._console.width)] if self.partial else []
        self.partial = ""
        return lines


# --------------------------------------------------------------------------- streaming markdown

_FENCE_CLOSE = re.compile(r" {0,3}(`{3,}|~{3,})[ \t]*$")
_UNMATCHED_INLINE = re.compile(r"[*`\[\]~]|(?<![0-9A-Za-z])_|_(?![0-9A-Za-z])")
_LIST_START = re.compile(r"\d{1,9}[.)](\s|$)")
_WORD = re.compile(r"\S+")


def _top_level_blocks(tokens: Iterable[Token]) -> list[Token]:
    return [t for t in tokens if t.level == 0 and t.nesting >= 0 and t.map]


def _closes_fence(line: str, opener: str) -> bool:
    match = _FENCE_CLOSE.match(line)
    return bool(match) and match.group(1)[0] == opener[0] and len(match.group(1)) >= len(opener)


def _block_is_closed(block: Token, lines: list[str]) -> bool:
    """Whether nothing appended later can change `block` (the last top-level block of `lines`)."""
    start, end = block.map
    if block.type in ("heading_open", "hr"):
        return True
    if block.type == "fence":
        return end - 1 > start and _closes_fence(lines[end - 1], block.markup)
    if block.type in ("paragraph_open", "table_open", "blockquote_open"):
        return end < len(lines) and not lines[end].strip()
    return False  # lists, indented code, html: wait for the next block


def _inline_balanced(tokens: Iterable[Token]) -> bool:
    """No unmatched emphasis/code/link delimiters (a later closer could restyle the text)."""
    for token in tokens:
        for child in token.children or ():
            if child.type == "text" and _UNMATCHED_INLINE.search(child.content):
                return False
    return True


def _starts_plain(text: str) -> bool:
    """Text that cannot open a block when it starts a line (a paragraph may be resumed with it)."""
    first = text[:1]
    return bool(first) and (first.isalpha() or first in "\"'(“‘«" or (first.isdigit() and not _LIST_START.match(text)))


def _plain(line: Line) -> str:
    return "".join(s.text for s in line if not s.control)


def _line_key(line: Line) -> tuple[tuple[str, Style | None], ...]:
    segments = [s for s in Segment.simplify(line) if not s.control]
    while segments and not segments[-1].text.strip():
        segments.pop()
    if segments:
        segments[-1] = Segment(segments[-1].text.rstrip(), segments[-1].style)
    return tuple((s.text, s.style) for s in segments)


def _cut_candidates(source: str, committed: list[Line]) -> list[int]:
    """Source offsets that may match the end of `committed` rendered lines: by words, and by characters (CJK)."""
    shown = " ".join(_plain(line) for line in committed)
    candidates = []
    words = list(_WORD.finditer(source))
    count = len(shown.split())
    if count < len(words):
        candidates.append(words[count].start())
    chars = sum(len(word) for word in shown.split())
    seen = 0
    for index, char in enumerate(source):
        if not char.isspace():
            if seen == chars:
                candidates.append(index)
                break
            seen += 1
    return list(dict.fromkeys(candidates))


class _MarkdownStream:
    """Markdown source in; rendered lines out, each exactly once; only the unfinished block stays live.

    Finished top-level blocks (a later block has started, or a blank line / closing fence ends them) are rendered
    once and committed. A list commits its finished items. A long paragraph commits its wrapped lines except the
    last few, when the committed part renders identically on its own. An open code fence stays in the tail,
    which then shows only its last lines, and is rendered as a unit when it closes.
    """

    def __init__(self, console: Console, code_theme: str = "monokai") -> None:
        self._console = console
        self._code_theme = code_theme
        self.pending = ""
        self._started = False  # something was committed this turn
        self._blank_before_next = False  # the last committed block wants a blank line after it (all but hr)
        self._continues: tuple[str, str] | None = None  # (token type, markup) the next commit may continue
        self._fence: str | None = None  # opener of the fence that `pending` starts with and that is still open
        self._fence_scanned = 0
        self._cut_failed_at = 0

    def _markdown(self, source: str) -> Markdown:
        return Markdown(source, code_theme=self._code_theme)

    def _render(self, markdown: Markdown) -> list[Line]:
        return self._console.render_lines(markdown, self._console.options, pad=False)

    def feed(self, text: str) -> list[Line]:
        self.pending += text.replace("\r", "")
        return self._commit_finished_blocks() if "\n" in text else []

    def finish(self) -> list[Line]:
        source, self.pending, self._fence = self.pending, "", None
        return self._commit(source, None) if source.strip() else []

    def render_tail(self) -> tuple[list[Line], list[Line]]:
        """(lines to commit now, the live tail ≤ TAIL_LINES)."""
        if not self.pending.strip():
            return [], []
        if self._fence is not None:
            return [], self._spaced(self._fence_tail(), ("fence", self._fence))[-TAIL_LINES:]
        markdown = self._markdown(self.pending)
        lines = self._render(markdown)
        blocks = _top_level_blocks(markdown.parsed)
        committed: list[Line] = []
        single_paragraph = [t.type for t in markdown.parsed if t.level == 0] == ["paragraph_open", "paragraph_close"]
        if single_paragraph and len(lines) > max(_PARAGRAPH_CUT_AT, self._cut_failed_at):
            cut = self._cut_paragraph(self.pending, lines)
            if cut is None:
                self._cut_failed_at = len(lines)
            else:
                committed, self.pending = self._emit(cut[0], blocks[0], blocks[0]), cut[1]
                self._continues = ("paragraph_open", "")
                self._cut_failed_at = 0
                markdown = self._markdown(self.pending)
                lines = self._render(markdown)
                blocks = _top_level_blocks(markdown.parsed)
        first = (blocks[0].type, blocks[0].markup) if blocks else ("", "")
        return committed, self._spaced(lines, first)[-TAIL_LINES:]

    # -- block commits

    def _commit_finished_blocks(self) -> list[Line]:
        complete = self.pending.rfind("\n") + 1
        if self._fence is not None and not self._fence_closed(complete):
            return []
        self._fence = None
        tokens = self._markdown(self.pending[:complete]).parsed
        blocks = _top_level_blocks(tokens)
        if not blocks:
            self.pending = self.pending[complete:]
            return []
        lines = self.pending[: complete - 1].split("\n")
        end_line, continues = self._finished_end_line(blocks[-1], tokens, lines)
        cut = sum(len(line) + 1 for line in lines[:end_line])
        chunk, self.pending = self.pending[:cut], self.pending[cut:]
        self._fence_scanned = complete - cut
        return self._commit(chunk, continues) if chunk.strip() else []

    def _finished_end_line(self, last: Token, tokens: list[Token], lines: list[str]) -> tuple[int, Any]:
        """(source lines that are final, what the rest may continue); notes an open fence."""
        if _block_is_closed(last, lines):
            return last.map[1], None
        if last.type == "fence":
            self._fence = last.markup
        if last.type in ("bullet_list_open", "ordered_list_open"):
            items = [t.map[0] for t in tokens if t.type == "list_item_open" and t.level == 1 and t.map]
            items = [start for start in items if start >= last.map[0]]
            if len(items) > 1:
                return items[-1], (last.type, last.markup)
        return last.map[0], None

    def _fence_closed(self, complete: int) -> bool:
        assert self._fence is not None
        new_lines = self.pending[self._fence_scanned : complete].split("\n")
        self._fence_scanned = complete
        return any(_closes_fence(line, self._fence) for line in new_lines)

    def _commit(self, chunk: str, continues: tuple[str, str] | None) -> list[Line]:
        markdown = self._markdown(chunk)
        blocks = _top_level_blocks(markdown.parsed)
        out = self._emit(self._render(markdown), blocks[0], blocks[-1]) if blocks else []
        self._continues = continues
        self._cut_failed_at = 0
        return out

    def _spaced(self, rendered: list[Line], first: tuple[str, str]) -> list[Line]:
        """`rendered` (a standalone render) with the blank line a single whole-reply render would put before it.

        Rich puts one blank line between top-level blocks, except after a rule; lists and quotes bring their own
        (a standalone render starts with it), which a continued list must drop, as must the reply's first block.
        """
        brings_blank = bool(rendered) and not _plain(rendered[0])
        if first == self._continues or not self._started:
            return rendered[1:] if brings_blank else rendered
        if brings_blank or not self._blank_before_next:
            return rendered
        return [[], *rendered]

    def _emit(self, rendered: list[Line], first: Token, last: Token) -> list[Line]:
        out = self._spaced(rendered, (first.type, first.markup))
        self._started = True
        self._blank_before_next = last.type != "hr"
        return out

    # -- partial renders

    def _fence_tail(self) -> list[Line]:
        opener, _, body = self.pending.partition("\n")
        recent = body.rsplit("\n", TAIL_LINES)[-TAIL_LINES:]
        return self._render(self._markdown(opener + "\n" + "\n".join(recent)))[-TAIL_LINES - 1 :]

    def _cut_paragraph(self, source: str, lines: list[Line]) -> tuple[list[Line], str] | None:
        """Split a streaming paragraph after its first rendered lines, if that part renders the same alone."""
        for keep in range(len(lines) - _PARAGRAPH_KEEP, max(len(lines) - _PARAGRAPH_KEEP - 2, 0), -1):
            head = lines[:keep]
            for cut in _cut_candidates(source, head):
                if not _starts_plain(source[cut:]):
                    continue
                markdown = self._markdown(source[:cut])
                if not _inline_balanced(markdown.parsed):
                    continue
                if [_line_key(x) for x in self._render(markdown)] == [_line_key(x) for x in head]:
                    return head, source[cut:]
        return None


# --------------------------------------------------------------------------- TTY


class TtyRenderer:
    """Rich output for a terminal: a dim thinking section and markdown answers streamed without flicker.

    Thinking: a dim "Thinking…" header over the streamed trace. When the reasoning ends it is collapsed into
    "Thought for 12.3 s · 812 tokens" ("collapse": only the trace tail is ever on screen, in the live region,
    so it can be cleared), left in place ("keep", followed by the summary), or never shown ("hide": the header
    while thinking, then the summary). When the answer starts before `end_turn`, the token count is not known
    yet, so that summary gives the time only; it is measured with `clock` from the first reasoning delta.

    Answer: finished markdown blocks are printed once, permanently; only the unfinished block is re-rendered,
    as a live tail of at most `TAIL_LINES` lines, at most `max_fps` times a second (the tail is refreshed when a
    delta arrives, so a pause shows the text of the last refresh until the next delta or `end_turn`).
    """

    def __init__(
        self,
        console: Console | None = None,
        *,
        file: TextIO | None = None,
        thinking: ThinkingDisplay = "collapse",
        markdown: bool = True,
        show_stats: bool = True,
        max_fps: float = 20.0,
        clock: Callable[[], float] = time.monotonic,
        code_theme: str = "monokai",
    ) -> None:
        if thinking not in ("collapse", "keep", "hide"):
            raise ValueError(f"thinking must be collapse, keep or hide, not {thinking!r}")
        if max_fps <= 0:
            raise ValueError(f"max_fps must be positive, not {max_fps!r}")
        self._redirect = console is None and file is None  # a console on the real stdout: catch stray prints
        self.console = console or Console(file=file, highlight=False)
        self.thinking = thinking
        self.markdown = markdown
        self.show_stats = show_stats
        self._frame_seconds = 1.0 / max_fps
        self._clock = clock
        self._code_theme = code_theme
        self._live: Live | None = None
        self._reset_turn()

    # -- protocol

    def begin_turn(self, mode_label: str) -> None:
        self.close()
        self._reset_turn()

    def prefill(self, done: int, total: int) -> None:
        """Progress through a long prompt, in the live region until the first token (terminals only)."""
        if self._phase != "idle":
            return
        now = self._clock()
        if self._prefill_started is None:
            self._prefill_started = now
        self._prefill_text = prefill_line(done, total, now - self._prefill_started)
        self._start_live()
        self._show(force=True)

    def reasoning(self, text: str) -> None:
        if not text or self._phase == "content":
            return
        self._start_live()
        if self._phase != "reasoning":
            self._start_reasoning()
        if self.thinking == "hide":
            return
        lines = self._trace.feed(text)
        if self.thinking == "keep":
            self._show(lines)
        else:
            self._trace_recent.extend(lines)
            self._show()

    def content(self, text: str) -> None:
        if not text:
            return
        self._start_live()
        if self._phase == "reasoning":
            self._finish_reasoning(None)
        self._phase = "content"
        self._content_seen = True
        self._show(self._answer.feed(text))

    def end_turn(self, result: TurnResult) -> None:
        if self._phase == "idle" and result.reasoning:
            self._replayed_reasoning = True  # not streamed: show it now, timed by the stats
            self.reasoning(result.reasoning)
        if self._phase == "reasoning":
            self._finish_reasoning(result)
        if not self._content_seen and result.content:
            self.content(result.content)
        self.close()
        self._print_trailer(result)
        self._reset_turn()

    def notice(self, message: str) -> None:
        self.console.print(Text(message, style="dim"))

    def warning(self, message: str) -> None:
        self.console.print(Text.assemble(("warning: ", "bold yellow"), message))

    def error(self, message: str) -> None:
        self.console.print(Text.assemble(("error: ", "bold red"), message))

    def close(self) -> None:
        """Commit what is left of the answer and stop the live region (the rest of an abandoned trace goes)."""
        self._phase = "done"
        self._show(self._answer.finish(), force=True)
        if self._live is not None:
            live, self._live = self._live, None
            live.stop()

    # -- turn state

    def _reset_turn(self) -> None:
        self._phase: Literal["idle", "reasoning", "content", "done"] = "idle"
        self._think_started: float | None = None
        self._replayed_reasoning = False
        self._content_seen = False
        self._trace = _TextStream(self.console, "dim")
        self._trace_recent: deque[Line] = deque(maxlen=TAIL_LINES - 1)
        self._answer = _MarkdownStream(self.console, self._code_theme) if self.markdown else _TextStream(self.console)
        self._last_refresh = float("-inf")
        self._prefill_started: float | None = None
        self._prefill_text = ""

    def _start_live(self) -> None:
        """The live region, on interactive terminals only (files and TERM=dumb get committed lines only)."""
        if self._live is None and self.console.is_interactive:
            self._live = Live(
                console=self.console,
                auto_refresh=False,
                transient=True,
                redirect_stdout=self._redirect,
                redirect_stderr=self._redirect,
            )
            self._live.start()

    def _start_reasoning(self) -> None:
        self._phase = "reasoning"
        self._think_started = self._clock()
        if self.thinking == "keep":
            self._show([self._header()], force=True)
        else:
            self._show(force=True)

    def _finish_reasoning(self, result: TurnResult | None) -> None:
        seconds: float | None = self._clock() - (self._think_started or 0.0)
        tokens = result.stats.reasoning_tokens if result is not None else 0
        if result is not None and self._replayed_reasoning:
            seconds = result.stats.reasoning_seconds or None
        trace = self._trace.finish() if self.thinking == "keep" else []
        self._trace_recent.clear()
        self._phase = "content"
        summary: Line = [Segment(thought_summary(seconds, tokens), Style(dim=True, italic=True))]
        spacer = [[]] if self.thinking == "keep" else []  # set a kept trace apart from the answer
        self._show([*trace, summary, *spacer], force=True)

    @staticmethod
    def _header() -> Line:
        return [Segment("Thinking…", Style(dim=True, italic=True))]

    # -- drawing

    def _tail(self) -> tuple[list[Line], list[Line]]:
        if self._phase == "content":
            return self._answer.render_tail()
        if self._phase == "idle" and self._prefill_text:
            return [], [[Segment(self._prefill_text, Style(dim=True))]]
        if self._phase != "reasoning":
            return [], []
        if self.thinking == "keep":
            return self._trace.render_tail()
        if self.thinking == "hide":
            return [], [self._header()]
        body = [*self._trace_recent, *self._trace.render_tail()[1]]
        return [], [self._header(), *body[-(TAIL_LINES - 1) :]]

    def _show(self, committed: Sequence[Line] = (), force: bool = False) -> None:
        """Print `committed` lines for good and redraw the live tail (throttled unless forced or committing)."""
        if self._live is None:
            if committed:
                self.console.print(_Lines(committed))
            return
        now = self._clock()
        if not committed and not force and now - self._last_refresh < self._frame_seconds:
            return
        self._last_refresh = now
        more, tail = self._tail()
        lines = [*committed, *more]
        with self.console:  # one terminal write: the commit and the new tail appear together
            self._live.update(_Lines(tail), refresh=True)
            if lines:
                self.console.print(_Lines(lines))  # the live render hook redraws the tail under them

    def _print_trailer(self, result: TurnResult) -> None:
        # an interrupted turn: the REPL says so once, and what became of the message
        for call in result.tool_calls:
            name, arguments = _tool_call_parts(call)
            self.console.print(Text.assemble(("tool call ", "dim"), (name, "bold cyan"), " ", arguments))
        if result.malformed:
            self.warning("malformed model output: " + ("; ".join(result.problems) or "unknown problem"))
        line = format_stats(result.stats) if self.show_stats else ""
        if line:
            self.console.print(Text(line, style="dim"))


# --------------------------------------------------------------------------- pipes


class PlainRenderer:
    """Raw answer text on stdout, flushed as it streams, for pipes (no ANSI, no markdown processing).

    stdout gets only the answer, ended by one newline when it lacks one, then one JSON line per tool call:
    `{"tool_call": {...}}` (the call as in `TurnResult.tool_calls`). The thinking trace goes to stderr only with
    `show_thinking=True`; notices, warnings, errors and `[interrupted]` go to stderr; the stats block
    (`format_stats_block`) goes to stderr only with `verbose=True`. On a terminal stderr (`markers` None:
    detect) the trace is framed by "Thinking..." and "...done thinking." lines, as ollama frames it, and a
    long prompt's prefill shows its progress (`prefill`).
    """

    def __init__(
        self,
        stdout: TextIO | None = None,
        stderr: TextIO | None = None,
        *,
        show_thinking: bool = False,
        verbose: bool = False,
        markers: bool | None = None,
    ) -> None:
        if not isinstance(show_thinking, bool):
            raise TypeError("PlainRenderer.show_thinking is a bool (the trace goes to stderr when True)")
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        self.show_thinking = show_thinking
        self.verbose = verbose
        self.markers = markers if markers is not None else _is_tty(self.stderr)
        self._reset_turn()

    def _reset_turn(self) -> None:
        self._content_end = ""  # last character written to stdout this turn ("" = nothing yet)
        self._trace_end = ""
        self._reasoning_seen = False
        self._prefill_started: float | None = None
        self._prefill_shown = False

    def begin_turn(self, mode_label: str) -> None:
        self._reset_turn()

    def prefill(self, done: int, total: int) -> None:
        """Progress through a long prompt on a terminal stderr: one line, rewritten in place, cleared when
        the first token comes (nothing on pipes)."""
        if not self.markers:
            return
        now = time.monotonic()
        if self._prefill_started is None:
            self._prefill_started = now
        self._write(self.stderr, "\r\x1b[2K" + prefill_line(done, total, now - self._prefill_started))
        self._prefill_shown = True

    def _clear_prefill(self) -> None:
        if self._prefill_shown:
            self._write(self.stderr, "\r\x1b[2K")
            self._prefill_shown = False

    def reasoning(self, text: str) -> None:
        if not text:
            return
        self._clear_prefill()
        if self.show_thinking:
            if self.markers and not self._reasoning_seen:
                self._write(self.stderr, "Thinking...\n")
            self._write(self.stderr, text)
            self._trace_end = text[-1]
        self._reasoning_seen = True

    def content(self, text: str) -> None:
        if not text:
            return
        self._clear_prefill()
        self._end_trace()
        self._write(self.stdout, text)
        self._content_end = text[-1]

    def end_turn(self, result: TurnResult) -> None:
        self._clear_prefill()
        if not self._reasoning_seen and result.reasoning:
            self.reasoning(result.reasoning)
        self._end_trace()
        if not self._content_end and result.content:
            self.content(result.content)
        if self._content_end and self._content_end != "\n":
            self._write(self.stdout, "\n")
        for call in result.tool_calls:
            self._write(self.stdout, json.dumps({"tool_call": call}, ensure_ascii=False) + "\n")
        if result.interrupted:
            self._write(self.stderr, "[interrupted]\n")
        if result.malformed:
            self.warning("malformed model output: " + ("; ".join(result.problems) or "unknown problem"))
        if self.verbose:
            self._write(self.stderr, format_stats_block(result.stats) + "\n")
        self._reset_turn()

    def notice(self, message: str) -> None:
        self._write(self.stderr, message + "\n")

    def warning(self, message: str) -> None:
        self._write(self.stderr, f"warning: {message}\n")

    def error(self, message: str) -> None:
        self._write(self.stderr, f"error: {message}\n")

    def close(self) -> None:
        pass

    def _end_trace(self) -> None:
        if self._trace_end and self._trace_end != "\n":
            self._write(self.stderr, "\n")
        if self._trace_end and self.markers:
            self._write(self.stderr, "...done thinking.\n\n")
        self._trace_end = ""

    @staticmethod
    def _write(stream: TextIO, text: str) -> None:
        stream.write(text)
        stream.flush()


class JsonRenderer:
    """Nothing while streaming; at `end_turn` one JSON object (`turn_to_json`) on one stdout line, led by
    `request` (e.g. the model and the sampling used) and the turn's mode.

    Notices, warnings and errors go to stderr.
    """

    def __init__(self, stdout: TextIO | None = None, stderr: TextIO | None = None,
                 request: dict[str, Any] | None = None) -> None:
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        self.request = dict(request or {})
        self.mode: str | None = None

    def begin_turn(self, mode_label: str) -> None:
        self.mode = mode_label

    def reasoning(self, text: str) -> None:
        pass

    def content(self, text: str) -> None:
        pass

    def end_turn(self, result: TurnResult) -> None:
        request = {**self.request, **({"mode": self.mode} if self.mode is not None else {})}
        self.stdout.write(json.dumps(turn_to_json(result, request), ensure_ascii=False) + "\n")
        self.stdout.flush()

    def notice(self, message: str) -> None:
        self._err(message)

    def warning(self, message: str) -> None:
        self._err(f"warning: {message}")

    def error(self, message: str) -> None:
        self._err(f"error: {message}")

    def close(self) -> None:
        pass

    def _err(self, line: str) -> None:
        self.stderr.write(line + "\n")
        self.stderr.flush()


_RENDERERS: dict[str, type] = {"tty": TtyRenderer, "plain": PlainRenderer, "json": JsonRenderer}


def make_renderer(kind: RendererKind, **settings: Any) -> Renderer:
    """Build the renderer of `kind`; settings that renderer does not take are dropped (one bag fits all).

    A setting no renderer takes is an error, so typos do not pass silently.
    """
    if kind not in _RENDERERS:
        raise ValueError(f"unknown renderer {kind!r} (expected one of {', '.join(_RENDERERS)})")
    known = {name for cls in _RENDERERS.values() for name in inspect.signature(cls).parameters}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise TypeError(f"unknown renderer settings: {', '.join(unknown)}")
    accepted = inspect.signature(_RENDERERS[kind]).parameters
    return _RENDERERS[kind](**{name: value for name, value in settings.items() if name in accepted})


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or minimal stream
        return False
