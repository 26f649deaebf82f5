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
    assert again.returncode == 2 and "already exists" in again.stderr
    assert dsv4("synth", "tiny", str(out), "--experts", "1").returncode == 2


@pytest.mark.parametrize("args", [["chat", "--ctx", "4", "-p", "x"], ["chat", "--mode", "deep", "-p", "x"]])
def test_chat_usage_errors(args):
    result = dsv4(*args)
    assert result.returncode == 2 and result.stdout == ""


# ------------------------------------------------------------------ chat one-shot


@pytest.fixture(scope="module")
def xdg(tmp_path_factory):
    """XDG dirs shared by this module's chat runs (the demo model is generated once)."""
    root = tmp_path_factory.mktemp("xdg")
    return {f"XDG_{kind}_HOME": str(root / kind.lower()) for kind in ("CACHE", "STATE", "DATA", "CONFIG")}


def test_piped_one_shot_prints_only_the_answer(xdg):
    result = dsv4("chat", "--seed", "1", "-n", "24", "--reasoning-budget", "8", stdin="What is 2+2?\n", env=xdg)
    assert result.returncode == 0, result.stderr
    assert "\x1b[" not in result.stdout and result.stdout.endswith("\n")
    assert "demo model" in result.stderr
    traced = dsv4("chat", "--seed", "1", "-n", "24", "--reasoning-budget", "8", "--show-thinking",
                  stdin="What is 2+2?\n", env=xdg)
    assert traced.stdout == result.stdout  # the trace never reaches stdout
    assert len(traced.stderr) > len(result.stderr)


def test_json_one_shot(xdg):
    result = dsv4("chat", "-p", "hi", "--json", "--seed", "3", "-n", "16", "--mode", "non-think", env=xdg)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert set(data) >= {"content", "reasoning", "tool_calls", "usage", "timings", "finish_reason"}
    assert data["reasoning"] == ""
    # the trained demo may end its reply before the -n limit; when it stops for the limit, it used all of it
    assert 1 <= data["usage"]["completion_tokens"] <= 16
    assert data["finish_reason"] != "length" or data["usage"]["completion_tokens"] == 16
    assert data["usage"]["prompt_tokens"] == 5  # BOS, <｜User｜>, "hi", <｜Assistant｜>, </think>
    assert data["mode"] == "non-think" and data["model"] == "demo"
    assert data["sampling"]["seed"] == 3 and data["sampling"]["temperature"] == 0.5  # the demo's default


def test_stdin_and_prompt_are_joined_and_empty_stdin_is_a_usage_error(xdg):
    both = dsv4("chat", "-p", "question", "--json", "-n", "1", stdin="context\n", env=xdg)
    assert json.loads(both.stdout)["usage"]["prompt_tokens"] > 5
    empty = dsv4("chat", stdin="   \n", env=xdg)
    assert empty.returncode == 2 and "empty prompt" in empty.stderr


def test_broken_pipe_is_quiet(xdg):
    # a very high temperature samples almost uniformly from the whole vocabulary: the demo does not stop
    cmd = (f"{sys.executable} -m dsv4cli chat -p story -n 400 --mode non-think --seed 5 --temperature 50 "
           "| head -c 1")
    result = subprocess.run(["bash", "-c", cmd], capture_output=True, env={**os.environ, **xdg}, timeout=120)
    assert len(result.stdout) == 1
    assert b"Traceback" not in result.stderr and b"BrokenPipe" not in result.stderr


def test_ctrl_c_exits_130(xdg):
    import signal
    import time

    env = {**os.environ, **xdg, "NO_COLOR": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dsv4cli", "chat", "-p", "story", "-n", "100000",
                             "--mode", "non-think", "--temperature", "50"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert "demo model" in proc.stderr.readline()  # printed once the model is loaded
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "[interrupted]" in err


@pytest.mark.parametrize("flags, message", [
    (("--nothink", "--think-max"), "--nothink and --think-max contradict each other"),
    (("--mode", "non-think", "--think-max"), "--mode non-think and --think-max contradict each other"),
    (("--mode", "think-max", "--nothink"), "--mode think-max and --nothink contradict each other"),
    (("--mode", "think-high", "--nothink"), "--mode think-high and --nothink contradict each other"),
])
def test_contradictory_mode_flags_are_all_refused_alike(flags, message):
    from dsv4cli.cli.chat import _chat_mode
    from dsv4cli.errors import UsageError

    mode = flags[1] if flags[0] == "--mode" else None
    with pytest.raises(UsageError) as err:
        _chat_mode(mode, "--nothink" in flags, "--think-max" in flags)
    assert err.value.message == message


def test_mode_flags_that_agree_and_the_default():
    from dsv4cli.chat.encoding import ThinkMode
    from dsv4cli.cli.chat import _chat_mode

    assert _chat_mode(None, False, False) is ThinkMode.THINK_HIGH
    assert _chat_mode("think-max", False, True) is ThinkMode.THINK_MAX
    assert _chat_mode("non-think", True, False) is ThinkMode.NON_THINK
    assert _chat_mode(None, True, False) is ThinkMode.NON_THINK


def test_dash_m_is_not_the_mode_and_contradictions_exit_2():
    """llama-cli and llm users type -m MODEL: -m is no short form of --mode (a clean usage error)."""
    proc = dsv4("chat", "-m", "think-max", "-p", "hi")
    assert proc.returncode == 2 and "-m" in proc.stderr and "Traceback" not in proc.stderr
    proc = dsv4("chat", "--mode", "non-think", "--think-max", "-p", "hi")
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "--mode non-think and --think-max contradict each other" in proc.stderr


def test_prompt_and_system_from_files_and_threads(tmp_path):
    prompt, system = tmp_path / "prompt.txt", tmp_path / "system.txt"
    prompt.write_text("What is 2 + 3?\n", encoding="utf-8")
    system.write_text("\ufeffAnswer briefly.", encoding="utf-8")  # a byte-order mark is dropped
    from_files = dsv4("chat", "-f", str(prompt), "--system-file", str(system), "--threads", "1", "--mode",
                      "non-think", "--temperature", "0", "-n", "8", "--json")
    assert from_files.returncode == 0, from_files.stderr
    inline = dsv4("chat", "-p", "What is 2 + 3?\n", "--system", "Answer briefly.", "--mode", "non-think",
                  "--temperature", "0", "-n", "8", "--json")
    assert json.loads(from_files.stdout)["content"] == json.loads(inline.stdout)["content"]


@pytest.mark.parametrize("args, message", [
    (("-p", "hi", "-f", "{prompt}"), "-p and -f are alternatives"),
    (("--system", "x", "--system-file", "{prompt}", "-p", "hi"), "--system and --system-file are alternatives"),
    (("-f", "{missing}"), "cannot read -f {missing}: No such file or directory"),
    (("-f", "{latin1}"), "-f {latin1} is not valid UTF-8: byte 0xe9 at offset 3"),
    (("-f", "{blank}"), "-f {blank} is empty"),
    (("-p", "hi", "--threads", "0"), "--threads must be at least 1, got 0"),
])
def test_bad_prompt_files_and_threads_are_one_line_usage_errors(tmp_path, args, message):
    files = {"prompt": tmp_path / "p.txt", "missing": tmp_path / "nope.txt", "latin1": tmp_path / "l.txt",
             "blank": tmp_path / "b.txt"}
    files["prompt"].write_text("hi")
    files["latin1"].write_bytes(b"caf\xe9")
    files["blank"].write_text(" \n")
    named = {k: str(v) for k, v in files.items()}
    proc = dsv4("chat", *(a.format(**named) for a in args))
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert message.format(**named) in proc.stderr


def test_chat_stop_cuts_the_reply_before_the_stop_sequence(xdg):
    args = ("chat", "-p", "What is 12 + 30?", "--mode", "non-think", "--temperature", "0", "-n", "24", "--json")
    plain = json.loads(dsv4(*args, env=xdg).stdout)
    text = plain["content"]
    stop = text[len(text) // 2:len(text) // 2 + 2]
    proc = dsv4(*args, "--stop", stop, "--stop", "never seen", env=xdg)
    assert proc.returncode == 0, proc.stderr
    cut = json.loads(proc.stdout)
    assert cut["content"] == text[:text.find(stop)] and cut["finish_reason"] == "stop"
    bad = dsv4("chat", "-p", "hi", "--stop", "")
    assert bad.returncode == 2 and "--stop: a stop sequence must be a non-empty string" in bad.stderr


def test_chat_drafts_by_default_on_the_cpu_and_gives_the_plain_greedy_reply(xdg):
    # the tests run on the CPU alone, where a model with its MTP layer drafts one token per step by default
    args = ("chat", "-p", "What is 12 + 30?", "--mode", "non-think", "--temperature", "0", "-n", "16", "--json")
    plain = dsv4(*args, "--no-draft", env=xdg)
    drafted = dsv4(*args, env=xdg)
    zero = dsv4(*args, "--draft", "0", env=xdg)
    assert plain.returncode == 0 and drafted.returncode == 0 and zero.returncode == 0, drafted.stderr
    a, b, c = json.loads(plain.stdout), json.loads(drafted.stdout), json.loads(zero.stdout)
    assert b["content"] == a["content"] == c["content"]
    assert "draft_tokens" not in a["usage"] and "draft_tokens" not in c["usage"]
    assert b["usage"]["draft_tokens"] > 0 and 0 <= b["usage"]["accepted_draft_tokens"] <= b["usage"]["draft_tokens"]
    for bad, message in ((("--draft", "4"), "--draft must be 0 to 3"),
                         (("--draft", "2", "--no-draft"), "contradict each other")):
        proc = dsv4("chat", "-p", "hi", *bad)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("command", ["chat", "bench", "info", "plan", "convert", "quantize", "download", "synth",
                                     "list"])
def test_help_uses_click_conventions(capsys, monkeypatch, command):
    """No typer type placeholders beside flags or repeatable options, MODEL / [MODEL] in the usage
    line (not {model}), and the chat reply limit's default in its help."""
    monkeypatch.setenv("COLUMNS", "200")
    from tests.conftest import run_cli

    code, out, _ = run_cli(capsys, command, "--help")
    assert code == 0 and "Usage: dsv4 " + command in out
    assert "<bool>" not in out and "<list[" not in out
    usage = next(line for line in out.splitlines() if "Usage:" in line)
    assert "{" not in usage and "}" not in usage
    if command == "chat":
        assert "[MODEL]" in usage and "default: 8192; the demo: 256" in out
    if command == "download":
        assert usage.rstrip().endswith("MODEL") and "--include              <str>..." in out


def test_chat_quiet_prints_nothing_but_the_reply(xdg):
    args = ("chat", "-p", "hi", "--mode", "non-think", "--temperature", "0", "-n", "8")
    loud, quiet = dsv4(*args, env=xdg), dsv4(*args, "-q", env=xdg)
    assert loud.returncode == quiet.returncode == 0, quiet.stderr
    assert "using the" in loud.stderr and quiet.stderr == "" and quiet.stdout == loud.stdout
    both = dsv4(*args, "--quiet", "--verbose", env=xdg)
    assert both.returncode == 2 and "--quiet and --verbose contradict each other" in both.stderr


def test_chat_on_a_directory_without_weights_names_the_weights_first(tmp_path):
    """Neither weights nor tokenizer: the error is about the weights, which matter first."""
    from dsv4cli.demo.model import demo_model_dir

    (tmp_path / "config.json").write_bytes((demo_model_dir() / "config.json").read_bytes())
    proc = dsv4("chat", str(tmp_path), "-p", "hi")
    assert proc.returncode != 0 and "model.safetensors" in proc.stderr and "tokenizer" not in proc.stderr
    (tmp_path / "empty").mkdir()
    proc = dsv4("chat", str(tmp_path / "empty"), "-p", "hi")
    assert proc.returncode != 0 and "config.json" in proc.stderr and "tokenizer" not in proc.stderr


def test_synth_says_what_it_is_for_and_chat_refuses_it_with_that_reason(tmp_path):
    out = tmp_path / "syn"
    made = dsv4("synth", "tiny", str(out))
    assert made.returncode == 0 and made.stdout.strip() == str(out) and "tests and benchmarks" in made.stderr
    proc = dsv4("chat", str(out), "-p", "hi")
    assert proc.returncode == 2 and "random weights from `dsv4 synth`" in proc.stderr
    assert f"dsv4 bench {out}" in proc.stderr and "Traceback" not in proc.stderr


def test_conversations_are_logged_continued_and_listed(tmp_path):
    env = {"XDG_STATE_HOME": str(tmp_path / "state")}
    args = ("--nothink", "--temperature", "0", "-n", "8", "-q")
    missing = dsv4("chat", "-c", "-p", "more", *args, env=env)
    assert missing.returncode == 2 and "no logged conversations yet" in missing.stderr
    first = dsv4("chat", "-p", "What is 2+2?", *args, env=env)
    second = dsv4("chat", "-c", "-p", "And 3+3?", *args, env=env)
    assert first.returncode == second.returncode == 0, second.stderr
    unlogged = dsv4("chat", "-p", "secret", "--no-log", *args, env=env)
    assert unlogged.returncode == 0
    listing = dsv4("logs", "--json", env=env)
    (entry,) = json.loads(listing.stdout)
    assert entry["turns"] == 2 and entry["first_prompt"] == "What is 2+2?" and entry["model"] == "demo"
    shown = dsv4("logs", "last", env=env).stdout
    assert shown.index("What is 2+2?") < shown.index(first.stdout.strip()) < shown.index("And 3+3?")
    transcript = json.loads(dsv4("logs", entry["id"], "--json", env=env).stdout)
    assert [m["role"] for m in transcript["messages"]] == ["user", "assistant", "user", "assistant"]
    assert transcript["messages"][3]["content"] == second.stdout.strip()
    assert "secret" not in dsv4("logs", env=env).stdout
    bad = dsv4("logs", "nope", env=env)
    assert bad.returncode == 2 and "no logged conversation 'nope'" in bad.stderr


def test_aliases_name_models_everywhere_and_list_shows_them(tmp_path):
    env = {"XDG_DATA_HOME": str(tmp_path / "data")}
    made = dsv4("alias", "set", "mini", "demo", env=env)
    assert made.returncode == 0 and made.stdout.strip() == "mini -> demo"
    reply = dsv4("chat", "mini", "-p", "hi", "--nothink", "--temperature", "0", "-n", "4", env=env)
    plain = dsv4("chat", "-p", "hi", "--nothink", "--temperature", "0", "-n", "4", env=env)
    assert reply.returncode == 0 and reply.stdout == plain.stdout
    assert "mini" in dsv4("alias", "list", env=env).stdout and "mini   demo" in dsv4("list", env=env).stdout
    for bad, message in ((("set", "demo", "demo"), "cannot be an alias"), (("set", "x", str(tmp_path / "nope")),
                         "no model"), (("rm", "never"), "no alias 'never'")):
        proc = dsv4("alias", *bad, env=env)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert dsv4("alias", "rm", "mini", env=env).returncode == 0
    gone = dsv4("chat", "mini", "-p", "hi", env=env)
    assert gone.returncode != 0 and "no model 'mini'" in gone.stderr


def test_list_shows_the_checkpoints_convert_made(tmp_path):
    env = {"XDG_DATA_HOME": str(tmp_path / "data")}
    src, out = tmp_path / "syn", tmp_path / "as-dsv4"
    assert dsv4("synth", "tiny", str(src), env=env).returncode == 0
    converted = dsv4("convert", str(src), str(out), "--to", "dsv4", env=env)
    assert converted.returncode == 0, converted.stderr
    listing = dsv4("list", env=env).stdout
    assert "made here" in listing and "dsv4 convert --to dsv4" in listing and str(out) in listing


def test_chat_piped_to_another_program_without_a_prompt_says_how(xdg):
    """`dsv4 chat | cat` on a terminal: no REPL on a pipe, and the error says what to give instead."""
    import pty

    master, slave = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, "-m", "dsv4cli", "chat"], stdin=slave, capture_output=True,
                              timeout=120, env={**os.environ, **xdg})
    finally:
        os.close(master)
        os.close(slave)
    assert proc.returncode == 2 and proc.stdout == b""
    assert "pass -p TEXT or pipe text on stdin; the REPL needs a terminal" in proc.stderr.decode()



def test_a_download_wins_over_the_preset_of_that_name_and_info_says_which(monkeypatch, capsys, tiny_checkpoint):
    """`dsv4 info flash`: the preset while nothing is downloaded, the download once there is one."""
    from dsv4cli.runtime import resolve
    from tests.conftest import run_cli

    assert resolve.resolve_model("flash", weights=False).kind == resolve.PRESET
    code, out, err = run_cli(capsys, "info", "flash")
    assert code == 0 and "flash: preset (config only, no weights)" in out + err
    monkeypatch.setattr(resolve, "_downloaded", lambda name: resolve.ModelRef(name, resolve.DOWNLOAD, tiny_checkpoint)
                        if name == "flash" else None)
    assert resolve.resolve_model("flash", weights=False).kind == resolve.DOWNLOAD
    code, out, err = run_cli(capsys, "info", "flash")
    assert code == 0 and f"flash: downloaded model at {tiny_checkpoint}" in " ".join((out + err).split())
