"""The conversation log: every chat, one-shot or REPL, kept as a transcript under the XDG state dir.

Like simonw's `llm logs`: each conversation is one transcript file (the format of `/save`, plus the
MODEL it ran on), rewritten atomically after every turn, in `$XDG_STATE_HOME/dsv4/logs/`. `dsv4 chat -c`
goes on with the newest one; `dsv4 logs` lists them and `dsv4 logs ID` shows one.
"""

from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsv4cli import paths
from dsv4cli.errors import UsageError


def logs_dir() -> Path:
    return paths.state_dir() / "logs"


def new_log_path(now: datetime.datetime | None = None) -> Path:
    """A fresh file name for a new conversation: its start time, then a counter if that is taken."""
    stamp = (now or datetime.datetime.now()).strftime("%Y%m%d-%H%M%S")
    folder = logs_dir()
    for n in range(1000):
        path = folder / (f"{stamp}.json" if n == 0 else f"{stamp}-{n}.json")
        if not path.exists():
            return path
    return folder / f"{stamp}-{os.getpid()}.json"


@dataclass
class LogEntry:
    """One logged conversation, as `dsv4 logs` lists it."""

    id: str
    path: Path
    modified: float
    model: str | None
    turns: int  # user messages
    first_prompt: str

    @property
    def when(self) -> str:
        return datetime.datetime.fromtimestamp(self.modified).strftime("%Y-%m-%d %H:%M")


def _entry(path: Path) -> LogEntry | None:
    """The log entry of `path`, or None when the file is not a readable transcript."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        messages = data["messages"]
        users = [m.get("content", "") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        modified = path.stat().st_mtime
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    model = data.get("model") if isinstance(data.get("model"), str) else None
    first = users[0] if users and isinstance(users[0], str) else ""
    return LogEntry(path.stem, path, modified, model, len(users), first)


def list_logs() -> list[LogEntry]:
    """The logged conversations, newest first (files that are not transcripts are left out)."""
    folder = logs_dir()
    if not folder.is_dir():
        return []
    entries = [e for p in folder.glob("*.json") if (e := _entry(p)) is not None]
    return sorted(entries, key=lambda e: (e.modified, e.id), reverse=True)


def find_log(log_id: str | None) -> LogEntry:
    """The conversation `log_id` (None: the newest); UsageError when there is none."""
    entries = list_logs()
    if not entries:
        raise UsageError("no logged conversations yet",
                         "chat first (every chat is logged unless {opt:no_log} is given)")
    if log_id is None:
        return entries[0]
    for entry in entries:
        if entry.id == log_id:
            return entry
    raise UsageError(f"no logged conversation {log_id!r}", "`dsv4 logs` lists them")


def log_extra(model: str) -> dict[str, Any]:
    """What a log stores beside the transcript: the MODEL (a path made absolute), so `-c` can reopen it."""
    path = Path(model).expanduser()
    return {"model": str(path.absolute()) if path.exists() else model}
