"""`dsv4 chat` as a service on an opened model (`runtime.open`): sampling defaults, a session, one prompt."""

from __future__ import annotations

import json
import math
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from dsv4cli.chat.session import ChatSession, ChatSettings
from dsv4cli.demo.model import DEMO_TEMPERATURE
from dsv4cli.engine.engine import Engine
from dsv4cli.engine.events import TurnResult
from dsv4cli.engine.speculative import auto_draft
from dsv4cli.errors import UsageError
from dsv4cli.runtime.open import OpenModel
from dsv4cli.runtime.options import PlacementOptions


def loads_mtp(draft: int | None, auto: bool, placement: PlacementOptions) -> bool:
    """Whether to load the MTP layer: drafts were asked for, or the default may draft (the model runs on the CPU
    alone, see `resolve_draft`)."""
    return bool(draft) or (auto and placement.cpu_only)


def resolve_draft(opened: OpenModel, draft: int | None, auto: bool) -> int:
    """The draft length to decode `opened` with: --draft as given (the checkpoint must have its MTP layer), or,
    when neither --draft nor --no-draft is given (`auto`), `auto_draft`'s default for where the model runs."""
    if draft and not opened.model.mtp:
        raise UsageError("this checkpoint has no MTP layer (mtp.* tensors) to draft with", "drop {opt:draft}")
    if not auto:
        return draft or 0
    cpu_only = opened.placement.offload is None and opened.model.device.type == "cpu"
    return auto_draft(bool(opened.model.mtp), cpu_only)


def sampling_defaults(opened: OpenModel) -> tuple[float, float]:
    """(temperature, top_p) when the user gives none: the demo's, else the checkpoint's
    generation_config.json (greedy when it says do_sample false; a missing do_sample counts as
    sampling, as every DeepSeek release sets it true), else DeepSeek's 1.0 / 1.0."""
    if opened.is_demo:
        return DEMO_TEMPERATURE, 1.0
    try:
        config = json.loads((opened.path / "generation_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 1.0, 1.0
    if not isinstance(config, dict):
        return 1.0, 1.0
    temperature = config.get("temperature", 1.0) if config.get("do_sample", True) else 0.0
    top_p = config.get("top_p", 1.0)
    valid = all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                for v in (temperature, top_p))
    return (float(temperature), float(top_p)) if valid and temperature >= 0 and 0 < top_p <= 1 else (1.0, 1.0)


def new_session(opened: OpenModel, settings: ChatSettings, context: int, draft: int = 0) -> ChatSession:
    """A session on `opened` with a `context`-token cache (ContextTooLarge, before allocating, when it cannot fit);
    `draft`: MTP draft tokens per decode step (0: plain decoding)."""
    torch.set_grad_enabled(False)
    return ChatSession(Engine(opened.model, max_context=context, draft=draft), opened.tokenizer, settings)


@contextmanager
def sigint_cancels(cancel: threading.Event) -> Iterator[threading.Event]:
    """While active, Ctrl-C sets `cancel` (the engine stops after the current step) instead of
    raising KeyboardInterrupt in the middle of a tensor op. Outside the main thread, a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield cancel
        return
    previous = signal.signal(signal.SIGINT, lambda *_: cancel.set())
    try:
        yield cancel
    finally:
        signal.signal(signal.SIGINT, previous)


def run_prompt(session: ChatSession, text: str, renderer) -> TurnResult:
    """One-shot: answer `text` (Ctrl-C stops the reply: the result is then marked interrupted)."""
    with sigint_cancels(threading.Event()) as cancel:
        return session.send(text, renderer, cancel)
