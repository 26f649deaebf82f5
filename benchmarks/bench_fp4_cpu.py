"""Benchmark the native FP4 expert kernels against the machine's memory bandwidth.

Decode of V4-Flash streams ~3.45 GB of FP4 expert weights per token, so the figure of merit
is the bandwidth the routed-expert call achieves (bytes of packed weights + scales it reads
per second) relative to what the memory system delivers (a STREAM-like copy/triad/read).

    python benchmarks/bench_fp4_cpu.py [--experts 64] [--json out.json]

Flash shapes: dim 4096, moe_inter_dim 2048, 6 experts per token; weights are random FP4
bytes (any byte is a valid pair of e2m1 codes) so 64 experts (~0.8 GB) build in seconds and
the working set far exceeds the CPU caches.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from dsv4cli.kernels import cpu

from timing import best_seconds, load_average


def stream_bandwidth(mib: int, repeats: int) -> dict[str, float]:
    """STREAM-style copy (2 arrays counted), triad (3) and a read-only dot product (2), GB/s of the best run.

    Copy and triad also write (and the CPU reads each written line first), so the read-only
    figure is the closer ceiling for a weight-streaming kernel; all three are reported.
    """
    n = mib * (1 << 20) // 4
    a = torch.rand(n)
    b = torch.rand(n)
    c = torch.empty(n)
    res = {
        "copy": 2 * n * 4 / best_seconds(lambda _: c.copy_(a), repeats),
        "triad": 3 * n * 4 / best_seconds(lambda _: torch.add(a, b, alpha=3.0, out=c), repeats),
        "read": 2 * n * 4 / best_seconds(lambda _: torch.dot(a, b), repeats),
    }
    return {k: v / 1e9 for k, v in res.items()}


def random_experts(n: int, dim: int, inter: int, seed: int) -> cpu.ExpertTable:
    """n FP4 experts with random codes and scales 2^-7..2^-4 (same format as the checkpoint)."""
    g = torch.Generator().manual_seed(seed)

    def fp4(rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.randint(-128, 128, (rows, cols // 2), dtype=torch.int8, generator=g)
        s = torch.randint(120, 124, (rows, cols // 32), dtype=torch.uint8, generator=g)
        return w, s.view(torch.float8_e8m0fnu)

    experts = []
    for _ in range(n):
        w1, s1 = fp4(inter, dim)
        w2, s2 = fp4(dim, inter)
        w3, s3 = fp4(inter, dim)
        experts.append((w1, s1, w2, s2, w3, s3))
    return cpu.ExpertTable.from_experts(experts)


def expert_bytes(table: cpu.ExpertTable) -> int:
    w1, s1, w2, s2, w3, s3 = table.experts[0]
    return sum(t.numel() * t.element_size() for t in (w1, s1, w2, s2, w3, s3))


def bench_moe(fn, table: cpu.ExpertTable, n_tokens: int, topk: int, iters: int, act_quant: bool,
              dtype: torch.dtype, seed: int) -> dict[str, float]:
    """Time `iters` calls, each with a fresh random routing; bytes = the distinct experts it reads.

    Reports the median call and the best call (the best is what the kernel does when nothing
    else competes for the cores and memory; the median includes such interference).
    """
    g = torch.Generator().manual_seed(seed)
    e = table.num_experts
    calls = []
    for _ in range(iters + 1):
        idx = torch.stack([torch.randperm(e, generator=g)[:topk] for _ in range(n_tokens)])
        w = torch.rand(n_tokens, topk, generator=g)
        x = torch.randn(n_tokens, table.dim, generator=g).to(dtype)
        calls.append((x, w, idx))
    fn(*calls[0], table, 10.0, act_quant)  # warm-up (and the first-use build)
    samples = []
    for x, w, idx in calls[1:]:
        t0 = time.perf_counter()
        fn(x, w, idx, table, 10.0, act_quant)
        dt = time.perf_counter() - t0
        samples.append((dt, idx.unique().numel() * expert_bytes(table)))
    rates = sorted(b / t / 1e9 for t, b in samples)
    return {"ms": 1e3 * statistics.median(t for t, _ in samples), "gbps": statistics.median(rates),
            "gbps_best": rates[-1], "experts_per_call": statistics.mean(b for _, b in samples) / expert_bytes(table)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", type=int, default=64, help="distinct experts in the table (default 64)")
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--inter", type=int, default=2048)
    p.add_argument("--topk", type=int, default=6)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--iters", type=int, default=40, help="timed calls per case (native)")
    p.add_argument("--ref-iters", type=int, default=2, help="timed calls per case (reference)")
    p.add_argument("--ref-tokens", type=int, nargs="*", default=[1, 8], help="token counts for the reference")
    p.add_argument("--stream-mib", type=int, default=512, help="array size for the bandwidth test")
    p.add_argument("--threads", type=int, default=None, help="threads (default torch.get_num_threads())")
    p.add_argument("--no-act-quant", action="store_true", help="plain fp32 activations instead of FP8 act-quant")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    lib = cpu.load()
    act_quant = not args.no_act_quant
    dtype = torch.float32
    load = load_average()
    bw = stream_bandwidth(args.stream_mib, repeats=10)
    table = random_experts(args.experts, args.dim, args.inter, seed=0)
    rows = []
    for n in args.tokens:
        r = bench_moe(cpu.moe_experts, table, n, args.topk, args.iters, act_quant, dtype, seed=n)
        rows.append({"path": f"native ({lib.isa})", "tokens": n, **r})
    for n in args.ref_tokens:
        r = bench_moe(cpu.moe_experts_ref, table, n, args.topk, args.ref_iters, act_quant, dtype, seed=n)
        rows.append({"path": "reference", "tokens": n, **r})

    print(f"threads {cpu.threads()}, {args.experts} experts x {expert_bytes(table) / 2**20:.2f} MiB "
          f"(dim {args.dim}, inter {args.inter}), top-{args.topk}, act_quant {act_quant}, "
          f"load average at start {load:.2f}\n")
    print("| memory test (best of 10) | GB/s |\n|---|---:|")
    for k, v in bw.items():
        print(f"| {k} | {v:.1f} |")
    print("\n| path | tokens | experts read/call | ms/call (median) | GB/s (median) | % of copy | % of read "
          "| GB/s (best call) | % of copy |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    copy, read = bw["copy"], bw["read"]
    for r in rows:
        print(f"| {r['path']} | {r['tokens']} | {r['experts_per_call']:.1f} | {r['ms']:.2f} | {r['gbps']:.1f} "
              f"| {100 * r['gbps'] / copy:.0f}% | {100 * r['gbps'] / read:.0f}% | {r['gbps_best']:.1f} "
              f"| {100 * r['gbps_best'] / copy:.0f}% |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": cpu.threads(), "loadavg": load, "isa": lib.isa, "bandwidth_gbps": bw, "moe": rows,
                       "act_quant": act_quant, "experts": args.experts, "dim": args.dim, "inter": args.inter},
                      f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
