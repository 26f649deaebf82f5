"""Generation engine: chunked prefill, decode loop, sampling, prompt cache, reasoning budget, cancellation.

The engine never prints: it yields `TokenEvent`s and finally one `GenerationStats`, so a
REPL, a one-shot pipe and a future server drive it the same way.

Prompt cache. V4's state is not a plain KV list: the 128-token window is a ring and the
compressors carry running state, so the cache cannot be cut back to an arbitrary
position. The engine therefore keeps snapshots at safe boundaries (the end of each
prompt, and the token before it, where the next turn's encoding usually diverges once
earlier reasoning is dropped) and resumes from the longest snapshot that is a prefix of
the new prompt; `GenerationStats.cached_tokens` says how many tokens were reused.

Failures. A context whose cache cannot fit in memory is refused before anything is allocated
(`ContextTooLarge`); a prompt longer than the context raises `ContextFull`; non-finite logits (NaN/Inf
weights or overflowing numerics) raise `NonFiniteLogits` instead of sampling garbage. Any error during a
generation resets the prompt cache, so the next call starts from a consistent state. Messages name no
CLI flags: callers add their own hints.
"""

from __future__ import annotations

import resource
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from dsv4cli.engine.events import GenerationStats, TokenEvent
from dsv4cli.engine.sampling import SamplingParams, make_sampler
from dsv4cli.errors import CheckpointError, OutOfMemory, UsageError
from dsv4cli.model.cache import CacheSnapshot, ModelCache
from dsv4cli.model.transformer import Transformer
from dsv4cli.runtime.options import available_ram_bytes
from dsv4cli.units import human_bytes

MAX_SNAPSHOTS = 8


class ContextFull(UsageError):
    """The prompt does not fit the context; `prompt_tokens` and `max_context` let callers suggest a size."""

    def __init__(self, prompt_tokens: int, max_context: int):
        super().__init__(f"the prompt of {prompt_tokens:,} tokens does not fit the context of {max_context:,} tokens",
                         "use a larger context or a shorter conversation")
        self.prompt_tokens = prompt_tokens
        self.max_context = max_context


class ContextTooLarge(OutOfMemory):
    """The cache for the requested context would not fit in the memory available for it."""

    def __init__(self, context: int, needed: int, available: int, where: str):
        super().__init__(f"a {context:,}-token context needs {gib(needed)} of cache, {gib(available)} is available "
                         f"{where}", "use a smaller context")
        self.context = context


class NonFiniteLogits(CheckpointError):
    """The model produced NaN or infinite logits: the weights are likely corrupt."""

    def __init__(self, kind: str, index: int):
        super().__init__(f"the model produced {kind} logits at token {index + 1} of the reply: its weights may be "
                         "corrupt (NaN/Inf values) or its numerics overflowed",
                         "check or re-download the checkpoint")


def gib(nbytes: int) -> str:
    """Bytes as the tables write them (decimal units: `units.human_bytes`)."""
    return human_bytes(nbytes)


@dataclass
class _Snapshot:
    ids: tuple[int, ...]  # the tokens whose state it holds
    state: CacheSnapshot


class Engine:
    def __init__(self, model: Transformer, max_context: int = 4096, prefill_chunk: int = 256):
        if max_context < 2:
            raise UsageError(f"context size must be at least 2 tokens, got {max_context}")
        longest = model.args.max_position_embeddings
        if max_context > longest:
            raise UsageError(f"a context of {max_context:,} tokens exceeds the model's max_position_embeddings "
                             f"({longest:,})", f"lower {{opt:ctx}} to {longest:,} or less")
        check_cache_fits(model, max_context)
        self.model = model
        self.max_context = max_context
        self.prefill_chunk = prefill_chunk
        self.cache: ModelCache = model.new_cache(1, max_context)
        self.cached_ids: list[int] = []  # tokens whose state the live cache holds
        self._snapshots: list[_Snapshot] = []

    # ------------------------------------------------------------ prompt cache
    def reset(self) -> None:
        """Forget all context (e.g. `/clear`)."""
        self.cache.reset()
        self.cached_ids = []
        self._snapshots = []

    def _reuse(self, prompt: list[int]) -> int:
        """Bring the cache to the longest reusable prefix of `prompt`; return its length."""
        n = len(self.cached_ids)
        if n <= len(prompt) and self.cached_ids == prompt[:n] and n < len(prompt):
            return n  # the prompt extends what is cached: keep going
        best = None
        for snap in self._snapshots:
            k = len(snap.ids)
            if k < len(prompt) and tuple(prompt[:k]) == snap.ids and (best is None or k > len(best.ids)):
                best = snap
        if best is None:
            self.reset()
            return 0
        self.cache.restore(best.state)
        self.cached_ids = list(best.ids)
        self._snapshots = [s for s in self._snapshots if len(s.ids) <= len(best.ids)]
        return len(best.ids)

    def _take_snapshot(self) -> None:
        ids = tuple(self.cached_ids)
        if any(s.ids == ids for s in self._snapshots):
            return
        self._snapshots.append(_Snapshot(ids, self.cache.snapshot()))
        if len(self._snapshots) > MAX_SNAPSHOTS:
            self._snapshots.pop(0)

    # --------------------------------------------------------------- forward
    @torch.inference_mode()
    def _feed(self, ids: list[int], cancel: threading.Event | None) -> torch.Tensor | None:
        """Run `ids` through the model in chunks; logits of the last one (None if cancelled)."""
        logits = None
        for start in range(0, len(ids), self.prefill_chunk):
            if cancel is not None and cancel.is_set():
                return None
            chunk = ids[start:start + self.prefill_chunk]
            logits = self.model(torch.tensor([chunk], device=self.model.device), self.cache)[0]
            self.cached_ids.extend(chunk)
        return logits

    def _prefill(self, prompt: list[int], cancel: threading.Event | None) -> tuple[torch.Tensor | None, int]:
        reused = self._reuse(prompt)
        rest = prompt[reused:]
        if len(rest) > 1:
            if self._feed(rest[:-1], cancel) is None:
                return None, reused
            self._take_snapshot()
        logits = self._feed(rest[-1:], cancel)
        if logits is not None:
            self._take_snapshot()
        return logits, reused

    # -------------------------------------------------------------- generate
    def generate(self, prompt_ids: list[int], sampling: SamplingParams | None = None, max_tokens: int = 512,
                 stop: Iterable[int] = (), cancel: threading.Event | None = None, *,
                 reasoning: bool = False, think_end_id: int | None = None, reasoning_budget: int | None = None,
                 ) -> Iterator[TokenEvent | GenerationStats]:
        """Yield one `TokenEvent` per generated token, then a final `GenerationStats`.

        `reasoning`: the prompt opened a thinking trace, so tokens up to `think_end_id` are
        reasoning; after `reasoning_budget` reasoning tokens the engine emits `think_end_id`
        itself (marked `forced`). Stop tokens are yielded, not fed back to the model.
        An error on the way resets the prompt cache (its state may be half written).
        """
        prompt = [int(t) for t in prompt_ids]
        self._check_request(prompt, max_tokens, think_end_id, reasoning_budget)
        try:
            yield from self._generate(prompt, sampling or SamplingParams(), max_tokens, set(stop), cancel,
                                      reasoning, think_end_id, reasoning_budget)
        except GeneratorExit:
            raise  # the caller stopped reading at a yield, where the cache is consistent
        except BaseException:
            self.reset()
            raise

    def _check_request(self, prompt: list[int], max_tokens: int, think_end_id: int | None,
                       reasoning_budget: int | None) -> None:
        if not prompt:
            raise UsageError("empty prompt")
        if len(prompt) >= self.max_context:
            raise ContextFull(len(prompt), self.max_context)
        if max_tokens < 1:
            raise UsageError(f"the token limit must be at least 1, got {max_tokens}")
        if reasoning_budget is not None and reasoning_budget < 0:
            raise UsageError(f"the reasoning budget must be at least 0, got {reasoning_budget}")
        if reasoning_budget is not None and think_end_id is None:
            raise UsageError("a reasoning budget needs the </think> token id")

    def _generate(self, prompt: list[int], sampling: SamplingParams, max_tokens: int, stop_ids: set[int],
                  cancel: threading.Event | None, reasoning: bool, think_end_id: int | None,
                  reasoning_budget: int | None) -> Iterator[TokenEvent | GenerationStats]:
        max_tokens = min(max_tokens, self.max_context - len(prompt))
        sample = make_sampler(sampling)
        stats = GenerationStats(prompt_tokens=len(prompt))
        offload_before = self._offload_counts()
        started = time.perf_counter()
        logits, stats.cached_tokens = self._prefill(prompt, cancel)
        stats.prefill_seconds = time.perf_counter() - started
        if logits is None:
            stats.finish_reason = "cancelled"
            stats.prefill_cancelled = True
            yield self._finish(stats, offload_before)
            return
        in_reasoning = reasoning
        decode_started = time.perf_counter()
        stats.finish_reason = "length"
        for index in range(max_tokens):
            forced = in_reasoning and reasoning_budget is not None and stats.reasoning_tokens >= reasoning_budget
            token = think_end_id if forced else sample(check_finite(logits, index))
            if index == 0:
                stats.time_to_first_token = time.perf_counter() - started
            stats.generated_tokens += 1
            if in_reasoning:
                if token == think_end_id:
                    in_reasoning = False
                    stats.reasoning_seconds = time.perf_counter() - started
                else:
                    stats.reasoning_tokens += 1
            yield TokenEvent(token, index, forced)
            if token in stop_ids:
                stats.finish_reason = "stop"
                break
            if cancel is not None and cancel.is_set():
                stats.finish_reason = "cancelled"
                break
            if index + 1 < max_tokens:
                logits = self._feed([token], None)
        stats.decode_seconds = time.perf_counter() - decode_started
        yield self._finish(stats, offload_before)

    def _offload_counts(self) -> tuple[int, int, int]:
        """(hits, misses, bytes moved) of the offload runtime so far; zeros without one."""
        stats = getattr(self.model.routed_experts, "stats", None)  # the offload runtime's transfer counters
        return (0, 0, 0) if stats is None else (stats.hits, stats.misses, stats.bytes_moved)

    def _finish(self, stats: GenerationStats, offload_before: tuple[int, int, int]) -> GenerationStats:
        stats.peak_memory_bytes = peak_memory_bytes(self.model.device)
        if getattr(self.model.routed_experts, "stats", None) is not None:
            hits, misses, moved = (now - then for now, then in zip(self._offload_counts(), offload_before, strict=True))
            stats.expert_cache_hit_rate = hits / (hits + misses) if hits + misses else None
            stats.expert_bytes_moved = moved
        return stats


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: device memory on CUDA, resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def check_finite(logits: torch.Tensor, index: int) -> torch.Tensor:
    """`logits`, or NonFiniteLogits when any is NaN or infinite (sampling them gives garbage silently)."""
    if not bool(torch.isfinite(logits).all()):
        raise NonFiniteLogits("NaN" if bool(torch.isnan(logits).any()) else "infinite", index)
    return logits


def cache_bytes(model: Transformer, max_context: int) -> int:
    """Bytes of the model's cache for `max_context` tokens, measured on the meta device (nothing allocated);
    estimated from the per-token size for contexts too large for torch to describe at all."""
    try:
        return model.new_cache(1, max_context, device="meta").nbytes
    except (RuntimeError, TypeError, OverflowError):
        dtype_bytes = torch.empty(0, dtype=model.numerics.act_dtype).element_size()
        return int(ModelCache.bytes_per_token(model.args, dtype_bytes, model.cache_layout) * max_context)


def available_bytes(device: torch.device) -> int:
    """Memory a new allocation can get: free plus cached-but-unused on a GPU, MemAvailable on the host."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return available_ram_bytes()


def check_cache_fits(model: Transformer, max_context: int) -> None:
    """ContextTooLarge unless the cache for `max_context` tokens fits the memory of the model's device."""
    device = model.device
    needed = cache_bytes(model, max_context)
    available = available_bytes(device)
    if needed > available:
        where = "on the GPU" if device.type == "cuda" else "in RAM"
        raise ContextTooLarge(max_context, needed, available, where)
