"""The prepared GPU check (benchmarks/gpu_check.py, docs/gpu-check.md), dry-run on the CPU as CI runs it.

The dry run is the same orchestration the lent GPU runs: one child process per step, the same subprocesses,
parsing, summary and report; only the shapes are tiny and CUDA is hidden. It also installs two probe wheels
(built here) through the deps step, the path that carries the packages a device lacks.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from benchmarks import gpu_check

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
STEP_KEYS = {"name", "title", "status", "wall_s", "budget_s", "timeout_s", "returncode", "headline", "note",
             "numbers", "tables", "data", "log_tail"}
SUMMARY_KEYS = {"schema", "mode", "started", "finished", "wall_s", "budget_s", "command", "repo", "work", "selected",
                "ok", "failed", "rerun", "rerun_device", "steps"}
#: the honest dry-run outcome of each step: the GPU-only tests and bench_triton.py cannot measure without CUDA
DRY_STATUS = {s.name: gpu_check.OK for s in gpu_check.STEPS} | {
    "pytest_gpu": gpu_check.NO_CUDA, "triton_flash": gpu_check.NO_CUDA, "triton_pro": gpu_check.NO_CUDA}
PROBE = "dsv4-gpu-check-probe-a==1.0"


def make_wheel(folder: Path, name: str, version: str, requires: tuple[str, ...] = (),
               tag: str = "py3-none-any") -> Path:
    """A minimal pure-Python wheel of one module."""
    module = name.replace("-", "_")
    dist = f"{module}-{version}"
    files = {
        f"{module}/__init__.py": f"VERSION = {version!r}\n",
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                                      + "".join(f"Requires-Dist: {r}\n" for r in requires),
        f"{dist}.dist-info/WHEEL": f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: {tag}\n",
    }
    path = folder / f"{dist}-{tag}.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in files.items():
            archive.writestr(member, text)
        archive.writestr(f"{dist}.dist-info/RECORD", "".join(f"{m},,\n" for m in [*files, f"{dist}.dist-info/RECORD"]))
    return path


def probe_wheels(folder: Path) -> Path:
    """probe-a 1.0 needs probe-b>=2; of probe-b, 1.0 is too old and 3.0 installs on no Python: 2.0 must be chosen."""
    folder.mkdir(parents=True, exist_ok=True)
    make_wheel(folder, "dsv4-gpu-check-probe-a", "1.0", ("dsv4-gpu-check-probe-b>=2", "unused-extra; extra == 'x'"))
    make_wheel(folder, "dsv4-gpu-check-probe-b", "1.0")
    make_wheel(folder, "dsv4-gpu-check-probe-b", "2.0")
    make_wheel(folder, "dsv4-gpu-check-probe-b", "3.0", tag="cp99-cp99-manylinux_2_99_x86_64")
    return folder


def check(out: Path, work: Path, *args: str, wheels: Path | None = None) -> tuple[int, dict]:
    """Run the check (dry) into `out`; (exit code, summary)."""
    cmd = [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), "--work", str(work), *args]
    if wheels is not None:
        cmd += ["--wheels", str(wheels)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert (out / "summary.json").exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.returncode, json.loads((out / "summary.json").read_text())


def steps(summary: dict) -> dict[str, dict]:
    return {s["name"]: s for s in summary["steps"]}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[int, dict, Path, Path]:
    """The whole dry run, once: (exit code, summary, out folder, work folder)."""
    root = tmp_path_factory.mktemp("gpu-check")
    out, work = root / "out", root / "work"
    code, summary = check(out, work, "--require", PROBE, wheels=probe_wheels(root / "wheels"))
    return code, summary, out, work


def test_dry_run_passes_every_step(dry_run) -> None:
    code, summary, _, _ = dry_run
    by_name = steps(summary)
    assert [s["name"] for s in summary["steps"]] == [s.name for s in gpu_check.STEPS]
    assert {n: s["status"] for n, s in by_name.items()} == DRY_STATUS, {n: s["note"] for n, s in by_name.items()}
    assert code == 0
    assert summary["ok"] is True and summary["failed"] == [] and summary["rerun"] is None
    assert summary["mode"] == "dry-run" and summary["schema"] == gpu_check.SCHEMA
    assert summary["wall_s"] < summary["budget_s"]


def test_summary_schema(dry_run) -> None:
    _, summary, _, _ = dry_run
    assert set(summary) == SUMMARY_KEYS
    assert summary["finished"] is not None and summary["selected"] == [s.name for s in gpu_check.STEPS]
    for step in summary["steps"]:
        assert set(step) == STEP_KEYS, step["name"]
        assert step["wall_s"] > 0 and step["timeout_s"] > 0 and step["returncode"] == 0, step["name"]
        assert step["budget_s"] == gpu_check.STEP_BY_NAME[step["name"]].budget_s
        assert isinstance(step["numbers"], dict) and isinstance(step["tables"], dict)
        assert step["headline"] or step["status"] == gpu_check.NO_CUDA, step["name"]
        assert all(isinstance(rows, list) for rows in step["tables"].values())


def test_dry_run_measurements(dry_run) -> None:
    """Each step measured what its plumbing is for (numbers that a broken step could not produce)."""
    _, summary, _, work = dry_run
    by_name = steps(summary)
    assert by_name["env"]["numbers"]["cuda_available"] is False and by_name["env"]["numbers"]["torch"]
    assert by_name["deps"]["numbers"]["installed"] == ["dsv4-gpu-check-probe-a==1.0", "dsv4-gpu-check-probe-b==2.0"]
    assert (work / "site" / "dsv4_gpu_check_probe_b" / "__init__.py").read_text() == "VERSION = '2.0'\n"
    h2d = by_name["h2d_copy"]["numbers"]
    assert all(h2d[k] > 0 for k in ("h2d_pinned_gb_s", "h2d_pageable_gb_s", "d2d_gb_s"))
    tests = by_name["pytest_gpu"]["numbers"]
    assert tests["tests"] == tests["skipped"] >= 16 and tests["files"] == ["tests/test_kernels_triton.py"]
    parity = by_name["triton_parity"]["numbers"]
    assert parity["interpreter"] and parity["failed"] == 0 and parity["cases"] >= 10
    assert "no-GPU" in by_name["triton_flash"]["note"]
    hybrid = by_name["bench_hybrid"]["numbers"]
    assert (hybrid["resident_experts"], hybrid["staging_slots"]) == (16, 32) and hybrid["placement"]
    prefill = by_name["bench_prefill"]["numbers"]
    assert (prefill["resident_experts"], prefill["staging_slots"]) == (0, 8)
    assert prefill["pp32_d0_mb_moved_per_token"] > 0
    gpu = by_name["bench_gpu"]["numbers"]
    assert gpu["pp32_d0_tok_s"] > 0 and gpu["tg4_d32_tok_s"] > 0 and gpu["device"] == "cpu"


def test_outputs_fit_the_device_tool(dry_run) -> None:
    """What comes back from $OUT: at most 8 plain files, plain names, no folders."""
    _, summary, out, _ = dry_run
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(gpu_check.OUT_FILES)
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files)
    report = (out / "report.md").read_text()
    assert "all steps passed" in report
    for step in summary["steps"]:
        assert f"| {step['name']} | {step['status']} |" in report
        assert f"## {step['name']}:" in report
    log = (out / "gpu_check.log").read_text()
    assert "===== env: ok" in log and "===== bench_prefill: ok" in log


def test_failed_step_is_reported_and_the_others_still_run(dry_run, tmp_path) -> None:
    _, _, _, work = dry_run
    out = tmp_path / "out"
    code, summary = check(out, work, "--only", "h2d_copy,synth", "--fail-step", "h2d_copy")
    by_name = steps(summary)
    assert code == 1 and not summary["ok"]
    assert list(by_name) == ["env", "deps", "h2d_copy", "synth"]
    assert by_name["h2d_copy"]["status"] == gpu_check.FAILED and by_name["h2d_copy"]["returncode"] == 1
    assert "injected failure" in by_name["h2d_copy"]["note"]
    assert "about to fail on purpose" in by_name["h2d_copy"]["log_tail"]
    assert by_name["synth"]["status"] == by_name["env"]["status"] == gpu_check.OK
    assert summary["failed"] == ["h2d_copy"]
    assert "log tail:" in (out / "report.md").read_text()
    rerun = shlex.split(summary["rerun"])
    assert "--fail-step" not in rerun and rerun[rerun.index("--only") + 1] == "h2d_copy"
    assert summary["rerun_device"] == "bash benchmarks/gpu_check.sh --dry-run --only h2d_copy"
    proc = subprocess.run(rerun, cwd=REPO, capture_output=True, text=True, timeout=600)
    again = json.loads((out / "summary.json").read_text())
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert [s["name"] for s in again["steps"]] == ["env", "deps", "h2d_copy"]
    assert again["ok"] and all(s["status"] == gpu_check.OK for s in again["steps"])


def test_hanging_step_is_killed_at_its_budget(dry_run, tmp_path) -> None:
    _, _, _, work = dry_run
    code, summary = check(tmp_path / "out", work, "--only", "h2d_copy,synth", "--hang-step", "h2d_copy",
                          "--step-budget", "h2d_copy=3")
    by_name = steps(summary)
    assert code == 1 and summary["failed"] == ["h2d_copy"]
    assert by_name["h2d_copy"]["status"] == gpu_check.TIMEOUT and by_name["h2d_copy"]["wall_s"] < 15
    assert "injected hang" in by_name["h2d_copy"]["log_tail"]
    assert by_name["synth"]["status"] == gpu_check.OK
    assert "--step-budget h2d_copy=3" in summary["rerun"]


def test_spent_budget_skips_steps_but_still_reports(tmp_path) -> None:
    code, summary = check(tmp_path / "out", tmp_path / "work", "--budget-s", "5")
    assert code == 1
    assert {s["status"] for s in summary["steps"]} == {gpu_check.OUT_OF_TIME}
    assert summary["failed"] == [s.name for s in gpu_check.STEPS]
    assert "--budget-s 5" in summary["rerun"]


def test_unknown_step_is_a_usage_error(tmp_path) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--only", "nope"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown step 'nope'" in proc.stderr


def test_only_adds_setup_steps_and_prerequisites() -> None:
    assert [s.name for s in gpu_check.select_steps("bench_hybrid")] == ["env", "deps", "synth", "bench_hybrid"]
    assert [s.name for s in gpu_check.select_steps("h2d_copy")] == ["env", "deps", "h2d_copy"]
    assert gpu_check.select_steps(None) == list(gpu_check.STEPS)


def test_device_requirements_leave_out_the_torch_stack() -> None:
    names = [re.split(r"[<>=!~ ;\[]", r)[0] for r in gpu_check.project_requirements()]
    assert {"safetensors", "prompt-toolkit", "pytest", "pytest-timeout"} <= set(names)
    assert not {"torch", "triton", "transformers", "matplotlib", "pexpect"} & set(names)
    assert gpu_check.excluded("torch") and gpu_check.excluded("nvidia-cublas") and gpu_check.excluded("triton")
    assert not gpu_check.excluded("torchmetrics")


def test_bench_triton_json_to_numbers() -> None:
    """The GPU-only parse of bench_triton.py's JSON (same keys as its Row)."""
    rows = [("fp4 grouped w1", "T=1 k=6 [2048x4096] experts used=6", 0.02, 1000.0, 2.5),
            ("moe w1+w3+w2", "T=1 k=6 [2048x4096] experts used=6", 0.06, 2500.0, 2.0),
            ("moe w1+w3+w2", "T=4096 k=6 [2048x4096] experts used=256", 40.0, 900.0, 300.0),
            ("bf16 matmul (same rows)", "[24576x4096]@[4096x2048]", 1.0, None, 500.0),
            ("fp8 linear", "T=1 [1024x4096]", 0.01, 1500.0, 0.8),
            ("sparse attn decode", "B=1 H=64 K=640", 0.01, 600.0, None)]
    report = {"device": "NVIDIA H200", "copy_gbps": 4000.0, "model": "flash",
              "rows": [dict(name=n, shape=s, ms=ms, gbps=g, tflops=t, note="") for n, s, ms, g, t in rows]}
    numbers, table = gpu_check.triton_numbers(report)
    assert numbers["moe_decode_t1_pct_copy"] == pytest.approx(62.5)
    assert numbers["fp4_grouped_decode_t1_pct_copy"] == pytest.approx(25.0)
    assert numbers["fp4_prefill_best_tflops"] == 300.0 and numbers["bf16_matmul_best_tflops"] == 500.0
    assert numbers["attn_decode_b1_gb_s"] == 600.0 and numbers["copy_gb_s"] == 4000.0
    assert len(table) == len(rows) and table[3]["% of copy"] is None
    assert "62.5% of copy" in gpu_check.triton_headline(numbers)


def test_junit_parse(tmp_path) -> None:
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite><testcase name="a" time="1.5"/><testcase name="b" time="0">'
                   '<failure message="boom&#10;more">trace</failure></testcase><testcase name="c">'
                   '<skipped message="needs a CUDA GPU"/></testcase></testsuite></testsuites>')
    counts, rows = gpu_check.parse_junit(xml)
    assert counts == {"tests": 3, "passed": 1, "failed": 1, "error": 0, "skipped": 1}
    assert rows[1] == {"test": "b", "outcome": "failed", "s": 0.0, "message": "boom"}
