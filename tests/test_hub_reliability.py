"""`dsv4 download`, `list` and `rm` under bad conditions: a hub that stalls or fails, a full or unwritable disk,
damaged bookkeeping, a download running during `rm`, and directories holding files dsv4 did not write.

Uses the fake hub and the fixtures of tests/test_hub.py; every failure must be one `dsv4: error:` line.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsv4cli.hub import download as hub_download
from dsv4cli.hub import layout
from tests import test_hub
from tests.hubserver import LISTING, StalledServer
from tests.test_hub import FLASH, OTHER, largest, local_files, models_dir, part_files

source = test_hub.source
hub = test_hub.hub
dsv4 = test_hub.dsv4


def error_line(stderr: str) -> str:
    """The error line (the last of stderr; notes such as retries come before it)."""
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("dsv4: error: "), stderr
    return line


def flash_dir(tmp_path: Path) -> Path:
    return models_dir(tmp_path) / "deepseek-ai--DeepSeek-V4-Flash"


# ======================================================================= network


@pytest.mark.timeout(60)
def test_a_hub_that_accepts_and_never_answers_times_out_in_one_line(hub, dsv4, monkeypatch):
    monkeypatch.setenv("DSV4_HUB_TIMEOUT", "0.2")
    monkeypatch.setenv("DSV4_HUB_RETRIES", "1")
    with StalledServer() as stalled:
        monkeypatch.setenv("HF_ENDPOINT", stalled.endpoint)
        started = time.monotonic()
        result = dsv4("download", "flash")
        elapsed = time.monotonic() - started
        accepted = stalled.accepted
    assert result.code == 1
    error = error_line(result.stderr)
    assert "did not answer within 0.2 s" in error and "DSV4_HUB_TIMEOUT" in error
    assert "run the same command again" in error
    assert accepted == 2 and elapsed < 10


def waits(stderr: str, what: str) -> list[str]:
    """The waits before retries that the notes on stderr announce for `what`."""
    return re.findall(rf"^{re.escape(what)}: .*; retrying in ([\d.]+) s", stderr, re.MULTILINE)


def test_transient_hub_errors_are_retried_with_backoff_then_given_up(hub, dsv4, source, tmp_path, monkeypatch):
    shard = largest(source)
    hub.fail(LISTING, 503, retry_after=1)
    hub.fail(LISTING, 0)  # connection closed without an answer
    hub.fail("config.json", 502, 429, 504)
    hub.fail(shard, 0)
    result = dsv4("download", "flash")
    assert result.code == 0, result.stderr
    assert local_files(flash_dir(tmp_path)) == source
    assert len(hub.listings()) == 3 and len(hub.gets("config.json")) == 4 and len(hub.gets(shard)) == 2
    assert waits(result.stderr, f"file list of {FLASH}") == ["1", "0.002"]  # the hub's Retry-After, then doubling
    assert waits(result.stderr, "config.json") == ["0.001", "0.002", "0.004"]
    assert waits(result.stderr, shard) == ["0.001"]
    assert "config.json: the Hub answered 504" in result.stderr

    monkeypatch.setenv("DSV4_HUB_RETRIES", "3")
    hub.broken.add(LISTING)
    before = len(hub.listings())
    listing = dsv4("download", OTHER)
    assert listing.code == 1 and len(hub.listings()) - before == 4
    error = error_line(listing.stderr)
    assert "503" in error and "gave up after 4 attempts" in error and "again later" in error

    hub.clear_faults()
    hub.fail(LISTING, 429, retry_after=3600)
    before = len(hub.listings())
    patient = dsv4("download", OTHER)
    assert patient.code == 1 and len(hub.listings()) - before == 1
    assert "429" in error_line(patient.stderr) and "3600 s" in error_line(patient.stderr)

    hub.broken.add("config.json")
    before = len(hub.gets("config.json"))
    file = dsv4("download", OTHER, "--include", "config.json")
    assert file.code == 1 and len(hub.gets("config.json")) - before == 4
    error = error_line(file.stderr)
    assert "config.json" in error and "gave up after 4 attempts" in error and "run the same command again" in error


# ======================================================================= disk and cleanup


def test_a_failing_cleanup_does_not_hide_why_the_download_stopped(hub, dsv4, source, monkeypatch):
    shard = largest(source)
    hub.broken.add(shard)
    saves: list[Path] = []
    real_write_manifest = hub_download.write_manifest

    def write_once_then_fail(local_dir: Path, manifest: layout.Manifest) -> None:
        saves.append(local_dir)
        if len(saves) > 1:
            raise PermissionError(errno.EACCES, "Permission denied", str(local_dir / ".dsv4" / "manifest.json"))
        real_write_manifest(local_dir, manifest)

    monkeypatch.setattr(hub_download, "write_manifest", write_once_then_fail)
    result = dsv4("download", "flash", "--include", shard)
    assert result.code == 1 and len(saves) == 2
    error = error_line(result.stderr)
    assert shard in error and "503" in error and "Permission denied" not in error
    assert "saving the download state" in result.stderr  # the cleanup failure is still reported, as a note


class _FillingDisk:
    """A disk with `room` bytes left for `.part` files (None: unlimited): a write that does not fit raises ENOSPC,
    and from then on the disk is `full` (the manifest cannot be saved either). `install` patches `Path.open`."""

    def __init__(self, room: int) -> None:
        self.room: int | None = room
        self.full = False

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real_open = pathlib.Path.open

        def open_on_this_disk(path: Path, mode: str = "r", *args: object, **kwargs: object):
            handle = real_open(path, mode, *args, **kwargs)
            return _FillingFile(handle, self) if path.name.endswith(".part") and "r" not in mode else handle

        monkeypatch.setattr(pathlib.Path, "open", open_on_this_disk)


class _FillingFile:
    def __init__(self, handle, disk: _FillingDisk) -> None:
        self.handle, self.disk = handle, disk

    def write(self, data) -> int:
        if self.disk.room is not None:
            if len(data) > self.disk.room:
                self.disk.full = True
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.disk.room -= len(data)
        return self.handle.write(data)

    def __getattr__(self, name: str):
        return getattr(self.handle, name)

    def __enter__(self) -> _FillingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.close()


def test_disk_full_while_downloading_is_one_line_and_the_part_file_resumes(hub, dsv4, source, tmp_path, monkeypatch):
    shard = largest(source)
    disk = _FillingDisk(room=5 * 64 * 1024 + 100)
    real_write_json = layout._write_json_atomic

    def write_json_unless_full(path: Path, data: object) -> None:
        if disk.full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_write_json(path, data)

    disk.install(monkeypatch)
    monkeypatch.setattr(layout, "_write_json_atomic", write_json_unless_full)
    result = dsv4("download", "flash", "--include", shard)
    assert result.code == 1 and disk.full
    error = error_line(result.stderr)
    assert f"disk full while writing {shard}" in error and "free" in error and "--local-dir" in error
    assert "also failed while saving the download state" in result.stderr  # the manifest save hit the full disk too
    (part,) = part_files(flash_dir(tmp_path))
    kept = part.stat().st_size
    assert kept == 5 * 64 * 1024 and part.read_bytes() == source[shard][:kept]

    disk.room, disk.full = None, False  # space freed
    resumed = dsv4("download", "flash", "--include", shard)
    assert resumed.code == 0, resumed.stderr
    assert hub.gets(shard)[-1].range == f"bytes={kept}-"
    assert local_files(flash_dir(tmp_path)) == {shard: source[shard]}


def test_permission_errors_are_one_line(hub, dsv4, tmp_path, monkeypatch):
    target = tmp_path / "readonly"
    real_mkdir = pathlib.Path.mkdir

    def refuse_under_target(path: Path, *args: object, **kwargs: object) -> None:
        if path == target or target in path.parents:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", refuse_under_target)
    unwritable = dsv4("download", "flash", "--include", "config.json", "--local-dir", str(target))
    assert unwritable.code == 1
    assert "permission denied" in error_line(unwritable.stderr).lower() and str(target) in unwritable.stderr
    monkeypatch.setattr(pathlib.Path, "mkdir", real_mkdir)

    path = Path(dsv4("download", "flash", "--include", "config.json").last_line)
    manifest = path / ".dsv4" / "manifest.json"
    real_read_text = pathlib.Path.read_text

    def unreadable_manifest(self: Path, *args: object, **kwargs: object) -> str:
        if self == manifest:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "read_text", unreadable_manifest)
    again = dsv4("download", "flash", "--include", "config.json")
    assert again.code == 1 and "permission denied" in error_line(again.stderr).lower()
    listed = dsv4("list")
    assert listed.code == 0 and "damaged" in listed.stdout and "permission denied" in listed.stdout.lower()


# ======================================================================= list and rm


def test_a_damaged_manifest_or_registry_still_lists_and_removes(hub, dsv4, tmp_path):
    flash = Path(dsv4("download", "flash", "--include", "*.json").last_line)
    elsewhere = tmp_path / "elsewhere"
    assert dsv4("download", OTHER, "--local-dir", str(elsewhere), "--include", "config.json").code == 0
    (flash / ".dsv4" / "manifest.json").write_text('{"format": 1, "repo_id": "deepseek-ai/Deep')
    (elsewhere / ".dsv4" / "manifest.json").write_text(json.dumps({"format": 1, "repo_id": OTHER}))

    listed = dsv4("list")
    assert listed.code == 0, listed.stderr
    (flash_row,) = [line for line in listed.stdout.splitlines() if line.endswith(str(flash))]
    assert flash_row.startswith(FLASH) and "damaged" in flash_row and "JSON" in flash_row
    models = {m["path"]: m for m in json.loads(dsv4("list", "--json").stdout)}
    assert "files" in models[str(elsewhere)]["damaged"] and models[str(flash)]["damaged"]
    assert not models[str(flash)]["complete"]

    removed = dsv4("rm", "flash", "--yes")
    assert removed.code == 0, removed.stderr
    assert not (flash / ".dsv4").exists() and "manifest" in removed.stderr
    assert (flash / "config.json").is_file()  # without a manifest, dsv4 cannot tell its files from yours
    assert str(flash) not in dsv4("list").stdout

    for corrupt in ('{"dirs": 5}', '{"dirs": ["relative/path", 7]}', "[1, 2]", "\xff not json"):
        (tmp_path / "xdg" / "dsv4" / "local-models.json").write_text(corrupt)
        assert dsv4("list", "--json").code == 0


def test_rm_refuses_while_a_download_holds_the_lock(hub, dsv4, tmp_path):
    pytest.importorskip("fcntl")
    path = Path(dsv4("download", "flash", "--include", "*.json").last_line)
    before = local_files(path)
    hold = ("import sys\nfrom pathlib import Path\nfrom dsv4cli.hub.layout import download_lock\n"
            "with download_lock(Path(sys.argv[1])):\n    print('locked', flush=True)\n    sys.stdin.read()\n")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        refused = dsv4("rm", "flash", "--yes")
    finally:
        holder.communicate("", timeout=30)
    assert refused.code == 1
    assert error_line(refused.stderr) == (f"dsv4: error: a download of {FLASH} is running (pid {holder.pid}); stop it "
                                          "first (wait for it to finish, or stop it, then run dsv4 rm again)")
    assert local_files(path) == before and (path / ".dsv4" / "manifest.json").is_file()
    assert dsv4("rm", "flash", "--yes").code == 0 and not path.exists()


def test_rm_deletes_only_what_dsv4_wrote_and_never_through_a_symlink(hub, dsv4, tmp_path):
    flash = Path(dsv4("download", "flash", "--include", "*.json").last_line)
    (flash / "notes.txt").write_text("mine")
    (flash / "mine").mkdir()
    (flash / "mine" / "data.bin").write_bytes(b"mine too")
    removed = dsv4("rm", "flash", "--yes")
    assert removed.code == 0, removed.stderr
    assert "kept 2 files" in removed.stderr and "notes.txt" in removed.stderr
    assert sorted(p.relative_to(flash).as_posix() for p in flash.rglob("*")) == ["mine", "mine/data.bin", "notes.txt"]

    elsewhere = tmp_path / "elsewhere"
    assert dsv4("download", OTHER, "--local-dir", str(elsewhere), "--include", "config.json").code == 0
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.txt").write_text("keep me")
    (elsewhere / "sub").symlink_to(outside)
    manifest_path = elsewhere / ".dsv4" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["sub/victim.txt"] = {"size": 7, "sha256": None, "blob_id": None}
    manifest_path.write_text(json.dumps(manifest))
    link = models_dir(tmp_path) / "test-org--linked"
    link.symlink_to(elsewhere)

    through_link = dsv4("rm", str(link), "--yes")
    assert through_link.code == 1 and "symlink" in error_line(through_link.stderr)
    assert (elsewhere / "config.json").is_file() and link.is_symlink()
    link.unlink()

    assert dsv4("rm", str(elsewhere), "--yes").code == 0
    assert (outside / "victim.txt").read_text() == "keep me" and (elsewhere / "sub").is_symlink()
    assert not (elsewhere / "config.json").exists() and not (elsewhere / ".dsv4").exists()

    (elsewhere / "sub").unlink()
    assert dsv4("download", OTHER, "--local-dir", str(elsewhere), "--include", "config.json").code == 0
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["../outside/victim.txt"] = {"size": 7, "sha256": None, "blob_id": None}
    manifest_path.write_text(json.dumps(manifest))
    listed = {m["path"]: m for m in json.loads(dsv4("list", "--json").stdout)}
    assert "unsafe" in listed[str(elsewhere)]["damaged"]
    assert dsv4("rm", str(elsewhere), "--yes").code == 0
    assert (outside / "victim.txt").read_text() == "keep me"


def test_a_hub_listing_an_unsafe_path_downloads_nothing(hub, dsv4, tmp_path):
    hub.add_repo("test-org/evil", {"config.json": b"{}", "../escape.txt": b"x", ".dsv4/manifest.json": b"{}"})
    result = dsv4("download", "test-org/evil")
    assert result.code == 1 and "unsafe file path" in error_line(result.stderr)
    assert not (models_dir(tmp_path) / "escape.txt").exists() and not (models_dir(tmp_path) / "test-org--evil").exists()
