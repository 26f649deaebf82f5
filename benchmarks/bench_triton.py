"""GPU benchmark of the Triton kernels (spec §2.3, §2.8, §2.11, §6.1).

Reports, in one run on one GPU:
* HBM bandwidth measured by a device-to-device copy (read + write bytes / time): the yardstick;
* FP4 grouped expert GEMM at decode shapes (few tokens x top-k experts): achieved GB/s of weight
  traffic, as a fraction of the copy bandwidth (decode is weight-bandwidth bound);
* FP4 grouped GEMM and FP8 block-scaled GEMM at prefill shapes: TFLOP/s (2 * rows * out * in),
  next to a plain bf16 `torch.matmul` of the same shape;
* sparse attention at decode: GB/s of gathered KV rows.

Run: `python benchmarks/bench_triton.py [--model flash|pro] [--quick] [--json out.json]`.
Exits with a message when no CUDA GPU (or no triton) is present.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

import torch

SHAPES = {  # dim, moe_inter_dim, routed experts, top-k, heads, head_dim, q_lora_rank, o_groups (spec §1.1, §1.2)
    "flash": dict(dim=4096, inter=2048, experts=256, top_k=6, heads=64, head_dim=512, q_lora=1024, o_groups=8),
    "pro": dict(dim=7168, inter=3072, experts=384, top_k=6, heads=128, head_dim=512, q_lora=1536, o_groups=16),
}


@dataclass
class Row:
    name: str
    shape: str
    ms: float
    gbps: float | None = None
    tflops: float | None = None
    note: str = ""


def bench_ms(quick: bool, fn, *args, **kwargs) -> float:
    """Median milliseconds of fn(*args, **kwargs) (triton.testing.do_bench: L2 flushed between runs)."""
    import triton.testing

    return triton.testing.do_bench(lambda: fn(*args, **kwargs), warmup=5 if quick else 25, rep=20 if quick else 100,
                                   return_mode="median")


def copy_bandwidth(quick: bool) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + written)."""
    n = (256 if quick else 1024) << 20
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = bench_ms(quick, dst.copy_, src)
    return 2 * n / ms / 1e6


def random_fp4_experts(n_experts: int, out_f: int, in_f: int):
    """Random FP4 expert weights (raw bytes; scales near 2**-6), stacked: decoding speed is value-independent."""
    from dsv4cli.kernels.triton_gemm import ExpertWeights

    w = torch.randint(-128, 128, (n_experts, out_f, in_f // 2), dtype=torch.int8, device="cuda")
    s = torch.randint(118, 124, (n_experts, out_f, in_f // 32), dtype=torch.uint8, device="cuda")
    return ExpertWeights.from_stacked(w, s.view(torch.float8_e8m0fnu))


def routing(tokens: int, n_experts: int, top_k: int) -> torch.Tensor:
    """Uniformly random distinct experts per token [tokens, top_k]."""
    return torch.rand(tokens, n_experts, device="cuda").topk(top_k, dim=-1).indices


def fp4_weight_bytes(w, n_used: int) -> int:
    return n_used * w.out_features * (w.in_features // 2 + w.in_features // 32)


def bench_fp4(cfg: dict, tokens_list: list[int], quick: bool, prefill: bool) -> list[Row]:
    from dsv4cli.kernels import triton_gemm as tg

    w1 = random_fp4_experts(cfg["experts"], cfg["inter"], cfg["dim"])
    w3 = random_fp4_experts(cfg["experts"], cfg["inter"], cfg["dim"])
    w2 = random_fp4_experts(cfg["experts"], cfg["dim"], cfg["inter"])
    rows = []
    for tokens in tokens_list:
        idx = routing(tokens, cfg["experts"], cfg["top_k"])
        weights = torch.rand(tokens, cfg["top_k"], device="cuda")
        x = torch.randn(tokens, cfg["dim"], device="cuda", dtype=torch.bfloat16)
        n_used = int(torch.unique(idx).numel())
        xr = x.repeat_interleave(cfg["top_k"], 0)
        ms = bench_ms(quick, tg.fp4_grouped_linear, xr, w1, None, idx.flatten(), act_quant=True)
        flops = 2 * xr.shape[0] * cfg["inter"] * cfg["dim"]
        shape = f"T={tokens} k={cfg['top_k']} [{cfg['inter']}x{cfg['dim']}] experts used={n_used}"
        rows.append(Row("fp4 grouped w1", shape, ms, fp4_weight_bytes(w1, n_used) / ms / 1e6, flops / ms / 1e9))
        ms = bench_ms(quick, tg.moe_experts_triton, x, weights, idx, w1, w2, w3, 10.0, True)
        total = sum(fp4_weight_bytes(w, n_used) for w in (w1, w2, w3))
        rows.append(Row("moe w1+w3+w2", shape, ms, total / ms / 1e6, 3 * flops / ms / 1e9))
        if prefill:
            a = torch.randn(xr.shape[0], cfg["dim"], device="cuda", dtype=torch.bfloat16)
            b = torch.randn(cfg["dim"], cfg["inter"], device="cuda", dtype=torch.bfloat16)
            ms = bench_ms(quick, torch.matmul, a, b)
            rows.append(Row("bf16 matmul (same rows)", f"[{a.shape[0]}x{cfg['dim']}]@[{cfg['dim']}x{cfg['inter']}]",
                            ms, None, flops / ms / 1e9, "dense, one weight"))
    return rows


def bench_fp8(cfg: dict, tokens_list: list[int], quick: bool) -> list[Row]:
    from dsv4cli.formats import official as formats
    from dsv4cli.kernels import triton_gemm as tg

    rows = []
    wq_a, wq_b = (cfg["q_lora"], cfg["dim"]), (cfg["heads"] * cfg["head_dim"], cfg["q_lora"])
    shapes = (wq_a, wq_b, (cfg["dim"], cfg["o_groups"] * 1024))  # + wo_b
    for out_f, in_f in shapes:
        w = (torch.randn(out_f, in_f, device="cuda") * 0.02).to(torch.float8_e4m3fn)
        s = formats.scale_to_ue8m0(torch.ones(-(-out_f // 128), -(-in_f // 128), device="cuda"))
        for tokens in tokens_list:
            x = torch.randn(tokens, in_f, device="cuda", dtype=torch.bfloat16)
            ms = bench_ms(quick, tg.fp8_linear, x, w, s, act_quant=True)
            flops = 2 * tokens * out_f * in_f
            rows.append(Row("fp8 linear", f"T={tokens} [{out_f}x{in_f}]", ms, w.numel() / ms / 1e6, flops / ms / 1e9))
    return rows


def bench_attn(cfg: dict, quick: bool) -> list[Row]:
    from dsv4cli.kernels import triton_attn

    rows = []
    k, n = 640, 128 + 4096
    for batch in (1, 8):
        q = torch.randn(batch, 1, cfg["heads"], cfg["head_dim"], device="cuda", dtype=torch.bfloat16)
        kv = torch.randn(batch, n, cfg["head_dim"], device="cuda", dtype=torch.bfloat16)
        sink = torch.randn(cfg["heads"], device="cuda")
        idx = torch.randint(0, n, (batch, 1, k), device="cuda")
        ms = bench_ms(quick, triton_attn.sparse_attn, q, kv, sink, idx, cfg["head_dim"] ** -0.5)
        gathered = batch * k * cfg["head_dim"] * 2
        rows.append(Row("sparse attn decode", f"B={batch} H={cfg['heads']} K={k}", ms, gathered / ms / 1e6))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(SHAPES), default="flash")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and shapes")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_triton: no CUDA GPU available - this benchmark only runs on a GPU "
                 "(CPU parity of the kernels: pytest tests/test_kernels_triton.py)")
    try:
        import triton  # noqa: F401
    except ImportError:
        sys.exit("bench_triton: triton is not installed (pip install 'dsv4cli[triton]')")

    torch.manual_seed(0)
    cfg = SHAPES[args.model]
    hbm = copy_bandwidth(args.quick)
    decode, prefill = ([1, 4], [1024]) if args.quick else ([1, 4, 16, 64], [1024, 4096])
    rows = bench_fp4(cfg, decode, args.quick, prefill=False) + bench_fp4(cfg, prefill, args.quick, prefill=True)
    rows += bench_fp8(cfg, decode[:2] + prefill, args.quick) + bench_attn(cfg, args.quick)

    print(f"{torch.cuda.get_device_name()} - {args.model} shapes - copy bandwidth {hbm:.0f} GB/s")
    print(f"{'kernel':26} {'shape':58} {'ms':>8} {'GB/s':>8} {'%copy':>6} {'TFLOP/s':>8}")
    for r in rows:
        gb = f"{r.gbps:8.0f} {100 * r.gbps / hbm:5.0f}%" if r.gbps is not None else f"{'':8} {'':6}"
        tf = f"{r.tflops:8.1f}" if r.tflops is not None else ""
        print(f"{r.name:26} {r.shape:58} {r.ms:8.3f} {gb} {tf} {r.note}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_gbps": hbm, "model": args.model,
                       "rows": [r.__dict__ for r in rows]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
