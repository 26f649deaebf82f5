"""Download DeepSeek-V4 repositories from the Hugging Face Hub into plain directories; list and remove them.

Layout of a downloaded model (`<data>/models/<owner>--<name>` unless `--local-dir`)::

    config.json, model-0000i-of-0000K.safetensors, ...   the repository files, at their repo paths
    .dsv4/manifest.json          what the hub listed at download time: path -> size, sha256 (LFS) or git blob id,
                                 plus the files already verified (size + mtime + digest, so re-runs skip re-hashing)
    .dsv4/incomplete/<path>.part bytes of a file still being downloaded (kept across runs, resumed with HTTP Range)

How a download works:

* One hub API call (`HfApi.model_info(files_metadata=True)`) gives the commit, every file, its size and, for LFS
  files, its SHA-256; files are then fetched from `/{repo}/resolve/{commit}/{path}` with huggingface_hub's
  `http_get`, so `HF_ENDPOINT`, `HF_TOKEN` and the hub's redirects behave as with `hf download`.
* Resume: a finished file (right size, digest verified) is skipped; a partial file continues where it stopped
  with an HTTP `Range` request (if the server ignores Range, that file restarts from zero). A file is renamed to
  its final name only once its size and digest are checked; a mismatch deletes it and fails the run.
* Files are verified by size always, by SHA-256 for LFS files and by git blob id for the small ones.
* `HF_HUB_OFFLINE=1`: no network at all; the local copy is checked against its manifest.
* Before downloading, the bytes still to fetch are compared with the free space of the target filesystem.
  `DSV4_FAKE_FREE_BYTES` (test-only) replaces the free space reported by the OS.

Plain HTTP is used even where `hf_xet` is installed: xet cannot resume a partial file, plain HTTP can.
This module never imports rich: progress goes through a `Reporter` that the CLI supplies.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from dsv4cli import __version__
from dsv4cli.errors import DsvError, ModelNotFound, UsageError
from dsv4cli.paths import data_dir
from dsv4cli.units import human_bytes

ALIASES = {
    "flash": "deepseek-ai/DeepSeek-V4-Flash",
    "pro": "deepseek-ai/DeepSeek-V4-Pro",
    "flash-base": "deepseek-ai/DeepSeek-V4-Flash-Base",
    "pro-base": "deepseek-ai/DeepSeek-V4-Pro-Base",
}
DEFAULT_ENDPOINT = "https://huggingface.co"
STATE_DIR = ".dsv4"
MANIFEST_NAME = "manifest.json"
INCOMPLETE_DIR = "incomplete"
PART_SUFFIX = ".part"
REGISTRY_NAME = "local-models.json"
#: Test-only: pretend the target filesystem has this many free bytes.
FAKE_FREE_ENV = "DSV4_FAKE_FREE_BYTES"
DEFAULT_MAX_WORKERS = 8
MANIFEST_SAVE_SECONDS = 5.0
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_TRUE = {"1", "ON", "YES", "TRUE"}
_HASH_BLOCK = 8 << 20



# ======================================================================= errors


class DownloadError(DsvError):
    """A download could not finish (network, server, verification)."""


class DiskSpaceError(DownloadError):
    """Not enough free space on the target filesystem."""


class VerificationError(DownloadError):
    """A downloaded file does not match the size or digest the hub announced."""


class OfflineMissing(DsvError):
    """Offline mode, and the local copy is missing or incomplete."""


class DownloadInterrupted(DsvError):
    """Ctrl-C during a download (partial files are kept for the next run)."""

    exit_code = 130


class DownloadCancelled(Exception):
    """Raised inside worker threads when the user interrupts the download."""


# ======================================================================= data


@dataclass(frozen=True)
class RemoteFile:
    """One repository file as the hub lists it."""

    path: str
    size: int
    sha256: str | None = None  # LFS files
    blob_id: str | None = None  # git blob id (sha1) of non-LFS files

    @property
    def digest(self) -> str | None:
        return self.sha256 or self.blob_id

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "sha256": self.sha256, "blob_id": self.blob_id}

    @classmethod
    def from_dict(cls, path: str, data: dict[str, Any]) -> RemoteFile:
        return cls(path, int(data["size"]), data.get("sha256"), data.get("blob_id"))


@dataclass(frozen=True)
class Snapshot:
    """A repository at one commit: every file with its size and digest."""

    repo_id: str
    revision: str
    commit: str
    files: tuple[RemoteFile, ...]


@dataclass
class Manifest:
    """`.dsv4/manifest.json`: the files wanted in a local copy and those already verified."""

    repo_id: str
    revision: str
    commit: str
    files: dict[str, RemoteFile]
    verified: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"format": 1, "repo_id": self.repo_id, "revision": self.revision, "commit": self.commit,
                "files": {p: f.to_dict() for p, f in sorted(self.files.items())},
                "verified": dict(sorted(self.verified.items()))}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        files = {p: RemoteFile.from_dict(p, d) for p, d in data["files"].items()}
        return cls(data["repo_id"], data.get("revision") or "main", data.get("commit") or "", files,
                   dict(data.get("verified") or {}))


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


class Reporter(Protocol):
    """Where a download reports progress (the CLI draws one aggregate bar or prints one line per file)."""

    def start(self, total_bytes: int, done_bytes: int, files: int) -> None: ...
    def advance(self, done_bytes: int) -> None: ...
    def file_done(self, path: str, size: int) -> None: ...
    def note(self, message: str) -> None: ...
    def close(self) -> None: ...


class SilentReporter:
    """A Reporter that says nothing."""

    def start(self, total_bytes: int, done_bytes: int, files: int) -> None: ...
    def advance(self, done_bytes: int) -> None: ...
    def file_done(self, path: str, size: int) -> None: ...
    def note(self, message: str) -> None: ...
    def close(self) -> None: ...


# ======================================================================= names and places


def resolve_repo_id(name: str) -> str:
    """An alias (flash, pro, flash-base, pro-base) or an `owner/name` repo id -> the repo id."""
    if name in ALIASES:
        return ALIASES[name]
    if _REPO_ID.match(name) and ".." not in name:
        return name
    raise UsageError(f"{name!r} is not a model alias or an owner/name repo id",
                     f"aliases: {', '.join(ALIASES)}")


def models_dir() -> Path:
    return data_dir() / "models"


def default_local_dir(repo_id: str) -> Path:
    owner, name = repo_id.split("/")
    return models_dir() / f"{owner}--{name}"


def hub_endpoint() -> str:
    """`HF_ENDPOINT`, read now (huggingface_hub reads it once, at import)."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def offline_mode() -> bool:
    """`HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`), read now."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in _TRUE


def state_dir(local_dir: Path) -> Path:
    return local_dir / STATE_DIR


def part_path(local_dir: Path, path: str) -> Path:
    return state_dir(local_dir) / INCOMPLETE_DIR / (path + PART_SUFFIX)


def _write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=1)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; others sharing a models dir should read it
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_manifest(local_dir: Path) -> Manifest | None:
    path = state_dir(local_dir) / MANIFEST_NAME
    try:
        return Manifest.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as err:
        raise DownloadError(f"unreadable download manifest {path}: {err}",
                            f"delete {state_dir(local_dir)} and download again") from None


def write_manifest(local_dir: Path, manifest: Manifest) -> None:
    _write_json_atomic(state_dir(local_dir) / MANIFEST_NAME, manifest.to_dict())


# ======================================================================= registry of local dirs


def registry_path() -> Path:
    return data_dir() / REGISTRY_NAME


def registered_dirs() -> list[Path]:
    try:
        entries = json.loads(registry_path().read_text()).get("dirs", [])
    except (FileNotFoundError, ValueError, AttributeError):
        return []
    return [Path(entry) for entry in entries if isinstance(entry, str)]


def _save_registry(dirs: Iterable[Path]) -> None:
    unique = sorted({str(d) for d in dirs})
    _write_json_atomic(registry_path(), {"dirs": unique})


def register_dir(local_dir: Path) -> None:
    """Remember a download directory so that `dsv4 list` finds it outside the models dir."""
    dirs = registered_dirs()
    if local_dir not in dirs:
        _save_registry([*dirs, local_dir])


def unregister_dir(local_dir: Path) -> None:
    dirs = registered_dirs()
    if local_dir in dirs:
        _save_registry(d for d in dirs if d != local_dir)


# ======================================================================= hub metadata


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client's network errors (httpx2 in huggingface_hub 2.x, httpx in 1.x)."""
    for module_name in ("httpx2", "httpx"):
        try:
            module = __import__(module_name)
        except ImportError:
            continue
        return (module.HTTPError, OSError)
    return (OSError,)


def fetch_snapshot(repo_id: str, revision: str | None, endpoint: str) -> Snapshot:
    """List the repository at `revision` (default branch if None): commit, files, sizes, digests."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    api = HfApi(endpoint=endpoint, library_name="dsv4", library_version=__version__)
    try:
        info = api.model_info(repo_id, revision=revision, files_metadata=True)
    except GatedRepoError:
        raise DownloadError(f"access to {repo_id} is gated", "accept its terms on the Hub page, then set HF_TOKEN"
                            ) from None
    except RevisionNotFoundError:
        raise ModelNotFound(f"{repo_id} has no revision {revision!r} on {endpoint}",
                            "use a branch, tag or commit id that exists") from None
    except RepositoryNotFoundError:
        raise ModelNotFound(f"no model repository {repo_id} on {endpoint}",
                            "check the name; private or gated repos need HF_TOKEN") from None
    except HfHubHTTPError as err:
        raise DownloadError(f"the hub refused the file list of {repo_id}: {_first_line(err)}") from None
    except _transport_errors() as err:
        raise DownloadError(f"cannot reach {endpoint}: {_first_line(err)}",
                            "check the network, or set HF_HUB_OFFLINE=1 to use a local copy") from None
    files = tuple(_remote_file(sibling) for sibling in info.siblings or ())
    return Snapshot(repo_id, revision or "main", info.sha or revision or "main", files)


def _remote_file(sibling: Any) -> RemoteFile:
    if sibling.size is None:
        raise DownloadError(f"the hub did not give the size of {sibling.rfilename}")
    lfs = sibling.lfs
    if lfs:
        return RemoteFile(sibling.rfilename, int(lfs["size"]), sha256=lfs["sha256"])
    return RemoteFile(sibling.rfilename, int(sibling.size), blob_id=sibling.blob_id)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def select_files(files: Iterable[RemoteFile], include: Sequence[str], exclude: Sequence[str]) -> list[RemoteFile]:
    """The files matching `include` (all if empty) and not `exclude` (hf download glob semantics)."""
    from huggingface_hub.utils import filter_repo_objects

    return list(filter_repo_objects(files, allow_patterns=list(include) or None,
                                    ignore_patterns=list(exclude) or None, key=lambda f: f.path))


# ======================================================================= verification


def file_digest(path: Path, file: RemoteFile) -> str:
    """SHA-256 for LFS files, the git blob id (sha1 of `blob <size>\\0` + bytes) otherwise."""
    if file.sha256:
        hasher = hashlib.sha256()
    else:
        hasher = hashlib.sha1()
        hasher.update(f"blob {path.stat().st_size}\0".encode())
    with path.open("rb") as fh:
        while block := fh.read(_HASH_BLOCK):
            hasher.update(block)
    return hasher.hexdigest()


def verify_file(path: Path, file: RemoteFile) -> dict[str, Any]:
    """Check size and digest; returns the `verified` record, raises VerificationError on a mismatch."""
    size = path.stat().st_size
    if size != file.size:
        raise VerificationError(f"{file.path}: size mismatch (expected {file.size} bytes, got {size})")
    if file.digest:
        actual = file_digest(path, file)
        if actual != file.digest:
            kind = "SHA-256" if file.sha256 else "git blob id"
            raise VerificationError(f"{file.path}: {kind} mismatch (expected {file.digest[:12]}…, got {actual[:12]}…)")
    return _verified_record(path, file)


def _verified_record(path: Path, file: RemoteFile) -> dict[str, Any]:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "digest": file.digest}


def is_known_good(path: Path, file: RemoteFile, record: dict[str, Any] | None) -> bool:
    """True if `path` was verified before and has not changed since (no hashing)."""
    if not record:
        return False
    try:
        stat = path.stat()
    except FileNotFoundError:
        return False
    return (stat.st_size == file.size == record.get("size") and stat.st_mtime_ns == record.get("mtime_ns")
            and record.get("digest") == file.digest)


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
    unverified = [] if force else [f for f in files if f.path not in good and _size_matches(local_dir / f.path, f)]
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


def _size_matches(path: Path, file: RemoteFile) -> bool:
    try:
        return path.stat().st_size == file.size
    except FileNotFoundError:
        return False


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
    have = 0 if force else _size_or_zero(part)
    if 0 < have <= file.size:
        return PlannedFile(file, "resume", have)
    return PlannedFile(file, "get")


def _size_or_zero(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def free_bytes(local_dir: Path) -> int:
    """Free bytes on the filesystem that holds (or will hold) `local_dir`."""
    fake = os.environ.get(FAKE_FREE_ENV)
    if fake:
        return int(fake)
    probe = local_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def check_disk_space(plan: Plan) -> None:
    needed, free = plan.needed_bytes, free_bytes(plan.local_dir)
    if needed > free:
        raise DiskSpaceError(f"not enough disk space for {plan.repo_id}: need {human_bytes(needed)}, "
                             f"{human_bytes(free)} free in {plan.local_dir}",
                             "free some space or choose another --local-dir")


# ======================================================================= download


def prepare(request: DownloadRequest) -> tuple[str, Path, Manifest | None]:
    """Validate the request: repo id, target directory, and any manifest already there."""
    if request.max_workers < 1:
        raise UsageError("--max-workers must be at least 1")
    repo_id = resolve_repo_id(request.repo)
    local_dir = Path(os.path.abspath(os.path.expanduser(request.local_dir or default_local_dir(repo_id))))
    if local_dir.exists() and not local_dir.is_dir():
        raise UsageError(f"{local_dir} exists and is not a directory")
    manifest = read_manifest(local_dir)
    if manifest is not None and manifest.repo_id != repo_id:
        raise UsageError(f"{local_dir} holds {manifest.repo_id}, not {repo_id}",
                         "choose another --local-dir, or remove it with dsv4 rm")
    return repo_id, local_dir, manifest


def make_plan(request: DownloadRequest, *, check_existing: bool = True,
              note: Callable[[str], None] | None = None) -> Plan:
    """Everything a download would do, without writing anything (online: one hub API call)."""
    repo_id, local_dir, manifest = prepare(request)
    verified = manifest.verified if manifest else {}
    if offline_mode():
        snapshot = _offline_snapshot(repo_id, request.revision, local_dir, manifest)
    else:
        snapshot = fetch_snapshot(repo_id, request.revision, hub_endpoint())
    files = select_files(snapshot.files, request.include, request.exclude)
    if not files:
        raise UsageError(f"no file of {repo_id} matches --include/--exclude",
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


def download(request: DownloadRequest, reporter: Reporter | None = None) -> DownloadResult:
    """Download (or finish, or check) a local copy; returns where it is. See the module docstring."""
    reporter = reporter or SilentReporter()
    plan = make_plan(request, note=reporter.note)
    if offline_mode():
        return _finish_offline(plan, reporter)
    check_disk_space(plan)
    with _download_lock(plan.local_dir):
        manifest = _updated_manifest(plan)
        write_manifest(plan.local_dir, manifest)
        register_dir(plan.local_dir)
        resumed = [item for item in plan.items if item.action == "resume"]
        if resumed:
            reporter.note(f"resuming {len(resumed)} partial file(s) where they stopped (HTTP Range), "
                          f"{human_bytes(sum(item.have_bytes for item in resumed))} already downloaded")
        try:
            fetched = _fetch_all(plan, manifest, request.max_workers, reporter)
        finally:
            write_manifest(plan.local_dir, manifest)
    skipped = [item.file.path for item in plan.items if item.action == "have"]
    if not fetched:
        reporter.note(f"{plan.repo_id}: all {len(skipped)} files already present and verified")
    return DownloadResult(plan.local_dir, fetched, skipped, plan.needed_bytes)


@contextmanager
def _download_lock(local_dir: Path) -> Iterator[None]:
    """Hold `.dsv4/lock` while downloading, so that two runs never append to the same `.part` file."""
    path = state_dir(local_dir) / "lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: no advisory lock; verification still catches a mangled file
        yield
        return
    with path.open("w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DownloadError(f"another dsv4 download is writing to {local_dir}", "wait for it to finish"
                                ) from None
        yield


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


class _Progress:
    """Adds up the bytes of all files for one aggregate bar; lets workers notice a cancel."""

    def __init__(self, reporter: Reporter, kept_bytes: dict[str, int]):
        self.reporter = reporter
        self.cancel = threading.Event()
        self._lock = threading.Lock()
        self._credited = dict(kept_bytes)
        self._done = sum(kept_bytes.values())

    def set_file(self, path: str, size_on_disk: int) -> None:
        """A file (re)starts with `size_on_disk` of its bytes already there (0 if it restarts from zero)."""
        with self._lock:
            self._done += size_on_disk - self._credited.get(path, 0)
            self._credited[path] = size_on_disk
            done = self._done
        self.reporter.advance(done)

    def add(self, path: str, n: int) -> None:
        if self.cancel.is_set():
            raise DownloadCancelled()
        with self._lock:
            self._credited[path] = self._credited.get(path, 0) + n
            self._done += n
            done = self._done
        self.reporter.advance(done)


class _FileBar:
    """The tqdm-like object `http_get` drives; forwards to the aggregate `_Progress`."""

    def __init__(self, *, progress: _Progress, path: str, resume_from: int = 0, initial: int = 0, **_: Any):
        self.progress, self.path = progress, path
        if initial < resume_from:
            progress.reporter.note(f"{path}: the server ignored the Range request; this file restarts from zero")
        progress.set_file(path, initial)

    def update(self, n: int) -> None:
        self.progress.add(self.path, n)

    def __enter__(self) -> _FileBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _fetch_all(plan: Plan, manifest: Manifest, max_workers: int, reporter: Reporter) -> list[str]:
    """Fetch the missing files in parallel; record each verified one in `manifest`; raise on any failure."""
    todo = plan.to_fetch
    if not todo:
        return []
    progress = _Progress(reporter, {item.file.path: item.have_bytes for item in todo})
    reporter.start(sum(item.file.size for item in todo), sum(item.have_bytes for item in todo), len(todo))
    fetcher = functools.partial(_fetch_one, plan.repo_id, plan.commit, plan.local_dir, progress)
    fetched: list[str] = []
    failures: list[BaseException] = []
    saved_at = time.monotonic()
    pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="dsv4-download")
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
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        reporter.close()
    if failures:
        raise _summarise(failures, len(todo))
    return fetched


def _summarise(failures: list[BaseException], total: int) -> DsvError:
    first = failures[0]
    error = first if isinstance(first, DsvError) else DownloadError(_first_line(first))
    if len(failures) > 1:
        error = type(error)(f"{len(failures)} of {total} files failed; first: {error.message}", error.hint)
    return error


def _fetch_one(repo_id: str, commit: str, local_dir: Path, progress: _Progress, item: PlannedFile) -> dict[str, Any]:
    """Download one file to its `.part`, verify it, rename it into place; returns its verified record.

    A kept partial file that fails verification is thrown away and the file fetched once more from zero.
    """
    part = part_path(local_dir, item.file.path)
    part.parent.mkdir(parents=True, exist_ok=True)
    if item.action == "get":
        part.unlink(missing_ok=True)
    resumed = _size_or_zero(part) > 0
    try:
        record = _download_and_verify(repo_id, commit, item.file, part, progress)
    except VerificationError as err:
        if not resumed:
            raise _bad_file(err) from None
        progress.reporter.note(f"{item.file.path}: the kept partial download did not verify; fetching it from zero")
        try:
            record = _download_and_verify(repo_id, commit, item.file, part, progress)
        except VerificationError as again:
            raise _bad_file(again) from None
    destination = local_dir / item.file.path
    destination.parent.mkdir(parents=True, exist_ok=True)
    os.replace(part, destination)
    return record


def _download_and_verify(repo_id: str, commit: str, file: RemoteFile, part: Path, progress: _Progress
                         ) -> dict[str, Any]:
    """Complete `part` and check it; a part that fails the check is deleted."""
    _http_download(repo_id, commit, file, part, progress)
    try:
        return verify_file(part, file)
    except VerificationError:
        part.unlink(missing_ok=True)
        raise


def _bad_file(err: VerificationError) -> VerificationError:
    return VerificationError(f"{err.message}; the bad file was deleted", "run the same command again to fetch it again")


def _http_download(repo_id: str, commit: str, file: RemoteFile, part: Path, progress: _Progress) -> None:
    """Append the missing bytes of `file` to `part` (HTTP Range from its current size)."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    url = hf_hub_url(repo_id, file.path, revision=commit, endpoint=hub_endpoint())
    headers = build_hf_headers(library_name="dsv4", library_version=__version__)
    try:
        with part.open("ab") as fh:
            kept = fh.tell()
            bar = functools.partial(_FileBar, progress=progress, path=file.path, resume_from=kept)
            http_get(url, fh, resume_size=kept, headers=headers, expected_size=file.size, tqdm_class=bar)
    except DownloadCancelled:
        raise
    except (HfHubHTTPError, *_transport_errors()) as err:
        kept = _size_or_zero(part)
        if kept > file.size:
            part.unlink(missing_ok=True)
            kept = 0
        raise DownloadError(f"{file.path}: download failed: {_first_line(err)}",
                            f"run the same command again to resume ({human_bytes(kept)} of "
                            f"{human_bytes(file.size)} kept)") from None


# ======================================================================= list and rm


@dataclass(frozen=True)
class LocalModel:
    """A downloaded model as `dsv4 list` shows it."""

    repo_id: str
    revision: str
    commit: str
    path: Path
    files: int
    files_present: int
    bytes_present: int
    bytes_expected: int
    partial_bytes: int

    @property
    def complete(self) -> bool:
        return self.files_present == self.files

    def to_dict(self) -> dict[str, Any]:
        return {"repo_id": self.repo_id, "revision": self.revision, "commit": self.commit, "path": str(self.path),
                "files": self.files, "files_present": self.files_present, "bytes": self.bytes_present,
                "bytes_expected": self.bytes_expected, "partial_bytes": self.partial_bytes,
                "complete": self.complete}


def candidate_dirs() -> list[Path]:
    """Every directory that may hold a download: the models dir's children and the registered dirs."""
    root = models_dir()
    found = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    return list(dict.fromkeys([*found, *registered_dirs()]))


def describe_local(local_dir: Path) -> LocalModel | None:
    """Compare a directory with its manifest (sizes only, no hashing); None if it holds no download."""
    try:
        manifest = read_manifest(local_dir)
    except (DownloadError, OSError):
        return None
    if manifest is None:
        return None
    present = [f for f in manifest.files.values() if _size_matches(local_dir / f.path, f)]
    partial_root = state_dir(local_dir) / INCOMPLETE_DIR
    partial = sum(p.stat().st_size for p in partial_root.rglob("*" + PART_SUFFIX)) if partial_root.is_dir() else 0
    return LocalModel(manifest.repo_id, manifest.revision, manifest.commit, local_dir, len(manifest.files),
                      len(present), sum(f.size for f in present), sum(f.size for f in manifest.files.values()),
                      partial)


def list_local_models() -> list[LocalModel]:
    models = (describe_local(d) for d in candidate_dirs())
    return sorted((m for m in models if m is not None), key=lambda m: (m.repo_id, str(m.path)))


def find_local_model(name: str) -> LocalModel:
    """`name` is an alias, a repo id or a path shown by `dsv4 list`."""
    models = list_local_models()
    as_path = Path(os.path.abspath(os.path.expanduser(name)))
    matches = [m for m in models if m.path == as_path]
    if not matches:
        repo_id = ALIASES.get(name, name)
        matches = [m for m in models if m.repo_id.lower() == repo_id.lower()]
    if not matches:
        raise ModelNotFound(f"no downloaded model {name!r}", "dsv4 list shows the names and paths you can remove")
    if len(matches) > 1:
        paths = ", ".join(str(m.path) for m in matches)
        raise UsageError(f"{name!r} matches {len(matches)} local copies: {paths}", "pass the path to remove one")
    return matches[0]


def remove_local_model(model: LocalModel) -> list[Path]:
    """Delete a download. Dirs under the models dir go entirely; elsewhere only the manifest's files and
    `.dsv4/` are deleted (and the dir if that empties it). Returns what was left in place."""
    local_dir = model.path
    if local_dir.parent == models_dir():
        shutil.rmtree(local_dir, ignore_errors=True)
        unregister_dir(local_dir)
        return []
    manifest = read_manifest(local_dir)
    removed = [local_dir / path for path in (manifest.files if manifest else ())]
    for path in removed:
        path.unlink(missing_ok=True)
    shutil.rmtree(state_dir(local_dir), ignore_errors=True)
    _remove_empty_parents(removed, local_dir)
    unregister_dir(local_dir)
    return sorted(local_dir.rglob("*")) if local_dir.exists() else []


def _remove_empty_parents(removed: Iterable[Path], root: Path) -> None:
    """Remove the directories that deleting `removed` emptied, up to and including `root`."""
    parents = {parent for path in removed for parent in path.parents if parent == root or root in parent.parents}
    for directory in sorted(parents, key=lambda p: len(p.parts), reverse=True):
        if directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()
