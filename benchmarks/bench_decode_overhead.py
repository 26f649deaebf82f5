"""The per-op cost of one decode step: its median time and how many torch ops it dispatches.

On a small model (the demo: 4 layers of width 128) a decode step is almost all small torch ops and their
Python around them; on the real ones the same ops are a fixed cost per layer on top of the weight reads.
This times one plain decode step (cache restored before each, 64 tokens of context, native kernels
selected) and counts the ops that reach torch's dispatcher. With `--baseline-src DIR` (the `src` folder of
another checkout, e.g. a `git worktree` of an older commit) the same step of that code runs in a child
process, the two arms alternating round by round on this machine, and the table gives both.

    python benchmarks/bench_decode_overhead.py [--model demo|PATH] [--rounds 6] [--steps 60]
        [--baseline-src /tmp/old/src] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from timing import load_average

CONTEXT = list(range(100, 164))  # prompt tokens fed before the timed steps


def measure(model: str, steps: int) -> dict[str, float]:
    """{"ms": median step time, "ops": torch ops dispatched by one step} of this process's dsv4cli."""
    import time

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from dsv4cli import kernels
    from dsv4cli.engine.engine import Engine
    from dsv4cli.runtime.open import open_model

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.ops += 1
            return func(*args, **(kwargs or {}))

    torch.set_num_threads(1)
    kernels.select()
    with open_model(None if model == "demo" else model, with_mtp=False, tokenizer=False) as opened:
        net = opened.model
        engine = Engine(net, max_context=1024, draft=0)
        engine._feed(CONTEXT, None)
        cache = engine.cache
        with torch.inference_mode():
            snap = cache.snapshot()
            token = torch.tensor([[5]])

            def step() -> None:
                cache.restore(snap)
                net(token, cache)

            for _ in range(3):
                step()
            with Count():
                step()
            seconds = []
            for _ in range(steps):
                cache.restore(snap)
                t0 = time.perf_counter()
                net(token, cache)
                seconds.append(time.perf_counter() - t0)
    return {"ms": statistics.median(seconds) * 1e3, "ops": Count.ops}


def run_arm(src: str | None, model: str, steps: int) -> dict[str, float]:
    """`measure` in a child process whose dsv4cli comes from `src` (None: this checkout)."""
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([src, str(Path(__file__).parent)])
    out = subprocess.run([sys.executable, __file__, "--child", "--model", model, "--steps", str(steps)],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo", help="demo or a checkpoint directory")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=60, help="timed steps per round and arm")
    ap.add_argument("--baseline-src", help="the src folder of another checkout to compare with")
    ap.add_argument("--json")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.model, args.steps)))
        return
    arms = {"this checkout": None}
    if args.baseline_src:
        arms = {"baseline": args.baseline_src, **arms}
    start_load = load_average()
    results: dict[str, list[dict[str, float]]] = {name: [] for name in arms}
    for _ in range(args.rounds):
        for name, src in arms.items():
            results[name].append(run_arm(src, args.model, args.steps))
    print(f"model {args.model}, 1 thread, {args.rounds} alternating rounds x {args.steps} steps, "
          f"load average {start_load:.2f} -> {load_average():.2f}\n")
    print("| arm | step ms (median of rounds) | rounds' medians | torch ops per step |")
    print("|---|---:|---|---:|")
    for name, rows in results.items():
        ms = [r["ms"] for r in rows]
        print(f"| {name} | {statistics.median(ms):.2f} | {', '.join(f'{v:.1f}' for v in ms)} | {rows[0]['ops']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "rounds": results}, indent=1))


if __name__ == "__main__":
    main()
