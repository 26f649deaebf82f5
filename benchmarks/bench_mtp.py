"""MTP speculative decoding on real chats: plain greedy decoding against `--draft 1..3`, and llama.cpp's tg.

`dsv4 bench --draft N` times drafts on fixed synthetic prompts, on which a trained model's continuation (and so
its drafts' acceptance) means little. This runs the engine (`dsv4 chat`'s code path) on arithmetic chats in
think-high mode, the demo model's training distribution, alternating the arms in every round (medians; the load
average is printed), and checks that every draft length gives the plain greedy tokens. With --llama-work (the
--work directory of bench_peers.py, which has built llama.cpp) the same checkpoint, converted by llama.cpp's
own converter, also runs `llama-bench -n GEN` on the same cores.

    python benchmarks/bench_mtp.py [--threads 1] [--rounds 3] [--gen 64] [--llama-work /tmp/peers] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
from pathlib import Path

import torch

from dsv4cli.chat.encoding import ThinkMode, encode_messages
from dsv4cli.engine.engine import Engine
from dsv4cli.engine.events import GenerationStats, TokenEvent
from dsv4cli.engine.sampling import SamplingParams
from dsv4cli.kernels import cpu
from dsv4cli.runtime.open import open_model

from bench_peers import gguf, link_files, llama_bench, pin_to_cores
from timing import load_average

QUESTIONS = ("What is 487 + 356?", "What is 29 * 14?", "What is 1000 - 387?", "What is 56 + 78 + 91?")


def decode(engine: Engine, prompt: list[int], gen: int) -> tuple[list[int], GenerationStats]:
    events = list(engine.generate(prompt, sampling=SamplingParams(temperature=0), max_tokens=gen))
    return [e.token_id for e in events if isinstance(e, TokenEvent)], events[-1]


def llama_tg(work: Path, checkpoint: Path, threads: int, gen: int, repetitions: int) -> list[float]:
    # a view under --work: the converter's tokenizer files go beside it, not beside the user's checkpoint
    model = gguf(work, link_files(checkpoint, work / "ckpt" / checkpoint.name))
    out = subprocess.run([str(llama_bench(work)), "-m", str(model), "-p", "0", "-n", str(gen), "-r", str(repetitions),
                          "-t", str(threads), "-o", "json"], capture_output=True, text=True, check=True)
    return [s for result in json.loads(out.stdout) for s in result["samples_ts"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None, help="checkpoint directory (default: the demo)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gen", type=int, default=64)
    parser.add_argument("--drafts", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--llama-work", type=Path, help="bench_peers.py's --work directory: also run llama.cpp")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    cores = pin_to_cores(args.threads)
    torch.set_num_threads(args.threads)
    cpu.set_threads(args.threads)
    load_before = load_average()
    arms = [0, *args.drafts]
    rates: dict[str, list[float]] = {("plain" if k == 0 else f"draft {k}"): [] for k in arms}
    kept: dict[str, list[float]] = {f"draft {k}": [] for k in args.drafts}
    with open_model(args.model, with_mtp=True) as opened:
        engines = {k: Engine(opened.model, max_context=2048, draft=k) for k in arms}
        prompts = [opened.tokenizer.encode(encode_messages([{"role": "user", "content": q}],
                                                           **ThinkMode.THINK_HIGH.encode_kwargs()))
                   for q in QUESTIONS]
        for prompt in prompts:  # warm-up, and the plain greedy tokens every arm must reproduce
            want = decode(engines[0], prompt, args.gen)[0]
            for k in args.drafts:
                got = decode(engines[k], prompt, args.gen)[0]
                if got != want:
                    raise SystemExit(f"--draft {k} changed the greedy output of {prompt[:8]}...")
        for _ in range(args.rounds):
            for k in arms:
                steps = seconds = drafted = accepted = 0
                for prompt in prompts:
                    _, stats = decode(engines[k], prompt, args.gen)
                    steps += stats.generated_tokens - 1
                    seconds += stats.decode_seconds
                    drafted += stats.draft_tokens
                    accepted += stats.accepted_draft_tokens
                name = "plain" if k == 0 else f"draft {k}"
                rates[name].append(steps / seconds)
                if k:
                    kept[name].append(accepted / max(drafted, 1))
        label = opened.label
        checkpoint = opened.ref.path
    if args.llama_work:
        rates["llama.cpp"] = llama_tg(args.llama_work.resolve(), checkpoint, args.threads, args.gen, args.rounds)
    load_after = load_average()
    print(f"model {label} · {args.threads} thread(s) pinned to cores {cores} · load average {load_before:.2f} before, "
          f"{load_after:.2f} after · greedy, think-high, {len(QUESTIONS)} chats x {args.gen} tokens, {args.rounds} "
          "rounds\n")
    plain = statistics.median(rates["plain"])
    llama = statistics.median(rates["llama.cpp"]) if "llama.cpp" in rates else None
    print("| arm | tok/s (median) | drafts kept | vs plain | vs llama.cpp tg |\n|---|---:|---:|---:|---:|")
    for name, samples in rates.items():
        rate = statistics.median(samples)
        share = f"{statistics.median(kept[name]):.1%}" if name in kept else "-"
        versus = f"{rate / llama:.2f}x" if llama else "-"
        print(f"| {name} | {rate:.2f} | {share} | {rate / plain:.2f}x | {versus} |")
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "model": label, "load": [load_before, load_after],
                                         "cpu_count": os.cpu_count(), "tokens_per_second": rates,
                                         "drafts_kept": kept}, indent=2))


if __name__ == "__main__":
    main()
