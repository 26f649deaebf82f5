"""Test helpers for `dsv4 serve`: the real server (uvicorn on 127.0.0.1, a free port) around an engine, and
engines that script the model's output or hold it back, for the paths the demo model never takes."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from dsv4cli.engine.events import GenerationStats, TokenEvent
from dsv4cli.engine.sampling import SamplingParams
from dsv4cli.serve.app import ServeConfig
from dsv4cli.serve.requests import ServeDefaults
from dsv4cli.serve.server import ApiServer, bind
from dsv4cli.serve.worker import Worker

GREEDY = SamplingParams(temperature=0)


def start_server(engine, tokenizer, *, queue_size: int = 8, api_key: str | None = None, timeout: float = 120,
                 context: int = 2048, max_tokens: int = 48, names: tuple[str, ...] = ("demo",),
                 max_body_bytes: int = 1 << 20) -> ApiServer:
    defaults = ServeDefaults(names, sampling=GREEDY, max_tokens=max_tokens, reasoning_budget=48, context=context)
    config = ServeConfig(defaults, api_key=api_key, timeout=timeout, max_body_bytes=max_body_bytes)
    return ApiServer(Worker(engine, tokenizer, queue_size), tokenizer, config, bind("127.0.0.1", 0)).start()


@dataclass
class ScriptedEngine:
    """Answers every prompt with the tokens of `reply` (the model's raw output text, special tokens
    included), `delay` seconds apart; keeps the prompts it was given."""

    tokenizer: object
    reply: str = ""
    delay: float = 0.0
    prompts: list[list[int]] = field(default_factory=list)
    max_context: int = 2048

    def generate(self, prompt_ids, sampling=None, max_tokens=512, stop=(), cancel=None, *, reasoning=False,
                 think_end_id=None, reasoning_budget=None, halt=None, prefill_progress=None):
        self.prompts.append(list(prompt_ids))
        stats = GenerationStats(prompt_tokens=len(prompt_ids), finish_reason="length")
        for index, token in enumerate(self.tokenizer.encode(self.reply)[:max_tokens]):
            time.sleep(self.delay)
            stats.generated_tokens += 1
            yield TokenEvent(token, index)
            if token in set(stop) or (halt is not None and halt.is_set()):
                stats.finish_reason = "stop"
                break
            if cancel is not None and cancel.is_set():
                stats.finish_reason = "cancelled"
                break
        yield stats


@dataclass
class HeldEngine:
    """Generates nothing until `release` is set (a request that occupies the worker)."""

    release: threading.Event = field(default_factory=threading.Event)
    started: threading.Event = field(default_factory=threading.Event)
    max_context: int = 2048

    def generate(self, prompt_ids, sampling=None, max_tokens=512, stop=(), cancel=None, **_):
        self.started.set()
        while not self.release.is_set() and not (cancel is not None and cancel.is_set()):
            time.sleep(0.01)
        yield GenerationStats(prompt_tokens=len(prompt_ids), finish_reason="cancelled" if cancel.is_set() else "stop")


@dataclass
class EndlessEngine:
    """The real engine with the end-of-sentence token ignored: it generates until its limit or a cancel,
    and counts the tokens it generated."""

    engine: object
    generated: int = 0

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate(self, prompt_ids, sampling=None, max_tokens=512, stop=(), cancel=None, **kwargs):
        kwargs.pop("halt", None)
        self.generated = 0
        for event in self.engine.generate(prompt_ids, sampling, max_tokens, (), cancel, **kwargs):
            if isinstance(event, TokenEvent):
                self.generated += 1
            yield event
