"""Stop sequences on a streamed answer: `StopMatcher` shows exactly the text before the first stop string,
however the text is split into pieces."""

from __future__ import annotations

import random

import pytest

from dsv4cli.chat.stops import MAX_STOPS, StopMatcher, check_stops


def run(stops, pieces):
    matcher = StopMatcher(stops)
    shown = []
    for piece in pieces:
        text, stopped = matcher.feed(piece)
        shown.append(text)
        if stopped:
            return "".join(shown), True
    return "".join(shown) + matcher.flush(), False


def splits(text, rng):
    cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, len(text) - 1))) if len(text) > 1 else []
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


@pytest.mark.parametrize("seed", range(200))
def test_any_split_shows_the_text_before_the_first_completed_stop(seed):
    rng = random.Random(seed)
    alphabet = "ab\n"
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
    stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
    hits = [(i + len(s), i) for s in stops if (i := text.find(s)) >= 0]  # the first to complete wins
    shown, stopped = run(stops, splits(text, rng))
    assert stopped == bool(hits)
    assert shown == (text[:min(hits)[1]] if hits else text)


def test_overlapping_prefixes_and_nothing_after_the_stop():
    assert run(["aab"], ["a", "a", "a", "b", "c"]) == ("a", True)
    assert run(["</answer>"], ["x</ans", "wer>tail"]) == ("x", True)
    assert run(["END"], ["the E", "N", "d"]) == ("the ENd", False)
    matcher = StopMatcher(["!"])
    assert matcher.feed("hi!") == ("hi", True) and matcher.feed("more") == ("", True) and matcher.flush() == ""
    assert run([], ["free", " text"]) == ("free text", False)
    assert run(["abc", "b"], ["abc"]) == ("a", True)  # "b" completes first


def test_bad_stop_lists():
    with pytest.raises(ValueError, match="non-empty"):
        check_stops(["ok", ""])
    with pytest.raises(ValueError, match=f"at most {MAX_STOPS}"):
        check_stops(["a", "b", "c", "d", "e"])
