"""Long-context benchmark: decode ms/token from 1K to 1M tokens of context and prefill tok/s at depth, on
the Flash-shaped 4-layer slice (sliding, CSA, HCA, CSA; real Flash attention and expert shapes, 8 routed
experts), with today's path and the path it replaced, side by side in one run.

    python benchmarks/bench_long_context.py [--depths 1024,16384,65536,262144,1048576] [--steps 4]
        [--prefill-depths 0,8192,32768] [--prefill-tokens 256] [--rounds 2] [--threads 1] [--json out.json]

Decode at depth N: the caches are filled with N tokens' worth of synthetic entries
(`ModelCache.fill_synthetic`, rounded as the model rounds its own), then `--steps` real decode steps
are timed, each doing exactly the work a real context of N tokens causes. The two paths alternate at
every depth, for `--rounds` rounds; the median over rounds of each round's median step is reported.
Prefill at depth N: the same synthetic context, then a real prefill of `--prefill-tokens` tokens.

Rows:
* `new`: the compact cache (FP8 KV rows 584 B, FP4 indexer keys 68 B) read in place by the native
  `cached_attn` / `indexer_topk` kernels;
* `old`: what the model did before (bf16 pools; every layer and token joins the whole pool to the window
  with `torch.cat` and converts it to float in the reference sparse attention; the indexer scores all
  entries in one einsum and sorts them all). Emulated here by ops with the same signatures.

KV memory: the cache's bytes per token of context, from the allocated tensors, against the compact
formats' size, and the process's resident memory after filling the deepest context.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time

import torch

from dsv4cli import kernels
from dsv4cli.bench.run import synthetic_checkpoint
from dsv4cli.kernels import cpu, ref
from dsv4cli.model.args import CSA
from dsv4cli.model.cache import CacheLayout, ModelCache
from dsv4cli.runtime.loader import load_model

from timing import call_seconds, load_average, median_seconds


def old_indexer_topk(q, weights, keys, visible, topk, block_entries=8192, max_chunk_bytes=1 << 26):
    """The indexer before: all keys to float, one [S, N] score block per query chunk, a full stable sort."""
    b, s, h, _ = q.shape
    n = keys.shape[1]
    keys = keys.float()
    top = min(topk, n)
    out = torch.full((b, s, top), -1, dtype=torch.long)
    step = max(1, (1 << 26) // max(1, b * h * n))
    for s0 in range(0, s, step):
        s1 = min(s, s0 + step)
        scores = torch.relu(torch.einsum("bshd,btd->bsht", q[:, s0:s1].float(), keys))
        scores = (scores * weights[:, s0:s1, :, None]).sum(2)
        hidden = torch.arange(n)[None, :] >= visible[s0:s1, None]
        scores = scores.masked_fill(hidden, float("-inf"))
        picked = scores.sort(dim=-1, descending=True, stable=True).indices[..., :top]
        out[:, s0:s1] = torch.where(picked < visible[s0:s1, None], picked, -1)
    return out


def old_cached_attn(q, local_kv, local_idx, pool, pool_idx, attn_sink, softmax_scale, rope_dim,
                    max_chunk_bytes=1 << 28):
    """Attention before: the whole pool joined to the window rows, then the reference sparse attention
    (which converts all rows to float)."""
    b = q.shape[0]
    index = local_idx.expand(b, q.shape[1], -1)
    rows = local_kv
    if pool is not None and pool_idx is not None:
        rows = torch.cat([local_kv, pool.to(local_kv.dtype)], dim=1)
        index = torch.cat([index, torch.where(pool_idx >= 0, pool_idx + local_kv.shape[1], -1)], dim=-1)
    return ref.sparse_attn(q, rows, attn_sink, index, softmax_scale)


def use_path(path: str) -> None:
    kernels.select("cpu")
    if path == "old":
        kernels.use("indexer_topk", old_indexer_topk)
        kernels.use("cached_attn", old_cached_attn)


def new_cache(model, path: str, max_len: int) -> ModelCache:
    layout = model.cache_layout if path == "new" else CacheLayout()
    return ModelCache.allocate(model.args, 1, max_len, model.numerics.act_dtype, layout=layout)


def decode_ms(model, path: str, depth: int, steps: int) -> float:
    cache = new_cache(model, path, depth + steps + 1)
    cache.fill_synthetic(depth)
    ids = torch.randint(0, model.args.vocab_size, (1, steps + 1), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        times = call_seconds(lambda i: model(ids[:, i:i + 1], cache), steps + 1, warmup=0)
    return statistics.median(times[1:]) * 1e3  # the first step warms the caches


def prefill_tok_s(model, path: str, depth: int, tokens: int, reps: int) -> float:
    cache = new_cache(model, path, depth + tokens + 1)
    cache.fill_synthetic(depth)
    start = cache.snapshot()
    ids = torch.randint(0, model.args.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        seconds = median_seconds(lambda _: model(ids, cache), reps, warmup=0, setup=lambda: cache.restore(start))
    return tokens / seconds


def resident_bytes() -> int:
    """The process's resident set size now (Linux: /proc/self/statm), not its peak."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def counts(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", default="1024,16384,65536,262144,1048576")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--prefill-depths", default="0,8192,32768")
    parser.add_argument("--prefill-tokens", type=int, default=256)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--paths", default="new,old")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    opts = parser.parse_args(argv)
    torch.set_num_threads(opts.threads)
    cpu.set_threads(opts.threads)
    torch.manual_seed(0)

    model, checkpoint = load_model(synthetic_checkpoint("flash-slice", None, opts.experts), with_mtp=False)
    args = model.args
    assert [args.layer_ratio(i) for i in range(args.n_layers)] == [0, CSA, 128, CSA]
    paths = opts.paths.split(",")
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
          f"load {load_average():.2f}, threads {opts.threads}, native isa {cpu.load().isa}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    results: dict = {"decode_ms": {p: {} for p in paths}, "prefill_tok_s": {p: {} for p in paths},
                     "load_average": load_average(), "threads": opts.threads}
    # Decode: the paths alternate at every depth, in `--rounds` rounds, so that the machine's noise hits
    # both alike; each number is the median over rounds of the per-round median step time.
    samples: dict = {p: {d: [] for d in counts(opts.depths)} for p in paths}
    for _ in range(opts.rounds):
        for depth in counts(opts.depths):
            for path in paths:
                use_path(path)
                samples[path][depth].append(decode_ms(model, path, depth, opts.steps))
                print(f"{path} tg @ {depth:>8}: {samples[path][depth][-1]:8.1f} ms/token", flush=True)
    for path in paths:
        for depth, values in samples[path].items():
            results["decode_ms"][path][depth] = statistics.median(values)
    for path in paths:
        use_path(path)
        for depth in counts(opts.prefill_depths):
            tps = prefill_tok_s(model, path, depth, opts.prefill_tokens, opts.reps)
            results["prefill_tok_s"][path][depth] = tps
            print(f"{path} pp{opts.prefill_tokens} @ {depth:>8}: {tps:8.1f} tok/s", flush=True)
    kernels.select("cpu")

    # KV bytes per token: allocated tensors against the compact formats, and resident memory at the deepest fill
    deepest = max(counts(opts.depths))
    per_token = {}
    for path in paths:
        small = new_cache(model, path, 0).nbytes
        big = ModelCache.allocate(args, 1, 1 << 20, model.numerics.act_dtype, device="meta",
                                  layout=model.cache_layout if path == "new" else CacheLayout()).nbytes
        per_token[path] = (big - small) / (1 << 20)
    gc.collect()
    rss_before = resident_bytes()
    cache = new_cache(model, "new", deepest + 1)
    cache.fill_synthetic(deepest)
    rss_after = resident_bytes()
    results["kv_bytes_per_token"] = per_token
    results["kv_bytes_per_token_compact_formula"] = ModelCache.bytes_per_token(args, 2, model.cache_layout)
    results["cache_bytes_at_deepest"] = cache.nbytes
    results["rss_growth_at_deepest"] = rss_after - rss_before
    print(f"KV bytes/token of context: {per_token} (compact formula "
          f"{results['kv_bytes_per_token_compact_formula']:.2f}); cache at {deepest}: {cache.nbytes / 1e6:.1f} MB, "
          f"resident memory grew {results['rss_growth_at_deepest'] / 1e6:.1f} MB allocating and filling it")
    for path in paths:
        tg = results["decode_ms"][path]
        base = tg.get(1024) or next(iter(tg.values()))
        print(f"{path}: " + ", ".join(f"tg@{d} {v / base:.2f}x" for d, v in tg.items()))
        pp = results["prefill_tok_s"][path]
        if 0 in pp:
            print(f"{path}: " + ", ".join(f"pp@{d} {v / pp[0]:.2f} of depth 0" for d, v in pp.items()))
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(results, f, indent=1)
    checkpoint.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
