"""Leak-free splits, train-only augmentation, and balance.

Order matters and is the point: split first (clusters of similar records land in one split, a record's own
`meta.split` pins its whole cluster, test winning over val over train), then derive records from the train
split only, each checked against the held-out records before it is written, then balance the train split.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass

import msgspec

from model.tasks import get_template, render_instruction
from training.data.dedup import SplitConfig
from training.data.record import Message, Record, make_id, response_text

PRIORITY = {"test": 0, "val": 1, "train": 2}


class AugmentConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    rephrase: bool = True
    # Share of templated train records that get one rephrased copy (a different wording of the same template).
    rephrase_fraction: float = 0.5
    flip_translation: bool = True  # en→zh also teaches zh→en
    alpaca_variants: bool = True  # an instruction+input record also as a single no-input instruction


class BalanceConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    cap: int = 0  # T5's artificial limit K on a task's effective size (0 = none)
    temperature: float = 1.0  # T5/FLAN mixing temperature
    max_per_task: int = (
        0  # keep at most this many original train records per task (0 = all); the rest rejected
    )


def _rank(seed: int, *parts: object) -> int:
    h = hashlib.blake2b(digest_size=8)
    for p in (seed, *parts):
        h.update(str(p).encode())
        h.update(b"\x00")
    return int.from_bytes(h.digest(), "big")


@dataclass
class Entry:
    id: str
    task: str
    pinned: str | None


def assign_splits(
    entries: list[Entry], root_of: dict[str, str], cfg: SplitConfig, seed: int
) -> tuple[dict[str, str], dict[str, str]]:
    """(split per id, {id: its own pinned split} for records a cluster moved elsewhere)."""
    groups: dict[str, list[Entry]] = defaultdict(list)
    for e in entries:
        groups[root_of[e.id]].append(e)
    split: dict[str, str] = {}
    moved: dict[str, str] = {}
    free: dict[str, list[str]] = defaultdict(list)  # task → roots of unpinned clusters
    for root, members in groups.items():
        pins = {m.pinned for m in members if m.pinned}
        if pins:
            target = min(pins, key=PRIORITY.__getitem__)
            for m in members:
                split[m.id] = target
                if m.pinned and m.pinned != target:
                    moved[m.id] = m.pinned
        else:
            free[members[0].task].append(root)
    for task in sorted(free):
        roots = sorted(free[task], key=lambda r: _rank(seed, "split", r))
        total = sum(len(groups[r]) for r in roots)
        quota = {"test": round(cfg.test_fraction * total), "val": round(cfg.val_fraction * total)}
        filled = Counter()
        for root in roots:
            target = next((s for s in ("test", "val") if filled[s] < quota[s]), "train")
            filled[target] += len(groups[root])
            for m in groups[root]:
                split[m.id] = target
    return split, moved


def derive(record: Record, cfg: AugmentConfig, seed: int) -> list[Record]:
    """Records derived from one train record; each carries origin_id and meta.augmentation."""
    out: list[Record] = []
    template, fields = record.meta.get("template"), record.meta.get("fields")
    if not template or not isinstance(fields, dict) or record.kind != "chat":
        return out
    messages = record.messages or []
    first_user = next((i for i, m in enumerate(messages) if m.role == "user"), None)
    if first_user is None:
        return out

    def make(kind: str, new_messages: list[Message], **meta: object) -> Record:
        m = {**record.meta, **meta, "augmentation": kind, "split": "train"}
        return Record(
            id=make_id(record.id, kind, meta.get("variant", 0)), kind="chat", task=record.task, source=record.source,
            messages=new_messages, meta=m, origin_id=record.id,
        )  # fmt: skip

    n_variants = len(get_template(template).variants)
    if (
        cfg.rephrase
        and n_variants > 1
        and _rank(seed, "rephrase", record.id) % 10_000 < cfg.rephrase_fraction * 10_000
    ):
        variant = 1 + _rank(seed, "variant", record.id) % (n_variants - 1)
        msgs = list(messages)
        msgs[first_user] = Message("user", render_instruction(template, variant, **fields))
        out.append(make("rephrase", msgs, variant=variant))
    if cfg.flip_translation and template == "translate" and len(messages) - first_user == 2:
        src, tgt = fields.get("src_lang"), fields.get("tgt_lang")
        flipped = {"src_lang": tgt, "tgt_lang": src, "source": response_text(record)}
        msgs = [*messages[:first_user], Message("user", render_instruction("translate", 0, **flipped)),
                Message("assistant", str(fields.get("source", "")))]  # fmt: skip
        out.append(make("flip", msgs, fields=flipped, src_lang=tgt, tgt_lang=src))
    if cfg.alpaca_variants and template == "instruction_input" and len(messages) - first_user == 2:
        merged = {"instruction": f"{str(fields['instruction']).rstrip(' .:')}: {fields['input']}"}
        msgs = [*messages[:first_user], Message("user", render_instruction("instruction", 0, **merged)),
                messages[first_user + 1]]  # fmt: skip
        out.append(make("no_input", msgs, template="instruction", fields=merged))
    return out


def over_cap(train: list[Entry], max_per_task: int, seed: int) -> set[str]:
    """Ids of original train records left out by `max_per_task`, chosen by a seeded hash (not file order)."""
    if max_per_task <= 0:
        return set()
    by_task: dict[str, list[str]] = defaultdict(list)
    for e in train:
        by_task[e.task].append(e.id)
    dropped: set[str] = set()
    for ids in by_task.values():
        if len(ids) > max_per_task:
            dropped.update(sorted(ids, key=lambda i: _rank(seed, "balance", i))[max_per_task:])
    return dropped
