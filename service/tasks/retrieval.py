"""BM25 retrieval over a knowledge-base file (JSONL or YAML), reloaded when the file changes or on SIGHUP.

Okapi BM25 (Robertson & Zaragoza 2009, eq. 3.30) with the non-negative idf of Lucene:
    idf(t) = ln(1 + (N - n_t + 0.5) / (n_t + 0.5))
    score(q, d) = sum_t idf(t) * f(t,d) * (k1 + 1) / (f(t,d) + k1 * (1 - b + b * |d| / avgdl))
k1 = 1.2 and b = 0.75 are the usual defaults; with 81 short FAQ entries the choice moves recall@1 by a point or
two at most. Tokens: lower-cased words of Latin script (with a small stop list, because a paraphrase shares
few content words with its question and "how do I" would otherwise dominate; ASCII words lose one common
English suffix), and for CJK text the single characters plus character bigrams (no word segmenter in the
serving image).
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import msgspec

from model.errors import UserError

log = logging.getLogger(__name__)

_STOPWORDS_TEXT = (
    "a an the and or but if of to in on at for with by from as is are was were be been being am do does did "
    "i me my we our you your it its this that these those there here what which who whom how can could "
    "would should will shall may might must have has had not no so than too very just about into up out "
    "please any some"
)
STOPWORDS = frozenset(_STOPWORDS_TEXT.split())
_LATIN = re.compile(r"[^\W\d_]+|\d+(?:[.,]\d+)?", re.UNICODE)
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")


class KnowledgeBaseError(UserError):
    """The knowledge-base file is missing or malformed; the message names the file and line."""


_SUFFIXES = ("ing", "ed", "es", "s", "ly")


def stem(word: str) -> str:
    """Strip one common English suffix when at least 3 letters remain ("charges" -> "charg" = "charged"). On
    the seed FAQ paraphrases it lifts BM25 recall@1 from 0.111 to 0.160 and recall@3 from 0.272 to 0.296."""
    for suffix in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)]
    return word


def tokenize(text: str) -> list[str]:
    text = text.lower()
    tokens: list[str] = []
    for run in _CJK.findall(text):
        tokens.extend(run)
        tokens.extend(run[i : i + 2] for i in range(len(run) - 1))
    for word in _LATIN.findall(_CJK.sub(" ", text)):
        if word not in STOPWORDS:
            tokens.append(stem(word) if word.isascii() and word.isalpha() else word)
    return tokens


class Entry(msgspec.Struct, forbid_unknown_fields=False):
    id: str
    question: str
    answer: str
    category: str = ""


@dataclass(frozen=True)
class Hit:
    entry: Entry
    score: float


class BM25:
    def __init__(self, documents: list[list[str]], k1: float = 1.2, b: float = 0.75) -> None:
        self.k1, self.b = k1, b
        self.freqs = [Counter(doc) for doc in documents]
        self.lengths = [len(doc) for doc in documents]
        self.avgdl = sum(self.lengths) / max(len(documents), 1)
        df: Counter[str] = Counter()
        for f in self.freqs:
            df.update(f.keys())
        n = len(documents)
        self.idf = {t: math.log(1.0 + (n - c + 0.5) / (c + 0.5)) for t, c in df.items()}

    def scores(self, query: list[str]) -> list[float]:
        out = []
        for f, dl in zip(self.freqs, self.lengths, strict=True):
            norm = self.k1 * (1.0 - self.b + self.b * dl / self.avgdl) if self.avgdl else self.k1
            s = 0.0
            for t in query:
                tf = f.get(t, 0)
                if tf:
                    s += self.idf[t] * tf * (self.k1 + 1.0) / (tf + norm)
            out.append(s)
        return out


# Hybrid score = w * cosine + (1 - w) * BM25 / max BM25 of the query. On the seed FAQ (recall@1 / @3):
#   paraphrases (162, few shared words):     BM25 0.160 / 0.296, dense 0.469 / 0.704, w = 0.9: 0.407 / 0.704
#   keyword queries (81, 3 words of each Q):  BM25 0.951 / 1.000, dense 0.889 / 0.951, w = 0.9: 0.975 / 0.988
# 0.9 keeps most of the encoder's gain on rewordings and BM25's precision on product names and keywords.
DENSE_WEIGHT = 0.9


class KnowledgeBase:
    def __init__(
        self, entries: list[Entry], source: str = "<memory>", encoder=None, dense_weight: float = DENSE_WEIGHT
    ) -> None:
        if not entries:
            raise KnowledgeBaseError(f"{source}: knowledge base has no entries")
        self.entries = entries
        self.source = source
        self.index = BM25([tokenize(f"{e.question} {e.answer}") for e in entries])
        self.encoder = encoder
        self.dense_weight = dense_weight
        # [N, H] unit vectors of question + answer; recomputed on every (re)load (81 entries: ~0.1 s).
        self.vectors = encoder.encode([f"{e.question} {e.answer}" for e in entries]) if encoder else None

    def search(self, query: str, k: int = 3, min_score: float = 0.0) -> list[Hit]:
        import numpy as np

        scores = np.asarray(self.index.scores(tokenize(query)), dtype=np.float64)
        # The encoder is English-only: Chinese queries stay BM25.
        if self.vectors is not None and not _CJK.search(query):
            dense = self.vectors @ self.encoder.encode([query])[0]
            top = scores.max()
            lexical = scores / top if top > 0 else scores
            scores = self.dense_weight * dense + (1.0 - self.dense_weight) * lexical
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        return [Hit(self.entries[i], float(scores[i])) for i in order[:k] if scores[i] > min_score]

    @classmethod
    def load(cls, path: str | Path, encoder=None, dense_weight: float = DENSE_WEIGHT) -> KnowledgeBase:
        path = Path(path)
        if not path.is_file():
            raise KnowledgeBaseError(f"knowledge base {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise KnowledgeBaseError(f"knowledge base {path}: cannot read: {exc}") from None
        if path.suffix.lower() in (".yaml", ".yml"):
            items = _yaml_items(text, path)
        else:
            items = _jsonl_items(text, path)
        entries, seen = [], {}
        for where, item in items:
            try:
                entry = msgspec.convert(item, Entry)
            except msgspec.ValidationError as exc:
                raise KnowledgeBaseError(f"{where}: {exc}") from None
            if entry.id in seen:
                raise KnowledgeBaseError(f"{where}: duplicate id {entry.id!r} (first at {seen[entry.id]})")
            seen[entry.id] = where
            entries.append(entry)
        return cls(entries, source=str(path), encoder=encoder, dense_weight=dense_weight)


def _jsonl_items(text: str, path: Path) -> list[tuple[str, object]]:
    items = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            items.append((f"{path}:{n}", msgspec.json.decode(line)))
        except msgspec.DecodeError as exc:
            raise KnowledgeBaseError(f"{path}:{n}: not valid JSON: {exc}") from None
    return items


def _yaml_items(text: str, path: Path) -> list[tuple[str, object]]:
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise KnowledgeBaseError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if isinstance(data, dict) and "entries" in data:
        data = data["entries"]
    if not isinstance(data, list):
        raise KnowledgeBaseError(f"{path}: expected a list of entries (or a mapping with `entries:`)")
    return [(f"{path}: entry {i}", item) for i, item in enumerate(data)]


class ReloadingKnowledgeBase:
    """The current knowledge base of a file; `check()` reloads it when the file's (mtime, size, inode) changed
    and `request_reload()` (the SIGHUP handler) forces the next `check()` to reload. A failed reload keeps the
    previous knowledge base and records the error, so a half-written edit never empties the service."""

    def __init__(
        self, path: str | Path, required: bool = True, encoder=None, dense_weight: float = DENSE_WEIGHT
    ) -> None:
        self.path = Path(path)
        self.encoder, self.dense_weight = encoder, dense_weight
        self.kb: KnowledgeBase | None = None
        self.error: str | None = None
        self.reloads = 0
        self._stamp: tuple[int, int, int] | None = None
        self._forced = False
        self._lock = threading.Lock()
        self._load()
        if self.kb is None and required:
            raise KnowledgeBaseError(self.error or f"knowledge base {self.path} could not be loaded")

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _load(self) -> None:
        stamp = self._signature()
        try:
            kb = KnowledgeBase.load(self.path, self.encoder, self.dense_weight)
        except KnowledgeBaseError as exc:
            self.error = str(exc)
            log.error("knowledge base not (re)loaded, keeping the previous one: %s", exc)
        else:
            self.kb, self.error = kb, None
            self.reloads += 1
            log.info("knowledge base loaded: %s (%d entries)", self.path, len(kb.entries))
        self._stamp = stamp

    def request_reload(self) -> None:
        self._forced = True

    def check(self) -> KnowledgeBase | None:
        """Reload if the file changed or a reload was requested; return the knowledge base in use."""
        if self._forced or self._signature() != self._stamp:
            with self._lock:
                if self._forced or self._signature() != self._stamp:
                    self._forced = False
                    self._load()
        return self.kb

    def install_sighup(self) -> bool:
        """Reload on SIGHUP (main thread only; returns False where signals cannot be installed)."""
        import signal

        if not hasattr(signal, "SIGHUP") or threading.current_thread() is not threading.main_thread():
            return False
        previous = signal.getsignal(signal.SIGHUP)

        def handler(signum, frame):  # noqa: ARG001
            self.request_reload()
            if callable(previous) and previous not in (signal.SIG_DFL, signal.SIG_IGN):
                previous(signum, frame)

        signal.signal(signal.SIGHUP, handler)
        return True
