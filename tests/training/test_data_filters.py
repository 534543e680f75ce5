"""Each quality filter: a fixture that passes and one that fails at the default threshold."""

from __future__ import annotations

import pytest

from training.data.filters import FilterConfig, Filters, char_repetition, restates_question, word_repetition
from training.data.record import Message, Record, Source

PASSING_ANSWER = "Kestrels hover over open fields while they look for voles, mice and large insects to eat."


def chat(question: str, answer: str, **meta) -> Record:
    return Record("x", "chat", "general", Source("f"), messages=[Message("user", question), Message("assistant", answer)],
                  meta=meta)  # fmt: skip


def check(record: Record, **cfg) -> str | None:
    return Filters(FilterConfig(**cfg)).check(record)


def test_a_normal_record_passes_every_filter():
    assert check(chat("What do kestrels eat?", PASSING_ANSWER)) is None


@pytest.mark.parametrize(
    ("record", "other_filters_off", "needle"),
    [
        (chat("?", "!"), {}, "too few words"),
        (
            chat("Tell me everything.", "word " * 4_001),
            {"max_char_rep": 1.0, "max_word_rep": 1.0},
            "too many words",
        ),
        (chat("Write it", "x" * 40_001), {"max_words": 10**9, "max_char_rep": 1.0}, "too many bytes"),
        (
            chat("Laugh", "ha ha ha ha ha ha ha ha ha ha ha ha ha ha ha ha ha ha"),
            {},
            "character 10-gram repetition",
        ),
        (
            chat("Sing", " ".join(["la la la the song goes on and on"] * 6)),
            {"max_char_rep": 1.0},
            "word 10-gram repetition",
        ),
        (chat("Draw", "#### ==== **** //// ---- ++++ well"), {}, "special-character ratio"),
        (
            chat("What is the capital city of France?", "The capital city of France."),
            {},
            "restates the question",
        ),
    ],
)
def test_each_filter_fails_its_fixture_at_the_default_threshold(record, other_filters_off, needle):
    reason = check(record, **other_filters_off)
    assert reason is not None and needle in reason, reason


def test_alnum_ratio_fails_mostly_punctuation_and_space_but_not_cjk():
    record = chat("Say something", "!? ... -- ;; , , , ok")
    assert "alphanumeric ratio" in check(record, max_special_ratio=1.0)
    assert (
        check(chat("说点什么", "今天天气很好，我们去公园散步吧。")) is None
    )  # CJK characters count as letters


def test_repetition_ratios_follow_the_data_juicer_definition():
    assert char_repetition("abcdefghijk", 10) == 0.0
    assert char_repetition("aaaaaaaaaaaa", 10) == 1.0
    assert word_repetition(["a", "b", "c", "d", "a", "b", "c", "d"], 2) == pytest.approx(
        6 / 7
    )  # ab bc cd ab bc cd repeat, da not


def test_restate_is_judged_against_the_question_not_the_passage_and_skips_labels_and_short_answers():
    passage = {
        "template": "instruction_input",
        "fields": {"instruction": "When did it open?", "input": "It opened in 2000."},
    }
    assert (
        restates_question(
            chat("When did it open?\n\nIt opened in 2000.", "It opened in 2000.", **passage), 0.8
        )
        is None
    )
    assert restates_question(chat("Is it Oslo or Bergen?", "Oslo"), 0.8) is None
    intent = {"template": "cs_intent", "fields": {"text": "talk to a human agent", "labels": ["human_agent"]}}
    assert (
        restates_question(
            chat("labels: human_agent. Message: talk to a human agent", "human_agent", **intent), 0.8
        )
        is None
    )
    assert restates_question(chat("how are you doing today", "how are you doing"), 0.8) == 1.0


def test_token_length_only_with_a_named_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        [PASSING_ANSWER] * 10, trainers.BpeTrainer(vocab_size=60, special_tokens=["[UNK]"])
    )
    tok.save(str(tmp_path / "tokenizer.json"))
    record = chat("What do kestrels eat?", PASSING_ANSWER)
    assert check(record, max_tokens=5) is None  # no tokenizer named: no token filter
    reason = Filters(FilterConfig(tokenizer="tokenizer.json", max_tokens=5), str(tmp_path)).check(record)
    assert reason is not None and reason.startswith("too many tokens:")
    assert (
        Filters(FilterConfig(tokenizer="tokenizer.json", max_tokens=500), str(tmp_path)).check(record) is None
    )


def test_filter_settings_apply_per_build_in_one_process(tmp_path):
    from data_fixtures.helpers import build_sources

    (tmp_path / "a.jsonl").write_text(
        '{"instruction": "Say hi.", "input": "", "output": "Hi there, friend."}\n'
    )
    src = [{"reader": "alpaca", "path": "a.jsonl"}]
    assert build_sources(tmp_path / "o1", src, base_dir=tmp_path)["counts"]["kept"] == 1
    strict = build_sources(tmp_path / "o2", src, base_dir=tmp_path, filter={"min_words": 50})
    assert strict["counts"]["rejected"] == 1
