"""Normalization, validation and the task templates, on exact strings."""

from __future__ import annotations

import pytest

from model.errors import UserError
from model.tasks import TASKS, TEMPLATES, content_text, render_instruction, render_messages
from training.data.normalize import normalize_text
from training.data.record import Message, Record, Source
from training.data.validate import guess_language, validate

PII = ("email", "phone", "url")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Cafe\u0301", "Café"),  # NFC composes
        ("zero\u200bwidth\ufeff and soft\u00adhyphen", "zerowidth and softhyphen"),
        ("bell\x07 and null\x00 removed\ttab kept", "bell and null removed\ttab kept"),
        ("line one<br>line two</p><p>three &amp; four&nbsp;five", "line one\nline two\nthree & four five"),
        ("keep a < b and <placeholder>", "keep a < b and <placeholder>"),
        ("  lead\r\nwin  dows   spaces  \r\n\r\n\r\n\r\nend  ", "lead\nwin dows spaces\n\nend"),
        ("def f():\n    return 1", "def f():\n    return 1"),  # indentation kept
        ("中文，标点。", "中文，标点。"),  # NFC leaves full-width punctuation alone (NFKC would not)
        ("nbsp\u00a0space", "nbsp space"),
    ],
)
def test_normalize_text(raw, expected):
    assert normalize_text(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("mail jane.doe+x@example.co.uk now", "mail [EMAIL] now"),
        ("see https://example.com/a?b=1. Then", "see [URL]. Then"),
        ("call +1 415 555 0199 or (415) 555-0199 or 415-555-0199", "call [PHONE] or [PHONE] or [PHONE]"),
        ("手机13812345678联系", "手机[PHONE]联系"),
        (
            "from 1990-2000, order 12345678, price 1,299.00, v2.3.4",
            "from 1990-2000, order 12345678, price 1,299.00, v2.3.4",
        ),
    ],
)
def test_pii_placeholders(raw, expected):
    assert normalize_text(raw, pii=PII) == expected


def _chat(*turns, task="general", meta=None):
    msgs = [Message(r, c) for r, c in turns]
    return Record("x", "chat", task, Source("f"), messages=msgs, meta=meta or {})


@pytest.mark.parametrize(
    ("turns", "reason"),
    [
        ([("user", "hi"), ("assistant", "hello")], None),
        ([("system", "s"), ("user", "hi"), ("assistant", "hello")], None),
        (
            [("assistant", "hello")],
            "messages[0]: expected role 'user', got 'assistant' (turns must alternate user/assistant)",
        ),
        (
            [("user", "hi"), ("system", "s"), ("assistant", "a")],
            "messages[1]: a system message may only come first",
        ),
        ([("user", "hi")], "the last turn is not an assistant turn (nothing to learn)"),
        ([("user", "hi"), ("assistant", " \n")], "messages[1] (assistant): empty content"),
        ([("system", "s")], "only a system message"),
        ([("user", "x" * 101), ("assistant", "a")], "messages[0] (user): 101 characters, over max_chars=100"),
    ],
)
def test_validate_structure(turns, reason):
    assert validate(_chat(*turns), max_chars=100, max_turns=4) == reason


def test_validate_turn_limit_and_text():
    turns = [("user", "q"), ("assistant", "a")] * 3
    assert validate(_chat(*turns), 100, 4) == "6 turns, over max_turns=4"
    assert validate(Record("x", "text", "general", Source("f"), text="  "), 100, 4) == "empty text"


def test_translation_language_of_each_side():
    def rec(src, tgt, source, target):
        meta = {"src_lang": src, "tgt_lang": tgt, "fields": {"source": source}}
        return _chat(("user", f"Translate: {source}"), ("assistant", target), task="translation", meta=meta)

    assert validate(rec("en", "zh", "Where is my order?", "我的订单在哪里？"), 1000, 4) is None
    assert (
        validate(rec("en", "zh", "Where is my order?", "Where is my order now?"), 1000, 4)
        == "target side: expected Chinese, found English"
    )
    assert (
        validate(
            rec("en", "de", "Where is the shop and is it open?", "The shop is open and it is near."), 1000, 4
        )
        == "target side: expected German, found English"
    )
    assert (
        validate(
            rec("de", "en", "Wo ist der Laden und ist er offen?", "Where is the shop and is it open?"),
            1000,
            4,
        )
        is None
    )
    assert validate(rec("en", "de", "OK", "OK"), 1000, 4) == "translation equals the source (untranslated)"
    assert guess_language("Kestrel") == "latin"


def test_task_templates_render_and_report_their_fields():
    assert set(t.task for t in TEMPLATES.values()) <= set(TASKS)
    text = render_instruction("translate", src_lang="en", tgt_lang="zh", source="Hello")
    assert text == "Translate the following English text into Chinese.\n\nHello"
    assert (
        render_instruction("article", 1, topic="5G", tone="calm", target_words=100, keywords=["a", "b"])
        == "Write a calm article (roughly 100 words) about 5G. Include: a, b."
    )
    msgs = render_messages("cs_answer", {"question": "Where?"}, response="Here.")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"]
    assert content_text("translate", {"src_lang": "en", "tgt_lang": "zh", "source": "Hello"}) == "Hello"
    for template in TEMPLATES.values():
        assert len(template.variants) >= 2, template.name  # augmentation needs rephrasings
    with pytest.raises(UserError, match="needs field 'source'"):
        render_instruction("translate", src_lang="en", tgt_lang="zh")
    with pytest.raises(UserError, match="unknown task template 'poem'"):
        render_instruction("poem")
    with pytest.raises(UserError, match="variants 0..2"):
        render_instruction("qa_open", 7, question="q")
