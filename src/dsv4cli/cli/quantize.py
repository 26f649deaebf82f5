"""The `dsv4 quantize` command: flags -> `quantize.quantize_checkpoint` (+ calibration and the
quality evaluation of `quality.evaluate_quality`), a progress bar on stderr, a summary on stdout."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer

from dsv4cli.errors import UsageError
from dsv4cli.runtime.resolve import WITH_WEIGHTS
from dsv4cli.units import human_bytes, parse_size

RECIPE_HELP = ("q4 (official FP4 experts, no-op on an official checkpoint), q4-dense4 (+ FP8 dense -> FP4), "
               "q3 (experts int3, w2 FP4), q3-dense4, q2 (experts int2, w2 int3), or a recipe JSON file.")


def _read_text(path: Path | None, what: str) -> str | None:
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror or exc}", "pass a UTF-8 text file") from None


def _calibrate(src: Path, text: str, tokens: int):
    """Importance matrix of `src` from `text` (at most `tokens` tokens)."""
    from dsv4cli.quant.imatrix import collect_imatrix
    from dsv4cli.quant.quality import text_tokens
    from dsv4cli.runtime.open import open_model

    with open_model(str(src), tokenizer=False) as opened:
        ids, _ = text_tokens(text, src, opened.model.args.vocab_size)
        if ids.numel() < 2:
            raise UsageError("the calibration text is shorter than 2 tokens", "pass a longer --calibration-text")
        return collect_imatrix(opened.model, ids[:tokens])


def _say(line: str) -> None:
    print(line, file=sys.stderr)


def _summary(result) -> str:
    formats = ", ".join(f"{fmt} {n}" for fmt, n in result.formats.items())
    boosted = f"; layers {', '.join(map(str, result.boosted_layers))} one format up" if result.boosted_layers else ""
    boosted += "; importance-weighted (imatrix)" if result.imatrix else ""
    return (f"{result.path}: {human_bytes(result.output_bytes)} ({result.ratio:.0%} of the source's "
            f"{human_bytes(result.source_bytes)}); recipe {result.recipe.name}: {formats} linears{boosted}")


def _quality_lines(report) -> list[str]:
    folded = " (token ids folded into the model's vocabulary)" if report.folded_ids else ""
    return [f"quality on {report.tokens} tokens of {report.text}{folded}:",
            f"  KL(original || quantized) mean {report.kl_mean:.5f}  max {report.kl_max:.5f}",
            f"  top-1 agreement {report.top1_agreement:.2%}",
            f"  perplexity original {report.ppl_original:.3f}  quantized {report.ppl_quantized:.3f}"]


def register(app: typer.Typer) -> None:
    """Add the `quantize` command to `app` (once)."""
    if any(command.name == "quantize" for command in app.registered_commands):
        return

    @app.command(name="quantize")
    def quantize(
        source: str = typer.Argument(..., metavar="SRC", help=f"Source: {WITH_WEIGHTS}."),
        out: Path = typer.Argument(..., help="Output directory (created atomically); with --eval-only, an "
                                             "existing quantized checkpoint to evaluate."),
        recipe: str = typer.Option("q3", "--recipe", help=RECIPE_HELP),
        calibration_text: Path = typer.Option(None, "--calibration-text",
                                              help="Text run through SRC to build an importance matrix."),
        imatrix: Path = typer.Option(None, "--imatrix", help="An imatrix.safetensors from an earlier calibration."),
        calibration_tokens: int = typer.Option(4096, "--calibration-tokens", help="Most calibration tokens used."),
        boost_layers: float = typer.Option(0.125, "--boost-layers",
                                           help="With an imatrix: fraction of layers (most sensitive first) whose "
                                                "experts get one format up; 0 disables."),
        evaluate: bool = typer.Option(False, "--eval", help="Measure KL / top-1 / perplexity against SRC after."),
        eval_only: bool = typer.Option(False, "--eval-only", help="Only evaluate the existing OUT against SRC."),
        eval_text: Path = typer.Option(None, "--eval-text", help="Evaluation text (default: a packaged sample)."),
        eval_tokens: int = typer.Option(1024, "--eval-tokens", help="Most evaluation tokens."),
        seq_len: int = typer.Option(256, "--eval-window", help="Tokens per evaluation window."),
        as_json: bool = typer.Option(False, "--json", help="One JSON object on stdout."),
        force: bool = typer.Option(False, "--force", help="Replace a non-empty OUT."),
        max_shard_size: str = typer.Option("4GiB", "--max-shard-size", help="Largest output shard, e.g. 4GB."),
    ) -> None:
        """Quantize a checkpoint (experts to int3/int2, dense linears to FP4) and optionally measure its quality."""
        from dsv4cli.fsutil import check_output_dir
        from dsv4cli.runtime.resolve import resolve_model

        if calibration_text is not None and imatrix is not None:
            raise UsageError("pass --calibration-text or --imatrix, not both")
        if not 0 <= boost_layers <= 1:
            raise UsageError(f"--boost-layers must be between 0 and 1, got {boost_layers}")
        text = _read_text(eval_text, "--eval-text")
        src = resolve_model(source).path
        if not eval_only:
            check_output_dir(out.absolute(), [src.absolute()], force)  # bad paths fail before torch loads
        from dsv4cli import kernels
        from dsv4cli.cli.convert import progress_bar
        from dsv4cli.quant.imatrix import Imatrix
        from dsv4cli.quant.quality import evaluate_quality
        from dsv4cli.quant.quantize import quantize_checkpoint
        from dsv4cli.quant.recipes import load_recipe
        report: dict[str, Any] = {}
        for notice in kernels.select():
            _say(notice)
        if not eval_only:
            chosen = load_recipe(recipe)
            max_bytes = parse_size(max_shard_size)
            calib = _read_text(calibration_text, "--calibration-text")
            matrix = Imatrix.load(imatrix) if imatrix is not None else None
            if calib is not None:
                if not as_json:
                    _say(f"calibrating on {calibration_text}")
                matrix = _calibrate(src, calib, calibration_tokens)
            with progress_bar(sys.stderr.isatty() and not as_json, "quantizing") as update:
                result = quantize_checkpoint(src, out, chosen, imatrix=matrix,
                                             boost_fraction=boost_layers if matrix is not None else 0.0,
                                             max_shard_bytes=max_bytes, force=force, progress=update)
            report["quantize"] = result.to_json()
            from dsv4cli.hub.registry import record_output

            warning = record_output(result.path, f"dsv4 quantize --recipe {recipe}", str(src))
            if warning:
                _say(f"warning: {warning}")
            if not as_json:
                typer.echo(_summary(result))
        if evaluate or eval_only:
            with progress_bar(sys.stderr.isatty() and not as_json, "evaluating", unit="tokens") as update:
                quality = evaluate_quality(src, out, text, seq_len=seq_len, max_tokens=eval_tokens,
                                           text_name=str(eval_text) if eval_text else None, progress=update)
            report["quality"] = quality.to_json()
            if not as_json:
                for line in _quality_lines(quality):
                    typer.echo(line)
        if as_json:
            typer.echo(json.dumps(report, indent=2))
