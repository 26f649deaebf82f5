"""A chat conversation: messages, mode and sampling; runs turns through the engine into a renderer.

Interrupt policy (Ctrl-C during a reply): the partial answer is kept in the history
(marked `interrupted` in saved transcripts, not in the prompt) and the partial
reasoning is dropped; a turn interrupted before any answer text is removed together
with its user message, so the next prompt does not carry an unanswered question.
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from dsv4cli.detok import StreamingDetokenizer
from dsv4cli.encoding import (
    MIN_CONTEXT_THINK_MAX,
    StreamingOutputParser,
    ThinkMode,
    encode_messages,
    prompt_opens_reasoning,
)
from dsv4cli.engine import Engine
from dsv4cli.errors import UsageError
from dsv4cli.events import GenerationStats, TurnResult
from dsv4cli.sampling import SamplingParams
from dsv4cli.tokenizer import Tokenizer

TRANSCRIPT_VERSION = 1
MODE_LABELS = {ThinkMode.NON_THINK: "non-think", ThinkMode.THINK_HIGH: "think-high", ThinkMode.THINK_MAX: "think-max"}
_TRANSCRIPT_ONLY_KEYS = ("interrupted",)


@dataclass
class ChatSettings:
    mode: ThinkMode = ThinkMode.THINK_HIGH
    system: str | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = 4096
    reasoning_budget: int | None = None


def mode_label(mode: ThinkMode) -> str:
    return MODE_LABELS[mode]


class ChatSession:
    def __init__(self, engine: Engine, tokenizer: Tokenizer, settings: ChatSettings | None = None):
        self.engine = engine
        self.tokenizer = tokenizer
        self.settings = settings or ChatSettings()
        self.messages: list[dict[str, Any]] = []
        self.last_stats: GenerationStats | None = None
        self._regenerations = 0

    # ------------------------------------------------------------- settings
    def set_mode(self, mode: ThinkMode | str) -> str | None:
        """Switch reasoning mode; returns a warning when think-max runs on a short context."""
        self.settings.mode = ThinkMode.parse(mode)
        return self.think_max_warning()

    def think_max_warning(self) -> str | None:
        if self.settings.mode is ThinkMode.THINK_MAX and self.engine.max_context < MIN_CONTEXT_THINK_MAX:
            return (f"think-max works best with a context of at least {MIN_CONTEXT_THINK_MAX:,} tokens; "
                    f"this session has {self.engine.max_context:,} (raise --ctx)")
        return None

    def set_sampling(self, name: str, value: str) -> None:
        self.settings.sampling = self.settings.sampling.with_value(name, value)

    def clear(self) -> None:
        self.messages = []
        self.engine.reset()

    # --------------------------------------------------------------- prompts
    def prompt_text(self) -> str:
        system = [{"role": "system", "content": self.settings.system}] if self.settings.system else []
        return encode_messages(system + _for_prompt(self.messages), **self.settings.mode.encode_kwargs())

    @staticmethod
    def _check_renderable(messages: list[Any], mode: ThinkMode) -> None:
        """Raise ValueError/TypeError unless the encoder accepts these messages."""
        if not all(isinstance(m, dict) for m in messages):
            raise ValueError("messages must be objects")
        encode_messages(_for_prompt(messages), **mode.encode_kwargs())

    # ----------------------------------------------------------------- turns
    def send(self, text: str, renderer, cancel: threading.Event | None = None) -> TurnResult:
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
        prompt = self.prompt_text()
        thinking = prompt_opens_reasoning(prompt)
        special = self.tokenizer.special
        detok = StreamingDetokenizer(self.tokenizer)
        parser = StreamingOutputParser(think_end_id=special.think_end, eos_id=special.eos, thinking=thinking)
        renderer.begin_turn(mode_label(self.settings.mode))
        stats = GenerationStats()
        events = self.engine.generate(
            self.tokenizer.encode(prompt), sampling, self.settings.max_tokens, stop=[special.eos],
            cancel=cancel, reasoning=thinking, think_end_id=special.think_end,
            reasoning_budget=self.settings.reasoning_budget if thinking else None)
        for event in events:
            if isinstance(event, GenerationStats):
                stats = event
                break
            _route(parser.feed(event.token_id, detok.add_token(event.token_id)), renderer)
        tail = detok.finalize()
        if tail and not parser.done:
            _route(parser.feed(-1, tail), renderer)
        _route(parser.flush(), renderer)
        parsed = parser.finish()
        interrupted = stats.finish_reason == "cancelled"
        result = TurnResult(content=parsed.content, reasoning=parsed.reasoning_content,
                            tool_calls=parsed.tool_calls, malformed=parsed.malformed and stats.finish_reason == "stop",
                            problems=parsed.problems, interrupted=interrupted, stats=stats)
        self._record(result)
        self.last_stats = stats
        renderer.end_turn(result)
        return result

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
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        data = {
            "version": TRANSCRIPT_VERSION,
            "mode": mode_label(self.settings.mode),
            "system": self.settings.system,
            "sampling": asdict(self.settings.sampling),
            "messages": self.messages,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        tmp.replace(path)
        return path

    def load(self, path: str | Path) -> None:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UsageError(f"no transcript at {path}", "use /save NAME first, or give an existing file") from None
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read transcript {path}: {exc}", "is it a dsv4 /save file?") from None
        if not isinstance(data, dict) or data.get("version") != TRANSCRIPT_VERSION or not isinstance(
                data.get("messages"), list):
            raise UsageError(f"{path} is not a dsv4 transcript (version {TRANSCRIPT_VERSION})",
                             "use a file written by /save")
        try:
            sampling = replace(SamplingParams(), **data.get("sampling", {}))
            mode = ThinkMode.parse(data.get("mode", "think-high"))
            self._check_renderable(data["messages"], mode)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"{path} has invalid contents: {exc}", "use a file written by /save") from None
        self.settings = replace(self.settings, mode=mode, system=data.get("system"), sampling=sampling)
        self.messages = data["messages"]


def _for_prompt(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in m.items() if k not in _TRANSCRIPT_ONLY_KEYS} for m in messages]


def _route(deltas, renderer) -> None:
    for delta in deltas:
        if delta.channel == "reasoning":
            renderer.reasoning(delta.text)
        else:
            renderer.content(delta.text)
