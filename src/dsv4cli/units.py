"""Human-readable sizes and counts, both ways (decimal units unless 'iB' is given)."""

from __future__ import annotations

import re

from dsv4cli.errors import UsageError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def human_bytes(n: float, digits: int = 2) -> str:
    """1234567 -> '1.23 MB' (decimal units)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.{digits}f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def human_count(n: float) -> str:
    """290940000000 -> '290.94B'."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def parse_memory(text: str, option: str) -> int:
    """A memory budget such as '24GB' or '24GiB': like `parse_size`, but a bare number is refused. Nobody
    means 24 bytes of GPU memory; the error suggests the unit. `option` names the setting ({opt:name})."""
    match = _SIZE_RE.match(text)
    if match is not None and not match[2]:
        raise UsageError(f"{{opt:{option}}} {text!r} has no unit", f"write it with one: {match[1]}GB "
                         f"(10^9 bytes) or {match[1]}GiB (2^30)")
    return parse_size(text)


def parse_size(text: str) -> int:
    """'4GB' (10**9), '4GiB' (2**30), '500MB', '1048576' -> bytes."""
    match = _SIZE_RE.match(text)
    unit = match[2].upper() if match else ""
    if match is None or unit not in _UNITS:
        raise UsageError(f"invalid size {text!r}", "use e.g. 4GB, 500MB, 4GiB or a number of bytes")
    size = int(float(match[1]) * _UNITS[unit])
    if size <= 0:
        raise UsageError(f"invalid size {text!r}", "the size must be positive")
    return size
