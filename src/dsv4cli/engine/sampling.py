"""Next-token sampling: temperature, top-k, top-p, min-p, seeded; greedy at temperature 0.

Defaults follow DeepSeek's recommendation for V4 (temperature 1.0, top-p 1.0, spec §5).
The draw is the exponential race `argmax(p / Exp(1))` the reference uses, which needs
no cumulative sum and gives the same distribution as multinomial sampling.
torch is imported on first use, so `SamplingParams` can validate CLI flags before torch loads.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

from dsv4cli.errors import UsageError

if TYPE_CHECKING:
    import torch


class InvalidSamplingParam(UsageError, ValueError):
    """A sampling parameter out of range or of the wrong type; `param` names the field, `requirement`
    says what it must be, so a caller can name its own flag for it."""

    def __init__(self, param: str, requirement: str, value: object):
        super().__init__(f"{param} {requirement}, got {value!r}")
        self.param = param
        self.requirement = requirement
        self.value = value


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """Validated on construction: NaN, infinities, out-of-range values and wrong types are refused,
    since each would silently give empty or degenerate output instead of an error."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # 0 = off; keep tokens with p >= min_p * p_max
    seed: int | None = None

    def __post_init__(self):
        self._check("temperature", "must be a finite number >= 0", lambda v: v >= 0)
        self._check("top_p", "must be a number in (0, 1]", lambda v: 0 < v <= 1)
        self._check("min_p", "must be a number in [0, 1]", lambda v: 0 <= v <= 1)
        if not (isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k >= 0):
            raise InvalidSamplingParam("top_k", "must be a whole number >= 0", self.top_k)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise InvalidSamplingParam("seed", "must be a whole number, or unset for a random seed", self.seed)

    def _check(self, name: str, requirement: str, in_range: Callable[[float], bool]) -> None:
        value = getattr(self, name)
        if not (_is_number(value) and math.isfinite(value) and in_range(value)):
            raise InvalidSamplingParam(name, requirement, value)

    def with_value(self, name: str, text: str) -> SamplingParams:
        """A copy with field `name` parsed from `text` (for `/set temperature 0.7`)."""
        kinds = {f.name: f.type for f in fields(self)}
        if name not in kinds:
            raise UsageError(f"unknown sampling parameter {name!r}", f"one of: {', '.join(kinds)}")
        try:
            if name == "seed":
                value = None if text.lower() in ("none", "off", "random") else int(text)
            elif name == "top_k":
                value = int(text)
            else:
                value = float(text)
        except ValueError:
            raise UsageError(f"{name} needs a number, got {text!r}") from None
        return replace(self, **{name: value})


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature-scaled logits [V] with everything outside top-k / top-p / min-p set to -inf."""
    import torch

    logits = logits.float()
    logits = (logits - logits.max()) / params.temperature  # shifted first: a tiny temperature cannot overflow
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = logits.sort(descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens before it already reach top_p (the first one always stays)
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= params.top_p
        logits = logits.masked_fill(torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted), float("-inf"))
    return logits


def make_sampler(params: SamplingParams) -> Callable[[torch.Tensor], int]:
    """A function logits [V] -> token id. Reproducible for a given seed."""
    import torch

    if params.temperature == 0:
        return lambda logits: int(logits.argmax())
    generator = torch.Generator()
    if params.seed is not None:
        generator.manual_seed(params.seed % 2**64)  # any whole number (regeneration adds to it)
    else:
        generator.seed()

    def sample(logits: torch.Tensor) -> int:
        probs = filter_logits(logits.cpu(), params).softmax(-1)
        race = torch.empty_like(probs).exponential_(1, generator=generator)
        return int((probs / race).argmax())

    return sample
