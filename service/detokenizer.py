"""Incremental detokenization and stop-string matching.

Tokens are byte-level BPE pieces, so one character can span tokens: bytes go through Python's incremental
UTF-8 decoder, which holds back an unfinished sequence until its last byte arrives (never half a character).
Stop strings are matched on the decoded text across token boundaries; text that could still be the start of a
stop string is held back, so a stop string never leaks into the output (TGI's StoppingCriteria returns
`(done, reason)` the same way).

Torch-free.
"""

from __future__ import annotations

import codecs
import weakref
from collections.abc import Sequence

from model.tokenizer import Tokenizer

_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def byte_table(tokenizer: Tokenizer) -> list[bytes]:
    """Every token's raw bytes, built once per tokenizer (8,192 tokens: a few ms): `token_bytes` maps each
    character back through the byte-level alphabet, about 2 us per call, once per token per sequence."""
    table = _TABLES.get(tokenizer)
    if table is None:
        table = _TABLES[tokenizer] = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
    return table


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, skip_ids: Sequence[int] = ()) -> None:
        self.table = byte_table(tokenizer)
        self.skip = frozenset(skip_ids)
        # errors="replace": invalid bytes (a model can emit any) become U+FFFD instead of raising.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """The text that token completes ('' while a character is still unfinished)."""
        if token_id in self.skip or token_id >= len(self.table):
            return ""  # ids past the tokenizer's vocabulary (a model may have spare rows) have no text
        return self._decoder.decode(self.table[token_id])

    def flush(self) -> str:
        """At the end: an unfinished sequence left over becomes U+FFFD."""
        return self._decoder.decode(b"", final=True)


class StopMatcher:
    """Feed text deltas; get back the text safe to emit and whether a stop string was hit."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""

    def push(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        buf = self._held + text
        # The stop string completed first wins (earliest end; at a tie the one starting earliest), as if the
        # text arrived one character at a time. Held text never contains a whole stop string.
        best: tuple[int, int] | None = None
        for s in self.stops:
            i = buf.find(s)
            if i >= 0 and (best is None or (i + len(s), i) < best):
                best = (i + len(s), i)
        if best is not None:
            self._held = ""
            return buf[: best[1]], True
        # Hold back the longest tail of buf that is a prefix of some stop string.
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:n]):
                    keep = n
                    break
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """At the end without a stop: the held-back tail was not a stop string after all."""
        out, self._held = self._held, ""
        return out
