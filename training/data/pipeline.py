"""The build: sources → per-record stages (in N worker processes) → global stages (one process) → output dir.

Per-record stages run on one input unit at a time and depend on nothing else: read (convert), normalize,
validate, label. They run in `process_units`, in this process or in a pool whose ordered `imap` keeps input
order, so `--workers N` writes the same bytes as one process. Kept records are spooled to disk as they come,
so memory grows with the small per-record index, not with the corpus.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import msgspec

from model.tasks import render_instruction
from training.data.config import DataConfig, SourceSpec, resolve_sources
from training.data.label import label_task
from training.data.normalize import normalize_text
from training.data.readers import READERS, Draft, ReadStats, RecordError, Unit
from training.data.record import ENCODER, Message, Record, Rejection, Source, make_id
from training.data.validate import validate

BATCH = 256  # units per worker task: large enough to amortize pickling, small enough to stream

# ------------------------------------------------------------------------------------------ per-record stages

_WORKER: dict[str, Any] = {}


def _init_worker(specs: list[SourceSpec], cfg: DataConfig) -> None:
    _WORKER["specs"] = specs
    _WORKER["cfg"] = cfg
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def _norm_value(value: Any, spec: SourceSpec, cfg: DataConfig) -> Any:
    n = cfg.normalize
    if isinstance(value, str):
        return normalize_text(value, n.unicode_form, n.strip_html, spec.pii)
    if isinstance(value, list):
        return [_norm_value(v, spec, cfg) for v in value]
    return value


def normalize_record(record: Record, spec: SourceSpec, cfg: DataConfig) -> Record:
    """Every message (or the text) normalized; a templated first user turn is re-rendered from its normalized
    fields, so the fields in meta and the prompt agree (augmentation re-renders from them)."""
    if record.kind == "text":
        record.text = _norm_value(record.text or "", spec, cfg)
        return record
    template, fields = record.meta.get("template"), record.meta.get("fields")
    messages = [Message(m.role, _norm_value(m.content, spec, cfg)) for m in record.messages or ()]
    if template and isinstance(fields, dict):
        fields = {k: _norm_value(v, spec, cfg) for k, v in fields.items()}
        record.meta["fields"] = fields
        first_user = next((i for i, m in enumerate(messages) if m.role == "user"), None)
        if first_user is not None:
            messages[first_user] = Message("user", render_instruction(template, 0, **fields))
    record.messages = messages
    return record


def _record_from_draft(draft: Draft, source: Source, spec: SourceSpec) -> Record:
    meta = dict(draft.meta)
    meta["source_name"] = spec.name
    messages = None
    if draft.messages is not None:
        for i, m in enumerate(draft.messages):
            if m["role"] not in ("system", "user", "assistant"):
                raise RecordError(
                    f"messages[{i}]: unknown role '{m['role']}' (roles: system, user, assistant)"
                )
        messages = [Message(m["role"], m["content"]) for m in draft.messages]  # type: ignore[arg-type]
    return Record(
        id=make_id(spec.name, source.where()), kind=draft.kind, task="general", source=source,  # type: ignore[arg-type]
        messages=messages, text=draft.text, meta=meta,
    )  # fmt: skip


def process_unit(spec: SourceSpec, unit: Unit, cfg: DataConfig) -> tuple[str, Any]:
    """One input through read → normalize → validate → label. Returns ("kept", Record) or
    ("rejected", Rejection)."""
    reader = READERS[spec.reader]
    rid = make_id(spec.name, unit.source.where())
    try:
        draft = reader.convert(unit.payload, spec)
        record = _record_from_draft(draft, unit.source, spec)
    except RecordError as exc:
        return "rejected", Rejection(rid, spec.name, unit.source, "read", str(exc))
    try:
        record = normalize_record(record, spec, cfg)
    except RecordError as exc:
        return "rejected", Rejection(rid, spec.name, unit.source, "normalize", str(exc))
    task, how = label_task(record, spec.task, draft.task)
    record.task = task  # type: ignore[assignment]
    record.meta["task_from"] = how
    reason = validate(record, cfg.validate.max_chars, cfg.validate.max_turns, cfg.validate.check_language)
    if reason:
        return "rejected", Rejection(rid, spec.name, unit.source, "validate", reason, record)
    return "kept", record


def process_units(batch: list[tuple[int, Unit]]) -> list[bytes]:
    """Worker entry: a batch of (source index, unit) → encoded outcomes (bytes pickle cheaply)."""
    specs, cfg = _WORKER["specs"], _WORKER["cfg"]
    out = []
    for spec_index, unit in batch:
        status, value = process_unit(specs[spec_index], unit, cfg)
        pair = (value, None) if status == "kept" else (None, value)
        out.append(msgspec.msgpack.encode(pair))
    return out


_OUTCOME = msgspec.msgpack.Decoder(tuple[Record | None, Rejection | None])


def _decode_outcome(raw: bytes) -> tuple[str, Any]:
    record, rejection = _OUTCOME.decode(raw)
    return ("kept", record) if record is not None else ("rejected", rejection)


# --------------------------------------------------------------------------------------------------- driver


def iter_all_units(specs: list[SourceSpec], stats: dict[str, ReadStats]) -> Iterator[tuple[int, Unit]]:
    for spec in specs:
        units: Iterable[Unit] = READERS[spec.reader].iter_units(
            spec.path, spec.display, spec, stats[spec.name]
        )
        if spec.limit:
            units = itertools.islice(units, spec.limit)
        for unit in units:
            yield spec.index, unit


def _batched(it: Iterator[tuple[int, Unit]]) -> Iterator[list[tuple[int, Unit]]]:
    while batch := list(itertools.islice(it, BATCH)):
        yield batch


def outcomes(
    specs: list[SourceSpec], cfg: DataConfig, workers: int, stats: dict[str, ReadStats]
) -> Iterator[Any]:
    batches = _batched(iter_all_units(specs, stats))
    if workers <= 1:
        _init_worker(specs, cfg)
        for batch in batches:
            for raw in process_units(batch):
                yield _decode_outcome(raw)
        return
    import multiprocessing as mp

    # fork is not safe with threads and is gone on macOS; spawn costs ~1 s per worker once.
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(specs, cfg)) as pool:
        for results in pool.imap(process_units, batches, chunksize=1):
            for raw in results:
                yield _decode_outcome(raw)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def input_files(spec: SourceSpec) -> list[tuple[str, Path]]:
    """(display name, path) of every file a source reads, for the manifest's hashes."""
    files: list[tuple[str, Path]] = []
    if spec.path.is_dir():
        if spec.reader == "chatterbot":
            for lang in spec.languages or ["english"]:
                for f in sorted((spec.path / lang).glob("*.yml")):
                    files.append((f"{spec.display}/{lang}/{f.name}", f))
        else:
            files += [
                (f"{spec.display}/{f.name}", f) for f in sorted(spec.path.iterdir()) if f.suffix == ".json"
            ]
    else:
        files.append((spec.display, spec.path))
    files += [(f.name, f) for f in spec.extra_files]
    return files


def config_hash(cfg: DataConfig) -> str:
    return hashlib.sha256(ENCODER.encode(msgspec.to_builtins(cfg))).hexdigest()


class Writer:
    """JSONL output written to a temporary directory and renamed into place at the end (a failed build leaves
    no half-written dataset behind)."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
        self.files: dict[str, Any] = {}

    def write(self, name: str, obj: Any) -> None:
        f = self.files.get(name)
        if f is None:
            f = self.files[name] = open(self.tmp / name, "wb")  # noqa: SIM115 (open until commit)
        f.write(ENCODER.encode(obj))
        f.write(b"\n")

    def touch(self, *names: str) -> None:
        for name in names:
            if name not in self.files:
                self.files[name] = open(self.tmp / name, "wb")  # noqa: SIM115 (open until commit)

    def path(self, name: str) -> Path:
        return self.tmp / name

    def commit(self) -> None:
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        if self.out_dir.exists():
            shutil.rmtree(self.out_dir)
        os.replace(self.tmp, self.out_dir)

    def abort(self) -> None:
        for f in self.files.values():
            f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def build(cfg: DataConfig, out_dir: str | Path, config_path: str | Path | None = None, workers: int | None = None,
          progress: bool = True) -> dict[str, Any]:  # fmt: skip
    """Run the whole pipeline; returns the manifest (also written to out_dir/manifest.json)."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    specs = resolve_sources(cfg, Path(config_path) if config_path else None)
    workers = workers or cfg.workers
    stats = {s.name: ReadStats() for s in specs}
    writer = Writer(out_dir)
    try:
        counts = Counters(specs)
        bar = tqdm(desc="data build", unit="rec", disable=not progress, mininterval=0.5, dynamic_ncols=True)
        with open(writer.path("kept.spool"), "wb") as spool:
            for status, value in outcomes(specs, cfg, workers, stats):
                bar.update(1)
                if status == "rejected":
                    counts.reject(value)
                    writer.write("rejected.jsonl", value)
                    continue
                counts.keep_read(value)
                spool.write(ENCODER.encode(value) + b"\n")
        bar.close()
        splits = _write_splits(writer, counts)
        writer.touch("rejected.jsonl", "duplicates.jsonl", "train.jsonl", "val.jsonl", "test.jsonl")
        os.remove(writer.path("kept.spool"))
        manifest = _manifest(cfg, specs, counts, stats, splits)
        (writer.path("manifest.json")).write_text(
            json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        )
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    return manifest


class Counters:
    """Where every input went: per source, per stage, per task, per split. inputs = kept + rejected + duplicates."""

    def __init__(self, specs: list[SourceSpec]):
        self.by_source = {s.name: Counter() for s in specs}
        self.rejected_by_stage: Counter[str] = Counter()
        self.rejected_by_reason: Counter[str] = Counter()
        self.by_task: Counter[str] = Counter()
        self.by_split: Counter[str] = Counter()
        self.task_from: Counter[str] = Counter()
        self.train_by_task: Counter[str] = Counter()
        self.inputs = 0

    def reject(self, rej: Rejection) -> None:
        self.inputs += 1
        self.rejected_by_stage[rej.stage] += 1
        # Reasons are grouped by their head ("messages[2] (user): empty content" → "empty content").
        self.rejected_by_reason[f"{rej.stage}: {reason_kind(rej.reason)}"] += 1
        self.by_source[rej.source_name]["rejected"] += 1

    def keep_read(self, record: Record) -> None:
        self.inputs += 1
        self.by_source[record.meta["source_name"]]["passed_per_record_stages"] += 1
        self.task_from[record.meta.get("task_from", "rule")] += 1


def reason_kind(reason: str) -> str:
    import re

    head = (
        reason.split(":")[-1].strip()
        if reason.startswith(("messages[", "source side", "target side"))
        else reason
    )
    head = re.sub(r"\d+", "N", head)
    head = re.sub(r"'[^']*'", "'…'", head)
    return head[:80]


def _write_splits(writer: Writer, counts: Counters) -> dict[str, int]:
    """Part 1: a record's own meta.split, else train."""
    split_counts: Counter[str] = Counter()
    with open(writer.path("kept.spool"), "rb") as f:
        for line in f:
            record = msgspec.json.decode(line, type=Record)
            split = record.meta.get("split") or "train"
            record.meta["split"] = split
            writer.write(f"{split}.jsonl", record)
            split_counts[split] += 1
            counts.by_task[record.task] += 1
            if split == "train":
                counts.train_by_task[record.task] += 1
            counts.by_source[record.meta["source_name"]]["kept"] += 1
    counts.by_split = split_counts
    return dict(split_counts)


def _manifest(cfg: DataConfig, specs: list[SourceSpec], counts: Counters, stats: dict[str, ReadStats],
              splits: dict[str, int]) -> dict[str, Any]:  # fmt: skip
    from training.data.mixing import mixing_weights

    kept = sum(splits.values())
    rejected = sum(counts.rejected_by_stage.values())
    duplicates = 0
    by_source = {}
    for s in specs:
        c = counts.by_source[s.name]
        by_source[s.name] = {
            "reader": s.reader,
            "inputs": c["passed_per_record_stages"] + c["rejected"],
            "kept": c["kept"],
            "rejected": c["rejected"],
            "duplicates": c["duplicates"],
            "skipped_blank_lines": stats[s.name].blank_lines,
            "skipped_headers": stats[s.name].headers,
        }
    return {
        "name": cfg.name,
        "config_hash": config_hash(cfg),
        "config": msgspec.to_builtins(cfg),
        "input_files": {name: file_sha256(p) for s in specs for name, p in input_files(s)},
        "counts": {
            "inputs": counts.inputs,
            "kept": kept,
            "rejected": rejected,
            "duplicates": duplicates,
            "derived": 0,
            "by_stage": {
                stage: counts.rejected_by_stage.get(stage, 0) for stage in ("read", "normalize", "validate")
            },
            "rejected_by_reason": dict(sorted(counts.rejected_by_reason.items())),
            "by_source": by_source,
            "by_task": dict(sorted(counts.by_task.items())),
            "by_split": dict(sorted(splits.items())),
            "task_labels_from": dict(sorted(counts.task_from.items())),
        },
        # An all-rejected build is still a valid report of why; it just has nothing to mix.
        "mixing": {
            "weights": mixing_weights(counts.train_by_task) if counts.train_by_task else {},
            "cap": 0,
            "temperature": 1.0,
        },
    }
