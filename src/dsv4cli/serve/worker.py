"""One engine for many requests: a bounded FIFO queue in front of a single generation thread.

HTTP handlers run on the server's event loop; the model runs on this worker's thread, one request at a
time (a single machine's cores and memory bandwidth are the limit, not the request count). Each request is
a `Ticket`: the handler waits on it, the worker streams the reply's pieces into it. Setting the ticket's
`cancel` event (the client went away, the request timed out) stops the generation after the current token.
The worker never prints; it keeps the last requests' records for /health and the request log.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from dsv4cli.chat.tokenizer import Tokenizer
from dsv4cli.chat.turn import run_completion, run_turn
from dsv4cli.engine.events import TurnResult
from dsv4cli.engine.sampling import SamplingParams
from dsv4cli.errors import DsvError, OutOfMemory
from dsv4cli.serve.errors import ApiError


@dataclass
class Job:
    """What the engine runs for one request."""

    prompt_ids: Sequence[int]
    sampling: SamplingParams
    max_tokens: int
    chat: bool = True  # a chat turn (trace and tool calls parsed), else a raw completion
    thinking: bool = False
    reasoning_budget: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # raw completions: generate to the limit (benchmarks)


@dataclass
class Record:
    """One finished request, as /health and the request log report it."""

    prompt_tokens: int
    cached_tokens: int
    generated_tokens: int
    seconds: float
    finish: str  # the engine's finish reason, or "cancelled" / "error"


class Ticket:
    """A queued request's channel from the worker thread to its handler on the event loop.

    Items: ("reasoning" | "content", text) while the reply streams, then ("done", TurnResult) or
    ("error", ApiError)."""

    def __init__(self, job: Job, loop: asyncio.AbstractEventLoop):
        self.job = job
        self.cancel = threading.Event()
        self.queued_at = time.monotonic()
        self._loop = loop
        self._items: asyncio.Queue = asyncio.Queue()

    def put(self, kind: str, value) -> None:
        """From the worker thread (a closed loop, at shutdown, is ignored)."""
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._items.put_nowait, (kind, value))

    async def get(self, timeout: float | None):
        """The next item; TimeoutError after `timeout` seconds."""
        return await asyncio.wait_for(self._items.get(), timeout)

    # the sink `run_turn` streams into
    def reasoning(self, text: str) -> None:
        self.put("reasoning", text)

    def content(self, text: str) -> None:
        self.put("content", text)


@dataclass
class Worker:
    """The generation thread: `submit` queues a ticket (429 when `queue_size` wait already)."""

    engine: object
    tokenizer: Tokenizer
    queue_size: int = 16
    records: deque = field(default_factory=lambda: deque(maxlen=256))

    def __post_init__(self):
        self._queue: queue.Queue = queue.Queue(maxsize=self.queue_size)
        self._thread = threading.Thread(target=self._run, name="dsv4-generation", daemon=True)
        self.running: Ticket | None = None
        self._seconds = deque(maxlen=16)  # recent requests' durations, for Retry-After

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Cancel the running request and end the thread once it is done."""
        if self.running is not None:
            self.running.cancel.set()
        while True:
            try:
                ticket = self._queue.get_nowait()
            except queue.Empty:
                break
            if ticket is not None:
                ticket.cancel.set()
                ticket.put("error", ApiError(503, "the server is shutting down"))
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def submit(self, ticket: Ticket) -> None:
        try:
            self._queue.put_nowait(ticket)
        except queue.Full:
            raise ApiError(429, f"the server is busy: {self.queue_size} requests are already waiting; retry later",
                           code="queue_full", retry_after=self.retry_after()) from None

    def retry_after(self) -> int:
        """Seconds until a place in the queue is likely free: the recent requests' mean duration."""
        mean = sum(self._seconds) / len(self._seconds) if self._seconds else 1.0
        return max(1, min(600, math.ceil(mean)))

    def _run(self) -> None:
        torch.set_grad_enabled(False)  # per thread: the engine's forward passes build no graphs
        while True:
            ticket = self._queue.get()
            if ticket is None:
                return
            if ticket.cancel.is_set():  # the client left while it waited
                ticket.put("error", ApiError(499, "the request was cancelled before it started"))
                continue
            self.running = ticket
            started = time.monotonic()
            try:
                result = self._generate(ticket)
            except ApiError as err:
                ticket.put("error", err)
                self.records.append(Record(len(ticket.job.prompt_ids), 0, 0, time.monotonic() - started, "error"))
            else:
                stats = result.stats
                self.records.append(Record(stats.prompt_tokens, stats.cached_tokens, stats.generated_tokens,
                                           time.monotonic() - started, stats.finish_reason))
                ticket.put("done", result)
            finally:
                self.running = None
                self._seconds.append(time.monotonic() - started)

    def _generate(self, ticket: Ticket) -> TurnResult:
        job = ticket.job
        try:
            if job.chat:
                return run_turn(self.engine, self.tokenizer, job.prompt_ids, ticket, thinking=job.thinking,
                                sampling=job.sampling, max_tokens=job.max_tokens,
                                reasoning_budget=job.reasoning_budget, stop=job.stop, cancel=ticket.cancel)
            return run_completion(self.engine, self.tokenizer, job.prompt_ids, ticket, sampling=job.sampling,
                                  max_tokens=job.max_tokens, stop=job.stop, cancel=ticket.cancel,
                                  ignore_eos=job.ignore_eos)
        except OutOfMemory as err:
            raise ApiError(503, f"out of memory: {err.one_line()}") from None
        except DsvError as err:
            raise ApiError(500, f"generation failed: {err.one_line()}") from None
        except torch.OutOfMemoryError:
            raise ApiError(503, "out of memory during generation; retry with a shorter prompt") from None
        except Exception as err:  # a bug: the client gets one line, the server keeps serving
            raise ApiError(500, f"generation failed: {type(err).__name__}: {err}") from None
