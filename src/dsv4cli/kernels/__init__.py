"""The DeepSeek-V4 op set, dispatched to an implementation chosen at run time.

The model calls these functions only; `ref` (plain PyTorch) is always available and
is the oracle for the fast implementations. `use(name, fn)` swaps one op (how the
CPU and Triton kernels register themselves); `reset()` goes back to the reference;
`select()` picks the fastest available set (`DSV4_KERNELS=auto|ref|cpu|triton`).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from dsv4cli.kernels import ref

OPS = ("linear", "grouped_linear", "swiglu_expert", "moe_experts", "hc_split_sinkhorn", "sparse_attn",
       "kv_fp8_quant", "indexer_fp4_quant", "indexer_topk", "cached_attn", "rope")
MODES = ("auto", "ref", "cpu", "triton")

_active: dict[str, Callable] = {}


def reset() -> None:
    """Every op back to its plain PyTorch reference."""
    _active.update({name: getattr(ref, name) for name in OPS})


def use(name: str, fn: Callable) -> None:
    """Route op `name` to `fn` (same signature as `ref.<name>`)."""
    if name not in OPS:
        raise KeyError(f"unknown op {name!r}; ops are {OPS}")
    _active[name] = fn


def install(implementations: dict[str, Callable]) -> bool:
    """Route each op of `implementations` (op name -> function, as `cpu.implementations()` and
    `triton_ops.implementations()` return them); returns whether there were any."""
    for name, fn in implementations.items():
        use(name, fn)
    return bool(implementations)


class ByDevice:
    """An op that sends CUDA inputs to `gpu` and everything else to `host`.

    With a GPU, the offload runtime runs some experts there and the rest on the CPU in the same
    step; each half must get its own fast kernel (the Triton ops alone would fall back to the slow
    reference for CPU tensors). The first argument of every op is the activation tensor."""

    def __init__(self, gpu: Callable, host: Callable):
        self.gpu, self.host = gpu, host

    def __call__(self, x, *args, **kwargs):
        return (self.gpu if x.device.type == "cuda" else self.host)(x, *args, **kwargs)


def _qualname(fn: Callable) -> str:
    if isinstance(fn, ByDevice):
        return f"{_qualname(fn.gpu)} (cuda) + {_qualname(fn.host)} (cpu)"
    return f"{fn.__module__}.{fn.__qualname__}"


def active() -> dict[str, str]:
    """Op name -> qualified name of the implementation in use."""
    return {name: _qualname(fn) for name, fn in _active.items()}


def select(mode: str | None = None) -> list[str]:
    """Route ops to the fastest implementations available; returns notices for the user.

    `auto` (default): native CPU kernels when they build, Triton kernels when CUDA and
    Triton are present (both: CUDA tensors go to Triton, host tensors to the CPU kernels), the
    reference otherwise (with a notice saying why). An explicit
    `cpu` or `triton` that cannot be honoured raises.
    """
    from dsv4cli.errors import UsageError

    mode = (mode or os.environ.get("DSV4_KERNELS") or "auto").lower()
    if mode not in MODES:
        raise UsageError(f"DSV4_KERNELS={mode!r} is not one of {', '.join(MODES)}")
    reset()
    notices: list[str] = []
    if mode == "ref":
        return notices
    if mode in ("auto", "cpu"):
        from dsv4cli.kernels import cpu

        try:
            cpu.load()
            install(cpu.implementations())
            notices += cpu.take_notices()
        except Exception as exc:  # a missing compiler must not stop `auto` from running
            if mode == "cpu":
                raise
            notices.append(f"native CPU kernels unavailable ({exc}); using the slower reference kernels")
    if mode in ("auto", "triton"):
        from dsv4cli.kernels import triton_ops

        host = dict(_active)
        if triton_ops.available():
            install(triton_ops.implementations())
            for name, fn in host.items():  # keep the native CPU kernels for tensors in host memory
                if fn is not getattr(ref, name):
                    _active[name] = ByDevice(_active[name], fn)
        elif mode == "triton":
            raise UsageError("DSV4_KERNELS=triton needs a CUDA GPU and the triton package")
    return notices


def linear(*args, **kwargs):
    return _active["linear"](*args, **kwargs)


def grouped_linear(*args, **kwargs):
    return _active["grouped_linear"](*args, **kwargs)


def swiglu_expert(*args, **kwargs):
    return _active["swiglu_expert"](*args, **kwargs)


def moe_experts(*args, **kwargs):
    return _active["moe_experts"](*args, **kwargs)


def hc_split_sinkhorn(*args, **kwargs):
    return _active["hc_split_sinkhorn"](*args, **kwargs)


def sparse_attn(*args, **kwargs):
    return _active["sparse_attn"](*args, **kwargs)


def indexer_topk(*args, **kwargs):
    return _active["indexer_topk"](*args, **kwargs)


def cached_attn(*args, **kwargs):
    return _active["cached_attn"](*args, **kwargs)


def kv_fp8_quant(*args, **kwargs):
    return _active["kv_fp8_quant"](*args, **kwargs)


def indexer_fp4_quant(*args, **kwargs):
    return _active["indexer_fp4_quant"](*args, **kwargs)


def rope(*args, **kwargs):
    return _active["rope"](*args, **kwargs)


reset()
