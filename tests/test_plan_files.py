"""Malformed placement plan files (`--plan FILE`): one line naming the file and the bad key, never a traceback."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import pytest

from dsv4cli.cli.options import FLAG_NAMES
from dsv4cli.errors import UsageError
from dsv4cli.model.args import ModelArgs
from dsv4cli.runtime import placement
from dsv4cli.runtime.placement import InvalidPlan, PlacementPlan, plan_placement
from tests.test_cli import dsv4


@functools.cache
def good_plan_text() -> str:
    """A valid plan for the demo model, as `dsv4 plan demo --simulate --gpu-memory 8GB --save` writes it."""
    from dsv4cli.demo.model import demo_model_dir

    args = ModelArgs.from_file(demo_model_dir())
    return plan_placement(args, gpu_budget_bytes=8 << 30, cpu_budget_bytes=64 << 30, accelerated=True).to_json()


#: `edited(key=DROP)` removes the key
DROP = object()


def edited(**changes) -> bytes:
    """The good plan with keys replaced or dropped."""
    data = {**json.loads(good_plan_text()), **changes}
    return json.dumps({k: v for k, v in data.items() if v is not DROP}).encode()


#: (id, file contents, text the one-line message must contain: the bad key or what is wrong)
MALFORMED = [
    ("string-context", edited(context="big"), 'context must be an integer >= 1, not "big"'),
    ("float-context", edited(context=16384.5), "context must be an integer"),
    ("nan-context", edited(context=float("nan")), "context must be an integer >= 1, not NaN"),
    ("bool-slots", edited(staging_slots=True), "staging_slots must be an integer >= 0, not true"),
    ("negative-dense", edited(dense_bytes=-1), "dense_bytes must be an integer >= 0, not -1"),
    ("zero-layers", edited(n_layers=0), "n_layers must be an integer >= 1"),
    ("float-budget", edited(gpu_budget_bytes=1e30), "gpu_budget_bytes must be an integer"),
    ("null-device", edited(device=None), "device must be cpu or cuda:N, not null"),
    ("unknown-device", edited(device="tpu:0"), 'device must be cpu or cuda:N, not "tpu:0"'),
    ("numeric-device", edited(device=0), "device must be cpu or cuda:N, not 0"),
    ("list-experts", edited(gpu_experts=[0, 1]), "gpu_experts must be an object"),
    ("int-expert-list", edited(gpu_experts={"0": 5}), 'gpu_experts["0"] must be a list of expert ids, not 5'),
    ("string-expert", edited(gpu_experts={"0": ["1"]}), 'gpu_experts["0"][0] must be an expert id'),
    ("expert-out-of-range", edited(gpu_experts={"0": [999]}), 'gpu_experts["0"][0] must be an expert id in 0..7'),
    ("duplicate-expert", edited(gpu_experts={"0": [1, 1]}), 'gpu_experts["0"] lists an expert twice'),
    ("layer-name", edited(gpu_experts={"first": [0]}), 'gpu_experts key "first" must be a layer number'),
    ("layer-out-of-range", edited(gpu_experts={"99": [0]}), 'gpu_experts key "99" must be a layer number below'),
    ("same-layer-twice", edited(gpu_experts={"1": [0], "01": [1]}), "gpu_experts names layer 1 twice"),
    ("missing-key", edited(n_experts=DROP), 'missing key "n_experts"'),
    ("unknown-key", edited(gpu_exprets={}), 'unknown key "gpu_exprets"'),
    ("string-version", edited(version="1"), 'unsupported plan version "1"'),
    ("missing-version", edited(version=DROP), 'missing key "version"'),
    ("host-mode", edited(host_mode="disk"), 'host_mode must be one of ram, mmap, not "disk"'),
    ("cache-policy", edited(cache_policy=3), "cache_policy must be one of lru, lfu, mru, not 3"),
    ("string-warnings", edited(warnings="oops"), "warnings must be a list of strings"),
    ("number-warning", edited(warnings=[1]), "warnings[0] must be a string, not 1"),
    ("list-document", b"[1, 2]", "the document must be a JSON object, not a list"),
    ("null-document", b"null", "the document must be a JSON object, not null"),
    ("empty-file", b"", "not valid JSON (Expecting value at line 1, column 1)"),
    ("truncated-json", edited()[:40], "not valid JSON"),
    ("duplicate-key", b'{"version": 1, "version": 1}', 'key "version" appears twice'),
    ("deep-nesting", b"[" * 200_000, "not valid JSON (nested too deeply)"),
    ("huge-integer", b'{"context": ' + b"9" * 5000 + b"}", "not valid JSON"),
    ("invalid-utf8", b'{"device": "cpu\xff"}', "not UTF-8 text (byte 0xff at offset 15)"),
]


def write(tmp_path: Path, contents: bytes) -> Path:
    path = tmp_path / "bad plan.json"
    path.write_bytes(contents)
    return path


def test_the_good_plan_loads(tmp_path):
    plan = PlacementPlan.load(write(tmp_path, good_plan_text().encode()))
    assert plan.device == "cpu" and plan.n_gpu_experts > 0
    bom = PlacementPlan.load(write(tmp_path, b"\xef\xbb\xbf" + good_plan_text().encode()))
    assert bom == plan


@pytest.mark.parametrize(("contents", "expected"), [case[1:] for case in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_plan_names_the_file_and_the_key(tmp_path, contents, expected):
    path = write(tmp_path, contents)
    with pytest.raises(InvalidPlan) as info:
        PlacementPlan.load(path)
    err = info.value
    assert isinstance(err, UsageError) and err.exit_code == 2
    assert f"invalid placement plan {path}: " in err.message and expected in err.message
    assert "\n" not in err.one_line() and len(err.message) < 300 and "dsv4 plan" in err.one_line(FLAG_NAMES)


def unreadable_paths(tmp_path: Path) -> list[tuple[str, Path, str]]:
    """(id, path, expected text) of plan paths that cannot be read at all."""
    folder = tmp_path / "a-directory"
    folder.mkdir()
    regular = tmp_path / "regular"
    regular.write_text("{}")
    loop = tmp_path / "loop.json"
    loop.symlink_to(loop)
    return [("directory", folder, "Is a directory"), ("missing", tmp_path / "nope.json", "No such file"),
            ("under-a-file", regular / "plan.json", "Not a directory"),
            ("symlink-loop", loop, "Too many levels of symbolic links")]


def test_unreadable_plan_files(tmp_path):
    for name, path, expected in unreadable_paths(tmp_path):
        with pytest.raises(InvalidPlan) as info:
            PlacementPlan.load(path)
        message = info.value.message
        assert message.startswith(f"cannot read placement plan {path}: ") and expected in message, name
        assert "\n" not in info.value.one_line()


def test_an_oversized_plan_is_refused_without_reading_it_all(tmp_path, monkeypatch):
    monkeypatch.setattr(placement, "MAX_PLAN_BYTES", 1 << 20)
    path = write(tmp_path, b" " * (2 << 20))
    with pytest.raises(InvalidPlan, match=r"larger than 1 MiB"):
        PlacementPlan.load(path)


#: cases also run through the real command line (each starts the CLI: a few seconds)
CLI_CASES = ["string-context", "list-experts", "missing-key", "invalid-utf8"]


def assert_one_line_error(result, path: Path) -> None:
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("dsv4: error: "), result.stderr
    assert str(path) in lines[0] and "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize("case", CLI_CASES)
def test_chat_with_a_malformed_plan_fails_in_one_line(tmp_path, case):
    contents, expected = next(c[1:] for c in MALFORMED if c[0] == case)
    path = write(tmp_path, contents)
    result = dsv4("chat", "demo", "--plan", str(path), "-p", "hi", env={"DSV4_KERNELS": "ref"})
    assert_one_line_error(result, path)
    assert expected in result.stderr


def test_bench_with_a_malformed_plan_and_a_directory_fails_in_one_line(tmp_path):
    path = write(tmp_path, edited(gpu_experts={"0": 5}))
    result = dsv4("bench", "--plan", str(path), "-p", "8", "-n", "2", "-r", "1", env={"DSV4_KERNELS": "ref"})
    assert_one_line_error(result, path)
    assert 'gpu_experts["0"]' in result.stderr
    result = dsv4("chat", "demo", "--plan", str(tmp_path), "-p", "hi", env={"DSV4_KERNELS": "ref"})
    assert_one_line_error(result, tmp_path)
    assert "Is a directory" in result.stderr


def test_saving_where_no_file_can_be_written_is_a_clear_error(tmp_path):
    plan = PlacementPlan.from_json(good_plan_text())
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for target in (tmp_path / "missing-dir" / "p.json", blocker / "p.json", tmp_path):
        with pytest.raises(UsageError, match=re.escape(f"cannot write placement plan {target}: ")):
            plan.save(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # no temporary file left behind
