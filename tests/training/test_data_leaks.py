"""No train record (derived ones included) is similar to a held-out record, measured here independently of the
pipeline's indexes: exhaustive candidate search by inverted index, then exact character 3-gram Jaccard and
ROUGE-L (rouge-score, CJK characters as tokens) between the records' content."""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from data_fixtures.helpers import build_sources, cached_demo, read_jsonl
from rouge_score import rouge_scorer

from model.tasks import content_text

CHAR3_LIMIT = 0.5
ROUGE_LIMIT = 0.7
TOKEN = re.compile(
    r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[^\W_\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+"
)


@pytest.fixture(scope="module")
def demo():
    return cached_demo()


class CJKTokenizer:
    def tokenize(self, text):
        return TOKEN.findall(text.lower())


def content(record) -> list[str]:
    """The data a model sees as its input (templates stripped), and for translation the output too, since a
    pair seen in one direction leaks the other; each cut to 600 characters as the pipeline compares."""
    meta = record["meta"]
    users = [m["content"] for m in record["messages"] if m["role"] == "user"]
    first = content_text(meta["template"], meta["fields"]) if meta.get("template") else users[0]
    parts = ["\n".join([first, *users[1:]])[:600]]
    if record["task"] == "translation":
        parts.append("\n".join(m["content"] for m in record["messages"] if m["role"] == "assistant")[:600])
    return [p for p in parts if p.strip()]


def char3(text):
    flat = " ".join(text.lower().split())
    return {flat[i : i + 3] for i in range(len(flat) - 2)} if len(flat) >= 3 else {flat}


def leaks(out: Path) -> list[tuple[str, str, str]]:
    train = [r for r in read_jsonl(out / "train.jsonl") if r["kind"] == "chat"]
    held = [r for name in ("val.jsonl", "test.jsonl") for r in read_jsonl(out / name) if r["kind"] == "chat"]
    segs = [(i, s) for i, r in enumerate(train) for s in content(r)]
    grams = [char3(s) for _, s in segs]
    toks = [CJKTokenizer().tokenize(s) for _, s in segs]
    by_gram, by_tok = defaultdict(set), defaultdict(set)
    for k, g in enumerate(grams):
        for x in g:
            by_gram[x].add(k)
        for t in set(toks[k]):
            by_tok[t].add(k)
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=CJKTokenizer())
    found = []
    for h in held:
        for seg in content(h):
            g, t = char3(seg), CJKTokenizer().tokenize(seg)
            shared = Counter(k for x in g for k in by_gram[x])
            for k, n in shared.items():
                # Exact Jaccard for every train segment sharing at least one 3-gram.
                if n / (len(g) + len(grams[k]) - n) >= CHAR3_LIMIT:
                    found.append(("char3", seg, segs[k][1]))
            common = Counter(k for x in set(t) for k in by_tok[x])
            bag = Counter(t)
            for k in common:
                # LCS <= multiset overlap: only pairs whose overlap F1 reaches the limit can have ROUGE-L that high.
                overlap = sum((bag & Counter(toks[k])).values())
                if t and 2 * overlap / (len(t) + len(toks[k])) >= ROUGE_LIMIT:
                    score = scorer.score(seg, segs[k][1])["rougeL"].fmeasure
                    if score >= ROUGE_LIMIT:
                        found.append((f"rougeL {score:.2f}", seg, segs[k][1]))
    return found


def test_no_train_record_is_similar_to_a_held_out_record(demo):
    out, manifest = demo
    assert manifest["counts"]["derived"] > 0, "the check must cover derived records"
    found = leaks(out)
    assert not found, f"{len(found)} held-out/train pairs are similar, e.g. {found[:3]}"


def test_the_leak_check_finds_leaks_when_clusters_are_not_kept_together(tmp_path):
    """The check above can fail: with the similarity links switched off, paraphrased seed items leak."""
    seed = tmp_path / "seed"
    seed.mkdir()
    rows = [
        ("t1", "How do I reset my voicemail PIN?", "train"),
        ("t2", "How do I reset my voicemail PIN please?", "test"),
        ("t3", "Where can I pay my bill in a store?", "train"),
        ("t4", "Where can I pay my bill in the store?", "test"),
    ]
    (seed / "intents.jsonl").write_text(
        "".join(f'{{"id": "{i}", "text": "{t}", "intent": "x", "split": "{s}"}}\n' for i, t, s in rows)
    )
    (seed / "intent_labels.jsonl").write_text(
        '{"intent": "x", "label_text": "x", "description": "x", "handoff": false}\n'
    )
    source = [{"reader": "seed_intents", "path": "intents.jsonl"}]
    off = {"link_char3": 1.0, "link_word3": 1.0, "link_rouge_l": 1.0}
    build_sources(tmp_path / "off", source, base_dir=seed, split=off, dedup={"near": False})
    assert len(leaks(tmp_path / "off")) >= 2
    m = build_sources(tmp_path / "on", source, base_dir=seed, dedup={"near": False})
    assert leaks(tmp_path / "on") == []
    assert (
        m["counts"]["by_split"] == {"test": 4} and m["counts"]["by_stage"]["split"]["moved_by_cluster"] == 2
    )
