"""Readers: one per upstream format, each split in two so the expensive half can run in worker processes.

`iter_units(path, display, cfg)` walks a file and yields `Unit(source, payload)`: cheap, in the main process,
in file order (a JSONL line's raw bytes, a CSV row dict, a wiki page...). `convert(payload, cfg)` turns one
payload into a `Draft` or raises `RecordError` with a reason; it runs wherever the per-record stages run. A
problem with one record therefore never stops the others, and every unit is an input that ends up kept,
rejected or a duplicate. A problem with a whole file (not JSON at all) becomes one rejected unit.
"""

from __future__ import annotations

import bz2
import csv
import io
import re
import struct
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import msgspec

from model.errors import ConfigError
from model.tasks import LANGUAGE_NAMES, render_messages
from training.data.record import Source

# ---------------------------------------------------------------------------------------------------- plumbing


class RecordError(Exception):
    """One input record cannot become a record; the message is the rejection reason."""


class FileError(NamedTuple):
    """Payload standing for a whole file that could not be parsed (one rejected input)."""

    reason: str


class Unit(NamedTuple):
    source: Source
    payload: Any


@dataclass
class Draft:
    kind: str
    messages: list[dict[str, str]] | None = None
    text: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    task: str | None = None  # the reader's own task label (seed data, tech support); None = decided by rules


class ReadStats:
    """What a reader skipped that is not an input record (blank lines, .po headers): reported, not counted."""

    def __init__(self) -> None:
        self.blank_lines = 0
        self.headers = 0
        self.language: str | None = None  # from a gettext header's "Language:"


def _decode_error(exc: msgspec.DecodeError | msgspec.ValidationError, fmt: str) -> RecordError:
    text = str(exc)
    if isinstance(exc, msgspec.ValidationError):
        return RecordError(f"{fmt}: wrong shape: {text.replace('$.', '').replace('`$`', 'the record')}")
    return RecordError(f"{fmt}: malformed JSON: {text}")


def _text(payload: bytes | str, encoding: str) -> str:
    if isinstance(payload, str):
        return payload
    try:
        return payload.decode(encoding)
    except UnicodeDecodeError as exc:
        raise RecordError(
            f"not valid {encoding}: byte 0x{payload[exc.start]:02x} at column {exc.start + 1}; "
            "set `encoding` for this source (e.g. 'latin-1', 'cp1252', 'gb18030')"
        ) from None


def _decode(payload: Any, typ: type, fmt: str, encoding: str = "utf-8") -> Any:
    if isinstance(payload, FileError):
        raise RecordError(payload.reason)
    if isinstance(payload, bytes) and encoding.replace("-", "").lower() not in ("utf8", "utf8sig"):
        payload = _text(payload, encoding).encode("utf-8")
    elif isinstance(payload, bytes):
        _text(payload, "utf-8")  # a clear encoding message instead of msgspec's generic one
    try:
        return msgspec.json.decode(payload, type=typ)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise _decode_error(exc, fmt) from None


def iter_lines(path: Path, stats: ReadStats) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw bytes) for each non-blank line. Handles a UTF-8 BOM, CRLF, and UTF-16 with a
    BOM (decoded and re-encoded to UTF-8). Other encodings are decoded per record (`encoding` key)."""
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(0)
        if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
            lines: Iterator[bytes] = (line.encode("utf-8") for line in io.TextIOWrapper(f, encoding="utf-16"))
        else:
            lines = iter(f)
        for n, line in enumerate(lines, 1):
            if n == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
            line = line.rstrip(b"\r\n")
            if not line.strip():
                stats.blank_lines += 1
                continue
            yield n, line


def _first_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf").lstrip()
    return head[:1]


def _json_or_jsonl(path: Path, display: str, stats: ReadStats, list_key: str | None = None) -> Iterator[Unit]:
    """A JSON array (or an object holding one under `list_key`) by index, or JSONL by line."""
    if _first_byte(path) in (b"[",) or list_key:
        data = path.read_bytes()
        if data.startswith(b"\xef\xbb\xbf"):
            data = data[3:]
        try:
            if list_key:
                items = msgspec.json.decode(data, type=dict[str, Any | msgspec.Raw]).get(list_key)
                if not isinstance(items, list):
                    raise RecordError(f"expected a JSON object with a '{list_key}' array")
                items = [msgspec.json.encode(x) for x in items]
            else:
                items = [bytes(x) for x in msgspec.json.decode(data, type=list[msgspec.Raw])]
        except (msgspec.DecodeError, msgspec.ValidationError, RecordError) as exc:
            yield Unit(Source(display), FileError(f"file is not the expected JSON: {exc}"))
            return
        for i, item in enumerate(items):
            yield Unit(Source(display, index=i), item)
    else:
        for n, line in iter_lines(path, stats):
            yield Unit(Source(display, line=n), line)


def _chat_from_turns(turns: list[str]) -> list[dict[str, str]]:
    """Alternate user/assistant from the first turn; a trailing unanswered turn is dropped."""
    if len(turns) % 2 == 1 and len(turns) > 1:
        turns = turns[:-1]
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


def _templated(template: str, fields: dict[str, Any], response: str, **meta: Any) -> Draft:
    return Draft(
        "chat",
        render_messages(template, fields, response),
        meta={"template": template, "fields": fields, **meta},
    )


# ------------------------------------------------------------------------------------------- instruction sets


class AlpacaRow(msgspec.Struct):
    instruction: str
    output: str
    input: str = ""


def alpaca_convert(payload: Any, cfg: Any) -> Draft:
    row = _decode(payload, AlpacaRow, "alpaca", cfg.encoding)
    if row.input.strip():
        return _templated(
            "instruction_input", {"instruction": row.instruction, "input": row.input}, row.output
        )
    return _templated("instruction", {"instruction": row.instruction}, row.output)


class DollyRow(msgspec.Struct):
    instruction: str
    context: str
    response: str
    category: str


DOLLY_TASKS = {"open_qa": "qa", "closed_qa": "qa", "general_qa": "qa", "creative_writing": "content"}


def dolly_convert(payload: Any, cfg: Any) -> Draft:
    row = _decode(payload, DollyRow, "dolly", cfg.encoding)
    if row.context.strip():
        draft = _templated(
            "instruction_input", {"instruction": row.instruction, "input": row.context}, row.response
        )
    else:
        draft = _templated("instruction", {"instruction": row.instruction}, row.response)
    draft.meta["category"] = row.category
    draft.task = DOLLY_TASKS.get(row.category)
    return draft


class ShareGPTTurn(msgspec.Struct):
    speaker: str = msgspec.field(name="from")
    value: str


class ShareGPTRow(msgspec.Struct):
    conversations: list[ShareGPTTurn]
    id: str | None = None


SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "assistant": "assistant",
    "system": "system",
}


def sharegpt_convert(payload: Any, cfg: Any) -> Draft:
    row = _decode(payload, ShareGPTRow, "sharegpt", cfg.encoding)
    messages = []
    for i, turn in enumerate(row.conversations):
        role = SHAREGPT_ROLES.get(turn.speaker.lower())
        if role is None:
            raise RecordError(f"sharegpt: unknown speaker '{turn.speaker}' at conversations[{i}].from")
        messages.append({"role": role, "content": turn.value})
    return Draft("chat", messages, meta={"sharegpt_id": row.id} if row.id else {})


class OpenAIMessage(msgspec.Struct):
    role: str
    content: str


class OpenAIRow(msgspec.Struct):
    messages: list[OpenAIMessage]


def messages_convert(payload: Any, cfg: Any) -> Draft:
    row = _decode(payload, OpenAIRow, "messages", cfg.encoding)
    return Draft("chat", [{"role": m.role, "content": m.content} for m in row.messages])


# ------------------------------------------------------------------------------------------------ QA datasets


class CoqaTurn(msgspec.Struct):
    input_text: str
    turn_id: int


class CoqaItem(msgspec.Struct):
    id: str
    story: str
    questions: list[CoqaTurn]
    answers: list[CoqaTurn]
    source: str = ""


def coqa_convert(payload: Any, cfg: Any) -> Draft:
    item = _decode(payload, CoqaItem, "coqa", cfg.encoding)
    answers = {a.turn_id: a.input_text for a in item.answers}
    if not item.questions:
        raise RecordError("coqa: story has no questions")
    missing = [q.turn_id for q in item.questions if q.turn_id not in answers]
    if missing:
        raise RecordError(f"coqa: questions without an answer: turn_id {missing}")
    questions = sorted(item.questions, key=lambda q: q.turn_id)
    fields = {"context": item.story, "question": questions[0].input_text}
    messages = render_messages("qa_context", fields, answers[questions[0].turn_id])
    for q in questions[1:]:
        messages += [
            {"role": "user", "content": q.input_text},
            {"role": "assistant", "content": answers[q.turn_id]},
        ]
    return Draft(
        "chat", messages, meta={"template": "qa_context", "fields": fields, "coqa_id": item.id}, task="qa"
    )


class TriviaAnswer(msgspec.Struct):
    Value: str


class TriviaItem(msgspec.Struct):
    Question: str
    Answer: TriviaAnswer
    QuestionId: str = ""


def triviaqa_convert(payload: Any, cfg: Any) -> Draft:
    item = _decode(payload, TriviaItem, "triviaqa", cfg.encoding)
    draft = _templated("qa_open", {"question": item.Question}, item.Answer.Value, question_id=item.QuestionId)
    draft.task = "qa"
    return draft


class NQItem(msgspec.Struct):
    question: str
    answer: list[str]


def nq_open_convert(payload: Any, cfg: Any) -> Draft:
    item = _decode(payload, NQItem, "nq_open", cfg.encoding)
    if not item.answer:
        raise RecordError("nq_open: empty 'answer' list")
    draft = _templated("qa_open", {"question": item.question}, item.answer[0], answers=item.answer)
    draft.task = "qa"
    return draft


# ---------------------------------------------------------------------------------- tables (CSV/TSV, Parquet)

MAPPED_FIELDS = (
    "instruction",
    "input",
    "output",
    "question",
    "answer",
    "context",
    "text",
    "system",
    "source",
    "target",
)


def mapped_convert(row: dict[str, Any], cfg: Any) -> Draft:
    """A table row through the source's column mapping (`columns = {output = "response", ...}`)."""
    if isinstance(row, FileError):
        raise RecordError(row.reason)
    if None in row:
        raise RecordError(
            f"row has {len(row) - 1 + len(row[None])} fields, more than the header's {len(row) - 1}"
        )
    values: dict[str, str] = {}
    for ours, theirs in cfg.columns.items():
        value = row.get(theirs)
        if value is None:
            continue
        if not isinstance(value, str):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                value = str(value)
            else:
                raise RecordError(f"column '{theirs}': expected text, got {type(value).__name__}")
        values[ours] = value
    if "text" in cfg.columns:
        return Draft("text", text=values.get("text", ""))
    if "source" in cfg.columns and "target" in cfg.columns:
        src, tgt = _langs(cfg)
        fields = {"src_lang": src, "tgt_lang": tgt, "source": values.get("source", "")}
        return _templated("translate", fields, values.get("target", ""), src_lang=src, tgt_lang=tgt)
    if "question" in cfg.columns:
        if values.get("context", "").strip():
            return _templated(
                "qa_context",
                {"context": values["context"], "question": values.get("question", "")},
                values.get("answer", ""),
            )
        return _templated("qa_open", {"question": values.get("question", "")}, values.get("answer", ""))
    if values.get("input", "").strip():
        draft = _templated(
            "instruction_input",
            {"instruction": values.get("instruction", ""), "input": values["input"]},
            values.get("output", ""),
        )
    else:
        draft = _templated(
            "instruction", {"instruction": values.get("instruction", "")}, values.get("output", "")
        )
    if values.get("system", "").strip():
        draft.messages = [{"role": "system", "content": values["system"]}, *draft.messages]
    return draft


def _check_columns(header: list[str], cfg: Any, display: str) -> None:
    if not cfg.columns:
        raise ConfigError(
            f"{cfg.where}.columns: the {cfg.reader} reader needs a column mapping, e.g. "
            'columns = {instruction = "prompt", output = "response"}; '
            f"{display} has columns {header}"
        )
    unknown = sorted(set(cfg.columns) - set(MAPPED_FIELDS))
    if unknown:
        raise ConfigError(
            f"{cfg.where}.columns: unknown field(s) {unknown}; known: {', '.join(MAPPED_FIELDS)}"
        )
    absent = [f"{ours} = '{theirs}'" for ours, theirs in cfg.columns.items() if theirs not in header]
    if absent:
        raise ConfigError(f"{cfg.where}.columns: {', '.join(absent)} not in {display}'s header {header}")


def csv_units(path: Path, display: str, cfg: Any, stats: ReadStats) -> Iterator[Unit]:
    csv.field_size_limit(sys.maxsize)
    delimiter = cfg.delimiter or ("\t" if cfg.reader == "tsv" or path.suffix.lower() == ".tsv" else ",")
    raw = path.read_bytes()
    encoding = "utf-16" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else cfg.encoding
    if encoding.replace("-", "").lower() == "utf8":
        encoding = "utf-8-sig"
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{display}: not valid {cfg.encoding} (byte 0x{raw[exc.start]:02x} on line {line}); "
            f"set {cfg.where}.encoding (e.g. 'latin-1', 'cp1252', 'gb18030')"
        ) from None
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    header = reader.fieldnames or []
    if not header:
        return
    _check_columns(list(header), cfg, display)
    line = reader.line_num + 1
    for row_no, row in enumerate(reader, 1):
        if all(v in (None, "") for k, v in row.items() if k is not None) and None not in row:
            stats.blank_lines += 1
        else:
            yield Unit(Source(display, line=line, row=row_no), dict(row))
        line = reader.line_num + 1


def parquet_units(path: Path, display: str, cfg: Any, stats: ReadStats) -> Iterator[Unit]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for a non-Parquet file
        raise ConfigError(f"{display}: not a readable Parquet file ({exc})") from None
    _check_columns(pf.schema_arrow.names, cfg, display)
    row_no = 0
    for batch in pf.iter_batches(batch_size=1024, columns=sorted(set(cfg.columns.values()))):
        for row in batch.to_pylist():
            row_no += 1
            yield Unit(Source(display, row=row_no), row)


# -------------------------------------------------------------------------------------------------- corpora


def text_units(path: Path, display: str, cfg: Any, stats: ReadStats) -> Iterator[Unit]:
    """Plain text: one record per paragraph (blank-line separated), per line, or per file (`text_unit`)."""
    if cfg.text_unit == "file":
        yield Unit(Source(display, line=1), path.read_bytes().removeprefix(b"\xef\xbb\xbf"))
        return
    start, buf = 0, []
    for n, line in _all_lines(path):
        if cfg.text_unit == "line":
            if line.strip():
                yield Unit(Source(display, line=n), line)
            else:
                stats.blank_lines += 1
            continue
        if line.strip():
            if not buf:
                start = n
            buf.append(line)
        elif buf:
            yield Unit(Source(display, line=start), b"\n".join(buf))
            buf = []
    if buf:
        yield Unit(Source(display, line=start), b"\n".join(buf))


def _all_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if n == 1:
                line = line.removeprefix(b"\xef\xbb\xbf")
            yield n, line.rstrip(b"\r\n")


def text_convert(payload: Any, cfg: Any) -> Draft:
    return Draft("text", text=_text(payload, cfg.encoding))


_WIKI_RULES = [
    (re.compile(r"<!--.*?-->", re.S), ""),
    (re.compile(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", re.S | re.I), ""),
    (re.compile(r"\{\|.*?\|\}", re.S), ""),  # tables
    (re.compile(r"\[\[(?:File|Image|Category):[^\]]*\]\]", re.I), ""),
    (re.compile(r"\[\[[^\]|]*\|([^\]]*)\]\]"), r"\1"),
    (re.compile(r"\[\[([^\]]*)\]\]"), r"\1"),
    (re.compile(r"\[https?://\S+ ([^\]]*)\]"), r"\1"),
    (re.compile(r"\[https?://\S+\]"), ""),
    (re.compile(r"'{2,}"), ""),
    (re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M), r"\1"),
    (re.compile(r"^[*#:;]+\s*", re.M), ""),
    (re.compile(r"__[A-Z]+__"), ""),
]
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")


def wikitext_to_plain(text: str) -> str:
    """Markup → prose: templates (nested), refs, tables, files/categories dropped; links and emphasis unwrapped."""
    previous = None
    while previous != text:  # innermost templates first, so nesting {{a|{{b}}}} unwinds
        previous, text = text, _TEMPLATE.sub("", text)
    for pattern, repl in _WIKI_RULES:
        text = pattern.sub(repl, text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def mediawiki_units(path: Path, display: str, cfg: Any, stats: ReadStats) -> Iterator[Unit]:
    opener = bz2.open if path.suffix == ".bz2" else open
    index = 0
    with opener(path, "rb") as f:
        try:
            for _event, elem in ET.iterparse(f, events=("end",)):
                if elem.tag.rsplit("}", 1)[-1] != "page":
                    continue
                page: dict[str, Any] = {"title": "", "ns": "0", "redirect": False, "text": ""}
                for child in elem.iter():
                    tag = child.tag.rsplit("}", 1)[-1]
                    if tag in ("title", "ns", "text"):
                        page[tag] = child.text or ""
                    elif tag == "redirect":
                        page["redirect"] = True
                yield Unit(Source(display, index=index), page)
                index += 1
                elem.clear()  # streaming: a dump is gigabytes; keep one page in memory
        except (ET.ParseError, OSError, EOFError) as exc:
            yield Unit(Source(display, index=index), FileError(f"XML dump is malformed or truncated: {exc}"))


def mediawiki_convert(payload: Any, cfg: Any) -> Draft:
    if isinstance(payload, FileError):
        raise RecordError(payload.reason)
    if payload["redirect"]:
        raise RecordError(f"redirect page '{payload['title']}'")
    if payload["ns"].strip() != "0":
        raise RecordError(f"page '{payload['title']}' is in namespace {payload['ns']} (only articles, ns 0)")
    return Draft("text", text=wikitext_to_plain(payload["text"]), meta={"title": payload["title"]})


# ------------------------------------------------------------------------------------------ gettext catalogues

_PO_ESCAPES = {
    "n": "\n",
    "t": "\t",
    "r": "\r",
    '"': '"',
    "\\": "\\",
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "v": "\v",
}


def _po_unquote(s: str, n: int) -> str:
    s = s.strip()
    if len(s) < 2 or not (s.startswith('"') and s.endswith('"')):
        raise RecordError(f"line {n}: expected a quoted string, got {s[:40]!r}")
    return re.sub(r"\\(.)", lambda m: _PO_ESCAPES.get(m.group(1), m.group(0)), s[1:-1])


def po_units(path: Path, display: str, cfg: Any, stats: ReadStats) -> Iterator[Unit]:
    """gettext .po: one unit per entry, located at its msgid line. The header entry (msgid "") gives the
    language when the config does not and is not an input."""
    entry: dict[str, Any] = {}
    key: str | None = None
    flags: list[str] = []
    error: str | None = None

    def flush() -> Iterator[Unit]:
        nonlocal entry, key, flags, error
        if error:
            yield Unit(Source(display, line=entry.get("line", 0)), FileError(f".po syntax error: {error}"))
        elif "msgid" in entry:
            entry["flags"] = flags
            if entry["msgid"] == "" and "msgctxt" not in entry:
                stats.headers += 1
                lang = re.search(r"^Language:\s*(\S+)", "".join(entry.get("msgstr", [""])), re.M)
                if lang:
                    stats.language = lang.group(1).split("_")[0]
            else:
                entry["language"] = stats.language
                yield Unit(Source(display, line=entry["line"]), entry)
        entry, key, flags, error = {}, None, [], None

    for n, raw in _all_lines(path):
        try:
            line = raw.decode(cfg.encoding).strip()
        except UnicodeDecodeError:
            error = error or f"line {n} is not valid {cfg.encoding}; set `encoding` for this source"
            continue
        if not line:
            if entry or error:
                yield from flush()
            continue
        obsolete = line.startswith("#~")
        if line.startswith("#,"):
            flags += [f.strip() for f in line[2:].split(",")]
            continue
        if line.startswith("#") and not obsolete:
            continue
        if obsolete:
            entry["obsolete"] = True
            line = line[2:].strip()
        try:
            m = re.match(r"^(msgctxt|msgid_plural|msgid|msgstr(?:\[(\d+)\])?)\s+(\".*)$", line)
            if m:
                word = m.group(1)
                if word in ("msgid", "msgctxt") and (
                    "msgstr" in entry or (word == "msgctxt" and "msgid" in entry)
                ):
                    yield from flush()
                if word == "msgid":
                    entry["line"] = n
                value = _po_unquote(m.group(3), n)
                if word.startswith("msgstr"):
                    entry.setdefault("msgstr", []).append(value)
                    key = "msgstr"
                else:
                    entry[word] = value
                    key = word
            elif line.startswith('"') and key:
                value = _po_unquote(line, n)
                if key == "msgstr":
                    entry["msgstr"][-1] += value
                else:
                    entry[key] += value
            else:
                raise RecordError(f"line {n}: unexpected {line[:40]!r}")
        except RecordError as exc:
            entry.setdefault("line", n)
            error = error or str(exc)
    if entry or error:
        yield from flush()


def mo_units(path: Path, display: str, cfg: Any, stats: ReadStats) -> Iterator[Unit]:
    """gettext .mo (GNU binary catalogue): magic, revision, N, offsets of the original and translation tables."""
    data = path.read_bytes()
    if len(data) < 20:
        yield Unit(Source(display), FileError(".mo file is shorter than its 20-byte header"))
        return
    magic = struct.unpack("<I", data[:4])[0]
    order = "<" if magic == 0x950412DE else ">" if magic == 0xDE120495 else None
    if order is None:
        yield Unit(Source(display), FileError(f"not a .mo file (magic 0x{magic:08x})"))
        return
    _rev, count, orig_at, trans_at = struct.unpack(order + "4I", data[4:20])
    for i in range(count):
        try:
            olen, ooff = struct.unpack_from(order + "2I", data, orig_at + 8 * i)
            tlen, toff = struct.unpack_from(order + "2I", data, trans_at + 8 * i)
            if ooff + olen > len(data) or toff + tlen > len(data):
                raise struct.error("string past end of file")
            original, translated = data[ooff : ooff + olen], data[toff : toff + tlen]
        except struct.error as exc:
            yield Unit(Source(display, index=i), FileError(f".mo entry {i} is truncated ({exc})"))
            continue
        try:
            orig_s, trans_s = original.decode(cfg.encoding), translated.decode(cfg.encoding)
        except UnicodeDecodeError:
            yield Unit(Source(display, index=i), FileError(f".mo entry {i} is not valid {cfg.encoding}"))
            continue
        ctxt, _, msgid = orig_s.rpartition("\x04")
        singular, *plural = msgid.split("\x00")
        if singular == "" and not ctxt:
            stats.headers += 1
            lang = re.search(r"^Language:\s*(\S+)", trans_s, re.M)
            if lang:
                stats.language = lang.group(1).split("_")[0]
            continue
        entry = {"msgid": singular, "msgstr": trans_s.split("\x00"), "flags": [], "language": stats.language}
        if ctxt:
            entry["msgctxt"] = ctxt
        if plural:
            entry["msgid_plural"] = plural[0]
        yield Unit(Source(display, index=i), entry)


# printf-style (%s, %(name)s, %d, %.2f), brace-style ({0}, {name}); "%%" is a literal percent.
PLACEHOLDER = re.compile(r"%%|%(?:\([A-Za-z_][\w]*\))?[-+ #0]*\d*(?:\.\d+)?[sdifxXeEgGcru]|\{[A-Za-z_0-9]*\}")


def placeholders(text: str) -> list[str]:
    return sorted(p for p in PLACEHOLDER.findall(text) if p != "%%")


def _langs(cfg: Any, found: str | None = None) -> tuple[str, str]:
    src = cfg.src_lang or "en"
    tgt = cfg.tgt_lang or found
    if not tgt:
        raise RecordError(
            f"no target language: set {cfg.where}.tgt_lang (the catalogue header has no Language)"
        )
    return src, tgt


def gettext_convert(payload: Any, cfg: Any) -> Draft:
    if isinstance(payload, FileError):
        raise RecordError(payload.reason)
    if payload.get("obsolete"):
        raise RecordError("obsolete entry (#~)")
    if "fuzzy" in payload["flags"]:
        raise RecordError("fuzzy (unreviewed) translation")
    msgstr = payload.get("msgstr") or [""]
    if not msgstr[0].strip():
        raise RecordError("untranslated (empty msgstr)")
    source, target = payload["msgid"], msgstr[0]
    if placeholders(source) != placeholders(target):
        raise RecordError(
            f"placeholders differ: source {placeholders(source)} vs translation {placeholders(target)}"
        )
    src, tgt = _langs(cfg, payload.get("language"))
    fields = {"src_lang": src, "tgt_lang": tgt, "source": source}
    meta: dict[str, Any] = {"src_lang": src, "tgt_lang": tgt}
    if payload.get("msgctxt"):
        meta["msgctxt"] = payload["msgctxt"]
    draft = _templated("translate", fields, target, **meta)
    draft.task = "translation"
    return draft


# --------------------------------------------------------------------------------------- PyPI-shipped corpora


def _package_dir(module: str, display_hint: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"the {display_hint} reader needs the `{module}` package: pip install 'instructlm[train]'"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def chatterbot_units(path: Path, display: str, cfg: Any, stats: ReadStats) -> Iterator[Unit]:
    """chatterbot-corpus YAML: {categories: [...], conversations: [[turn, turn, ...], ...]} per file. `path`
    is a language directory, a file, or the corpus root with `languages = [...]`."""
    import yaml

    if path.is_file():
        files = [path]
    else:
        langs = cfg.languages or ["english"]
        files = []
        for lang in langs:
            if not (path / lang).is_dir():
                raise ConfigError(f"{cfg.where}.languages: no '{lang}' directory in {display}")
            files += sorted((path / lang).glob("*.yml"))
    for file in files:
        rel = f"{display}/{file.relative_to(path).as_posix()}" if file != path else display
        try:
            # BaseLoader keeps every scalar a string: "yes" stays "yes", not True.
            doc = yaml.load(file.read_text(encoding="utf-8"), Loader=yaml.BaseLoader) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            yield Unit(Source(rel), FileError(f"not a chatterbot YAML file: {exc}"))
            continue
        categories = doc.get("categories") or [] if isinstance(doc, dict) else []
        conversations = doc.get("conversations") if isinstance(doc, dict) else None
        if not isinstance(conversations, list):
            yield Unit(Source(rel), FileError("chatterbot YAML without a 'conversations' list"))
            continue
        language = file.parent.name
        for i, conv in enumerate(conversations):
            yield Unit(Source(rel, index=i), {"turns": conv, "categories": categories, "language": language})


def chatterbot_convert(payload: Any, cfg: Any) -> Draft:
    if isinstance(payload, FileError):
        raise RecordError(payload.reason)
    turns = payload["turns"]
    if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
        raise RecordError("chatterbot: a conversation must be a list of strings")
    if len(turns) < 2:
        raise RecordError("chatterbot: a conversation needs a statement and a response")
    categories = [str(c) for c in payload["categories"]]
    task = "customer_service" if "tech support" in categories else "dialog"
    return Draft(
        "chat",
        _chat_from_turns(turns),
        meta={"categories": categories, "language": payload["language"]},
        task=task,
    )


class ChitchatUtterance(msgspec.Struct):
    text: str
    sender: str


class ChitchatConversation(msgspec.Struct):
    messages: list[list[ChitchatUtterance]]


def chitchat_units(path: Path, display: str, cfg: Any, stats: ReadStats) -> Iterator[Unit]:
    """chitchat-dataset's dataset.json: {conversation id: {messages: [[{text, sender, timestamp}...]...]}}; each
    inner list is one speaker's turn."""
    if path.is_dir():
        path = path / "dataset.json"
        display = f"{display}/dataset.json"
    try:
        convs = msgspec.json.decode(path.read_bytes(), type=dict[str, msgspec.Raw])
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        yield Unit(Source(display), FileError(f"not a chitchat dataset.json: {exc}"))
        return
    for i, (conv_id, raw) in enumerate(convs.items()):
        yield Unit(Source(display, index=i), (conv_id, bytes(raw)))


def chitchat_convert(payload: Any, cfg: Any) -> Draft:
    if isinstance(payload, FileError):
        raise RecordError(payload.reason)
    conv_id, raw = payload
    conv = _decode(raw, ChitchatConversation, "chitchat")
    turns = [" ".join(u.text.strip() for u in turn if u.text.strip()) for turn in conv.messages]
    turns = [t for t in turns if t]
    if len(turns) < 2:
        raise RecordError("chitchat: fewer than two non-empty turns")
    return Draft("chat", _chat_from_turns(turns), meta={"conversation_id": conv_id}, task="dialog")


# ------------------------------------------------------------------------------- the project's seed data


SPLITS = ("train", "val", "test")


def _split(value: str) -> str:
    if value not in SPLITS:
        raise RecordError(f"split must be one of {SPLITS}, got {value!r}")
    return value


class SeedFaq(msgspec.Struct):
    id: str
    category: str
    question: str
    answer: str
    paraphrases: list[str]


def seed_faq_units(path: Path, display: str, cfg: Any, stats: ReadStats) -> Iterator[Unit]:
    """Each FAQ line gives three inputs: the question (train: the knowledge base is taught) and its two
    paraphrases (test: held out, the retrieval and answering evaluation)."""
    for n, line in iter_lines(path, stats):
        for k in range(3):
            yield Unit(Source(display, line=n, index=k), (line, k))


def seed_faq_convert(payload: Any, cfg: Any) -> Draft:
    line, k = payload
    row = _decode(line, SeedFaq, "seed_faq", cfg.encoding)
    if len(row.paraphrases) < 2:
        raise RecordError(f"seed_faq {row.id}: needs 2 paraphrases, has {len(row.paraphrases)}")
    question = row.question if k == 0 else row.paraphrases[k - 1]
    draft = _templated(
        "cs_answer",
        {"question": question},
        row.answer,
        faq_id=row.id,
        category=row.category,
        split="train" if k == 0 else "test",
        paraphrase=k,
    )
    draft.task = "customer_service"
    return draft


class SeedIntentLabel(msgspec.Struct):
    intent: str
    label_text: str
    description: str
    handoff: bool


class SeedIntent(msgspec.Struct):
    id: str
    text: str
    intent: str
    split: str


def load_intent_labels(path: Path) -> list[str]:
    stats = ReadStats()
    labels = []
    for n, line in iter_lines(path, stats):
        try:
            labels.append(msgspec.json.decode(line, type=SeedIntentLabel).intent)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ConfigError(f"{path}:{n}: bad intent label line: {exc}") from None
    return labels


def seed_intents_units(path: Path, display: str, cfg: Any, stats: ReadStats) -> Iterator[Unit]:
    for n, line in iter_lines(path, stats):
        yield Unit(Source(display, line=n), line)


def seed_intents_convert(payload: Any, cfg: Any) -> Draft:
    row = _decode(payload, SeedIntent, "seed_intents", cfg.encoding)
    labels = cfg.labels
    if row.intent not in labels:
        raise RecordError(
            f"seed_intents {row.id}: unknown intent '{row.intent}' (not in the intent labels file)"
        )
    draft = _templated(
        "cs_intent",
        {"labels": labels, "text": row.text},
        row.intent,
        intent=row.intent,
        seed_id=row.id,
        split=_split(row.split),
    )
    draft.task = "customer_service"
    return draft


class SeedContent(msgspec.Struct):
    id: str
    kind: str
    topic: str
    keywords: list[str]
    tone: str
    target_words: int
    output: str
    split: str


def seed_content_convert(payload: Any, cfg: Any) -> Draft:
    row = _decode(payload, SeedContent, "seed_content", cfg.encoding)
    if row.kind not in ("article", "ad_copy", "story"):
        raise RecordError(f"seed_content {row.id}: kind must be article, ad_copy or story, got {row.kind!r}")
    fields = {
        "topic": row.topic,
        "keywords": row.keywords,
        "tone": row.tone,
        "target_words": row.target_words,
    }
    draft = _templated(
        row.kind, fields, row.output, seed_id=row.id, content_kind=row.kind, split=_split(row.split)
    )
    draft.task = "content"
    return draft


class SeedTranslation(msgspec.Struct):
    id: str
    src_lang: str
    tgt_lang: str
    source: str
    target: str
    split: str


def seed_translation_convert(payload: Any, cfg: Any) -> Draft:
    row = _decode(payload, SeedTranslation, "seed_translation", cfg.encoding)
    for key in ("src_lang", "tgt_lang"):
        if getattr(row, key) not in LANGUAGE_NAMES:
            raise RecordError(f"seed_translation {row.id}: unknown {key} {getattr(row, key)!r}")
    fields = {"src_lang": row.src_lang, "tgt_lang": row.tgt_lang, "source": row.source}
    draft = _templated(
        "translate",
        fields,
        row.target,
        seed_id=row.id,
        src_lang=row.src_lang,
        tgt_lang=row.tgt_lang,
        split=_split(row.split),
    )
    draft.task = "translation"
    return draft


def jsonl_units(path: Path, display: str, cfg: Any, stats: ReadStats) -> Iterator[Unit]:
    for n, line in iter_lines(path, stats):
        yield Unit(Source(display, line=n), line)


def json_or_jsonl_units(path: Path, display: str, cfg: Any, stats: ReadStats) -> Iterator[Unit]:
    yield from _json_or_jsonl(path, display, stats)


def _keyed(key: str) -> Callable[..., Iterator[Unit]]:
    def units(path: Path, display: str, cfg: Any, stats: ReadStats) -> Iterator[Unit]:
        yield from _json_or_jsonl(path, display, stats, list_key=key)

    return units


@dataclass(frozen=True)
class Reader:
    name: str
    iter_units: Callable[..., Iterator[Unit]]
    convert: Callable[[Any, Any], Draft]
    description: str
    package: str | None = None  # default path: a directory inside this installed package


READERS: dict[str, Reader] = {
    r.name: r
    for r in (
        Reader(
            "alpaca",
            json_or_jsonl_units,
            alpaca_convert,
            "Alpaca {instruction, input, output}: JSON array or JSONL",
        ),
        Reader(
            "dolly", jsonl_units, dolly_convert, "Dolly 15k {instruction, context, response, category} JSONL"
        ),
        Reader(
            "sharegpt", json_or_jsonl_units, sharegpt_convert, "ShareGPT {conversations: [{from, value}]}"
        ),
        Reader("messages", jsonl_units, messages_convert, "OpenAI chat JSONL {messages: [{role, content}]}"),
        Reader("coqa", _keyed("data"), coqa_convert, "CoQA JSON {data: [{story, questions, answers}]}"),
        Reader(
            "triviaqa", _keyed("Data"), triviaqa_convert, "TriviaQA JSON {Data: [{Question, Answer.Value}]}"
        ),
        Reader(
            "nq_open", jsonl_units, nq_open_convert, "Natural Questions open JSONL {question, answer: [...]}"
        ),
        Reader("csv", csv_units, mapped_convert, "CSV with a header and a `columns` mapping"),
        Reader("tsv", csv_units, mapped_convert, "TSV with a header and a `columns` mapping"),
        Reader("parquet", parquet_units, mapped_convert, "Parquet with a `columns` mapping"),
        Reader("text", text_units, text_convert, "plain text, per paragraph / line / file"),
        Reader("mediawiki", mediawiki_units, mediawiki_convert, "MediaWiki XML dump (.xml or .xml.bz2)"),
        Reader("po", po_units, gettext_convert, "gettext .po catalogue (translation pairs)"),
        Reader("mo", mo_units, gettext_convert, "gettext .mo compiled catalogue (translation pairs)"),
        Reader(
            "chatterbot",
            chatterbot_units,
            chatterbot_convert,
            "chatterbot-corpus YAML (BSD)",
            package="chatterbot_corpus/data",
        ),
        Reader(
            "chitchat",
            chitchat_units,
            chitchat_convert,
            "chitchat-dataset dataset.json (MIT)",
            package="chitchat_dataset",
        ),
        Reader("seed_faq", seed_faq_units, seed_faq_convert, "data/seed/faq.jsonl"),
        Reader("seed_intents", seed_intents_units, seed_intents_convert, "data/seed/intents.jsonl"),
        Reader("seed_content", jsonl_units, seed_content_convert, "data/seed/content.jsonl"),
        Reader("seed_translation", jsonl_units, seed_translation_convert, "data/seed/translation.jsonl"),
    )
}


def get_reader(name: str, where: str) -> Reader:
    if name not in READERS:
        import difflib

        close = difflib.get_close_matches(name, READERS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{where}.reader: unknown reader '{name}'{hint} (known: {', '.join(READERS)})")
    return READERS[name]


def package_path(reader: Reader) -> tuple[Path, str]:
    """(absolute path, stable display name) of a package-shipped corpus."""
    module, _, sub = reader.package.partition("/")  # type: ignore[union-attr]
    root = _package_dir(module, reader.name)
    return (root / sub if sub else root), reader.package  # type: ignore[return-value]
