"""Plain data passed between the engine, the chat session and the renderers (no behaviour)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Channel = Literal["reasoning", "content"]
FinishReason = Literal["stop", "length", "cancelled", "stop_sequence"]


@dataclass(frozen=True)
class TokenEvent:
    """One generated token, as the engine yields it."""

    token_id: int
    index: int  # 0-based position among the generated tokens
    forced: bool = False  # inserted by the engine (e.g. `</think>` at the reasoning budget), not sampled


@dataclass
class GenerationStats:
    """What one `Engine.generate` call cost; `finish_reason` says why it stopped."""

    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens reused from the prompt cache (not prefilled again)
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    time_to_first_token: float = 0.0
    peak_memory_bytes: int = 0
    finish_reason: FinishReason = "stop"
    reasoning_tokens: int = 0
    reasoning_seconds: float = 0.0
    prefill_cancelled: bool = False  # cancelled before the prompt was all in: prefill_seconds is not a prefill
    draft_tokens: int = 0  # MTP drafts verified (speculative decoding)
    accepted_draft_tokens: int = 0  # ... of which the trunk kept
    # filled when the offload runtime is used, for this call only:
    expert_cache_hit_rate: float | None = None  # host experts found in a device slot / looked up
    expert_bytes_moved: int = 0  # host -> device expert bytes (staging and prefetch)

    @property
    def prefill_tokens_per_second(self) -> float:
        """Prompt tokens prefilled per second; 0 when unknown (none, or the prefill was cancelled)."""
        prefilled = self.prompt_tokens - self.cached_tokens
        return prefilled / self.prefill_seconds if self.prefill_seconds > 0 and not self.prefill_cancelled else 0.0

    @property
    def draft_acceptance(self) -> float | None:
        """Share of the MTP drafts kept; None without drafts."""
        return self.accepted_draft_tokens / self.draft_tokens if self.draft_tokens else None

    @property
    def decode_tokens_per_second(self) -> float:
        # the first generated token comes from the prefill, the rest from decode steps
        steps = max(self.generated_tokens - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["prefill_tokens_per_second"] = round(self.prefill_tokens_per_second, 3)
        out["decode_tokens_per_second"] = round(self.decode_tokens_per_second, 3)
        return out


@dataclass
class TurnResult:
    """A finished assistant turn, as the chat session hands it to a renderer."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    malformed: bool = False
    problems: list[str] = field(default_factory=list)
    interrupted: bool = False
    stopped_in_reasoning: bool = False  # the token limit ended the reply inside the thinking trace: no answer
    stop_sequence: str | None = None  # the stop string that ended the answer (not part of it)
    stats: GenerationStats = field(default_factory=GenerationStats)
