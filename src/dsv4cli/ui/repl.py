"""The interactive `dsv4 chat` REPL: a prompt_toolkit prompt wired to a ChatSession and a renderer.

Input: Enter sends; Esc-Enter inserts a newline; a line starting with \"\"\" opens a block that runs
until a line ending with \"\"\"; Ctrl-G edits the input in $EDITOR; Tab completes /commands.
Lines starting with / are commands (see COMMANDS); a line starting with // is sent with one slash.
Ctrl-C while a reply streams stops it (the partial answer is kept, marked interrupted; the partial
thinking is dropped); Ctrl-C at the prompt prints a hint; Ctrl-D at an empty prompt quits.
Any error in a command or a turn is one error line; the REPL and the conversation carry on.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from prompt_toolkit import PromptSession
from prompt_toolkit.application import get_app
from prompt_toolkit.completion import Completer, Completion
from prompt_toolkit.filters import Condition
from prompt_toolkit.history import FileHistory, History, InMemoryHistory
from prompt_toolkit.key_binding import KeyBindings

from dsv4cli import paths
from dsv4cli.chat.encoding import ThinkMode
from dsv4cli.chat.service import sigint_cancels
from dsv4cli.chat.session import ChatSession, TranscriptNotFound, mode_label
from dsv4cli.chat.stops import check_stops
from dsv4cli.chat.tokenizer import replace_lone_surrogates
from dsv4cli.cli.options import FLAG_NAMES
from dsv4cli.engine.engine import ContextFull
from dsv4cli.engine.events import TurnResult
from dsv4cli.errors import DsvError, UsageError
from dsv4cli.ui.render import format_stats

BLOCK = '"""'
QUIT_HINT = "Ctrl-D or /exit to quit"
MODES = [mode_label(mode) for mode in ThinkMode]
SAMPLING_PARAMS = ["temperature", "top_p", "top_k", "min_p", "seed"]
LIMIT_PARAMS = ["max_tokens", "reasoning_budget"]
KEYS_HELP = 'Esc-Enter: new line · """ ... """: multi-line block · Ctrl-G: $EDITOR · Ctrl-C: stop reply · Ctrl-D: quit'


class Repl:
    """Turns accepted input into commands or chat turns; `done` becomes True on /exit."""

    def __init__(self, session: ChatSession, renderer):
        self.session = session
        self.renderer = renderer
        self.done = False

    def handle(self, text: str) -> None:
        """Run one accepted input; any error becomes one error line (the session keeps its state)."""
        try:
            self._dispatch(text)
        except Exception as err:  # the REPL must survive anything a turn or a command raises
            self.renderer.error(error_line(err))

    def _dispatch(self, text: str) -> None:
        line = text.strip()
        if line.startswith(BLOCK):
            line = unwrap_block(line)
        elif line.startswith("//"):
            line = line[1:]
        elif line.startswith("/"):
            name, _, arg = line[1:].partition(" ")
            command = COMMANDS.get(name.lower())
            if command is None:
                raise UsageError(f"unknown command /{name}", "/help lists the commands; start with // to send a /")
            if arg.strip() and not command.takes_args:
                raise UsageError(f"/{name} takes no arguments", "see /help")
            command.run(self, arg.strip())
            return
        if line:
            self.send(line)

    def send(self, text: str) -> None:
        self._turn(lambda cancel: self.session.send(text, self.renderer, cancel))

    def regenerate(self) -> None:
        self._turn(lambda cancel: self.session.regenerate(self.renderer, cancel))

    def _turn(self, run) -> None:
        try:
            with sigint_cancels(threading.Event()) as cancel, quiet_terminal():
                result = run(cancel)
        finally:
            self.renderer.close()  # a turn that failed half way must not leave the live display running
        if result.interrupted:
            self.renderer.notice("interrupted: partial answer kept" if result.content else
                                 "interrupted before the answer began: the message was dropped")
        _warn(self.renderer, stopped_in_reasoning_warning(result))


@contextlib.contextmanager
def quiet_terminal(stream=None) -> Iterator[None]:
    """While a reply streams, the terminal echoes neither ^C nor typed keys: either would shift the live
    region under rich, whose redraw then printed the partial line a second time. Keys typed meanwhile
    stay queued for the next prompt. A no-op where stdin is not a terminal."""
    try:
        import termios

        fd = (stream or sys.stdin).fileno()
        saved = termios.tcgetattr(fd) if os.isatty(fd) else None
    except (ImportError, OSError, ValueError, AttributeError):
        saved = None
    if saved is None:
        yield
        return
    quiet = list(saved)
    quiet[3] &= ~(termios.ECHO | termios.ECHOCTL)
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)


def error_line(err: BaseException) -> str:
    """One line for any error, with REPL hints where the library's message has generic ones."""
    if isinstance(err, ContextFull):
        return f"{err.message} (/clear to start over, or restart with a larger --ctx)"
    if isinstance(err, DsvError):
        return err.one_line(FLAG_NAMES)
    detail = " ".join(str(err).split())
    if isinstance(err, OSError | ValueError):
        return detail or type(err).__name__
    return f"unexpected {type(err).__name__}" + (f": {detail}" if detail else "")


def stopped_in_reasoning_warning(result: TurnResult) -> str | None:
    """The warning for a reply the token limit cut inside its thinking trace (it has no answer)."""
    if not result.stopped_in_reasoning:
        return None
    return (f"the reply stopped after {result.stats.generated_tokens:,} tokens inside the thinking trace, before "
            "any answer (/set max_tokens N to allow more, /set reasoning_budget N to think less, or /nothink)")


def think_max_warning(session: ChatSession) -> str | None:
    warning = session.think_max_warning()
    return f"{warning} (restart with a larger --ctx)" if warning else None


def unwrap_block(text: str) -> str:
    """The message inside a \"\"\" block (either quote line may also carry text)."""
    body = text.strip()[len(BLOCK):]
    if body.rstrip().endswith(BLOCK):
        body = body.rstrip()[: -len(BLOCK)]
    return body.strip()


def block_is_open(text: str) -> bool:
    """True while the input starts a \"\"\" block that no later \"\"\" has closed yet."""
    stripped = text.strip()
    return stripped.startswith(BLOCK) and (len(stripped) < 2 * len(BLOCK) or not stripped.endswith(BLOCK))


def transcript_path(name: str) -> Path:
    """/save and /load NAME: a bare name lives in the sessions dir; a path (has / or .json) is used as is."""
    if "/" in name or os.sep in name or name.endswith(".json") or name.startswith("~"):
        return Path(name).expanduser()
    return paths.sessions_dir() / f"{name}.json"


def saved_names() -> list[str]:
    folder = paths.sessions_dir()
    return sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []


# ------------------------------------------------------------------ commands
def _warn(renderer, warning: str | None) -> None:
    if warning:
        renderer.warning(warning)


def _switch_mode(repl: Repl, name: str) -> None:
    repl.session.set_mode(name)
    repl.renderer.notice(f"mode: {mode_label(repl.session.settings.mode)}")
    _warn(repl.renderer, think_max_warning(repl.session))


def _think(repl: Repl, arg: str) -> None:
    level = arg.lower() or "high"
    if level not in ("high", "max"):
        raise UsageError(f"/think takes high or max, not {arg!r}", "use /nothink to turn thinking off")
    _switch_mode(repl, f"think-{level}")


def _nothink(repl: Repl, arg: str) -> None:
    _switch_mode(repl, "non-think")


def _mode(repl: Repl, arg: str) -> None:
    if arg:
        _switch_mode(repl, arg)
    else:
        repl.renderer.notice(f"mode: {mode_label(repl.session.settings.mode)} (choose from {', '.join(MODES)})")


def _system(repl: Repl, arg: str) -> None:
    settings = repl.session.settings
    if not arg:
        repl.renderer.notice(f"system prompt: {settings.system}" if settings.system else
                             "no system prompt (set one with /system TEXT)")
    elif arg == "clear":
        settings.system = None
        repl.renderer.notice("system prompt removed")
    else:
        settings.system = replace_lone_surrogates(arg)
        repl.renderer.notice("system prompt set")


def parse_limit(name: str, value: str) -> int | None:
    """max_tokens (>= 1) or reasoning_budget (>= 0, or off/none for no budget)."""
    if name == "reasoning_budget" and value.lower() in ("off", "none"):
        return None
    try:
        number = int(value)
    except ValueError:
        raise UsageError(f"{name} needs a whole number, got {value!r}") from None
    minimum = 1 if name == "max_tokens" else 0
    if number < minimum:
        raise UsageError(f"{name} must be at least {minimum}, got {number}")
    return number


def unescape_stop(text: str) -> str:
    """A stop sequence typed at the prompt: \\n, \\t and \\\\ stand for a newline, a tab and a backslash."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m[1]], text)


def _set_stop(repl: Repl, value: str) -> None:
    """/set stop TEXT adds a stop sequence (up to MAX_STOPS), /set stop off removes them all."""
    settings = repl.session.settings
    if value.lower() == "off":
        settings.stop = ()
    else:
        try:
            settings.stop = check_stops((*settings.stop, unescape_stop(value)))
        except ValueError as err:
            raise UsageError(str(err), "/set stop off clears them") from None
    repl.renderer.notice(f"stop = {_current_value(repl.session, 'stop')}")


def _set(repl: Repl, arg: str) -> None:
    name, _, value = arg.partition(" ")
    name, value = name.lower().replace("-", "_"), value.strip()
    if name not in SAMPLING_PARAMS + LIMIT_PARAMS + ["stop"] or not value:
        raise UsageError("usage: /set PARAM VALUE",
                         f"PARAM is one of {', '.join(SAMPLING_PARAMS + LIMIT_PARAMS + ['stop'])}")
    if name == "stop":
        return _set_stop(repl, value)
    if name in LIMIT_PARAMS:
        setattr(repl.session.settings, name, parse_limit(name, value))
    else:
        repl.session.set_sampling(name, value)
    repl.renderer.notice(f"{name} = {_current_value(repl.session, name)}")


def _current_value(session: ChatSession, name: str) -> object:
    if name == "stop":
        return " ".join(json.dumps(s, ensure_ascii=False) for s in session.settings.stop) or "off"
    value = getattr(session.settings, name) if name in LIMIT_PARAMS else getattr(session.settings.sampling, name)
    return "off" if value is None else value


def _show(repl: Repl, arg: str) -> None:
    session = repl.session
    settings = session.settings
    lines = [
        f"mode {mode_label(settings.mode)} · context {session.engine.max_context:,} tokens · "
        f"{len(session.messages)} messages",
        f"system: {settings.system or '(none)'}",
        " · ".join(f"{name} {_current_value(session, name)}" for name in SAMPLING_PARAMS + LIMIT_PARAMS + ["stop"]),
    ]
    for line in lines:
        repl.renderer.notice(line)


def _clear(repl: Repl, arg: str) -> None:
    repl.session.clear()
    repl.renderer.notice("new conversation")


def _read(repl: Repl, arg: str) -> None:
    if not arg:
        raise UsageError("usage: /read FILE", "sends the file's text as your message")
    repl.send(read_message_file(Path(arg).expanduser()))


def read_message_file(path: Path) -> str:
    """The UTF-8 text of `path` for /read; UsageError when it is missing, unreadable, not UTF-8 or blank."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except IsADirectoryError:
        raise UsageError(f"{path} is a directory", "/read takes a text file") from None
    except OSError as err:
        raise UsageError(f"cannot read {path}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise UsageError(f"{path} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start})",
                         "convert it, e.g. with iconv -t utf-8") from None
    if not text.strip():
        raise UsageError(f"{path} is empty", "/read sends the file's text as your message")
    return text


def _save(repl: Repl, arg: str) -> None:
    if not arg:
        raise UsageError("usage: /save NAME", f"NAME is saved as {paths.sessions_dir()}/NAME.json")
    path = repl.session.save(transcript_path(arg))
    repl.renderer.notice(f"saved {len(repl.session.messages)} messages to {path}")


def _load(repl: Repl, arg: str) -> None:
    if not arg:
        raise UsageError("usage: /load NAME", f"saved: {', '.join(saved_names()) or 'none yet'}")
    path = transcript_path(arg)
    try:
        repl.session.load(path)
    except TranscriptNotFound as err:
        raise UsageError(err.message, f"saved: {', '.join(saved_names()) or 'none yet (/save NAME writes one)'}"
                         ) from None
    mode = mode_label(repl.session.settings.mode)
    repl.renderer.notice(f"loaded {len(repl.session.messages)} messages from {path} (mode {mode})")
    _warn(repl.renderer, think_max_warning(repl.session))


def _stats(repl: Repl, arg: str) -> None:
    stats = repl.session.last_stats
    repl.renderer.notice(format_stats(stats) if stats is not None else "no reply yet")


def _trace(repl: Repl, arg: str) -> None:
    """/trace [N]: the thinking trace of the newest reply that has one, or of the Nth newest such reply
    (a collapsed "Thought for ..." line opens up again here)."""
    traces = [m["reasoning_content"] for m in repl.session.messages
              if m.get("role") == "assistant" and m.get("reasoning_content")]
    try:
        back = int(arg) if arg else 1
    except ValueError:
        raise UsageError(f"/trace takes a number, got {arg!r}", "1 is the newest trace, 2 the one before") from None
    if not traces:
        raise UsageError("no thinking trace in this conversation yet", "think-high and think-max replies have one")
    if not 1 <= back <= len(traces):
        raise UsageError(f"there are {len(traces)} thinking traces, not {back}",
                         f"give 1 (the newest) to {len(traces)}")
    repl.renderer.notice(f"thinking trace {back} of {len(traces)} (newest first):")
    repl.renderer.notice(traces[-back])


def _help(repl: Repl, arg: str) -> None:
    for command in dict.fromkeys(COMMANDS.values()):
        repl.renderer.notice(f"{command.usage:<26} {command.help}")
    repl.renderer.notice(KEYS_HELP)


@dataclass(frozen=True)
class Command:
    run: Callable[[Repl, str], None]
    usage: str
    help: str
    choices: Callable[[], Iterable[str]] | None = None  # completions of the first argument
    takes_args: bool = True


def _stop(repl: Repl, arg: str) -> None:
    repl.done = True


_EXIT = Command(_stop, "/exit, /bye", "quit (or Ctrl-D)", takes_args=False)
COMMANDS: dict[str, Command] = {
    "think": Command(_think, "/think [high|max]", "think before answering (default high)", lambda: ["high", "max"]),
    "nothink": Command(_nothink, "/nothink", "answer directly, no thinking", takes_args=False),
    "mode": Command(_mode, "/mode [MODE]", f"show or set the mode: {', '.join(MODES)}", lambda: MODES),
    "system": Command(_system, "/system [TEXT|clear]", "show, set or remove the system prompt", lambda: ["clear"]),
    "set": Command(_set, "/set PARAM VALUE", "set temperature, top_p, top_k, min_p, seed, max_tokens, "
                   "reasoning_budget (off), stop (add a stop sequence; off)", lambda: SAMPLING_PARAMS + LIMIT_PARAMS
                   + ["stop"]),
    "show": Command(_show, "/show", "show the current settings", takes_args=False),
    "clear": Command(_clear, "/clear", "start a new conversation", takes_args=False),
    "regen": Command(lambda repl, _: repl.regenerate(), "/regen", "answer the last message again", takes_args=False),
    "read": Command(_read, "/read FILE", "send the text of FILE"),
    "save": Command(_save, "/save NAME", "save the conversation (JSON)", saved_names),
    "load": Command(_load, "/load NAME", "load a saved conversation", saved_names),
    "stats": Command(_stats, "/stats", "speed and size of the last reply", takes_args=False),
    "trace": Command(_trace, "/trace [N]", "show the last reply's thinking trace (N: the Nth newest)"),
    "help": Command(_help, "/help", "this list", takes_args=False),
    "exit": _EXIT,
    "bye": _EXIT,
}


class SlashCompleter(Completer):
    """Tab completion of /command names and of their first argument."""

    def get_completions(self, document, complete_event):
        text = document.text_before_cursor
        if not text.startswith("/") or "\n" in text:
            return
        name, space, arg = text[1:].partition(" ")
        command = COMMANDS.get(name.lower())
        if not space:
            candidates, word = [f"/{n}" for n in COMMANDS], text
        elif command is not None and command.choices is not None and " " not in arg:
            candidates, word = list(command.choices()), arg
        else:
            return
        for candidate in candidates:
            if candidate.startswith(word):
                yield Completion(candidate, start_position=-len(word))


# ---------------------------------------------------------------------- loop
def open_history(use_history: bool, renderer) -> History:
    """FileHistory in the XDG state dir, or in-memory with --no-history / DSV4_NO_HISTORY."""
    if not use_history or os.environ.get("DSV4_NO_HISTORY"):
        return InMemoryHistory()
    path = paths.history_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.touch(mode=0o600, exist_ok=True)
    except OSError as err:
        renderer.warning(f"history off: cannot write {path} ({err})")
        return InMemoryHistory()
    return FileHistory(str(path))


def _key_bindings() -> KeyBindings:
    bindings = KeyBindings()

    @bindings.add("escape", "enter")
    def _newline(event) -> None:
        event.current_buffer.insert_text("\n")

    @bindings.add("c-g")
    def _editor(event) -> None:
        event.current_buffer.open_in_editor()

    return bindings


def _prompt_session(history: History, input=None, output=None) -> PromptSession:
    in_block = Condition(lambda: block_is_open(get_app().current_buffer.text))
    return PromptSession(history=history, completer=SlashCompleter(), complete_while_typing=False,
                         key_bindings=_key_bindings(), multiline=in_block, prompt_continuation="... ",
                         input=input, output=output)


def _show_banner(session: ChatSession, renderer, banner: str | None) -> None:
    if banner is not None:
        renderer.notice(f"dsv4 · {banner}")
        renderer.notice(f"mode {mode_label(session.settings.mode)} · context {session.engine.max_context:,} tokens")
        renderer.notice("/help for commands, Ctrl-D to quit")
    _warn(renderer, think_max_warning(session))


def run_repl(session: ChatSession, renderer, banner: str | None, use_history: bool = True, input=None,
             output=None) -> int:
    """Read-eval-print until /exit or Ctrl-D; returns the exit status (0). `banner` None: no banner (--quiet)."""
    repl = Repl(session, renderer)
    prompt = _prompt_session(open_history(use_history, renderer), input, output)
    _show_banner(session, renderer, banner)
    while not repl.done:
        try:
            text = prompt.prompt(f"{mode_label(session.settings.mode)}> ")
        except KeyboardInterrupt:
            renderer.notice(QUIT_HINT)
            continue
        except EOFError:
            return 0
        try:
            repl.handle(text)
        except KeyboardInterrupt:  # Ctrl-C outside a reply (e.g. while a command runs)
            renderer.notice("interrupted")
    return 0
