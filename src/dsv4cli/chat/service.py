"""`dsv4 chat` as a service: open a model, build a session, run one prompt or the REPL."""

from __future__ import annotations

import json
import math
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dsv4cli.chat.session import ChatSession, ChatSettings
from dsv4cli.chat.tokenizer import Tokenizer
from dsv4cli.demo.model import DEMO_ALIAS, DEMO_LABEL, DEMO_TEMPERATURE, demo_model_dir
from dsv4cli.engine.engine import Engine
from dsv4cli.engine.events import TurnResult
from dsv4cli.errors import ModelNotFound
from dsv4cli.io.checkpoint import Checkpoint
from dsv4cli.model.layers import Numerics
from dsv4cli.model.transformer import Transformer
from dsv4cli.runtime.apply import Placement, place_by_options
from dsv4cli.runtime.loader import load_model
from dsv4cli.runtime.options import PlacementOptions


@dataclass
class OpenModel:
    model: Transformer
    checkpoint: Checkpoint
    tokenizer: Tokenizer
    path: Path
    label: str
    is_demo: bool
    placement: Placement = field(default_factory=Placement)

    def close(self) -> None:
        self.placement.detach()
        self.checkpoint.close()


def resolve_model_dir(model: str | None) -> tuple[Path, bool]:
    """The checkpoint directory for a MODEL argument (a directory, `demo` or None for the built-in
    demo model, or a downloaded model's name), and whether it is the demo."""
    if model is None:
        return demo_model_dir(), True
    path = Path(model).expanduser()
    if path.is_dir():
        return path, False
    if model == DEMO_ALIAS:
        return demo_model_dir(), True
    from dsv4cli.hub.download import find_local_model

    try:
        local = find_local_model(model)
    except ModelNotFound:
        raise ModelNotFound(f"no model {model!r}: not a directory and not a downloaded model",
                            "`dsv4 list` shows downloaded models, `dsv4 download flash` fetches one; "
                            "`demo` names the built-in demo model") from None
    if not local.complete:
        raise ModelNotFound(f"the download of {model!r} in {local.path} is incomplete "
                            f"({local.files_present}/{local.files} files)", f"run `dsv4 download {model}` to finish it")
    return local.path, False


def open_model(model: str | None, numerics: Numerics | None = None, notices: list[str] | None = None,
               placement: PlacementOptions | None = None, context: int = 16384) -> OpenModel:
    """Load a model for chatting and place it: by the placement flags when given, on the GPU
    when one is visible, else on the CPU from the memory-mapped files. Warnings (no compiler, plan
    warnings, weights larger than RAM) are appended to `notices`."""
    from dsv4cli import kernels

    notices = notices if notices is not None else []
    path, is_demo = resolve_model_dir(model)
    notices.extend(kernels.select())
    tokenizer = Tokenizer.from_dir(path)
    net, checkpoint = load_model(path, numerics)
    opened = OpenModel(net, checkpoint, tokenizer, path, "", is_demo)
    try:
        if tokenizer.vocab_size > net.args.vocab_size:
            raise ModelNotFound(f"tokenizer in {path} has {tokenizer.vocab_size} tokens but the model only "
                                f"{net.args.vocab_size}", "use the tokenizer.json that came with the checkpoint")
        opened.label = DEMO_LABEL if is_demo else (f"{path.name} ({net.args.n_layers} layers, "
                                                   f"{net.args.n_routed_experts} experts)")
        opened.placement = place_by_options(net, placement or PlacementOptions(), context, path)
        notices.extend(opened.placement.warnings)
    except BaseException:
        opened.close()
        raise
    return opened


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


def new_session(opened: OpenModel, settings: ChatSettings, context: int) -> ChatSession:
    """A session on `opened` with a `context`-token cache (ContextTooLarge, before allocating, when it cannot fit)."""
    torch.set_grad_enabled(False)
    return ChatSession(Engine(opened.model, max_context=context), opened.tokenizer, settings)


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
