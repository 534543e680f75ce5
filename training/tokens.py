"""Token data for training: dataset records -> packed SFT rows (assistant-only labels) and a flat token memmap
for pretraining. Both streams are deterministic and carry a small JSON cursor for exact resume.

Labels are already shifted: `labels[t]` is the token position t must predict, or IGNORE. Packed rows put several
examples in one fixed-length row with positions restarting at 0 for each, which the model reads as "attention
stays inside this example" (model.transformer.packed_causal_mask), so an example's logits are the same packed or
alone (tested).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model.chat import ChatFormatError, encode_chat
from model.errors import UserError
from model.tokenizer import Tokenizer

IGNORE = -100  # label of a position that is not trained on (torch.nn.functional.cross_entropy's default)
SPLITS = ("train", "val", "test")


class DatasetError(UserError):
    """A dataset directory or record the trainer cannot use; the message names the file and line."""


# ------------------------------------------------------------------------------------------------ records


def read_manifest(dataset_dir: str | Path) -> dict[str, Any]:
    d = Path(dataset_dir)
    if not d.is_dir():
        raise DatasetError(f"{d}: dataset directory does not exist (build one with `instructlm data build`)")
    path = d / "manifest.json"
    if not path.is_file():
        raise DatasetError(
            f"{d}: no manifest.json; this is not a dataset directory built by `instructlm data build`"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise DatasetError(f"{path}: expected a JSON object")
    return manifest


def read_records(dataset_dir: str | Path, split: str) -> list[dict[str, Any]]:
    """The records of one split (`train.jsonl` ...), each checked for the fields training reads."""
    path = Path(dataset_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise DatasetError(f"{path}: split file missing")
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            kind = rec.get("kind") if isinstance(rec, dict) else None
            if kind == "chat":
                if not isinstance(rec.get("messages"), list):
                    raise DatasetError(f"{path}:{lineno}: chat record without a 'messages' list")
            elif kind == "text":
                if not isinstance(rec.get("text"), str):
                    raise DatasetError(f"{path}:{lineno}: text record without a 'text' string")
            else:
                raise DatasetError(f"{path}:{lineno}: 'kind' is {kind!r}; expected 'chat' or 'text'")
            if not isinstance(rec.get("task"), str):
                raise DatasetError(f"{path}:{lineno}: 'task' missing or not a string")
            rec["_where"] = f"{path}:{lineno}"
            out.append(rec)
    return out


def record_texts(records: Iterable[Mapping[str, Any]]) -> Iterable[str]:
    """Every string a tokenizer should learn from: texts and message contents."""
    for r in records:
        if r["kind"] == "text":
            yield r["text"]
        else:
            for m in r["messages"]:
                yield m.get("content") or ""


# ---------------------------------------------------------------------------------------------- examples


@dataclass
class Example:
    ids: np.ndarray  # int32 [L]
    labels: np.ndarray  # int32 [L], shifted: labels[t] = target of position t or IGNORE
    task: str

    @property
    def num_labels(self) -> int:
        return int((self.labels != IGNORE).sum())


def sft_example(
    tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]], task: str, max_len: int
) -> Example:
    """A chat rendered by the shared chat format; only assistant content (and its <|im_end|>) is predicted.
    Longer than max_len: the tail is cut (the caller counts it)."""
    enc = encode_chat(tokenizer, messages)
    ids = np.asarray(enc.ids, dtype=np.int32)
    mask = np.asarray(enc.loss_mask, dtype=bool)
    labels = np.full(len(ids), IGNORE, dtype=np.int32)
    # Position t predicts token t+1, trained when token t+1 is an assistant token.
    labels[:-1] = np.where(mask[1:], ids[1:], IGNORE)
    return Example(ids[:max_len], labels[:max_len], task)


@dataclass
class SFTData:
    by_task: dict[str, list[Example]]
    truncated: int
    dropped: int  # no label left (e.g. an assistant turn entirely past max_len)
    skipped_text: int  # text records: pretraining only

    @property
    def num_examples(self) -> int:
        return sum(len(v) for v in self.by_task.values())


def sft_examples(tokenizer: Tokenizer, records: Iterable[Mapping[str, Any]], max_len: int) -> SFTData:
    by_task: dict[str, list[Example]] = {}
    truncated = dropped = skipped = 0
    for r in records:
        if r["kind"] != "chat":
            skipped += 1
            continue
        try:
            full = encode_chat(tokenizer, r["messages"])
        except ChatFormatError as exc:
            raise DatasetError(f"{r.get('_where', r.get('id'))}: {exc}") from None
        if len(full.ids) > max_len:
            truncated += 1
        ex = sft_example(tokenizer, r["messages"], r["task"], max_len)
        if ex.num_labels == 0:
            dropped += 1
            continue
        by_task.setdefault(r["task"], []).append(ex)
    return SFTData(by_task, truncated, dropped, skipped)


# ------------------------------------------------------------------------------------------------ packing


@dataclass
class Row:
    input_ids: np.ndarray  # int64 [S]
    position_ids: np.ndarray  # int64 [S], restarting at 0 for every example (and for the padding tail)
    labels: np.ndarray  # int64 [S]


def pack_row(examples: Sequence[Example], seq_len: int, pad_id: int) -> Row:
    """Concatenate examples (total <= seq_len) and pad; the padding is one more 'example' with no labels."""
    ids = np.full(seq_len, pad_id, dtype=np.int64)
    pos = np.zeros(seq_len, dtype=np.int64)
    labels = np.full(seq_len, IGNORE, dtype=np.int64)
    at = 0
    for ex in examples:
        n = len(ex.ids)
        ids[at : at + n] = ex.ids
        pos[at : at + n] = np.arange(n)
        labels[at : at + n] = ex.labels
        at += n
    if at > seq_len:
        raise ValueError(f"pack_row: {at} tokens do not fit in {seq_len}")
    pos[at:] = np.arange(seq_len - at)
    return Row(ids, pos, labels)


class PackedSFTStream:
    """Endless packed rows in mixture order: the dataset's task weights are applied by `TaskMixer` (the one
    mixing implementation, training.data.mixing); examples are packed greedily in the order drawn, and one that
    does not fit closes the row and opens the next. State: the mixer's state plus the carried example."""

    def __init__(
        self,
        by_task: Mapping[str, Sequence[Example]],
        weights: Mapping[str, float],
        seed: int,
        seq_len: int,
        pad_id: int,
    ) -> None:
        from training.data.mixing import TaskMixer

        self.by_task = by_task
        self.seq_len = seq_len
        self.pad_id = pad_id
        self.mixer = TaskMixer({t: range(len(v)) for t, v in by_task.items()}, weights, seed)
        self.carry: tuple[str, int] | None = None
        self.rows = 0

    def _draw(self) -> tuple[str, int]:
        if self.carry is not None:
            item, self.carry = self.carry, None
            return item
        task, index = next(self.mixer)
        return task, int(index)

    def next_row(self) -> Row:
        chosen: list[Example] = []
        used = 0
        while True:
            task, index = self._draw()
            ex = self.by_task[task][index]
            if chosen and used + len(ex.ids) > self.seq_len:
                self.carry = (task, index)
                break
            chosen.append(ex)
            used += len(ex.ids)
            if used >= self.seq_len:
                break
        self.rows += 1
        return pack_row(chosen, self.seq_len, self.pad_id)

    def state_dict(self) -> dict[str, Any]:
        return {
            "mixer": self.mixer.state_dict(),
            "carry": list(self.carry) if self.carry else None,
            "rows": self.rows,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.mixer.load_state_dict(state["mixer"])
        self.carry = (state["carry"][0], int(state["carry"][1])) if state["carry"] else None
        self.rows = int(state["rows"])


def pack_in_order(examples: Sequence[Example], seq_len: int, pad_id: int) -> list[Row]:
    """Deterministic packing without mixing (validation)."""
    rows, chosen, used = [], [], 0
    for ex in examples:
        if chosen and used + len(ex.ids) > seq_len:
            rows.append(pack_row(chosen, seq_len, pad_id))
            chosen, used = [], 0
        chosen.append(ex)
        used += len(ex.ids)
    if chosen:
        rows.append(pack_row(chosen, seq_len, pad_id))
    return rows


# --------------------------------------------------------------------------------------- pretraining memmap


def _doc_ids(tokenizer: Tokenizer, record: Mapping[str, Any], include_chat: bool) -> list[int] | None:
    if record["kind"] == "text":
        return tokenizer.encode(record["text"]) + [tokenizer.endoftext_id]
    if include_chat:
        return encode_chat(tokenizer, record["messages"]).ids + [tokenizer.endoftext_id]
    return None


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def write_token_file(
    tokenizer: Tokenizer, records: Iterable[Mapping[str, Any]], path: str | Path, include_chat: bool = True
) -> np.memmap:
    """Every document's tokens followed by <|endoftext|>, one flat array on disk (uint16 when the vocabulary fits).
    Written to a temporary name and renamed, so a crash never leaves a half file that looks finished."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    n = 0
    with open(tmp, "wb") as f:
        for r in records:
            ids = _doc_ids(tokenizer, r, include_chat)
            if ids:
                f.write(np.asarray(ids, dtype=dtype).tobytes())
                n += len(ids)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


def open_token_file(path: str | Path, vocab_size: int) -> np.memmap:
    return np.memmap(path, dtype=token_dtype(vocab_size), mode="r")


def doc_positions(ids: np.ndarray, boundary_id: int) -> np.ndarray:
    """Positions that restart after every boundary token, so attention stays inside each document."""
    n = len(ids)
    starts = np.zeros(n, dtype=bool)
    starts[0] = True
    starts[1:] = ids[:-1] == boundary_id
    idx = np.arange(n)
    last_start = np.maximum.accumulate(np.where(starts, idx, 0))
    return (idx - last_start).astype(np.int64)


class TokenWindowStream:
    """Pretraining rows: non-overlapping windows of seq_len+1 tokens from the memmap, in a fresh seeded
    permutation each epoch (every token seen once per epoch). State: epoch and index."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int, boundary_id: int) -> None:
        self.tokens = tokens
        self.seq_len = seq_len
        self.seed = seed
        self.boundary_id = boundary_id
        self.num_windows = (len(tokens) - 1) // seq_len
        if self.num_windows < 1:
            raise DatasetError(
                f"pretraining data has {len(tokens)} tokens, fewer than one window of {seq_len + 1}"
            )
        self.epoch = 0
        self.index = 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)

    def window(self, w: int) -> Row:
        chunk = np.asarray(
            self.tokens[w * self.seq_len : w * self.seq_len + self.seq_len + 1], dtype=np.int64
        )
        ids = chunk[:-1]
        return Row(ids, doc_positions(ids, self.boundary_id), chunk[1:].copy())

    def next_row(self) -> Row:
        if self.index == self.num_windows:
            self.epoch += 1
            self.index = 0
            self._perm = self._permutation(self.epoch)
        w = int(self._perm[self.index])
        self.index += 1
        return self.window(w)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, "num_windows": self.num_windows}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state["num_windows"]) != self.num_windows:
            raise DatasetError(
                f"resume: the pretraining data now has {self.num_windows} windows, the checkpoint was made with "
                f"{state['num_windows']}; the dataset or tokenizer changed"
            )
        self.epoch = int(state["epoch"])
        self.index = int(state["index"])
        self._perm = self._permutation(self.epoch)


def stack_rows(rows: Sequence[Row]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[B, S] input_ids, position_ids, labels."""
    return (
        np.stack([r.input_ids for r in rows]),
        np.stack([r.position_ids for r in rows]),
        np.stack([r.labels for r in rows]),
    )


def fingerprint(*paths: str | Path) -> str:
    """Content hash of files (the dataset split, the tokenizer), to tell whether a cached token file is stale."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]
