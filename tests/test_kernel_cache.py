"""The native kernels' cache: a damaged cached library is rebuilt (never loaded), concurrent builds do not
corrupt each other, and an unwritable cache falls back to a temporary directory.

Loads that could crash (SIGBUS on a truncated library) run in a subprocess. Rebuilds mostly use a fake
compiler that copies one real build (instant, and it counts its runs); one test rebuilds with the real one.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsv4cli.kernels import cpu
from tests.native_builds import native

pytestmark = native

#: loads the kernels, checks one native op against its reference, prints where the library came from
LOAD = """
import json, torch
from dsv4cli.formats.official import fake_quant_fp8
from dsv4cli.kernels import cpu
lib = cpu.load()
x = torch.randn(4, 256)
assert torch.equal(lib.fake_quant_fp8(x, 128), fake_quant_fp8(x, 128))
print(json.dumps({"path": str(lib.path), "notices": cpu.take_notices()}))
"""


@pytest.fixture(scope="module")
def real_library(tmp_path_factory) -> Path:
    """One real build of the kernels (the fake compiler's output)."""
    return cpu.build(out_dir=tmp_path_factory.mktemp("real-build"))


def fake_compiler(folder: Path, library: Path, pause: float = 0.0) -> tuple[Path, Path]:
    """(compiler, log): a `g++` that writes half of `library`, waits `pause` s, writes all of it, and logs each run."""
    log = folder / "builds.log"
    cxx = folder / "fake-g++"
    cxx.write_text(f"""#!/bin/sh
if [ "$1" = "--version" ]; then echo "fake-g++ 1.0"; exit 0; fi
while [ $# -gt 1 ]; do [ "$1" = "-o" ] && out="$2"; shift; done
echo build >> "{log}"
head -c {library.stat().st_size // 2} "{library}" > "$out"
sleep {pause}
cat "{library}" > "$out"
""")
    cxx.chmod(cxx.stat().st_mode | stat.S_IXUSR)
    return cxx, log


def builds(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def environment(cache_home: Path, cxx: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "XDG_CACHE_HOME": str(cache_home), "OMP_NUM_THREADS": "1"}
    env.pop(cpu.ENV_KERNELS, None)
    if cxx is not None:
        env[cpu.ENV_CXX] = str(cxx)
    else:
        env.pop(cpu.ENV_CXX, None)
    return env


def load_in_subprocess(env: dict[str, str]) -> dict:
    """Run LOAD in a fresh interpreter; a crash (e.g. SIGBUS: returncode -7) fails the test."""
    proc = subprocess.run([sys.executable, "-c", LOAD], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"load exited with {proc.returncode}: {proc.stderr[-2000:]}"
    return json.loads(proc.stdout)


def spec_for(cxx: Path | None) -> cpu.BuildSpec:
    return cpu.BuildSpec.make(str(cxx) if cxx else None, ())


def truncate(library: Path) -> None:
    os.truncate(library, library.stat().st_size // 3)


def flip_byte(library: Path) -> None:
    data = bytearray(library.read_bytes())
    data[len(data) // 2] ^= 0xFF
    library.write_bytes(bytes(data))


def empty(library: Path) -> None:
    library.write_bytes(b"")


def delete_stamp(library: Path) -> None:
    cpu.stamp_path(library).unlink()


def garble_stamp(library: Path) -> None:
    cpu.stamp_path(library).write_text("{not json")


def stale_stamp(library: Path) -> None:
    stamp = json.loads(cpu.stamp_path(library).read_text())
    cpu.stamp_path(library).write_text(json.dumps({**stamp, "flags": ["-O0"]}))


def test_a_truncated_library_is_rebuilt_with_the_real_compiler(tmp_path, real_library):
    folder = tmp_path / "dsv4" / "kernels"
    folder.mkdir(parents=True)
    library = folder / real_library.name
    shutil.copy(real_library, library)
    shutil.copy(cpu.stamp_path(real_library), cpu.stamp_path(library))
    assert cpu.verified(library, spec_for(None))
    truncate(library)
    got = load_in_subprocess(environment(tmp_path))
    assert Path(got["path"]) == library and not got["notices"]
    assert cpu.verified(library, spec_for(None)) and library.read_bytes() == real_library.read_bytes()


@pytest.mark.parametrize("damage", [truncate, flip_byte, delete_stamp], ids=lambda f: f.__name__)
def test_the_next_load_after_damage_rebuilds_and_works(tmp_path, real_library, damage):
    cxx, log = fake_compiler(tmp_path, real_library)
    library = cpu.build(cxx=str(cxx), out_dir=tmp_path / "cache" / "dsv4" / "kernels")
    damage(library)
    assert Path(load_in_subprocess(environment(tmp_path / "cache", cxx))["path"]) == library
    assert builds(log) == 2 and cpu.verified(library, spec_for(cxx))
    assert cpu.build(cxx=str(cxx), out_dir=library.parent) == library and builds(log) == 2  # reused


@pytest.mark.parametrize("damage", [truncate, flip_byte, empty, delete_stamp, garble_stamp, stale_stamp],
                         ids=lambda f: f.__name__)
def test_a_damaged_cache_entry_is_rebuilt_once(tmp_path, real_library, damage):
    cxx, log = fake_compiler(tmp_path, real_library)
    library = cpu.build(cxx=str(cxx), out_dir=tmp_path / "kernels")
    assert cpu.build(cxx=str(cxx), out_dir=tmp_path / "kernels") == library and builds(log) == 1
    damage(library)
    assert not cpu.verified(library, spec_for(cxx))
    assert cpu.build(cxx=str(cxx), out_dir=tmp_path / "kernels") == library and builds(log) == 2
    assert cpu.verified(library, spec_for(cxx)) and library.read_bytes() == real_library.read_bytes()


def test_concurrent_processes_build_once_and_all_load(tmp_path, real_library):
    cxx, log = fake_compiler(tmp_path, real_library, pause=1.0)
    env = environment(tmp_path / "cache", cxx)
    procs = [subprocess.Popen([sys.executable, "-c", LOAD], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    results = [(p.wait(timeout=600), *p.communicate()) for p in procs]
    assert all(rc == 0 for rc, _, _ in results), [err[-1000:] for _, _, err in results]
    assert len({json.loads(out)["path"] for _, out, _ in results}) == 1
    assert builds(log) == 1  # the others waited on the lock, then found the verified library
    folder = tmp_path / "cache" / "dsv4" / "kernels"
    assert sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock")) == [
        f"fp4_cpu-{spec_for(cxx).key}.so", f"fp4_cpu-{spec_for(cxx).key}.so.stamp"]


def test_an_unwritable_cache_builds_into_a_temporary_directory(tmp_path, real_library, monkeypatch):
    cxx, log = fake_compiler(tmp_path, real_library)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "dsv4").write_text("a file where the cache directory should be")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cpu.take_notices()
    library = cpu.build(cxx=str(cxx))
    assert library.parent == cpu._private_dir() and cpu.verified(library, spec_for(cxx)) and builds(log) == 1
    notices = cpu.take_notices()
    assert len(notices) == 1 and "cannot write the kernel cache" in notices[0] and "\n" not in notices[0]
    assert not cpu.take_notices()  # each notice is reported once


def test_no_writable_directory_at_all_is_a_clear_error(tmp_path, real_library, monkeypatch):
    cxx, _ = fake_compiler(tmp_path, real_library)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setattr(cpu, "_private_dir", lambda: blocker / "tmp")
    with pytest.raises(cpu.KernelBuildError, match="cannot write the kernel cache") as info:
        cpu.build(cxx=str(cxx), out_dir=blocker / "kernels")
    assert "\n" not in info.value.one_line() and cpu.ENV_KERNELS in info.value.hint
    assert not cpu.take_notices()


def test_a_rebuild_removes_temporaries_of_killed_builds(tmp_path, real_library):
    cxx, _ = fake_compiler(tmp_path, real_library)
    out_dir = tmp_path / "kernels"
    out_dir.mkdir()
    old, fresh = out_dir / ".fp4_cpu-0123.so.abc.tmp", out_dir / ".fp4_cpu-4567.so.def.tmp"
    for leftover in (old, fresh):
        leftover.write_bytes(b"partial")
    an_hour_ago = time.time() - cpu.STALE_TEMP_SECONDS - 60
    os.utime(old, (an_hour_ago, an_hour_ago))
    cpu.build(cxx=str(cxx), out_dir=out_dir)
    assert not old.exists() and fresh.exists()  # a recent one may belong to a build still running


def test_cxxflags_from_the_environment_reach_the_build(monkeypatch):
    """$DSV4_CXXFLAGS is added to every build: without AVX-512 the kernels run their AVX2 level."""
    from tests.native_builds import cpu_flags

    if not {"avx512f", "avx2", "fma", "f16c"} <= cpu_flags():
        pytest.skip("needs a CPU with AVX-512 and AVX2")
    monkeypatch.setenv(cpu.ENV_CXXFLAGS, "-mno-avx512f")
    built = cpu.load()
    assert built.isa == "avx2" and built is cpu.load(extra_flags=())
    monkeypatch.delenv(cpu.ENV_CXXFLAGS)
    assert cpu.load().isa != "avx2"


def test_badly_quoted_cxxflags_are_a_clear_error(monkeypatch):
    monkeypatch.setenv(cpu.ENV_CXXFLAGS, '-DX="unterminated')
    with pytest.raises(cpu.KernelBuildError, match="DSV4_CXXFLAGS is not a valid flag list"):
        cpu.load()
