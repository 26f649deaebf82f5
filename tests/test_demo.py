"""The built-in demo model: its synthetic corpus, the shipped checkpoint, and what it answers."""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dsv4cli.chat.encoding import ASSISTANT, EOS, THINK_END, THINK_START, ThinkMode
from dsv4cli.demo import model as demo
from dsv4cli.demo.corpus import (
    EVAL_KINDS,
    add_trace,
    compare_trace,
    count_trace,
    eval_problems,
    is_correct,
    is_held_out,
    make_example,
    mul_trace,
    sub_trace,
    training_examples,
)
from dsv4cli.errors import CheckpointError

#: Held-out questions the shipped model answers correctly with greedy decoding in think mode.
KNOWN_GOOD = (("What is 870 + 774?", "1644"),
              ("Lucy has 58 books, gets 1 more and then gives away 29. How many books does Lucy have now?", "30"))
#: The shipped model gets 24/24 of `eval_problems(2024, 4)` in think-high and 4/24 in non-think mode
#: (300 held-out questions: 91% and 21%, docs/demo-model.md); random weights get none.
THINK_ACCURACY_FLOOR = 0.7
NON_THINK_MARGIN = 0.3


# ---------------------------------------------------------------------------- corpus


def test_corpus_is_deterministic_and_pairs_each_problem_in_both_modes():
    first = list(itertools.islice(training_examples(7), 200))
    assert first == list(itertools.islice(training_examples(7), 200))
    assert first != list(itertools.islice(training_examples(8), 200))
    for think, plain in zip(first[::2], first[1::2], strict=True):
        assert think.think and not plain.think and think.problem == plain.problem


def test_think_traces_appear_only_in_think_mode():
    for ex in itertools.islice(training_examples(3), 400):
        assert ex.prompt.endswith(ASSISTANT + (THINK_START if ex.think else THINK_END))
        assert ex.completion.endswith(ex.problem.answer + EOS)
        if ex.think:
            assert ex.completion == ex.problem.reasoning + THINK_END + ex.problem.answer + EOS
        else:
            assert ex.completion == ex.problem.answer + EOS
            assert THINK_START not in ex.prompt + ex.completion  # earlier turns never show reasoning


def test_corpus_has_system_prompts_multi_turn_and_think_max():
    examples = list(itertools.islice(training_examples(5), 2000))
    assert any(not ex.prompt.startswith("<｜begin▁of▁sentence｜><｜User｜>") for ex in examples)  # system
    assert any(ex.prompt.count("<｜User｜>") > 1 for ex in examples)
    assert any(ex.think and "Reasoning Effort" in ex.prompt for ex in examples)
    assert {ex.problem.kind for ex in examples} == {*EVAL_KINDS, "chat"}


def test_held_out_questions_never_appear_in_training():
    held = eval_problems(1, 30)
    assert len(held) == 30 * len(EVAL_KINDS) and all(is_held_out(p.key) for p in held)
    held_keys = {p.key for p in held}
    for ex in itertools.islice(training_examples(0), 6000):
        assert ex.problem.kind == "chat" or not is_held_out(ex.problem.key)
        assert ex.problem.key not in held_keys


def test_traces_are_true_step_by_step_calculations():
    for trace in (add_trace(987, 45), sub_trace(1002, 987), mul_trace(479, 8), add_trace(5, 5)):
        for line in trace.splitlines()[1:]:
            label, _, chain = line.partition(":")
            assert label in ("Units", "Tens", "Hundreds", "Thousands")
            values = [eval(part) for part in chain.split("=")]  # digits and + - * only
            assert len(set(values)) == 1, line
    assert add_trace(345, 467) == "345+467\nUnits:5+7=12\nTens:4+6+1=11\nHundreds:3+4+1=8"
    assert sub_trace(345, 167) == "345-167\nUnits:15-7=8\nTens:14-6-1=7\nHundreds:3-1-1=1"
    assert mul_trace(47, 6) == "47*6\nUnits:7*6=42\nTens:4*6+4=24+4=28"
    assert compare_trace(345, 367) == "345 vs 367\nHundreds:3=3\nTens:4<6"
    assert compare_trace(1000 - 1, 42) == "999 vs 42\n3 digits > 2 digits"
    assert count_trace("berry", "r") == "Count r in berry: b e r=1 r=2 y\ntotal 2"


def test_every_trace_fits_the_demo_reasoning_budget(tokenizer):
    import random

    rng = random.Random(0)
    longest = max(len(tokenizer.encode(make_example(rng, think=True).problem.reasoning)) for _ in range(3000))
    assert longest < 64  # `dsv4 chat` forces </think> after 64 reasoning tokens on the demo model


def test_answers_are_scored_by_their_last_number():
    problem = eval_problems(0, 1, ("add",))[0]
    assert is_correct(problem, problem.answer)
    assert not is_correct(problem, problem.answer.replace(problem.value, str(int(problem.value) + 1)))


# ------------------------------------------------------------------ shipped checkpoint


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from dsv4cli.chat.tokenizer import Tokenizer

    return Tokenizer.from_dir(demo.packaged_tokenizer_dir(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    """The demo unpacked under a fresh XDG cache home (`<home>/dsv4/<name>`)."""
    return demo.demo_model_dir(tmp_path_factory.mktemp("xdg-cache") / "dsv4")


def test_shipped_files_are_small_and_listed_in_the_manifest():
    shipped = {p.name: p.stat().st_size for p in demo.PACKAGE_DIR.iterdir()}
    assert sum(shipped.values()) < 5_000_000
    manifest = demo.demo_manifest()
    assert manifest["name"] == demo.DEMO_NAME
    for name in manifest["files"]:
        assert name in shipped or name + ".xz" in shipped


def test_shipped_checkpoint_unpacks_validates_and_has_the_v4_features(demo_dir):
    from dsv4cli.io.checkpoint import Checkpoint
    from dsv4cli.model.args import ModelArgs

    args = ModelArgs.from_file(demo_dir)
    assert args == demo.DEMO_ARGS
    checkpoint = Checkpoint.open(demo_dir)
    try:
        checkpoint.verify_data()
        assert checkpoint.has_mtp and args.hc_mult == 4 and set(args.compress_ratios) == {0, 4, 128}
        assert str(checkpoint.get("layers.1.ffn.experts.0.w1.weight").dtype) == "torch.int8"  # FP4
        assert str(checkpoint.get("layers.1.attn.wq_a.weight").dtype) == "torch.float8_e4m3fn"
        assert checkpoint.get("layers.0.ffn.gate.tid2eid").shape == (args.vocab_size, args.n_activated_experts)
        assert checkpoint.get("embed.weight").shape == (129280, args.dim)
    finally:
        checkpoint.close()
    assert (demo_dir / "tokenizer.json").is_file()


def test_unpacking_happens_once_and_repairs_a_damaged_cache(tmp_path):
    path = demo.demo_model_dir(tmp_path)
    shard = sorted(path.glob("model-*.safetensors"))[0]
    stamp = shard.stat().st_mtime_ns
    assert demo.demo_model_dir(tmp_path) == path and shard.stat().st_mtime_ns == stamp  # not unpacked again
    with open(shard, "r+b") as f:
        f.truncate(100)
    assert demo.demo_model_dir(tmp_path) == path
    assert shard.stat().st_size == demo.demo_manifest()["files"][shard.name]["bytes"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [demo.DEMO_NAME]  # no staging left behind


def test_a_corrupt_package_fails_its_checksum(tmp_path, monkeypatch):
    fake = tmp_path / "package"
    shutil.copytree(demo.PACKAGE_DIR, fake)
    manifest = json.loads((fake / "manifest.json").read_text())
    name = next(iter(manifest["files"]))
    manifest["files"][name]["sha256"] = "0" * 64
    (fake / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(demo, "packaged_demo", lambda: fake)
    with pytest.raises(CheckpointError, match="sha256"):
        demo.demo_model_dir(tmp_path / "cache")
    assert not any((tmp_path / "cache").iterdir())  # nothing half-written is left


# ---------------------------------------------------------------------- answers


@pytest.fixture(scope="module")
def chat(demo_dir, tokenizer):
    """Ask one held-out question in a mode; returns the TurnResult (greedy, as `dsv4 chat` runs the demo)."""
    import torch

    from dsv4cli import kernels
    from dsv4cli.chat.session import ChatSession, ChatSettings
    from dsv4cli.engine.engine import Engine
    from dsv4cli.engine.sampling import SamplingParams
    from dsv4cli.runtime.loader import load_model

    model, checkpoint = load_model(demo_dir)
    torch.set_grad_enabled(False)
    engine = Engine(model, max_context=1024)

    class Quiet:
        def __getattr__(self, name):
            return lambda *args, **kwargs: None

    def ask(question: str, mode: ThinkMode):
        kernels.select()
        settings = ChatSettings(mode=mode, sampling=SamplingParams(temperature=0), max_tokens=256,
                                reasoning_budget=None if mode is ThinkMode.NON_THINK else 64)
        return ChatSession(engine, tokenizer, settings).send(question, Quiet())

    yield ask
    torch.set_grad_enabled(True)
    checkpoint.close()


def test_think_mode_beats_non_think_mode_on_held_out_questions(chat):
    problems = eval_problems(2024, 4)
    scores = {}
    for mode in (ThinkMode.NON_THINK, ThinkMode.THINK_HIGH):
        results = [chat(p.question, mode) for p in problems]
        scores[mode] = sum(is_correct(p, r.content) for p, r in zip(problems, results, strict=True)) / len(problems)
        has_trace = [bool(r.reasoning.strip()) for r in results]
        assert all(has_trace) if mode is ThinkMode.THINK_HIGH else not any(has_trace)
    assert scores[ThinkMode.THINK_HIGH] >= THINK_ACCURACY_FLOOR, scores
    assert scores[ThinkMode.THINK_HIGH] >= scores[ThinkMode.NON_THINK] + NON_THINK_MARGIN, scores


@pytest.mark.parametrize(("question", "expected"), KNOWN_GOOD)
def test_dsv4_chat_one_shot_answers_held_out_questions(demo_dir, question, expected):
    env = {**os.environ, "NO_COLOR": "1", "XDG_CACHE_HOME": str(demo_dir.parent.parent)}
    result = subprocess.run([sys.executable, "-m", "dsv4cli", "chat", "-p", question, "--temperature", "0",
                             "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["reasoning"].strip() and re.findall(r"\d+", data["content"])[-1] == expected, data


# ------------------------------------------------------------------ training script


def test_training_script_runs_its_whole_pipeline_on_a_few_steps(tmp_path, monkeypatch):
    """tools/train_demo.py end to end in miniature: train, export, evaluate through the chat path,
    package; the package unpacks and loads like the shipped one."""
    import importlib.util

    import torch

    from dsv4cli import kernels
    from dsv4cli.runtime.loader import load_model

    path = Path(__file__).resolve().parents[1] / "tools" / "train_demo.py"
    spec = importlib.util.spec_from_file_location("train_demo", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(script, "CHAT_MAX_TOKENS", 6)
    monkeypatch.setattr(script, "CHAT_REASONING_BUDGET", 6)
    out, package_dir = tmp_path / "run", tmp_path / "package"
    try:
        with torch.enable_grad():  # the module's `chat` fixture may still hold gradients off
            assert script.main(["--steps", "2", "--batch", "2", "--seq", "64", "--warmup", "1", "--no-compile",
                                "--log-every", "1", "--out", str(out), "--eval-per-kind", "1", "--eval-kinds",
                                "compare", "--package", "--package-dir", str(package_dir)]) == 0
    finally:
        kernels.reset()
    results = json.loads((out / "results.json").read_text())
    assert [h["step"] for h in results["history"]] == [1, 2]
    for where in ("float32", "checkpoint"):
        assert set(results[where]) == {"non-think", "think-high"}
        assert results[where]["think-high"]["questions"] == 1
    manifest = json.loads((package_dir / "manifest.json").read_text())
    assert manifest["training"]["steps"] == 2 and "checkpoint_think-high" in manifest["training"]
    monkeypatch.setattr(demo, "packaged_demo", lambda: package_dir)
    model, checkpoint = load_model(demo.demo_model_dir(tmp_path / "cache"))
    checkpoint.close()
    assert model.args == demo.DEMO_ARGS


# ------------------------------------------------------------------ quantized demo, README example


def test_quantized_demo_keeps_its_accuracy(demo_dir, tmp_path):
    """README's example: `dsv4 quantize demo OUT --recipe q2`, then `tools/eval_demo.py demo OUT`."""
    env = {**os.environ, "NO_COLOR": "1", "XDG_CACHE_HOME": str(demo_dir.parent.parent)}
    made = subprocess.run([sys.executable, "-m", "dsv4cli", "quantize", "demo", str(tmp_path / "q2"), "--recipe",
                           "q2"], capture_output=True, text=True, env=env, timeout=300)
    assert made.returncode == 0, made.stderr
    tool = Path(__file__).resolve().parents[1] / "tools" / "eval_demo.py"
    scored = subprocess.run([sys.executable, str(tool), "demo", str(tmp_path / "q2"), "--per-kind", "2", "--kinds",
                             "add,mul,word", "--json", str(tmp_path / "r.json")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert scored.returncode == 0, scored.stderr
    assert "| demo |" in scored.stdout and "think-high" in scored.stdout
    results = json.loads((tmp_path / "r.json").read_text())
    for model in ("demo", str(tmp_path / "q2")):
        assert results[model]["think-high"]["accuracy"] >= 5 / 6, results[model]["think-high"]
        assert results[model]["think-high"]["questions"] == 6
    missing = subprocess.run([sys.executable, str(tool), "no-such-model"], capture_output=True, text=True, env=env,
                             timeout=120)
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1 and "no model 'no-such-model'" in missing.stderr


def test_demo_alias_names_the_built_in_model(demo_dir, monkeypatch):
    from dsv4cli.runtime.resolve import DEMO, resolve_model

    monkeypatch.setenv("XDG_CACHE_HOME", str(demo_dir.parent.parent))
    monkeypatch.chdir(demo_dir.parent)  # no directory called `demo` here
    for weights in (True, False):
        ref = resolve_model("demo", weights=weights)
        assert (ref.kind, ref.path) == (DEMO, demo_dir) and ref.args() == demo.DEMO_ARGS
    assert resolve_model(None).kind == DEMO
