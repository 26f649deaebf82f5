"""Generation engine: chunked prefill, decode loop, sampling, prompt cache, reasoning budget, cancellation.

The engine never prints: it yields `TokenEvent`s and finally one `GenerationStats`, so a
REPL, a one-shot pipe and a future server drive it the same way.

Prompt cache. V4's state is not a plain KV list: the 128-token window is a ring and the
compressors carry running state, so the cache cannot be cut back to an arbitrary
position. The engine therefore keeps snapshots at safe boundaries (the end of each
prompt, and the token before it, where the next turn's encoding usually diverges once
earlier reasoning is dropped) and resumes from the longest snapshot that is a prefix of
the new prompt; `GenerationStats.cached_tokens` says how many tokens were reused.
A chat keeps one conversation, and its snapshots share the live cache's pools. A server passes
`prompt_cache_bytes`: its snapshots then copy the pools too, so the prefixes of several
conversations stay reusable, and the least recently used ones are evicted to stay within that budget.

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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from dsv4cli.engine.events import GenerationStats, TokenEvent
from dsv4cli.engine.sampling import SamplingParams, make_sampler
from dsv4cli.engine.speculative import MAX_DRAFT, DraftSampler
from dsv4cli.errors import CheckpointError, OutOfMemory, UsageError
from dsv4cli.model.cache import CacheSnapshot, ModelCache
from dsv4cli.model.transformer import Transformer
from dsv4cli.runtime.options import available_ram_bytes
from dsv4cli.units import human_bytes

MAX_SNAPSHOTS = 8  # snapshots of one conversation (shared pools)
MAX_CACHED_PREFIXES = 64  # self-contained snapshots under a memory budget (a server's prompt cache)


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
class _Burst:
    """One speculative step's feed: the cache before it, and the tokens it fed."""

    before: CacheSnapshot
    last_stream: torch.Tensor | None
    fed: list[int]


@dataclass
class _Snapshot:
    ids: tuple[int, ...]  # the tokens whose state it holds
    state: CacheSnapshot
    last_stream: torch.Tensor | None = None  # the trunk's streams at its last position (drafting only)


class Engine:
    """`draft`: MTP draft tokens per decode step (0: plain decoding; 1..MAX_DRAFT need a model built
    with its MTP layer; see `speculative`). `prompt_cache_bytes`: keep self-contained prompt snapshots of
    several conversations within this many bytes, least recently used evicted first (None: one conversation)."""

    def __init__(self, model: Transformer, max_context: int = 4096, prefill_chunk: int = 256, draft: int = 0,
                 prompt_cache_bytes: int | None = None):
        if max_context < 2:
            raise UsageError(f"context size must be at least 2 tokens, got {max_context}")
        longest = model.args.max_position_embeddings
        if max_context > longest:
            raise UsageError(f"a context of {max_context:,} tokens exceeds the model's max_position_embeddings "
                             f"({longest:,})", f"lower {{opt:ctx}} to {longest:,} or less")
        if not 0 <= draft <= MAX_DRAFT:
            raise UsageError(f"the draft length must be 0 to {MAX_DRAFT}, got {draft}")
        if draft and not model.mtp:
            raise UsageError("drafting needs the checkpoint's MTP layer, and this model was loaded without one",
                             "load the model with its MTP layer, or decode without drafts")
        if prompt_cache_bytes is not None and prompt_cache_bytes < 0:
            raise UsageError(f"the prompt cache budget must be at least 0 bytes, got {prompt_cache_bytes}")
        check_cache_fits(model, max_context)
        self.model = model
        self.prompt_cache_bytes = prompt_cache_bytes
        self.evicted_prefixes = 0  # self-contained snapshots evicted to stay within the budget
        self.draft = draft
        #: the trunk's streams at the last position fed (drafting only): the MTP layer's input for the token after
        self._last_stream: torch.Tensor | None = None
        self.max_context = max_context
        self.prefill_chunk = prefill_chunk
        self.cache: ModelCache = model.new_cache(1, max_context)
        self.cached_ids: list[int] = []  # tokens whose state the live cache holds
        self._snapshots: list[_Snapshot] = []

    # ------------------------------------------------------------ prompt cache
    def reset(self) -> None:
        """Forget all context (e.g. `/clear`)."""
        self._reset_live()
        self._snapshots = []

    def _reset_live(self) -> None:
        self.cache.reset()
        self.cached_ids = []
        self._last_stream = None

    @property
    def prompt_cache_used_bytes(self) -> int:
        """Bytes the kept prompt snapshots hold."""
        return sum(snap.state.nbytes for snap in self._snapshots)

    @property
    def cached_prefixes(self) -> int:
        return len(self._snapshots)

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
            if self.prompt_cache_bytes is None:
                self.reset()
            else:
                self._reset_live()
            return 0
        self.cache.restore(best.state)
        self.cached_ids = list(best.ids)
        self._last_stream = best.last_stream
        if self.prompt_cache_bytes is None:  # shared pools: the snapshots past it are overwritten from here on
            self._snapshots = [s for s in self._snapshots if len(s.ids) <= len(best.ids)]
        else:  # most recently used last
            self._snapshots.remove(best)
            self._snapshots.append(best)
        return len(best.ids)

    def _take_snapshot(self) -> None:
        ids = tuple(self.cached_ids)
        for snap in self._snapshots:
            if snap.ids == ids:
                self._snapshots.remove(snap)
                self._snapshots.append(snap)
                return
        budget = self.prompt_cache_bytes
        self._snapshots.append(_Snapshot(ids, self.cache.snapshot(pools=budget is not None), self._last_stream))
        if budget is None:
            if len(self._snapshots) > MAX_SNAPSHOTS:
                self._snapshots.pop(0)
            return
        used = self.prompt_cache_used_bytes
        while self._snapshots and (used > budget or len(self._snapshots) > MAX_CACHED_PREFIXES):
            used -= self._snapshots.pop(0).state.nbytes
            self.evicted_prefixes += 1

    # --------------------------------------------------------------- forward
    @torch.inference_mode()
    def _feed(self, ids: list[int], cancel: threading.Event | None,
              progress: Callable[[int, int], None] | None = None, total: int = 0) -> torch.Tensor | None:
        """Run `ids` through the model in chunks; logits of the last one (None if cancelled). `progress(done,
        total)` is called before each chunk (done = tokens of `ids` fed so far)."""
        logits = None
        for start in range(0, len(ids), self.prefill_chunk):
            if progress is not None:
                progress(start, total)
            if cancel is not None and cancel.is_set():
                return None
            chunk = ids[start:start + self.prefill_chunk]
            token_ids = torch.tensor([chunk], device=self.model.device)
            if self.draft:
                streams = self.model.streams(token_ids, self.cache)
                self._follow_with_mtp(streams, token_ids)
                logits = self.model.logits(streams[:, -1:])[0, 0]
            else:
                logits = self.model(token_ids, self.cache)[0]
            self.cached_ids.extend(chunk)
        return logits

    def _follow_with_mtp(self, streams: torch.Tensor, token_ids: torch.Tensor) -> None:
        """Give the MTP layer the pairs (trunk streams at t, token t + 1) that the tokens just fed complete,
        so its window holds the real context when it drafts; `streams` [1,S,n,D] of `token_ids` [1,S]."""
        first = self.cache.pos - token_ids.shape[1]  # position of token_ids[0]
        if self._last_stream is not None and self.cache.mtp_pos == first - 1:
            pairs, nexts = torch.cat([self._last_stream, streams[:, :-1]], dim=1), token_ids
        else:  # nothing before (or the MTP lost track): start at the first stream of this call
            self.cache.mtp_pos = first
            pairs, nexts = streams[:, :-1], token_ids[:, 1:]
        if nexts.shape[1]:
            self.model.mtp_step(pairs, nexts, self.cache, with_logits=False)
        self._last_stream = streams[:, -1:].clone()

    @torch.inference_mode()
    def _speculate(self, token: int, k: int, drafter: DraftSampler, stats: GenerationStats, index: int
                   ) -> tuple[list[int], _Burst]:
        """Feed `token` (sampled, not yet fed) and k MTP drafts after it in one trunk forward; returns the
        tokens that follow `token` (the drafts kept, then the trunk's own next token, which is not fed) and
        what it takes to undo the feed if the caller stops inside them."""
        cache, model = self.cache, self.model
        drafts: list[int] = []
        draft_probs: list[torch.Tensor | None] = []
        hidden, last = self._last_stream, torch.tensor([[token]], device=model.device)
        real = None  # the MTP state after its one real pair (trunk streams, `token`); chained rows are guesses
        for i in range(k):
            logits, hidden = model.mtp_step(hidden, last, cache)
            if i == 0 and k > 1:
                real = cache.snapshot_mtp()
            draft, q = drafter.draft(logits[0])
            drafts.append(draft)
            draft_probs.append(q)
            last = torch.tensor([[draft]], device=model.device)
        if real is not None:
            cache.restore_mtp(real)
        burst = _Burst(cache.snapshot(), self._last_stream, [token, *drafts])
        fed = torch.tensor([[token, *drafts]], device=model.device)
        with cache.recording() as journal:
            streams = model.streams(fed, cache)
        target = check_finite(model.logits(streams)[0], index)
        kept, after = drafter.verify(drafts, draft_probs, target)
        stats.draft_tokens += k
        stats.accepted_draft_tokens += kept
        keep = kept + 1  # `token` and the drafts kept
        if keep < len(fed[0]):  # causal: the forward's cache writes for the kept tokens are the cache after them
            cache.keep_prefix(burst.before, journal, keep)
        self._follow_with_mtp(streams[:, :keep], fed[:, :keep])
        self.cached_ids.extend(burst.fed[:keep])
        return [*drafts[:kept], after], burst

    def _rewind(self, burst: _Burst, keep: int) -> None:
        """Back to the state before a burst's feed, then feed its first `keep` tokens again."""
        self.cache.restore(burst.before)
        self._last_stream = burst.last_stream
        del self.cached_ids[burst.before.pos:]
        self._feed(burst.fed[:keep], None)

    def _prefill(self, prompt: list[int], cancel: threading.Event | None,
                 progress: Callable[[int, int], None] | None = None) -> tuple[torch.Tensor | None, int]:
        reused = self._reuse(prompt)
        rest = prompt[reused:]
        if len(rest) > 1:
            if self._feed(rest[:-1], cancel, progress if len(rest) > self.prefill_chunk else None, len(rest)) is None:
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
                 halt: threading.Event | None = None, prefill_progress: Callable[[int, int], None] | None = None,
                 ) -> Iterator[TokenEvent | GenerationStats]:
        """Yield one `TokenEvent` per generated token, then a final `GenerationStats`.

        `reasoning`: the prompt opened a thinking trace, so tokens up to `think_end_id` are
        reasoning; after `reasoning_budget` reasoning tokens the engine emits `think_end_id`
        itself (marked `forced`). Stop tokens are yielded, not fed back to the model.
        `halt`: set by the consumer while it handles a token (a stop sequence ended in it), that token
        ends the generation as a stop token would (finish_reason "stop"); `cancel` ends it as "cancelled".
        `prefill_progress(done, total)`: called before each prefill chunk when the new part of the prompt
        needs more than one (done of total tokens fed; the engine itself never prints).
        An error on the way resets the prompt cache (its state may be half written).
        """
        prompt = [int(t) for t in prompt_ids]
        self._check_request(prompt, max_tokens, think_end_id, reasoning_budget)
        try:
            yield from self._generate(prompt, sampling or SamplingParams(), max_tokens, set(stop), cancel,
                                      reasoning, think_end_id, reasoning_budget, halt, prefill_progress)
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
                  reasoning_budget: int | None, halt: threading.Event | None = None,
                  prefill_progress: Callable[[int, int], None] | None = None,
                  ) -> Iterator[TokenEvent | GenerationStats]:
        max_tokens = min(max_tokens, self.max_context - len(prompt))
        sample = make_sampler(sampling)
        stats = GenerationStats(prompt_tokens=len(prompt))
        offload_before = self._offload_counts()
        started = time.perf_counter()
        logits, stats.cached_tokens = self._prefill(prompt, cancel, prefill_progress)
        stats.prefill_seconds = time.perf_counter() - started
        if logits is None:
            stats.finish_reason = "cancelled"
            stats.prefill_cancelled = True
            yield self._finish(stats, offload_before)
            return
        in_reasoning = reasoning
        decode_started = time.perf_counter()
        stats.finish_reason = "length"
        drafter = DraftSampler(sampling) if self.draft else None
        ahead: list[int] = []  # tokens a speculative step decided (fed, but for the last): yielded next
        burst: _Burst | None = None
        first_of_burst = 0  # index of the first token of `ahead`'s burst
        for index in range(max_tokens):
            forced = in_reasoning and reasoning_budget is not None and stats.reasoning_tokens >= reasoning_budget
            if ahead:  # the draft room below keeps a forced </think> out of a burst
                token, forced = ahead.pop(0), False
            else:
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
            halted = token in stop_ids or (halt is not None and halt.is_set())
            if halted or (cancel is not None and cancel.is_set()):
                stats.finish_reason = "stop" if halted else "cancelled"
                if ahead:  # stopped inside a burst: keep the cache at what was yielded but the last token
                    self._rewind(burst, index - first_of_burst + 1)
                break
            if index + 1 < max_tokens and not ahead:
                room = self._draft_room(index, max_tokens, in_reasoning, reasoning_budget, stats.reasoning_tokens)
                if room:
                    ahead, burst = self._speculate(token, room, drafter, stats, index)
                    first_of_burst = index + 1
                else:
                    logits = self._feed([token], None)
        stats.decode_seconds = time.perf_counter() - decode_started
        yield self._finish(stats, offload_before)

    def _draft_room(self, index: int, max_tokens: int, in_reasoning: bool, reasoning_budget: int | None,
                    reasoning_tokens: int) -> int:
        """Drafts the next step may take (0: a plain step): none past the token limit, the context or a
        reasoning budget's forced </think>, so a burst never has to be cut by them."""
        if not self.draft:
            return 0
        room = min(self.draft, max_tokens - index - 2, self.max_context - self.cache.pos - 2)
        if in_reasoning and reasoning_budget is not None:
            room = min(room, reasoning_budget - reasoning_tokens - 1)
        return max(room, 0)

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
