"""UTF-8-safe streaming detokenizer for byte-level BPE.

A byte-level token can end in the middle of a multibyte character (CJK, emoji), so decoding
token by token would print broken text. We feed each token's raw bytes to an incremental
UTF-8 decoder, which holds back an incomplete trailing sequence until it completes and turns
truly invalid bytes into U+FFFD exactly where a one-shot `bytes.decode(errors="replace")` would.
The concatenated deltas plus `finalize()` therefore equal `tokenizer.decode(all_ids)`.
Each step costs O(len(token bytes)); nothing is re-decoded.
"""

from __future__ import annotations

import codecs
from typing import Protocol


class _TokenSource(Protocol):
    def token_bytes(self, token_id: int) -> bytes: ...

    def is_special(self, token_id: int) -> bool: ...


class StreamingDetokenizer:
    """Turn a stream of token ids into text deltas that never split a UTF-8 character.

    With `skip_special_tokens=True`, special tokens (BOS/EOS/pad, ...) produce no text,
    matching `tokenizer.decode(ids, skip_special_tokens=True)`.
    """

    def __init__(self, tokenizer: _TokenSource, skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._decoder_cls = codecs.getincrementaldecoder("utf-8")
        self.reset()

    def reset(self) -> None:
        """Forget all state, ready for a new sequence."""
        self._decoder = self._decoder_cls(errors="replace")
        self._pieces: list[str] = []
        self._text_cache: str | None = ""
        self._count = 0
        self._finalized = False

    def add_token(self, token_id: int) -> str:
        """Feed one token id; return the text it completes ("" while a character is pending)."""
        if self._finalized:
            raise RuntimeError("add_token() after finalize(); call reset() first")
        self._count += 1
        if self._skip_special and self._tokenizer.is_special(token_id):
            return ""
        delta = self._decoder.decode(self._tokenizer.token_bytes(token_id))
        return self._emit(delta)

    def finalize(self) -> str:
        """Flush what is held back; leftover incomplete bytes become U+FFFD."""
        if self._finalized:
            return ""
        self._finalized = True
        return self._emit(self._decoder.decode(b"", final=True))

    def _emit(self, delta: str) -> str:
        if delta:
            self._pieces.append(delta)
            self._text_cache = None
        return delta

    @property
    def text(self) -> str:
        """Everything emitted so far (not including bytes still held back)."""
        if self._text_cache is None:
            self._text_cache = "".join(self._pieces)
            self._pieces = [self._text_cache]
        return self._text_cache

    @property
    def pending_bytes(self) -> bytes:
        """Bytes of an incomplete character currently held back."""
        return self._decoder.getstate()[0]

    @property
    def num_tokens(self) -> int:
        """How many tokens were fed since the last reset."""
        return self._count
