"""Held-out accuracy of demo-architecture checkpoints, non-think against think-high.

    python tools/eval_demo.py                      # the built-in demo model
    python tools/eval_demo.py demo demo-q3 demo-q2 --per-kind 20 --json results.json

Each MODEL (a directory, a downloaded model's name, or `demo`) answers the same held-out questions
that `tools/train_demo.py` evaluates (never seen in training) greedily through the real chat
path, with the kernels `dsv4 chat` would use. This is how a `dsv4 quantize` output of the demo is
compared with the original (README, "Quantize the demo model").
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from dsv4cli.demo.corpus import EVAL_KINDS
from dsv4cli.demo.model import DEMO_ALIAS
from dsv4cli.errors import DsvError
from dsv4cli.runtime.open import open_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_demo import evaluate_both, held_out_problems  # the training script's own evaluation


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="*", default=[DEMO_ALIAS], metavar="MODEL")
    p.add_argument("--per-kind", type=int, default=50, help="held-out questions per task kind (default 50)")
    p.add_argument("--kinds", default=",".join(EVAL_KINDS), help="comma-separated task kinds")
    p.add_argument("--seed", type=int, default=0, help="the training run's --seed (default 0, the shipped demo)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, help="also write the results here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    torch.set_num_threads(opts.threads)
    problems = held_out_problems(opts.seed, opts.per_kind, tuple(opts.kinds.split(",")))
    results = {}
    rows = []
    try:
        for model in opts.models:
            with open_model(model) as opened:
                for notice in opened.notices:
                    print(notice, file=sys.stderr)
                started = time.perf_counter()
                results[model] = evaluate_both(opened.model, opened.tokenizer, problems, lambda _line: None, model)
            scores = {mode: r["accuracy"] for mode, r in results[model].items()}
            rows.append(f"| {model} | {scores['non-think']:.1%} | {scores['think-high']:.1%} | "
                        f"{time.perf_counter() - started:.0f} s |")
    except DsvError as err:
        print(f"eval_demo: error: {err.one_line()}", file=sys.stderr)
        return 1
    print(f"{len(problems)} held-out questions ({opts.per_kind} per kind: {opts.kinds}), greedy\n")
    print("| model | non-think | think-high | time |\n|---|---:|---:|---:|")
    print("\n".join(rows))
    if opts.json is not None:
        opts.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
