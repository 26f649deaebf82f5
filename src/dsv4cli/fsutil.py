"""File-system safety rules shared by every command that writes files.

* **Atomic files**: written to a unique temporary name in the same directory, fsynced, renamed.
* **Marked directories**: every staging directory dsv4 creates holds `STAGING_MARKER` (who made
  it: pid, host, purpose); every finished output directory holds `OUTPUT_MARKER`. dsv4 deletes,
  empties or replaces a directory only if it carries one of its markers (or is empty), so an
  unrelated directory that happens to have the same name is never touched.
* **Checked paths**: an output may not be, contain, or lie inside the source it is made from, may
  not be a symlink, and its parent must be a writable directory; all checked before any work.
* **Locks**: `locked(path)` takes an exclusive advisory lock (flock) on a directory or lock file.
* **Disk errors**: `disk_errors(what, path)` turns ENOSPC / EACCES / EROFS ... into one-line errors.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from dsv4cli.errors import DsvError, UsageError

STAGING_MARKER = ".dsv4-staging.json"
FILE_MODE = 0o644
OUTPUT_MARKER = ".dsv4-output.json"


class DiskError(DsvError):
    """Writing or reading files failed for a reason outside dsv4 (full disk, permissions, I/O error)."""


# ------------------------------------------------------------------------------ atomic files


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so readers see the old file or the whole new one, never a part."""
    path = Path(path)
    if path.is_dir():
        raise DiskError(f"{path} is a directory", "choose a file name")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)  # mkstemp makes 0600; a file others share (a models dir) must be readable
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_directory(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, data: Any, sort_keys: bool = False) -> None:
    """`data` as indented JSON with a final newline, atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=sort_keys) + "\n")


def fsync_directory(directory: str | Path) -> None:
    """Make a rename inside `directory` durable (best effort: not every file system allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ------------------------------------------------------------------------------ markers


def write_marker(directory: Path, name: str, record: dict[str, Any]) -> None:
    (directory / name).write_text(json.dumps({"tool": "dsv4", **record}, sort_keys=True) + "\n", encoding="utf-8")


def _staging_record(purpose: str, **extra: Any) -> dict[str, Any]:
    """Who is building a staging directory: enough to tell later whether that process still runs."""
    return {"purpose": purpose, "pid": os.getpid(), "host": socket.gethostname(), "created": time.time(), **extra}


def read_marker(directory: Path, name: str) -> dict[str, Any] | None:
    """The marker's record, or None when absent or not one of ours."""
    try:
        record = json.loads((directory / name).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and record.get("tool") == "dsv4" else None


def made_by_dsv4(directory: Path) -> bool:
    """True when `directory` is a dsv4 output or staging directory (it carries a marker)."""
    return not directory.is_symlink() and (read_marker(directory, OUTPUT_MARKER) is not None
                                           or read_marker(directory, STAGING_MARKER) is not None)


def is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def mark_output(directory: Path, purpose: str) -> None:
    """Label a finished output directory as dsv4's (so `--force` may replace it later). The label
    holds no time or pid: the same command still gives byte-identical outputs."""
    write_marker(directory, OUTPUT_MARKER, {"purpose": purpose})


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def staging_is_abandoned(directory: Path) -> bool:
    """A staging directory whose creator, on this host, has exited."""
    record = read_marker(directory, STAGING_MARKER)
    if record is None or record.get("host") != socket.gethostname():
        return False
    pid = record.get("pid")
    return isinstance(pid, int) and pid != os.getpid() and not _process_alive(pid)


def remove_dsv4_dir(directory: Path) -> None:
    """Delete a directory dsv4 made; refuse (UsageError) one without a dsv4 marker."""
    if not directory.exists() and not directory.is_symlink():
        return
    if not made_by_dsv4(directory) and not is_empty_dir(directory):
        raise UsageError(f"{directory} was not made by dsv4", "move it away yourself; dsv4 will not delete it")
    shutil.rmtree(directory)


# ------------------------------------------------------------------------------ staging


def new_staging_dir(final: Path, purpose: str) -> Path:
    """A fresh marked sibling `<final>.<purpose>-<pid>` to build `final` in; abandoned siblings of
    earlier dsv4 runs (their process has exited) are removed first."""
    remove_abandoned_staging(final, purpose)
    staging = final.with_name(f"{final.name}.{purpose}-{os.getpid()}")
    if staging.exists() or staging.is_symlink():
        remove_dsv4_dir(staging)
    staging.mkdir(parents=True)
    write_marker(staging, STAGING_MARKER, _staging_record(purpose, target=str(final)))
    return staging


def remove_abandoned_staging(final: Path, purpose: str) -> list[Path]:
    """Delete `<final>.<purpose>-<pid>` siblings left by dsv4 processes that have exited."""
    removed = []
    if not final.parent.is_dir():
        return removed
    for candidate in final.parent.glob(f"{glob_escape(final.name)}.{purpose}-*"):
        if candidate.is_dir() and not candidate.is_symlink() and staging_is_abandoned(candidate):
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
    return removed


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def open_resumable_staging(path: Path, purpose: str) -> bool:
    """Create the marked staging directory `path`, or reuse one an earlier dsv4 run left.

    Returns True when an earlier run's directory is reused. A directory at `path` that dsv4 did
    not make is refused, never emptied."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise UsageError(f"{path} exists and is not a directory dsv4 made", "move it away")
    if path.is_dir():
        if read_marker(path, STAGING_MARKER) is None and not is_empty_dir(path):
            raise UsageError(f"{path} exists and was not made by dsv4", "move it away, or choose another output")
        reused = read_marker(path, STAGING_MARKER) is not None
    else:
        path.mkdir()
        reused = False
    if not reused:
        write_marker(path, STAGING_MARKER, _staging_record(purpose))
    return reused


def empty_staging(path: Path) -> None:
    """Delete everything in a dsv4 staging directory but its marker."""
    if read_marker(path, STAGING_MARKER) is None:
        raise UsageError(f"{path} was not made by dsv4", "move it away yourself; dsv4 will not empty it")
    for child in path.iterdir():
        if child.name == STAGING_MARKER:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def move_into_place(staging: Path, out: Path) -> None:
    """Rename a finished staging directory to `out`, replacing an existing dsv4 output (or an
    empty directory); the staging marker becomes the output marker."""
    record = read_marker(staging, STAGING_MARKER) or {}
    with contextlib.suppress(FileNotFoundError):
        (staging / STAGING_MARKER).unlink()
    if not (staging / OUTPUT_MARKER).exists():
        mark_output(staging, str(record.get("purpose", "output")))
    if not out.exists() or is_empty_dir(out):
        os.replace(staging, out)
        fsync_directory(out.parent)
        return
    if not made_by_dsv4(out):
        raise UsageError(f"{out} holds files dsv4 did not write", "choose another output directory")
    old = out.with_name(f"{out.name}.replaced-{os.getpid()}")
    os.rename(out, old)
    try:
        os.rename(staging, out)
    except BaseException:
        os.rename(old, out)
        raise
    fsync_directory(out.parent)
    shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------ path checks


def _realpath_checked(path: Path) -> Path:
    """`path` with every symlink resolved (as far as it exists); a symlink loop is a usage error."""
    try:
        return Path(os.path.realpath(path, strict=True))
    except (FileNotFoundError, NotADirectoryError):  # not there (yet): resolve the part that exists
        return Path(os.path.realpath(path))
    except (OSError, RuntimeError) as exc:
        if isinstance(exc, OSError) and exc.errno != errno.ELOOP:
            raise
        raise UsageError(f"{path} cannot be resolved: it is a symlink loop", "pass a path without symlink loops") \
            from None


def overlaps(a: Path, b: Path) -> bool:
    """True when a and b are the same directory or one contains the other (after resolving links)."""
    ra, rb = _realpath_checked(a), _realpath_checked(b)
    return ra == rb or ra in rb.parents or rb in ra.parents


def check_output_dir(out: Path, sources: list[Path], force: bool) -> None:
    """Refuse an output directory that cannot be written safely, before any work is done.

    The output may not be, contain or lie inside a source; may not be a symlink (loops and
    dangling links included); an existing non-empty one needs `force` and must be a dsv4 output;
    its parent must be a writable directory."""
    if out.is_symlink():
        raise UsageError(f"the output {out} is a symlink", "pass the directory it should be written to")
    _realpath_checked(out.parent)
    for source in sources:
        if overlaps(out, source):
            raise UsageError(f"the output {out} overlaps the source {source} (one contains the other)",
                             "write the output next to the source, not into or around it")
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a directory", "choose another output path")
    if out.is_dir() and not is_empty_dir(out):
        if not force:
            raise UsageError(f"{out} already exists",
                             "choose another output directory, or pass {opt:force} to replace it")
        if not made_by_dsv4(out):
            raise UsageError(f"{out} holds files dsv4 did not write; {{opt:force}} replaces only dsv4 outputs",
                             "choose another output directory, or remove it yourself")
    check_writable_parent(out)


def check_writable_parent(out: Path) -> None:
    """The directory that will hold `out` exists (or can be created) and is writable."""
    parent = out.parent
    while not parent.exists():
        if parent.is_symlink():
            raise UsageError(f"{parent} is a dangling symlink", "fix the output path")
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{parent} is not a directory", "fix the output path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DiskError(f"permission denied: cannot create files in {parent}",
                        "choose an output directory you can write to")


# ------------------------------------------------------------------------------ locks and errors


@contextlib.contextmanager
def locked(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive, non-blocking flock on `path` (a directory or file); `what` names the
    other process in the error when it is already held."""
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # no advisory locks on this platform
            pass
        except BlockingIOError:
            raise UsageError(f"{what} is using {path}", "wait for it to finish") from None
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def file_lock(path: Path, *, wait: bool = False, busy: Callable[[str], Exception] | None = None) -> Iterator[None]:
    """Hold an exclusive flock on the lock file `path` (created; this pid written in it) for the block.

    `wait`: block until it is free. Otherwise a held lock raises `busy(pid of the holder)` (default: a
    UsageError). Where the file system has no advisory locks, the block runs unlocked."""
    with os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE), "r+") as fh:  # no truncation before the lock
        try:
            import fcntl

            fcntl.flock(fh, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (ImportError, OSError) as exc:
            if isinstance(exc, BlockingIOError):
                holder = re.match(r"\s*(\d+)", fh.read(64))
                pid = holder.group(1) if holder else "unknown"
                raise (busy(pid) if busy else UsageError(f"{path} is locked by process {pid}", "wait for it")) from None
            yield  # no locks here
            return
        fh.truncate(0)
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        yield


def free_bytes(path: Path) -> int:
    """Free bytes on the file system holding `path` (or its nearest existing parent)."""
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def check_free_space(directory: Path, needed: int, what: str) -> None:
    """Fail before writing when the file system clearly cannot hold `needed` more bytes."""
    free = free_bytes(directory)
    if needed > free:
        from dsv4cli.units import human_bytes

        raise DiskError(f"{what} needs {human_bytes(needed)} but only {human_bytes(free)} is free "
                        f"on the file system of {directory}", "free some space or choose another output directory")


_DISK_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                errno.EROFS: "the file system is read-only", errno.EIO: "an I/O error occurred",
                errno.ELOOP: "too many levels of symbolic links", errno.ENAMETOOLONG: "the file name is too long",
                errno.ENOTDIR: "a path component is not a directory", errno.EISDIR: "it is a directory"}


def describe_os_error(exc: OSError, name_file: bool = True) -> str:
    """`exc` as a short phrase ("the disk is full", "permission denied: /path")."""
    reason = _DISK_ERRNOS.get(exc.errno or 0, exc.strerror or str(exc))
    target = exc.filename if exc.filename is not None and name_file else ""
    return f"{reason}: {target}" if target else reason


@contextlib.contextmanager
def disk_errors(what: str, hint: str) -> Iterator[None]:
    """Turn an OSError raised while `what` into a one-line DiskError with `hint`."""
    try:
        yield
    except DsvError:
        raise
    except OSError as exc:
        # a full disk is about the target of `what`; the file an OSError names can be the copy's source
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        raise DiskError(f"{what} failed: {describe_os_error(exc, name_file=not full)}", hint) from None
