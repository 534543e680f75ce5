"""The dataset record (DESIGN.md "Example record") and the rejection / duplicate entries beside it."""

from __future__ import annotations

import hashlib
from typing import Any, Literal

import msgspec

Kind = Literal["chat", "text"]
Task = Literal["customer_service", "content", "translation", "qa", "dialog", "general"]
Role = Literal["system", "user", "assistant"]


class Message(msgspec.Struct, forbid_unknown_fields=True):
    role: Role
    content: str


class Source(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=True):
    """Where an input record came from: the file as the config names it, plus the 1-based line (JSONL, text,
    .po), the 1-based data row (CSV/TSV/Parquet), or the 0-based index (JSON arrays, archives, YAML lists)."""

    file: str
    line: int | None = None
    row: int | None = None
    index: int | None = None

    def where(self) -> str:
        parts = [
            f"{key} {getattr(self, key)}"
            for key in ("line", "row", "index")
            if getattr(self, key) is not None
        ]
        return f"{self.file}:{', '.join(parts)}" if parts else self.file


class Record(msgspec.Struct, forbid_unknown_fields=True):
    id: str
    kind: Kind
    task: Task
    source: Source
    messages: list[Message] | None = None
    text: str | None = None
    meta: dict[str, Any] = msgspec.field(default_factory=dict)
    origin_id: str | None = None


class Rejection(msgspec.Struct):
    """One line of rejected.jsonl: which input, at which stage, and why."""

    id: str | None
    source_name: str
    source: Source
    stage: str
    reason: str
    record: Record | None = None


class Duplicate(msgspec.Struct):
    """One line of duplicates.jsonl: the dropped record, the kept id it duplicates, and how it matched."""

    id: str
    duplicate_of: str
    method: str
    score: float
    source: Source


def make_id(*parts: object) -> str:
    """Stable 16-hex id from the source name and location (not the content: exact duplicates keep distinct ids)."""
    h = hashlib.blake2b(digest_size=8)
    for part in parts:
        h.update(str(part).encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


def user_text(record: Record) -> str:
    """The prompt side: user turns of a chat, or the whole text."""
    if record.kind == "text":
        return record.text or ""
    return "\n".join(m.content for m in record.messages or () if m.role == "user")


def response_text(record: Record) -> str:
    if record.kind == "text":
        return ""
    return "\n".join(m.content for m in record.messages or () if m.role == "assistant")


def full_text(record: Record) -> str:
    if record.kind == "text":
        return record.text or ""
    return "\n".join(m.content for m in record.messages or () if m.role != "system")


def instruction_text(record: Record) -> str:
    """The first user turn's data: for templated records the template's content fields, else the turn itself."""
    from model.tasks import content_text

    template, fields = record.meta.get("template"), record.meta.get("fields")
    if template and isinstance(fields, dict):
        return content_text(template, fields)
    if record.kind == "text":
        return record.text or ""
    return next((m.content for m in record.messages or () if m.role == "user"), "")


def prompt_content(record: Record) -> str:
    """Every user turn's data (templates stripped from the first one): what dedup and leak checks compare."""
    first = instruction_text(record)
    if record.kind == "text":
        return first
    users = [m.content for m in record.messages or () if m.role == "user"]
    return "\n".join([first, *users[1:]])


ENCODER = msgspec.json.Encoder(order="deterministic")
