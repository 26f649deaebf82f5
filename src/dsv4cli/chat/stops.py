"""Stop sequences on the streamed answer: the text up to the first stop string, never the string itself.

The answer arrives in pieces that need not end on a stop string's boundary, so `StopMatcher` holds back the
longest tail that could still begin one (at most the longest stop string less one character) and
releases it once it cannot. The stop string that completes first in the stream ends the answer, however
the text is split. As in OpenAI's API, the stop string is cut from the answer and generation ends; the
thinking trace is not searched.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

#: most stop sequences one request may give, as in OpenAI's API
MAX_STOPS = 4


def check_stops(stops: Iterable[str]) -> tuple[str, ...]:
    """The stop strings as given, or ValueError for an empty string or more than MAX_STOPS."""
    stops = tuple(stops)
    if len(stops) > MAX_STOPS:
        raise ValueError(f"at most {MAX_STOPS} stop sequences, got {len(stops)}")
    if any(not isinstance(s, str) or not s for s in stops):
        raise ValueError("a stop sequence must be a non-empty string")
    return stops


class StopMatcher:
    """Feed the answer's text pieces in order; each feed returns (text to show now, stopped)."""

    def __init__(self, stops: Sequence[str]):
        self.stops = check_stops(stops)
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the answer
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        if self.stopped or not self.stops:
            return ("" if self.stopped else text), self.stopped
        buffer = self._held + text
        hits = [(i + len(s), i, s) for s in self.stops if (i := buffer.find(s)) >= 0]
        if hits:  # the stop string completed first (as the text streams) ends the answer
            _, start, self.matched = min(hits)
            self.stopped, self._held = True, ""
            return buffer[:start], True
        keep = self._open_prefix(buffer)
        self._held = buffer[len(buffer) - keep:] if keep else ""
        return buffer[:len(buffer) - keep], False

    def flush(self) -> str:
        """What is still held back (the answer ended without completing a stop string)."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _open_prefix(self, buffer: str) -> int:
        """Length of the longest end of `buffer` that is a proper prefix of a stop string."""
        for length in range(min(len(buffer), max(map(len, self.stops)) - 1), 0, -1):
            tail = buffer[-length:]
            if any(s.startswith(tail) for s in self.stops):
                return length
        return 0
