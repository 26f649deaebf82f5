"""The dsv4 command line through its real entry point: exit codes, JSON output, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"


def dsv4(*args: str, stdin: str | None = None, env: dict | None = None, timeout: float = 120
         ) -> subprocess.CompletedProcess:
    """Run `python -m dsv4cli ARGS` with stdin piped (not a TTY)."""
    full_env = {**os.environ, "NO_COLOR": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "dsv4cli", *args], input=stdin or "", capture_output=True,
                          text=True, env=full_env, timeout=timeout)


def test_info_prints_real_parameter_totals():
    flash = json.loads(dsv4("info", str(REFERENCE / "configs" / "flash"), "--json").stdout)
    assert round(flash["params_total"] / 1e9, 1) == 290.9
    assert round(flash["params_trunk"] / 1e9, 1) == 284.3
    assert flash["tensors"] == 69187 and flash["csa_layers"] == 21 and flash["hca_layers"] == 20
    pro = json.loads(dsv4("info", str(REFERENCE / "configs" / "pro" / "inference_config.json"), "--json").stdout)
    assert round(pro["params_total"] / 1e12, 2) == 1.60
    text = dsv4("info", "flash").stdout
    assert "284.33B without MTP" in text and "13.80B active" in text


def test_info_errors_are_one_line_with_exit_codes(tmp_path):
    missing = dsv4("info", "no-such-model")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "preset" in missing.stderr
    bad = tmp_path / "config.json"
    bad.write_text('{"hidden_size": 4096, "bogus_key": 1, "model_type": "deepseek_v4"}')
    result = dsv4("info", str(tmp_path))
    assert result.returncode == 1 and "bogus_key" in result.stderr and "Traceback" not in result.stderr
    usage = dsv4("info")
    assert usage.returncode == 2


def test_version():
    assert dsv4("--version").stdout.startswith("dsv4 ")


def test_synth_writes_a_loadable_official_checkpoint(tmp_path):
    out = tmp_path / "m"
    result = dsv4("synth", "tiny", str(out), "--layers", "3", "--experts", "4")
    assert result.returncode == 0 and result.stdout.strip() == str(out)
    info = json.loads(dsv4("info", str(out), "--json").stdout)
    assert info["layers"] == 3 and info["routed_experts"] == 4
    again = dsv4("synth", "tiny", str(out))
    assert again.returncode == 1 and "already exists" in again.stderr
    assert dsv4("synth", "tiny", str(out), "--experts", "1").returncode == 2


@pytest.mark.parametrize("args", [["chat", "--ctx", "4", "-p", "x"], ["chat", "--mode", "deep", "-p", "x"]])
def test_chat_usage_errors(args):
    result = dsv4(*args)
    assert result.returncode == 2 and result.stdout == ""
