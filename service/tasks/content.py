"""Content generation: validate a brief, prompt with the dataset's own template, report keyword coverage.

Torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence

from model.chat import encode_chat
from model.errors import UserError
from model.tasks import render_messages
from service.tasks.text import keyword_hits, word_count

KINDS = ("article", "ad_copy", "story")  # the content templates of model/tasks.py
MAX_KEYWORDS = 10


class ContentError(UserError):
    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def check_brief(
    kind: str, topic: str, keywords: Sequence[str], target_words: int, min_words: int, max_words: int
):
    if kind not in KINDS:
        raise ContentError(f"kind must be one of {', '.join(KINDS)}; got {kind[:40]!r}", "kind")
    if not topic.strip():
        raise ContentError("topic is empty", "topic")
    if len(keywords) > MAX_KEYWORDS:
        raise ContentError(f"at most {MAX_KEYWORDS} keywords, got {len(keywords)}", "keywords")
    for i, k in enumerate(keywords):
        if not k.strip():
            raise ContentError(f"keywords[{i}] is empty", f"keywords[{i}]")
    if not min_words <= target_words <= max_words:
        raise ContentError(
            f"target_words must be in [{min_words}, {max_words}], got {target_words}", "target_words"
        )


def content_prompt(tokenizer, kind: str, topic: str, keywords: Sequence[str], tone: str, target_words: int):
    fields = {"topic": topic.strip(), "keywords": list(keywords), "tone": tone, "target_words": target_words}
    return encode_chat(tokenizer, render_messages(kind, fields), add_generation_prompt=True).ids


def coverage(text: str, keywords: Sequence[str]) -> tuple[list[bool], float, int]:
    """(hit per keyword, share of keywords present, words in the text)."""
    hits = keyword_hits(text, list(keywords))
    return hits, (sum(hits) / len(hits) if hits else 1.0), word_count(text)
