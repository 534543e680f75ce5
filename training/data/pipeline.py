"""The build: sources → per-record stages (in N worker processes) → global stages (one process) → output dir.

Per-record stages run on one input unit at a time and depend on nothing else: read (convert), normalize, label,
validate, filter, and the MinHash signatures the global stages need. They run in `process_units`, in this
process or in a pool whose ordered `imap` keeps input order, so `--workers N` writes the same bytes as one
process. The global stages (dedup, similarity clusters, split, balance, augmentation, write) run here. Kept
records are spooled to disk as they come, so memory grows with the dedup and similarity indexes (about 13 KB
per kept record on the 200k bench corpus), not with the records themselves.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import msgspec

from model.tasks import render_instruction
from training.data.config import DataConfig, SourceSpec, resolve_sources
from training.data.dedup import Keys
from training.data.label import label_task
from training.data.normalize import normalize_text
from training.data.readers import READERS, Draft, ReadStats, RecordError, Unit
from training.data.record import ENCODER, Duplicate, Message, Record, Rejection, Source, make_id
from training.data.similarity import tokens
from training.data.validate import validate

BATCH = 256  # units per worker task: large enough to amortize pickling, small enough to stream

# ------------------------------------------------------------------------------------------ per-record stages

_WORKER: dict[str, Any] = {}


def _init_worker(specs: list[SourceSpec], cfg: DataConfig) -> None:
    _WORKER.clear()  # a second build in the same process must not see the first one's filters
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


def _filters(cfg: DataConfig, base_dir: Path):
    if "filters" not in _WORKER:
        from training.data.filters import Filters

        _WORKER["filters"] = Filters(cfg.filter, str(base_dir))
    return _WORKER["filters"]


def process_unit(spec: SourceSpec, unit: Unit, cfg: DataConfig, timer: Counter | None = None) -> Outcome:
    """One input through read → normalize → label → validate → filter → signatures."""
    from training.data.dedup import compute_keys

    timer = timer if timer is not None else Counter()
    t0 = time.process_time()
    reader = READERS[spec.reader]
    rid = make_id(spec.name, unit.source.where())
    try:
        draft = reader.convert(unit.payload, spec)
        record = _record_from_draft(draft, unit.source, spec)
    except RecordError as exc:
        timer["read"] += time.process_time() - t0
        return Outcome(None, Rejection(rid, spec.name, unit.source, "read", str(exc)), None)
    t1 = time.process_time()
    timer["read"] += t1 - t0
    record = normalize_record(record, spec, cfg)
    task, how = label_task(record, spec.task, draft.task)
    record.task = task  # type: ignore[assignment]
    record.meta["task_from"] = how
    t2 = time.process_time()
    timer["normalize"] += t2 - t1
    reason = validate(record, cfg.validate.max_chars, cfg.validate.max_turns, cfg.validate.check_language)
    t3 = time.process_time()
    timer["validate"] += t3 - t2
    if reason:
        return Outcome(None, Rejection(rid, spec.name, unit.source, "validate", reason, record), None)
    reason = _filters(cfg, spec.base_dir).check(record)
    t4 = time.process_time()
    timer["filter"] += t4 - t3
    if reason:
        return Outcome(None, Rejection(rid, spec.name, unit.source, "filter", reason, record), None)
    keys = compute_keys(record, cfg.dedup, cfg.split, spec.instruction_dedup)
    timer["signatures"] += time.process_time() - t4
    return Outcome(record, None, keys)


def process_units(batch: list[tuple[int, Unit]]) -> tuple[list[bytes], dict[str, float]]:
    """Worker entry: a batch of (source index, unit) → encoded outcomes (bytes pickle cheaply) and stage times."""
    specs, cfg = _WORKER["specs"], _WORKER["cfg"]
    timer: Counter = Counter()
    out = [msgspec.msgpack.encode(process_unit(specs[i], unit, cfg, timer)) for i, unit in batch]
    return out, dict(timer)


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


class Outcome(msgspec.Struct, array_like=True):
    record: Record | None
    rejection: Rejection | None
    keys: Keys | None


_OUTCOME = msgspec.msgpack.Decoder(Outcome)


def outcomes(
    specs: list[SourceSpec], cfg: DataConfig, workers: int, stats: dict[str, ReadStats], timer: Counter
) -> Iterator[Outcome]:
    batches = _batched(iter_all_units(specs, stats))
    if workers <= 1:
        _init_worker(specs, cfg)
        results: Iterable[tuple[list[bytes], dict[str, float]]] = map(process_units, batches)
        for raws, times in results:
            timer.update(times)
            for raw in raws:
                yield _OUTCOME.decode(raw)
        return
    import multiprocessing as mp

    # spawn, not fork: fork is unsafe once threads exist and is not the default on macOS; each worker imports
    # the modules once.
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(specs, cfg)) as pool:
        # Ordered imap: outcomes come back in input order, so N workers write what one writes.
        for raws, times in pool.imap(process_units, batches, chunksize=1):
            timer.update(times)
            for raw in raws:
                yield _OUTCOME.decode(raw)


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


def config_data(cfg: DataConfig) -> dict[str, Any]:
    """The recipe as data, without `workers`: how many processes ran changes no byte of the output."""
    data = msgspec.to_builtins(cfg)
    data.pop("workers", None)
    return data


def config_hash(cfg: DataConfig) -> str:
    return hashlib.sha256(ENCODER.encode(config_data(cfg))).hexdigest()


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


def _peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def build(cfg: DataConfig, out_dir: str | Path, config_path: str | Path | None = None, workers: int | None = None,
          progress: bool = True, stats_out: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """Run the whole pipeline; returns the manifest (also written to out_dir/manifest.json). `stats_out`, when
    given, receives CPU seconds and peak memory per stage (kept out of the manifest: builds stay byte-identical)."""
    from tqdm import tqdm

    from training.data.dedup import Deduper, Grouper
    from training.data.split import Entry

    out_dir = Path(out_dir)
    specs = resolve_sources(cfg, Path(config_path) if config_path else None)
    workers = workers or cfg.workers
    stats = {s.name: ReadStats() for s in specs}
    timer: Counter[str] = Counter()
    peaks: dict[str, float] = {}
    writer = Writer(out_dir)
    try:
        counts = Counters(specs)
        report = ReportData()
        deduper, grouper = Deduper(cfg.dedup), Grouper(cfg.split)
        entries: list[Entry] = []
        bar = tqdm(desc="data build", unit="rec", disable=not progress, mininterval=0.5, dynamic_ncols=True)
        with open(writer.path("kept.spool"), "wb") as spool:
            for outcome in outcomes(specs, cfg, workers, stats, timer):
                bar.update(1)
                if outcome.rejection is not None:
                    counts.reject(outcome.rejection)
                    writer.write("rejected.jsonl", outcome.rejection)
                    continue
                record, keys = outcome.record, outcome.keys
                assert record is not None and keys is not None
                counts.inputs += 1
                t0 = time.process_time()
                dup = deduper.check(record.id, keys)
                t1 = time.process_time()
                timer["dedup"] += t1 - t0
                if dup is not None:
                    counts.duplicate(record, dup[1])
                    report.dup_clusters[dup[0]] += 1
                    writer.write(
                        "duplicates.jsonl", Duplicate(record.id, dup[0], dup[1], dup[2], record.source)
                    )
                    continue
                grouper.add(record.id, keys)
                timer["group"] += time.process_time() - t1
                entries.append(Entry(record.id, record.task, record.meta.get("split")))
                spool.write(ENCODER.encode(record) + b"\n")
        bar.close()
        peaks["stream"] = _peak_mb()
        t0 = time.process_time()
        manifest = _finish(cfg, specs, counts, stats, writer, entries, grouper, report)
        timer["split+augment+balance+write"] += time.process_time() - t0
        peaks["finish"] = _peak_mb()
        t0 = time.process_time()
        from training.data.report import write_report

        write_report(writer.tmp, manifest, report, pictures=cfg.pictures)
        timer["report"] += time.process_time() - t0
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    if stats_out is not None:
        stats_out.update(
            {"seconds": dict(timer), "peak_mb": peaks, "workers": workers, "links": grouper.links}
        )
    return manifest


class ReportData:
    """What the report needs beyond the manifest, gathered while records stream past."""

    def __init__(self) -> None:
        self.dup_clusters: Counter[str] = Counter()  # kept id → how many duplicates it absorbed
        self.group_sizes: Counter[int] = Counter()
        self.lengths: dict[str, list[tuple[int, int]]] = defaultdict(list)  # task → (prompt, answer) words
        self.instructions: list[str] = []  # first 20k instructions, for the diversity view
        self.train_before: Counter[str] = Counter()


def _finish(cfg: DataConfig, specs: list[SourceSpec], counts: Counters, stats: dict[str, ReadStats],
            writer: Writer, entries: list, grouper: Any, report: ReportData) -> dict[str, Any]:  # fmt: skip
    """Split → balance → write with train-only augmentation (each derived record checked against held-out ones)."""
    from training.data.dedup import segment_keys
    from training.data.split import assign_splits, derive, over_cap

    root_of = {e.id: grouper.root_of(e.id) for e in entries}
    split, moved = assign_splits(entries, root_of, cfg.split, cfg.seed)
    report.group_sizes = Counter(Counter(root_of.values()).values())
    held_out = {i for i, s in split.items() if s != "train"}
    train_entries = [e for e in entries if split[e.id] == "train"]
    report.train_before = Counter(e.task for e in train_entries)
    dropped = over_cap(train_entries, cfg.balance.max_per_task, cfg.seed)
    with open(writer.path("kept.spool"), "rb") as f:
        for line in f:
            record = msgspec.json.decode(line, type=Record)
            name = record.meta["source_name"]
            if record.id in dropped:
                reason = f"over max_per_task={cfg.balance.max_per_task} for task '{record.task}'"
                counts.reject(Rejection(record.id, name, record.source, "balance", reason, record))
                writer.write(
                    "rejected.jsonl", Rejection(record.id, name, record.source, "balance", reason, record)
                )
                continue
            s = split[record.id]
            record.meta["split"] = s
            if record.id in moved:
                record.meta["split_pinned"] = moved[record.id]  # its cluster holds a held-out record
            writer.write(f"{s}.jsonl", record)
            counts.kept(record, s)
            _observe(report, record)
            if s != "train":
                continue
            for d in derive(record, cfg.augment, cfg.seed):
                # A rephrasing keeps the content fields, so its segments are its origin's, whose whole cluster is
                # train; flips and no-input variants change the segments and are checked against held-out ones.
                guard = d.meta["augmentation"] != "rephrase" and held_out
                if guard and grouper.similar_to_any(segment_keys(d, cfg.split), held_out) is not None:
                    counts.derived_leak += 1
                    continue
                writer.write("train.jsonl", d)
                counts.derived(d)
    os.remove(writer.path("kept.spool"))
    writer.touch("rejected.jsonl", "duplicates.jsonl", "train.jsonl", "val.jsonl", "test.jsonl")
    counts.moved = len(moved)
    manifest = _manifest(cfg, specs, counts, stats, grouper)
    (writer.path("manifest.json")).write_text(
        json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    )
    return manifest


def _observe(report: ReportData, record: Record) -> None:
    from training.data.record import response_text, user_text

    report.lengths[record.task].append((len(tokens(user_text(record))), len(tokens(response_text(record)))))
    if len(report.instructions) < 20_000 and record.kind == "chat":
        # The rendered first user turn: a templated task's verb ("Translate", "Classify") is its instruction.
        first = next((m.content for m in record.messages or () if m.role == "user"), "")
        report.instructions.append(first[:300])


class Counters:
    """Where every input went: per source, per stage, per task, per split. inputs = kept + rejected + duplicates."""

    def __init__(self, specs: list[SourceSpec]):
        self.by_source = {s.name: Counter() for s in specs}
        self.rejected_by_stage: Counter[str] = Counter()
        self.rejected_by_reason: Counter[str] = Counter()
        self.duplicates_by_method: Counter[str] = Counter()
        self.by_task_split: dict[str, Counter[str]] = defaultdict(Counter)
        self.derived_by: Counter[str] = Counter()
        self.derived_by_task: Counter[str] = Counter()
        self.task_from: Counter[str] = Counter()
        self.derived_leak = 0
        self.moved = 0
        self.inputs = 0

    def reject(self, rej: Rejection) -> None:
        if rej.stage != "balance":  # a balance rejection was already counted as an input when it was read
            self.inputs += 1
        self.rejected_by_stage[rej.stage] += 1
        self.rejected_by_reason[f"{rej.stage}: {reason_kind(rej.reason)}"] += 1
        self.by_source[rej.source_name]["rejected"] += 1

    def duplicate(self, record: Record, method: str) -> None:
        self.duplicates_by_method[method] += 1
        self.by_source[record.meta["source_name"]]["duplicates"] += 1

    def kept(self, record: Record, split: str) -> None:
        self.by_source[record.meta["source_name"]]["kept"] += 1
        self.by_task_split[record.task][split] += 1
        self.task_from[record.meta.get("task_from", "rule")] += 1

    def derived(self, record: Record) -> None:
        self.derived_by[record.meta["augmentation"]] += 1
        self.derived_by_task[record.task] += 1


def reason_kind(reason: str) -> str:
    """Reasons grouped by their kind: numbers and quoted names masked ("messages[2] (user): empty content")."""
    import re

    head = re.sub(r"\d+(?:\.\d+)?", "N", reason)
    head = re.sub(r"'[^']*'", "'…'", head)
    head = re.sub(r"`[^`]*`", "`…`", head) if "missing required field" not in head else head
    return head[:90]


def _flow(counts: Counters, kept: int) -> dict[str, int]:
    left = counts.inputs
    flow = {"inputs": left}
    for stage in ("read", "validate", "filter"):
        left -= counts.rejected_by_stage.get(stage, 0)
        flow[f"after_{stage}"] = left
    left -= sum(counts.duplicates_by_method.values())
    flow["after_dedup"] = left
    left -= counts.rejected_by_stage.get("balance", 0)
    flow["after_balance"] = left
    if left != kept:  # the accounting invariant, checked on every build
        raise RuntimeError(f"accounting mismatch: {flow} but {kept} records written")
    return flow


def _manifest(cfg: DataConfig, specs: list[SourceSpec], counts: Counters, stats: dict[str, ReadStats],
              grouper: Any) -> dict[str, Any]:  # fmt: skip
    from training.data.mixing import mixing_weights

    by_split: Counter[str] = Counter()
    for per in counts.by_task_split.values():
        by_split.update(per)
    kept = sum(by_split.values())
    by_source = {}
    for s in specs:
        c = counts.by_source[s.name]
        by_source[s.name] = {
            "reader": s.reader,
            "inputs": c["kept"] + c["rejected"] + c["duplicates"],
            "kept": c["kept"],
            "rejected": c["rejected"],
            "duplicates": c["duplicates"],
            "skipped_blank_lines": stats[s.name].blank_lines,
            "skipped_headers": stats[s.name].headers,
        }
    train = Counter({t: per["train"] for t, per in counts.by_task_split.items() if per["train"]})
    train.update(counts.derived_by_task)
    derived = sum(counts.derived_by.values())
    return {
        "name": cfg.name,
        "config_hash": config_hash(cfg),
        "config": config_data(cfg),
        "input_files": {name: file_sha256(p) for s in specs for name, p in input_files(s)},
        "counts": {
            "inputs": counts.inputs,
            "kept": kept,
            "rejected": sum(counts.rejected_by_stage.values()),
            "duplicates": sum(counts.duplicates_by_method.values()),
            "derived": derived,
            "by_stage": {
                # Records left after each stage, from the inputs down to the kept ones.
                "flow": _flow(counts, kept),
                "rejected": {
                    st: counts.rejected_by_stage.get(st, 0)
                    for st in ("read", "validate", "filter", "balance")
                },
                "duplicates": dict(sorted(counts.duplicates_by_method.items())),
                "split": {"clusters_linked": grouper.links, "moved_by_cluster": counts.moved},
                "augment": {
                    "derived": dict(sorted(counts.derived_by.items())),
                    "dropped_similar_to_held_out": counts.derived_leak,
                },
            },
            "rejected_by_reason": dict(sorted(counts.rejected_by_reason.items())),
            "by_source": by_source,
            "by_task": {t: dict(sorted(per.items())) for t, per in sorted(counts.by_task_split.items())},
            "by_split": dict(sorted(by_split.items())),
            "train_by_task_with_derived": dict(sorted(train.items())),
            "task_labels_from": dict(sorted(counts.task_from.items())),
        },
        # An all-rejected build is still a valid report of why; it just has nothing to mix.
        "mixing": {
            "weights": mixing_weights(train, cfg.balance.cap, cfg.balance.temperature) if train else {},
            "cap": cfg.balance.cap,
            "temperature": cfg.balance.temperature,
        },
    }
