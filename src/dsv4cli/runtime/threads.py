"""How many CPU threads torch and the native kernels use (`--threads` of chat and bench)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from dsv4cli.kernels import cpu


@contextlib.contextmanager
def thread_count(threads: int | None) -> Iterator[int]:
    """Use `threads` for torch and the native CPU kernels while active (None: leave torch's default);
    yields the count in use."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
        cpu.set_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        if threads is not None:
            torch.set_num_threads(before)
            cpu.set_threads(None)
