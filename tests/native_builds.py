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
