"""Where dsv4 keeps its files (XDG base directories)."""

from __future__ import annotations

import os
from pathlib import Path


def _xdg(variable: str, default: str) -> Path:
    value = os.environ.get(variable)
    return Path(value) if value and os.path.isabs(value) else Path.home() / default


def config_dir() -> Path:
    return _xdg("XDG_CONFIG_HOME", ".config") / "dsv4"


def state_dir() -> Path:
    return _xdg("XDG_STATE_HOME", ".local/state") / "dsv4"


def data_dir() -> Path:
    return _xdg("XDG_DATA_HOME", ".local/share") / "dsv4"


def cache_dir() -> Path:
    return _xdg("XDG_CACHE_HOME", ".cache") / "dsv4"


def history_file() -> Path:
    return state_dir() / "history"


def sessions_dir() -> Path:
    return data_dir() / "sessions"
