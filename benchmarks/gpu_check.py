"""One prepared GPU check of dsv4's GPU half, sized for one call of a lent H100/H200 (docs/gpu-check.md).

    python benchmarks/gpu_check.py --out DIR [--dry-run] [--only STEP,...] [--budget-s N]

Steps run in order, each in its own child process with its own time limit, so that a failing or hanging
step loses nothing but itself: the environment header, the missing Python packages installed from carried
wheels, host<->device copy bandwidth, `pytest -m gpu`, Triton kernel parity against the reference twins at
Flash and Pro shapes, `benchmarks/bench_triton.py` at Flash and Pro shapes, and `dsv4 bench` on a synthetic
Flash slice all on the GPU, hybrid (some experts resident, the rest decoded on the CPU) and prefill through
staging slots. After every step DIR/summary.json, DIR/report.md and DIR/gpu_check.log are rewritten, so a
run cut short still reports what it measured; the summary names the failed steps and the command that
reruns only them.

`--dry-run` runs every step's plumbing on the CPU (CUDA hidden): the same children, subprocesses, parsing
and summary, with tiny shapes, the Triton interpreter, `--device cpu` and `dsv4 plan --simulate`.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import email.parser
import io
import json
import math
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve()
SCHEMA = "dsv4-gpu-check/1"
DEFAULT_BUDGET_S = 480
DEFAULT_WORK = Path(tempfile.gettempdir()) / "dsv4-gpu-check"
DEFAULT_WHEELS = REPO / "build" / "gpu-wheels"
MIN_START_S = 10  # a step is not started with less time left than this
LOG_TAIL_LINES = 40
LOG_TAIL_CHARS = 4000
STEP_LOG_CHARS = 400_000  # per step in gpu_check.log
OUT_FILES = ("summary.json", "report.md", "gpu_check.log")
OK = "ok"
FAILED = "failed"
TIMEOUT = "timeout"
NO_CUDA = "skipped: no CUDA"
OUT_OF_TIME = "skipped: out of time"
#: never carried as wheels: the device's own torch stack
EXCLUDED_PREFIXES = ("torch", "triton", "nvidia-")
#: of the test extra, what `pytest -m gpu` needs (no transformers, tokenizer oracles or pexpect)
GPU_TEST_REQUIREMENTS = ("pytest", "pytest-timeout")
#: the Python and platforms `make gpu-wheels` downloads for (KINDS.md: the H200 image runs Python 3.12)
DEVICE_PYTHON = "3.12"
DEVICE_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                    "manylinux2014_x86_64", "manylinux1_x86_64")
CARRY_LIMIT_BYTES = 64 << 20


@dataclass(frozen=True)
class Step:
    name: str
    title: str
    budget_s: int
    needs: tuple[str, ...] = ()
    background: bool = False  # runs alongside the following steps until a step that needs it starts


STEPS = (
    Step("env", "environment: nvidia-smi, torch/CUDA/Triton versions, memory, CPUs", 30),
    Step("deps", "missing Python packages installed from the carried wheels", 90),
    Step("h2d_copy", "host<->device copy bandwidth, pinned against pageable", 45),
    Step("synth", "synthetic Flash slice checkpoint (written in the background)", 240, background=True),
    Step("pytest_gpu", "pytest -m gpu (the GPU-only tests)", 150),
    Step("triton_parity", "Triton kernels against their reference twins at Flash and Pro shapes", 90),
    Step("triton_flash", "benchmarks/bench_triton.py at Flash shapes, against HBM copy bandwidth", 120),
    Step("bench_gpu", "dsv4 bench, Flash slice, everything on the GPU", 120, needs=("synth",)),
    Step("bench_hybrid", "dsv4 bench, hybrid: half the experts resident, the rest decoded on the CPU", 120,
         needs=("synth",)),
    Step("bench_prefill", "dsv4 bench, no resident experts: prefill through 8 staging slots", 100,
         needs=("synth",)),
    Step("triton_pro", "benchmarks/bench_triton.py --quick at Pro shapes", 100),
)
STEP_BY_NAME = {s.name: s for s in STEPS}
SETUP = ("env", "deps")  # run before any selection: the header, and the packages every later step imports

#: the synthetic model: real Flash dimensions (vocabulary, heads, 2048-wide FP4 experts), few layers and experts
SLICE = {"preset": "flash-slice", "layers": 4, "experts": 8}
DRY_SLICE = {"preset": "tiny", "layers": None, "experts": None}


@dataclass(frozen=True)
class BenchSetup:
    """One `dsv4 bench` arm: test sizes, and the plan (resident experts, staging slots) if any."""

    prompt: int
    gen: int
    depths: tuple[int, ...]
    repetitions: int
    resident_fraction: float | None = None  # None: no plan, `--device` alone (everything on it)
    slots: int = 0

    def context(self) -> int:
        """The cache size `dsv4 bench` needs (its `required_context`)."""
        return max(self.depths) + max(self.prompt + 1, self.gen + 2)


BENCH_SETUPS = {
    "bench_gpu": BenchSetup(512, 16, (0, 2048), 2),
    "bench_hybrid": BenchSetup(128, 16, (0,), 2, resident_fraction=0.5, slots=32),
    "bench_prefill": BenchSetup(512, 2, (0,), 2, resident_fraction=0.0, slots=8),
}
DRY_BENCH_SETUPS = {
    "bench_gpu": BenchSetup(32, 4, (0, 32), 1),
    "bench_hybrid": BenchSetup(16, 4, (0,), 1, resident_fraction=0.5, slots=32),
    "bench_prefill": BenchSetup(32, 2, (0,), 1, resident_fraction=0.0, slots=8),
}


# ======================================================================= what a step reports


@dataclass
class Result:
    """What a step's child hands back: status, one headline, scalar numbers, tables for the report, raw data."""

    status: str = OK
    headline: str = ""
    note: str = ""
    numbers: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0  # the child's own run time (set by child_main)


class StepError(Exception):
    """A step's measurement could not be made; the message is the note in the summary."""


@dataclass(frozen=True)
class Ctx:
    """What a step's child knows: where to work, where the wheels are, dry or real."""

    work: Path
    wheels: Path
    dry_run: bool
    requires: tuple[str, ...] = ()

    @property
    def site(self) -> Path:
        return site_dir(self.work)

    def results(self, name: str) -> Path:
        return self.work / "results" / f"{name}.json"


def site_dir(work: Path) -> Path:
    """Where the deps step installs the missing packages (on every child's PYTHONPATH)."""
    return work / "site"


def echo(*parts: Any) -> None:
    print(*parts, flush=True)


def run_logged(cmd: list[str]) -> subprocess.CompletedProcess:
    """Run `cmd` from the repository root, its output streamed into this step's log and returned."""
    echo("$", shlex.join(cmd))
    with subprocess.Popen(cmd, cwd=REPO, text=True, errors="replace", stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT) as proc:
        lines = []
        for line in proc.stdout:
            print(line, end="", flush=True)
            lines.append(line)
    return subprocess.CompletedProcess(cmd, proc.returncode, "".join(lines))


def cuda_ready() -> bool:
    import torch

    return torch.cuda.is_available()


def no_cuda() -> Result:
    """A GPU step in a real run on a machine where torch sees no GPU: nothing to measure."""
    return Result(status=NO_CUDA, note="torch sees no CUDA device")


def fmt(value: Any) -> str:
    """A number or value for the report: 4 significant digits, lists comma-joined, None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    if isinstance(value, list | tuple):
        return ", ".join(fmt(v) for v in value) or "-"
    return str(value)


# ======================================================================= step: env


def nvidia_smi() -> tuple[list[dict[str, str]], str]:
    """(one row per GPU from `nvidia-smi --query-gpu`, a note when it is missing or fails)."""
    fields = ("name,driver_version,memory.total,memory.used,pcie.link.gen.current,pcie.link.width.current,"
              "clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu")
    try:
        proc = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv"], capture_output=True,
                              text=True, timeout=20)
    except FileNotFoundError:
        return [], "nvidia-smi: not found"
    except subprocess.TimeoutExpired:
        return [], "nvidia-smi: no answer in 20 s"
    if proc.returncode:
        return [], f"nvidia-smi: exit {proc.returncode}: {(proc.stdout + proc.stderr).strip()[:300]}"
    rows = list(csv.DictReader(io.StringIO(proc.stdout), skipinitialspace=True))
    return [{k.strip(): v.strip() for k, v in row.items()} for row in rows], ""


def first_line(cmd: list[str]) -> str | None:
    """The first output line of `cmd`, or None when it is missing or fails."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = (proc.stdout or proc.stderr).splitlines()
    return lines[0].strip() if proc.returncode == 0 and lines else None


def gpu_numbers() -> dict[str, Any]:
    """Name, capability, multiprocessors and memory of GPU 0 as torch sees it (empty without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return {}
    props = torch.cuda.get_device_properties(0)
    free, total = torch.cuda.mem_get_info(0)
    return {"gpu": props.name, "capability": f"{props.major}.{props.minor}", "sm_count": props.multi_processor_count,
            "gpu_total_gib": total / 2**30, "gpu_free_gib": free / 2**30, "gpu_count": torch.cuda.device_count()}


def step_env(ctx: Ctx) -> Result:
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    from dsv4cli import __version__

    smi_rows, smi_note = nvidia_smi()
    numbers = {
        "python": platform.python_version(), "executable": sys.executable, "machine": platform.machine(),
        "torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "triton": triton_version, "dsv4": __version__, "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
        "gxx": first_line(["g++", "--version"]), "nvidia_smi": smi_note or "ok",
        "driver": smi_rows[0].get("driver_version") if smi_rows else None, **gpu_numbers(),
    }
    gpu = numbers.get("gpu") or "no CUDA GPU"
    headline = (f"{gpu} · torch {numbers['torch']} (CUDA {numbers['torch_cuda']}) · Triton {triton_version} · "
                f"Python {numbers['python']} · {numbers['usable_cpus']} CPUs")
    result = Result(headline=headline, numbers=numbers, tables={"nvidia-smi": smi_rows} if smi_rows else {})
    if not numbers["cuda_available"] and not ctx.dry_run:
        result.status, result.note = FAILED, "torch sees no CUDA device (use --dry-run on a machine without a GPU)"
    return result


# ======================================================================= step: deps (and `make gpu-wheels`)


def packaging_modules():
    """(Requirement, sys_tags, parse_wheel_filename, canonicalize_name) from packaging, or pip's copy of it."""
    try:
        from packaging.requirements import Requirement
        from packaging.tags import sys_tags
        from packaging.utils import canonicalize_name, parse_wheel_filename
    except ImportError:
        from pip._vendor.packaging.requirements import Requirement
        from pip._vendor.packaging.tags import sys_tags
        from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename
    return Requirement, sys_tags, parse_wheel_filename, canonicalize_name


def excluded(name: str) -> bool:
    """torch, triton and the nvidia-* libraries: the device's own, never carried."""
    name = name.lower().replace("_", "-")
    return any(name == p or (p.endswith("-") and name.startswith(p)) for p in EXCLUDED_PREFIXES)


def project_requirements(extra: Iterable[str] = ()) -> list[str]:
    """The requirements dsv4 and `pytest -m gpu` need on the device: pyproject's dependencies and the GPU tests'
    part of the test extra, without torch/triton/nvidia-*, plus `extra`."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: pip's copy of tomli
        from pip._vendor import tomli as tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    Requirement = packaging_modules()[0]
    wanted = list(project["dependencies"])
    wanted += [r for r in project["optional-dependencies"]["test"] if Requirement(r).name in GPU_TEST_REQUIREMENTS]
    return [r for r in wanted if not excluded(Requirement(r).name)] + list(extra)


def installed_version(name: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def satisfied(requirement: str, versions: dict[str, str] | None = None) -> bool:
    """Whether `requirement` holds here (or in `versions`, name -> version, for packages chosen to install)."""
    Requirement, *_, canonicalize_name = packaging_modules()
    req = Requirement(requirement)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        return True
    version = (versions or {}).get(canonicalize_name(req.name)) or installed_version(req.name)
    return version is not None and req.specifier.contains(version, prereleases=True)


def pick_wheel(requirement: str, wheels: Path) -> tuple[str, str, Path] | None:
    """(name, version, file) of the newest wheel in `wheels` that satisfies `requirement` and installs here."""
    Requirement, sys_tags, parse_wheel_filename, canonicalize_name = packaging_modules()
    req, here = Requirement(requirement), set(sys_tags())
    best = None
    for path in sorted(wheels.glob("*.whl")):
        try:
            name, version, _build, tags = parse_wheel_filename(path.name)
        except ValueError:
            continue
        if name != canonicalize_name(req.name) or not req.specifier.contains(version, prereleases=True):
            continue
        if here.isdisjoint(tags):
            continue
        if best is None or version > best[1]:
            best = (name, version, path)
    return None if best is None else (best[0], str(best[1]), best[2])


def wheel_requires(path: Path) -> list[str]:
    """The Requires-Dist lines of a wheel's METADATA."""
    with zipfile.ZipFile(path) as archive:
        meta = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        text = archive.read(meta).decode("utf-8", errors="replace")
    return email.parser.Parser().parsestr(text, headersonly=True).get_all("Requires-Dist") or []


def install_plan(missing: list[str], wheels: Path) -> dict[str, tuple[str, Path]]:
    """name -> (version, wheel) for `missing` and whatever their wheels need that is not here."""
    chosen: dict[str, tuple[str, Path]] = {}
    todo = list(missing)
    while todo:
        requirement = todo.pop(0)
        if satisfied(requirement, {n: v for n, (v, _) in chosen.items()}):
            continue
        picked = pick_wheel(requirement, wheels)
        if picked is None:
            raise StepError(f"no wheel for {requirement!r} in {wheels} that installs on Python "
                            f"{platform.python_version()} ({platform.machine()}): run `make gpu-wheels "
                            f"GPU_PYTHON={sys.version_info[0]}.{sys.version_info[1]}` and carry the folder")
        name, version, path = picked
        chosen[name] = (version, path)
        todo += wheel_requires(path)
    return chosen


CHECK_CODE = """\
import json, sys
sys.path.insert(0, sys.argv[1])
import benchmarks.gpu_check as g
print(json.dumps([r for r in sys.argv[2:] if not g.satisfied(r)]))
import dsv4cli.bench.run, dsv4cli.cli.app
"""


def fresh_check(requirements: list[str]) -> list[str]:
    """In a new interpreter (which sees the installed packages): the unsatisfied requirements; raises StepError
    if dsv4's CLI and bench modules do not import."""
    proc = subprocess.run([sys.executable, "-c", CHECK_CODE, str(REPO), *requirements], capture_output=True,
                          text=True, cwd=REPO)
    if proc.returncode:
        echo(proc.stdout, proc.stderr)
        raise StepError(f"dsv4 does not import after the install: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.splitlines()[0])


def step_deps(ctx: Ctx) -> Result:
    requirements = project_requirements(ctx.requires)
    missing = [r for r in requirements if not satisfied(r)]
    echo("required:", ", ".join(requirements))
    echo("missing here:", ", ".join(missing) or "none")
    chosen = install_plan(missing, ctx.wheels) if missing else {}
    if chosen:
        ctx.site.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--disable-pip-version-check", "--upgrade", "--target", str(ctx.site),
               *(str(path) for _, path in chosen.values())]
        if run_logged(cmd).returncode:
            raise StepError("pip install from the wheel folder failed (see the log)")
    still = fresh_check(requirements)
    installed = [f"{n}=={v}" for n, (v, _) in sorted(chosen.items())]
    wheel_mib = sum(p.stat().st_size for p in ctx.wheels.glob("*.whl")) / 2**20 if ctx.wheels.is_dir() else None
    numbers = {"required": len(requirements), "missing": missing, "installed": installed,
               "unsatisfied_after": still, "site": str(ctx.site), "wheels": str(ctx.wheels),
               "wheel_folder_mib": wheel_mib}
    result = Result(numbers=numbers, headline=f"{len(requirements)} requirements; installed: "
                                              f"{', '.join(installed) or 'nothing (all present)'}")
    if still:
        result.status, result.note = FAILED, f"still unsatisfied after the install: {', '.join(still)}"
    return result


def check_wheels(folder: Path, python: str) -> int:
    """`make gpu-wheels`: drop excluded wheels, check the folder resolves for the device's Python and fits the
    carry limit; prints the set and its size. Returns an exit code."""
    for path in folder.glob("*.whl"):
        if excluded(path.name.split("-")[0]):
            path.unlink()
    wheels = sorted(folder.glob("*.whl"))
    total = sum(p.stat().st_size for p in wheels)
    for path in wheels:
        print(f"{path.stat().st_size / 2**20:8.2f} MiB  {path.name}")
    print(f"{total / 2**20:8.2f} MiB  total in {len(wheels)} wheels (carry limit with the tree: 64 MiB)")
    with tempfile.TemporaryDirectory() as target:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--no-index", "--find-links", str(folder),
               "--only-binary=:all:", "--python-version", python, "--implementation", "cp",
               *(f"--platform={p}" for p in DEVICE_PLATFORMS), "--target", target, *project_requirements()]
        if subprocess.run(cmd).returncode:
            print(f"the wheels in {folder} do not resolve for Python {python}", file=sys.stderr)
            return 1
    if total > CARRY_LIMIT_BYTES - (8 << 20):
        print(f"the wheels ({total / 2**20:.1f} MiB) leave too little of the 64 MiB carry limit", file=sys.stderr)
        return 1
    return 0


# ======================================================================= step: h2d_copy


def time_copies(fn: Callable[[], Any], reps: int, cuda: bool) -> float:
    """Median seconds of `fn` after 2 warm-ups (CUDA events on the GPU, the wall clock on the CPU)."""
    import torch

    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def expert_bytes() -> int:
    """Bytes of one routed Flash expert (what a staging slot receives per copy)."""
    from dsv4cli.model.presets import FLASH
    from dsv4cli.runtime.placement import model_bytes

    return model_bytes(FLASH)[1]


def copy_cases(n: int, cuda: bool) -> list[tuple[str, int, int, Callable[[], Any]]]:
    """(what, bytes per copy, bytes counted, copy) for each direction and host-memory kind."""
    import torch

    device = "cuda" if cuda else "cpu"
    pageable = torch.ones(n, dtype=torch.uint8)
    pinned = torch.ones(n, dtype=torch.uint8, pin_memory=cuda)
    dev, dev2 = torch.ones(n, dtype=torch.uint8, device=device), torch.empty(n, dtype=torch.uint8, device=device)
    e = min(expert_bytes(), n)
    return [
        ("h2d pageable", n, n, lambda: dev.copy_(pageable)),
        ("h2d pinned", n, n, lambda: dev.copy_(pinned, non_blocking=True)),
        ("d2h pageable", n, n, lambda: pageable.copy_(dev)),
        ("d2h pinned", n, n, lambda: pinned.copy_(dev, non_blocking=True)),
        ("h2d pageable, one Flash expert", e, e, lambda: dev[:e].copy_(pageable[:e])),
        ("h2d pinned, one Flash expert", e, e, lambda: dev[:e].copy_(pinned[:e], non_blocking=True)),
        ("d2d (read + write)", n, 2 * n, lambda: dev2.copy_(dev)),
    ]


def step_h2d(ctx: Ctx) -> Result:
    cuda = cuda_ready()
    if not cuda and not ctx.dry_run:
        return no_cuda()
    n = (256 << 20) if cuda else (16 << 20)
    rows = []
    for what, size, counted, fn in copy_cases(n, cuda):
        seconds = time_copies(fn, 10 if cuda else 3, cuda)
        rows.append({"copy": what, "MiB": size / 2**20, "ms": seconds * 1e3, "GB/s": counted / seconds / 1e9})
        echo(f"{what:34} {size / 2**20:8.1f} MiB {seconds * 1e3:9.3f} ms {counted / seconds / 1e9:8.2f} GB/s")
    rate = {r["copy"]: r["GB/s"] for r in rows}
    numbers = {"h2d_pageable_gb_s": rate["h2d pageable"], "h2d_pinned_gb_s": rate["h2d pinned"],
               "d2h_pinned_gb_s": rate["d2h pinned"], "d2h_pageable_gb_s": rate["d2h pageable"],
               "h2d_expert_pageable_gb_s": rate["h2d pageable, one Flash expert"],
               "h2d_expert_pinned_gb_s": rate["h2d pinned, one Flash expert"],
               "d2d_gb_s": rate["d2d (read + write)"],
               "pinned_over_pageable": rate["h2d pinned"] / rate["h2d pageable"],
               "device": "cuda" if cuda else "cpu"}
    headline = (f"H2D pinned {numbers['h2d_pinned_gb_s']:.1f} GB/s, pageable {numbers['h2d_pageable_gb_s']:.1f} "
                f"GB/s (x{numbers['pinned_over_pageable']:.2f}); one expert pageable "
                f"{numbers['h2d_expert_pageable_gb_s']:.1f} GB/s; D2D {numbers['d2d_gb_s']:.0f} GB/s")
    note = "" if cuda else "dry run: host-to-host copies stand in for the device (no pinned memory without CUDA)"
    return Result(headline=headline, note=note, numbers=numbers, tables={"copies": rows})


# ======================================================================= step: pytest_gpu


def gpu_test_files() -> list[str]:
    """The test modules that hold `gpu`-marked tests."""
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                  if "pytest.mark.gpu" in p.read_text(encoding="utf-8"))


def parse_junit(path: Path) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """(counts: tests, passed, failed, errors, skipped; one row per test) from a pytest junit XML file."""
    import xml.etree.ElementTree as ET

    rows = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                message = (child.get("message") or "").partition("\n")[0][:200]
        rows.append({"test": case.get("name"), "outcome": outcome, "s": float(case.get("time") or 0),
                     "message": message})
    counts = {"tests": len(rows)}
    for outcome in ("passed", "failed", "error", "skipped"):
        counts[outcome] = sum(r["outcome"] == outcome for r in rows)
    return counts, rows


def step_pytest(ctx: Ctx) -> Result:
    junit = ctx.work / "junit-gpu.xml"
    junit.unlink(missing_ok=True)
    files = gpu_test_files()
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", f"--junitxml={junit}", *files]
    rc = run_logged(cmd).returncode
    if not junit.exists():
        raise StepError(f"pytest wrote no report (exit {rc})")
    counts, rows = parse_junit(junit)
    result = Result(numbers={**counts, "exit_code": rc, "files": files}, tables={"tests": rows},
                    headline=", ".join(f"{counts[k]} {k}" for k in ("passed", "failed", "error", "skipped")
                                       if counts[k]) or "no tests")
    if rc == 0 and counts["tests"] and counts["skipped"] == counts["tests"]:
        result.status = NO_CUDA
    elif rc or counts["failed"] or counts["error"] or counts["skipped"] or not counts["tests"]:
        result.status = FAILED
        result.note = "; ".join(f"{r['test']}: {r['outcome']} {r['message']}" for r in rows
                                if r["outcome"] != "passed")[:600] or f"pytest exit {rc}"
    return result


# ======================================================================= steps: triton_flash, triton_pro


def tokens_of(shape: str) -> int | None:
    """The T=... or B=... count in a bench_triton shape string."""
    match = re.match(r"[TB]=(\d+)", shape)
    return int(match[1]) if match else None


def triton_numbers(report: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Key numbers and table rows from bench_triton.py's JSON."""
    copy = report["copy_gbps"]
    rows = [{"kernel": r["name"], "shape": r["shape"], "ms": r["ms"], "GB/s": r["gbps"],
             "% of copy": None if r["gbps"] is None else 100 * r["gbps"] / copy, "TFLOP/s": r["tflops"]}
            for r in report["rows"]]

    def best(kernel: str, key: str, tokens: Callable[[int], bool]) -> float | None:
        values = [r[key] for r in rows if r["kernel"] == kernel and r[key] is not None
                  and tokens(tokens_of(r["shape"]) or 0)]
        return max(values, default=None)

    numbers = {"device": report["device"], "model": report["model"], "copy_gb_s": copy,
               "moe_decode_t1_pct_copy": best("moe w1+w3+w2", "% of copy", lambda t: t == 1),
               "fp4_grouped_decode_t1_pct_copy": best("fp4 grouped w1", "% of copy", lambda t: t == 1),
               "fp8_decode_t1_best_pct_copy": best("fp8 linear", "% of copy", lambda t: t == 1),
               "fp4_prefill_best_tflops": best("moe w1+w3+w2", "TFLOP/s", lambda t: t >= 1024),
               "fp8_prefill_best_tflops": best("fp8 linear", "TFLOP/s", lambda t: t >= 1024),
               "bf16_matmul_best_tflops": best("bf16 matmul (same rows)", "TFLOP/s", lambda t: True),
               "attn_decode_b1_gb_s": best("sparse attn decode", "GB/s", lambda t: t == 1)}
    return numbers, rows


def triton_headline(n: dict[str, Any]) -> str:
    return (f"copy {fmt(n['copy_gb_s'])} GB/s; MoE decode T=1 {fmt(n['moe_decode_t1_pct_copy'])}% of copy; "
            f"FP8 T=1 {fmt(n['fp8_decode_t1_best_pct_copy'])}%; FP4 prefill {fmt(n['fp4_prefill_best_tflops'])} "
            f"TFLOP/s (bf16 matmul {fmt(n['bf16_matmul_best_tflops'])})")


def bench_triton(ctx: Ctx, model: str, quick: bool) -> Result:
    out = ctx.work / f"triton-{model}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_triton.py"), "--model", model, "--json", str(out)]
    proc = run_logged(cmd + (["--quick"] if quick else []))
    if not cuda_ready():
        if proc.returncode and "no CUDA GPU" in proc.stdout:
            return Result(status=NO_CUDA, note="bench_triton.py started and stopped at its no-GPU check")
        raise StepError(f"bench_triton.py without CUDA: expected its no-GPU message, got exit {proc.returncode}")
    if proc.returncode or not out.exists():
        raise StepError(f"bench_triton.py exited with {proc.returncode}")
    report = json.loads(out.read_text())
    numbers, rows = triton_numbers(report)
    return Result(headline=triton_headline(numbers), numbers=numbers, tables={f"{model} kernels": rows},
                  data={"bench_triton": report})


def step_triton_flash(ctx: Ctx) -> Result:
    return bench_triton(ctx, "flash", quick=False)


def step_triton_pro(ctx: Ctx) -> Result:
    return bench_triton(ctx, "pro", quick=True)


# ======================================================================= step: triton_parity


@dataclass(frozen=True)
class ParityShapes:
    tokens: tuple[int, ...]  # activation rows
    queries: tuple[int, ...]  # attention query positions
    experts: int
    kv_len: int
    hc_rows: int


REAL_PARITY = ParityShapes((1, 256), (1, 4), 8, 4096, 1024)  # the model dimensions come from its preset
PARITY_SHAPES = {"flash": REAL_PARITY, "pro": REAL_PARITY, "tiny": ParityShapes((1, 9), (1, 2), 4, 64, 16)}
BF16_TOL = 1e-2  # ‖triton - ref‖ / ‖ref‖, bf16 operands or outputs (METHOD.md: 1e-3 .. 1e-2)
FP32_TOL = 1e-4


def rel_err(got, want) -> float:
    """‖got - want‖ / ‖want‖ in float64; NaN if `got` has a non-finite value."""
    got, want = got.double(), want.double()
    if not bool(got.isfinite().all()):
        return float("nan")
    return float((got - want).norm() / want.norm().clamp_min(1e-300))


def bit_mismatches(got, want) -> int:
    """Elements whose bit patterns differ (-0.0 != 0.0, NaNs compare)."""
    import torch

    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32}
    a, b = got.contiguous(), want.contiguous()
    if a.shape != b.shape:
        return max(a.numel(), b.numel())
    return int((a.view(view[a.element_size()]) != b.view(view[b.element_size()])).sum())


def case(kernel: str, shape: str, metric: str, value: float, tol: float) -> dict[str, Any]:
    ok = math.isfinite(value) and value <= tol
    echo(f"{kernel:28} {shape:44} {metric:10} {value:.3e} (tol {tol:g}) {'ok' if ok else 'FAIL'}")
    return {"kernel": kernel, "shape": shape, "metric": metric, "value": value, "tol": tol, "ok": ok}


def parity_quant(args, sh: ParityShapes, device) -> list[dict[str, Any]]:
    import torch

    from dsv4cli.formats import official as formats
    from dsv4cli.kernels import ref
    from dsv4cli.kernels import triton_quant as tq

    t = max(sh.tokens)
    x = (torch.randn(t, args.dim, device=device) * torch.logspace(-3, 3, t, device=device)[:, None]).bfloat16()
    q, s = tq.act_quant_fp8(x, 128)
    q_ref, s_ref = tq.act_quant_fp8_ref(x, 128)
    kv = torch.randn(1, t, args.head_dim, device=device).bfloat16()
    return [case("act_quant_fp8", f"[{t}x{args.dim}] block 128", "bits off", bit_mismatches(q, q_ref)
                 + bit_mismatches(s, s_ref), 0),
            case("fake_quant_fp4", f"[{t}x{args.dim}] block 32", "bits off",
                 bit_mismatches(tq.fake_quant_fp4(x, 32), formats.fake_quant_fp4(x, 32)), 0),
            case("kv_fp8_quant", f"[1x{t}x{args.head_dim}] rope {args.rope_head_dim}", "bits off",
                 bit_mismatches(tq.kv_fp8_quant(kv, args.rope_head_dim), ref.kv_fp8_quant(kv, args.rope_head_dim)), 0)]


def parity_fp8(args, sh: ParityShapes, device) -> list[dict[str, Any]]:
    import torch

    from dsv4cli.formats import official as formats
    from dsv4cli.kernels import ref
    from dsv4cli.kernels import triton_gemm as tg

    cases = []
    for label, out_f, in_f in (("wq_a", args.q_lora_rank, args.dim), ("wq_b", args.n_heads * args.head_dim,
                                                                       args.q_lora_rank)):
        wq, ws = formats.quantize_fp8_blocks(torch.randn(out_f, in_f, device=device) * in_f**-0.5)
        for t in sh.tokens:
            x = torch.randn(t, in_f, device=device).bfloat16()
            cases.append(case(f"fp8_linear {label}", f"T={t} [{out_f}x{in_f}]", "rel err",
                              rel_err(tg.fp8_linear(x, wq, ws, True), ref.linear(x, wq, ws, True)), BF16_TOL))
    return cases


def parity_moe(args, sh: ParityShapes, device) -> list[dict[str, Any]]:
    import torch

    from dsv4cli.formats import official as formats
    from dsv4cli.kernels import triton_gemm as tg

    def experts(out_f: int, in_f: int) -> list:
        return [formats.quantize_fp4_rows(torch.randn(out_f, in_f, device=device) * in_f**-0.5)
                for _ in range(sh.experts)]

    def stacked(pairs: list):
        return tg.ExpertWeights.from_stacked(torch.stack([w for w, _ in pairs]), torch.stack([s for _, s in pairs]))

    w1, w3 = experts(args.moe_inter_dim, args.dim), experts(args.moe_inter_dim, args.dim)
    w2 = experts(args.dim, args.moe_inter_dim)
    top_k = min(args.n_activated_experts, sh.experts)
    cases = []
    for t in sh.tokens:
        x = torch.randn(t, args.dim, device=device).bfloat16()
        indices = torch.stack([torch.randperm(sh.experts, device=device)[:top_k] for _ in range(t)])
        weights = torch.rand(t, top_k, device=device)
        got = tg.moe_experts_triton(x, weights, indices, stacked(w1), stacked(w2), stacked(w3), args.swiglu_limit, True)
        want = tg.moe_experts_ref(x, weights, indices, w1, w2, w3, args.swiglu_limit, True)
        cases.append(case("moe_experts (fp4)", f"T={t} k={top_k} E={sh.experts} [{args.moe_inter_dim}x{args.dim}]",
                          "rel err", rel_err(got, want), BF16_TOL))
    return cases


def parity_attn(args, sh: ParityShapes, device) -> list[dict[str, Any]]:
    import torch

    from dsv4cli.kernels import ref, triton_attn

    h, d, n = args.n_heads, args.head_dim, sh.kv_len
    k = min(args.window_size + args.index_topk, n)
    cases = []
    for s in sh.queries:
        q = torch.randn(1, s, h, d, device=device).bfloat16()
        kv = torch.randn(1, n, d, device=device).bfloat16()
        sink = torch.randn(h, device=device)
        idx = torch.rand(1, s, n, device=device).argsort(-1)[..., :k]
        idx = idx.masked_fill(torch.rand(1, s, k, device=device) < 0.3, -1)
        got = triton_attn.sparse_attn(q, kv, sink, idx, d**-0.5)
        cases.append(case("sparse_attn", f"S={s} H={h} D={d} N={n} K={k}", "rel err",
                          rel_err(got, ref.sparse_attn(q, kv, sink, idx, d**-0.5)), BF16_TOL))
    return cases


def parity_hc(args, sh: ParityShapes, device) -> list[dict[str, Any]]:
    import torch

    from dsv4cli.kernels import ref, triton_hc

    n = args.hc_mult
    mixes = torch.randn(2, sh.hc_rows, (2 + n) * n, device=device)
    scale, base = torch.randn(3, device=device), torch.randn((2 + n) * n, device=device)
    call = (mixes, scale, base, n, args.hc_sinkhorn_iters, args.hc_eps)
    got, want = triton_hc.hc_split_sinkhorn(*call), ref.hc_split_sinkhorn(*call)
    err = max(rel_err(a, e) for a, e in zip(got, want, strict=True))
    return [case("hc_split_sinkhorn", f"[2x{sh.hc_rows}x{(2 + n) * n}] n={n} iters={args.hc_sinkhorn_iters}",
                 "rel err", err, FP32_TOL)]


def step_parity(ctx: Ctx) -> Result:
    import torch

    from dsv4cli.model.presets import PRESETS

    cuda = cuda_ready()
    if not cuda and not ctx.dry_run:
        return no_cuda()
    device = torch.device("cuda" if cuda else "cpu")
    models = ("flash", "pro") if cuda else ("tiny",)
    rows = []
    for model in models:
        torch.manual_seed(0)
        shapes = PARITY_SHAPES[model]
        for check in (parity_quant, parity_fp8, parity_moe, parity_attn, parity_hc):
            rows += [{"model": model, **c} for c in check(PRESETS[model], shapes, device)]
    bad = [r for r in rows if not r["ok"]]
    worst = max((r for r in rows if r["metric"] == "rel err"), key=lambda r: r["value"], default=None)
    numbers = {"cases": len(rows), "failed": len(bad), "models": list(models), "device": str(device),
               "worst_rel_err": worst and worst["value"], "worst_kernel": worst and worst["kernel"],
               "interpreter": os.environ.get("TRITON_INTERPRET") == "1"}
    result = Result(numbers=numbers, tables={"parity": rows},
                    headline=f"{len(rows) - len(bad)}/{len(rows)} within tolerance; worst rel err "
                             f"{fmt(numbers['worst_rel_err'])} ({numbers['worst_kernel']})")
    if bad:
        result.status = FAILED
        result.note = "; ".join(f"{r['model']} {r['kernel']} {r['shape']}: {r['value']:.3g}" for r in bad)[:600]
    return result


# ======================================================================= steps: synth and dsv4 bench


def slice_spec(ctx: Ctx) -> dict[str, Any]:
    return DRY_SLICE if ctx.dry_run else SLICE


def native_cpu_kernels() -> tuple[bool, list[str]]:
    """Select the kernels as `dsv4` does (building the native CPU ones into the cache on first use): (whether the
    host experts get the native kernel, the selection's notices)."""
    from dsv4cli import kernels

    notices = kernels.select()
    return "dsv4cli.kernels.cpu." in kernels.active()["moe_experts"], notices


def step_synth(ctx: Ctx) -> Result:
    """The checkpoint the bench steps share, and (also off the critical path) the native CPU kernels' build."""
    from dsv4cli.bench.run import synthetic_checkpoint, synthetic_label

    spec = slice_spec(ctx)
    root = ctx.work / "ckpt"
    before = set(root.iterdir()) if root.is_dir() else set()
    t0 = time.perf_counter()
    path = synthetic_checkpoint(spec["preset"], spec["layers"], spec["experts"], seed=0, root=root)
    seconds = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    label = synthetic_label(spec["preset"], spec["layers"], spec["experts"])
    native, notices = native_cpu_kernels()
    numbers = {"model": label, "path": str(path), "size_gb": size / 1e9, "seconds": seconds, "reused": path in before,
               "native_cpu_kernels": native, "kernel_notices": notices}
    return Result(numbers=numbers, data={"path": str(path)},
                  headline=f"{label}: {size / 1e9:.2f} GB {'reused' if path in before else 'written'} in "
                           f"{seconds:.0f} s")


def checkpoint_path(ctx: Ctx) -> Path:
    """The synth step's checkpoint (StepError when that step did not produce one)."""
    try:
        path = Path(json.loads(ctx.results("synth").read_text())["data"]["path"])
    except (OSError, KeyError, ValueError):
        raise StepError("the synth step produced no checkpoint (see its status)") from None
    if not path.is_dir():
        raise StepError(f"the synth step's checkpoint {path} is gone")
    return path


def dsv4(*argv: str) -> str:
    """`dsv4 ARGV` through the CLI's entry point in this process (its stderr in the log); stdout returned;
    StepError on a non-zero exit."""
    from dsv4cli.cli import app as cli

    echo("$ dsv4", shlex.join(argv))
    out = io.StringIO()
    code: int | str | None = 0
    with contextlib.redirect_stdout(out):
        try:
            cli.main(list(argv))
        except SystemExit as exc:
            code = exc.code
    if code:
        echo(out.getvalue()[-4000:])
        raise StepError(f"dsv4 {argv[0]} exited with {code} (see the log)")
    return out.getvalue()


def gpu_budget(model_dir: Path, setup: BenchSetup, cuda: bool) -> tuple[int, int]:
    """(--gpu-memory bytes, resident experts) giving `setup.slots` staging slots and its resident share."""
    from dsv4cli.model.args import ModelArgs
    from dsv4cli.runtime.placement import GPU_RESERVE_BYTES, plan_placement

    args = ModelArgs.from_file(model_dir)
    base = plan_placement(args, device="cuda:0" if cuda else "cpu", gpu_budget_bytes=1 << 50,
                          context=setup.context(), accelerated=True)
    total = args.n_layers * args.n_routed_experts
    resident = int(total * (setup.resident_fraction or 0.0))
    reserve = GPU_RESERVE_BYTES if cuda else 0
    budget = base.dense_bytes + base.kv_cache_bytes + reserve + (setup.slots + resident) * base.expert_bytes
    return budget + base.expert_bytes // 2, resident


def make_plan(ctx: Ctx, name: str, model_dir: Path, setup: BenchSetup, cuda: bool) -> tuple[Path, dict[str, Any]]:
    """`dsv4 plan` for a hybrid arm; checks it holds the intended resident experts and slots."""
    budget, resident = gpu_budget(model_dir, setup, cuda)
    plan_file = ctx.work / f"plan-{name}.json"
    where = ["--device", "cuda:0"] if cuda else ["--simulate"]
    dsv4("plan", str(model_dir), *where, "--gpu-memory", f"{budget}B", "--ctx", str(setup.context()),
         "--save", str(plan_file))
    plan = json.loads(plan_file.read_text())
    got = (sum(len(v) for v in plan["gpu_experts"].values()), plan["staging_slots"])
    if got != (resident, setup.slots):
        raise StepError(f"the plan holds {got[0]} resident experts and {got[1]} slots, wanted {resident} and "
                        f"{setup.slots}")
    return plan_file, {"resident_experts": got[0], "staging_slots": got[1], "gpu_memory_bytes": budget,
                       "plan_device": plan["device"]}


def bench_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Table rows from `dsv4 bench -o json`."""
    return [{"test": r["label"], "depth": r["depth"], "tok/s": r["tokens_per_second"],
             "±": r["tokens_per_second_std"], "GB/s": r["bandwidth_gb_s"],
             "% of mem BW": None if r["bandwidth_ratio"] is None else 100 * r["bandwidth_ratio"],
             "experts hit %": None if r["expert_cache_hit_rate"] is None else 100 * r["expert_cache_hit_rate"],
             "MB moved/token": None if r["expert_bytes_moved_per_token"] is None
             else r["expert_bytes_moved_per_token"] / 1e6, "peak GB": r["peak_memory_bytes"] / 1e9}
            for r in report["results"]]


def bench_numbers(report: dict[str, Any]) -> dict[str, Any]:
    from dsv4cli.bench.run import short_kernels

    numbers = {"model": report["model"]["name"], "device": report["model"]["device"],
               "placement": report["model"]["placement"], "kernels": short_kernels(report["kernels"]),
               "triad_gb_s": report["memory_bandwidth"]["triad_gb_s"], "peak_gb": report["peak_memory_bytes"] / 1e9}
    for r in report["results"]:
        key = f"{r['label']}_d{r['depth']}"
        numbers[f"{key}_tok_s"] = r["tokens_per_second"]
        if r["bandwidth_ratio"] is not None:
            numbers[f"{key}_pct_mem_bw"] = 100 * r["bandwidth_ratio"]
        if r["expert_bytes_moved_per_token"] is not None:
            numbers[f"{key}_mb_moved_per_token"] = r["expert_bytes_moved_per_token"] / 1e6
        if r["expert_cache_hit_rate"] is not None:
            numbers[f"{key}_hit_pct"] = 100 * r["expert_cache_hit_rate"]
    return numbers


def bench_headline(report: dict[str, Any]) -> str:
    parts = []
    for r in report["results"]:
        text = f"{r['label']}@d{r['depth']} {r['tokens_per_second']:.1f} t/s"
        if r["bandwidth_ratio"] is not None:
            text += f" ({100 * r['bandwidth_ratio']:.0f}% of mem BW)"
        if r["expert_bytes_moved_per_token"]:
            text += f" ({r['expert_bytes_moved_per_token'] / 1e6:.2f} MB/token moved)"
        parts.append(text)
    return "; ".join(parts)


def check_bench(name: str, report: dict[str, Any], cuda: bool) -> str:
    """What is wrong with an arm's report ('' if nothing): it ran where intended, with the intended kernels."""
    model = report["model"]
    if cuda and not model["device"].startswith("cuda"):
        return f"the model ran on {model['device']}, not the GPU"
    if cuda and "triton" not in report["kernels"]["moe_experts"]:
        return f"moe_experts ran {report['kernels']['moe_experts']}, not the Triton kernel"
    if name == "bench_prefill":
        moved = [r["expert_bytes_moved_per_token"] for r in report["results"] if r["test"] == "pp"]
        if not moved or not moved[0]:
            return "prefill moved no expert bytes through the staging slots"
    if name != "bench_gpu" and not model["placement"]:
        return "no offload runtime was attached"
    return ""


def bench_step(ctx: Ctx, name: str) -> Result:
    cuda = cuda_ready()
    if not cuda and not ctx.dry_run:
        return no_cuda()
    setup = (BENCH_SETUPS if cuda else DRY_BENCH_SETUPS)[name]
    model_dir = checkpoint_path(ctx)
    numbers: dict[str, Any] = {}
    note = "dry run: the CPU stands in for the GPU (--device cpu, dsv4 plan --simulate)" if not cuda else ""
    if setup.resident_fraction is not None and not native_cpu_kernels()[0]:
        setup = replace(setup, gen=2, repetitions=1)  # reference kernels decode host experts slowly
        note = "native CPU kernels unavailable (see the synth step): tg shortened to 2 tokens, 1 run"
    if setup.resident_fraction is None:
        placement = ["--device", "cuda:0" if cuda else "cpu"]
    else:
        plan_file, numbers = make_plan(ctx, name, model_dir, setup, cuda)
        placement = ["--plan", str(plan_file)]
    report = json.loads(dsv4("bench", str(model_dir), "-p", str(setup.prompt), "-n", str(setup.gen), "-d",
                             ",".join(map(str, setup.depths)), "-r", str(setup.repetitions), "--ctx",
                             str(setup.context()), "-o", "json", *placement))
    result = Result(headline=bench_headline(report), numbers={**numbers, **bench_numbers(report)},
                    tables={"dsv4 bench": bench_rows(report)}, data={"bench": report})
    problem = check_bench(name, report, cuda)
    result.status, result.note = (FAILED, problem) if problem else (OK, note)
    return result


STEP_FUNCS: dict[str, Callable[[Ctx], Result]] = {
    "env": step_env, "deps": step_deps, "h2d_copy": step_h2d, "synth": step_synth, "pytest_gpu": step_pytest,
    "triton_parity": step_parity, "triton_flash": step_triton_flash, "triton_pro": step_triton_pro,
    "bench_gpu": lambda ctx: bench_step(ctx, "bench_gpu"),
    "bench_hybrid": lambda ctx: bench_step(ctx, "bench_hybrid"),
    "bench_prefill": lambda ctx: bench_step(ctx, "bench_prefill"),
}


def child_main(name: str, ctx: Ctx, fault: str | None) -> int:
    """A step's child process: run it, write its Result as JSON; exit 1 when it failed."""
    echo(f"step {name} ({'dry run' if ctx.dry_run else 'GPU'}) at {now()}")
    t0 = time.perf_counter()
    try:
        if fault == "hang":
            echo("injected hang (--hang-step)")
            time.sleep(3600)
        if fault == "fail":
            echo("about to fail on purpose")
            raise StepError("injected failure (--fail-step)")
        result = STEP_FUNCS[name](ctx)
    except StepError as exc:
        echo(f"step {name} failed: {exc}")
        result = Result(status=FAILED, note=str(exc))
    except Exception as exc:
        traceback.print_exc()
        result = Result(status=FAILED, note=f"{type(exc).__name__}: {exc}"[:600])
    result.seconds = time.perf_counter() - t0
    path = ctx.results(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(result), default=str))
    echo(f"step {name}: {result.status} {result.headline}")
    return 1 if result.status == FAILED else 0


# ======================================================================= the orchestrator


def now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


@dataclass
class Job:
    """A step's child in flight."""

    step: Step
    proc: subprocess.Popen
    log: Path
    started: float
    timeout_s: float


@dataclass
class Check:
    """One run of the check: options, selection, records, and the output folder."""

    args: argparse.Namespace
    selected: list[Step]
    budgets: dict[str, int]
    started: float = field(default_factory=time.monotonic)
    started_at: str = field(default_factory=now)
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    jobs: dict[str, Job] = field(default_factory=dict)

    @property
    def out(self) -> Path:
        return self.args.out

    @property
    def work(self) -> Path:
        return self.args.work

    def remaining(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.started)

    def ok_statuses(self) -> set[str]:
        return {OK, NO_CUDA} if self.args.dry_run else {OK}


def select_steps(only: str | None) -> list[Step]:
    """The named steps, the setup steps and what the named ones need, in check order."""
    if not only:
        return list(STEPS)
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in STEP_BY_NAME]
    if unknown:
        raise ValueError(f"unknown step {unknown[0]!r}; steps: {', '.join(STEP_BY_NAME)}")
    wanted = set(names) | set(SETUP)
    for n in names:
        wanted |= set(STEP_BY_NAME[n].needs)
    return [s for s in STEPS if s.name in wanted]


def parse_step_budgets(items: list[str]) -> dict[str, int]:
    budgets = {s.name: s.budget_s for s in STEPS}
    for item in items:
        name, _, seconds = item.partition("=")
        if name not in budgets or not seconds.isdigit():
            raise ValueError(f"--step-budget expects STEP=SECONDS with a known step, got {item!r}")
        budgets[name] = int(seconds)
    return budgets


def child_env(check: Check, step: Step) -> dict[str, str]:
    """The child's environment: the source tree and the installed wheels importable; CUDA hidden in a dry run."""
    env = dict(os.environ)
    paths = [str(REPO / "src"), str(site_dir(check.work)), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("TRITON_INTERPRET", None)
    if check.args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""
        env["OMP_NUM_THREADS"] = "1"  # small shared CI machines: a second thread mostly waits
        if step.name == "triton_parity":
            env["TRITON_INTERPRET"] = "1"
    return env


def child_command(check: Check, step: Step) -> list[str]:
    a = check.args
    cmd = [sys.executable, str(SCRIPT), "--child", step.name, "--work", str(a.work), "--wheels", str(a.wheels)]
    cmd += ["--dry-run"] if a.dry_run else []
    for requirement in a.require:
        cmd += ["--require", requirement]
    if step.name == a.fail_step:
        cmd += ["--fault", "fail"]
    elif step.name == a.hang_step:
        cmd += ["--fault", "hang"]
    return cmd


def start_job(check: Check, step: Step, timeout_s: float) -> Job:
    """Launch a step's child in its own process group, its output into the step's log."""
    log = check.work / "logs" / f"{step.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    check.work.joinpath("results", f"{step.name}.json").unlink(missing_ok=True)
    with open(log, "wb") as sink:
        proc = subprocess.Popen(child_command(check, step), cwd=REPO, env=child_env(check, step), stdout=sink,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    return Job(step, proc, log, time.monotonic(), timeout_s)


def kill_job(job: Job) -> None:
    """End the child and everything it started (its process group): TERM, then KILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(job.proc.pid, sig)
        try:
            job.proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


def finish_job(check: Check, job: Job) -> dict[str, Any]:
    """Wait for a child until its time is up; its record for the summary."""
    timed_out = False
    try:
        job.proc.wait(timeout=max(0.0, job.started + job.timeout_s - time.monotonic()))
    except subprocess.TimeoutExpired:
        timed_out = True
        kill_job(job)
    wall = time.monotonic() - job.started
    log_text = job.log.read_text(encoding="utf-8", errors="replace")
    result = read_result(check.work.joinpath("results", f"{job.step.name}.json"))
    if timed_out:
        status, note = TIMEOUT, f"killed after {job.timeout_s:.0f} s (its time budget)"
    elif result is None:
        status, note = FAILED, f"the step's process exited with {job.proc.returncode} and wrote no result"
    else:
        status, note = (result.status if job.proc.returncode == 0 else FAILED), result.note
    if job.step.background and result is not None:
        wall = result.seconds  # it ended before it was waited for
    result = result or Result()
    return {**base_record(check, job.step), "status": status, "wall_s": round(wall, 2),
            "timeout_s": round(job.timeout_s, 1), "returncode": job.proc.returncode, "headline": result.headline,
            "note": note, "numbers": result.numbers, "tables": result.tables, "data": result.data,
            "log_tail": log_tail(log_text), "_log": log_text}


def read_result(path: Path) -> Result | None:
    try:
        return Result(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def log_tail(text: str) -> str:
    return "\n".join(text.rstrip().splitlines()[-LOG_TAIL_LINES:])[-LOG_TAIL_CHARS:]


def base_record(check: Check, step: Step) -> dict[str, Any]:
    return {"name": step.name, "title": step.title, "budget_s": check.budgets[step.name], "status": OUT_OF_TIME,
            "wall_s": 0.0, "timeout_s": 0.0, "returncode": None, "headline": "", "note": "", "numbers": {},
            "tables": {}, "data": {}, "log_tail": ""}


def run_check(check: Check) -> int:
    """Run the selected steps; write the outputs after each; exit code 0 when every step passed."""
    check.out.mkdir(parents=True, exist_ok=True)
    site_dir(check.work).mkdir(parents=True, exist_ok=True)
    (check.out / "gpu_check.log").write_text(f"dsv4 GPU check, {mode(check)}, started {check.started_at}\n")
    write_outputs(check)
    try:
        for i, step in enumerate(check.selected, 1):
            for need in step.needs:
                if need in check.jobs:
                    record(check, finish_job(check, check.jobs.pop(need)))
            run_step(check, step, i)
        for name in list(check.jobs):
            record(check, finish_job(check, check.jobs.pop(name)))
    finally:
        for job in check.jobs.values():
            kill_job(job)
    write_outputs(check, final=True)
    print_table(check)
    return 0 if not failed_steps(check) else 1


def run_step(check: Check, step: Step, index: int) -> None:
    remaining = check.remaining()
    if remaining < MIN_START_S:
        record(check, {**base_record(check, step), "note": f"{remaining:.0f} s of the budget left"})
        return
    timeout = min(check.budgets[step.name], remaining)
    echo(f"[gpu-check] {index}/{len(check.selected)} {step.name}: {step.title} (up to {timeout:.0f} s)")
    job = start_job(check, step, timeout)
    if step.background:
        check.jobs[step.name] = job
        record(check, {**base_record(check, step), "status": "running", "note": "in the background"})
    else:
        record(check, finish_job(check, job))


def record(check: Check, rec: dict[str, Any]) -> None:
    """Store a step's record, append its log to gpu_check.log, rewrite summary and report."""
    log = rec.pop("_log", None)
    check.records[rec["name"]] = rec
    if log is not None:
        with open(check.out / "gpu_check.log", "a", encoding="utf-8") as f:
            f.write(f"\n===== {rec['name']}: {rec['status']} in {rec['wall_s']:.1f} s =====\n")
            f.write(log[-STEP_LOG_CHARS:])
    if rec["status"] != "running":
        echo(f"[gpu-check]   {rec['name']}: {rec['status']} in {rec['wall_s']:.1f} s  {one_line(rec)}")
    write_outputs(check)


def mode(check: Check) -> str:
    return "dry-run" if check.args.dry_run else "gpu"


def failed_steps(check: Check) -> list[str]:
    return [s.name for s in check.selected if check.records.get(s.name, {}).get("status") not in check.ok_statuses()]


def rerun_argv(check: Check, failed: list[str]) -> list[str]:
    """The options of this run that shape the measurements, and --only the failed steps."""
    a = check.args
    argv = ["--out", str(a.out)] + (["--dry-run"] if a.dry_run else [])
    if a.work != DEFAULT_WORK:
        argv += ["--work", str(a.work)]
    if a.wheels != DEFAULT_WHEELS:
        argv += ["--wheels", str(a.wheels)]
    if a.budget_s != DEFAULT_BUDGET_S:
        argv += ["--budget-s", str(a.budget_s)]
    for item in a.step_budget:
        argv += ["--step-budget", item]
    for requirement in a.require:
        argv += ["--require", requirement]
    return [*argv, "--only", ",".join(failed)]


def summary(check: Check, final: bool) -> dict[str, Any]:
    failed = failed_steps(check) if final else []
    rel_script = SCRIPT.relative_to(REPO)
    only = ["--only", ",".join(failed)]
    return {
        "schema": SCHEMA, "mode": mode(check), "started": check.started_at, "finished": now() if final else None,
        "wall_s": round(time.monotonic() - check.started, 2), "budget_s": check.args.budget_s,
        "command": shlex.join([sys.executable, *sys.argv]), "repo": str(REPO), "work": str(check.work),
        "selected": [s.name for s in check.selected], "ok": final and not failed, "failed": failed,
        "rerun": shlex.join([sys.executable, str(rel_script), *rerun_argv(check, failed)]) if failed else None,
        "rerun_device": shlex.join(["bash", "benchmarks/gpu_check.sh", *(["--dry-run"] if check.args.dry_run else []),
                                    *only]) if failed else None,
        "steps": [check.records.get(s.name) or {**base_record(check, s), "status": "pending"}
                  for s in check.selected],
    }


def write_outputs(check: Check, final: bool = False) -> None:
    """summary.json and report.md, each written to a temporary file and renamed into place."""
    data = summary(check, final)
    for name, text in (("summary.json", json.dumps(data, indent=1, default=str)), ("report.md", render_report(data))):
        tmp = check.out / f".{name}.tmp"
        tmp.write_text(text + "\n", encoding="utf-8")
        tmp.replace(check.out / name)


def one_line(step: dict[str, Any]) -> str:
    """A step's result in one line: its headline, or why it did not pass."""
    if step["status"] == OK:
        return step["headline"] or step["note"]
    return " — ".join(filter(None, (step["note"], step["headline"])))


def md_table(rows: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)).replace("|", "/") for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def render_report(data: dict[str, Any]) -> str:
    """The human-readable report: header, one line per step, then each step's numbers and tables."""
    env = next((s for s in data["steps"] if s["name"] == "env"), None)
    verdict = "running" if data["finished"] is None else ("all steps passed" if data["ok"] else
                                                          f"failed: {', '.join(data['failed'])}")
    lines = [f"# dsv4 GPU check ({data['mode']})", "",
             f"- {env['headline'] if env and env['headline'] else 'environment: not measured'}",
             f"- started {data['started']}, {data['wall_s']:.0f} s of a {data['budget_s']} s budget; {verdict}",
             f"- command: `{data['command']}`", ""]
    if data["rerun"]:
        lines += [f"Rerun the failed steps: `{data['rerun']}` (from the repository root); on the device: "
                  f"`{data['rerun_device']}`", ""]
    lines += ["| step | status | wall s | budget s | result |", "|---|---|---:|---:|---|"]
    lines += [f"| {s['name']} | {s['status']} | {s['wall_s']:.1f} | {s['budget_s']} | "
              f"{one_line(s).replace('|', '/')} |" for s in data["steps"]]
    for s in data["steps"]:
        lines += ["", f"## {s['name']}: {s['title']}", "", f"status: **{s['status']}**"
                  + (f" — {s['note']}" if s["note"] else "")]
        if s["numbers"]:
            lines += [""] + [f"- {k}: {fmt(v)}" for k, v in s["numbers"].items()]
        for title, rows in s["tables"].items():
            if rows:
                lines += ["", f"### {title}", "", md_table(rows)]
        if s["status"] not in (OK, NO_CUDA, "running", "pending") and s["log_tail"]:
            lines += ["", "log tail:", "", "```text", s["log_tail"], "```"]
    return "\n".join(lines)


def print_table(check: Check) -> None:
    """The closing lines of the output (the device tool returns the end of it)."""
    data = summary(check, final=True)
    echo("\n[gpu-check] summary:")
    for s in data["steps"]:
        echo(f"  {s['name']:14} {s['status']:20} {s['wall_s']:7.1f} s  {one_line(s)[:150]}")
    echo(f"[gpu-check] {'all steps passed' if data['ok'] else 'failed: ' + ', '.join(data['failed'])} in "
         f"{data['wall_s']:.0f} s; outputs: {', '.join(str(check.out / f) for f in OUT_FILES)}")
    if data["rerun"]:
        echo(f"[gpu-check] rerun: {data['rerun']}\n[gpu-check] on the device: {data['rerun_device']}")


# ======================================================================= command line


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="steps: " + ", ".join(s.name for s in STEPS))
    p.add_argument("--out", type=Path, help="output folder: summary.json, report.md, gpu_check.log")
    p.add_argument("--dry-run", action="store_true", help="every step's plumbing on the CPU, CUDA hidden")
    p.add_argument("--only", help="comma list of steps (setup steps and prerequisites are added)")
    p.add_argument("--budget-s", type=int, default=DEFAULT_BUDGET_S, help="total seconds for all steps")
    p.add_argument("--step-budget", action="append", default=[], metavar="STEP=S", help="one step's time limit")
    p.add_argument("--work", type=Path, default=DEFAULT_WORK, help="scratch folder (checkpoint, logs, site)")
    p.add_argument("--wheels", type=Path, default=DEFAULT_WHEELS, help="wheel folder from `make gpu-wheels`")
    p.add_argument("--require", action="append", default=[], metavar="SPEC",
                   help="also install this requirement from the wheel folder when it is missing")
    p.add_argument("--fail-step", help="test hook: make this step fail")
    p.add_argument("--hang-step", help="test hook: make this step hang until its time limit")
    p.add_argument("--requirements", action="store_true", help="print what the device needs (for pip download)")
    p.add_argument("--check-wheels", type=Path, metavar="DIR", help="check a wheel folder for the device")
    p.add_argument("--device-python", default=DEVICE_PYTHON, help="the device's Python for --check-wheels")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--fault", choices=("fail", "hang"), help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.requirements:
        print("\n".join(project_requirements(args.require)))
        return 0
    if args.check_wheels is not None:
        return check_wheels(args.check_wheels, args.device_python)
    args.work = args.work.absolute()
    args.wheels = args.wheels.absolute()
    if args.child:
        return child_main(args.child, Ctx(args.work, args.wheels, args.dry_run, tuple(args.require)), args.fault)
    try:
        check = Check(args, select_steps(args.only), parse_step_budgets(args.step_budget))
        if args.out is None:
            raise ValueError("--out is required")
        for hook in (args.fail_step, args.hang_step):
            if hook is not None and hook not in STEP_BY_NAME:
                raise ValueError(f"unknown step {hook!r}")
    except ValueError as exc:
        parser().error(str(exc))
    args.out = args.out.absolute()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    return run_check(check)


if __name__ == "__main__":
    sys.exit(main())
