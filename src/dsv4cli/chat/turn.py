"""One generation, from prompt ids to a parsed reply: the engine's tokens detokenized, split into the
thinking trace and the answer (spec 4.6), cut at stop sequences, and streamed to a sink.

Both front ends run turns through here: the chat session (its renderer is the sink) and the server
(its sink queues deltas for an HTTP stream). A sink has `reasoning(text)` and `content(text)`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import replace

from dsv4cli.chat.detok import StreamingDetokenizer
from dsv4cli.chat.encoding import CONTENT_CHANNEL, REASONING_CHANNEL, OutputDelta, StreamingOutputParser
from dsv4cli.chat.stops import StopMatcher
from dsv4cli.chat.tokenizer import Tokenizer
from dsv4cli.engine.events import GenerationStats, TurnResult
from dsv4cli.engine.sampling import SamplingParams


def run_turn(engine, tokenizer: Tokenizer, prompt_ids: Sequence[int], sink, *, thinking: bool,
             sampling: SamplingParams, max_tokens: int, reasoning_budget: int | None = None,
             stop: Sequence[str] = (), cancel: threading.Event | None = None,
             prefill_progress: Callable[[int, int], None] | None = None) -> TurnResult:
    """Generate the reply to `prompt_ids` (a chat prompt; `thinking`: it opens a trace) into `sink`.

    The answer is streamed through the stop sequences; a stop string that completes ends the generation
    (finish_reason "stop") and neither it nor any tool-call block after it is kept."""
    special = tokenizer.special
    detok = StreamingDetokenizer(tokenizer)
    parser = StreamingOutputParser(think_end_id=special.think_end, eos_id=special.eos, thinking=thinking)
    stats = GenerationStats()
    stops, halt = StopMatcher(stop), threading.Event()
    events = engine.generate(
        list(prompt_ids), sampling, max_tokens, stop=[special.eos], cancel=cancel, reasoning=thinking,
        think_end_id=special.think_end, reasoning_budget=reasoning_budget if thinking else None, halt=halt,
        prefill_progress=prefill_progress)
    shown: list[str] = []  # the answer as shown: up to a stop sequence
    for event in events:
        if isinstance(event, GenerationStats):
            stats = event
            break
        _route(parser.feed(event.token_id, detok.add_token(event.token_id)), sink, stops, shown)
        if stops.stopped:
            halt.set()
    tail = detok.finalize()
    if tail and not parser.done:
        _route(parser.feed(-1, tail), sink, stops, shown)
    _route(parser.flush(), sink, stops, shown)
    if not stops.stopped:
        _route([OutputDelta(CONTENT_CHANNEL, stops.flush())], sink, None, shown)
    in_reasoning = parser.channel == REASONING_CHANNEL
    parsed = parser.finish()
    if stops.stopped:
        parsed = replace(parsed, content="".join(shown), tool_calls=[])
    return TurnResult(content=parsed.content, reasoning=parsed.reasoning_content, tool_calls=parsed.tool_calls,
                      malformed=parsed.malformed and stats.finish_reason == "stop" and not stops.stopped,
                      problems=parsed.problems, interrupted=stats.finish_reason == "cancelled",
                      stopped_in_reasoning=in_reasoning and stats.finish_reason == "length", stats=stats,
                      stop_sequence=stops.matched)


def run_completion(engine, tokenizer: Tokenizer, prompt_ids: Sequence[int], sink, *, sampling: SamplingParams,
                   max_tokens: int, stop: Sequence[str] = (), cancel: threading.Event | None = None,
                   ignore_eos: bool = False) -> TurnResult:
    """Continue a raw prompt (no chat template, no trace): the text until the end-of-sentence token (unless
    `ignore_eos`: benchmarks), the token limit or a stop sequence, streamed to `sink.content`."""
    eos = tokenizer.special.eos
    detok = StreamingDetokenizer(tokenizer, skip_special_tokens=True)
    stops, halt = StopMatcher(stop), threading.Event()
    stats = GenerationStats()
    shown: list[str] = []
    for event in engine.generate(list(prompt_ids), sampling, max_tokens, stop=[] if ignore_eos else [eos],
                                 cancel=cancel, halt=halt):
        if isinstance(event, GenerationStats):
            stats = event
            break
        if event.token_id != eos:
            _route([OutputDelta(CONTENT_CHANNEL, detok.add_token(event.token_id))], sink, stops, shown)
        if stops.stopped:
            halt.set()
    if not stops.stopped:
        _route([OutputDelta(CONTENT_CHANNEL, detok.finalize() + stops.flush())], sink, None, shown)
    return TurnResult(content="".join(shown), interrupted=stats.finish_reason == "cancelled", stats=stats,
                      stop_sequence=stops.matched)


def _route(deltas, sink, stops: StopMatcher | None = None, shown: list[str] | None = None) -> None:
    """Pass the parser's deltas on: the trace as it comes, the answer through the stop sequences (if any),
    appending what is shown of it to `shown`."""
    for delta in deltas:
        if delta.channel == REASONING_CHANNEL:
            sink.reasoning(delta.text)
            continue
        text = delta.text if stops is None else stops.feed(delta.text)[0]
        if text:
            sink.content(text)
            if shown is not None:
                shown.append(text)
