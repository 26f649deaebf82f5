"""`dsv4 download`, `dsv4 list`, `dsv4 rm` against a local fake hub (tests/hubserver.py), no internet.

The served repository is the `tiny` preset written by `write_random_checkpoint` plus the real V4
tokenizer files. Commands run in-process through `dsv4cli.cli.app.main`, so exit codes and the one-line
error messages are the real ones; stderr is not a terminal, so progress is one line per file.
"""

from __future__ import annotations

import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from huggingface_hub import constants

from dsv4cli.cli.app import app, main
from dsv4cli.cli.hub import RichReporter, register
from dsv4cli.demo.model import packaged_tokenizer_dir
from dsv4cli.errors import ModelNotFound, UsageError
from dsv4cli.hub import layout, remote
from dsv4cli.hub.errors import DownloadCancelled
from dsv4cli.hub.progress import FileBar, Progress, SilentReporter
from dsv4cli.io.writer import write_random_checkpoint
from dsv4cli.model.presets import PRESETS
from dsv4cli.units import human_bytes
from tests.hubserver import FakeHub, files_from_dir

FLASH = "deepseek-ai/DeepSeek-V4-Flash"
OTHER = "test-org/tiny-v4"
#: the JSON files of the repo the fake hub serves (a `dsv4 synth` checkpoint, so it carries the synth marker)
JSON_FILES = {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
              "tokenizer_config.json", "dsv4-synth.json"}


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str

    @property
    def last_line(self) -> str:
        return self.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> dict[str, bytes]:
    """The repository the fake hub serves: tiny checkpoint (3 shards) + tokenizer, as {path: bytes}. dsv4's own
    bookkeeping files (`.dsv4*`, e.g. the writer's output marker) are not part of a Hub repository."""
    root = tmp_path_factory.mktemp("source")
    tokenizer = packaged_tokenizer_dir(root / "tokenizer")
    model = write_random_checkpoint(PRESETS["tiny"], root / "model", seed=0, tokenizer_dir=tokenizer,
                                    max_shard_bytes=3_000_000)
    return {name: data for name, data in files_from_dir(model).items() if not name.startswith(".dsv4")}


@pytest.fixture
def hub(source, tmp_path, monkeypatch):
    """A running fake hub serving FLASH and OTHER; the environment points dsv4 at it and at a temp XDG dir."""
    with FakeHub() as fake:
        fake.add_repo(FLASH, source)
        fake.add_repo(OTHER, source)
        monkeypatch.setenv("HF_ENDPOINT", fake.endpoint)
        monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                     layout.FAKE_FREE_ENV):
            monkeypatch.delenv(name, raising=False)
        # huggingface_hub reads these at import time: make the in-process run match the environment above.
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
        # Small read chunks, so that a cut transfer leaves a partial file behind (default: 10 MB chunks).
        monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)
        # Retries of a failing request wait milliseconds, not seconds.
        monkeypatch.setattr(remote, "RETRY_BASE_SECONDS", 0.001)
        yield fake


@pytest.fixture
def dsv4(capsys):
    """Run `dsv4 ARGS` in-process through the real entry point; returns exit code, stdout, stderr."""
    register(app)

    def run(*args: str) -> Run:
        capsys.readouterr()
        try:
            main(list(args))
            code = 0
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else 0 if done.code is None else 1
        captured = capsys.readouterr()
        return Run(code, captured.out, captured.err)

    return run


def models_dir(tmp_path: Path) -> Path:
    return tmp_path / "xdg" / "dsv4" / "models"


def local_files(directory: Path) -> dict[str, bytes]:
    """Downloaded files (the `.dsv4` bookkeeping excluded)."""
    return {k: v for k, v in files_from_dir(directory).items() if not k.startswith(".dsv4/")}


def largest(source: dict[str, bytes], suffix: str = ".safetensors") -> str:
    return max((name for name in source if name.endswith(suffix)), key=lambda name: len(source[name]))


def part_files(directory: Path) -> list[Path]:
    return sorted((directory / ".dsv4" / "incomplete").rglob("*.part"))


# ======================================================================= download


def test_download_fetches_every_file_byte_for_byte_and_prints_the_path_last(hub, dsv4, source, tmp_path):
    result = dsv4("download", "flash")
    assert result.code == 0, result.stderr
    path = models_dir(tmp_path) / "deepseek-ai--DeepSeek-V4-Flash"
    assert result.last_line == str(path)
    assert local_files(path) == source
    assert part_files(path) == []
    assert all(len(hub.gets(name)) == 1 for name in source)
    assert all(f"fetched {name}" in result.stderr for name in source)
    manifest = json.loads((path / ".dsv4" / "manifest.json").read_text())
    assert manifest["repo_id"] == FLASH and manifest["commit"] == hub.commits[FLASH]
    assert set(manifest["files"]) == set(manifest["verified"]) == set(source)

    again = dsv4("download", "flash")
    assert again.code == 0 and again.stdout.strip() == str(path)
    assert "already present and verified" in again.stderr
    assert all(len(hub.gets(name)) == 1 for name in source)


def test_changed_file_is_refetched_and_force_refetches_everything(hub, dsv4, source):
    path = Path(dsv4("download", OTHER).last_line)
    shard = largest(source)
    tampered = bytearray((path / shard).read_bytes())
    tampered[100] ^= 1
    (path / shard).write_bytes(tampered)

    result = dsv4("download", OTHER)
    assert result.code == 0, result.stderr
    assert local_files(path) == source
    assert len(hub.gets(shard)) == 2 and all(len(hub.gets(n)) == 1 for n in source if n != shard)

    forced = dsv4("download", OTHER, "--force")
    assert forced.code == 0 and local_files(path) == source
    assert len(hub.gets(shard)) == 3 and all(len(hub.gets(n)) == 2 for n in source if n != shard)


def test_dry_run_lists_files_and_total_and_writes_nothing(hub, dsv4, source, tmp_path):
    result = dsv4("download", OTHER, "--dry-run")
    assert result.code == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == len(source) + 1
    for name, data in source.items():
        assert any(line.endswith(f"  {name}") and human_bytes(len(data)) in line for line in lines)
    total = human_bytes(sum(map(len, source.values())))
    assert lines[-1].startswith(f"total: {len(source)} files, {total}; to download: {len(source)} files, {total}")
    assert not (tmp_path / "xdg").exists()
    assert not [r for r in hub.requests if r.file is not None]


def test_interrupted_download_resumes_the_partial_file_and_skips_finished_ones(hub, dsv4, source, tmp_path):
    shard = largest(source)
    hub.cut(shard, 1_000_000, then_fail=True)
    failed = dsv4("download", "flash")
    assert failed.code == 1
    assert shard in failed.stderr and "run the same command again to resume" in failed.stderr
    path = models_dir(tmp_path) / "deepseek-ai--DeepSeek-V4-Flash"
    assert not (path / shard).exists()
    (part,) = part_files(path)
    kept = part.stat().st_size
    assert 0 < kept <= 1_000_000 and part.read_bytes() == source[shard][:kept]
    assert {k: v for k, v in local_files(path).items()} == {k: v for k, v in source.items() if k != shard}

    hub.clear_faults()
    resumed = dsv4("download", "flash")
    assert resumed.code == 0, resumed.stderr
    assert "resuming 1 partial file(s)" in resumed.stderr
    assert local_files(path) == source and part_files(path) == []
    assert all(len(hub.gets(name)) == 1 for name in source if name != shard)
    assert hub.gets(shard)[-1].range == f"bytes={kept}-"


def test_a_server_that_ignores_range_restarts_the_partial_file_from_zero(hub, dsv4, source, tmp_path):
    shard = largest(source)
    hub.cut(shard, 1_000_000, then_fail=True)
    assert dsv4("download", "flash", "--include", shard).code == 1
    hub.clear_faults()
    hub.ignore_range = True
    result = dsv4("download", "flash", "--include", shard)
    assert result.code == 0, result.stderr
    assert f"{shard}: the server ignored the Range request; this file restarts from zero" in result.stderr
    assert local_files(models_dir(tmp_path) / "deepseek-ai--DeepSeek-V4-Flash") == {shard: source[shard]}


def test_dropped_connection_is_resumed_within_the_same_run(hub, dsv4, source, tmp_path):
    shard = largest(source)
    hub.cut(shard, 500_000)
    result = dsv4("download", "flash", "--include", shard)
    assert result.code == 0, result.stderr
    first, second = hub.gets(shard)
    assert first.range is None and second.range is not None and second.range.startswith("bytes=")
    path = models_dir(tmp_path) / "deepseek-ai--DeepSeek-V4-Flash"
    assert local_files(path) == {shard: source[shard]}


@pytest.mark.parametrize(("kind", "check"), [("shard", "SHA-256"), ("config.json", "git blob id")])
def test_corrupted_file_is_detected_deleted_and_fetched_again(hub, dsv4, source, tmp_path, kind, check):
    name = largest(source) if kind == "shard" else kind
    hub.corrupt.add(name)
    failed = dsv4("download", "flash")
    assert failed.code == 1
    error = failed.stderr.strip().splitlines()[-1]
    assert error.startswith("dsv4: error: ") and name in error and check in error and "deleted" in error
    path = models_dir(tmp_path) / "deepseek-ai--DeepSeek-V4-Flash"
    assert not (path / name).exists() and part_files(path) == []

    hub.clear_faults()
    fixed = dsv4("download", "flash")
    assert fixed.code == 0, fixed.stderr
    assert local_files(path) == source and len(hub.gets(name)) == 2


def test_files_already_in_place_are_hashed_not_fetched_and_a_bad_partial_restarts(hub, dsv4, source, tmp_path):
    target = tmp_path / "prefilled"
    shard = largest(source)
    for name, data in source.items():
        if name != shard:
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            (target / name).write_bytes(data)
    stale = target / ".dsv4" / "incomplete" / (shard + ".part")
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"x" * (len(source[shard]) // 2))

    result = dsv4("download", "flash", "--local-dir", str(target))
    assert result.code == 0, result.stderr
    assert f"verifying {len(source) - 1} file(s) already in {target}" in result.stderr
    assert local_files(target) == source
    assert all(hub.gets(name) == [] for name in source if name != shard)
    resumed, restarted = hub.gets(shard)
    assert resumed.range == f"bytes={len(source[shard]) // 2}-" and restarted.range is None
    assert f"{shard}: the kept partial download did not verify; fetching it from zero" in result.stderr


def test_a_second_download_into_the_same_directory_is_refused(hub, dsv4, tmp_path):
    fcntl = pytest.importorskip("fcntl")
    target = tmp_path / "busy"
    (target / ".dsv4").mkdir(parents=True)
    with (target / ".dsv4" / "lock").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        result = dsv4("download", "flash", "--local-dir", str(target))
    assert result.code == 1 and "another dsv4 download is writing to" in result.stderr


def test_not_enough_disk_space_is_refused_before_downloading(hub, dsv4, source, tmp_path, monkeypatch):
    monkeypatch.setenv(layout.FAKE_FREE_ENV, "1000")
    result = dsv4("download", "flash")
    need = human_bytes(sum(map(len, source.values())))
    assert result.code == 1
    assert result.stderr.count("\n") == 1 and f"need {need}, 1.00 kB free" in result.stderr
    assert not (tmp_path / "xdg").exists() and not [r for r in hub.requests if r.file is not None]


def test_offline_mode_uses_the_local_copy_or_fails_clearly(hub, dsv4, source, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = dsv4("download", "flash")
    assert missing.code == 1 and "offline" in missing.stderr and "no local copy" in missing.stderr
    assert hub.requests == []

    monkeypatch.delenv("HF_HUB_OFFLINE")
    path = Path(dsv4("download", "flash").last_line)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    seen = len(hub.requests)
    complete = dsv4("download", "flash")
    assert complete.code == 0 and complete.last_line == str(path) and "local copy complete" in complete.stderr
    dry = dsv4("download", "flash", "--dry-run")
    assert dry.code == 0 and "to download: 0 files" in dry.stdout
    assert len(hub.requests) == seen

    (path / "config.json").unlink()
    incomplete = dsv4("download", "flash")
    assert incomplete.code == 1 and "incomplete" in incomplete.stderr and "config.json" in incomplete.stderr
    assert len(hub.requests) == seen


def test_include_and_exclude_select_files_and_later_runs_add_to_the_copy(hub, dsv4, source, tmp_path):
    result = dsv4("download", OTHER, "--include", "*.json", "--exclude", "tokenizer*")
    assert result.code == 0, result.stderr
    path = Path(result.last_line)
    assert set(local_files(path)) == JSON_FILES - {"tokenizer.json", "tokenizer_config.json"}
    empty = dsv4("download", OTHER, "--include", "*.gguf")
    assert empty.code == 2 and "matches" in empty.stderr

    rest = dsv4("download", OTHER)
    assert rest.code == 0 and local_files(path) == source
    assert len(hub.gets("config.json")) == 1 and len(hub.gets("tokenizer.json")) == 1


def test_hf_token_reaches_the_hub(hub, dsv4, monkeypatch):
    hub.token = "hf_secret"
    denied = dsv4("download", "flash", "--include", "config.json")
    assert denied.code == ModelNotFound.exit_code and "HF_TOKEN" in denied.stderr

    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    before = len(hub.requests)
    allowed = dsv4("download", "flash", "--include", "config.json")
    assert allowed.code == 0, allowed.stderr
    later = hub.requests[before:]
    assert any(r.file == "config.json" for r in later)
    assert all(r.authorization == "Bearer hf_secret" for r in later)


def test_revisions_names_and_bad_targets(hub, dsv4, tmp_path):
    commit = hub.commits[FLASH]
    pinned = dsv4("download", FLASH, "--revision", commit, "--include", "config.json")
    assert pinned.code == 0, pinned.stderr
    assert any(r.path.endswith(f"/revision/{commit}") for r in hub.requests)
    manifest = json.loads((Path(pinned.last_line) / ".dsv4" / "manifest.json").read_text())
    assert manifest["revision"] == commit and manifest["commit"] == commit

    bad_revision = dsv4("download", "flash", "--revision", "v9")
    assert bad_revision.code == ModelNotFound.exit_code and "no revision 'v9'" in bad_revision.stderr
    no_repo = dsv4("download", "nobody/nothing")
    assert no_repo.code == ModelNotFound.exit_code and "no model repository nobody/nothing" in no_repo.stderr
    assert dsv4("download", "not a repo").code == 2
    assert dsv4("download", "flash", "--max-workers", "0").code == 2
    taken = dsv4("download", OTHER, "--local-dir", pinned.last_line)
    assert taken.code == 2 and f"holds {FLASH}" in taken.stderr


# ======================================================================= list and rm


def test_list_and_rm(hub, dsv4, source, tmp_path, monkeypatch):
    flash = Path(dsv4("download", "flash").last_line)
    elsewhere = tmp_path / "elsewhere"
    assert dsv4("download", OTHER, "--local-dir", str(elsewhere), "--include", "*.json").code == 0
    (elsewhere / "notes.txt").write_text("mine")

    listed = {m["path"]: m for m in json.loads(dsv4("list", "--json").stdout)}
    assert set(listed) == {str(flash), str(elsewhere)}
    assert listed[str(flash)] | {"complete": True} == listed[str(flash)]
    assert listed[str(flash)]["files"] == len(source) and listed[str(flash)]["bytes"] == sum(map(len, source.values()))
    assert listed[str(flash)]["revision"] == "main" and listed[str(flash)]["commit"] == hub.commits[FLASH]
    assert listed[str(elsewhere)]["files"] == len(JSON_FILES) and listed[str(elsewhere)]["complete"]

    (flash / "config.json").unlink()
    text = dsv4("list").stdout
    assert "incomplete (1 missing)" in text and "complete" in text and str(elsewhere) in text

    assert dsv4("rm", "nope", "--yes").code == ModelNotFound.exit_code
    monkeypatch.setattr(sys, "stdin", io.StringIO("n\n"))
    declined = dsv4("rm", "flash")
    assert declined.code == 1 and flash.is_dir()

    assert dsv4("download", OTHER, "--include", "config.json").code == 0
    ambiguous = dsv4("rm", OTHER, "--yes")
    assert ambiguous.code == 2 and "2 local copies" in ambiguous.stderr

    assert dsv4("rm", "flash", "--yes").code == 0 and not flash.exists()
    removed = dsv4("rm", str(elsewhere), "--yes")
    assert removed.code == 0 and "kept 1 files" in removed.stderr
    assert sorted(p.name for p in elsewhere.iterdir()) == ["notes.txt"]
    remaining = json.loads(dsv4("list", "--json").stdout)
    assert [m["repo_id"] for m in remaining] == [OTHER]
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))
    assert dsv4("rm", OTHER).code == 0 and json.loads(dsv4("list", "--json").stdout) == []


# ======================================================================= units


def test_aliases_and_repo_ids(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert layout.resolve_repo_id("pro-base") == "deepseek-ai/DeepSeek-V4-Pro-Base"
    assert layout.resolve_repo_id("someone/My-Model_1.5") == "someone/My-Model_1.5"
    for bad in ("", "a/b/c", "../x", "no-slash", "a/.."):
        with pytest.raises(UsageError):
            layout.resolve_repo_id(bad)
    expected = tmp_path / "dsv4" / "models" / "deepseek-ai--DeepSeek-V4-Pro"
    assert layout.default_local_dir("deepseek-ai/DeepSeek-V4-Pro") == expected
    assert human_bytes(999) == "999 B" and human_bytes(1_234_567_890) == "1.23 GB"


class _Recorder(SilentReporter):
    def __init__(self) -> None:
        self.done: list[int] = []
        self.notes: list[str] = []

    def advance(self, done_bytes: int) -> None:
        self.done.append(done_bytes)

    def note(self, message: str) -> None:
        self.notes.append(message)


def test_aggregate_progress_counts_bytes_across_files_and_restarts():
    recorder = _Recorder()
    progress = Progress(recorder, {"a": 100, "b": 0})
    bar_a = FileBar(progress=progress, path="a", initial=100)  # resumed: Range honoured
    bar_b = FileBar(progress=progress, path="b", initial=0)
    bar_a.update(50)
    bar_b.update(30)
    FileBar(progress=progress, path="a", resume_from=150, initial=0)  # server ignored Range: a restarts
    assert recorder.done == [100, 100, 150, 180, 30]
    assert recorder.notes == ["a: the server ignored the Range request; this file restarts from zero"]
    progress.cancel.set()
    with pytest.raises(DownloadCancelled):
        bar_b.update(1)


def test_rich_reporter_draws_one_bar():
    reporter = RichReporter()
    reporter.console.file = io.StringIO()
    reporter.start(1000, 100, 2)
    reporter.advance(600)
    reporter.file_done("a", 500)
    assert len(reporter.progress.tasks) == 1 and reporter.progress.tasks[0].completed == 600
    reporter.close()
    assert reporter.progress is None
