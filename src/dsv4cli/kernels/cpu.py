"""Native CPU kernels for quantized weights: FP4 (e2m1) experts and FP8 (e4m3, 128x128 block scales).

Decode reads every weight it uses once per token, so CPU decode speed is memory-bandwidth
bound; `csrc/fp4_cpu.cpp` and `csrc/fp8_cpu.cpp` decode the stored codes in registers (never a
dequantized matrix): an FP4 `linear` and a fused routed-MoE call (all selected experts of a
layer in one OpenMP call), and an FP8 `linear` / `grouped_linear` (the dense projections and
attention's grouped `wo_a`). The `dsv4 quantize` formats int3 / int2 (`csrc/lowbit.h`, bf16 block
scales) run on the FP4 kernels' machinery: their own `linear`, and the fused MoE call takes each
projection's format (FP4, int3 or int2). The sources are compiled together with the system g++ on first use
(`-O3 -march=native -fopenmp`) into `$XDG_CACHE_HOME/dsv4/kernels/<hash>.so` and loaded with
ctypes: no build step at install time and no dependency on torch's C++ ABI. A stamp beside each
library (size, sha256) is checked before every load, so a truncated or corrupted cache file is
rebuilt, never loaded. Each function keeps the signature of its reference twin and falls back to
it for whatever it does not cover (other weight formats, non-CPU tensors, other dtypes).
`DSV4_KERNELS=ref` disables the native code; `DSV4_CXX` picks the compiler; `DSV4_CXXFLAGS` adds
compiler flags to every build (e.g. `-mno-amx-tile -mno-amx-bf16 -mno-amx-int8`: no AMX tile unit).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dsv4cli import paths
from dsv4cli.errors import DsvError
from dsv4cli.formats.kvcache import compact_index_supported, compact_kv_supported, index_row_bytes, kv_row_bytes
from dsv4cli.fsutil import atomic_write_bytes, file_lock, fsync_directory
from dsv4cli.kernels import ref
from dsv4cli.kernels.experts import ExpertTable, fp4_operands_ok, lowbit_operands_ok

CSRC = Path(__file__).with_name("csrc")
SOURCE = CSRC / "fp4_cpu.cpp"
#: translation units compiled into the one library (they share csrc/common.h)
SOURCES = (SOURCE, CSRC / "fp8_cpu.cpp", CSRC / "attn_cpu.cpp", CSRC / "hc_cpu.cpp", CSRC / "act_quant_cpu.cpp",
           CSRC / "rope_cpu.cpp")
HEADERS = (CSRC / "common.h", CSRC / "lowbit.h", CSRC / "bf16_tiles.h", CSRC / "amx_tiles.h")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
#: extra flags of a build without the AMX tile unit (its prefill GEMM runs on vdpbf16ps)
NO_AMX_FLAGS = ("-mno-amx-tile", "-mno-amx-bf16", "-mno-amx-int8")
ENV_KERNELS = "DSV4_KERNELS"
ENV_CXX = "DSV4_CXX"
ENV_CXXFLAGS = "DSV4_CXXFLAGS"
DEFAULT_CXX = "g++"
#: tokens per native MoE call: bounds its scratch (per (token, slot): dim * 4 + moe_inter_dim * 6 bytes)
MOE_TOKEN_CHUNK = 256
TEMP_SUFFIX = ".tmp"
#: a build's temporary file older than this was left by a killed build (builds time out after 600 s)
STALE_TEMP_SECONDS = 3600

_FLOAT_DTYPES = (torch.float32, torch.bfloat16)
_SCALE_DTYPES = (torch.float8_e8m0fnu, torch.uint8)
FP8_BLOCK = 128

_i64, _f32, _int, _ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_void_p


class KernelBuildError(DsvError):
    """The native CPU kernels could not be compiled or loaded."""


# =========================================================================== building


_notices: list[str] = []
_notices_lock = threading.Lock()


def cache_dir() -> Path:
    """`$XDG_CACHE_HOME/dsv4/kernels` (XDG default `~/.cache`)."""
    return paths.cache_dir() / "kernels"


def take_notices() -> list[str]:
    """One-line notices about how the kernels were built (e.g. an unwritable cache), each returned once."""
    with _notices_lock:
        taken = list(_notices)
        _notices.clear()
    return taken


def _compiler(cxx: str | None) -> tuple[str, str]:
    """(path, version text) of the compiler, or KernelBuildError."""
    name = cxx or os.environ.get(ENV_CXX) or DEFAULT_CXX
    path = shutil.which(name)
    if path is None:
        raise KernelBuildError(f"no C++ compiler found ({name!r} is not on PATH or not executable)",
                               f"install g++, set {ENV_CXX} to a C++17 compiler, or set {ENV_KERNELS}=ref")
    try:
        proc = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        raise KernelBuildError(f"C++ compiler {path} does not run: {exc}",
                               f"fix or replace it (set {ENV_CXX}), or set {ENV_KERNELS}=ref") from exc
    if proc.returncode != 0:
        raise KernelBuildError(f"C++ compiler {path} does not run: {_first_line(proc.stderr or proc.stdout)}",
                               f"fix or replace it (set {ENV_CXX}), or set {ENV_KERNELS}=ref")
    return path, proc.stdout


def _cpu_id() -> str:
    """What `-march=native` depends on: the CPU model and feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return platform.machine() + platform.processor()
    keep = [ln for ln in text.splitlines() if ln.split(":")[0].strip() in ("model name", "flags", "Features")]
    return platform.machine() + "\n" + "\n".join(dict.fromkeys(keep))


def _first_line(text: str, limit: int = 240) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    pick = next((ln for ln in lines if "error" in ln.lower()), lines[0] if lines else "no output")
    return pick if len(pick) <= limit else pick[: limit - 3] + "..."


@dataclass(frozen=True)
class BuildSpec:
    """One build variant: the compiler, its flags and the key that names the library."""

    compiler: str
    version: str
    flags: tuple[str, ...]
    key: str

    @classmethod
    def make(cls, cxx: str | None, extra_flags: Sequence[str]) -> BuildSpec:
        """The spec for a compiler (None: $DSV4_CXX or g++); the key hashes sources, compiler, flags and CPU."""
        path, version = _compiler(cxx)
        flags = (*FLAGS, *extra_flags)
        sources = [f.read_bytes() for f in (*SOURCES, *HEADERS)]
        key = hashlib.sha256(b"\0".join([*sources, path.encode(), version.encode(), " ".join(flags).encode(),
                                         _cpu_id().encode()])).hexdigest()[:24]
        return cls(path, version, flags, key)

    def library(self, out_dir: Path) -> Path:
        return out_dir / f"fp4_cpu-{self.key}.so"

    def stamp(self, size: int, digest: str) -> dict[str, Any]:
        """What the stamp next to a library records."""
        return {"key": self.key, "size": size, "sha256": digest, "compiler": self.compiler,
                "compiler_version": _first_line(self.version), "flags": list(self.flags)}


def stamp_path(library: Path) -> Path:
    """The stamp of a cached library: `<library>.stamp` (JSON: size, sha256, build key and flags)."""
    return library.with_name(library.name + ".stamp")


def build(cxx: str | None = None, extra_flags: Sequence[str] = (), out_dir: Path | None = None) -> Path:
    """Compile `csrc/*.cpp` into one library (or reuse the verified cached build) and return the `.so` path.

    The file name hashes the sources, compiler (path + version), flags and CPU, so any change
    rebuilds; so does a library whose stamp (size and sha256) is missing or does not match, so a
    truncated or corrupted file is never loaded. Builds of one key hold a file lock and write a unique
    temporary file that is fsynced and renamed into place. Where the cache cannot be written, the
    library is built into a private temporary directory (removed at exit) and `take_notices` says so.
    """
    spec = BuildSpec.make(cxx, extra_flags)
    out_dir = out_dir or cache_dir()
    try:
        return _cached_build(spec, out_dir)
    except OSError as exc:
        reason = exc.strerror or str(exc)
    try:
        library = _cached_build(spec, _private_dir())
    except OSError as exc:
        raise KernelBuildError(f"cannot write the kernel cache {out_dir} ({reason}) nor a temporary directory "
                               f"({exc.strerror or exc})",
                               f"make {out_dir} writable, set XDG_CACHE_HOME, or set {ENV_KERNELS}=ref") from exc
    with _notices_lock:
        _notices.append(f"cannot write the kernel cache {out_dir} ({reason}): built the native CPU kernels in a "
                        "temporary directory (make it writable or set XDG_CACHE_HOME to skip the rebuild)")
    return library


def _cached_build(spec: BuildSpec, out_dir: Path) -> Path:
    """The verified library of `spec` in `out_dir`, built under its lock if needed; OSError: the directory
    cannot be written."""
    library = spec.library(out_dir)
    if verified(library, spec):
        return library
    out_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(out_dir / f".fp4_cpu-{spec.key}.lock", wait=True):
        if verified(library, spec):  # another process built it while this one waited
            return library
        _remove_stale_temporaries(out_dir)
        _compile_into(spec, library)
    return library


def verified(library: Path, spec: BuildSpec) -> bool:
    """Whether `library` exists and matches its stamp (same key and flags, size and sha256)."""
    try:
        stamp = json.loads(stamp_path(library).read_text(encoding="utf-8"))
        size = library.stat().st_size
        if not isinstance(stamp, dict) or stamp.get("size") != size:
            return False
        return stamp == spec.stamp(size, _sha256(library))
    except (OSError, ValueError):
        return False


def _sha256(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _compile_into(spec: BuildSpec, library: Path) -> None:
    """Compile into a temporary file beside `library`, fsync it, rename it into place, then write the stamp."""
    fd, tmp = tempfile.mkstemp(prefix=f".{library.name}.", suffix=TEMP_SUFFIX, dir=library.parent)
    os.close(fd)
    try:
        _compile(spec, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        stamp = spec.stamp(os.path.getsize(tmp), _sha256(tmp))
        _replace(tmp, library)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    atomic_write_bytes(stamp_path(library), (json.dumps(stamp, indent=2) + "\n").encode())


def _compile(spec: BuildSpec, output: str) -> None:
    """Run the compiler on the sources; KernelBuildError when it fails."""
    try:
        proc = subprocess.run([spec.compiler, *spec.flags, *map(str, SOURCES), "-o", output], capture_output=True,
                              text=True, timeout=600, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        raise KernelBuildError(f"building the native CPU kernels with {spec.compiler} failed: {exc}",
                               f"check the compiler, or set {ENV_KERNELS}=ref") from exc
    if proc.returncode != 0:
        raise KernelBuildError(f"building the native CPU kernels with {spec.compiler} failed: "
                               f"{_first_line(proc.stderr or proc.stdout)}",
                               f"needs a C++17 compiler with OpenMP (g++ >= 9); or set {ENV_KERNELS}=ref")


def _replace(tmp: str, path: Path) -> None:
    """Rename `tmp` onto `path` and fsync the directory, so the rename survives a crash."""
    os.replace(tmp, path)
    fsync_directory(path.parent)


def _remove_stale_temporaries(out_dir: Path) -> None:
    """Delete temporary files that builds killed mid-way left behind (older than any build takes)."""
    cutoff = time.time() - STALE_TEMP_SECONDS
    for leftover in out_dir.glob(f".fp4_cpu-*{TEMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            if leftover.stat().st_mtime < cutoff:
                leftover.unlink()


@functools.cache
def _private_dir() -> Path:
    """A temporary directory only this user can read, removed when the process exits."""
    path = Path(tempfile.mkdtemp(prefix="dsv4-kernels-"))
    atexit.register(shutil.rmtree, path, True)
    return path


class NativeKernels:
    """The loaded library with typed entry points (one per build variant)."""

    def __init__(self, path: Path):
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as exc:
            raise KernelBuildError(f"cannot load the native CPU kernels {path}: {exc}",
                                   f"delete {path.parent} to rebuild, or set {ENV_KERNELS}=ref") from exc
        self.path = path
        self.lib = lib
        lib.dsv4_fp4_isa.restype = ctypes.c_char_p
        lib.dsv4_fp4_isa.argtypes = []
        lib.dsv4_amx_state.restype = ctypes.c_char_p
        lib.dsv4_amx_state.argtypes = []
        lib.dsv4_max_threads.restype = _int
        lib.dsv4_fake_quant_fp8.restype = None
        lib.dsv4_fake_quant_fp8.argtypes = [_ptr, _i64, _i64, _i64, _ptr]
        lib.dsv4_fp4_linear.restype = _int
        lib.dsv4_fp4_linear.argtypes = [_ptr, _i64, _i64, _ptr, _ptr, _i64, _ptr, _int, _int]
        lib.dsv4_fp4_moe.restype = _int
        lib.dsv4_fp4_moe.argtypes = [_ptr, _i64, _i64, _i64, _ptr, _ptr, _i64, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr,
                                     _i64, _f32, _int, _int, _ptr, _int]
        lib.dsv4_lowbit_linear.restype = _int
        lib.dsv4_lowbit_linear.argtypes = [_ptr, _i64, _i64, _ptr, _ptr, _i64, _ptr, _int, _int, _int]
        lib.dsv4_quant_moe.restype = _int
        lib.dsv4_quant_moe.argtypes = [*lib.dsv4_fp4_moe.argtypes, _int, _int, _int]
        lib.dsv4_fp8_isa.restype = ctypes.c_char_p
        lib.dsv4_fp8_isa.argtypes = []
        lib.dsv4_fp8_linear.restype = _int
        lib.dsv4_fp8_linear.argtypes = [_ptr, _i64, _i64, _i64, _ptr, _ptr, _int, _i64, _ptr, _int, _int]
        lib.dsv4_bf16_linear.restype = _int
        lib.dsv4_bf16_linear.argtypes = [_ptr, _i64, _i64, _i64, _ptr, _i64, _ptr, _int]
        lib.dsv4_attn_isa.restype = ctypes.c_char_p
        lib.dsv4_attn_isa.argtypes = []
        lib.dsv4_indexer_topk.restype = _int
        lib.dsv4_indexer_topk.argtypes = [_ptr, _ptr, _ptr, _int, _i64, _i64, _i64, _i64, _i64, _i64, _i64, _ptr,
                                          _i64, _ptr, _ptr, _int]
        lib.dsv4_cached_attn.restype = _int
        lib.dsv4_cached_attn.argtypes = [_ptr, _int, _i64, _i64, _i64, _i64, _ptr, _int, _i64, _i64, _ptr, _i64,
                                         _i64, _i64, _ptr, _int, _i64, _i64, _ptr, _i64, _i64, _i64, _i64, _ptr,
                                         _f32, _ptr, _int]
        lib.dsv4_hc_split_sinkhorn.restype = _int
        lib.dsv4_hc_split_sinkhorn.argtypes = [_ptr, _i64, _i64, _int, _ptr, _ptr, _int, _f32, _ptr, _ptr, _ptr]
        lib.dsv4_kv_fp8_quant.restype = _int
        lib.dsv4_kv_fp8_quant.argtypes = [_ptr, _i64, _i64, _i64, _int, _ptr]
        lib.dsv4_fake_quant_fp4.restype = _int
        lib.dsv4_fake_quant_fp4.argtypes = [_ptr, _i64, _i64, _int, _ptr]
        lib.dsv4_rope.restype = _int
        lib.dsv4_rope.argtypes = [_ptr, _i64, _i64, _i64, _i64, _ptr, _ptr, _i64, _int, _int, _ptr]
        self.isa: str = lib.dsv4_fp4_isa().decode()
        #: code path of the FP8 kernels (the bf16 one also needs AVX-512 VBMI)
        self.fp8_isa: str = lib.dsv4_fp8_isa().decode()
        self.attn_isa: str = lib.dsv4_attn_isa().decode()
        #: the prefill GEMMs' matrix engine: "amx" (the AMX tile unit), "denied" (built for it, the
        #: OS refused the tile state) or "off" (not built for it)
        self.amx: str = lib.dsv4_amx_state().decode()

    def fake_quant_fp8(self, x: torch.Tensor, block: int = 128) -> torch.Tensor:
        """`formats.fake_quant_fp8` on float32 rows, natively (bit-exact; for tests)."""
        xf = x.float().contiguous()
        out = torch.empty_like(xf)
        d = xf.shape[-1] if xf.dim() else 1
        self.lib.dsv4_fake_quant_fp8(xf.data_ptr(), xf.numel() // max(d, 1), d, block, out.data_ptr())
        return out

    def fp4_linear(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, act_quant: bool,
                   threads: int) -> torch.Tensor:
        """float32 [N, K] x FP4 [O, K/2] -> float32 [N, O] (inputs already validated)."""
        n, k = x.shape
        o = weight.shape[0]
        y = torch.empty(n, o, dtype=torch.float32)
        rc = self.lib.dsv4_fp4_linear(x.data_ptr(), n, k, weight.data_ptr(), scale.data_ptr(), o, y.data_ptr(),
                                      int(act_quant), threads)
        _check(rc, "fp4 linear")
        return y

    def lowbit_linear(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bits: int, act_quant: bool,
                      threads: int) -> torch.Tensor:
        """float32 [N, K] x int3 (bits 3) / int2 (bits 2) weight [O, K/32 * bytes] with bf16 scales [O, K/32]
        -> float32 [N, O] (inputs already validated)."""
        n, k = x.shape
        o = weight.shape[0]
        y = torch.empty(n, o, dtype=torch.float32)
        rc = self.lib.dsv4_lowbit_linear(x.data_ptr(), n, k, weight.data_ptr(), scale.data_ptr(), o, y.data_ptr(),
                                         int(act_quant), threads, bits)
        _check(rc, f"int{bits} linear")
        return y

    def fp8_linear(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, act_quant: bool,
                   threads: int) -> torch.Tensor:
        """float32 x [N, G, K] x FP8 weight [G*R, K] -> float32 [N, G, R]: group g uses rows
        g*R..(g+1)*R-1 (G = 1 is a plain linear). scale: UE8M0 bytes (uint8) or float32
        [ceil(G*R/128), ceil(K/128)]. Inputs already validated and contiguous."""
        return self.dense_linear(x, weight.data_ptr(), weight.shape[0] // max(x.shape[1], 1), scale.data_ptr(),
                                 scale.dtype == torch.float32, act_quant, threads)

    def bf16_linear(self, x: torch.Tensor, weight: torch.Tensor, threads: int) -> torch.Tensor:
        """float32 x [N, G, K] x bf16 weight [G*R, K] -> float32 [N, G, R] (grouped like `fp8_linear`)."""
        return self.dense_linear(x, weight.data_ptr(), weight.shape[0] // max(x.shape[1], 1), None, False, False,
                                 threads)

    def dense_linear(self, x: torch.Tensor, weight_ptr: int, rows: int, scale_ptr: int | None, scale_f32: bool,
                     act_quant: bool, threads: int) -> torch.Tensor:
        """`fp8_linear` (scale_ptr given) or `bf16_linear` (None) by the weight's address and its rows per group:
        the call the linear plans make, with everything about the weight worked out beforehand."""
        n, g, k = x.shape
        y = torch.empty(n, g, rows, dtype=torch.float32)
        if scale_ptr is None:
            rc = self.lib.dsv4_bf16_linear(x.data_ptr(), n, g, k, weight_ptr, rows, y.data_ptr(), threads)
        else:
            rc = self.lib.dsv4_fp8_linear(x.data_ptr(), n, g, k, weight_ptr, scale_ptr, int(scale_f32), rows,
                                          y.data_ptr(), int(act_quant), threads)
        _check(rc, "bf16 linear" if scale_ptr is None else "fp8 linear")
        return y

    def hc_split_sinkhorn(self, mixes: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, n: int, iters: int,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """float32 mixes [T, (2+n)*n] (rows contiguous), scale [3], base [(2+n)*n] (contiguous) -> pre [T, n],
        post [T, n], comb [T, n, n] (inputs already validated)."""
        t = mixes.shape[0]
        pre, post = torch.empty(t, n), torch.empty(t, n)
        comb = torch.empty(t, n, n)
        stride = mixes.stride(0) if t > 1 else mixes.shape[1]  # a single row's stride may be anything
        rc = self.lib.dsv4_hc_split_sinkhorn(mixes.data_ptr(), t, stride, n, scale.data_ptr(),
                                             base.data_ptr(), iters, float(eps), pre.data_ptr(), post.data_ptr(),
                                             comb.data_ptr())
        _check(rc, "hc split sinkhorn")
        return pre, post, comb

    def kv_fp8_quant(self, rows: torch.Tensor, rope_dim: int) -> torch.Tensor:
        """`ref.kv_fp8_quant` of contiguous float32 / bf16 rows [n, d] (validated by the caller), same dtype."""
        out = torch.empty_like(rows)
        n, d = rows.shape
        rc = self.lib.dsv4_kv_fp8_quant(rows.data_ptr(), n, d, rope_dim, int(rows.dtype == torch.bfloat16),
                                        out.data_ptr())
        _check(rc, "kv fp8 quant")
        return out

    def fake_quant_fp4(self, rows: torch.Tensor) -> torch.Tensor:
        """`formats.fake_quant_fp4(rows, 32)` of contiguous float32 / bf16 rows [n, d] (d % 32 == 0), same dtype."""
        out = torch.empty_like(rows)
        n, d = rows.shape
        rc = self.lib.dsv4_fake_quant_fp4(rows.data_ptr(), n, d, int(rows.dtype == torch.bfloat16), out.data_ptr())
        _check(rc, "fp4 fake quant")
        return out

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, inverse: bool) -> torch.Tensor:
        """`ref.rope` of contiguous float32 / bf16 x [..., S, heads, D] (or [..., S, D], heads 1) with contiguous
        float32 cos / sin of S x half values (validated by the caller), same shape and dtype."""
        out = torch.empty_like(x)
        seq, half, d = cos.shape[0], cos.shape[-1], x.shape[-1]
        batch = x.numel() // max(1, seq * heads * d)
        rc = self.lib.dsv4_rope(x.data_ptr(), batch, seq, heads, d, cos.data_ptr(), sin.data_ptr(), half,
                                int(inverse), int(x.dtype == torch.bfloat16), out.data_ptr())
        _check(rc, "rope")
        return out

    def fp4_moe(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, table: ExpertTable,
                swiglu_limit: float, act_quant: bool, round_bf16: bool, threads: int) -> torch.Tensor:
        """float32 x [N, D], weights [N, k] float32, indices [N, k] int64 -> float32 [N, D].

        The table's experts may be FP4, int3 or int2 per projection (`ExpertTable.bits`)."""
        n, d = x.shape
        out = torch.empty(n, d, dtype=torch.float32)
        p = table.pointers
        rc = self.lib.dsv4_quant_moe(x.data_ptr(), n, d, table.inter_dim, indices.data_ptr(), weights.data_ptr(),
                                     indices.shape[1], *(t.data_ptr() for t in p), table.num_experts,
                                     float(swiglu_limit), int(act_quant), int(round_bf16), out.data_ptr(), threads,
                                     *table.bits)
        _check(rc, "quantized moe")
        return out

    quant_moe = fp4_moe  # the same call: FP4, int3 and int2 experts alike

    def indexer_topk(self, q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor,
                     top: int, threads: int) -> torch.Tensor:
        """float32 q [B,S,H,D] and weights [B,S,H] (contiguous), keys [B,N,row] (float32, bf16 or compact
        FP4 bytes; rows contiguous), visible [S] int64 -> [B,S,top] int64 (inputs already validated)."""
        b, s, h, d = q.shape
        n = keys.shape[1]
        out = torch.empty(b, s, top, dtype=torch.int64)
        scores = torch.empty(b * s * max(n, 1), dtype=torch.float32)
        size = keys.element_size()
        rc = self.lib.dsv4_indexer_topk(q.data_ptr(), weights.data_ptr(), keys.data_ptr(), _element_kind(keys, 2),
                                        keys.stride(0) * size, keys.stride(1) * size, b, s, h, d, n,
                                        visible.data_ptr(), top, out.data_ptr(), scores.data_ptr(), threads)
        _check(rc, "indexer top-k")
        return out

    def cached_attn(self, q: torch.Tensor, local_kv: torch.Tensor, local_idx: torch.Tensor, pool: torch.Tensor | None,
                    pool_idx: torch.Tensor | None, attn_sink: torch.Tensor, softmax_scale: float, rope_dim: int,
                    threads: int) -> torch.Tensor:
        """`ref.cached_attn` natively; q contiguous, every row and index list contiguous in its last dim."""
        b, s, h, d = q.shape
        out = torch.empty_like(q)
        lsize = local_kv.element_size()
        k = 0 if pool is None or pool_idx is None else pool_idx.shape[-1]
        pool_args = ((pool.data_ptr(), _element_kind(pool), pool.stride(0) * pool.element_size(),
                      pool.stride(1) * pool.element_size(), pool_idx.data_ptr(), _batch_stride(pool_idx),
                      pool_idx.stride(1), k) if k else (None, 0, 0, 0, None, 0, 0, 0))
        rc = self.lib.dsv4_cached_attn(q.data_ptr(), _element_kind(q), b, s, h, d, local_kv.data_ptr(),
                                       _element_kind(local_kv), local_kv.stride(0) * lsize, local_kv.stride(1) * lsize,
                                       local_idx.data_ptr(), _batch_stride(local_idx), local_idx.stride(1),
                                       local_idx.shape[-1], *pool_args, rope_dim, attn_sink.data_ptr(),
                                       float(softmax_scale), out.data_ptr(), threads)
        _check(rc, "cached attention")
        return out


#: element kinds of csrc/attn_cpu.cpp by dtype (uint8 = compact rows, told apart by the op)
_KINDS = {torch.float32: 0, torch.bfloat16: 1}


def _element_kind(t: torch.Tensor, compact_kind: int = 3) -> int:
    return _KINDS.get(t.dtype, compact_kind)


def _batch_stride(t: torch.Tensor) -> int:
    return 0 if t.shape[0] == 1 else t.stride(0)


def _check(rc: int, what: str) -> None:
    if rc == 0:
        return
    if rc == -2:
        raise IndexError(f"{what}: an expert index is out of range")
    if rc == -3:
        raise MemoryError(f"{what}: out of memory for the kernel's scratch buffers")
    raise ValueError(f"{what}: bad shapes (the kernel returned {rc})")


_lock = threading.Lock()
_loaded: dict[tuple[str, tuple[str, ...]], NativeKernels | KernelBuildError] = {}


@functools.lru_cache(maxsize=8)
def _user_flags(value: str) -> tuple[str, ...]:
    """$DSV4_CXXFLAGS split like a shell would (parsed once per value: `load` runs on every kernel call)."""
    try:
        return tuple(shlex.split(value))
    except ValueError as exc:
        raise KernelBuildError(f"{ENV_CXXFLAGS} is not a valid flag list: {exc}",
                               f"fix the quoting in {ENV_CXXFLAGS} or unset it") from exc


def load(cxx: str | None = None, extra_flags: Sequence[str] = ()) -> NativeKernels:
    """Build (once per compiler/flags; $DSV4_CXXFLAGS first) and load the kernels; raises KernelBuildError.

    A failed build is remembered for the process, so it is reported, not retried, on every call.
    """
    extra_flags = (*_user_flags(os.environ.get(ENV_CXXFLAGS, "")), *extra_flags)
    key = (cxx or os.environ.get(ENV_CXX) or DEFAULT_CXX, tuple(extra_flags))
    with _lock:
        got = _loaded.get(key)
        if got is None:
            try:
                got = NativeKernels(build(cxx, extra_flags))
            except KernelBuildError as exc:
                got = exc
            _loaded[key] = got
    if isinstance(got, KernelBuildError):
        raise got
    return got


def enabled() -> bool:
    """False when `DSV4_KERNELS=ref` asks for the reference ops only."""
    return os.environ.get(ENV_KERNELS, "").strip().lower() != "ref"


def available() -> bool:
    """True if the native kernels are enabled and build/load on this machine."""
    if not enabled():
        return False
    try:
        load()
    except KernelBuildError:
        return False
    return True


# =========================================================================== threads

_threads: int | None = None


def set_threads(n: int | None) -> None:
    """Threads for the native kernels; None (default) follows `torch.get_num_threads()`."""
    global _threads
    _threads = None if n is None else max(1, int(n))


def threads() -> int:
    """Threads the next native call may use (the kernels use fewer for small calls)."""
    return _threads or torch.get_num_threads()


# =========================================================================== ops


def _native_input(x: torch.Tensor) -> bool:
    return (enabled() and x.device.type == "cpu" and x.dtype in _FLOAT_DTYPES and not x.requires_grad
            and x.numel() > 0)


def fp8_operands_ok(weight: torch.Tensor, scale: torch.Tensor | None, in_features: int, groups: int = 1) -> bool:
    """FP8 e4m3 weight [groups * r, in_features] on CPU with its 128x128 block scales."""
    return (weight.dtype == torch.float8_e4m3fn and scale is not None and weight.dim() == 2
            and weight.device.type == "cpu" and scale.device.type == "cpu" and weight.shape[1] == in_features
            and groups > 0 and weight.shape[0] % groups == 0
            and (scale.dtype in _SCALE_DTYPES or scale.dtype.is_floating_point)
            and tuple(scale.shape) == (-(-weight.shape[0] // FP8_BLOCK), -(-in_features // FP8_BLOCK)))


def bf16_operands_ok(weight: torch.Tensor, in_features: int, groups: int = 1) -> bool:
    """Plain bf16 weight [groups * r, in_features] on CPU."""
    return (weight.dtype == torch.bfloat16 and weight.dim() == 2 and weight.device.type == "cpu"
            and weight.shape[1] == in_features and groups > 0 and weight.shape[0] % groups == 0)


def _fp8_scale(scale: torch.Tensor) -> torch.Tensor:
    """Scales as the kernel takes them: UE8M0 bytes (uint8) or float32 multipliers."""
    if scale.dtype in _SCALE_DTYPES:
        return scale.contiguous().view(torch.uint8)
    return scale.to(torch.float32).contiguous()


@dataclass(frozen=True)
class _LinearPlan:
    """How one weight (and its scale) runs natively, worked out once: a decode step calls every linear of
    the model once, and re-validating its operands each time cost more than the small kernels themselves.

    Valid while `weight` / `scale` are the same live tensors over the same memory (checked per call)."""

    weight: Any  # weakref.ref to the weight
    scale: Any  # weakref.ref to the scale, or None
    weight_ptr: int
    scale_ptr: int
    run: Callable[..., torch.Tensor]  # (float32 x [N, G, K] contiguous, act_quant, weight) -> [N, G, R]

    def holds(self, weight: torch.Tensor, scale: torch.Tensor | None) -> bool:
        if self.weight() is not weight or weight.data_ptr() != self.weight_ptr:
            return False
        if scale is None or self.scale is None:
            return scale is None and self.scale is None
        return self.scale() is scale and scale.data_ptr() == self.scale_ptr


_plans: dict[tuple[int, int, int], _LinearPlan] = {}  # (id(weight), k, groups) -> plan


def _make_plan(weight: torch.Tensor, scale: torch.Tensor | None, k: int, groups: int):
    """The native call for these operands (None: the kernels do not take them), as run(x, act_quant, weight).

    The call never holds the weight itself (the plan is dropped when the weight dies): only a copy
    where the weight is not contiguous, its pointer otherwise."""
    lib = load()
    w = weight.contiguous()
    copy = None if w is weight else w
    if groups == 1 and fp4_operands_ok(weight, scale, k):
        s = scale.contiguous().view(torch.uint8)
        return lambda x, aq, weight: lib.fp4_linear(x.view(-1, k), copy if copy is not None else weight, s, aq,
                                                    threads()).view(x.shape[0], 1, -1)
    if groups == 1 and (bits := lowbit_operands_ok(weight, scale, k)):
        s = scale.contiguous()
        return lambda x, aq, weight: lib.lowbit_linear(x.view(-1, k), copy if copy is not None else weight, s, bits,
                                                       aq, threads()).view(x.shape[0], 1, -1)
    if fp8_operands_ok(weight, scale, k, groups):
        return _dense_runner(lib, w.data_ptr(), weight.shape[0] // groups, copy, _fp8_scale(scale))
    if bf16_operands_ok(weight, k, groups):
        return _dense_runner(lib, w.data_ptr(), weight.shape[0] // groups, copy, None)
    return None


def _dense_runner(lib: NativeKernels, w_ptr: int, r: int, copy: torch.Tensor | None, scale: torch.Tensor | None):
    """`NativeKernels.dense_linear` with the weight's pointer, rows and scales bound (`copy`: the contiguous copy
    `w_ptr` points into, and `scale`, kept alive here)."""
    s_ptr = None if scale is None else scale.data_ptr()
    s_f32 = scale is not None and scale.dtype == torch.float32

    def run(x: torch.Tensor, act_quant: bool, weight: torch.Tensor, keep=(copy, scale)) -> torch.Tensor:
        return lib.dense_linear(x, w_ptr, r, s_ptr, s_f32, act_quant, threads())
    return run


def _plan(weight: torch.Tensor, scale: torch.Tensor | None, k: int, groups: int) -> _LinearPlan | None:
    """The cached plan of (weight, scale) for inputs of width k in `groups` groups; None if not native."""
    key = (id(weight), k, groups)
    plan = _plans.get(key)
    if plan is not None and plan.holds(weight, scale):
        return plan
    run = _make_plan(weight, scale, k, groups)
    if run is None:
        return None

    def forget(_ref, key=key):
        if _plans.get(key) is plan:
            del _plans[key]

    plan = _LinearPlan(weakref.ref(weight, forget), None if scale is None else weakref.ref(scale),
                       weight.data_ptr(), 0 if scale is None else scale.data_ptr(), run)
    _plans[key] = plan
    return plan


def _float_rows(x: torch.Tensor, groups: int, k: int) -> torch.Tensor:
    """x as the contiguous float32 [N, groups, k] the kernels take."""
    return _dense(_as_float(x.reshape(-1, groups, k)))


def linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None,
           act_quant: bool = False) -> torch.Tensor:
    """`ref.linear` with the native kernels for FP4, int3/int2, FP8 and bf16 weights on CPU; the reference for the rest.

    bf16 weights: the reference's `F.linear(x, weight.to(x.dtype))` without converting the matrix
    (fp32 x: exact products, fp32 sums; bf16 x: fp32 sums rounded to bf16, as torch's bf16 GEMM).
    """
    if not _native_input(x):
        return ref.linear(x, weight, scale, act_quant)
    k = x.shape[-1]
    plan = _plan(weight, scale, k, 1)
    if plan is None:
        return ref.linear(x, weight, scale, act_quant)
    y = plan.run(_float_rows(x, 1, k), act_quant, weight)
    return y.view(*x.shape[:-1], weight.shape[0]).to(x.dtype)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """`ref.grouped_linear` with the native kernels: x [..., G, din], weight [G*r, din] -> [..., G, r].

    FP8 (attention's wo_a), FP4 (`dsv4 quantize` dense fp4: one FP4 call per group; e2m1 times a
    power-of-two scale is exact in bf16, so this equals the reference's bf16-rounded weights) and
    bf16 weights; no activation quantization (the reference runs wo_a in bf16). The reference for
    other weights and inputs the kernels do not take.
    """
    if x.dim() < 2 or not _native_input(x):
        return ref.grouped_linear(x, weight, scale)
    g, k = x.shape[-2:]
    if weight.shape[0] % g == 0 and fp4_operands_ok(weight, scale, k):
        r = weight.shape[0] // g
        x3 = x.reshape(-1, g, k).to(torch.float32)
        w, s = weight.contiguous(), scale.contiguous().view(torch.uint8)
        lib = load()
        y = torch.stack([lib.fp4_linear(x3[:, i].contiguous(), w[i * r:(i + 1) * r], s[i * r:(i + 1) * r], False,
                                        threads()) for i in range(g)], dim=1)
    else:
        plan = _plan(weight, scale, k, g)
        if plan is None:
            return ref.grouped_linear(x, weight, scale)
        y = plan.run(_float_rows(x, g, k), False, weight)
    return y.view(*x.shape[:-1], weight.shape[0] // g).to(x.dtype)


def swiglu_expert(x: torch.Tensor, w1: torch.Tensor, s1: torch.Tensor | None, w2: torch.Tensor,
                  s2: torch.Tensor | None, w3: torch.Tensor, s3: torch.Tensor | None,
                  route_weight: torch.Tensor | None, swiglu_limit: float, act_quant: bool) -> torch.Tensor:
    """`ref.swiglu_expert` (the shared expert: FP8 in the checkpoints) step for step, with this
    module's `linear`, so its weights are read by the native kernels instead of dequantized per call."""
    return ref.swiglu_with(linear, x, w1, s1, w2, s2, w3, s3, route_weight, swiglu_limit, act_quant)


def hc_split_sinkhorn(mixes: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, hc_mult: int, iters: int,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`ref.hc_split_sinkhorn` natively (csrc/hc_cpu.cpp): one call per block instead of ~100 small torch ops,
    which is most of a small model's decode step; the reference for inputs the kernel does not take."""
    width = (2 + hc_mult) * hc_mult
    if (not _native_input(mixes) or mixes.shape[-1] != width or scale.numel() != 3 or base.numel() != width
            or scale.device.type != "cpu" or base.device.type != "cpu" or not 1 <= hc_mult <= 64 or iters < 0):
        return ref.hc_split_sinkhorn(mixes, scale, base, hc_mult, iters, eps)
    lead = mixes.shape[:-1]
    rows = _dense(_as_float(mixes.reshape(-1, width)))
    pre, post, comb = load().hc_split_sinkhorn(rows, _dense(_as_float(scale)), _dense(_as_float(base)), hc_mult,
                                               iters, eps)
    if len(lead) == 1:
        return pre, post, comb
    return pre.view(*lead, hc_mult), post.view(*lead, hc_mult), comb.view(*lead, hc_mult, hc_mult)


def _as_float(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()


def kv_fp8_quant(x: torch.Tensor, rope_head_dim: int) -> torch.Tensor:
    """`ref.kv_fp8_quant` natively (csrc/act_quant_cpu.cpp, bit for bit): one call instead of ~20 torch ops."""
    if not _native_input(x) or x.dim() < 1 or not 0 < rope_head_dim <= x.shape[-1]:
        return ref.kv_fp8_quant(x, rope_head_dim)
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    return load().kv_fp8_quant(rows, rope_head_dim).view(x.shape)


def indexer_fp4_quant(x: torch.Tensor) -> torch.Tensor:
    """`ref.indexer_fp4_quant`: the same Hadamard rotation (a torch matmul), then the FP4 fake-quant natively
    (csrc/act_quant_cpu.cpp, bit for bit) instead of ~40 torch ops."""
    d = x.shape[-1] if x.dim() else 0
    if not _native_input(x) or d % 32 or d & (d - 1):
        return ref.indexer_fp4_quant(x)
    rotated = (x.float() @ ref.hadamard(d)).to(x.dtype)
    return load().fake_quant_fp4(rotated.reshape(-1, d).contiguous()).view(x.shape)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """`ref.rope` natively (csrc/rope_cpu.cpp, bit for bit) for the model's layouts (`ref.rope_heads`);
    the reference for anything else."""
    heads = ref.rope_heads(x, cos, sin) if _native_input(x) else 0
    if not heads:
        return ref.rope(x, cos, sin, inverse)
    return load().rope(_dense(x), _dense(cos), _dense(sin), heads, inverse)


def _dense(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


moe_experts_ref = ref.moe_experts  # the reference twin of `moe_experts`


def moe_experts(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, experts: ExpertTable,
                swiglu_limit: float, act_quant: bool) -> torch.Tensor:
    """Sum of the selected routed experts' outputs, float32 [N, D], in one native call.

    x [N, D] (float32 or bfloat16; bf16 reproduces the reference's bf16 round trips),
    weights [N, k] routing weights, indices [N, k] expert ids. Falls back to `moe_experts_ref`
    when the native kernels are off or do not apply.
    """
    if (not enabled() or not experts.native or x.device.type != "cpu" or x.dtype not in _FLOAT_DTYPES
            or x.requires_grad or x.dim() != 2 or x.shape[1] != experts.dim or indices.shape != weights.shape
            or indices.dim() != 2 or indices.shape[0] != x.shape[0] or x.shape[0] == 0):
        return moe_experts_ref(x, weights, indices, experts, swiglu_limit, act_quant)
    lib = load()
    xf = x.to(torch.float32).contiguous()
    wf = weights.to(torch.float32).contiguous()
    ids = indices.to(torch.int64).contiguous()
    round_bf16 = x.dtype == torch.bfloat16
    n = x.shape[0]
    if n <= MOE_TOKEN_CHUNK:
        return lib.fp4_moe(xf, wf, ids, experts, swiglu_limit, act_quant, round_bf16, threads())
    return torch.cat([lib.fp4_moe(xf[i:i + MOE_TOKEN_CHUNK], wf[i:i + MOE_TOKEN_CHUNK], ids[i:i + MOE_TOKEN_CHUNK],
                                  experts, swiglu_limit, act_quant, round_bf16, threads())
                      for i in range(0, n, MOE_TOKEN_CHUNK)])


#: queries per native indexer call: bounds its score scratch (queries x entries floats) to ~64 MB
INDEXER_SCORE_BYTES = 1 << 26


def _rows_ok(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dim() == 3 and t.stride(-1) == 1 and not t.requires_grad


def indexer_topk(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor, topk: int,
                 block_entries: int = 8192, max_chunk_bytes: int = 1 << 26) -> torch.Tensor:
    """`ref.indexer_topk` natively: scores computed tile by tile from the stored keys (float, bf16 or
    compact FP4, decoded in registers) and the top-k kept in a bounded heap per query, with the same
    tie rule (earlier entry wins). Queries go in chunks whose score rows fit `INDEXER_SCORE_BYTES`."""
    b, s, h, d = q.shape
    n = keys.shape[1]
    top = min(topk, n)
    compact = keys.dtype == torch.uint8
    row = index_row_bytes(d) if compact else d
    if (not _native_input(q) or not _rows_ok(keys) or top == 0 or (keys.dtype not in _FLOAT_DTYPES and not compact)
            or keys.shape[-1] != row or (compact and not compact_index_supported(d))
            or weights.shape != (b, s, h) or visible.shape != (s,)):
        return ref.indexer_topk(q, weights, keys, visible, topk, block_entries, max_chunk_bytes)
    lib = load()
    qf = q.to(torch.float32).contiguous()
    wf = weights.to(torch.float32).contiguous()
    seen = visible.to(torch.int64).contiguous()
    step = max(1, INDEXER_SCORE_BYTES // max(1, 4 * b * n))
    parts = [lib.indexer_topk(qf[:, s0:s0 + step].contiguous(), wf[:, s0:s0 + step].contiguous(), keys,
                              seen[s0:s0 + step].contiguous(), top, threads()) for s0 in range(0, s, step)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def cached_attn(q: torch.Tensor, local_kv: torch.Tensor, local_idx: torch.Tensor, pool: torch.Tensor | None,
                pool_idx: torch.Tensor | None, attn_sink: torch.Tensor, softmax_scale: float, rope_dim: int,
                max_chunk_bytes: int = 1 << 28) -> torch.Tensor:
    """`ref.cached_attn` natively: per (query, group of heads) an online softmax over tiles of the listed
    rows, each decoded from where it lies (window rows, dense or compact pool rows) into float32 scratch."""
    b, s, h, d = q.shape
    has_pool = pool is not None and pool_idx is not None and pool_idx.shape[-1] > 0
    ok = (_native_input(q) and q.dim() == 4 and attn_sink.numel() == h and _rows_ok(local_kv)
          and local_kv.dtype == q.dtype and local_kv.shape[-1] == d
          and local_idx.dim() == 3 and local_idx.shape[1:2] == (s,) and local_idx.shape[0] in (1, b)
          and local_idx.dtype == torch.int64 and local_idx.stride(-1) == 1)
    if ok and has_pool:
        compact = pool.dtype == torch.uint8
        ok = (_rows_ok(pool) and (pool.dtype == q.dtype or compact) and pool_idx.dtype == torch.int64
              and pool_idx.dim() == 3 and pool_idx.shape[:2] in ((b, s), (1, s)) and pool_idx.stride(-1) == 1
              and (pool.shape[-1] == (kv_row_bytes(d, rope_dim) if compact else d))
              and (not compact or compact_kv_supported(d, rope_dim)))
    if not ok:
        return ref.cached_attn(q, local_kv, local_idx, pool, pool_idx, attn_sink, softmax_scale, rope_dim,
                               max_chunk_bytes)
    return load().cached_attn(q.contiguous(), local_kv, local_idx, pool if has_pool else None,
                              pool_idx if has_pool else None, attn_sink.float().contiguous(), softmax_scale,
                              rope_dim, threads())


def implementations() -> dict[str, Callable]:
    """The ops the native kernels provide (op name -> function), for `kernels.install`; none when they
    are not available."""
    if not available():
        return {}
    return {"linear": linear, "grouped_linear": grouped_linear, "swiglu_expert": swiglu_expert,
            "moe_experts": moe_experts, "indexer_topk": indexer_topk, "cached_attn": cached_attn,
            "hc_split_sinkhorn": hc_split_sinkhorn, "kv_fp8_quant": kv_fp8_quant,
            "indexer_fp4_quant": indexer_fp4_quant, "rope": rope}
