"""Native CPU kernels for FP4 (e2m1) expert weights: `linear` and a fused routed-MoE call.

Decode reads every selected expert's packed FP4 weights once per token, so CPU decode speed
is memory-bandwidth bound; `csrc/fp4_cpu.cpp` decodes nibbles in registers (never a dequantized
matrix) and runs all selected experts of a layer in one OpenMP call. The library is compiled
with the system g++ on first use (`-O3 -march=native -fopenmp`) into
`$XDG_CACHE_HOME/dsv4/kernels/<hash>.so` and loaded with ctypes: no build step at install
time and no dependency on torch's C++ ABI. Each function keeps the signature of its
reference twin and falls back to it for whatever it does not cover (non-FP4 weights, non-CPU
tensors, other dtypes). `DSV4_KERNELS=ref` disables the native code; `DSV4_CXX` picks the
compiler.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from dsv4cli.errors import DsvError
from dsv4cli.kernels import ref
from dsv4cli.kernels.experts import ExpertTable, fp4_operands_ok

SOURCE = Path(__file__).with_name("csrc") / "fp4_cpu.cpp"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
ENV_KERNELS = "DSV4_KERNELS"
ENV_CXX = "DSV4_CXX"
DEFAULT_CXX = "g++"
#: tokens per native MoE call: bounds its scratch (per (token, slot): dim * 4 + moe_inter_dim * 6 bytes)
MOE_TOKEN_CHUNK = 256

_FLOAT_DTYPES = (torch.float32, torch.bfloat16)
_SCALE_DTYPES = (torch.float8_e8m0fnu, torch.uint8)

_i64, _f32, _int, _ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_void_p


class KernelBuildError(DsvError):
    """The native CPU kernels could not be compiled or loaded."""


# =========================================================================== building


def cache_dir() -> Path:
    """`$XDG_CACHE_HOME/dsv4/kernels` (XDG default `~/.cache`)."""
    base = os.environ.get("XDG_CACHE_HOME")
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".cache"
    return root / "dsv4" / "kernels"


def _compiler(cxx: str | None) -> tuple[str, str]:
    """(path, version text) of the compiler, or KernelBuildError."""
    name = cxx or os.environ.get(ENV_CXX) or DEFAULT_CXX
    path = shutil.which(name)
    if path is None:
        raise KernelBuildError(f"no C++ compiler found ({name!r} is not on PATH or not executable)",
                               f"install g++, set {ENV_CXX} to a C++17 compiler, or set {ENV_KERNELS}=ref")
    try:
        proc = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60, check=False)
    except OSError as exc:
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


def build(cxx: str | None = None, extra_flags: Sequence[str] = (), out_dir: Path | None = None) -> Path:
    """Compile `csrc/fp4_cpu.cpp` (or reuse the cached build) and return the `.so` path.

    The file name hashes the source, compiler (path + version), flags and CPU, so any change
    rebuilds. The compiler writes a temporary file that is renamed into place: concurrent
    processes never load a half-written library.
    """
    path, version = _compiler(cxx)
    flags = (*FLAGS, *extra_flags)
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, path.encode(), version.encode(), " ".join(flags).encode(),
                                     _cpu_id().encode()])).hexdigest()[:24]
    out_dir = out_dir or cache_dir()
    target = out_dir / f"fp4_cpu-{key}.so"
    if target.exists():
        return target
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".fp4_cpu-", suffix=".so.tmp", dir=out_dir)
        os.close(fd)
    except OSError as exc:
        raise KernelBuildError(f"cannot write the kernel cache {out_dir}: {exc}",
                               f"make it writable, set XDG_CACHE_HOME, or set {ENV_KERNELS}=ref") from exc
    try:
        proc = subprocess.run([path, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True,
                              timeout=600, check=False)
        if proc.returncode != 0:
            raise KernelBuildError(f"building the FP4 CPU kernels with {path} failed: "
                                   f"{_first_line(proc.stderr or proc.stdout)}",
                                   f"needs a C++17 compiler with OpenMP (g++ >= 9); or set {ENV_KERNELS}=ref")
        os.replace(tmp, target)
    except (OSError, subprocess.SubprocessError) as exc:
        raise KernelBuildError(f"building the FP4 CPU kernels with {path} failed: {exc}",
                               f"check the compiler, or set {ENV_KERNELS}=ref") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


class NativeKernels:
    """The loaded library with typed entry points (one per build variant)."""

    def __init__(self, path: Path):
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as exc:
            raise KernelBuildError(f"cannot load the FP4 CPU kernels {path}: {exc}",
                                   f"delete {path.parent} to rebuild, or set {ENV_KERNELS}=ref") from exc
        self.path = path
        self.lib = lib
        lib.dsv4_fp4_isa.restype = ctypes.c_char_p
        lib.dsv4_fp4_isa.argtypes = []
        lib.dsv4_max_threads.restype = _int
        lib.dsv4_fake_quant_fp8.restype = None
        lib.dsv4_fake_quant_fp8.argtypes = [_ptr, _i64, _i64, _i64, _ptr]
        lib.dsv4_fp4_linear.restype = _int
        lib.dsv4_fp4_linear.argtypes = [_ptr, _i64, _i64, _ptr, _ptr, _i64, _ptr, _int, _int]
        lib.dsv4_fp4_moe.restype = _int
        lib.dsv4_fp4_moe.argtypes = [_ptr, _i64, _i64, _i64, _ptr, _ptr, _i64, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr,
                                     _i64, _f32, _int, _int, _ptr, _int]
        self.isa: str = lib.dsv4_fp4_isa().decode()

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

    def fp4_moe(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, table: ExpertTable,
                swiglu_limit: float, act_quant: bool, round_bf16: bool, threads: int) -> torch.Tensor:
        """float32 x [N, D], weights [N, k] float32, indices [N, k] int64 -> float32 [N, D]."""
        n, d = x.shape
        out = torch.empty(n, d, dtype=torch.float32)
        p = table.pointers
        rc = self.lib.dsv4_fp4_moe(x.data_ptr(), n, d, table.inter_dim, indices.data_ptr(), weights.data_ptr(),
                                   indices.shape[1], *(t.data_ptr() for t in p), table.num_experts,
                                   float(swiglu_limit), int(act_quant), int(round_bf16), out.data_ptr(), threads)
        _check(rc, "fp4 moe")
        return out


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


def load(cxx: str | None = None, extra_flags: Sequence[str] = ()) -> NativeKernels:
    """Build (once per compiler/flags) and load the kernels; raises KernelBuildError.

    A failed build is remembered for the process, so it is reported, not retried, on every call.
    """
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


def linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None,
           act_quant: bool = False) -> torch.Tensor:
    """`ref.linear` with the native kernel for FP4 weights on CPU; the reference for the rest."""
    if (not enabled() or x.device.type != "cpu" or x.dtype not in _FLOAT_DTYPES or x.requires_grad
            or x.numel() == 0 or not fp4_operands_ok(weight, scale, x.shape[-1])):
        return ref.linear(x, weight, scale, act_quant)
    k = x.shape[-1]
    x2 = x.reshape(-1, k).to(torch.float32).contiguous()
    y = load().fp4_linear(x2, weight.contiguous(), scale.contiguous().view(torch.uint8), act_quant, threads())
    return y.view(*x.shape[:-1], weight.shape[0]).to(x.dtype)


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


def register() -> bool:
    """Route `kernels.linear` and `kernels.moe_experts` to the native kernels if they are available;
    returns whether they are."""
    from dsv4cli import kernels

    if not available():
        return False
    kernels.use("linear", linear)
    kernels.use("moe_experts", moe_experts)
    return True
