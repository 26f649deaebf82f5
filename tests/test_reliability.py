"""Bad input through the real CLI, as a subprocess: every case exits with the right code, prints one
`dsv4: error:` line and no traceback, leaves nothing at or beside the output path, and leaves the source
byte for byte as it was. The classes and promises are listed in docs/reliability.md."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dsv4cli.io.writer import write_random_checkpoint
from dsv4cli.model.presets import PRESETS

MiB = 1 << 20


def dsv4(*argv: str, env: dict[str, str] | None = None, stdin: str | bytes = "", prefix: tuple[str, ...] = (),
         timeout: float = 180) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "NO_COLOR": "1", **(env or {})}
    data = stdin.encode() if isinstance(stdin, str) else stdin
    return subprocess.run([*prefix, sys.executable, "-m", "dsv4cli", *argv], input=data, capture_output=True,
                          env=full_env, timeout=timeout)


def tree_digest(path: Path) -> str:
    """SHA-256 over every file name and byte under `path` (the source must not change)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, text: str) -> str:
    stderr = result.stderr.decode("utf-8", "replace")
    errors = [line for line in stderr.splitlines() if line.startswith("dsv4: error:")]
    assert result.returncode == code, (result.returncode, stderr)
    assert "Traceback" not in stderr, stderr
    assert len(errors) == 1 and stderr.rstrip("\n").splitlines()[-1] == errors[0], stderr
    assert text in errors[0], (text, errors[0])
    return errors[0]


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory) -> Path:
    return write_random_checkpoint(PRESETS["tiny"].replace(n_layers=2, n_routed_experts=4,
                                                           compress_ratios=(0, 4, 0)),
                                   tmp_path_factory.mktemp("src") / "tiny", seed=3, max_shard_bytes=2 * MiB)


@dataclass
class World:
    """A scratch directory with a copy of the tiny source checkpoint in `root/models/tiny`."""

    root: Path
    src: Path
    out: Path
    before: str = ""
    keep: dict[Path, bytes] = field(default_factory=dict)  # files that must survive untouched

    def plant(self, path: Path, text: str = "mine") -> Path:
        """A user's file that dsv4 must not delete or change."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        self.keep[path] = text.encode()
        return path


@pytest.fixture
def world(tmp_path, tiny_source) -> World:
    src = tmp_path / "models" / "tiny"
    shutil.copytree(tiny_source, src)
    return World(root=tmp_path, src=src, out=tmp_path / "out")


@dataclass(frozen=True)
class Case:
    name: str
    argv: Callable[[World], list[str]]
    code: int
    text: str
    setup: Callable[[World], None] = lambda w: None
    #: names that may exist beside the output afterwards (planted files, the source's folder)
    allowed: tuple[str, ...] = ()


def _quantize(w: World, out: Path, *extra: str) -> list[str]:
    return ["quantize", str(w.src), str(out), "--recipe", "q3", *extra]


def _convert(w: World, out: Path, *extra: str) -> list[str]:
    return ["convert", str(w.src), str(out), "--to", "fp8-experts", *extra]


def _unrelated_dir(name: str) -> Callable[[World], None]:
    return lambda w: w.plant(w.root / name / "notes.txt")


def _symlink_loop(w: World) -> None:
    os.symlink(w.root / "out", w.root / "out")


CASES = [
    # data loss: an output that is, contains or lies inside the source; --force on what dsv4 did not write
    Case("quantize-out-is-parent-of-src", lambda w: _quantize(w, w.src.parent, "--force"), 2, "overlaps the source"),
    Case("quantize-out-is-src", lambda w: _quantize(w, w.src, "--force"), 2, "overlaps the source"),
    Case("quantize-out-inside-src", lambda w: _quantize(w, w.src / "q3"), 2, "overlaps the source"),
    Case("convert-out-is-grandparent-of-src", lambda w: _convert(w, w.root, "--force"), 2, "overlaps the source"),
    Case("convert-out-inside-src", lambda w: _convert(w, w.src / "sub" / "out"), 2, "overlaps the source"),
    Case("quantize-force-over-user-dir", lambda w: _quantize(w, w.out, "--force"), 2, "dsv4 did not write",
         _unrelated_dir("out"), ("out",)),
    Case("convert-force-over-user-dir", lambda w: _convert(w, w.out, "--force"), 2, "dsv4 did not write",
         _unrelated_dir("out"), ("out",)),
    Case("synth-force-over-user-dir", lambda w: ["synth", "tiny", str(w.out), "--force"], 2, "dsv4 did not write",
         _unrelated_dir("out"), ("out",)),
    Case("quantize-foreign-partial-dir", lambda w: _quantize(w, w.out), 2, "not made by dsv4",
         _unrelated_dir("out.dsv4-quantize-partial"), ("out.dsv4-quantize-partial",)),
    Case("convert-foreign-partial-dir", lambda w: _convert(w, w.out), 2, "not made by dsv4",
         _unrelated_dir("out.dsv4-convert-partial"), ("out.dsv4-convert-partial",)),
    # paths checked before any work
    Case("convert-to-symlink-loop", lambda w: _convert(w, w.out), 2, "is a symlink", _symlink_loop, ("out",)),
    Case("quantize-to-symlink-loop", lambda w: _quantize(w, w.out), 2, "is a symlink", _symlink_loop, ("out",)),
    Case("convert-out-under-a-file", lambda w: _convert(w, w.root / "file" / "out"), 2, "is not a directory",
         lambda w: w.plant(w.root / "file"), ("file",)),
    # one exit-code rule: an existing OUT is 2 everywhere, a missing model is 2 everywhere
    Case("quantize-existing-out", lambda w: _quantize(w, w.out), 2, "already exists", _unrelated_dir("out"),
         ("out",)),
    Case("convert-existing-out", lambda w: _convert(w, w.out), 2, "already exists", _unrelated_dir("out"), ("out",)),
    Case("synth-existing-out", lambda w: ["synth", "tiny", str(w.out)], 2, "already exists", _unrelated_dir("out"),
         ("out",)),
    Case("quantize-missing-src", lambda w: ["quantize", str(w.root / "nope"), str(w.out)], 2, "no model"),
    Case("convert-missing-src", lambda w: ["convert", str(w.root / "nope"), str(w.out), "--to", "dsv4"], 2,
         "no model"),
    Case("chat-missing-model", lambda w: ["chat", str(w.root / "nope"), "-p", "hi"], 2, "no model"),
    Case("info-missing-model", lambda w: ["info", str(w.root / "nope")], 2, "or a preset"),
    Case("bench-missing-model", lambda w: ["bench", str(w.root / "nope")], 2, ""),
    Case("unknown-flag", lambda w: ["convert", "--bogus"], 2, "No such option"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_clean_error_and_loses_nothing(world, case):
    case.setup(world)
    before = tree_digest(world.src)
    result = dsv4(*case.argv(world))
    assert_one_line_error(result, case.code, case.text)
    assert tree_digest(world.src) == before
    for path, data in world.keep.items():
        assert path.read_bytes() == data
    beside = {p.name for p in world.root.iterdir()} - {"models", *case.allowed}
    assert beside == set(), f"left behind: {beside}"


# ------------------------------------------------------------------------------ full disks and permissions


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a few MiB (needs root or an unprivileged user namespace; skipped elsewhere)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def small_disk_bytes(mount: Path) -> int:
    return shutil.disk_usage(mount).free


def test_full_disk_is_refused_up_front_and_leaves_nothing(world, small_disk):
    """Outputs that cannot fit are refused before anything is written."""
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (small_disk_bytes(small_disk) - MiB // 4))  # less room than any output needs
    before = tree_digest(world.src)
    for argv in (["synth", "tiny", str(small_disk / "t")], _convert(world, small_disk / "c"),
                 _quantize(world, small_disk / "q")):
        assert_one_line_error(dsv4(*argv), 1, "is free")
    demo = dsv4("chat", "-p", "What is 2 + 2?", env={"XDG_CACHE_HOME": str(small_disk / "cache")})
    assert_one_line_error(demo, 1, "is free")
    assert tree_digest(world.src) == before
    assert sorted(p.name for p in small_disk.iterdir()) in (["filler"], ["cache", "filler"])
    assert not [p for p in small_disk.rglob("*") if p.is_file() and p != filler]


def test_disk_full_midway_keeps_a_resumable_partial_and_the_rerun_finishes(world, small_disk):
    """The shards fit but the copied tokenizer does not: one error line naming the partial output;
    after space is freed the same command resumes and produces the same checkpoint as a clean run."""
    big = world.src / "tokenizer.json"
    big.write_bytes(b"{}" + b" " * (7 * MiB))  # a source file the output copies
    before = tree_digest(world.src)
    out = small_disk / "c"
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (8 * MiB))  # 8 MiB left: the shards fit, the shards and the copy do not
    error = assert_one_line_error(dsv4(*_convert(world, out)), 1, "disk is full")
    partial = small_disk / "c.dsv4-convert-partial"
    assert str(partial) in error and partial.is_dir() and not out.exists()
    filler.unlink()
    assert dsv4(*_convert(world, out)).returncode == 0
    clean = dsv4(*_convert(world, world.root / "clean"))
    assert clean.returncode == 0 and tree_digest(out) == tree_digest(world.root / "clean")
    assert tree_digest(world.src) == before
    assert sorted(p.name for p in small_disk.iterdir()) == ["c"]


def unprivileged() -> tuple[str, ...]:
    """A command prefix that drops root's power to ignore file permissions (nothing as non-root)."""
    if os.geteuid() != 0:
        return ()
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: permissions cannot be tested")
    caps = "-dac_override,-dac_read_search,-fowner"
    return (setpriv, f"--inh-caps={caps}", f"--bounding-set={caps}")


def test_permission_denied_is_one_line(world):
    locked_dir = world.root / "locked"
    locked_dir.mkdir()
    locked_dir.chmod(0o555)
    unreadable = world.root / "unreadable"
    shutil.copytree(world.src, unreadable)
    (unreadable / "config.json").chmod(0o000)
    sealed = world.root / "sealed"
    shutil.copytree(world.src, sealed)
    sealed.chmod(0o000)
    try:
        prefix = unprivileged()
        for argv in (_convert(world, locked_dir / "out"), _quantize(world, locked_dir / "out"),
                     ["synth", "tiny", str(locked_dir / "out")]):
            assert_one_line_error(dsv4(*argv, prefix=prefix), 1, "permission denied")
        for model in (unreadable, sealed):
            for argv in (["info", str(model)], ["convert", str(model), str(world.out), "--to", "dsv4"]):
                assert_one_line_error(dsv4(*argv, prefix=prefix), 1, "ermission denied")
        assert list(locked_dir.iterdir()) == [] and not world.out.exists()
    finally:
        sealed.chmod(0o755)
        (unreadable / "config.json").chmod(0o644)
        locked_dir.chmod(0o755)


# ------------------------------------------------------------------------------ interrupted runs


#: runs the CLI with a pause after the first finished shard is recorded: the process stops itself (SIGSTOP)
#: so that the test can kill it at a known point
PAUSING_CLI = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even when pytest runs in the background
from dsv4cli.io import convert
record = convert._write_progress
def pause_after_first(tmp, fingerprint, finished):
    record(tmp, fingerprint, finished)
    if len(finished) == 1:
        os.kill(os.getpid(), signal.SIGSTOP)
convert._write_progress = pause_after_first
from dsv4cli.cli.app import main
main(sys.argv[1:])
"""


def _wait_until_stopped(process: subprocess.Popen, limit: float = 300) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the run ended before pausing: {process.stderr.read().decode()}")
        state = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "T":
            return
        time.sleep(0.05)
    pytest.fail("the run did not reach its first shard in time")


@pytest.mark.parametrize("command,sig", [("quantize", signal.SIGKILL), ("convert", signal.SIGINT)],
                         ids=["SIGKILL-quantize", "SIGINT-convert"])
def test_a_killed_run_resumes_and_ends_like_a_clean_run(world, command, sig):
    if not Path("/proc/self/stat").exists():
        pytest.skip("needs /proc to see the paused process")
    argv = _convert(world, world.out, "--max-shard-size", "256KiB") if command == "convert" else \
        _quantize(world, world.out, "--max-shard-size", "256KiB")
    partial = world.root / f"out.dsv4-{command}-partial"
    before = tree_digest(world.src)
    process = subprocess.Popen([sys.executable, "-c", PAUSING_CLI, *argv], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env={**os.environ, "NO_COLOR": "1"})
    _wait_until_stopped(process)
    process.send_signal(sig)
    process.send_signal(signal.SIGCONT)
    _, stderr = process.communicate(timeout=120)
    assert "Traceback" not in stderr.decode()
    assert process.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 130), stderr.decode()
    assert partial.is_dir() and not world.out.exists()
    rerun = dsv4(*argv)
    assert rerun.returncode == 0, rerun.stderr.decode()
    clean_out = world.root / "clean"
    clean = dsv4(*[str(clean_out) if a == str(world.out) else a for a in argv])
    assert clean.returncode == 0
    assert tree_digest(world.out) == tree_digest(clean_out)
    assert tree_digest(world.src) == before
    assert sorted(p.name for p in world.root.iterdir()) == ["clean", "models", "out"]


def test_a_stalled_hub_is_one_line_and_leaves_nothing(tmp_path):
    """A server on 127.0.0.1 that accepts the connection and never answers: the download gives up
    after its timeout and retries, in one line, instead of hanging."""
    from tests.hubserver import StalledServer

    env = {"DSV4_HUB_TIMEOUT": "0.5", "DSV4_HUB_RETRIES": "1", "XDG_DATA_HOME": str(tmp_path / "data"),
           "XDG_STATE_HOME": str(tmp_path / "state"), "HF_HOME": str(tmp_path / "hf")}
    with StalledServer() as stalled:
        started = time.monotonic()
        result = dsv4("download", "flash", "--local-dir", str(tmp_path / "flash"),
                      env={**env, "HF_ENDPOINT": stalled.endpoint}, timeout=60)
    assert time.monotonic() - started < 30
    assert_one_line_error(result, 1, "did not answer")
    assert not (tmp_path / "flash").exists() or not [p for p in (tmp_path / "flash").rglob("*") if p.is_file()
                                                     and ".dsv4" not in p.parts]
