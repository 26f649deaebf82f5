"""Shared fixtures: tiny random models in the official format (built once per session)."""

from __future__ import annotations

import functools

import pytest
import torch

from dsv4cli.io.writer import random_tensors, write_random_checkpoint
from dsv4cli.model.layers import Numerics
from dsv4cli.model.presets import PRESETS
from dsv4cli.runtime.loader import build_model


@functools.cache
def tiny_tensors(preset: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Official-format random tensors of a preset, in memory."""
    return dict(random_tensors(PRESETS[preset], seed))


def tiny_model(preset: str, numerics: Numerics, seed: int = 0):
    return build_model(PRESETS[preset], tiny_tensors(preset, seed).__getitem__, numerics)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """The `tiny` preset written to disk in the official layout."""
    return write_random_checkpoint(PRESETS["tiny"], tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(scope="session", autouse=True)
def private_state_and_data_dirs(tmp_path_factory):
    """Chats run by the tests log their conversations and history, and quantize / convert / alias record
    themselves in the registry, under temporary XDG state and data dirs, never the user's (subprocesses
    inherit them; tests that need their own set them themselves). The cache (kernels, demo) stays shared."""
    import os

    names = ("XDG_STATE_HOME", "XDG_DATA_HOME")
    before = {name: os.environ.get(name) for name in names}
    for name in names:
        os.environ[name] = str(tmp_path_factory.mktemp(name.lower()))
    yield
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(autouse=True)
def reference_kernels():
    """Every test starts and ends on the reference kernels (some tests and `dsv4 bench` select others)."""
    from dsv4cli import kernels

    kernels.reset()
    yield
    kernels.reset()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for a module (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`): on a
    busy machine every 2-thread torch op can wait milliseconds for its second thread, which dominates
    small tests. Kernel thread counts are tested explicitly."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """`dsv4 ARGV` in-process through the real entry point: (exit code, stdout, stderr)."""
    from dsv4cli.cli import app as cli

    try:
        cli.main(list(argv))
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err
