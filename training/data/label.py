"""Task labels: the source's mapping wins, then the reader's own label (seed data, Dolly categories, tech
support), then these rules over the first instruction. The rules are deliberately few and visible."""

from __future__ import annotations

import re

from training.data.record import Record

TRANSLATE = re.compile(r"\btranslat(?:e|ion)\b|翻译|übersetz", re.I)
CONTENT = re.compile(
    r"\b(?:write|compose|draft|create)\b.{0,40}\b(?:story|poem|article|essay|blog|ad|advert\w*|slogan|"
    r"tweet|post|copy|headline|lyrics|song)\b|写一(?:篇|首|个)",
    re.I,
)
TEMPLATE_TASKS = {"cs_answer": "customer_service", "cs_intent": "customer_service", "article": "content",
                  "ad_copy": "content", "story": "content", "translate": "translation", "qa_context": "qa",
                  "qa_open": "qa"}  # fmt: skip


def rule_task(record: Record) -> str:
    template = record.meta.get("template")
    if template in TEMPLATE_TASKS:
        return TEMPLATE_TASKS[template]
    if record.kind == "text":
        return "general"
    users = [m.content for m in record.messages or () if m.role == "user"]
    first = users[0] if users else ""
    if TRANSLATE.search(first[:300]):
        return "translation"
    if CONTENT.search(first[:300]):
        return "content"
    if len(users) > 1:
        return "dialog"
    return "general"


def label_task(record: Record, source_task: str, reader_task: str | None) -> tuple[str, str]:
    """(task, how it was decided) — 'source', 'reader' or 'rule'."""
    if source_task:
        return source_task, "source"
    if reader_task:
        return reader_task, "reader"
    return rule_task(record), "rule"
