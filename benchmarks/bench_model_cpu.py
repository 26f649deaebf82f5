"""Model-level CPU benchmark: a real-shaped DeepSeek-V4-Flash slice, decode and prefill tok/s with
our reference kernels, our native kernels and transformers' DeepseekV4ForCausalLM, in one run.

    python benchmarks/bench_model_cpu.py [--layers 3] [--experts 32] [--threads 1] [--json out.json]

The slice has the Flash dimensions (dim 4096, 64 heads x 512, q_lora 1024, wo_a [8192, 4096],
wo_b [4096, 8192], shared expert 2048, routed experts 2048) but fewer layers and routed experts
(default 3 layers = one sliding-window, one CSA and one HCA layer; 32 experts). It is written once
(random weights, official formats: FP8 dense + FP4 experts) into `$XDG_CACHE_HOME/dsv4/bench`, the
same place as `dsv4 bench --synth flash-slice`, and exported once in bf16 for transformers (its
dequantized format: transformers runs every weight as a dense bf16 matrix).

Per-layer times come from forward hooks on each block; the full-Flash estimate is
``sum over the 43 layers of the measured time of that layer's kind (2 sliding, 21 CSA, 20 HCA)
+ what is outside the blocks (embedding, hc_head, norm, output head)``. Decode reads 6 routed
experts per layer whatever the expert count, so the decode estimate carries over; a 128-token
prefill of the real model touches ~240 of 256 experts per layer instead of all 32 here, so the
prefill estimate is optimistic by the extra expert-weight streaming (reported separately).

Roofline: bytes one decoded token reads in the full Flash (`dsv4cli.bench.run.decoded_token_bytes`:
dense FP8/bf16/fp32 trunk weights + one embedding row + 6 experts x 43 layers; `describe.summarize`
gives the routed part) divided by the memory bandwidth measured in the same run (STREAM-like copy
and read, as in bench_fp4_cpu.py). Also measured: the FP8 GEMV kernel alone on the largest Flash
matrices (wq_b, wo_b, grouped wo_a) against the same bandwidth.

Threads default to 1: the development box is a busy shared 2-core VM where a second thread is
often preempted and makes timings erratic; pass --threads N on a quiet machine.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from dsv4cli import kernels
from dsv4cli.bench.run import decoded_token_bytes, short_kernels, synthetic_args, synthetic_checkpoint
from dsv4cli.io.describe import summarize
from dsv4cli.kernels import cpu
from dsv4cli.model.args import CSA, HCA, SWA
from dsv4cli.model.presets import PRESETS

from timing import call_seconds, load_average

KIND = {SWA: "SWA", CSA: "CSA", HCA: "HCA"}
FLASH = PRESETS["flash"]


# ======================================================================= timing


def time_calls(fn: Callable[[int], object], calls: int) -> tuple[float, float]:
    """(best, median) seconds over `calls` calls of fn(i) after one warm-up call.

    Both are reported: the best is what the code does when nothing else competes for the cores
    and memory (this box is shared), the median includes that interference.
    """
    samples = call_seconds(fn, calls)
    return min(samples), statistics.median(samples)


def memory_bandwidth(mib: int, calls: int) -> dict[str, float]:
    """STREAM-like copy (2 arrays counted) and read-only dot product (2 arrays), GB/s: best and median."""
    n = mib * (1 << 20) // 4
    a, b, c = torch.rand(n), torch.rand(n), torch.empty(n)
    out = {}
    for name, fn in (("copy", lambda i: c.copy_(a)), ("read", lambda i: torch.dot(a, b))):
        best, med = time_calls(fn, calls)
        out[name], out[name + "_median"] = 2 * n * 4 / best / 1e9, 2 * n * 4 / med / 1e9
    return out



class Hooks:
    """Wall time spent inside given modules (forward pre/post hooks), accumulated per name."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.seconds: dict[str, float] = defaultdict(float)
        self._start: dict[str, float] = {}
        self._handles = []
        for name, module in modules.items():
            self._handles.append(module.register_forward_pre_hook(self._pre(name)))
            self._handles.append(module.register_forward_hook(self._post(name)))

    def _pre(self, name: str) -> Callable:
        def hook(module, args):
            self._start[name] = time.perf_counter()
        return hook

    def _post(self, name: str) -> Callable:
        def hook(module, args, output):
            self.seconds[name] += time.perf_counter() - self._start.pop(name)
        return hook

    def take(self) -> dict[str, float]:
        out = dict(self.seconds)
        self.seconds.clear()
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def layer_kinds(args) -> list[str]:
    return [KIND[r] for r in args.compress_ratios[: args.n_layers]]


def run_arm(prefill: Callable[[torch.Tensor], object], decode: Callable[[torch.Tensor], object],
            reset: Callable[[], None], hooks: Hooks, kinds: list[str], ids: torch.Tensor, decode_ids: torch.Tensor,
            repeats: int, decode_steps: int) -> dict:
    """Warm-up, then `repeats` x (fresh cache, timed prefill of `ids`, `decode_steps` timed one-token steps).

    Returns median wall times and median per-layer-kind / outside-the-blocks times (seconds).
    """
    reset()
    prefill(ids)
    decode(decode_ids[:, :1])
    hooks.take()
    pre, dec = [], []
    for _ in range(repeats):
        reset()
        t0 = time.perf_counter()
        prefill(ids)
        pre.append((time.perf_counter() - t0, hooks.take()))
        for s in range(decode_steps):
            t0 = time.perf_counter()
            decode(decode_ids[:, s:s + 1])
            dec.append((time.perf_counter() - t0, hooks.take()))
    return {"prefill": summarize_runs(pre, kinds), "decode": summarize_runs(dec, kinds)}


def summarize_runs(runs: list[tuple[float, dict[str, float]]], kinds: list[str]) -> dict:
    """Median total, per layer kind (mean over the layers of that kind), the output head and the rest."""
    total = statistics.median(t for t, _ in runs)
    per_kind: dict[str, float] = {}
    for kind in dict.fromkeys(kinds):
        idx = [i for i, k in enumerate(kinds) if k == kind]
        per_kind[kind] = statistics.median(statistics.fmean(h.get(f"layer{i}", 0.0) for i in idx) for _, h in runs)
    layers = statistics.median(sum(h.get(f"layer{i}", 0.0) for i in range(len(kinds))) for _, h in runs)
    return {"total_s": total, "per_kind_s": per_kind, "outside_layers_s": max(0.0, total - layers),
            "head_s": statistics.median(h.get("head", 0.0) for _, h in runs), "samples_s": [t for t, _ in runs]}


def flash_estimate(part: dict, outside_s: float | None = None) -> float:
    """Seconds for the full Flash: each of its 43 layers at the measured time of its kind, + the rest
    (embedding, hc_head, norm, output head: the same in the slice and the full model)."""
    counts: dict[str, int] = defaultdict(int)
    for r in FLASH.compress_ratios[: FLASH.n_layers]:
        counts[KIND[r]] += 1
    per_kind = part["per_kind_s"]
    fallback = statistics.fmean(per_kind.values())
    rest = part["outside_layers_s"] if outside_s is None else outside_s
    return sum(n * per_kind.get(kind, fallback) for kind, n in counts.items()) + rest


# ======================================================================= the three arms


def bench_ours(path: Path, mode: str, ids: torch.Tensor, decode_ids: torch.Tensor, repeats: int,
               decode_steps: int) -> dict:
    """Our model with the reference ops (`kernels.reset()`) or the native CPU kernels (`select("cpu")`)."""
    from dsv4cli.runtime.loader import load_model

    if mode == "ref":
        kernels.reset()
    else:
        kernels.select("cpu")
    model, checkpoint = load_model(path, with_mtp=False)
    try:
        kinds = layer_kinds(model.args)
        hooks = Hooks({**{f"layer{i}": layer for i, layer in enumerate(model.layers)}, "head": model.head})
        state = {}

        def reset():
            state["cache"] = model.new_cache(1, ids.shape[1] + decode_steps + 8)

        with torch.inference_mode():
            out = run_arm(lambda t: model(t, state["cache"]), lambda t: model(t, state["cache"]), reset, hooks,
                          kinds, ids, decode_ids, repeats, decode_steps)
            hooks.remove()
        out["kernels"] = short_kernels(kernels.active())
        return out
    finally:
        kernels.reset()
        checkpoint.close()


def export_for_transformers(path: Path) -> Path:
    """bf16 transformers checkpoint of the slice, written once next to it."""
    from dsv4cli.io.checkpoint import INDEX_NAME
    from dsv4cli.io.dsv4_layout import open_checkpoint
    from dsv4cli.io.hf_export import write_transformers_checkpoint

    out = path.with_name(path.name + "-hf-bf16")
    if (out / INDEX_NAME).is_file():
        return out
    checkpoint = open_checkpoint(path)
    try:
        write_transformers_checkpoint(checkpoint.args, checkpoint.get, out, dtype=torch.bfloat16, overwrite=True)
    finally:
        checkpoint.close()
    return out


def bench_transformers(path: Path, args_slice, ids: torch.Tensor, decode_ids: torch.Tensor, repeats: int,
                       decode_steps: int) -> dict:
    """transformers' DeepseekV4ForCausalLM on the same weights (bf16 export, eager attention, its
    default experts implementation), prefill with `logits_to_keep=1` like ours, DynamicCache decode."""
    import transformers
    from transformers import DeepseekV4ForCausalLM
    from transformers.cache_utils import DynamicCache

    transformers.logging.set_verbosity_error()
    export = export_for_transformers(path)
    model = DeepseekV4ForCausalLM.from_pretrained(export, dtype=torch.bfloat16, attn_implementation="eager").eval()
    kinds = layer_kinds(args_slice)
    hooks = Hooks({**{f"layer{i}": layer for i, layer in enumerate(model.model.layers)}, "head": model.lm_head})
    state = {}

    def reset():
        state["cache"] = DynamicCache(config=model.config)

    def step(t):
        return model(t, cache=state["cache"], use_cache=True, logits_to_keep=1).logits

    with torch.inference_mode():
        out = run_arm(step, step, reset, hooks, kinds, ids, decode_ids, repeats, decode_steps)
    hooks.remove()
    out["version"] = transformers.__version__
    out["experts_implementation"] = str(getattr(model.config, "_experts_implementation", None))
    return out


# ======================================================================= FP8 GEMV alone


def gemv_case(lib: cpu.NativeKernels, name: str, o: int, k: int, groups: int, pool_bytes: int, calls: int,
              bw: dict[str, float], g: torch.Generator) -> list[dict]:
    """One matrix: FP8 kernel at N=1 (weights rotated through copies so they come from DRAM) and N=128,
    against torch's bf16 F.linear / grouped einsum on the same shape (what transformers runs)."""
    copies = max(2, -(-pool_bytes // (o * k)))
    codes = [torch.randint(0, 256, (o, k), dtype=torch.uint8, generator=g) for _ in range(copies)]
    for c in codes:
        c[(c & 0x7F) == 0x7F] = 0x7E  # no NaN codes
    ws = [c.view(torch.float8_e4m3fn) for c in codes]
    s = torch.randint(118, 124, (-(-o // 128), -(-k // 128)), dtype=torch.uint8, generator=g)
    wb = torch.randn(o, k, generator=g).bfloat16()
    nbytes = o * k + s.numel()
    aq = groups == 1  # wo_a has no activation quant
    rows = []
    for n in (1, 128):
        x = torch.randn(n, groups, k, generator=g).bfloat16().float()  # bf16 activations, as in the model
        xb = x.bfloat16()
        n_calls = calls if n == 1 else 3
        best, med = time_calls(lambda i, x=x: lib.fp8_linear(x, ws[i % copies], s, aq, cpu.threads()), n_calls)
        if groups == 1:
            tb, _ = time_calls(lambda i, xb=xb: torch.nn.functional.linear(xb[:, 0], wb), n_calls)
        else:
            wg = wb.view(groups, o // groups, k)
            tb, _ = time_calls(lambda i, xb=xb, wg=wg: torch.einsum("ngd,grd->ngr", xb, wg), n_calls)
        rows.append({"matrix": name, "shape": [o, k], "groups": groups, "tokens": n, "ms": 1e3 * best,
                     "ms_median": 1e3 * med, "gb_s": nbytes / best / 1e9, "gb_s_median": nbytes / med / 1e9,
                     "pct_copy": 100 * nbytes / best / 1e9 / bw["copy"],
                     "pct_copy_median": 100 * nbytes / med / 1e9 / bw["copy_median"],
                     "gflop_s": 2 * o * k * n / best / 1e9, "torch_bf16_ms": 1e3 * tb,
                     "torch_bf16_gflop_s": 2 * o * k * n / tb / 1e9})
    return rows


def bench_gemv(bw: dict[str, float], pool_bytes: int, calls: int) -> list[dict]:
    """FP8 kernel on Flash's largest dense matrices: wq_b, wo_b and the grouped wo_a."""
    lib = cpu.load()
    g = torch.Generator().manual_seed(0)
    rows = []
    for name, o, k, groups in (("wq_b", 32768, 1024, 1), ("wo_b", 4096, 8192, 1), ("wo_a", 8192, 4096, 8)):
        rows += gemv_case(lib, name, o, k, groups, pool_bytes, calls, bw, g)
        gc.collect()
    return rows


# ======================================================================= report


def fmt_rate(tokens: int, seconds: float) -> str:
    return f"{tokens / seconds:.3g}" if seconds > 0 else "-"


def report(res: dict) -> str:
    bw, tb = res["bandwidth_gbps"], res["bytes_per_token"]
    roof = tb["total"] / 1e9 / bw["copy"]
    lines = [
        f"- machine: {res['cpu']} · {res['threads']} thread(s) · load average at start {res['loadavg']:.2f} · "
        f"torch {torch.__version__} · FP8/bf16 kernels {res['fp8_isa']}, FP4 kernels {res['fp4_isa']}",
        f"- slice: flash-slice, {res['slice']['layers']} layers ({', '.join(res['slice']['kinds'])}), "
        f"{res['slice']['experts']} routed experts; prefill {res['prompt']} tokens, {res['decode_steps']} decode "
        f"steps per run, {res['repeats']} runs + 1 warm-up per arm; medians",
        f"- memory bandwidth (this run, {res['stream_mib']} MiB arrays): copy {bw['copy']:.1f} GB/s best, "
        f"{bw['copy_median']:.1f} median; read {bw['read']:.1f} best, {bw['read_median']:.1f} median",
        f"- full Flash bytes per decoded token: {tb['total'] / 1e9:.2f} GB = dense {tb['dense'] / 1e9:.2f} GB "
        f"+ 6 experts x {tb['expert'] / 1e6:.1f} MB x 43 layers = {tb['routed'] / 1e9:.2f} GB; "
        f"roofline at copy bandwidth {roof:.3f} s/token = {1 / roof:.2f} tok/s",
        "",
    ]
    kinds = list(dict.fromkeys(res["slice"]["kinds"]))
    head = ["arm", "decode ms/layer " + "/".join(kinds), "decode head + rest ms", "Flash decode s/token",
            "Flash decode tok/s", "of roofline", "prefill ms/layer " + "/".join(kinds), "prefill head + rest ms",
            "Flash prefill tok/s", "slice decode tok/s", "slice prefill tok/s"]
    lines += ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for arm, r in res["arms"].items():
        if "error" in r:
            lines.append(f"| {arm} | {r['error']} |" + " - |" * (len(head) - 2))
            continue
        d, p = r["decode"], r["prefill"]
        dk = "/".join(f"{1e3 * d['per_kind_s'][k]:.1f}" for k in kinds)
        pk = "/".join(f"{1e3 * p['per_kind_s'][k]:.0f}" for k in kinds)
        fd, fp = r["flash_decode_s"], r["flash_prefill_s"]
        lines.append(f"| {arm} | {dk} | {1e3 * d['outside_layers_s']:.0f} | {fd:.3f} | {1 / fd:.3g} | "
                     f"{100 * roof / fd:.0f}% | {pk} | {1e3 * p['outside_layers_s']:.0f} | "
                     f"{fmt_rate(res['prompt'], fp)} | {fmt_rate(1, d['total_s'])} | "
                     f"{fmt_rate(res['prompt'], p['total_s'])} |")
    lines += ["", "Flash = 2 sliding + 21 CSA + 20 HCA layers at the measured per-kind times + the measured head and "
              "rest (embedding, hc_head, norm, output head); 'of roofline' = roofline s/token / Flash s/token. "
              "Prefill: the slice reads all its experts; the real model would read ~240 of 256 per layer."]
    if res.get("gemv"):
        lines += ["", "| FP8 kernel | weight | groups | tokens | ms best / median | GB/s best / median | "
                  "% of copy (best/best, median/median) | GFLOP/s | torch bf16 ms | torch bf16 GFLOP/s |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for g in res["gemv"]:
            lines.append(f"| {g['matrix']} | {g['shape'][0]}x{g['shape'][1]} | {g['groups']} | {g['tokens']} | "
                         f"{g['ms']:.2f} / {g['ms_median']:.2f} | {g['gb_s']:.1f} / {g['gb_s_median']:.1f} | "
                         f"{g['pct_copy']:.0f}% / {g['pct_copy_median']:.0f}% | {g['gflop_s']:.0f} | "
                         f"{g['torch_bf16_ms']:.2f} | {g['torch_bf16_gflop_s']:.0f} |")
    return "\n".join(lines)


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=3, help="slice layers (default 3: sliding, CSA, HCA)")
    p.add_argument("--experts", type=int, default=32, help="routed experts in the slice (default 32)")
    p.add_argument("--prompt", type=int, default=128, help="prefill length (default 128)")
    p.add_argument("--decode", type=int, default=4, help="timed decode steps per run (default 4)")
    p.add_argument("--repeats", type=int, default=2, help="runs per arm (default 2)")
    p.add_argument("--threads", type=int, default=1, help="threads for torch and the native kernels (default 1: "
                   "the shared development box is busy; use more on a quiet machine)")
    p.add_argument("--arms", default="ref,native,transformers", help="comma list of ref, native, transformers")
    p.add_argument("--no-gemv", action="store_true", help="skip the FP8 kernel measurements")
    p.add_argument("--gemv-calls", type=int, default=48, help="timed calls per FP8 kernel case at N=1")
    p.add_argument("--stream-mib", type=int, default=256, help="array size of the bandwidth test")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    cpu.set_threads(args.threads)
    lib = cpu.load()
    load = load_average()
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if unknown := [a for a in arms if a not in ("ref", "native", "transformers")]:
        raise SystemExit(f"unknown arm(s) {unknown}")

    print("writing / finding the slice checkpoint ...", file=sys.stderr)
    slice_args = synthetic_args("flash-slice", args.layers, args.experts)
    path = synthetic_checkpoint("flash-slice", args.layers, args.experts, args.seed)
    if "transformers" in arms:
        with contextlib.suppress(ImportError):
            import transformers  # noqa: F401

            print("exporting / finding the transformers copy ...", file=sys.stderr)
            export_for_transformers(path)

    print("measuring memory bandwidth ...", file=sys.stderr)
    bw = memory_bandwidth(args.stream_mib, 10)
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, slice_args.vocab_size, (1, args.prompt), generator=gen)
    decode_ids = torch.randint(0, slice_args.vocab_size, (1, args.decode + 1), generator=gen)

    token_bytes = decoded_token_bytes(FLASH)
    summary = summarize(FLASH)
    res = {"cpu": cpu_name(), "threads": args.threads, "loadavg": load, "fp8_isa": lib.fp8_isa, "fp4_isa": lib.isa,
           "slice": {"layers": args.layers, "experts": args.experts, "kinds": layer_kinds(slice_args),
                     "path": str(path)},
           "prompt": args.prompt, "decode_steps": args.decode, "repeats": args.repeats, "stream_mib": args.stream_mib,
           "bandwidth_gbps": bw, "bytes_per_token": token_bytes.to_dict(),
           "flash_summary": {"bytes_total": summary.bytes_total,
                             "routed_expert_bytes_per_token": summary.routed_expert_bytes_per_token},
           "arms": {}}

    for arm in arms:
        print(f"arm {arm} ...", file=sys.stderr)
        t0 = time.perf_counter()
        try:
            if arm == "transformers":
                r = bench_transformers(path, slice_args, ids, decode_ids, args.repeats, args.decode)
            else:
                r = bench_ours(path, arm, ids, decode_ids, args.repeats, args.decode)
        except ImportError as exc:
            r = {"error": f"not available ({exc})"}
        if "error" not in r:
            r["flash_decode_s"] = flash_estimate(r["decode"])
            r["flash_prefill_s"] = flash_estimate(r["prefill"])
        r["wall_s"] = time.perf_counter() - t0
        res["arms"][arm] = r
        gc.collect()

    if not args.no_gemv:
        print("FP8 kernels ...", file=sys.stderr)
        res["gemv"] = bench_gemv(bw, 512 << 20, args.gemv_calls)
    res["bandwidth_gbps_end"] = memory_bandwidth(args.stream_mib, 10)

    print(report(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
