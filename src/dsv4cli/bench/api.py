"""`dsv4 bench --api URL`: a remote OpenAI-compatible endpoint's time to first token and tok/s, measured as
a client sees them (network and server overhead included), in the report style of `dsv4 bench`.

Each test streams a raw completion whose prompt is token ids (random, a fresh draw per run, so no server's
prompt cache can answer it), greedy, with `ignore_eos` so the reply runs to its limit:
- ppN: an N-token prompt and one token out; t/s = N / time to first token.
- tgN: a 16-token prompt and N tokens out; t/s = (N - 1) / (last token - first token).
"""

from __future__ import annotations

import datetime
import json
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dsv4cli.chat.remote import RemoteEndpoint, RemoteError, connect
from dsv4cli.errors import UsageError

TG_PROMPT_TOKENS = 16
#: token ids drawn for prompts: above the special tokens, inside every V4 vocabulary
TOKEN_RANGE = (1000, 100_000)


@dataclass
class ApiResult:
    test: str  # "pp" or "tg"
    tokens: int
    rates: list[float] = field(default_factory=list)  # tok/s per timed run
    first_token_seconds: list[float] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.test}{self.tokens}"

    @property
    def median(self) -> float:
        return statistics.median(self.rates)

    @property
    def ttft_median(self) -> float:
        return statistics.median(self.first_token_seconds)

    def to_dict(self) -> dict[str, Any]:
        return {"test": self.test, "label": self.label, "tokens": self.tokens, "tokens_per_second": self.median,
                "samples_tokens_per_second": self.rates, "time_to_first_token_seconds": self.ttft_median,
                "samples_time_to_first_token_seconds": self.first_token_seconds}


@dataclass
class ApiReport:
    date: str
    url: str
    model: str
    repetitions: int
    results: list[ApiResult]

    def to_dict(self) -> dict[str, Any]:
        return {"date": self.date, "url": self.url, "model": self.model, "repetitions": self.repetitions,
                "results": [r.to_dict() for r in self.results]}


def stream_completion(endpoint: RemoteEndpoint, prompt: list[int], max_tokens: int) -> tuple[float, float, int]:
    """(seconds to the first token, seconds from the first to the last, tokens generated) of one streamed,
    greedy completion run to its limit."""
    body = {"model": endpoint.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    started = time.perf_counter()
    first = last = None
    generated = 0
    with endpoint.request("POST", "/completions", body) as response:
        for raw in response:
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            try:
                chunk = json.loads(line[5:])
            except ValueError:
                raise RemoteError(f"{endpoint.base_url} sent a stream event that is not JSON") from None
            if chunk.get("error"):
                raise RemoteError(f"{endpoint.base_url} failed: {chunk['error']}")
            if chunk.get("choices"):
                now = time.perf_counter()
                first = first or now
                last = now
            usage = chunk.get("usage")
            if usage:
                generated = int(usage.get("completion_tokens") or 0)
    if first is None:
        raise RemoteError(f"{endpoint.base_url} streamed no tokens")
    return first - started, last - first, generated


def run_api_bench(url: str, api_key: str | None, model: str | None, prompt_tokens: tuple[int, ...],
                  gen_tokens: tuple[int, ...], repetitions: int, seed: int = 0,
                  progress: Callable[[str], None] | None = None) -> ApiReport:
    if repetitions < 1:
        raise UsageError(f"the repetitions must be at least 1, got {repetitions}")
    endpoint = connect(url, api_key, model)
    draw = random.Random(seed)

    def prompt(n: int) -> list[int]:
        return [draw.randrange(*TOKEN_RANGE) for _ in range(n)]

    results = []
    tests = [("pp", n) for n in prompt_tokens if n > 0] + [("tg", n) for n in gen_tokens if n > 1]
    for test, n in tests:
        result = ApiResult(test, n)
        for run in range(repetitions + 1):  # the first is a warm-up
            if progress is not None:
                progress(f"{result.label}: run {run + 1} of {repetitions + 1}")
            if test == "pp":
                ttft, _, _ = stream_completion(endpoint, prompt(n), 1)
                rate = n / ttft
            else:
                ttft, decode, generated = stream_completion(endpoint, prompt(TG_PROMPT_TOKENS), n)
                rate = (max(generated, 2) - 1) / decode if decode > 0 else 0.0
            if run:
                result.rates.append(rate)
                result.first_token_seconds.append(ttft)
        results.append(result)
    return ApiReport(datetime.datetime.now().astimezone().isoformat(timespec="seconds"), endpoint.base_url,
                     endpoint.model, repetitions, results)


def render_api(report: ApiReport, output: str) -> str:
    from dsv4cli.bench.run import markdown_table

    if output == "json":
        return json.dumps(report.to_dict(), indent=2)
    if output == "jsonl":
        return "\n".join(json.dumps({"model": report.model, "url": report.url, "date": report.date, **r.to_dict()})
                         for r in report.results)
    if output == "csv":
        rows = ["model,url,test,tokens,tokens_per_second,time_to_first_token_seconds"]
        rows += [f"{report.model},{report.url},{r.test},{r.tokens},{r.median:.3f},{r.ttft_median:.4f}"
                 for r in report.results]
        return "\n".join(rows)
    rows = [[report.model, r.label, f"{r.median:.2f}", f"{r.ttft_median * 1000:.1f}",
             f"{min(r.rates):.2f}-{max(r.rates):.2f}"] for r in report.results]
    table = markdown_table(["model", "test", "t/s (median)", "TTFT ms", "t/s range"], rows)
    return "\n".join([f"- endpoint: {report.url} · date: {report.date} · {report.repetitions} runs (+1 warm-up) · "
                      "greedy, ignore_eos, random token-id prompts", "", table, "",
                      "- measured by the client: network and server overhead included"])
