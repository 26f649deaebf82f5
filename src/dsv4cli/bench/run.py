"""`dsv4 bench` as a service: llama-bench-style prompt-processing / token-generation throughput.

For each context depth `d` the cache is first filled with `d` tokens of a fixed synthetic trace
(not timed; with `fill="synthetic"`, `--fill synthetic`, tg tests instead start from a cache filled
with random entries (`ModelCache.fill_synthetic`): the same work per decoded token as a real context,
in seconds instead of a prefill of `d` tokens; pp tests always prefill for real), then:

* `pp N`: prefill N more tokens (tok/s = N / prefill time);
* `tg N`: feed one token, then decode N tokens greedily (tok/s = N / time of the N decode steps).

Every measurement starts from the same cache state at position `d` (a snapshot of the fill),
after one warm-up run that is not counted. Token traces come from a seeded generator, so two
arms (e.g. kernels on/off) see identical inputs. Runs go through `Engine.generate`, the same
path as `dsv4 chat`; this module never imports the CLI.

Achieved bandwidth (tg only), gpt-fast's "bandwidth achieved":
``bytes per decoded token x tok/s``, where bytes per decoded token = every dense weight of the
trunk (attention, compressors, indexers, routers, shared experts, norms, mHC, output head; one
row of the lookup tables `embed` and `tid2eid`) + experts_per_token x bytes of one routed expert
x layers, all as stored in the checkpoint. It is compared with the machine's memory bandwidth,
measured once per run with STREAM-like copy and triad loops.
"""

from __future__ import annotations

import collections
import datetime
import hashlib
import io
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from dsv4cli import __version__, kernels
from dsv4cli.engine.engine import Engine
from dsv4cli.engine.events import GenerationStats
from dsv4cli.engine.sampling import SamplingParams
from dsv4cli.engine.speculative import MAX_DRAFT
from dsv4cli.errors import DsvError, UsageError
from dsv4cli.fsutil import atomic_write_bytes
from dsv4cli.io.checkpoint import INDEX_NAME
from dsv4cli.io.schema import checkpoint_specs
from dsv4cli.model.args import ModelArgs
from dsv4cli.paths import cache_dir
from dsv4cli.runtime.options import PlacementOptions
from dsv4cli.runtime.resolve import DIRECTORY, ModelRef, resolve_model
from dsv4cli.runtime.threads import thread_count
from dsv4cli.units import human_bytes, human_count

SCHEMA = "dsv4-bench/1"
GREEDY = SamplingParams(temperature=0)
OUTPUTS = ("md", "json", "jsonl", "csv")
#: the per-result columns of `-o csv` (and the keys each `-o jsonl` line starts with)
CSV_COLUMNS = ("model", "test", "tokens", "depth", "fill", "tokens_per_second", "tokens_per_second_std",
               "bandwidth_gb_s", "bandwidth_ratio", "expert_cache_hit_rate", "peak_memory_bytes", "draft_acceptance")
#: tensors looked up by token id: a decoded token reads one row of them, not the whole table
LOOKUP_TABLES = ("embed.weight", ".tid2eid")
DEFAULT_STREAM_BYTES = 128 << 20
STREAM_REPEATS = 5

Progress = Callable[[str], None]


# ======================================================================= settings


@dataclass(frozen=True)
class BenchSettings:
    """What to measure. `model=None` and `synth=None` means the built-in demo model."""

    model: str | None = None
    synth: str | None = None  # preset name: bench a random checkpoint of it
    layers: int | None = None  # --synth overrides, as in `dsv4 synth`
    experts: int | None = None
    prompt_tokens: tuple[int, ...] = (512,)
    gen_tokens: tuple[int, ...] = (128,)
    depths: tuple[int, ...] = (0,)
    repetitions: int = 3
    ctx: int | None = None  # None: just what the tests need
    threads: int | None = None  # None: torch's default
    seed: int = 0
    warmup: bool = True
    fill: str = "prefill"  # how tg tests reach their depth: "prefill" (real) or "synthetic" (random entries)
    stream_bytes: int = DEFAULT_STREAM_BYTES  # size of each array of the memory-bandwidth test
    placement: PlacementOptions = field(default_factory=PlacementOptions)  # the placement flags of `dsv4 chat`
    draft: int = 0  # MTP draft tokens per decode step (speculative decoding; 0: plain decoding)

    def __post_init__(self) -> None:
        if self.model is not None and self.synth is not None:
            raise UsageError("give either MODEL or {opt:synth}, not both")
        if self.synth is None and (self.layers is not None or self.experts is not None):
            raise UsageError("{opt:layers} and {opt:experts} only apply to {opt:synth}")
        _check_counts("-p", self.prompt_tokens, minimum=0)  # 0 skips the pp tests, as in llama-bench
        _check_counts("-n", self.gen_tokens, minimum=0)
        if not any(self.prompt_tokens) and not any(self.gen_tokens):
            raise UsageError("-p 0 and -n 0 leave nothing to measure", "give a pp or a tg size")
        _check_counts("-d", self.depths, minimum=0)
        if self.repetitions < 1:
            raise UsageError(f"-r must be at least 1, got {self.repetitions}")
        if self.fill not in FILLS:
            raise UsageError(f"unknown {{opt:fill}} {self.fill!r}", f"choose one of: {', '.join(FILLS)}")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"{{opt:threads}} must be at least 1, got {self.threads}")
        if not 0 <= self.draft <= MAX_DRAFT:
            raise UsageError(f"{{opt:draft}} must be 0 to {MAX_DRAFT}, got {self.draft}",
                             f"draft 1 to {MAX_DRAFT} tokens per step, or 0 to turn drafting off")
        if self.stream_bytes < 4096:
            raise UsageError("the memory-bandwidth arrays must be at least 4 KiB")
        if self.ctx is not None:
            check_context(self, self.ctx)

    @property
    def context(self) -> int:
        return self.ctx if self.ctx is not None else required_context(self)


FILLS = ("prefill", "synthetic")


def _check_counts(flag: str, values: tuple[int, ...], minimum: int) -> None:
    if not values:
        raise UsageError(f"{flag} needs at least one value")
    bad = [v for v in values if v < minimum]
    if bad:
        raise UsageError(f"{flag} values must be at least {minimum}, got {bad[0]}")


def required_context(settings: BenchSettings) -> int:
    """Cache size the tests need: pp at depth d holds d + p tokens and samples one more;
    tg feeds one token at depth d, then decodes n (the engine keeps room for the last one)."""
    return max(settings.depths) + max(max(settings.prompt_tokens) + 1, max(settings.gen_tokens) + 2)


def check_context(settings: BenchSettings, ctx: int) -> None:
    depth, prompt, gen = max(settings.depths), max(settings.prompt_tokens), max(settings.gen_tokens)
    need = required_context(settings)
    if ctx < need:
        test = f"pp{prompt}" if prompt + 1 >= gen + 2 else f"tg{gen}"
        raise UsageError(f"{test} at depth {depth} needs a context of {need} tokens, {{opt:ctx}} is {ctx}",
                         f"raise {{opt:ctx}} to at least {need}, or leave it out")


def parse_counts(flag: str, text: str) -> tuple[int, ...]:
    """'0,4096' -> (0, 4096) (llama-bench style comma lists)."""
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UsageError(f"{flag} expects comma-separated integers, got {text!r}") from None
    if not values:
        raise UsageError(f"{flag} needs at least one value")
    return values


# ======================================================================= results


@dataclass(frozen=True)
class TokenBytes:
    """Weight bytes read per decoded token (see the module docstring for the formula)."""

    dense: int  # trunk weights except routed experts; lookup tables count one row
    expert: int  # one routed expert (w1, w2, w3 and their scales)
    experts_per_token: int
    layers: int
    lookup_tables_skipped: int  # bytes of embed/tid2eid tables that a token does not read

    @property
    def routed(self) -> int:
        return self.experts_per_token * self.expert * self.layers

    @property
    def total(self) -> int:
        return self.dense + self.routed

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "routed": self.routed, "total": self.total,
                "formula": "dense + experts_per_token * expert * layers"}


@dataclass(frozen=True)
class MemoryBandwidth:
    """Best-of-N STREAM-like rates on the model's device, in bytes per second."""

    copy: float
    triad: float
    array_bytes: int
    device: str
    threads: int

    def to_dict(self) -> dict[str, Any]:
        return {"copy_gb_s": self.copy / 1e9, "triad_gb_s": self.triad / 1e9, "array_bytes": self.array_bytes,
                "device": self.device, "threads": self.threads}


@dataclass
class TestResult:
    test: str  # "pp" or "tg"
    tokens: int
    depth: int
    seconds: list[float] = field(default_factory=list)  # one per timed repetition
    warmup_seconds: float | None = None
    start_position: int = 0  # cache position when the timed part began (= depth)
    end_position: int = 0
    reused_tokens: int = 0  # prompt tokens the engine took from the cache (= depth)
    expert_cache_hit_rate: float | None = None
    expert_bytes_moved: list[int] = field(default_factory=list)  # host -> device, per timed repetition
    peak_memory_bytes: int = 0
    bytes_per_token: int | None = None  # tg only
    reference_bandwidth: float | None = None  # measured triad bytes/s
    synthetic_fill: bool = False  # the depth came from random cache entries, not a prefill
    draft_tokens: int = 0  # MTP drafts proposed over the timed runs (tg with drafting only)
    accepted_draft_tokens: int = 0  # ... and kept by the verifying forward

    @property
    def label(self) -> str:
        return f"{self.test}{self.tokens}"

    @property
    def samples(self) -> list[float]:
        return [self.tokens / s for s in self.seconds]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples)

    @property
    def std(self) -> float:
        return statistics.stdev(self.samples) if len(self.samples) > 1 else 0.0

    @property
    def expert_bytes_moved_per_token(self) -> float | None:
        """Mean host -> device expert bytes per processed token (None without the offload runtime)."""
        return statistics.fmean(self.expert_bytes_moved) / self.tokens if self.expert_bytes_moved else None

    @property
    def draft_acceptance(self) -> float | None:
        """Share of the MTP drafts kept (None without drafting); tok/s already counts what they saved."""
        return self.accepted_draft_tokens / self.draft_tokens if self.draft_tokens else None

    @property
    def bandwidth(self) -> float | None:
        """Achieved bytes/s (tg only)."""
        return None if self.bytes_per_token is None else self.bytes_per_token * self.mean

    @property
    def bandwidth_ratio(self) -> float | None:
        if self.bandwidth is None or not self.reference_bandwidth:
            return None
        return self.bandwidth / self.reference_bandwidth

    def to_dict(self) -> dict[str, Any]:
        bandwidth = self.bandwidth
        return {
            "test": self.test, "label": self.label, "tokens": self.tokens, "depth": self.depth,
            "fill": "synthetic" if self.synthetic_fill else "prefill",
            "tokens_per_second": self.mean, "tokens_per_second_std": self.std,
            "samples_tokens_per_second": self.samples, "seconds": self.seconds,
            "warmup_seconds": self.warmup_seconds, "start_position": self.start_position,
            "end_position": self.end_position, "reused_tokens": self.reused_tokens,
            "bytes_per_token": self.bytes_per_token,
            "bandwidth_gb_s": None if bandwidth is None else bandwidth / 1e9,
            "bandwidth_ratio": self.bandwidth_ratio,
            "expert_cache_hit_rate": self.expert_cache_hit_rate,
            "expert_bytes_moved_per_token": self.expert_bytes_moved_per_token,
            "peak_memory_bytes": self.peak_memory_bytes,
            "draft_tokens": self.draft_tokens, "accepted_draft_tokens": self.accepted_draft_tokens,
            "draft_acceptance": self.draft_acceptance,
        }


@dataclass
class BenchReport:
    date: str
    machine: dict[str, Any]
    versions: dict[str, str]
    kernels: dict[str, str]
    model: dict[str, Any]
    settings: dict[str, Any]
    token_bytes: TokenBytes
    memory_bandwidth: MemoryBandwidth
    results: list[TestResult]
    peak_memory_kind: str  # "rss" or "cuda"

    @property
    def peak_memory_bytes(self) -> int:
        return max((r.peak_memory_bytes for r in self.results), default=0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA, "date": self.date, "machine": self.machine, "versions": self.versions,
            "kernels": self.kernels, "model": self.model, "settings": self.settings,
            "bytes_per_token": self.token_bytes.to_dict(), "memory_bandwidth": self.memory_bandwidth.to_dict(),
            "peak_memory_bytes": self.peak_memory_bytes, "peak_memory_kind": self.peak_memory_kind,
            "results": [r.to_dict() for r in self.results],
        }


# ======================================================================= model sources


def synth_root() -> Path:
    """Where `--synth` checkpoints are kept between runs (same preset + seed = same files)."""
    return cache_dir() / "bench"


def synthetic_args(preset: str, layers: int | None = None, experts: int | None = None) -> ModelArgs:
    """A preset with `dsv4 synth`'s --layers/--experts overrides applied."""
    from dsv4cli.model.presets import get_preset, shrink

    return shrink(get_preset(preset), layers, experts)


def synthetic_checkpoint(preset: str, layers: int | None = None, experts: int | None = None, seed: int = 0,
                         root: Path | None = None) -> Path:
    """A random checkpoint of `preset`, written once into the cache and reused afterwards."""
    from dsv4cli.io.writer import write_random_checkpoint

    args = synthetic_args(preset, layers, experts)
    digest = hashlib.sha256(repr(args).encode()).hexdigest()[:10]
    path = (root or synth_root()) / f"{preset}-s{seed}-{digest}"
    if (path / INDEX_NAME).is_file():
        return path
    return write_random_checkpoint(args, path, seed=seed, overwrite=True)


def synthetic_label(preset: str, layers: int | None = None, experts: int | None = None) -> str:
    """'synth:tiny', 'synth:flash-slice-L2-E8'."""
    overrides = "".join(f"-{flag}{v}" for flag, v in (("L", layers), ("E", experts)) if v is not None)
    return f"synth:{preset}{overrides}"


def model_source(settings: BenchSettings) -> tuple[ModelRef, str, str]:
    """(the model, display name, kind: demo | synthetic | checkpoint)."""
    if settings.synth is not None:
        path = synthetic_checkpoint(settings.synth, settings.layers, settings.experts, settings.seed)
        label = synthetic_label(settings.synth, settings.layers, settings.experts)
        return ModelRef(label, DIRECTORY, path), label, "synthetic"
    ref = resolve_model(settings.model)
    return ref, ("demo" if ref.is_demo else ref.path.name), ("demo" if ref.is_demo else "checkpoint")


# ======================================================================= measurement


def decoded_token_bytes(args: ModelArgs) -> TokenBytes:
    """Weight bytes one decoded token reads (trunk only: the engine does not run the MTP layer)."""
    from dsv4cli.runtime.placement import model_bytes

    dense_all, expert = model_bytes(args)
    specs = checkpoint_specs(args, include_mtp=False, experts=range(0))
    skipped = sum(s.nbytes - s.nbytes // s.shape[0] for name, s in specs.items()
                  if any(name.endswith(t) for t in LOOKUP_TABLES))
    return TokenBytes(dense=dense_all - skipped, expert=expert, experts_per_token=args.n_activated_experts,
                      layers=args.n_layers, lookup_tables_skipped=skipped)


@dataclass(frozen=True)
class Traces:
    """Fixed synthetic tokens: a fill (prefixes give every depth), a pp prompt, a tg start token."""

    fill: list[int]
    prompt: list[int]
    decode_start: int

    @classmethod
    def make(cls, vocab_size: int, fill_len: int, prompt_len: int, seed: int) -> Traces:
        gen = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, vocab_size, (fill_len + prompt_len + 1,), generator=gen).tolist()
        return cls(tokens[:fill_len], tokens[fill_len:fill_len + prompt_len], tokens[-1])


def _final_stats(events: Iterator) -> GenerationStats:
    """Drain `Engine.generate`; its last event is the stats."""
    last = collections.deque(events, maxlen=1)
    if not last or not isinstance(last[0], GenerationStats):
        raise RuntimeError("the engine did not report its stats")
    return last[0]


@dataclass
class _Fill:
    ids: list[int]
    snapshot: Any
    synthetic: bool = False


def fill_to_depth(engine: Engine, traces: Traces, depth: int, previous: _Fill | None = None) -> _Fill:
    """Bring the engine's cache to `depth` trace tokens (continuing from `previous`); not timed."""
    if previous is not None:
        rewind(engine, previous)
    else:
        engine.reset()
    if depth > len(engine.cached_ids):
        _final_stats(engine.generate(traces.fill[:depth], GREEDY, max_tokens=1))
    if engine.cache.pos != depth or engine.cached_ids != traces.fill[:depth]:
        raise RuntimeError(f"cache at {engine.cache.pos} after filling to depth {depth}")
    return _Fill(list(engine.cached_ids), engine.cache.snapshot())


def synthetic_fill(engine: Engine, traces: Traces, depth: int) -> _Fill:
    """The engine's cache at `depth` with random entries standing for the first `depth` trace tokens
    (`ModelCache.fill_synthetic`); not timed, and only for tg (their text is noise)."""
    engine.reset()
    engine.cache.fill_synthetic(depth, seed=depth)
    engine.cached_ids = list(traces.fill[:depth])
    return _Fill(list(engine.cached_ids), engine.cache.snapshot(), synthetic=True)


def rewind(engine: Engine, fill: _Fill) -> None:
    """Put the engine back to the state right after `fill` (cache and the ids it holds)."""
    engine.reset()
    engine.cache.restore(fill.snapshot)
    engine.cached_ids = list(fill.ids)


def run_once(engine: Engine, fill: _Fill, traces: Traces, test: str, tokens: int) -> tuple[float, GenerationStats]:
    """One pp or tg run from `fill`; returns (timed seconds, engine stats)."""
    rewind(engine, fill)
    if test == "pp":
        stats = _final_stats(engine.generate([*fill.ids, *traces.prompt[:tokens]], GREEDY, max_tokens=1))
        return stats.prefill_seconds, stats
    stats = _final_stats(engine.generate([*fill.ids, traces.decode_start], GREEDY, max_tokens=tokens + 1))
    if stats.generated_tokens != tokens + 1:
        raise RuntimeError(f"tg{tokens}: generated {stats.generated_tokens - 1} tokens ({stats.finish_reason})")
    return stats.decode_seconds, stats


def measure(engine: Engine, fill: _Fill, traces: Traces, test: str, tokens: int, settings: BenchSettings,
            progress: Progress | None = None) -> TestResult:
    """Warm-up (not counted), then `settings.repetitions` timed runs of one test at one depth."""
    depth = len(fill.ids)
    result = TestResult(test, tokens, depth, start_position=fill.snapshot.pos, synthetic_fill=fill.synthetic)
    if settings.warmup:
        _say(progress, f"{result.label} @ d{depth}: warm-up")
        result.warmup_seconds, _ = run_once(engine, fill, traces, test, tokens)
    hit_rates = []
    for rep in range(settings.repetitions):
        _say(progress, f"{result.label} @ d{depth}: run {rep + 1}/{settings.repetitions}")
        seconds, stats = run_once(engine, fill, traces, test, tokens)
        result.seconds.append(seconds)
        result.end_position, result.reused_tokens = engine.cache.pos, stats.cached_tokens
        result.peak_memory_bytes = max(result.peak_memory_bytes, stats.peak_memory_bytes)
        result.draft_tokens += stats.draft_tokens
        result.accepted_draft_tokens += stats.accepted_draft_tokens
        if stats.expert_cache_hit_rate is not None:
            hit_rates.append(stats.expert_cache_hit_rate)
        if engine.model.routed_experts is not None:
            result.expert_bytes_moved.append(stats.expert_bytes_moved)
    result.expert_cache_hit_rate = statistics.fmean(hit_rates) if hit_rates else None
    return result


def _say(progress: Progress | None, message: str) -> None:
    if progress is not None:
        progress(message)


def measure_memory_bandwidth(device: torch.device, array_bytes: int = DEFAULT_STREAM_BYTES,
                             repeats: int = STREAM_REPEATS) -> MemoryBandwidth:
    """STREAM-like copy (a = b: 2 x N x 4 bytes) and triad (a = b + 3c: 3 x N x 4 bytes), best of `repeats`."""
    n = max(array_bytes // 4, 1024)
    a = torch.zeros(n, device=device)
    b = torch.full((n,), 1.0, device=device)
    c = torch.full((n,), 2.0, device=device)
    copy = _best_rate(lambda: a.copy_(b), 2 * n * 4, repeats, device)
    triad = _best_rate(lambda: torch.add(b, c, alpha=3.0, out=a), 3 * n * 4, repeats, device)
    return MemoryBandwidth(copy, triad, n * 4, str(device), torch.get_num_threads())


def _best_rate(kernel: Callable[[], object], nbytes: int, repeats: int, device: torch.device) -> float:
    best = float("inf")
    kernel()  # touch the pages / warm up
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        kernel()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return nbytes / max(best, 1e-9)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ======================================================================= environment


def machine_info(threads: int) -> dict[str, Any]:
    return {"cpu": cpu_model(), "cores": os.cpu_count() or 0, "usable_cores": _usable_cores(),
            "ram_bytes": ram_bytes(), "gpu": gpu_name(), "threads": threads, "os": platform.platform()}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 0


def ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 0


def gpu_name() -> str | None:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def versions() -> dict[str, str]:
    return {"dsv4": __version__, "torch": torch.__version__, "python": platform.python_version()}


# ======================================================================= the benchmark


def run_bench(settings: BenchSettings, progress: Progress | None = None) -> BenchReport:
    """Load the model, run every (depth, test) with repetitions, measure memory bandwidth."""
    from dsv4cli.io.describe import summarize
    from dsv4cli.runtime.open import open_model

    ref, name, kind = model_source(settings)
    path = ref.path
    _say(progress, f"loading {name}")
    with open_model(ref, placement=settings.placement, context=settings.context, tokenizer=False,
                    with_mtp=settings.draft > 0) as opened:
        model, placement = opened.model, opened.placement
        if settings.draft and not model.mtp:
            raise UsageError(f"{name} has no MTP layer (mtp.* tensors) to draft with", "drop {opt:draft}")
        for notice in opened.notices:
            _say(progress, notice)
        with thread_count(settings.threads) as threads, torch.inference_mode():
            engine = Engine(model, max_context=settings.context, draft=settings.draft)
            if model.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(model.device)
            results = run_tests(engine, settings, progress)
            _say(progress, "measuring memory bandwidth")
            bandwidth = measure_memory_bandwidth(model.device, settings.stream_bytes)
            machine = machine_info(threads)
    args = model.args
    token_bytes = decoded_token_bytes(args)
    for result in results:
        if result.test == "tg":
            result.bytes_per_token, result.reference_bandwidth = token_bytes.total, bandwidth.triad
    summary = summarize(args)
    model_info = {"name": name, "kind": kind, "path": str(path), "size_bytes": summary.bytes_total,
                  "params": summary.params_total, "params_active": summary.params_active, "layers": args.n_layers,
                  "routed_experts": args.n_routed_experts, "experts_per_token": args.n_activated_experts,
                  "expert_dtype": args.expert_dtype, "device": str(model.device), "placement": placement.summary()}
    return BenchReport(
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"), machine=machine,
        versions=versions(), kernels=kernels.active(), model=model_info, settings=_settings_dict(settings, engine),
        token_bytes=token_bytes, memory_bandwidth=bandwidth, results=results,
        peak_memory_kind="cuda" if model.device.type == "cuda" else "rss")


def run_tests(engine: Engine, settings: BenchSettings, progress: Progress | None = None) -> list[TestResult]:
    traces = Traces.make(engine.model.args.vocab_size, max(settings.depths), max(settings.prompt_tokens),
                         settings.seed)
    tests = [("pp", p) for p in dict.fromkeys(settings.prompt_tokens) if p > 0]
    tests += [("tg", n) for n in dict.fromkeys(settings.gen_tokens) if n > 0]
    results, fill = [], None
    for depth in sorted(set(settings.depths)):
        real = [(test, n) for test, n in tests if test == "pp" or settings.fill == "prefill" or depth == 0]
        if real:
            _say(progress, f"filling the cache to depth {depth}")
            fill = fill_to_depth(engine, traces, depth, fill)
            results += [measure(engine, fill, traces, test, n, settings, progress) for test, n in real]
        if len(real) < len(tests):
            _say(progress, f"filling the cache to depth {depth} with synthetic entries")
            fake = synthetic_fill(engine, traces, depth)
            results += [measure(engine, fake, traces, test, n, settings, progress)
                        for test, n in tests if (test, n) not in real]
            fill = None  # the next real fill starts over: the live cache holds random entries
    return results


def _settings_dict(settings: BenchSettings, engine: Engine) -> dict[str, Any]:
    return {"prompt_tokens": list(settings.prompt_tokens), "gen_tokens": list(settings.gen_tokens),
            "depths": sorted(set(settings.depths)), "repetitions": settings.repetitions, "ctx": engine.max_context,
            "seed": settings.seed, "warmup": settings.warmup, "prefill_chunk": engine.prefill_chunk,
            "fill": settings.fill, "draft": settings.draft,
            "sampling": "greedy"}


# ======================================================================= output


def short_kernels(active: dict[str, str]) -> str:
    """'linear=cpu, others ref' style summary of `kernels.active()`."""
    impl = {op: qualname.removeprefix("dsv4cli.kernels.").split(".")[0] for op, qualname in active.items()}
    common = max(set(impl.values()), key=list(impl.values()).count) if impl else "-"
    special = [f"{op}={name}" for op, name in impl.items() if name != common]
    return ", ".join([*special, f"{'others' if special else 'all'} {common}"])


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def table_rows(report: BenchReport) -> list[list[str]]:
    size, params = human_bytes(report.model["size_bytes"]), human_count(report.model["params"])
    rows = []
    for r in report.results:
        bandwidth = r.bandwidth
        depth = f"{r.depth}*" if r.synthetic_fill else str(r.depth)
        rows.append([report.model["name"], size, params, r.label, depth, f"{r.mean:.2f} ± {r.std:.2f}",
                     "-" if bandwidth is None else f"{bandwidth / 1e9:.2f}", _fmt_ratio(r.bandwidth_ratio),
                     _fmt_ratio(r.expert_cache_hit_rate)])
    return rows


TABLE_HEADER = ["model", "size", "params", "test", "depth", "t/s", "GB/s", "of mem BW", "experts hit"]
_RIGHT_ALIGNED = {1, 2, 4, 5, 6, 7, 8}


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if i in _RIGHT_ALIGNED else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths, strict=True))) + " |"

    rule = "| " + " | ".join(("-" * (w - 1) + ":") if i in _RIGHT_ALIGNED else "-" * w
                             for i, w in enumerate(widths)) + " |"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def render_markdown(report: BenchReport) -> str:
    m, v, s = report.machine, report.versions, report.settings
    tb, bw = report.token_bytes, report.memory_bandwidth
    gpu = m["gpu"] or "none"
    header = [
        f"machine: {m['cpu']} · {m['cores']} cores · {human_bytes(m['ram_bytes'])} RAM · GPU: {gpu}",
        f"versions: dsv4 {v['dsv4']} · torch {v['torch']} · python {v['python']}",
        f"kernels: {short_kernels(report.kernels)}",
        f"date: {report.date} · {_plural(m['threads'], 'thread')} · ctx {s['ctx']} · "
        f"{_plural(s['repetitions'], 'run')} (+{1 if s['warmup'] else 0} warm-up) · seed {s['seed']} · greedy"
        + (f" · MTP drafts: {s['draft']} per step" if s.get("draft") else ""),
    ]
    footer = [
        f"bytes per decoded token: {human_bytes(tb.total)} = dense {human_bytes(tb.dense)} + "
        f"{tb.experts_per_token} experts × {human_bytes(tb.expert)} × {tb.layers} layers "
        "(embedding and hash tables: one row)",
        f"memory bandwidth (measured, {_plural(bw.threads, 'thread')}, {bw.array_bytes / 2**20:g} MiB arrays): "
        f"triad {bw.triad / 1e9:.2f} GB/s, copy {bw.copy / 1e9:.2f} GB/s; \"of mem BW\" = tg GB/s / triad",
        f"peak memory: {human_bytes(report.peak_memory_bytes)} ({report.peak_memory_kind.upper()})",
    ]
    footer += [f"{r.label} @ d{r.depth}: {_fmt_ratio(r.draft_acceptance)} of {r.draft_tokens} MTP drafts kept "
               "(t/s is the effective rate: drafts included)" for r in report.results if r.draft_tokens]
    if any(r.synthetic_fill for r in report.results):
        footer.append("depth*: the cache was filled with synthetic entries, not by a prefill: "
                      "the work per decoded token of a real context that deep, with text that stands for nothing")
    if report.model.get("placement"):
        footer.append(report.model["placement"])
        footer += [f"{r.label} @ d{r.depth}: expert cache hit {_fmt_ratio(r.expert_cache_hit_rate)}, "
                   f"{human_bytes(int(r.expert_bytes_moved_per_token or 0))} of experts moved per token"
                   for r in report.results]
    table = markdown_table(TABLE_HEADER, table_rows(report))
    return "\n".join([*(f"- {h}" for h in header), "", table, "", *(f"- {f}" for f in footer)])


def render(report: BenchReport, output: str) -> str:
    """The report as `-o` asks: md (table), json (everything), jsonl (one object per result, with the model,
    machine threads and date), csv (`CSV_COLUMNS`, one row per result)."""
    import csv
    import json

    if output == "md":
        return render_markdown(report)
    if output == "json":
        return json.dumps(report.to_dict(), indent=2)
    common = {"model": report.model["name"], "threads": report.machine["threads"], "date": report.date}
    rows = [{**common, **result.to_dict()} for result in report.results]
    if output == "jsonl":
        return "\n".join(json.dumps(row) for row in rows)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue().rstrip("\n")


def require_matplotlib() -> None:
    """Fail early (before benchmarking) when --plot cannot be honoured."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise DsvError("{opt:plot} needs matplotlib, which is not installed",
                       "install matplotlib or drop {opt:plot}") from None


def write_plot(report: BenchReport, out: str | Path) -> Path:
    """tok/s against context depth, one series per test (pp panel, tg panel); written atomically."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(out)
    figure = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(figure)
    for axes, kind, title in zip(figure.subplots(1, 2), ("pp", "tg"), ("prompt processing", "token generation"),
                                 strict=True):
        for label in dict.fromkeys(r.label for r in report.results if r.test == kind):
            series = [r for r in report.results if r.label == label]
            axes.errorbar([r.depth for r in series], [r.mean for r in series], yerr=[r.std for r in series],
                          marker="o", capsize=3, label=label)
        axes.set(title=title, xlabel="context depth (tokens)", ylabel="tokens / s")
        axes.set_ylim(bottom=0)
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle(f"dsv4 bench · {report.model['name']} · {report.machine['cpu']}")
    image = io.BytesIO()
    figure.savefig(image, format=(out.suffix.lstrip(".") or "png"))
    try:
        atomic_write_bytes(out, image.getvalue())
    except OSError as exc:
        raise DsvError(f"cannot write the plot {out}: {exc.strerror or exc}") from None
    return out
