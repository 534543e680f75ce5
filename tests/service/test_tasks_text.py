"""Guard masking (batch and streamed), sentence splitting (batch and incremental), language detection."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from service.tasks.guard import Guard, GuardConfig, StreamGuard
from service.tasks.text import (
    SentenceStream,
    detect_language,
    join_translations,
    keyword_hits,
    split_sentences,
    word_count,
)

SEED = Path(__file__).resolve().parents[2] / "data" / "seed"


def test_guard_masks_pii_and_blocked_terms_and_counts_them():
    g = Guard(GuardConfig(blocked_terms=["darn", "rip-off"], allow=["1-800-555-0142"]))
    r = g.apply(
        "Mail jane.doe@example.com or call +1 (555) 123-4567, not 1-800-555-0142. Darn rip-off! darned"
    )
    assert r.text == "Mail [email] or call [phone], not 1-800-555-0142. **** *******! darned"
    assert r.hits == {"email": 1, "phone": 1, "blocked_term": 2} and r.flagged
    clean = g.apply("Kestrel Go costs $15 a month since 2026; dial 611.")
    assert clean.text == "Kestrel Go costs $15 a month since 2026; dial 611." and not clean.flagged
    off = Guard(GuardConfig(enabled=False, blocked_terms=["darn"])).apply("darn a@b.co")
    assert off.text == "darn a@b.co" and not off.flagged


@pytest.mark.parametrize("seed", range(5))
def test_stream_guard_equals_batch_guard_for_any_chunking(seed):
    g = Guard(GuardConfig(blocked_terms=["darn"]))
    text = "Hi. Write to a.b@kestrel.example today! Call 030 1234 5678 now.\nDarn it. Bye 2 you."
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(text)), 12))
    pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    sg = StreamGuard(g)
    out = "".join(sg.feed(p) for p in pieces) + sg.flush()
    batch = g.apply(text)
    assert out == batch.text and sg.hits == batch.hits


def test_split_sentences_keeps_abbreviations_numbers_quotes_and_paragraphs():
    text = 'Dr. Smith paid $3.14 on Jan. 5! He said "Stop." Is that ok?\n\nNeu: Das ist z.B. gut. 你好。我的手机丢了！谢谢'
    segs = split_sentences(text)
    assert [s.text for s in segs] == [
        "Dr. Smith paid $3.14 on Jan. 5!",
        'He said "Stop."',
        "Is that ok?",
        "Neu: Das ist z.B. gut.",
        "你好。",
        "我的手机丢了！",
        "谢谢",
    ]
    assert [s.sep for s in segs][:3] == [" ", " ", "\n\n"]
    out = join_translations([s.text.upper() for s in segs], segs, "en")
    assert out.startswith('DR. SMITH PAID $3.14 ON JAN. 5! HE SAID "STOP." IS THAT OK?\n\nNEU:')
    assert join_translations(["甲。", "乙。"], split_sentences("A one. B two."), "zh") == "甲。乙。"
    assert split_sentences("   ") == []


@pytest.mark.parametrize("seed", range(5))
def test_sentence_stream_gives_the_batch_split_for_any_chunking(seed):
    text = (
        "Hello Dr. Smith. How are you? I paid 3.14 dollars today. 你好。我的手机丢了！Wo ist der Laden? Danke"
    )
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(text)), 15))
    stream = SentenceStream()
    got = []
    for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True):
        got += stream.feed(text[i:j])
    assert "Danke" not in got  # no terminator: waits for more text
    got += stream.flush()
    assert got == [s.text for s in split_sentences(text)]


def test_sentence_stream_holds_a_final_ascii_period_until_more_text():
    s = SentenceStream()
    assert s.feed("I paid 3.") == []  # could become 3.14
    assert s.feed("14 dollars. Next") == ["I paid 3.14 dollars."]
    assert s.feed("。") == ["Next。"]  # a full-width terminator is final at once
    assert s.feed(" tail") == [] and s.flush() == ["tail"]


def test_detect_language_on_every_seed_translation_source():
    rows = [json.loads(line) for line in (SEED / "translation.jsonl").read_text().splitlines()]
    wrong = [(r["id"], r["source"]) for r in rows if detect_language(r["source"]) != r["src_lang"]]
    assert wrong == []
    assert detect_language("1234 !!") is None


def test_word_count_and_keyword_hits():
    assert word_count("Two words") == 2
    assert word_count("你好 world") == 3
    assert keyword_hits("Roaming is cheap. Travel Pass!", ["roaming", "travel pass", "pass", "road"]) == [
        True,
        True,
        True,
        False,
    ]
    assert keyword_hits("passes", ["pass"]) == [False]
