"""Deduplication and similarity grouping (the main process's indexes; signatures come from the workers).

Dedup, in order: exact (hash of the normalized content), near-duplicate (MinHash LSH over word 5-grams,
Jaccard ≥ 0.7, datatrove's setting), and, for sources that ask for it, the Self-Instruct rule (ROUGE-L > 0.7
between instructions) with its own unigram MinHash index, because "a poem about cats" and "a poem about dogs"
share no 5-gram.

Content, not templates: a templated prompt is compared by its data fields (`record.prompt_content`), and prompt
and answer are compared separately, so the seed FAQ's held-out paraphrases (same answer, different question)
are not duplicates of the question they paraphrase, and two translation requests are not similar because they
share "Translate the following English text into German".

Grouping for the split is looser (any of: character 3-gram Jaccard ≥ 0.5, word 3-gram Jaccard ≥ 0.5,
ROUGE-L ≥ 0.7 between segments) and links records into clusters that must land in one split.
"""

from __future__ import annotations

import hashlib
from collections import Counter

import msgspec
import numpy as np

from training.data.record import Record, instruction_text, prompt_content, response_text
from training.data.similarity import (
    HASH_DTYPE,
    char_ngrams,
    estimate,
    jaccard,
    lean,
    rouge_l,
    signature,
    tokens,
    word_ngrams,
)


class DedupConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    exact: bool = True
    near: bool = True
    near_threshold: float = 0.7  # datatrove / "Deduplicating training data" (Lee et al. 2022)
    ngram: int = 5
    num_perm: int = 128
    instruction_rouge_l: float = 0.7  # Self-Instruct: keep an instruction only if ROUGE-L < 0.7 with all kept
    instruction_candidates: float = 0.5  # unigram-Jaccard LSH threshold that proposes pairs for ROUGE-L


class SplitConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    link_char3: float = 0.5  # character 3-gram Jaccard
    link_word3: float = 0.5  # word 3-gram Jaccard (the "looser than dedup" grouping)
    link_rouge_l: float = 0.7  # the Self-Instruct similarity
    num_perm: int = 96  # candidate generation only; every link is verified on the texts
    max_segment_chars: int = 600  # segments are compared on their first 600 characters


class Keys(msgspec.Struct, array_like=True):
    """What the global stages need from one record, computed in the worker."""

    exact: str
    prompt_sig: bytes
    response_sig: bytes
    instruction: str | None  # set only for sources under the Self-Instruct rule
    instruction_sig: bytes | None
    segments: list[str]
    seg_char_sigs: list[bytes]
    seg_word_sigs: list[bytes]


def segments_of(record: Record, max_chars: int) -> list[str]:
    """Texts a train/test leak is judged on: the prompt's data, and for translation also the answer (a pair
    seen in one direction leaks the other direction)."""
    segs = [prompt_content(record)[:max_chars]]
    if record.task == "translation":
        segs.append(response_text(record)[:max_chars])
    return [s for s in segs if s.strip()]


def segment_keys(record: Record, split: SplitConfig) -> Keys:
    """Only what the split's similarity index needs (for derived records, which are not deduplicated)."""
    segs = segments_of(record, split.max_segment_chars)
    return Keys(
        exact="", prompt_sig=b"", response_sig=b"", instruction=None, instruction_sig=None, segments=segs,
        seg_char_sigs=[signature(char_ngrams(s, 3), split.num_perm) for s in segs],
        seg_word_sigs=[signature(set(tokens(s)), split.num_perm) for s in segs],
    )  # fmt: skip


def compute_keys(record: Record, dedup: DedupConfig, split: SplitConfig, instruction_dedup: bool) -> Keys:
    prompt, response = prompt_content(record), response_text(record)
    p_toks, r_toks = tokens(prompt), tokens(response)
    exact = hashlib.blake2b(
        (" ".join(p_toks) + "\x00" + " ".join(r_toks)).encode(), digest_size=12
    ).hexdigest()
    instr = instr_sig = None
    if instruction_dedup:
        instr = instruction_text(record)
        instr_sig = signature(set(tokens(instr)), dedup.num_perm)
    segs = segments_of(record, split.max_segment_chars)
    return Keys(
        exact=exact,
        prompt_sig=signature(word_ngrams(p_toks, dedup.ngram), dedup.num_perm),
        response_sig=signature(word_ngrams(r_toks, dedup.ngram), dedup.num_perm),
        instruction=instr,
        instruction_sig=instr_sig,
        segments=segs,
        seg_char_sigs=[signature(char_ngrams(s, 3), split.num_perm) for s in segs],
        seg_word_sigs=[signature(set(tokens(s)), split.num_perm) for s in segs],
    )


class Deduper:
    """Streaming dedup: `check` returns (duplicate_of, method, score) or None and indexes what it keeps."""

    def __init__(self, cfg: DedupConfig):
        from datasketch import MinHashLSH

        self.cfg = cfg
        self.exact: dict[str, str] = {}
        self.near = MinHashLSH(threshold=cfg.near_threshold, num_perm=cfg.num_perm)
        self.response_sigs: dict[str, bytes] = {}
        self.prompt_sigs: dict[str, bytes] = {}
        self.instr = MinHashLSH(threshold=cfg.instruction_candidates, num_perm=cfg.num_perm)
        self.instr_text: dict[str, str] = {}
        self.order: dict[str, int] = {}

    def check(self, rid: str, keys: Keys) -> tuple[str, str, float] | None:
        c = self.cfg
        if c.exact and keys.exact in self.exact:
            return self.exact[keys.exact], "exact", 1.0
        if c.near:
            cands = self.near.query(lean(keys.prompt_sig))
            best = None
            for cand in sorted(cands, key=self.order.__getitem__):
                jp = estimate(keys.prompt_sig, self.prompt_sigs[cand])
                jr = estimate(keys.response_sig, self.response_sigs[cand])
                if (
                    jp >= c.near_threshold
                    and jr >= c.near_threshold
                    and (best is None or min(jp, jr) > best[2])
                ):
                    best = (cand, "near_minhash", round(min(jp, jr), 4))
            if best:
                return best
        if keys.instruction is not None and keys.instruction_sig is not None:
            for cand in sorted(self.instr.query(lean(keys.instruction_sig)), key=self.order.__getitem__):
                score = rouge_l(keys.instruction, self.instr_text[cand])
                if score > c.instruction_rouge_l:
                    return cand, "instruction_rouge_l", round(score, 4)
        self._insert(rid, keys)
        return None

    def _insert(self, rid: str, keys: Keys) -> None:
        self.order[rid] = len(self.order)
        if self.cfg.exact:
            self.exact[keys.exact] = rid
        if self.cfg.near:
            self.near.insert(rid, lean(keys.prompt_sig))
            self.prompt_sigs[rid] = keys.prompt_sig
            self.response_sigs[rid] = keys.response_sig
        if keys.instruction is not None and keys.instruction_sig is not None:
            self.instr.insert(rid, lean(keys.instruction_sig))
            self.instr_text[rid] = keys.instruction


class Features:
    """A segment's shingles, computed once per comparison side."""

    __slots__ = ("bag", "char3", "text", "toks", "word3")

    def __init__(self, text: str):
        self.text = text
        self.char3 = char_ngrams(text, 3)
        self.toks = tokens(text)
        self.word3 = word_ngrams(self.toks, 3)
        self.bag = Counter(self.toks)


def similar(a: Features, b: Features, cfg: SplitConfig) -> float | None:
    """The first link measure between two segments that crosses its threshold, else None."""
    jc = jaccard(a.char3, b.char3)
    if jc >= cfg.link_char3:
        return jc
    jw = jaccard(a.word3, b.word3)
    if jw >= cfg.link_word3:
        return jw
    if a.toks and b.toks:
        # LCS <= the multiset overlap, so this F1 bounds ROUGE-L from above: most pairs stop here.
        bound = 2 * sum((a.bag & b.bag).values()) / (len(a.toks) + len(b.toks))
        if bound >= cfg.link_rouge_l:
            rl = rouge_l(a.text, b.text)
            if rl >= cfg.link_rouge_l:
                return rl
    return None


class BandIndex:
    """MinHash LSH banding for the similarity clusters, with compact buckets: a bucket is one int (the usual case)
    or a list of ints, where datasketch's MinHashLSH keeps a set per bucket and each band's bytes in two tables.
    With datasketch here a 10k-record bench build held 22.7 KB per kept record in all, with this 7.9 KB.
    Band keys are a 64-bit multiply-add of the band's hash values: a collision only adds a candidate, and every
    candidate is verified on the texts, so the clusters do not depend on it."""

    MULTIPLIERS = (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0x27D4EB2F165667C5)

    def __init__(self, num_perm: int, rows: int = 3):
        if not 1 <= rows <= len(self.MULTIPLIERS):
            raise ValueError(f"rows must be 1..{len(self.MULTIPLIERS)}")
        self.rows, self.bands = rows, num_perm // rows
        self.tables: list[dict[int, int | list[int]]] = [{} for _ in range(self.bands)]
        self.mult = np.array(self.MULTIPLIERS[:rows], dtype=np.uint64)

    def band_keys(self, sig: bytes) -> list[int]:
        values = np.frombuffer(sig, dtype=HASH_DTYPE)[: self.bands * self.rows].astype(np.uint64)
        with np.errstate(over="ignore"):  # wrapping 64-bit arithmetic is the point
            return (values.reshape(self.bands, self.rows) * self.mult).sum(axis=1, dtype=np.uint64).tolist()

    def query(self, sig: bytes) -> set[int]:
        found: set[int] = set()
        for table, key in zip(self.tables, self.band_keys(sig), strict=True):
            bucket = table.get(key)
            if isinstance(bucket, int):
                found.add(bucket)
            elif bucket is not None:
                found.update(bucket)
        return found

    def insert(self, sig: bytes, item: int) -> None:
        for table, key in zip(self.tables, self.band_keys(sig), strict=True):
            bucket = table.get(key)
            if bucket is None:
                table[key] = item
            elif isinstance(bucket, int):
                if bucket != item:
                    table[key] = [bucket, item]
            elif bucket[-1] != item:
                bucket.append(item)


class SigMatrix:
    """Signatures as rows of one growable uint32 matrix (384 bytes a row at 96 permutations, no per-object
    overhead), so a query's candidates are screened in one numpy comparison instead of a Python loop."""

    def __init__(self, num_perm: int):
        self.data = np.empty((1024, num_perm), dtype=HASH_DTYPE)
        self.n = 0

    def append(self, sig: bytes) -> int:
        if self.n == len(self.data):
            self.data = np.concatenate([self.data, np.empty_like(self.data)])
        self.data[self.n] = np.frombuffer(sig, dtype=HASH_DTYPE)
        self.n += 1
        return self.n - 1

    def estimates(self, rows: np.ndarray, sig: bytes) -> np.ndarray:
        return (self.data[rows] == np.frombuffer(sig, dtype=HASH_DTYPE)).mean(axis=1)


class Grouper:
    """Union-find over records whose segments are similar; candidates from two LSH indexes (character
    3-grams at a lower threshold than the link, word unigrams for ROUGE-L), screened by their MinHash estimates,
    every link verified on the texts. Records are numbered in arrival order (ordinals)."""

    def __init__(self, cfg: SplitConfig):
        self.cfg = cfg
        # Characters: 24 bands of 4 rows, a pair at Jaccard 0.5 is a candidate with probability 1 - (1 - 0.5^4)^24
        # = 0.79 (0.6: 0.96, 0.15: 0.012). Words: 32 bands of 3 rows, 0.5 → 0.986 (0.15: 0.10); short texts that
        # are similar share most words, so the word index carries the recall. CPU for clustering 60k bench
        # records: 11.0 s with 3 rows in both, 9.4 s with this, 3.9 s with 4 rows in both, but words at 4 rows
        # let a ROUGE-L 0.73 pair of the demo through (tests/training/test_data_leaks.py).
        self.by_char = BandIndex(cfg.num_perm, 4)
        self.by_word = BandIndex(cfg.num_perm, 3)
        self.char_sigs = SigMatrix(cfg.num_perm)
        self.word_sigs = SigMatrix(cfg.num_perm)
        self.ids: list[str] = []
        self.order: dict[str, int] = {}
        self.seg_rows: list[list[int]] = []  # ordinal → its rows in the signature matrices
        self.segments: list[list[str]] = []  # ordinal → its segment texts
        self.parent: list[int] = []
        self.links = 0

    def find(self, x: int) -> int:
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:  # path compression
            self.parent[x], x = root, self.parent[x]
        return root

    def root_of(self, rid: str) -> str:
        return self.ids[self.find(self.order[rid])]

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # The earlier record is the root, so cluster names do not depend on the arrival of later ones.
            ra, rb = min(ra, rb), max(ra, rb)
            self.parent[rb] = ra

    def candidates(self, keys: Keys) -> set[int]:
        found: set[int] = set()
        for cs, ws in zip(keys.seg_char_sigs, keys.seg_word_sigs, strict=True):
            found |= self.by_char.query(cs)
            found |= self.by_word.query(ws)
        return found

    def plausible(self, keys: Keys, cands: set[int]) -> list[int]:
        """Candidates whose MinHash estimates allow a link, in arrival order: 0.2 below the character threshold
        and 0.35 below the ROUGE-L one (ROUGE-L 0.7 needs most words shared) are 4 standard errors or more
        (0.051 at 96 permutations)."""
        if not cands:
            return []
        owners = [c for c in sorted(cands) for _ in self.seg_rows[c]]
        rows = np.fromiter(
            (r for c in sorted(cands) for r in self.seg_rows[c]), dtype=np.int64, count=len(owners)
        )
        ok = np.zeros(len(rows), dtype=bool)
        for cs, ws in zip(keys.seg_char_sigs, keys.seg_word_sigs, strict=True):
            ok |= self.char_sigs.estimates(rows, cs) >= self.cfg.link_char3 - 0.2
            ok |= self.word_sigs.estimates(rows, ws) >= self.cfg.link_rouge_l - 0.35
        return sorted({owners[i] for i in np.flatnonzero(ok)})

    def linked(self, feats: list[Features], other: int) -> bool:
        return any(similar(a, Features(b), self.cfg) is not None for b in self.segments[other] for a in feats)

    def add(self, rid: str, keys: Keys) -> None:
        ordinal = len(self.ids)
        self.order[rid] = ordinal
        self.ids.append(rid)
        self.parent.append(ordinal)
        feats: list[Features] | None = None
        for cand in self.plausible(keys, self.candidates(keys)):
            if self.find(cand) == self.find(ordinal):
                continue
            feats = feats or [Features(t) for t in keys.segments]
            if self.linked(feats, cand):
                self.union(ordinal, cand)
                self.links += 1
        self.segments.append(keys.segments)
        rows = []
        for cs, ws in zip(keys.seg_char_sigs, keys.seg_word_sigs, strict=True):
            rows.append(self.char_sigs.append(cs))
            self.word_sigs.append(ws)
            self.by_char.insert(cs, ordinal)
            self.by_word.insert(ws, ordinal)
        self.seg_rows.append(rows)

    def similar_to_any(self, keys: Keys, among: set[str]) -> str | None:
        """The first record of `among` that these segments are similar to (the augmentation leak guard)."""
        feats = [Features(t) for t in keys.segments]
        cands = {c for c in self.candidates(keys) if self.ids[c] in among}
        for cand in self.plausible(keys, cands):
            if self.linked(feats, cand):
                return self.ids[cand]
        return None
