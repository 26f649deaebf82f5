"""Server overhead per token: `dsv4 serve` against the in-process engine, on the same model, in one run.

The server runs as its own process (`dsv4 serve --port 0`), as users run it; this process is its client
and, in alternate rounds, runs the same engine in-process. Each round measures, on a fresh random
token-id prompt (no prompt cache can answer it), greedy and to the token limit:
* in-process: `Engine.generate` directly (tg: first to last token; pp: time to the first token);
* via the API: a streamed /v1/completions request (`dsv4cli.bench.api`), so HTTP, SSE, JSON and the
  worker hand-off are included, as a client sees them.
Overhead per token = 1/api - 1/in-process (tg); medians over rounds; the load average is printed.

    python benchmarks/bench_serve.py [MODEL] [--gen 64] [--prompt 256] [--rounds 5] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from dsv4cli.bench.api import TG_PROMPT_TOKENS, TOKEN_RANGE, stream_completion
from dsv4cli.chat.remote import connect
from dsv4cli.engine.engine import Engine
from dsv4cli.engine.events import GenerationStats, TokenEvent
from dsv4cli.engine.sampling import SamplingParams
from dsv4cli.runtime.open import open_model
from dsv4cli.runtime.threads import thread_count


def in_process(engine: Engine, prompt: list[int], max_tokens: int) -> tuple[float, float, int]:
    """(seconds to the first token, first to last, tokens) of one greedy generation without a stop token."""
    started = time.perf_counter()
    first = last = None
    count = 0
    for event in engine.generate(prompt, SamplingParams(temperature=0), max_tokens, stop=()):
        if isinstance(event, TokenEvent):
            now = time.perf_counter()
            first = first or now
            last = now
            count += 1
        elif isinstance(event, GenerationStats):
            break
    return first - started, last - first, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None, help="MODEL (default: the demo)")
    parser.add_argument("--gen", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--ctx", type=int, default=4096)
    args = parser.parse_args()
    dsv4 = Path(sys.executable).with_name("dsv4")
    argv = [str(dsv4), "serve", *([args.model] if args.model else []), "--port", "0", "-q", "--ctx", str(args.ctx)]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    server = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        url = re.search(r"on (http://\S+?) ", server.stderr.readline())[1]
        endpoint = connect(url)
        draw = random.Random(0)
        arms: dict[str, list[float]] = {k: [] for k in ("tg local", "tg api", "pp local", "pp api")}
        torch.set_grad_enabled(False)
        with thread_count(args.threads), open_model(args.model, context=args.ctx) as opened:
            engine = Engine(opened.model, max_context=args.ctx)
            for round_ in range(args.rounds + 1):  # round 0 warms up both
                tg_prompt = [draw.randrange(*TOKEN_RANGE) for _ in range(TG_PROMPT_TOKENS)]
                pp_prompt = [draw.randrange(*TOKEN_RANGE) for _ in range(args.prompt)]
                _, local_decode, local_n = in_process(engine, tg_prompt, args.gen)
                _, api_decode, api_n = stream_completion(endpoint, tg_prompt, args.gen)
                local_ttft, _, _ = in_process(engine, pp_prompt, 1)
                api_ttft, _, _ = stream_completion(endpoint, pp_prompt, 1)
                if round_:
                    arms["tg local"].append((local_n - 1) / local_decode)
                    arms["tg api"].append((api_n - 1) / api_decode)
                    arms["pp local"].append(args.prompt / local_ttft)
                    arms["pp api"].append(args.prompt / api_ttft)
        median = {k: statistics.median(v) for k, v in arms.items()}
        load = os.getloadavg()
        print(f"model: {opened.label} · {args.rounds} rounds · load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
        print("| test | in-process t/s | via dsv4 serve t/s | ratio | overhead |")
        print("|---|---:|---:|---:|---:|")
        overhead = 1000 * (1 / median["tg api"] - 1 / median["tg local"])
        print(f"| tg{args.gen} | {median['tg local']:.2f} | {median['tg api']:.2f} | "
              f"{median['tg api'] / median['tg local']:.3f} | {overhead:+.2f} ms/token |")
        pp_overhead = 1000 * (args.prompt / median["pp api"] - args.prompt / median["pp local"])
        print(f"| pp{args.prompt} | {median['pp local']:.2f} | {median['pp api']:.2f} | "
              f"{median['pp api'] / median['pp local']:.3f} | {pp_overhead:+.1f} ms/request |")
        for name, values in arms.items():
            print(f"{name}: " + " ".join(f"{v:.1f}" for v in values))
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
