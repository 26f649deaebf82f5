"""How a download reports progress: the `Reporter` the CLI supplies, and the byte count behind its one bar.

The hub package never imports rich and never prints: progress goes through a `Reporter`.
"""

from __future__ import annotations

import threading
from typing import Protocol

from dsv4cli.hub.errors import DownloadCancelled


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


class Progress:
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


class FileBar:
    """One transfer of one file, as the aggregate `Progress` sees it."""

    def __init__(self, *, progress: Progress, path: str, resume_from: int = 0, initial: int = 0):
        self.progress, self.path = progress, path
        if initial < resume_from:
            progress.reporter.note(f"{path}: the server ignored the Range request; this file restarts from zero")
        progress.set_file(path, initial)

    def update(self, n: int) -> None:
        self.progress.add(self.path, n)
