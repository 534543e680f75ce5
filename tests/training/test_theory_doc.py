"""docs/theory.md names the function behind each formula as `module:function`; every one must exist."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "theory.md"
REF = re.compile(r"`([a-z_]+(?:\.[a-z_]+)+):([A-Za-z_][A-Za-z0-9_.]*)`")

# The topics issue 6 asks the guide to cover; each section must name at least one function.
TOPICS = [
    "Scaled dot-product attention",
    "Multi-head",
    "feed-forward",
    "RMSNorm",
    "Rotary",
    "Cross-entropy with masking",
    "AdamW",
    "Warmup and cosine",
    "Perplexity",
    "BLEU",
    "ROUGE",
]


def _sections() -> dict[str, str]:
    parts = re.split(r"^## ", DOC.read_text(encoding="utf-8"), flags=re.M)[1:]
    return {p.splitlines()[0]: p for p in parts}


def _refs(text: str) -> list[tuple[str, str]]:
    return REF.findall(text)


@pytest.mark.parametrize("module,name", sorted(set(_refs(DOC.read_text(encoding="utf-8")))))
def test_every_named_function_exists(module, name):
    obj = importlib.import_module(module)
    for part in name.split("."):
        assert hasattr(obj, part), f"docs/theory.md names {module}:{name}, which does not exist"
        obj = getattr(obj, part)
    assert callable(obj)


@pytest.mark.parametrize("topic", TOPICS)
def test_each_topic_has_a_section_naming_its_implementation(topic):
    matching = [body for title, body in _sections().items() if topic.lower() in title.lower()]
    assert matching, f"docs/theory.md has no section on {topic}"
    assert _refs(matching[0]), f"docs/theory.md section on {topic} names no function"


def test_the_pattern_finds_references_and_catches_a_wrong_one():
    refs = _refs("see `model.transformer:apply_rotary` and `training.evaluate:no_such_function`")
    assert refs == [("model.transformer", "apply_rotary"), ("training.evaluate", "no_such_function")]
    assert not hasattr(importlib.import_module("training.evaluate"), "no_such_function")
