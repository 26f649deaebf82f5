"""DeepSeek-V4 tokenizer: a thin wrapper over the `tokenizers` byte-level BPE.

Loads `tokenizer.json` (plus `tokenizer_config.json` for the bos/eos/pad names when present),
exposes encode/decode, the special-token ids the runtime needs (read from the file's added
tokens, never hard-coded), and `token_bytes` for the UTF-8-safe streaming detokenizer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer

from dsv4cli.errors import CheckpointError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

# Token strings used when tokenizer_config.json is absent or does not name them.
DEFAULT_BOS = "<｜begin▁of▁sentence｜>"
DEFAULT_EOS = "<｜end▁of▁sentence｜>"
DEFAULT_PAD = "<｜▁pad▁｜>"

# Field of SpecialTokens -> token string (bos/eos/pad come from the config, see _resolve_names).
_FIXED_SPECIALS = {
    "user": "<｜User｜>",
    "assistant": "<｜Assistant｜>",
    "think_start": "<think>",
    "think_end": "</think>",
    "dsml": "｜DSML｜",
    "latest_reminder": "<｜latest_reminder｜>",
}

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")

_FIX_HINT = "copy tokenizer.json and tokenizer_config.json from the official DeepSeek-V4 release"


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the special tokens the chat encoder, sampler and reasoning splitter need."""

    bos: int
    eos: int
    pad: int
    user: int
    assistant: int
    think_start: int
    think_end: int
    dsml: int
    latest_reminder: int


def _byte_to_unicode() -> dict[int, str]:
    """The byte-level BPE alphabet: each byte 0..255 maps to one printable character.

    Printable Latin-1 bytes map to themselves; the remaining 68 bytes (controls, space,
    DEL, NBSP, soft hyphen) map, in byte order, to U+0100 onwards.
    """
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    kept = set(keep)
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in kept:
            table[b] = chr(0x100 + extra)
            extra += 1
    return table


def _bytes_translation() -> dict[int, str]:
    """A str.translate table turning byte-level characters into chr(byte) (Latin-1).

    Characters below U+0100 that are *not* in the byte-level alphabet map to U+0100, which
    cannot be Latin-1 encoded, so `encode("latin-1")` fails exactly when a token is not
    purely byte-level (and must then be taken as its UTF-8 content, like the decoder does).
    """
    trans: dict[int, str] = {ord(c): chr(b) for b, c in _byte_to_unicode().items()}
    for cp in range(0x100):
        trans.setdefault(cp, "\u0100")
    return trans


def replace_lone_surrogates(text: str) -> str:
    """`text` with each lone surrogate (undecodable bytes under surrogateescape, or a JSON "\\ud800"
    escape) replaced by U+FFFD, so it can be encoded as UTF-8 and tokenized."""
    return _LONE_SURROGATE.sub("\ufffd", text)


def _config_token_name(value: Any) -> str | None:
    """A token name from tokenizer_config.json: either a plain string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class Tokenizer:
    """DeepSeek-V4 tokenizer: encode/decode plus special ids and per-token raw bytes."""

    def __init__(self, backend: _HFTokenizer, config: dict[str, Any] | None = None, source: str = ""):
        self._tok = backend
        self._source = source or "tokenizer"
        self._byte_table: list[bytes] | None = None
        self._added: dict[str, int] = {
            tok.content: int(i) for i, tok in backend.get_added_tokens_decoder().items()
        }
        self._special_ids = frozenset(
            int(i) for i, tok in backend.get_added_tokens_decoder().items() if tok.special
        )
        vocab = backend.get_vocab(with_added_tokens=True)
        self._vocab_size = max(vocab.values()) + 1 if vocab else 0
        self.special = self._resolve_specials(config or {})

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_file(cls, path: str | Path, config_path: str | Path | None = None) -> Tokenizer:
        """Load from a tokenizer.json file (and an optional tokenizer_config.json)."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"tokenizer file not found: {path}", _FIX_HINT)
        try:
            backend = _HFTokenizer.from_file(str(path))
        except Exception as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CheckpointError(f"cannot parse {path}: {reason}", _FIX_HINT) from exc
        config: dict[str, Any] = {}
        if config_path is not None and Path(config_path).is_file():
            try:
                loaded = json.loads(Path(config_path).read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"cannot parse {config_path}: {exc}", _FIX_HINT) from exc
            if not isinstance(loaded, dict):
                raise CheckpointError(f"cannot parse {config_path}: not a JSON object", _FIX_HINT)
            config = loaded
        return cls(backend, config, source=str(path))

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load from a model directory (tokenizer.json + optional tokenizer_config.json).

        A path to a tokenizer.json file is accepted too.
        """
        path = Path(path)
        if path.is_dir():
            return cls.from_file(path / TOKENIZER_FILE, path / TOKENIZER_CONFIG_FILE)
        if path.is_file():
            return cls.from_file(path, path.with_name(TOKENIZER_CONFIG_FILE))
        raise CheckpointError(f"tokenizer not found: {path} does not exist", _FIX_HINT)

    def _resolve_specials(self, config: dict[str, Any]) -> SpecialTokens:
        names = {
            "bos": _config_token_name(config.get("bos_token")) or DEFAULT_BOS,
            "eos": _config_token_name(config.get("eos_token")) or DEFAULT_EOS,
            **_FIXED_SPECIALS,
        }
        ids: dict[str, int] = {}
        for field, name in names.items():
            if name not in self._added:
                raise CheckpointError(
                    f"{self._source} lacks the special token {name!r} ({field}); "
                    "it is not a DeepSeek-V4 tokenizer",
                    _FIX_HINT,
                )
            ids[field] = self._added[name]
        # pad: the config's pad_token if it names a known token, else the dedicated pad token,
        # else eos (padding is never fed to the model as content, so any valid id works).
        pad_name = _config_token_name(config.get("pad_token"))
        if pad_name in self._added:
            ids["pad"] = self._added[pad_name]
        else:
            ids["pad"] = self._added.get(DEFAULT_PAD, ids["eos"])
        return SpecialTokens(**ids)

    # ------------------------------------------------------------------ API
    @property
    def vocab_size(self) -> int:
        """Size of the id space (max id + 1), i.e. the embedding/LM-head row count."""
        return self._vocab_size

    @property
    def backend(self) -> _HFTokenizer:
        """The underlying `tokenizers.Tokenizer`."""
        return self._tok

    def encode(self, text: str) -> list[int]:
        """Token ids for `text`; special tokens written in the text become their single ids.

        No BOS/EOS is added: the chat encoder writes BOS into the text itself. Lone surrogates,
        which UTF-8 cannot hold, become U+FFFD (callers that can ask the user should reject them first).
        """
        return self._tok.encode(replace_lone_surrogates(text), add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text for `ids` (invalid UTF-8 becomes U+FFFD, as in the reference tokenizer)."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def id_of(self, token: str) -> int:
        """Id of an exact token string (e.g. "<think>"); KeyError when the vocab lacks it."""
        i = self._tok.token_to_id(token)
        if i is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return int(i)

    def is_special(self, token_id: int) -> bool:
        """True for ids that `decode(..., skip_special_tokens=True)` drops."""
        return int(token_id) in self._special_ids

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes token `token_id` stands for (b"" for ids outside the vocabulary).

        Byte-level tokens map back through the byte-to-unicode alphabet; added tokens that are
        not purely byte-level characters (e.g. "<｜User｜>") are their UTF-8 content, matching
        what the ByteLevel decoder does per token.
        """
        table = self._byte_table
        if table is None:
            table = self._byte_table = self._build_byte_table()
        token_id = int(token_id)
        if 0 <= token_id < len(table):
            return table[token_id]
        return b""

    def _build_byte_table(self) -> list[bytes]:
        """Precompute token_bytes for the whole id space (one pass, ~0.1 s for 129k tokens)."""
        trans = _bytes_translation()
        table = [b""] * self._vocab_size
        for token, i in self._tok.get_vocab(with_added_tokens=True).items():
            try:
                table[i] = token.translate(trans).encode("latin-1")
            except UnicodeEncodeError:
                table[i] = token.encode("utf-8")
        return table

    def __repr__(self) -> str:
        return f"Tokenizer({self._source!r}, vocab_size={self._vocab_size})"
