"""The report's diversity heuristic and the task-label rules, on exact strings."""

from __future__ import annotations

import pytest

from training.data.label import label_task, rule_task
from training.data.record import Message, Record, Source
from training.data.report import diversity, verb_object


@pytest.mark.parametrize(
    ("instruction", "expected"),
    [
        ("Write a poem about cats.", ("write", "poem")),
        ("Please translate this sentence.", ("translate", "sentence")),
        ("Can you list three colours?", ("list", "colours")),
        ("How do I reset my PIN?", ("how?", "")),
        ("I think so", None),  # a statement, not an instruction
        ("请写一首关于猫的诗", ("写", "猫")),  # jieba POS: first verb after the politeness word, then a noun
    ],
)
def test_root_verb_and_object(instruction, expected):
    assert verb_object(instruction) == expected


def test_diversity_counts_pairs():
    counts = diversity(["Write a poem about cats.", "Write a poem about dogs.", "Write an essay.", "hello"])
    assert counts == {("write", "poem"): 2, ("write", "essay"): 1}


def _chat(*users, template=None):
    msgs = []
    for u in users:
        msgs += [Message("user", u), Message("assistant", "ok")]
    return Record(
        "x", "chat", "general", Source("f"), messages=msgs, meta={"template": template} if template else {}
    )


@pytest.mark.parametrize(
    ("record", "task"),
    [
        (_chat("Translate this into French: good night"), "translation"),
        (_chat("把这句话翻译成英文"), "translation"),
        (_chat("Write a short story about a lighthouse keeper."), "content"),
        (_chat("hi", "how are you?"), "dialog"),
        (_chat("What is the boiling point of water?"), "general"),
        (_chat("anything", template="qa_open"), "qa"),
    ],
)
def test_task_rules(record, task):
    assert rule_task(record) == task


def test_source_mapping_wins_over_reader_and_rules():
    record = _chat("Translate this")
    assert label_task(record, "qa", "content") == ("qa", "source")
    assert label_task(record, "", "content") == ("content", "reader")
    assert label_task(record, "", None) == ("translation", "rule")
