"""The DeepSeek-V4 op set, dispatched to an implementation chosen at run time.

The model calls these functions only; `ref` (plain PyTorch) is always available and
is the oracle for the fast implementations. `use(name, fn)` swaps one op (how the
CPU and Triton kernels register themselves); `reset()` goes back to the reference.
"""

from __future__ import annotations

from collections.abc import Callable

from dsv4cli.kernels import ref

OPS = ("linear", "swiglu_expert", "hc_split_sinkhorn", "sparse_attn", "kv_fp8_quant", "indexer_fp4_quant")

_active: dict[str, Callable] = {}


def reset() -> None:
    """Every op back to its plain PyTorch reference."""
    _active.update({name: getattr(ref, name) for name in OPS})


def use(name: str, fn: Callable) -> None:
    """Route op `name` to `fn` (same signature as `ref.<name>`)."""
    if name not in OPS:
        raise KeyError(f"unknown op {name!r}; ops are {OPS}")
    _active[name] = fn


def active() -> dict[str, str]:
    """Op name -> qualified name of the implementation in use."""
    return {name: f"{fn.__module__}.{fn.__qualname__}" for name, fn in _active.items()}


def linear(*args, **kwargs):
    return _active["linear"](*args, **kwargs)


def swiglu_expert(*args, **kwargs):
    return _active["swiglu_expert"](*args, **kwargs)


def hc_split_sinkhorn(*args, **kwargs):
    return _active["hc_split_sinkhorn"](*args, **kwargs)


def sparse_attn(*args, **kwargs):
    return _active["sparse_attn"](*args, **kwargs)


def kv_fp8_quant(*args, **kwargs):
    return _active["kv_fp8_quant"](*args, **kwargs)


def indexer_fp4_quant(*args, **kwargs):
    return _active["indexer_fp4_quant"](*args, **kwargs)


reset()
