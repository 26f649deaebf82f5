"""What an API request asks of the engine, whichever dialect it came in: the shared request types, the
server's defaults, and the sampling fields all dialects accept."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dsv4cli.chat.encoding import ThinkMode
from dsv4cli.engine.sampling import InvalidSamplingParam, SamplingParams
from dsv4cli.serve.errors import invalid
from dsv4cli.serve.fields import Fields


@dataclass(frozen=True)
class ServeDefaults:
    """The server's settings for what a request leaves out."""

    model_names: tuple[str, ...]  # the names a request's `model` may give (the first is reported)
    mode: ThinkMode = ThinkMode.THINK_HIGH
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = 8192
    reasoning_budget: int | None = None
    context: int = 16384

    @property
    def model(self) -> str:
        return self.model_names[0]


@dataclass
class ChatRequest:
    """A chat turn: `messages` in the encoder's format (tools attached to the system message)."""

    model: str
    messages: list[dict[str, Any]]
    mode: ThinkMode
    sampling: SamplingParams
    max_tokens: int
    stop: tuple[str, ...] = ()
    reasoning_budget: int | None = None
    stream: bool = False
    include_usage: bool = False
    has_tools: bool = False


@dataclass
class CompletionRequest:
    """A raw completion: `prompt` is text (or token ids) given to the model as is."""

    model: str
    prompt: str | list[int]
    sampling: SamplingParams
    max_tokens: int
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    ignore_eos: bool = False  # vLLM's extension: generate to the limit


def requested_model(body: Fields, defaults: ServeDefaults) -> str:
    """The served model's name, when `model` names it (or is left out); else a 404 listing the names."""
    from dsv4cli.serve.errors import ApiError

    name = body.string("model")
    if name is None:
        return defaults.model
    if name not in defaults.model_names:
        served = ", ".join(repr(n) for n in defaults.model_names)
        raise ApiError(404, f"the model {name!r} does not exist; this server serves {served}", param="model",
                       code="model_not_found")
    return defaults.model


def sampling_from(body: Fields, defaults: ServeDefaults, top_k_key: str = "top_k") -> SamplingParams:
    """temperature, top_p, top_k, min_p and seed from the request, the server's defaults for the rest."""
    base = defaults.sampling
    values = {
        "temperature": body.number("temperature", base.temperature, minimum=0.0, maximum=2.0),
        "top_p": body.number("top_p", base.top_p),
        "top_k": body.integer(top_k_key, base.top_k, minimum=0),
        "min_p": body.number("min_p", base.min_p),
        "seed": body.integer("seed", base.seed),
    }
    try:
        return SamplingParams(**values)
    except InvalidSamplingParam as err:
        raise invalid(f"'{err.param}' {err.requirement}, got {err.value!r}", err.param) from None


def token_limit(body: Fields, defaults: ServeDefaults, *keys: str) -> int:
    """The first of `keys` the request gives (at least 1), else the server's default."""
    for key in keys:
        value = body.integer(key, minimum=1)
        if value is not None:
            return value
    return defaults.max_tokens


def text_of(content: Any, where: str, allowed: tuple[str, ...] = ("text",)) -> str:
    """A message's content as text: a string, or an array of text parts joined (other parts are a 400)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(f"'{where}' must be a string or an array of content parts", where)
    pieces = []
    for i, part in enumerate(content):
        part = Fields(part, f"{where}[{i}]")
        kind = part.string("type", required=True, nullable=False)
        if kind not in allowed:
            raise invalid(f"'{part.name('type')}' {kind!r} is not supported: this model reads text only",
                          part.name("type"))
        pieces.append(part.string("text", required=True, nullable=False))
    return "".join(pieces)


def with_tools(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
               response_format: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """`messages` with the tool schemas (and a response format) on the system message, where V4's encoder
    reads them (spec 4.2); a system message with no text is added when there is none."""
    if not tools and not response_format:
        return messages
    if not messages or messages[0].get("role") != "system":
        messages = [{"role": "system", "content": ""}, *messages]
    system = dict(messages[0])
    if tools:
        system["tools"] = tools
    if response_format:
        system["response_format"] = response_format
    return [system, *messages[1:]]
