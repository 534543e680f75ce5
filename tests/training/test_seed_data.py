"""Checks on the hand-written seed data in data/seed/: the Kestrel FAQ knowledge base and the intent examples.

These files are data, not code, so the checks are about shape and about the held-out items staying held out:
a paraphrase or test utterance that is a light edit of a training item would make retrieval and intent
scores meaningless.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

SEED = Path(__file__).resolve().parents[2] / "data" / "seed"

FAQ_KEYS = {"id", "category", "question", "answer", "paraphrases"}
LABEL_KEYS = {"intent", "label_text", "description", "handoff"}
INTENT_KEYS = {"id", "text", "intent", "split"}
SPLIT_COUNTS = {"train": 15, "val": 4, "test": 6}
# The intents the customer-service task is built around (issue 3 and the seed brief).
REQUIRED_INTENTS = {
    "human_agent",
    "complaint",
    "cancel_service",
    "lost_or_stolen",
    "roaming",
    "plan_change",
    "device_upgrade",
    "network_problem",
    "activation_sim",
    "refund_return",
    "order_status",
    "password_account",
    "store_info",
    "billing_question",
}

# Function words ignored when comparing wordings; what is left carries the meaning.
# fmt: off
_STOP = frozenset({
    "a", "an", "the", "i", "my", "me", "you", "your", "is", "are", "do", "does", "can", "could", "how",
    "what", "when", "where", "why", "to", "of", "for", "in", "on", "at", "it", "and", "or", "be", "with",
    "if", "im", "ive", "will", "am", "from", "this", "that", "there", "any", "get", "which", "who", "we",
    "us", "our",
})
# fmt: on
# Word-set Jaccard at or above this marks a near-duplicate. The seed files peak at 0.5 for short utterances
# that share only function-like words ("i want to question a charge" vs "i want to make a complaint"); a
# light edit of a 6-word sentence (one word swapped) scores 0.71.
NEAR_DUPLICATE = 0.6
# Paraphrases are meant to share few content words with their question; the seed file peaks at 0.25.
PARAPHRASE_MAX_OVERLAP = 0.5


def _read_jsonl(name: str) -> list[dict]:
    path = SEED / name
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n"), f"{path}: last line has no newline"
    rows = []
    for lineno, line in enumerate(text[:-1].split("\n"), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            pytest.fail(f"{path}:{lineno}: not valid JSON ({exc})")
        if not isinstance(row, dict):
            pytest.fail(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def _normalize(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower().replace("'", "")))


def _words(text: str) -> set[str]:
    return set(_normalize(text).split())


def _content_words(text: str) -> set[str]:
    return _words(text) - _STOP


def _jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def _sentences(text: str) -> int:
    # A sentence ends at . ! or ? followed by a space or the end; "kestrelmobile.example" and "$0.10" don't.
    return len(re.findall(r"[.!?](?=\s|$)", text.strip()))


@pytest.fixture(scope="module")
def faq() -> list[dict]:
    return _read_jsonl("faq.jsonl")


@pytest.fixture(scope="module")
def labels() -> list[dict]:
    return _read_jsonl("intent_labels.jsonl")


@pytest.fixture(scope="module")
def intents() -> list[dict]:
    return _read_jsonl("intents.jsonl")


def test_seed_faq_entries_have_fields_and_unique_ids(faq):
    assert len(faq) >= 64
    for row in faq:
        assert set(row) == FAQ_KEYS, row.get("id")
        for key in ("id", "category", "question", "answer"):
            assert isinstance(row[key], str) and row[key].strip() == row[key] and row[key], (row["id"], key)
        assert re.fullmatch(r"faq-\d{3}", row["id"]), row["id"]
        assert re.fullmatch(r"[a-z_]+", row["category"]), (row["id"], row["category"])
        assert 1 <= _sentences(row["answer"]) <= 4, (row["id"], row["answer"])
    ids = Counter(row["id"] for row in faq)
    assert not [i for i, n in ids.items() if n > 1]
    # Several entries per category, so retrieval evaluation is not dominated by one topic.
    assert len({row["category"] for row in faq}) >= 10


def test_seed_faq_has_two_paraphrases_worded_differently(faq):
    for row in faq:
        paraphrases = row["paraphrases"]
        assert isinstance(paraphrases, list) and len(paraphrases) == 2, row["id"]
        question = _normalize(row["question"])
        first, second = (_normalize(p) for p in paraphrases)
        assert all(isinstance(p, str) and p.strip() for p in paraphrases), row["id"]
        assert question not in (first, second), row["id"]
        assert first != second, row["id"]
        for p in paraphrases:
            overlap = _jaccard(_content_words(row["question"]), _content_words(p))
            assert overlap < PARAPHRASE_MAX_OVERLAP, (row["id"], p, round(overlap, 2))


def test_seed_faq_questions_and_paraphrases_are_unique_across_entries(faq):
    # A paraphrase equal to another entry's question would make its retrieval target ambiguous.
    owner: dict[str, str] = {}
    for row in faq:
        for text in (row["question"], *row["paraphrases"]):
            key = _normalize(text)
            assert key not in owner, (text, owner.get(key), row["id"])
            owner[key] = row["id"]


def test_seed_faq_prices_and_phone_numbers_come_from_company_page(faq):
    company = (SEED / "company.md").read_text(encoding="utf-8")
    amounts = set(re.findall(r"\$\d+(?:\.\d+)?", company))
    phones = set(re.findall(r"\b1-800-555-\d{4}\b|\b611\b", company))
    assert amounts and phones
    for row in faq:
        for amount in re.findall(r"\$\d+(?:\.\d+)?", row["answer"]):
            assert amount in amounts, (row["id"], amount)
        for phone in re.findall(r"\b1-800-\d{3}-\d{4}\b|\b611\b", row["answer"]):
            assert phone in phones, (row["id"], phone)


def test_seed_intents_labels_cover_required_intents(labels):
    assert len(labels) >= 12
    for row in labels:
        assert set(row) == LABEL_KEYS, row
        assert re.fullmatch(r"[a-z_]+", row["intent"]), row["intent"]
        assert isinstance(row["handoff"], bool), row["intent"]
        assert row["label_text"].strip() and row["description"].strip(), row["intent"]
    names = [row["intent"] for row in labels]
    assert len(names) == len(set(names))
    assert set(names) >= REQUIRED_INTENTS, REQUIRED_INTENTS - set(names)
    handoff = {row["intent"]: row["handoff"] for row in labels}
    assert handoff["human_agent"] is True
    # label_text is what a zero-shot scorer compares against, so two intents must not share one.
    assert len({_normalize(row["label_text"]) for row in labels}) == len(labels)


def test_seed_intents_rows_have_fields_and_known_intents(intents, labels):
    known = {row["intent"] for row in labels}
    for row in intents:
        assert set(row) == INTENT_KEYS, row.get("id")
        assert re.fullmatch(r"int-\d{4}", row["id"]), row["id"]
        assert row["intent"] in known, (row["id"], row["intent"])
        assert row["split"] in SPLIT_COUNTS, (row["id"], row["split"])
        assert isinstance(row["text"], str) and row["text"].strip() == row["text"] and row["text"], row["id"]
    ids = Counter(row["id"] for row in intents)
    assert not [i for i, n in ids.items() if n > 1]


def test_seed_intents_split_counts_per_intent(intents, labels):
    counts = Counter((row["intent"], row["split"]) for row in intents)
    for label in labels:
        for split, expected in SPLIT_COUNTS.items():
            assert counts[(label["intent"], split)] == expected, (label["intent"], split)


def test_seed_intents_no_duplicates_anywhere(intents):
    # Case- and punctuation-insensitive: "Lost phone" and "lost phone!" are one utterance.
    seen: dict[str, str] = {}
    for row in intents:
        key = _normalize(row["text"])
        assert key not in seen, (row["id"], seen.get(key), row["text"])
        seen[key] = row["id"]


def test_seed_intents_test_utterances_are_not_light_edits_of_train(intents):
    train = [(row["id"], _words(row["text"])) for row in intents if row["split"] == "train"]
    for row in intents:
        if row["split"] == "train":
            continue
        words = _words(row["text"])
        closest_id, closest = max(((i, _jaccard(words, w)) for i, w in train), key=lambda item: item[1])
        assert closest < NEAR_DUPLICATE, (row["id"], row["text"], closest_id, round(closest, 2))


def test_seed_intents_near_duplicate_check_catches_a_light_edit():
    # The threshold above has to flag the kind of edit it exists for, or the previous test proves nothing.
    original = _words("how long does it take to port my number")
    edited = _words("how long will it take to port my number")
    unrelated = _words("I want to question a charge")
    assert _jaccard(original, edited) >= NEAR_DUPLICATE
    assert _jaccard(original, unrelated) < NEAR_DUPLICATE
