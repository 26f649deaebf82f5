"""`dsv4 bench` on the tiny synthetic preset: JSON schema, bandwidth formula, depth handling, table, plot, errors."""

from __future__ import annotations

import json
import math
import re
import statistics
import sys

import pytest
import torch

from dsv4cli.bench import run as bench
from dsv4cli.bench.run import BenchSettings, Traces, fill_to_depth, rewind, run_bench, run_once
from dsv4cli.cli.bench import register
from dsv4cli.engine.engine import Engine
from dsv4cli.engine.events import TokenEvent
from dsv4cli.errors import DsvError, UsageError
from dsv4cli.io.describe import summarize
from dsv4cli.model.presets import PRESETS
from dsv4cli.runtime.loader import load_model
from dsv4cli.runtime.placement import model_bytes
from tests.conftest import run_cli

# one thread: on a busy 2-core machine two OpenMP threads can stall for seconds
SMALL = dict(synth="tiny", prompt_tokens=(8,), gen_tokens=(3,), depths=(6, 0), repetitions=2, threads=1,
             stream_bytes=1 << 20)


@pytest.fixture(scope="module", autouse=True)
def synth_in_tmp(tmp_path_factory):
    """Keep --synth checkpoints out of the user's cache."""
    root = tmp_path_factory.mktemp("synth")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bench, "synth_root", lambda: root)
        yield root


@pytest.fixture(scope="module")
def report():
    return run_bench(BenchSettings(**SMALL))


@pytest.fixture(scope="module")
def data(report):
    return report.to_dict()




# ------------------------------------------------------------------ service


def test_json_schema_and_positive_numbers(data):
    assert data["schema"] == "dsv4-bench/1"
    assert set(data) >= {"date", "machine", "versions", "kernels", "model", "settings", "bytes_per_token",
                         "memory_bandwidth", "peak_memory_bytes", "peak_memory_kind", "results"}
    assert data["machine"]["cores"] >= 1 and data["machine"]["ram_bytes"] > 0 and data["machine"]["cpu"]
    assert set(data["versions"]) == {"dsv4", "torch", "python"}
    assert set(data["kernels"]) == set(bench.kernels.OPS)
    assert data["model"]["name"] == "synth:tiny" and data["model"]["kind"] == "synthetic"
    assert data["machine"]["threads"] == 1
    assert data["settings"]["depths"] == [0, 6] and data["settings"]["ctx"] == 6 + 8 + 1
    assert data["peak_memory_bytes"] > 0 and data["peak_memory_kind"] == "rss"
    assert [(r["label"], r["depth"]) for r in data["results"]] == [("pp8", 0), ("tg3", 0), ("pp8", 6), ("tg3", 6)]
    for r in data["results"]:
        assert len(r["seconds"]) == len(r["samples_tokens_per_second"]) == 2
        assert all(s > 0 for s in r["seconds"]) and r["warmup_seconds"] > 0
        assert r["samples_tokens_per_second"] == [r["tokens"] / s for s in r["seconds"]]
        assert math.isclose(r["tokens_per_second"], statistics.fmean(r["samples_tokens_per_second"]))
        assert r["tokens_per_second_std"] >= 0 and r["expert_cache_hit_rate"] is None
    json.dumps(data)  # serialisable as is


def test_bandwidth_follows_the_documented_formula(data):
    args = PRESETS["tiny"]
    tb = data["bytes_per_token"]
    dense_all, expert = model_bytes(args)
    assert tb["expert"] == expert and tb["experts_per_token"] == 2 and tb["layers"] == 4
    assert tb["routed"] == 2 * expert * 4 == summarize(args).routed_expert_bytes_per_token
    embed_skipped = (args.vocab_size - 1) * args.dim * 2  # bf16 rows not read
    hash_skipped = args.n_hash_layers * (args.vocab_size - 1) * args.n_activated_experts * 8  # int64 tid2eid rows
    assert tb["lookup_tables_skipped"] == embed_skipped + hash_skipped
    assert tb["dense"] == dense_all - tb["lookup_tables_skipped"] and tb["total"] == tb["dense"] + tb["routed"]
    triad = data["memory_bandwidth"]["triad_gb_s"]
    assert triad > 0 and data["memory_bandwidth"]["copy_gb_s"] > 0
    for r in data["results"]:
        if r["test"] == "pp":
            assert r["bandwidth_gb_s"] is None and r["bandwidth_ratio"] is None and r["bytes_per_token"] is None
        else:
            assert r["bytes_per_token"] == tb["total"]
            assert math.isclose(r["bandwidth_gb_s"], tb["total"] * r["tokens_per_second"] / 1e9)
            assert math.isclose(r["bandwidth_ratio"], r["bandwidth_gb_s"] / triad)


def test_every_run_starts_from_the_cache_filled_to_depth(data):
    for r in data["results"]:
        depth = r["depth"]
        assert r["start_position"] == depth and r["reused_tokens"] == depth  # the fill was not prefilled again
        assert r["end_position"] == depth + (8 if r["test"] == "pp" else 1 + 3)


@pytest.fixture
def engine():
    model, checkpoint = load_model(bench.synthetic_checkpoint("tiny"))
    with bench.thread_count(1), torch.inference_mode():
        yield Engine(model, max_context=32)
    checkpoint.close()


def test_fill_rewind_and_fixed_traces(engine):
    assert Traces.make(512, 10, 4, seed=3) == Traces.make(512, 10, 4, seed=3)
    assert Traces.make(512, 10, 4, seed=3) != Traces.make(512, 10, 4, seed=4)
    traces = Traces.make(512, 9, 4, seed=0)
    shallow = fill_to_depth(engine, traces, 5)
    assert engine.cache.pos == 5 and shallow.ids == traces.fill[:5]
    deep = fill_to_depth(engine, traces, 9, previous=shallow)
    assert engine.cache.pos == 9 and deep.ids == traces.fill
    _, stats = run_once(engine, shallow, traces, "tg", 3)
    assert engine.cache.pos == 5 + 1 + 3 and stats.cached_tokens == 5 and stats.generated_tokens == 4
    rewind(engine, shallow)
    assert engine.cache.pos == 5 and engine.cached_ids == traces.fill[:5]

    def greedy_tokens() -> list[int]:
        rewind(engine, shallow)
        events = engine.generate([*shallow.ids, traces.decode_start], bench.GREEDY, max_tokens=4)
        return [e.token_id for e in events if isinstance(e, TokenEvent)]

    assert greedy_tokens() == greedy_tokens()  # same state, same trace: identical work in every repetition


def test_csv_and_jsonl_outputs(report):
    import csv
    import io

    rows = list(csv.DictReader(io.StringIO(bench.render(report, "csv"))))
    assert tuple(rows[0]) == bench.CSV_COLUMNS and len(rows) == len(report.results)
    assert [(r["test"], int(r["tokens"]), int(r["depth"])) for r in rows] == [
        (r.test, r.tokens, r.depth) for r in report.results]
    assert all(float(r["tokens_per_second"]) > 0 and r["model"] == report.model["name"] for r in rows)
    lines = [json.loads(line) for line in bench.render(report, "jsonl").splitlines()]
    assert len(lines) == len(report.results)
    assert all(line["model"] == report.model["name"] and line["threads"] == 1 and line["tokens_per_second"] > 0
               for line in lines)
    assert json.loads(bench.render(report, "json")) == report.to_dict()


def test_zero_skips_pp_or_tg_as_in_llama_bench():
    only_tg = run_bench(BenchSettings(**{**SMALL, "prompt_tokens": (0,), "depths": (0,), "repetitions": 1}))
    assert [(r.test, r.tokens) for r in only_tg.results] == [("tg", 3)]
    only_pp = run_bench(BenchSettings(**{**SMALL, "gen_tokens": (0,), "depths": (0,), "repetitions": 1}))
    assert [(r.test, r.tokens) for r in only_pp.results] == [("pp", 8)]


def test_synthetic_fill_times_tg_from_random_entries_and_pp_from_a_real_prefill():
    report = run_bench(BenchSettings(**{**SMALL, "depths": (0, 300), "fill": "synthetic", "repetitions": 1}))
    rows = {(r.test, r.depth): r for r in report.results}
    assert set(rows) == {("pp", 0), ("tg", 0), ("pp", 300), ("tg", 300)}
    assert rows["tg", 300].synthetic_fill and not rows["pp", 300].synthetic_fill
    assert not rows["tg", 0].synthetic_fill  # depth 0 has nothing to fill
    for r in rows.values():
        assert r.start_position == r.depth and r.reused_tokens == r.depth
    text = bench.render_markdown(report)
    assert re.search(r"\| tg3 +\| +300\* \|", text) and "filled with synthetic entries, not by a prefill" in text
    assert report.to_dict()["settings"]["fill"] == "synthetic"
    assert [r["fill"] for r in report.to_dict()["results"] if r["depth"] == 300] == ["prefill", "synthetic"]


def test_synthetic_fill_looks_like_a_context_of_that_depth(engine):
    traces = Traces.make(engine.model.args.vocab_size, 20, 4, seed=0)
    fake = bench.synthetic_fill(engine, traces, 20)
    assert engine.cache.pos == 20 and fake.ids == traces.fill[:20] and fake.synthetic
    csa = next(layer for layer in engine.cache.layers if layer.indexer is not None)
    assert csa.compressor.pool[:, :5].abs().sum() > 0 and csa.compressor.pool[:, 5:].abs().sum() == 0
    _, stats = run_once(engine, fake, traces, "tg", 3)
    assert stats.cached_tokens == 20 and stats.generated_tokens == 4


def test_markdown_table_layout(report):
    text = bench.render_markdown(report)
    lines = text.splitlines()
    assert [line.split(":")[0] for line in lines[:4]] == ["- machine", "- versions", "- kernels", "- date"]
    table = [line for line in lines if line.startswith("|")]
    assert len(table) == 2 + 4 and len({len(line) for line in table}) == 1  # padded columns
    assert [c.strip() for c in table[0].strip("|").split("|")] == bench.TABLE_HEADER
    assert re.fullmatch(r"\|[ \-:|]+\|", table[1])
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]
    assert [(row[3], row[4]) for row in rows] == [("pp8", "0"), ("tg3", "0"), ("pp8", "6"), ("tg3", "6")]
    for row in rows:
        assert row[0] == "synth:tiny" and re.fullmatch(r"\d+\.\d\d ± \d+\.\d\d", row[5]) and row[8] == "-"
        if row[3].startswith("tg"):
            assert re.fullmatch(r"\d+\.\d\d", row[6]) and row[7].endswith("%")
        else:
            assert row[6] == row[7] == "-"
    assert "bytes per decoded token:" in text and "triad" in text and "peak memory:" in text


def test_short_kernel_names():
    active = {op: f"dsv4cli.kernels.ref.{op}" for op in bench.kernels.OPS}
    assert bench.short_kernels(active) == "all ref"
    active["linear"] = "dsv4cli.kernels.cpu.linear"
    assert bench.short_kernels(active) == "linear=cpu, others ref"


def test_memory_bandwidth_and_threads():
    before = torch.get_num_threads()
    with bench.thread_count(1) as threads:
        assert threads == 1 == torch.get_num_threads()
        measured = bench.measure_memory_bandwidth(torch.device("cpu"), 1 << 20, repeats=2)
    assert torch.get_num_threads() == before
    assert measured.copy > 0 and measured.triad > 0 and measured.threads == 1 and measured.array_bytes == 1 << 20


# ------------------------------------------------------------------ plot


def test_plot_is_written_atomically(report, tmp_path):
    pytest.importorskip("matplotlib")
    out = bench.write_plot(report, tmp_path / "bench.png")
    assert out.read_bytes().startswith(b"\x89PNG") and [p.name for p in tmp_path.iterdir()] == ["bench.png"]


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(DsvError, match="matplotlib"):
        bench.require_matplotlib()
    code, out, err = run_cli(capsys, "bench", "--synth", "tiny", "--plot", "x.png")
    assert code == 1 and out == "" and err.count("\n") == 1 and "install matplotlib or drop --plot" in err


# ------------------------------------------------------------------ CLI


def test_cli_json_output(capsys):
    code, out, err = run_cli(capsys, "bench", "--synth", "tiny", "-p", "4", "-n", "2", "-d", "0,3", "-r", "1",
                             "--threads", "1", "-o", "json")
    assert code == 0 and err == ""  # no progress when stderr is not a terminal
    data = json.loads(out)
    assert data["machine"]["threads"] == 1 and data["settings"]["repetitions"] == 1
    assert [(r["label"], r["depth"], r["start_position"]) for r in data["results"]] == [
        ("pp4", 0, 0), ("tg2", 0, 0), ("pp4", 3, 3), ("tg2", 3, 3)]
    assert all(r["tokens_per_second"] > 0 for r in data["results"])


def test_register_is_idempotent():
    import typer

    app = typer.Typer()
    register(app)
    register(app)
    assert [c.name for c in app.registered_commands] == ["bench"]


@pytest.mark.parametrize("overrides, message", [
    (dict(prompt_tokens=(-1,)), "-p values must be at least 0"),
    (dict(prompt_tokens=(0,), gen_tokens=(0,)), "-p 0 and -n 0 leave nothing to measure"),
    (dict(depths=(-1,)), "-d values must be at least 0"),
    (dict(repetitions=0), "-r must be at least 1"),
    (dict(threads=0), "--threads"),
    (dict(ctx=10), "needs a context of 15 tokens"),
    (dict(model="some/dir"), "either MODEL or --synth"),
    (dict(fill="random"), "unknown --fill 'random'"),
])
def test_bad_settings(overrides, message):
    from dsv4cli.cli.options import FLAG_NAMES

    with pytest.raises(UsageError) as caught:
        BenchSettings(**{**SMALL, **overrides})
    assert message in caught.value.one_line(FLAG_NAMES)


def test_settings_errors_and_context_hint():
    with pytest.raises(UsageError, match="only apply to"):
        BenchSettings(layers=2)
    with pytest.raises(UsageError) as err:
        BenchSettings(depths=(4096,), prompt_tokens=(512,), ctx=4096)
    assert "{opt:ctx}" in err.value.hint and "4609" in err.value.hint
    assert BenchSettings(depths=(0, 100), prompt_tokens=(16,), gen_tokens=(32,)).context == 100 + 32 + 2
    assert bench.parse_counts("-d", "0,4096") == (0, 4096)
    with pytest.raises(UsageError, match="comma-separated"):
        bench.parse_counts("-d", "0,4k")


def test_cli_errors_are_one_line(capsys, tmp_path):
    cases = [
        (["-p", "0", "-n", "0"], 2, "-p 0 and -n 0 leave nothing to measure"),
        (["--synth", "tiny", "-d", "100", "--ctx", "50"], 2, "raise --ctx"),
        (["-o", "xml"], 2, "choose one of: md, json"),
        (["--synth", "nope"], 2, "unknown model preset"),
        ([str(tmp_path / "missing")], 2, "no model"),
    ]
    for argv, expected_code, message in cases:
        code, out, err = run_cli(capsys, "bench", *argv)
        assert (code, out) == (expected_code, "") and err.count("\n") == 1 and message in err, (argv, err)
        assert err.startswith("dsv4: error: ")


def test_synth_overrides_and_cached_checkpoint(synth_in_tmp):
    args = bench.synthetic_args("tiny", layers=2, experts=4)
    assert (args.n_layers, args.n_routed_experts, args.n_hash_layers) == (2, 4, 2)
    assert args.compress_ratios == (0, 4, 0)  # the MTP layer's ratio is kept
    first = bench.synthetic_checkpoint("tiny")
    assert first.parent == synth_in_tmp and bench.synthetic_checkpoint("tiny") == first  # written once, reused
    assert bench.synthetic_label("tiny", 2, 4) == "synth:tiny-L2-E4" and bench.synthetic_label("tiny") == "synth:tiny"
    with pytest.raises(UsageError, match="at least 2"):
        bench.synthetic_args("tiny", experts=1)


def test_progress_status_only_on_a_terminal():
    from dsv4cli.cli.bench import progress_status

    with progress_status(False) as update:
        assert update is None
    with progress_status(True) as update:
        update("pp512 @ d0: run 1/3")


def test_draft_reports_the_acceptance_and_the_effective_rate():
    """--draft: tg decodes with MTP speculative decoding (the tiny preset carries an MTP layer); every
    tg row counts the drafts it proposed and kept, the tok/s are the tokens delivered per second."""
    report = run_bench(BenchSettings(**{**SMALL, "prompt_tokens": (0,), "gen_tokens": (6,), "depths": (0,),
                                        "repetitions": 2, "draft": 2}))
    (tg,) = report.results
    assert tg.draft_tokens > 0 and 0 <= tg.accepted_draft_tokens <= tg.draft_tokens
    assert tg.to_dict()["draft_acceptance"] == tg.accepted_draft_tokens / tg.draft_tokens
    assert report.settings["draft"] == 2 and "MTP drafts: 2 per step" in bench.render_markdown(report)
    assert "MTP drafts kept" in bench.render_markdown(report)
    plain = run_bench(BenchSettings(**{**SMALL, "prompt_tokens": (0,), "gen_tokens": (6,), "depths": (0,),
                                       "repetitions": 1}))
    assert plain.results[0].draft_tokens == 0 and plain.results[0].draft_acceptance is None
    with pytest.raises(UsageError, match="must be 0 to 3"):
        BenchSettings(**{**SMALL, "draft": 4})
