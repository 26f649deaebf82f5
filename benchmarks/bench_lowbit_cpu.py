"""Decode GEMV of the `dsv4 quantize` formats against FP4 on the native CPU kernels.

    python benchmarks/bench_lowbit_cpu.py [--rows 8192] [--cols 4096] [--threads 1]

One [rows, cols] weight per format (random Gaussian, quantized), one token; prints the median time
of the GEMV, the bytes it reads (packed codes + scales) per second and weights per second.
"""

from __future__ import annotations

import argparse

import torch

from dsv4cli.formats.lowbit import LOWBIT, quantize_lowbit
from dsv4cli.formats.official import quantize_fp4_rows
from dsv4cli.kernels import cpu

from timing import median_seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=8192)
    p.add_argument("--cols", type=int, default=4096)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=15)
    a = p.parse_args(argv)
    lib = cpu.load()
    g = torch.Generator().manual_seed(0)
    w = torch.randn(a.rows, a.cols, generator=g)
    x = torch.randn(1, a.cols, generator=g)
    print(f"kernels: {lib.isa}, {a.threads} thread(s), weight {a.rows}x{a.cols}")
    for fmt in ("fp4", *LOWBIT):
        if fmt == "fp4":
            q, s = quantize_fp4_rows(w)
            s = s.view(torch.uint8)

            def run(q=q, s=s):
                return lib.fp4_linear(x, q, s, False, a.threads)
        else:
            q, s = quantize_lowbit(w, fmt)

            def run(q=q, s=s, bits=LOWBIT[fmt][0]):
                return lib.lowbit_linear(x, q, s, bits, False, a.threads)
        nbytes = q.numel() * q.element_size() + s.numel() * s.element_size()
        t = median_seconds(lambda _: run(), a.repeats, warmup=3)
        print(f"{fmt}: {nbytes / 2**20:.1f} MiB in {t * 1e3:.2f} ms = {nbytes / t / 1e9:.2f} GB/s, "
              f"{w.numel() / t / 1e9:.1f} G weights/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
