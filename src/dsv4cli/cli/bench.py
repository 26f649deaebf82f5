"""`dsv4 bench`: flags -> `bench.run_bench`; the table or JSON on stdout, progress on stderr (terminals only).

Call `register(app)` to add the command to the dsv4 typer app (idempotent).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import typer

from dsv4cli.cli.options import ApiKey, ApiModel, ApiUrl, CpuMemory, Device, GpuMemory, RoutingCounts, SavedPlan
from dsv4cli.errors import UsageError
from dsv4cli.runtime.resolve import WITH_WEIGHTS

BENCH_HELP = "\n\n".join([
    "Measure prompt processing (pp) and token generation (tg) speed, llama-bench style.",
    "For each depth -d the cache is first filled with that many tokens (not timed); each test then runs once "
    "as warm-up and -r times measured, from the same cache state, on fixed synthetic tokens with greedy "
    "sampling. tg rows also show the memory bandwidth achieved (weight bytes read per token x tok/s) against "
    "the machine's, measured in the same run. See docs/bench.md.",
    "MODEL is a checkpoint directory or a downloaded model; omit it for the built-in demo model, or use "
    "--synth PRESET for a random checkpoint of a preset (tiny, flash-slice, ...).",
])


@contextmanager
def progress_status(enabled: bool) -> Iterator[Callable[[str], None] | None]:
    """A transient rich status line on stderr, or None when stderr is not a terminal."""
    if not enabled:
        yield None
        return
    from rich.console import Console

    with Console(stderr=True).status("dsv4 bench") as status:
        yield lambda message: status.update(f"dsv4 bench: {message}")


def register(app: typer.Typer) -> None:
    """Add the `bench` command to `app` (once)."""
    if any(command.name == "bench" for command in app.registered_commands):
        return

    @app.command(name="bench", help=BENCH_HELP)
    def bench(
        model: str | None = typer.Argument(None, help=f"MODEL: {WITH_WEIGHTS}; omit for the demo."),
        n_prompt: str = typer.Option("512", "-p", "--n-prompt", help="Prompt tokens per pp test (comma list)."),
        n_gen: str = typer.Option("128", "-n", "--n-gen", help="Generated tokens per tg test (comma list)."),
        n_depth: str = typer.Option("0", "-d", "--n-depth", help="Context depths to test at, e.g. 0,4096."),
        fill: str = typer.Option("prefill", "--fill", help="How tg tests reach a depth: prefill (real) or synthetic "
                                                           "(random cache entries: tg at 1M in seconds; marked "
                                                           "depth* in the table). pp always prefills."),
        repetitions: int = typer.Option(3, "-r", "--repetitions", help="Timed runs per test (after a warm-up)."),
        output: str = typer.Option("md", "-o", "--output", help="md (table), json (everything, raw timings), "
                                   "jsonl (a line per result) or csv."),
        plot: Path | None = typer.Option(None, "--plot", help="Also draw tok/s against depth into this PNG "
                                                              "(needs matplotlib)."),
        threads: int | None = typer.Option(None, "--threads", "-t", help="CPU threads (default: torch's)."),
        ctx: int | None = typer.Option(None, "--ctx", help="Cache size in tokens (default: what the tests need)."),
        synth: str | None = typer.Option(None, "--synth", help="Bench a random checkpoint of this preset."),
        layers: int | None = typer.Option(None, "--layers", help="--synth: override the number of layers."),
        experts: int | None = typer.Option(None, "--experts", help="--synth: override the routed experts."),
        seed: int = typer.Option(0, "--seed", help="Seed of the token traces (and of --synth weights)."),
        draft: int = typer.Option(0, "--draft", help="tg with speculative decoding: draft N tokens (1-3) per step "
                                                     "with the checkpoint's MTP layer; reports the acceptance."),
        api: ApiUrl = None,
        api_key: ApiKey = None,
        api_model: ApiModel = None,
        device: Device = None,
        gpu_memory: GpuMemory = None,
        cpu_memory: CpuMemory = None,
        plan: SavedPlan = None,
        counts: RoutingCounts = None,
    ) -> None:
        from dsv4cli.bench.run import (
            OUTPUTS,
            BenchSettings,
            parse_counts,
            render,
            require_matplotlib,
            run_bench,
            write_plot,
        )
        from dsv4cli.runtime.options import PlacementOptions

        if output not in OUTPUTS:
            raise UsageError(f"unknown output format {output!r}", f"choose one of: {', '.join(OUTPUTS)}")
        if api is not None:
            local = {"MODEL": model, "--synth": synth, "--plot": plot, "--threads": threads, "--ctx": ctx,
                     "--draft": draft or None, "--device": device, "--plan": plan,
                     "-d": None if n_depth.strip() == "0" else n_depth}
            given = [name for name, value in local.items() if value is not None]
            if given:
                raise UsageError(f"{', '.join(given)} set what runs here; --api measures a server",
                                 f"drop {', '.join(given)}")
            from dsv4cli.bench.api import render_api, run_api_bench

            with progress_status(sys.stderr.isatty()) as progress:
                report = run_api_bench(api, api_key, api_model, parse_counts("-p", n_prompt),
                                       parse_counts("-n", n_gen), repetitions, seed, progress)
            typer.echo(render_api(report, output))
            return
        settings = BenchSettings(
            model=model, synth=synth, layers=layers, experts=experts, prompt_tokens=parse_counts("-p", n_prompt),
            gen_tokens=parse_counts("-n", n_gen), depths=parse_counts("-d", n_depth), repetitions=repetitions,
            ctx=ctx, threads=threads, seed=seed, fill=fill, draft=draft,
            placement=PlacementOptions(device=device, gpu_memory=gpu_memory, cpu_memory=cpu_memory, plan=plan,
                                       counts=counts))
        if plot is not None:
            require_matplotlib()
        with progress_status(sys.stderr.isatty()) as progress:
            report = run_bench(settings, progress)
        text = render(report, output)
        typer.echo(text)
        if plot is not None:
            typer.echo(f"plot: {write_plot(report, plot)}", err=True)
