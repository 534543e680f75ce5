"""Validation: the record's structure (roles and their order, empty turns, lengths) and, for translation, the
language of each side. Returns None or the reason."""

from __future__ import annotations

import re

from model.tasks import LANGUAGE_NAMES
from training.data.record import Record

CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
LATIN = re.compile(r"[A-Za-zÀ-ÖØ-öø-ÿ]")
# Frequent function words; enough to tell English from German in a sentence, not a language identifier.
STOPWORDS = {
    "en": set(
        [
            "the",
            "and",
            "is",
            "are",
            "to",
            "of",
            "you",
            "your",
            "for",
            "with",
            "not",
            "this",
            "that",
            "it",
            "in",
            "on",
            "we",
            "i",
            "my",
            "can",
            "be",
            "have",
            "do",
            "please",
        ]
    ),
    "de": set(
        [
            "der",
            "die",
            "das",
            "und",
            "ist",
            "sind",
            "zu",
            "von",
            "sie",
            "ihr",
            "für",
            "mit",
            "nicht",
            "dies",
            "ich",
            "mein",
            "kann",
            "ein",
            "eine",
            "bitte",
            "auf",
            "den",
            "dem",
        ]
    ),
}
WORD = re.compile(r"[^\W\d_]+", re.U)


def guess_language(text: str) -> str | None:
    """'zh' if CJK dominates the letters, else 'en'/'de' by function words when the evidence is clear, else None."""
    cjk = len(CJK.findall(text))
    latin = len(LATIN.findall(text))
    if cjk + latin == 0:
        return None
    if cjk / (cjk + latin) >= 0.3:
        return "zh"
    words = [w.lower() for w in WORD.findall(text)]
    scores = {lang: sum(w in sw for w in words) for lang, sw in STOPWORDS.items()}
    best = max(scores, key=scores.get)  # type: ignore[arg-type]
    other = min(scores.values())
    if scores[best] >= 2 and scores[best] >= 2 * other + 1:
        return best
    return "latin"  # Latin script, language unclear


def language_mismatch(text: str, lang: str) -> str | None:
    guess = guess_language(text)
    if guess is None:
        return None
    if lang == "zh":
        return (
            None if guess == "zh" else f"expected Chinese, found {LANGUAGE_NAMES.get(guess, 'Latin script')}"
        )
    if guess == "zh":
        return f"expected {LANGUAGE_NAMES.get(lang, lang)}, found Chinese"
    if lang in STOPWORDS and guess in STOPWORDS and guess != lang:
        return f"expected {LANGUAGE_NAMES[lang]}, found {LANGUAGE_NAMES[guess]}"
    return None


def validate(record: Record, max_chars: int, max_turns: int, check_language: bool = True) -> str | None:
    if record.kind == "text":
        if not (record.text or "").strip():
            return "empty text"
        if len(record.text or "") > max_chars:
            return f"text has {len(record.text or '')} characters, over max_chars={max_chars}"
        return None
    messages = record.messages or []
    if not messages:
        return "no messages"
    for i, m in enumerate(messages):
        if m.role not in ("system", "user", "assistant"):
            return f"messages[{i}]: unknown role '{m.role}'"
        if m.role == "system" and i != 0:
            return f"messages[{i}]: a system message may only come first"
        if not m.content.strip():
            return f"messages[{i}] ({m.role}): empty content"
        if len(m.content) > max_chars:
            return f"messages[{i}] ({m.role}): {len(m.content)} characters, over max_chars={max_chars}"
    turns = messages[1:] if messages[0].role == "system" else messages
    if not turns:
        return "only a system message"
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m.role != expected:
            at = i + (len(messages) - len(turns))
            return f"messages[{at}]: expected role '{expected}', got '{m.role}' (turns must alternate user/assistant)"
    if turns[-1].role != "assistant":
        return "the last turn is not an assistant turn (nothing to learn)"
    if len(turns) > max_turns:
        return f"{len(turns)} turns, over max_turns={max_turns}"
    if check_language and record.task == "translation":
        src, tgt = record.meta.get("src_lang"), record.meta.get("tgt_lang")
        fields = record.meta.get("fields") or {}
        source = fields.get("source") if isinstance(fields, dict) else None
        target = turns[-1].content
        if source is not None and source.strip() == target.strip():
            return "translation equals the source (untranslated)"
        if src and source is not None and (why := language_mismatch(source, src)):
            return f"source side: {why}"
        if tgt and (why := language_mismatch(target, tgt)):
            return f"target side: {why}"
    return None
