"""A chat conversation: messages, mode and sampling; runs turns through the engine into a renderer.

Interrupt policy (Ctrl-C during a reply): the partial answer is kept in the history
(marked `interrupted` in saved transcripts, not in the prompt) and the partial
reasoning is dropped; a turn interrupted before any answer text is removed together
with its user message, so the next prompt does not carry an unanswered question.

Failure policy: a turn that raises leaves the conversation as it was before it (the engine resets
its cache); `load` validates the whole transcript before changing anything; `save` writes atomically
and leaves no temporary file behind. Their errors are `TranscriptError`s (also ValueErrors), one line
each, naming no CLI flags or REPL commands so any front end can add its own hint.
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from dsv4cli.chat.encoding import MIN_CONTEXT_THINK_MAX, ThinkMode, encode_messages, prompt_opens_reasoning
from dsv4cli.chat.tokenizer import Tokenizer, replace_lone_surrogates
from dsv4cli.chat.turn import run_turn
from dsv4cli.engine.engine import Engine
from dsv4cli.engine.events import GenerationStats, TurnResult
from dsv4cli.engine.sampling import SamplingParams
from dsv4cli.errors import UsageError
from dsv4cli.fsutil import atomic_write_bytes, describe_os_error

TRANSCRIPT_VERSION = 1
_TRANSCRIPT_ONLY_KEYS = ("interrupted",)
_MAX_DETAIL = 160  # characters of an offending value quoted in an error


class TranscriptError(UsageError, ValueError):
    """A transcript cannot be read, is not valid, or cannot be written."""


class TranscriptNotFound(TranscriptError):
    """No file at the transcript's path."""


@dataclass
class ChatSettings:
    mode: ThinkMode = ThinkMode.THINK_HIGH
    system: str | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = 4096
    reasoning_budget: int | None = None
    stop: tuple[str, ...] = ()  # stop sequences: the answer ends before the first of them (chat/stops.py)


def mode_label(mode: ThinkMode) -> str:
    """The mode's name, as --mode and /mode take it: its ThinkMode value."""
    return mode.value


class ChatSession:
    def __init__(self, engine: Engine, tokenizer: Tokenizer, settings: ChatSettings | None = None):
        self.engine = engine
        self.tokenizer = tokenizer
        self.settings = settings or ChatSettings()
        self.messages: list[dict[str, Any]] = []
        self.last_stats: GenerationStats | None = None
        self._regenerations = 0
        #: the conversation log (chat/logs.py): rewritten after every turn; None: not logged
        self.log_path: Path | None = None
        self.log_extra: dict[str, Any] = {}

    # ------------------------------------------------------------- settings
    def set_mode(self, mode: ThinkMode | str) -> str | None:
        """Switch reasoning mode; returns a warning when think-max runs on a short context."""
        self.settings.mode = ThinkMode.parse(mode)
        return self.think_max_warning()

    def think_max_warning(self) -> str | None:
        if self.settings.mode is ThinkMode.THINK_MAX and self.engine.max_context < MIN_CONTEXT_THINK_MAX:
            return (f"think-max works best with a context of at least {MIN_CONTEXT_THINK_MAX:,} tokens; "
                    f"this session has {self.engine.max_context:,}")
        return None

    def set_sampling(self, name: str, value: str) -> None:
        self.settings.sampling = self.settings.sampling.with_value(name, value)

    def clear(self) -> None:
        self.messages = []
        self.engine.reset()
        if self.log_path is not None:  # a new conversation gets a new log
            from dsv4cli.chat.logs import new_log_path

            self.log_path = new_log_path()

    # --------------------------------------------------------------- prompts
    def prompt_text(self) -> str:
        system = [{"role": "system", "content": self.settings.system}] if self.settings.system else []
        return encode_messages(system + for_prompt(self.messages), **self.settings.mode.encode_kwargs())

    @staticmethod
    def _check_renderable(messages: list[Any], mode: ThinkMode) -> None:
        """Raise ValueError/TypeError unless the encoder accepts these messages."""
        if not all(isinstance(m, dict) for m in messages):
            raise ValueError("messages must be objects")
        encode_messages(for_prompt(messages), **mode.encode_kwargs())

    # ----------------------------------------------------------------- turns
    def send(self, text: str, renderer, cancel: threading.Event | None = None) -> TurnResult:
        """Answer `text` (lone surrogates become U+FFFD, so the history stays valid UTF-8)."""
        text = replace_lone_surrogates(text)
        self.messages.append({"role": "user", "content": text})
        self._regenerations = 0
        try:
            return self._respond(renderer, cancel, self.settings.sampling)
        except BaseException:
            if self.messages and self.messages[-1] == {"role": "user", "content": text}:
                self.messages.pop()  # a turn that failed to start leaves no trace
            raise

    def regenerate(self, renderer, cancel: threading.Event | None = None) -> TurnResult:
        """Answer the last user message again (drops the last answer, if any). With a fixed seed,
        each regeneration uses the next seed, so it gives a different answer reproducibly."""
        if self.messages and self.messages[-1]["role"] == "assistant":
            self.messages.pop()
        if not self.messages or self.messages[-1]["role"] != "user":
            raise UsageError("nothing to regenerate", "send a message first")
        self._regenerations += 1
        sampling = self.settings.sampling
        if sampling.seed is not None:
            sampling = replace(sampling, seed=sampling.seed + self._regenerations)
        return self._respond(renderer, cancel, sampling)

    def _respond(self, renderer, cancel: threading.Event | None, sampling: SamplingParams) -> TurnResult:
        renderer.begin_turn(mode_label(self.settings.mode))
        result = self._run_turn(renderer, cancel, sampling)
        self._record(result)
        self.last_stats = result.stats
        renderer.end_turn(result)
        if self.log_path is not None and self.messages:
            try:
                self.save(self.log_path, self.log_extra)
            except TranscriptError as err:
                renderer.warning(f"conversation log: {err.message}")
        return result

    def _run_turn(self, renderer, cancel: threading.Event | None, sampling: SamplingParams) -> TurnResult:
        """Generate the reply to the conversation into `renderer` (the engine here; a server remotely)."""
        prompt = self.prompt_text()
        return run_turn(self.engine, self.tokenizer, self.tokenizer.encode(prompt), renderer,
                        thinking=prompt_opens_reasoning(prompt), sampling=sampling,
                        max_tokens=self.settings.max_tokens, reasoning_budget=self.settings.reasoning_budget,
                        stop=self.settings.stop, cancel=cancel, prefill_progress=getattr(renderer, "prefill", None))

    def _record(self, result: TurnResult) -> None:
        if result.interrupted and not result.content:
            self.messages.pop()  # the unanswered user message
            return
        message: dict[str, Any] = {"role": "assistant", "content": result.content}
        if result.reasoning and not result.interrupted:
            message["reasoning_content"] = result.reasoning
        if result.tool_calls:
            message["tool_calls"] = result.tool_calls
        if result.interrupted:
            message["interrupted"] = True
        self.messages.append(message)

    # ----------------------------------------------------------- transcripts
    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write the conversation as JSON, atomically: the file is either the old one or the new one.
        `extra`: more top-level fields (the log's model), which `load` ignores."""
        path = Path(path)
        data = {
            **(extra or {}),
            "version": TRANSCRIPT_VERSION,
            "mode": mode_label(self.settings.mode),
            "system": self.settings.system,
            "sampling": asdict(self.settings.sampling),
            "messages": self.messages,
        }
        text = replace_lone_surrogates(json.dumps(data, ensure_ascii=False, indent=2) + "\n")
        if path.is_dir():
            raise TranscriptError(f"cannot save the transcript to {path}: it is a directory", "give a file name")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, text.encode("utf-8"))  # no temporary file is left behind on failure
        except OSError as exc:
            raise TranscriptError(f"cannot save the transcript to {path}: {describe_os_error(exc, name_file=False)}",
                                  "choose another place, or free some space") from None
        return path

    def load(self, path: str | Path) -> None:
        """Replace the conversation and settings by a saved transcript; on any error nothing changes."""
        path = Path(path)
        data = _read_transcript(path)
        try:
            mode, system, sampling, messages = _parse_transcript(data)
            self._check_renderable(messages, mode)
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise TranscriptError(f"{path} has invalid contents: {_shorten(str(exc))}",
                                  "it is not a transcript written by dsv4, or it was edited") from None
        self.settings = replace(self.settings, mode=mode, system=system, sampling=sampling)
        self.messages = messages


def _read_transcript(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, with lone surrogates (from "\\udXXX" escapes) made U+FFFD."""
    try:
        data = _scrub(json.loads(path.read_bytes().decode("utf-8")))
    except FileNotFoundError:
        raise TranscriptNotFound(f"no transcript at {path}", "give the name or path of a saved transcript") from None
    except IsADirectoryError:
        raise TranscriptError(f"{path} is a directory, not a transcript", "give the path of a .json file") from None
    except OSError as exc:
        raise TranscriptError(f"cannot read transcript {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise TranscriptError(f"transcript {path} is not UTF-8 text (byte offset {exc.start})") from None
    except (ValueError, RecursionError) as exc:
        raise TranscriptError(f"transcript {path} is not valid JSON: {_shorten(str(exc))}") from None
    if not isinstance(data, dict) or data.get("version") != TRANSCRIPT_VERSION or not isinstance(
            data.get("messages"), list):
        raise TranscriptError(f"{path} is not a dsv4 transcript (version {TRANSCRIPT_VERSION})",
                              "it needs \"version\": 1 and a \"messages\" list")
    return data


def _parse_transcript(data: dict[str, Any]) -> tuple[ThinkMode, str | None, SamplingParams, list[dict[str, Any]]]:
    """(mode, system, sampling, messages) of a transcript; TypeError/ValueError for any malformed field."""
    mode = data.get("mode", "think-high")
    if not isinstance(mode, str):
        raise TypeError(f"mode must be a string, got {mode!r}")
    system = data.get("system")
    if system is not None and not isinstance(system, str):
        raise TypeError(f"system must be a string or null, got {system!r}")
    sampling = data.get("sampling", {})
    if not isinstance(sampling, dict):
        raise TypeError(f"sampling must be an object, got {sampling!r}")
    unknown = sorted(set(sampling) - {f.name for f in fields(SamplingParams)})
    if unknown:
        raise ValueError(f"unknown sampling parameters {unknown}")
    messages = data["messages"]
    for index, message in enumerate(messages):
        _check_message(index, message)
    return ThinkMode.parse(mode), system or None, replace(SamplingParams(), **sampling), messages


def _check_message(index: int, message: Any) -> None:
    """TypeError/ValueError unless message `index` has the shape the session itself writes."""
    if not isinstance(message, dict):
        raise TypeError(f"message {index} must be an object, got {message!r}")
    if not isinstance(message.get("role"), str):
        raise TypeError(f"message {index} needs a string \"role\", got {message.get('role')!r}")
    for key in ("content", "reasoning_content"):
        if message.get(key) is not None and not isinstance(message[key], str | list):
            raise TypeError(f"message {index}: {key} must be text, got {message[key]!r}")
    if not isinstance(message.get("interrupted", False), bool):
        raise TypeError(f"message {index}: interrupted must be true or false, got {message['interrupted']!r}")


def _scrub(value: Any) -> Any:
    """`value` with lone surrogates replaced in every string it holds."""
    if isinstance(value, str):
        return replace_lone_surrogates(value)
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    if isinstance(value, dict):
        return {_scrub(k): _scrub(v) for k, v in value.items()}
    return value


def _shorten(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= _MAX_DETAIL else line[:_MAX_DETAIL - 1] + "…"


def for_prompt(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in m.items() if k not in _TRANSCRIPT_ONLY_KEYS} for m in messages]
