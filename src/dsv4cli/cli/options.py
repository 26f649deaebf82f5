"""The placement flags shared by `dsv4 chat`, `dsv4 bench` and `dsv4 plan` (typer parameter types)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

Device = Annotated[str | None, typer.Option("--device", help="cpu or cuda:N (default: the first GPU if any).")]
GpuMemory = Annotated[str | None, typer.Option("--gpu-memory", help="GPU budget, e.g. 24GB (default: free).")]
CpuMemory = Annotated[str | None, typer.Option("--cpu-memory", help="Host RAM budget, e.g. 200GB (default: "
                                                                    "available).")]
SavedPlan = Annotated[Path | None, typer.Option("--plan", help="A placement plan saved by `dsv4 plan --save`.")]
RoutingCounts = Annotated[Path | None, typer.Option("--counts", help="Routing counts (JSON) to pick the GPU's "
                                                                     "(hot) experts.")]
