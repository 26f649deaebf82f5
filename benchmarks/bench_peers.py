"""dsv4 against llama.cpp and KTransformers' kt-kernel on the same weights, side by side in one run.

What it builds (once, under --work; each step is skipped when its result is there):
* llama.cpp from the vendored source of PyPI's llama-cpp-python 0.3.36 sdist (it has the `deepseek4`
  architecture): CPU only, only `llama-bench`. On CPUs with AMX it is built without the tile unit, which
  is its fastest configuration there (the AMX build aborts in graph reservation unless weight repacking is
  off, `--repack 0`; without AMX repacking works); elsewhere with -DGGML_NATIVE=ON. A converter venv runs
  its `convert_hf_to_gguf.py`, which reads the official-format checkpoint and keeps the FP4 experts as
  MXFP4 (the same bytes) and turns the FP8 linears into Q8_0.
* kt-kernel 0.7.2 from PyPI in its own venv (`--no-deps`, with the local CPU torch). Its `KTMoEWrapper`
  needs an accelerator, so `peers/kt_moe_driver.py` drives `kt_kernel_ext.moe.AMXFP4_KGroup_MOE` directly.
* A synthetic Flash slice (`dsv4 synth flash-slice --experts E`: 4 layers at the real Flash dimensions).

What it measures, alternating the arms in every round (medians; the load average is printed):
* pp and tg tok/s: `dsv4 bench` against `llama-bench` on the slice;
* the routed-expert call (dim 4096, inter 2048, top-6) on 1 and 128 tokens: dsv4's native FP4 MoE
  kernel against kt-kernel's on identical expert bytes, routings and inputs.
Every arm runs pinned to the first --threads cores this process may use (the affinity is inherited by
the peers' processes): kt-kernel's `CPUInfer(1)` otherwise spreads one call's work over two cores, so
kt-kernel runs CPUInfer(max(1, threads - 1)) (see kt_workers).
Neither peer runs in CI: this is a benchmark.

    python benchmarks/bench_peers.py --work /tmp/peers [--threads 1] [--experts 64] [--rounds 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch

from dsv4cli.kernels import cpu

HERE = Path(__file__).resolve().parent
PYTHON = sys.executable
DSV4 = str(Path(PYTHON).with_name("dsv4"))
LLAMA_SDIST = "llama-cpp-python==0.3.36"
LLAMA_COMMIT = "0c1e57098"
KT_KERNEL = "kt-kernel==0.7.2"
TORCH = "torch==2.13.0"
DIM, INTER, TOPK = 4096, 2048, 6


def run(argv: list[str], log: Path, env: dict | None = None, cwd: Path | None = None) -> None:
    """Run a build step; its output goes to `log`; on failure the log's tail is raised."""
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(argv)}\n")
        out.flush()
        done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    if done.returncode:
        tail = log.read_text(errors="replace").splitlines()[-30:]
        raise SystemExit(f"step failed ({done.returncode}): {' '.join(argv)}\n" + "\n".join(tail))


def has_amx() -> bool:
    try:
        return "amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


# ============================================================================== building the peers
def llama_bench(work: Path) -> Path:
    build = work / "llama-build"
    binary = build / "bin" / "llama-bench"
    if binary.exists():
        return binary
    source = llama_source(work)
    flags = ["-DGGML_NATIVE=ON"]
    if has_amx():  # AVX-512 without the tile unit: weight repacking works (see the module docstring)
        flags = ["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
                 "-DGGML_BMI2=ON", "-DGGML_AVX_VNNI=ON", "-DGGML_AVX512=ON", "-DGGML_AVX512_VBMI=ON",
                 "-DGGML_AVX512_VNNI=ON", "-DGGML_AVX512_BF16=ON", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF",
                 "-DGGML_AMX_BF16=OFF"]
    log = work / "llama-build.log"
    run(["cmake", "-S", str(source), "-B", str(build), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release", *flags,
         "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF",
         "-DLLAMA_OPENSSL=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", f"-DLLAMA_BUILD_COMMIT={LLAMA_COMMIT}",
         "-DLLAMA_BUILD_NUMBER=0"], log)
    run(["cmake", "--build", str(build), f"-j{os.cpu_count() or 2}", "--target", "llama-bench"], log)
    return binary


def llama_source(work: Path) -> Path:
    source = work / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
    if not source.is_dir():
        sdist = work / "llama_cpp_python-0.3.36.tar.gz"
        if not sdist.exists():
            run([PYTHON, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", LLAMA_SDIST, "-d", str(work)],
                work / "download.log")
        with tarfile.open(sdist) as archive:
            archive.extractall(work, filter="data")
    return source


def venv(path: Path, packages: list[list[str]], log: Path) -> Path:
    """A venv at `path` with `packages` installed (one pip call per list), marked done when complete."""
    python = path / "bin" / "python"
    if (path / ".done").exists():
        return python
    run([PYTHON, "-m", "venv", "--clear", str(path)], log)
    for group in packages:
        run([str(python), "-m", "pip", "install", "-q", *group], log)
    (path / ".done").touch()
    return python


def kt_python(work: Path) -> Path:
    wheels = work / "kt"
    if not any(wheels.glob("kt_kernel-*.whl")):
        run([PYTHON, "-m", "pip", "download", "--no-deps", KT_KERNEL, "-d", str(wheels)], work / "download.log")
    wheel = str(next(wheels.glob("kt_kernel-*.whl")))
    return venv(work / "ktvenv", [[TORCH], ["--no-deps", wheel], ["safetensors>=0.4", "numpy>=1.24"]],
                work / "ktvenv.log")


def gguf(work: Path, checkpoint: Path) -> Path:
    out = work / "gguf" / f"{checkpoint.name}-mxfp4.gguf"
    if out.exists():
        return out
    python = venv(work / "convvenv", [[TORCH, "numpy~=2.2.6", "sentencepiece>=0.1.98,<0.3.0", "transformers==4.57.6",
                                       "protobuf>=4.21.0,<5.0.0", "safetensors"]], work / "convvenv.log")
    view = hf_view(checkpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    source = llama_source(work)
    run([str(python), str(source / "convert_hf_to_gguf.py"), str(view), "--outfile", str(partial)],
        work / "convert.log", env={**os.environ, "PYTHONPATH": str(source / "gguf-py")})
    partial.rename(out)
    return out


def link_files(source: Path, into: Path) -> Path:
    """`into` (created) with a symlink to each file of `source` it lacks; returns `into`."""
    into.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        link = into / item.name
        if not link.exists():
            link.symlink_to(item.resolve())
    return into


def hf_view(checkpoint: Path) -> Path:
    """The checkpoint's files (symlinked) with dsv4's tokenizer.json / tokenizer_config.json beside them: the
    converter reads the vocabulary from there (synth checkpoints have none)."""
    import dsv4cli

    view = link_files(checkpoint, checkpoint.with_name(checkpoint.name + ".hfview"))
    tokenizer = Path(dsv4cli.__file__).parent / "data" / "tokenizer"
    if not (view / "tokenizer.json").exists():
        (view / "tokenizer.json").write_bytes(lzma.decompress((tokenizer / "tokenizer.json.xz").read_bytes()))
    if not (view / "tokenizer_config.json").exists():
        shutil.copy(tokenizer / "tokenizer_config.json", view / "tokenizer_config.json")
    return view


def slice_checkpoint(work: Path, experts: int) -> Path:
    out = work / "ckpt" / f"flash-slice-L4-E{experts}"
    if not (out / "config.json").exists():
        run([DSV4, "synth", "flash-slice", str(out), "--experts", str(experts)], work / "synth.log")
    return out


# ============================================================================== measuring
def moe_data(path: Path, experts: int, tokens: tuple[int, ...], calls: dict[int, int], seed: int = 0):
    """The experts (random FP4 codes, scales 2^-7..2^-4, the checkpoint's format), routings and inputs both
    MoE arms run, written for kt's driver; returns dsv4's ExpertTable and the calls per token count."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)

    def fp4(rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.randint(-128, 128, (rows, cols // 2), dtype=torch.int8, generator=g)
        s = torch.randint(120, 124, (rows, cols // 32), dtype=torch.uint8, generator=g)
        return w, s.view(torch.float8_e8m0fnu)

    table_experts, tensors = [], {"meta": torch.tensor([experts, TOPK, DIM, INTER])}
    for e in range(experts):
        (w1, s1), (w2, s2), (w3, s3) = fp4(INTER, DIM), fp4(DIM, INTER), fp4(INTER, DIM)
        table_experts.append((w1, s1, w2, s2, w3, s3))
        for name, w, s in (("1", w1, s1), ("2", w2, s2), ("3", w3, s3)):
            tensors[f"w{name}.{e}"] = w.view(torch.uint8)
            tensors[f"s{name}.{e}"] = s.float().bfloat16()  # kt takes the UE8M0 scales as bf16 (exact)
    inputs = {}
    for n in tokens:
        for call in range(calls[n]):
            idx = torch.stack([torch.randperm(experts, generator=g)[:TOPK] for _ in range(n)])
            w = torch.rand(n, TOPK, generator=g)
            x = torch.randn(n, DIM, generator=g).bfloat16()
            tensors[f"idx.{n}.{call}"], tensors[f"w.{n}.{call}"], tensors[f"x.{n}.{call}"] = idx, w, x
            inputs[n, call] = (x.float(), w, idx)
    save_file(tensors, str(path))
    return cpu.ExpertTable.from_experts(table_experts), inputs


def dsv4_moe(table, inputs, n: int, calls: int) -> list[float]:
    samples = []
    for call in range(calls):
        x, w, idx = inputs[n, call]
        started = time.perf_counter()
        cpu.moe_experts(x, w, idx, table, 10.0, True)
        samples.append((time.perf_counter() - started) * 1e3)
    return samples


def kt_workers(threads: int) -> int:
    """kt-kernel's CPUInfer(n) keeps n + 1 threads busy during a call (its n workers and the submitting
    thread: CPUInfer(1) measured 1.99 CPU-seconds per second): n = threads - 1 fills `threads` cores
    (CPUInfer(2) pinned to 2 cores ran 2.3x slower than CPUInfer(1) there); on one core, CPUInfer(1)."""
    return max(1, threads - 1)


def kt_line(kt: subprocess.Popen, start: str) -> str:
    """The driver's next line starting with `start` (kt-kernel prints its own banners on stdout too)."""
    for line in kt.stdout:
        if line.startswith(start):
            return line
    raise SystemExit("kt-kernel's driver stopped (see its output above)")


def bench_moe(work: Path, experts: int, threads: int, rounds: int) -> dict[str, dict[str, list[float]]]:
    tokens, calls = (1, 128), {1: 12, 128: 3}
    data = work / f"moe-E{experts}.safetensors"
    table, inputs = moe_data(data, experts, tokens, calls)
    kt = subprocess.Popen([str(kt_python(work)), str(HERE / "peers" / "kt_moe_driver.py"), "--data", str(data),
                           "--threads", str(kt_workers(threads))], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True)
    try:
        kt_line(kt, "ready")
        cpu.load()
        cpu.set_threads(threads)
        torch.set_num_threads(threads)
        results = {f"moe{n}": {"dsv4": [], "kt-kernel": []} for n in tokens}
        for round_ in range(rounds + 1):  # round 0: warm-up of both
            for n in tokens:
                os.kill(kt.pid, signal.SIGSTOP)  # kt's worker threads spin between calls: no CPU for dsv4 then
                ours = dsv4_moe(table, inputs, n, calls[n])
                os.kill(kt.pid, signal.SIGCONT)
                kt.stdin.write(f"{n} {calls[n]}\n")
                kt.stdin.flush()
                theirs = json.loads(kt_line(kt, "{"))["ms"]
                if round_:
                    results[f"moe{n}"]["dsv4"] += ours
                    results[f"moe{n}"]["kt-kernel"] += theirs
        return results
    finally:
        kt.stdin.close()
        kt.wait(timeout=60)


def bench_e2e(work: Path, checkpoint: Path, model: Path, threads: int, prompt: int, gen: int, rounds: int,
              repetitions: int) -> dict[str, dict[str, list[float]]]:
    results = {f"pp{prompt}": {"dsv4": [], "llama.cpp": []}, f"tg{gen}": {"dsv4": [], "llama.cpp": []}}
    binary = llama_bench(work)
    for _ in range(rounds):
        ours = subprocess.run([DSV4, "bench", str(checkpoint), "-p", str(prompt), "-n", str(gen), "-r",
                               str(repetitions), "--threads", str(threads), "-o", "json"], capture_output=True,
                              text=True, check=True)
        for result in json.loads(ours.stdout)["results"]:
            results[result["label"]]["dsv4"] += result["samples_tokens_per_second"]
        theirs = subprocess.run([str(binary), "-m", str(model), "-p", str(prompt), "-n", str(gen), "-r",
                                 str(repetitions), "-t", str(threads), "-o", "json"], capture_output=True, text=True,
                                check=True)
        for result in json.loads(theirs.stdout):
            label = f"pp{result['n_prompt']}" if result["n_gen"] == 0 else f"tg{result['n_gen']}"
            results[label]["llama.cpp"] += result["samples_ts"]
    return results


def pin_to_cores(threads: int) -> list[int]:
    """Restrict this process (and so every arm it starts) to `threads` cores; returns them."""
    allowed = sorted(os.sched_getaffinity(0))
    if threads > len(allowed):
        raise SystemExit(f"--threads {threads}: only {len(allowed)} cores are available")
    os.sched_setaffinity(0, allowed[:threads])
    return allowed[:threads]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="where the peers, venvs and weights go")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--gen", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of each comparison")
    parser.add_argument("--repetitions", type=int, default=3, help="runs per bench call (after its warm-up)")
    parser.add_argument("--skip", choices=("moe", "e2e"), action="append", default=[])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    cores = pin_to_cores(args.threads)
    load_before = os.getloadavg()
    results: dict[str, dict[str, list[float]]] = {}
    if "e2e" not in args.skip:
        checkpoint = slice_checkpoint(work, args.experts)
        model = gguf(work, checkpoint)
        results |= bench_e2e(work, checkpoint, model, args.threads, args.prompt, args.gen, args.rounds,
                             args.repetitions)
    if "moe" not in args.skip:
        results |= bench_moe(work, args.experts, args.threads, args.rounds)
    load_after = os.getloadavg()
    print(f"machine: {platform.processor() or platform.machine()} · {os.cpu_count()} cpus · AMX {has_amx()} · "
          f"{args.threads} thread(s) pinned to cores {cores} · load average {load_before[0]:.2f} before, "
          f"{load_after[0]:.2f} after")
    print(f"weights: synthetic Flash slice, 4 layers, {args.experts} experts (FP4 experts: identical bytes in "
          "every arm)\n")
    print("| test | unit | dsv4 | peer | peer value | dsv4 / peer |\n|---|---|---:|---|---:|---:|")
    for label, arms in results.items():
        peer = next(name for name in arms if name != "dsv4")
        ours, theirs = statistics.median(arms["dsv4"]), statistics.median(arms[peer])
        unit = "ms/call" if label.startswith("moe") else "tok/s"
        speedup = theirs / ours if unit == "ms/call" else ours / theirs
        print(f"| {label} | {unit} | {ours:.2f} | {peer} | {theirs:.2f} | {speedup:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "experts": args.experts, "load": [
            load_before, load_after], "results": results}, indent=2))


if __name__ == "__main__":
    main()
