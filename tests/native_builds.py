"""Shared by the native-kernel tests: is there a compiler, what can this CPU run, and one concurrent
build of every ISA variant a test module asks for."""

from __future__ import annotations

import concurrent.futures
import functools
import os
import shutil
from pathlib import Path

import pytest

from dsv4cli.kernels import cpu

HAS_CXX = shutil.which(os.environ.get(cpu.ENV_CXX) or cpu.DEFAULT_CXX) is not None
native = pytest.mark.skipif(not HAS_CXX, reason="no C++ compiler to build the native kernels")


def cpu_flags() -> set[str]:
    """The feature flags of /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


@functools.cache
def _prebuild(flag_sets: tuple[tuple[str, ...], ...]) -> None:
    """Compile these variants concurrently, once (each build takes seconds)."""
    with concurrent.futures.ThreadPoolExecutor(len(flag_sets)) as pool:
        for future in [pool.submit(cpu.build, None, flags) for flags in flag_sets]:
            future.result()


def load_variant(flags: tuple[str, ...], variants: list[tuple[tuple[str, ...], str | None]]) -> cpu.NativeKernels:
    """The kernels built with `flags`, after building all of `variants` ((flags, isa) pairs) at once;
    skips the test without a compiler."""
    if not HAS_CXX:
        pytest.skip("no C++ compiler")
    _prebuild(tuple(f for f, _ in variants))
    return cpu.load(extra_flags=flags)


#: (extra flags, expected isa) of the native-kernel builds this CPU can execute, the native build
#: first: every level of the one ISA ladder (csrc/common.h) at or below the CPU's.
VARIANTS: list[tuple[tuple[str, ...], str | None]] = [((), None)]
#: the build without the AMX tile unit, on CPUs that have one (the vdpbf16ps panel GEMM)
NO_AMX = cpu.NO_AMX_FLAGS
if HAS_CXX and {"amx_tile", "amx_bf16", "avx512_bf16"} <= cpu_flags():
    VARIANTS.append((NO_AMX, "avx512bf16"))
if HAS_CXX and {"avx512f", "avx512_bf16"} <= cpu_flags():
    VARIANTS.append((("-mno-avx512bf16",), "avx512f"))
if HAS_CXX and {"avx2", "fma", "f16c"} <= cpu_flags():
    VARIANTS.append((("-mno-avx512f",), "avx2"))
if HAS_CXX:
    VARIANTS.append((("-mno-avx512f", "-mno-avx2", "-mno-fma"), "scalar"))


def variant_id(variant: tuple[tuple[str, ...], str | None]) -> str:
    """The test id of one of VARIANTS."""
    flags, isa = variant
    return "native" if isa is None else f"{isa}-no-amx" if flags == NO_AMX else isa


def variant_kernels(variant: tuple[tuple[str, ...], str | None]) -> cpu.NativeKernels:
    """The build of one of VARIANTS, checked: it runs the level it names, and every kernel file of it
    runs the same level (the native build: the best one the CPU has)."""
    flags, isa = variant
    built = load_variant(flags, VARIANTS)
    if isa is not None:
        assert built.isa == isa
    elif {"avx512_bf16", "avx512vbmi", "avx512bw", "avx512vl"} <= cpu_flags():
        assert built.isa == "avx512bf16"
    assert built.fp8_isa == built.isa and built.attn_isa == built.isa
    if flags == NO_AMX or built.isa != "avx512bf16":
        assert built.amx == "off"
    elif {"amx_tile", "amx_bf16"} <= cpu_flags():
        assert built.amx in ("amx", "denied")  # "denied": a Linux older than 5.16 keeps the tiles
    return built
