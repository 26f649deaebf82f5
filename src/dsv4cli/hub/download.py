"""Download DeepSeek-V4 repositories from the Hugging Face Hub into plain directories: plan, then fetch.

How a download works (the on-disk layout is in `layout`, talking to the hub in `remote`, one file's transfer in
`transfer`, the checks in `verify`):

* `make_plan` lists the repository (one hub API call), selects the files and decides per file: a finished file
  (right size, digest verified) is skipped, a partial one resumes, the others are fetched from zero.
* Before downloading, the bytes still to fetch are compared with the free space of the target filesystem.
  `DSV4_FAKE_FREE_BYTES` (test-only) replaces the free space reported by the OS.
* `download` holds the directory's lock, writes the manifest, fetches the files in parallel and records each
  verified one. A file is renamed to its final name only once its size and digest are checked; a mismatch
  deletes it and fails the run.
* `HF_HUB_OFFLINE=1`: no network at all; the local copy is checked against its manifest.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsv4cli.errors import DsvError, UsageError
from dsv4cli.hub.errors import (
    DiskSpaceError,
    DownloadError,
    DownloadInterrupted,
    OfflineMissing,
    VerificationError,
    first_line,
    os_error,
    os_errors,
)
from dsv4cli.hub.layout import (
    Manifest,
    RemoteFile,
    default_local_dir,
    download_lock,
    free_bytes,
    part_path,
    read_manifest,
    register_dir,
    resolve_repo_id,
    size_or_zero,
    write_manifest,
)
from dsv4cli.hub.progress import Progress, Reporter, SilentReporter
from dsv4cli.hub.remote import Snapshot, fetch_snapshot, hub_endpoint, offline_mode, select_files
from dsv4cli.hub.transfer import download_and_verify
from dsv4cli.hub.verify import is_known_good, size_matches, verify_file
from dsv4cli.units import human_bytes

DEFAULT_MAX_WORKERS = 8
MANIFEST_SAVE_SECONDS = 5.0
_LOCAL_DIR_HINT = "fix the permissions, free some space, or choose another {opt:local_dir}"


@dataclass(frozen=True)
class PlannedFile:
    """What a download will do with one file.

    `have`: present and verified; `check`: right size, not verified yet (dry run only, a real run hashes it
    while planning); `resume`: `have_bytes` of it are in its `.part`; `get`: fetch from zero.
    """

    file: RemoteFile
    action: str
    have_bytes: int = 0

    @property
    def remaining(self) -> int:
        return 0 if self.action in ("have", "check") else self.file.size - self.have_bytes


@dataclass
class Plan:
    """The files selected for a local copy and what each needs."""

    repo_id: str
    revision: str
    commit: str
    local_dir: Path
    items: list[PlannedFile]
    verified: dict[str, dict[str, Any]] = field(default_factory=dict)
    repo_files: dict[str, RemoteFile] = field(default_factory=dict)

    @property
    def to_fetch(self) -> list[PlannedFile]:
        return [item for item in self.items if item.action in ("resume", "get")]

    @property
    def total_bytes(self) -> int:
        return sum(item.file.size for item in self.items)

    @property
    def needed_bytes(self) -> int:
        return sum(item.remaining for item in self.items)


@dataclass(frozen=True)
class DownloadRequest:
    """The `dsv4 download` flags."""

    repo: str
    revision: str | None = None
    include: Sequence[str] = ()
    exclude: Sequence[str] = ()
    local_dir: Path | None = None
    max_workers: int = DEFAULT_MAX_WORKERS
    force: bool = False


@dataclass(frozen=True)
class DownloadResult:
    local_dir: Path
    fetched: list[str]
    skipped: list[str]
    bytes_fetched: int


# ======================================================================= planning


def plan_download(plan: Plan, *, force: bool = False, check_existing: bool = True,
                  max_workers: int = DEFAULT_MAX_WORKERS, note: Callable[[str], None] | None = None) -> Plan:
    """Decide per selected file: `have`, `check`, `resume` or `get`.

    `plan.items` comes in with every selected file and `plan.verified` with the manifest's records. With
    `check_existing`, files already there without a valid record are hashed now (in parallel); without it
    (dry run) they are marked `check`.
    """
    files = [item.file for item in plan.items]
    local_dir = plan.local_dir
    by_path = {f.path: f for f in files}
    good = {} if force else {p: r for p, r in plan.verified.items()
                             if p in by_path and is_known_good(local_dir / p, by_path[p], r)}
    unverified = [] if force else [f for f in files if f.path not in good and size_matches(local_dir / f.path, f)]
    if check_existing and unverified:
        if note:
            note(f"verifying {len(unverified)} file(s) already in {local_dir} "
                 f"({human_bytes(sum(f.size for f in unverified))})")
        with ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
            records = list(pool.map(lambda f: _verify_or_none(local_dir / f.path, f), unverified))
        good.update({f.path: r for f, r in zip(unverified, records, strict=True) if r is not None})
        unverified = []
    unchecked = {f.path for f in unverified}
    plan.items = [_plan_one(f, local_dir, f.path in good, f.path in unchecked, force) for f in files]
    plan.verified = good
    return plan


def _verify_or_none(path: Path, file: RemoteFile) -> dict[str, Any] | None:
    try:
        return verify_file(path, file)
    except VerificationError:
        return None


def _plan_one(file: RemoteFile, local_dir: Path, good: bool, unchecked: bool, force: bool) -> PlannedFile:
    if good:
        return PlannedFile(file, "have")
    if unchecked:
        return PlannedFile(file, "check")
    part = part_path(local_dir, file.path)
    have = 0 if force else size_or_zero(part)
    if 0 < have <= file.size:
        return PlannedFile(file, "resume", have)
    return PlannedFile(file, "get")


def check_disk_space(plan: Plan) -> None:
    needed, free = plan.needed_bytes, free_bytes(plan.local_dir)
    if needed > free:
        raise DiskSpaceError(f"not enough disk space for {plan.repo_id}: need {human_bytes(needed)}, "
                             f"{human_bytes(free)} free in {plan.local_dir}",
                             "free some space or choose another {opt:local_dir}")


# ======================================================================= download


def prepare(request: DownloadRequest) -> tuple[str, Path, Manifest | None]:
    """Validate the request: repo id, target directory, and any manifest already there."""
    if request.max_workers < 1:
        raise UsageError("{opt:max_workers} must be at least 1")
    repo_id = resolve_repo_id(request.repo)
    local_dir = Path(os.path.abspath(os.path.expanduser(request.local_dir or default_local_dir(repo_id))))
    if local_dir.exists() and not local_dir.is_dir():
        raise UsageError(f"{local_dir} exists and is not a directory")
    manifest = read_manifest(local_dir)
    if manifest is not None and manifest.repo_id != repo_id:
        raise UsageError(f"{local_dir} holds {manifest.repo_id}, not {repo_id}",
                         "choose another {opt:local_dir}, or remove it with dsv4 rm")
    return repo_id, local_dir, manifest


@os_errors(_LOCAL_DIR_HINT)
def make_plan(request: DownloadRequest, *, check_existing: bool = True,
              note: Callable[[str], None] | None = None) -> Plan:
    """Everything a download would do, without writing anything (online: one hub API call)."""
    repo_id, local_dir, manifest = prepare(request)
    verified = manifest.verified if manifest else {}
    if offline_mode():
        snapshot = _offline_snapshot(repo_id, request.revision, local_dir, manifest)
    else:
        snapshot = fetch_snapshot(repo_id, request.revision, hub_endpoint(), note)
    files = select_files(snapshot.files, request.include, request.exclude)
    if not files:
        raise UsageError(f"no file of {repo_id} matches {{opt:include}}/{{opt:exclude}}",
                         f"{len(snapshot.files)} files in the repository")
    plan = Plan(repo_id, snapshot.revision, snapshot.commit, local_dir, [PlannedFile(f, "get") for f in files],
                dict(verified), {f.path: f for f in snapshot.files})
    return plan_download(plan, force=request.force and not offline_mode(), check_existing=check_existing,
                         max_workers=request.max_workers, note=note)


def _offline_snapshot(repo_id: str, revision: str | None, local_dir: Path, manifest: Manifest | None) -> Snapshot:
    if manifest is None:
        raise OfflineMissing(f"offline (HF_HUB_OFFLINE is set) and there is no local copy of {repo_id} in {local_dir}",
                             "unset HF_HUB_OFFLINE to download it")
    if revision and revision not in (manifest.revision, manifest.commit):
        raise OfflineMissing(f"offline and the local copy of {repo_id} is revision {manifest.revision} "
                             f"({manifest.commit[:12]}), not {revision}", "unset HF_HUB_OFFLINE to download it")
    return Snapshot(repo_id, manifest.revision, manifest.commit, tuple(manifest.files.values()))


@os_errors(_LOCAL_DIR_HINT)
def download(request: DownloadRequest, reporter: Reporter | None = None) -> DownloadResult:
    """Download (or finish, or check) a local copy; returns where it is. See the module docstring."""
    reporter = reporter or SilentReporter()
    plan = make_plan(request, note=reporter.note)
    if offline_mode():
        return _finish_offline(plan, reporter)
    check_disk_space(plan)
    with download_lock(plan.local_dir):
        manifest = _updated_manifest(plan)
        write_manifest(plan.local_dir, manifest)
        register_dir(plan.local_dir)
        resumed = [item for item in plan.items if item.action == "resume"]
        if resumed:
            reporter.note(f"resuming {len(resumed)} partial file(s) where they stopped (HTTP Range), "
                          f"{human_bytes(sum(item.have_bytes for item in resumed))} already downloaded")
        save = functools.partial(write_manifest, plan.local_dir, manifest)
        with _cleanup(save, "saving the download state", reporter.note):
            fetched = _fetch_all(plan, manifest, request.max_workers, reporter)
    skipped = [item.file.path for item in plan.items if item.action == "have"]
    if not fetched:
        reporter.note(f"{plan.repo_id}: all {len(skipped)} files already present and verified")
    return DownloadResult(plan.local_dir, fetched, skipped, plan.needed_bytes)


@contextmanager
def _cleanup(action: Callable[[], object], what: str, note: Callable[[str], None]) -> Iterator[None]:
    """Run `action` after the body. If the body failed, its error is the one raised: a failure of `action` is then
    only reported through `note`, because a cleanup error must never hide why a download stopped."""
    try:
        yield
    except BaseException:
        try:
            action()
        except Exception as err:
            with contextlib.suppress(Exception):
                note(f"also failed while {what}: {first_line(err)}")
        raise
    action()


def _finish_offline(plan: Plan, reporter: Reporter) -> DownloadResult:
    missing = plan.to_fetch
    if missing:
        raise OfflineMissing(f"offline and the local copy of {plan.repo_id} is incomplete: {len(missing)} of "
                             f"{len(plan.items)} files missing or not verified (first: {missing[0].file.path})",
                             "unset HF_HUB_OFFLINE and run dsv4 download again to finish it")
    manifest = read_manifest(plan.local_dir)
    if manifest is not None and any(p not in manifest.verified for p in plan.verified):
        manifest.verified.update(plan.verified)
        write_manifest(plan.local_dir, manifest)
    reporter.note(f"{plan.repo_id}: local copy complete ({len(plan.items)} files, {human_bytes(plan.total_bytes)});"
                  " offline, the hub was not checked")
    return DownloadResult(plan.local_dir, [], [item.file.path for item in plan.items], 0)


def _updated_manifest(plan: Plan) -> Manifest:
    """The manifest after this download: the new selection plus the files wanted before, as listed at this
    commit (a file gone from the repo is dropped; a changed one no longer matches its old record)."""
    old = read_manifest(plan.local_dir)
    files = {item.file.path: item.file for item in plan.items}
    verified = dict(plan.verified)
    if old is not None:
        for path in old.files:
            if path not in files and path in plan.repo_files:
                files[path] = plan.repo_files[path]
                if path in old.verified:
                    verified[path] = old.verified[path]
    return Manifest(plan.repo_id, plan.revision, plan.commit, files, verified)


def _fetch_all(plan: Plan, manifest: Manifest, max_workers: int, reporter: Reporter) -> list[str]:
    """Fetch the missing files in parallel; record each verified one in `manifest`; raise on any failure."""
    todo = plan.to_fetch
    if not todo:
        return []
    progress = Progress(reporter, {item.file.path: item.have_bytes for item in todo})
    reporter.start(sum(item.file.size for item in todo), sum(item.have_bytes for item in todo), len(todo))
    fetcher = functools.partial(_fetch_one, plan.repo_id, plan.commit, plan.local_dir, progress)
    fetched: list[str] = []
    failures: list[BaseException] = []
    saved_at = time.monotonic()
    pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="dsv4-download")
    stop_pool = functools.partial(pool.shutdown, wait=True, cancel_futures=True)
    with (_cleanup(reporter.close, "closing the progress display", reporter.note),
          _cleanup(stop_pool, "stopping the download threads", reporter.note)):
        try:
            futures = {pool.submit(fetcher, item): item for item in todo}
            for future in as_completed(futures):
                item = futures[future]
                try:
                    manifest.verified[item.file.path] = future.result()
                except Exception as err:
                    failures.append(err)
                    continue
                fetched.append(item.file.path)
                reporter.file_done(item.file.path, item.file.size)
                if time.monotonic() - saved_at > MANIFEST_SAVE_SECONDS:  # survive a kill -9 without re-hashing
                    write_manifest(plan.local_dir, manifest)
                    saved_at = time.monotonic()
        except KeyboardInterrupt:
            progress.cancel.set()
            raise DownloadInterrupted("download interrupted",
                                      "run the same command again to resume; partial files are kept") from None
        except BaseException:
            progress.cancel.set()
            raise
    if failures:
        raise _summarise(failures, len(todo))
    return fetched


def _summarise(failures: list[BaseException], total: int) -> DsvError:
    first = failures[0]
    if isinstance(first, DsvError):
        error = first
    elif isinstance(first, OSError):
        error = os_error(first, "run the same command again to resume; " + _LOCAL_DIR_HINT)
    else:
        error = DownloadError(first_line(first))
    if len(failures) > 1:
        error = type(error)(f"{len(failures)} of {total} files failed; first: {error.message}", error.hint)
    return error


def _fetch_one(repo_id: str, commit: str, local_dir: Path, progress: Progress, item: PlannedFile) -> dict[str, Any]:
    """Download one file to its `.part`, verify it, rename it into place; returns its verified record.

    A kept partial file that fails verification is thrown away and the file fetched once more from zero.
    """
    part = part_path(local_dir, item.file.path)
    part.parent.mkdir(parents=True, exist_ok=True)
    if item.action == "get":
        part.unlink(missing_ok=True)
    resumed = size_or_zero(part) > 0
    fetch = functools.partial(download_and_verify, repo_id, commit, local_dir, item.file, progress)
    try:
        record = fetch()
    except VerificationError as err:
        if not resumed:
            raise _bad_file(err) from None
        progress.reporter.note(f"{item.file.path}: the kept partial download did not verify; fetching it from zero")
        try:
            record = fetch()
        except VerificationError as again:
            raise _bad_file(again) from None
    destination = local_dir / item.file.path
    destination.parent.mkdir(parents=True, exist_ok=True)
    os.replace(part, destination)
    return record


def _bad_file(err: VerificationError) -> VerificationError:
    return VerificationError(f"{err.message}; the bad file was deleted", "run the same command again to fetch it again")
