"""Prefill GEMMs on the CPU against the machine's bf16 matmul rate, side by side in one run.

Prefill is compute-bound: every weight is used by many tokens. The figure of merit is GFLOP/s
relative to what torch's bf16 matmul (oneDNN: AMX or AVX-512 BF16 where the CPU has them) reaches
on the same machine, in the same run, at the same shapes. Three arms per case, alternating in
every round, medians over rounds:

* `panel`: dsv4's native kernels as shipped (the panel GEMM from FP4_GEMM_MIN / FP8_GEMM_MIN tokens,
  on AMX from FP4_AMX_MIN / FP8_AMX_MIN);
* `no-AMX panel` (only on CPUs with AMX): the library built without the tile unit, so the panel
  GEMM runs on vdpbf16ps;
* `on-the-fly`: the same library built with the panel GEMM switched off (the decode-in-registers
  tiles for every batch: the path before the panel GEMM);
* `torch bf16`: `x @ w` on dense bf16 weights of the same shape (the roofline of this machine).

Cases: the FP8 dense linears of Flash (wq_b 32768x1024, wo_b 4096x8192, wq_a 1024x4096) and the
fused routed-expert call (dim 4096, moe_inter_dim 2048, 64 experts, top-6) with FP4, int3 and int2
experts; torch's arm for the MoE runs each expert's three projections as bf16 matmuls on its
tokens (the FLOPs of the call, the way a bf16 runtime would). Threads 1 and 2 by default.

    python benchmarks/bench_prefill_cpu.py [--tokens 128 512] [--threads 1 2] [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from functools import partial

import torch

from dsv4cli.kernels import cpu
from dsv4cli.kernels.experts import LOWBIT_BITS

from timing import load_average, median_seconds

#: library flags of the on-the-fly arm: thresholds no batch reaches
ON_THE_FLY_FLAGS = tuple(f"-D{name}_MIN=1073741824"
                         for name in ("FP4_GEMM", "FP8_GEMM", "FP4_AMX", "FP8_AMX", "LOWBIT_AMX"))
DENSE = {"wq_b": (32768, 1024), "wo_b": (4096, 8192), "wq_a": (1024, 4096)}  # (out, in)
FORMATS = ("fp4", "int3", "int2")
LOWBIT_BYTES = {f"int{bits}": nbytes for nbytes, bits in LOWBIT_BITS.items()}  # bytes per 32 inputs


def expert_weight(fmt: str, rows: int, cols: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random codes in the checkpoint's (FP4) or `dsv4 quantize`'s (int3 / int2) layout."""
    if fmt == "fp4":
        w = torch.randint(-128, 128, (rows, cols // 2), dtype=torch.int8, generator=g)
        return w, torch.randint(120, 124, (rows, cols // 32), dtype=torch.uint8, generator=g)
    w = torch.randint(0, 256, (rows, cols // 32 * LOWBIT_BYTES[fmt]), dtype=torch.uint8, generator=g)
    return w, (torch.rand(rows, cols // 32, generator=g) * 0.02 + 0.001).to(torch.bfloat16)


def expert_table(fmt: str, n: int, dim: int, inter: int, seed: int) -> cpu.ExpertTable:
    g = torch.Generator().manual_seed(seed)
    experts = []
    for _ in range(n):
        w1, s1 = expert_weight(fmt, inter, dim, g)
        w2, s2 = expert_weight(fmt, dim, inter, g)
        w3, s3 = expert_weight(fmt, inter, dim, g)
        experts.append((w1, s1, w2, s2, w3, s3))
    table = cpu.ExpertTable.from_experts(experts)
    assert table.native, fmt
    return table


def routing(n_tokens: int, n_experts: int, topk: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(n_experts, generator=g)[:topk] for _ in range(n_tokens)])
    return torch.rand(n_tokens, topk, generator=g), idx


def torch_moe(x: torch.Tensor, idx: torch.Tensor, dense: list[tuple[torch.Tensor, ...]]) -> None:
    """The MoE call's matmuls in bf16: per expert, its tokens through w1, w3 and w2."""
    for e in idx.unique().tolist():
        rows = (idx == e).any(-1).nonzero().squeeze(-1)
        xe = x[rows]
        w1, w3, w2 = dense[e % len(dense)]
        h = torch.nn.functional.silu(xe @ w1) * (xe @ w3)
        h @ w2


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[128, 512])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=3, help="rounds; the arms alternate in each (default 3)")
    p.add_argument("--calls", type=int, default=3, help="timed calls per arm and round (default 3)")
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--topk", type=int, default=6)
    p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    p.add_argument("--dense", nargs="*", default=list(DENSE), choices=list(DENSE))
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)

    dim, inter = 4096, 2048
    panel, on_the_fly = cpu.load(), cpu.load(extra_flags=ON_THE_FLY_FLAGS)
    libs = {"panel": panel, **({"no-AMX panel": cpu.load(extra_flags=cpu.NO_AMX_FLAGS)} if panel.amx == "amx" else {}),
            "on-the-fly": on_the_fly}
    load = load_average()
    print(f"{platform.processor() or platform.machine()}, kernels {panel.isa} (AMX: {panel.amx}), "
          f"torch {torch.__version__}, "
          f"load average at start {load:.2f}, {args.rounds} rounds x {args.calls} calls, medians", flush=True)
    g = torch.Generator().manual_seed(0)
    dense_fp8 = {}
    for name in args.dense:
        o, k = DENSE[name]
        w = (torch.randn(o, k, generator=g) * 0.05).to(torch.float8_e4m3fn)
        s = torch.randint(120, 124, (-(-o // 128), -(-k // 128)), dtype=torch.uint8, generator=g)
        dense_fp8[name] = (w, s, torch.randn(k, o, generator=g).to(torch.bfloat16))
    tables = {fmt: expert_table(fmt, args.experts, dim, inter, seed=1) for fmt in args.formats}
    bf16_experts = [(torch.randn(dim, inter).bfloat16(), torch.randn(dim, inter).bfloat16(),
                     torch.randn(inter, dim).bfloat16()) for _ in range(4)]

    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for n in args.tokens:
            x = torch.randn(n, max(dim, *(DENSE[d][1] for d in args.dense)) if args.dense else dim, generator=g)
            cases = []
            for name, (w, s, wb) in dense_fp8.items():
                k = w.shape[1]
                xk = x[:, :k].contiguous()
                x3 = xk.reshape(n, 1, k)
                cases.append((f"FP8 {name} {w.shape[0]}x{k}", 2.0 * n * k * w.shape[0], {
                    **{arm: partial(lib.fp8_linear, x3, w, s, True, threads) for arm, lib in libs.items()},
                    "torch bf16": partial(torch.matmul, xk.to(torch.bfloat16), wb)}))
            weights, idx = routing(n, args.experts, args.topk, seed=n)
            xm = x[:, :dim].contiguous()
            flops = 2.0 * n * args.topk * 3 * dim * inter
            for fmt, table in tables.items():
                call = (xm, weights, idx, table, 10.0, True, False, threads)
                cases.append((f"MoE {fmt} {args.experts}e top-{args.topk}", flops, {
                    **{arm: partial(lib.fp4_moe, *call) for arm, lib in libs.items()},
                    "torch bf16": partial(torch_moe, xm.to(torch.bfloat16), idx, bf16_experts)}))
            for label, flop, arms in cases:
                samples: dict[str, list[float]] = {a: [] for a in arms}
                for _ in range(args.rounds):
                    for arm, fn in arms.items():
                        samples[arm].append(median_seconds(lambda _, fn=fn: fn(), args.calls))
                med = {a: statistics.median(v) for a, v in samples.items()}
                row = {"case": label, "threads": threads, "tokens": n, "gflop": flop / 1e9,
                       **{f"{a} ms": 1e3 * t for a, t in med.items()},
                       **{f"{a} GFLOP/s": flop / t / 1e9 for a, t in med.items()}}
                row["panel / torch"] = med["torch bf16"] / med["panel"]
                row["panel / on-the-fly"] = med["on-the-fly"] / med["panel"]
                rows.append(row)
                print(f"  {label:28s} t={threads} n={n:4d}  "
                      + "  ".join(f"{a} {row[f'{a} GFLOP/s']:6.1f}" for a in arms) + " GFLOP/s", flush=True)

    arm_names = [*libs, "torch bf16"]
    print("\n| case | threads | tokens | panel ms | " + " | ".join(f"{a} GFLOP/s" for a in arm_names)
          + " | panel / torch | panel / on-the-fly |")
    print("|---|---:|---:|---:|" + "---:|" * (len(arm_names) + 2))
    for r in rows:
        print(f"| {r['case']} | {r['threads']} | {r['tokens']} | {r['panel ms']:.1f} | "
              + " | ".join(f"{r[f'{a} GFLOP/s']:.1f}" for a in arm_names)
              + f" | {r['panel / torch']:.2f} | {r['panel / on-the-fly']:.2f}x |")
    scaling = [(r["case"], r["tokens"], r["panel ms"]) for r in rows]
    by_key = {(c, n): {} for c, n, _ in scaling}
    for r in rows:
        by_key[(r["case"], r["tokens"])][r["threads"]] = r["panel ms"]
    if len(args.threads) > 1:
        lo, hi = min(args.threads), max(args.threads)
        print(f"\n| case | tokens | {hi} threads vs {lo} |\n|---|---:|---:|")
        for (c, n), ms in by_key.items():
            print(f"| {c} | {n} | {ms[lo] / ms[hi]:.2f}x |")
    print(f"\nload average at end {load_average():.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"load_start": load, "isa": panel.isa, "amx": panel.amx, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
