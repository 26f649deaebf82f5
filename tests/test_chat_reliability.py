"""`dsv4 chat` under bad input: every problem is one `dsv4: error:` line with the right exit code, never a
traceback or a silent empty answer; library messages leave flags and REPL commands to the front ends."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsv4cli.chat.tokenizer import Tokenizer
from dsv4cli.demo.model import DEMO_ARGS, packaged_tokenizer_dir
from dsv4cli.io.writer import random_tensors, write_checkpoint


def dsv4(*args: str | bytes, stdin: bytes = b"", env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m dsv4cli ARGS` with stdin piped; arguments may be raw bytes (invalid UTF-8)."""
    full_env = {**os.environ, "NO_COLOR": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "dsv4cli", *args], input=stdin, capture_output=True, env=full_env,
                          timeout=300)


def error_line(result: subprocess.CompletedProcess, code: int) -> str:
    """The one `dsv4: error:` line of a run that failed with `code` (and no traceback)."""
    stderr = result.stderr.decode("utf-8", "replace")
    assert result.returncode == code, stderr
    assert "Traceback" not in stderr and result.stdout == b""
    errors = [line for line in stderr.splitlines() if line.startswith("dsv4: error:")]
    assert len(errors) == 1, stderr
    return errors[0]


@pytest.fixture(scope="module")
def xdg(tmp_path_factory):
    """XDG dirs shared by this module's chat runs (the demo model is unpacked once)."""
    root = tmp_path_factory.mktemp("xdg")
    return {f"XDG_{kind}_HOME": str(root / kind.lower()) for kind in ("CACHE", "STATE", "DATA", "CONFIG")}


# ------------------------------------------------------------- flags, refused before the model loads
@pytest.mark.parametrize(("args", "stdin", "source"), [
    (["-p", b"caf\xe9"], b"", "-p is not valid UTF-8: byte 0xe9 at offset 3"),
    (["--system", b"\xff", "-p", "hi"], b"", "--system is not valid UTF-8: byte 0xff at offset 0"),
    ([], b"hello \xfe there", "stdin is not valid UTF-8: byte 0xfe at offset 6"),
])
def test_invalid_utf8_is_a_usage_error_naming_its_source(args, stdin, source):
    assert source in error_line(dsv4("chat", *args, stdin=stdin), 2)


@pytest.mark.parametrize(("args", "message"), [
    (["--temperature", "nan"], "--temperature must be a finite number >= 0, got nan"),
    (["--temperature", "inf"], "--temperature must be a finite number >= 0, got inf"),
    (["--top-p", "nan"], "--top-p must be a number in (0, 1], got nan"),
    (["--min-p", "2"], "--min-p must be a number in [0, 1], got 2.0"),
])
def test_nan_and_out_of_range_sampling_flags_are_usage_errors(args, message):
    assert message in error_line(dsv4("chat", *args, "-p", "hi"), 2)


@pytest.mark.parametrize(("args", "message"), [
    (["-n", "0"], "--max-tokens must be at least 1, got 0"),
    (["-n", "-1"], "--max-tokens must be at least 1, got -1"),
    (["--reasoning-budget", "-3"], "--reasoning-budget must be at least 0, got -3"),
])
def test_non_positive_token_limits_are_usage_errors(args, message):
    assert message in error_line(dsv4("chat", *args, "-p", "hi"), 2)


@pytest.mark.parametrize(("args", "message"), [
    (["-p", ""], "-p is empty"),
    (["-p", "  "], "-p is empty"),
    (["--system", "", "-p", "hi"], "--system is empty"),
])
def test_empty_prompt_or_system_text_is_a_usage_error(args, message):
    assert message in error_line(dsv4("chat", *args), 2)


# ------------------------------------------------------------- problems found once the model runs
@pytest.fixture(scope="module")
def nan_checkpoint(tmp_path_factory) -> Path:
    """A demo-sized checkpoint (real tokenizer) whose final norm is all NaN."""
    root = tmp_path_factory.mktemp("nan")
    tensors = dict(random_tensors(DEMO_ARGS, seed=1))
    tensors["norm.weight"] = torch.full_like(tensors["norm.weight"], float("nan"))
    return write_checkpoint(tensors, DEMO_ARGS, root / "model", tokenizer_dir=packaged_tokenizer_dir(root / "tok"))


def test_nan_weights_are_an_error_naming_the_likely_cause(nan_checkpoint, xdg):
    line = error_line(dsv4("chat", str(nan_checkpoint), "-p", "hi", "-n", "4", "--mode", "non-think", env=xdg), 1)
    assert "NaN logits at token 1 of the reply" in line and "corrupt" in line


def test_a_reply_cut_inside_the_thinking_trace_is_reported(xdg):
    line = error_line(dsv4("chat", "-p", "hi", "-n", "3", "--reasoning-budget", "8", "--temperature", "0", env=xdg), 1)
    assert "stopped after 3 tokens inside the thinking trace" in line and "--max-tokens" in line
    as_json = dsv4("chat", "-p", "hi", "-n", "3", "--reasoning-budget", "8", "--temperature", "0", "--json",
                   env=xdg)
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    assert data["finish_reason"] == "length" and data["stopped_in_reasoning"] is True and data["content"] == ""
    assert b"warning: the reply stopped after 3 tokens inside the thinking trace" in as_json.stderr


def test_a_prompt_longer_than_the_context_names_the_flag_not_the_repl_command(xdg):
    line = error_line(dsv4("chat", "--ctx", "16", "-p", " ".join(["word"] * 40), env=xdg), 2)
    assert "does not fit the context of 16 tokens" in line and "raise --ctx" in line and "/clear" not in line


def test_a_context_beyond_the_model_is_refused_before_allocating(xdg):
    """(A context within the model's positions but too large for memory: test_engine.py, at the library.)"""
    line = error_line(dsv4("chat", "--ctx", str(10**12), "-p", "hi", env=xdg), 2)
    assert "a context of 1,000,000,000,000 tokens exceeds the model's max_position_embeddings (1,048,576)" in line
    assert line.endswith("(lower --ctx to 1,048,576 or less)")


# ------------------------------------------------------------- library pieces
def test_the_tokenizer_replaces_lone_surrogates(tmp_path):
    tokenizer = Tokenizer.from_dir(packaged_tokenizer_dir(tmp_path))
    assert tokenizer.encode("a\udcffb\ud800") == tokenizer.encode("a\ufffdb\ufffd")


