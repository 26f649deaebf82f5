"""Terminal rendering of `dsv4 info` (rich)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from dsv4cli.io.describe import ModelSummary
from dsv4cli.units import human_bytes, human_count


def render_summary(name: str, s: ModelSummary, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=f"DeepSeek-V4 model: {name}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("layers", f"{s.layers} ({s.sliding_layers} sliding, {s.csa_layers} CSA, {s.hca_layers} HCA; "
                   f"{s.hash_layers} hash-routed) + {s.mtp_layers} MTP"),
        ("hidden / heads", f"{s.hidden_size} / {s.heads}"),
        ("experts", f"{s.routed_experts} routed ({s.expert_dtype}), {s.experts_per_token} per token, 1 shared"),
        ("parameters", f"{human_count(s.params_total)} total, {human_count(s.params_trunk)} without MTP, "
                       f"{human_count(s.params_active)} active per token"),
        ("checkpoint", f"{s.tensors:,} tensors, {human_bytes(s.bytes_total)} "
                       f"({human_bytes(s.bytes_routed_experts)} routed experts)"),
        ("by dtype", ", ".join(f"{k} {human_bytes(v)}" for k, v in s.bytes_by_dtype.items())),
        ("decode reads", f"{human_bytes(s.routed_expert_bytes_per_token)} of routed experts per token"),
        ("KV cache", f"{s.cache_bytes_per_token:,.0f} B per token of context in compact FP8/FP4 rows "
                     f"({human_bytes(s.cache_bytes_per_token * 1_048_576)} at 1M tokens; "
                     f"{s.cache_bytes_per_token_bf16:,.0f} B in bf16)"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
