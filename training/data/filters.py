"""Quality filters (data-juicer's text filters, for instruction data). Each returns None or the reason; the
defaults below are data-juicer's where it has one, and every one has a passing and a failing fixture in
tests/training/test_data_filters.py.
"""

from __future__ import annotations

import re
from collections import Counter

import msgspec

from training.data.record import Record, full_text, response_text
from training.data.similarity import tokens


class FilterConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    min_words: int = 1
    max_words: int = 4_000  # a record longer than this will not fit a small model's context anyway
    min_bytes: int = 2
    max_bytes: int = 40_000
    # Tokens only when a tokenizer.json is named: the demo's tokenizer is trained on this pipeline's output.
    tokenizer: str = ""
    max_tokens: int = 0
    # Share of character 10-grams that repeat (data-juicer character_repetition_filter: rep_len 10, max 0.5).
    char_rep_n: int = 10
    max_char_rep: float = 0.5
    # Share of word 10-grams that repeat (data-juicer word_repetition_filter: rep_len 10, max 0.5).
    word_rep_n: int = 10
    max_word_rep: float = 0.5
    # Share of characters that are neither letters, digits nor whitespace (data-juicer: max 0.25 on web text;
    # 0.4 here because instruction data carries code, math and lists).
    max_special_ratio: float = 0.4
    # Share of letters/digits (CJK counts as letters) among all characters (data-juicer alphanumeric: min 0.25).
    min_alnum_ratio: float = 0.25
    # An answer whose words are (almost) all the question's, in order: ROUGE-L precision of the answer against
    # the question at or above this, for an answer of 3+ words no longer than the question. 0 disables.
    max_restate: float = 0.8


def repetition_ratio(grams: list[str]) -> float:
    """data-juicer's rule: the share of n-gram occurrences whose n-gram occurs more than once."""
    if not grams:
        return 0.0
    return sum(c for c in Counter(grams).values() if c > 1) / len(grams)


def char_repetition(text: str, n: int) -> float:
    return repetition_ratio([text[i : i + n] for i in range(len(text) - n + 1)])


def word_repetition(toks: list[str], n: int) -> float:
    return repetition_ratio([" ".join(toks[i : i + n]) for i in range(len(toks) - n + 1)])


ALNUM = re.compile(r"[^\W_]")  # str.isalnum, counted in C
SPACE = re.compile(r"\s")


def special_ratio(text: str) -> float:
    visible = len(text) - len(SPACE.findall(text))
    if not visible:
        return 0.0
    return (visible - len(ALNUM.findall(text))) / visible


def alnum_ratio(text: str) -> float:
    return len(ALNUM.findall(text)) / len(text) if text else 0.0


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def restates_question(record: Record, threshold: float) -> float | None:
    """ROUGE-L precision of the first answer against the first question, when it looks like a restatement."""
    if record.kind != "chat" or threshold <= 0:
        return None
    msgs = [m for m in record.messages or () if m.role != "system"]
    if len(msgs) < 2:
        return None
    if record.meta.get("template") == "cs_intent":
        return None  # a classification answer is one of the labels the prompt lists, by design
    fields = record.meta.get("fields") or {}
    # The question itself, not a passage given with it: extracting an answer from a context is not restating.
    question = fields.get("question") or fields.get("instruction") or msgs[0].content
    q, a = tokens(str(question)), tokens(msgs[1].content)
    if len(a) < 3 or len(a) > len(q):
        return None  # one or two words ("Oslo", "Tope") answer, they cannot restate
    precision = _lcs(a, q) / len(a)
    return precision if precision >= threshold else None


class Filters:
    """The configured filters; `check(record)` returns None (keep) or the first failing filter's reason."""

    def __init__(self, cfg: FilterConfig, base_dir: str = "."):
        self.cfg = cfg
        self.tokenizer = None
        if cfg.tokenizer:
            from pathlib import Path

            from tokenizers import Tokenizer

            from model.errors import ConfigError

            path = Path(base_dir) / cfg.tokenizer
            if not path.is_file():
                raise ConfigError(f"filter.tokenizer: {cfg.tokenizer} does not exist (resolved to {path})")
            self.tokenizer = Tokenizer.from_file(str(path))

    def check(self, record: Record) -> str | None:
        c = self.cfg
        text = full_text(record)
        toks = tokens(text)
        size = len(text.encode("utf-8"))
        if len(toks) < c.min_words:
            return f"too few words: {len(toks)} < min_words={c.min_words}"
        if len(toks) > c.max_words:
            return f"too many words: {len(toks)} > max_words={c.max_words}"
        if size < c.min_bytes:
            return f"too few bytes: {size} < min_bytes={c.min_bytes}"
        if size > c.max_bytes:
            return f"too many bytes: {size} > max_bytes={c.max_bytes}"
        if self.tokenizer is not None and c.max_tokens:
            n = len(self.tokenizer.encode(text).ids)
            if n > c.max_tokens:
                return f"too many tokens: {n} > max_tokens={c.max_tokens}"
        # Repetition and character mix are judged on what the model learns to produce (the answer), or the text.
        target = response_text(record) if record.kind == "chat" else text
        rep = char_repetition(target, c.char_rep_n)
        if rep > c.max_char_rep:
            return f"character {c.char_rep_n}-gram repetition {rep:.2f} > max_char_rep={c.max_char_rep}"
        rep = word_repetition(tokens(target), c.word_rep_n)
        if rep > c.max_word_rep:
            return f"word {c.word_rep_n}-gram repetition {rep:.2f} > max_word_rep={c.max_word_rep}"
        sp = special_ratio(target)
        if sp > c.max_special_ratio:
            return f"special-character ratio {sp:.2f} > max_special_ratio={c.max_special_ratio}"
        an = alnum_ratio(target)
        if an < c.min_alnum_ratio:
            return f"alphanumeric ratio {an:.2f} < min_alnum_ratio={c.min_alnum_ratio}"
        restated = restates_question(record, c.max_restate)
        if restated is not None:
            return f"answer restates the question (ROUGE-L precision {restated:.2f} >= max_restate={c.max_restate})"
        return None
