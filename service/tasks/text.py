"""Language-aware text utilities for the task endpoints: sentence splitting (batch and incremental), language
detection, word counts and keyword coverage. Torch-free, no models: scripts, punctuation and stop words.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_CJK = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff"
CJK_CHAR = re.compile(f"[{_CJK}]")
# Closing quotes/brackets that belong to the sentence they follow.
_CLOSERS = "\"'”’」』）)]»"
_CLOSE = re.escape(_CLOSERS)
# A full-width terminator ends a sentence by itself; an ASCII one only before whitespace or the end of the text.
_FULL_END = re.compile(f"[。！？]+[{_CLOSE}]*")
_ASCII_END = re.compile(f"(?:[.!?]+|…)[{_CLOSE}]*(?=\\s|$)")
# Tokens ending in "." that do not end a sentence (English and German), compared lower-cased.
_ABBREVIATIONS_TEXT = (
    "mr mrs ms dr prof st jr sr vs etc e.g i.e a.m p.m no approx dept inc ltd co corp fig jan feb mar apr jun "
    "jul aug sep sept oct nov dec z.b u.a usw bzw ca nr str hr fr dipl ggf evtl vgl d.h s.o inkl zzgl"
)
ABBREVIATIONS = frozenset(_ABBREVIATIONS_TEXT.split())

_EN_WORDS_TEXT = (
    "the and is are was you your to of in for with it not this that on have be we my can what how please "
    "i do will at from a our has had there were would just today very"
)
EN_WORDS = frozenset(_EN_WORDS_TEXT.split())
_DE_WORDS_TEXT = (
    "der die das und ist nicht ich sie wir ein eine mit für auf zu den von sind bitte ihr ihre haben kann "
    "wie was es im dem des auch noch bei mein meine meinen meiner mir mich dir hat habe hast wenn oder aber "
    "beim zum zur nur sich uns unser unsere einen einem einer wurde werden bin bist sehr schon heute"
)
DE_WORDS = frozenset(_DE_WORDS_TEXT.split())


@dataclass(frozen=True)
class Segment:
    text: str  # the sentence, without surrounding whitespace
    sep: str  # the whitespace that followed it in the input ("" at the end)


def _is_abbreviation(text: str, end: int) -> bool:
    """True when the '.' at text[end - 1] closes an abbreviation or an initial ("J. Smith")."""
    start = end - 1
    while start > 0 and not text[start - 1].isspace():
        start -= 1
    word = text[start : end - 1].lower().strip(_CLOSERS + "(")
    return word in ABBREVIATIONS or (len(word) == 1 and word.isalpha())


def sentence_ends(text: str) -> list[int]:
    """Offsets just after each sentence terminator in `text` (a terminator at the very end included)."""
    ends = {m.end() for m in _FULL_END.finditer(text)}
    for m in _ASCII_END.finditer(text):
        if (
            m.group(0)[0] == "."
            and m.group(0).rstrip(_CLOSERS) == "."
            and _is_abbreviation(text, m.start() + 1)
        ):
            continue
        ends.add(m.end())
    return sorted(ends)


def split_sentences(text: str) -> list[Segment]:
    """Split into sentences, keeping the whitespace between them so the translation keeps the paragraphs."""
    segments: list[Segment] = []
    pos = 0
    for end in sentence_ends(text) + [len(text)]:
        if end <= pos:
            continue
        chunk = text[pos:end]
        stripped = chunk.strip()
        j = end
        while j < len(text) and text[j].isspace():
            j += 1
        if stripped:
            segments.append(Segment(stripped, text[end:j]))
        elif segments:
            segments[-1] = Segment(segments[-1].text, segments[-1].sep + chunk + text[end:j])
        pos = j
    if segments:
        segments[-1] = Segment(segments[-1].text, "")
    return segments


def join_translations(translations: list[str], segments: list[Segment], target_lang: str) -> str:
    """Join translated sentences: paragraph breaks kept; within a paragraph a space, none for Chinese."""
    out: list[str] = []
    for tr, seg in zip(translations, segments, strict=True):
        out.append(tr.strip())
        if "\n" in seg.sep:
            out.append("\n" * min(seg.sep.count("\n"), 2))
        elif seg.sep or seg is not segments[-1]:
            out.append("" if target_lang == "zh" else " ")
    return "".join(out).rstrip()


class SentenceStream:
    """Incremental splitter for text that arrives in pieces (a live transcript): `feed` returns the sentences
    completed so far, `flush` the rest. A sentence counts as complete once its terminator is followed by
    whitespace (so "3.14" and "Dr. Smith" are not cut) or, for Chinese, at the full-width terminator."""

    def __init__(self) -> None:
        self.buffer = ""

    def feed(self, text: str) -> list[str]:
        self.buffer += text
        ends = [e for e in sentence_ends(self.buffer) if e < len(self.buffer) or self._final_ok(e)]
        if not ends:
            return []
        cut = ends[-1]
        done = [s.text for s in split_sentences(self.buffer[:cut])]
        self.buffer = self.buffer[cut:].lstrip()
        return done

    def _final_ok(self, end: int) -> bool:
        # At the very end of what has arrived only a full-width terminator is final: an ASCII "." could still
        # become "3.14" or "e.g." with the next piece.
        return any(m.end() == end for m in _FULL_END.finditer(self.buffer))

    def flush(self) -> list[str]:
        rest, self.buffer = self.buffer, ""
        return [s.text for s in split_sentences(rest)]


def detect_language(text: str) -> str | None:
    """'zh', 'de' or 'en' from the script and stop words; None when the text has no letters to go on."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return None
    cjk = sum(1 for c in letters if CJK_CHAR.match(c))
    if cjk / len(letters) >= 0.3:
        return "zh"
    words = re.findall(r"[^\W\d_]+", text.lower())
    de = sum(w in DE_WORDS for w in words) + 2 * sum(c in "äöüß" for c in text.lower())
    en = sum(w in EN_WORDS for w in words)
    return "de" if de > en else "en"


def word_count(text: str) -> int:
    """Words for a target length: whitespace-separated words, each CJK character counted as one word."""
    return len(CJK_CHAR.sub(" ", text).split()) + len(CJK_CHAR.findall(text))


def keyword_hits(text: str, keywords: list[str]) -> list[bool]:
    """Whether each keyword appears in `text` (case-insensitive, whole words for Latin script)."""
    low = text.lower()
    out = []
    for k in keywords:
        k = k.strip().lower()
        if not k:
            out.append(False)
        elif CJK_CHAR.search(k):
            out.append(k in low)
        else:
            out.append(re.search(r"(?<!\w)" + re.escape(k) + r"(?!\w)", low) is not None)
    return out
