"""The placement flags shared by `dsv4 chat`, `dsv4 bench` and `dsv4 plan` (typer parameter types)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

#: how the CLI names the settings library messages mention as `{setting}` (errors.option)
FLAG_NAMES = {
    "ctx": "--ctx", "device": "--device", "gpu_memory": "--gpu-memory", "cpu_memory": "--cpu-memory", "plan": "--plan",
    "counts": "--counts", "simulate": "--simulate", "force": "--force", "local_dir": "--local-dir",
    "max_workers": "--max-workers", "include": "--include", "exclude": "--exclude", "synth": "--synth",
    "fill": "--fill",
    "layers": "--layers", "experts": "--experts", "plot": "--plot", "threads": "--threads", "eval_text": "--eval-text",
    "to": "--to", "max_tokens": "--max-tokens", "no_log": "--no-log", "draft": "--draft", "api_key": "--api-key",
    "api_model": "--model",
    "save_plan": "`dsv4 plan MODEL --save FILE`",
    "save_counts": "`dsv4 plan MODEL --profile TEXT_FILE --save-counts FILE`",
    "plan_on_cpu": "`dsv4 plan --device cpu`",
    "convert_to_dsv4": "`dsv4 convert SRC OUT --to dsv4 --force`",
    "package_demo": "`python tools/train_demo.py --package`",
}

Device = Annotated[str | None, typer.Option("--device", help="cpu or cuda:N (default: the first GPU if any).")]
GpuMemory = Annotated[str | None, typer.Option("--gpu-memory", help="GPU budget, e.g. 24GB (default: free).")]
CpuMemory = Annotated[str | None, typer.Option("--cpu-memory", help="Host RAM budget, e.g. 200GB (default: "
                                                                    "available).")]
SavedPlan = Annotated[Path | None, typer.Option("--plan", help="A placement plan saved by `dsv4 plan --save`.")]
ApiUrl = Annotated[str | None, typer.Option("--api", help="Talk to a remote OpenAI-compatible server at this URL "
                                                         "(dsv4 serve, SGLang, vLLM, DeepSeek's API) instead of a "
                                                         "local MODEL.")]
ApiKey = Annotated[str | None, typer.Option("--api-key", envvar="DSV4_API_KEY", show_envvar=False,
                                            help="--api: the server's key (default: $DSV4_API_KEY).")]
ApiModel = Annotated[str | None, typer.Option("--model", help="--api: the model to ask for (default: the first the "
                                                               "server lists).")]
RoutingCounts = Annotated[Path | None, typer.Option("--counts", help="Routing counts (JSON) to pick the GPU's "
                                                                     "(hot) experts.")]
