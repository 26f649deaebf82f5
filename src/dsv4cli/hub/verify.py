"""Is a local file the one the hub listed: its size always, its SHA-256 for LFS files, its git blob id for the
small ones; a file verified before is trusted while its size and mtime stay the same (no re-hashing)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from dsv4cli.hub.errors import VerificationError
from dsv4cli.hub.layout import RemoteFile

_HASH_BLOCK = 8 << 20


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


def size_matches(path: Path, file: RemoteFile) -> bool:
    try:
        return path.stat().st_size == file.size
    except OSError:  # missing, or not reachable (a later write says why, in one line)
        return False
