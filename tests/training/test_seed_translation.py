"""Checks on data/seed/translation.jsonl, the hand-written en<->zh and en<->de pairs (issue 3, item 6)."""

import collections
import json
import pathlib
import re
import unicodedata

import pytest

SEED = pathlib.Path(__file__).resolve().parents[2] / "data" / "seed" / "translation.jsonl"
DIRECTIONS = [("en", "zh"), ("zh", "en"), ("en", "de"), ("de", "en")]
KEYS = {"id", "src_lang", "tgt_lang", "source", "target", "split"}
# Issue 3 asks for at least 150 per direction; the brief for this file asks 160 with 20 held out.
MIN_PER_DIRECTION = 160
TEST_PER_DIRECTION = 20

CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
# printf-style (%s, %d, %(name)s) and brace-style ({name}) placeholders must survive translation verbatim.
PLACEHOLDER = re.compile(r"%\([a-z_]+\)[sd]|%[sd]|\{[a-z_]*\}")
# Frequent characters whose Traditional form differs from the Simplified one: any of them means the
# zh side was not written in Simplified Chinese.
TRADITIONAL = set(
    "們這說對會為來時國機號碼費務請問電話買賣開關還點東車長門間後體網絡訂單貨銀個與過發現實種價錢帳戶氣樣麼嗎沒讓謝題換從應該經給幫辦語級變"
)
# ASCII spellings of German words that need an umlaut or ß.
GERMAN_ASCII = re.compile(
    r"\b(fuer|ueber|koennen|koennte|moechte|moechten|muessen|waere|wuerde|gruesse|strasse|schoen|"
    r"spaet|frueh|aendern|geraet|zurueck|gebuehr|persoenlich)\b",
    re.IGNORECASE,
)


def _load() -> list[dict]:
    rows = []
    for lineno, line in enumerate(SEED.read_text(encoding="utf-8").splitlines(), 1):
        assert line.strip(), f"{SEED.name}:{lineno}: blank line"
        rows.append(json.loads(line))
    return rows


ROWS = _load()


def _by_direction(src: str, tgt: str) -> list[dict]:
    return [r for r in ROWS if r["src_lang"] == src and r["tgt_lang"] == tgt]


def _norm(text: str) -> str:
    """Case-, punctuation- and width-insensitive form used to compare sentences."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(ch for ch in text if not unicodedata.category(ch).startswith(("P", "S")))
    return " ".join(text.split())


def _units(text: str, lang: str) -> int:
    """Words for en/de, characters (CJK and Latin letters/digits) for zh."""
    if lang == "zh":
        return sum(1 for ch in text if CJK.match(ch) or ch.isalnum())
    return len(text.split())


def test_seed_translation_file_is_utf8_jsonl_with_exact_keys():
    raw = SEED.read_bytes()
    assert not raw.startswith(b"\xef\xbb\xbf"), "BOM at the start of translation.jsonl"
    assert b"\r" not in raw, "CRLF line ends in translation.jsonl"
    assert raw.endswith(b"\n")
    for i, row in enumerate(ROWS, 1):
        assert set(row) == KEYS, f"line {i}: keys {sorted(row)}"
        assert (row["src_lang"], row["tgt_lang"]) in DIRECTIONS, (
            f"line {i}: {row['src_lang']}->{row['tgt_lang']}"
        )
        assert row["split"] in {"train", "test"}, f"line {i}: split {row['split']!r}"
        assert isinstance(row["source"], str) and row["source"].strip() == row["source"] != ""
        assert isinstance(row["target"], str) and row["target"].strip() == row["target"] != ""


def test_seed_translation_ids_unique_and_match_direction():
    ids = [r["id"] for r in ROWS]
    dupes = [i for i, c in collections.Counter(ids).items() if c > 1]
    assert not dupes, f"duplicate ids: {dupes}"
    for r in ROWS:
        assert re.fullmatch(rf"tr-{r['src_lang']}-{r['tgt_lang']}-\d{{4}}", r["id"]), r["id"]


@pytest.mark.parametrize(("src", "tgt"), DIRECTIONS)
def test_seed_translation_counts_per_direction_and_split(src, tgt):
    rows = _by_direction(src, tgt)
    splits = collections.Counter(r["split"] for r in rows)
    assert len(rows) >= MIN_PER_DIRECTION, f"{src}->{tgt}: {len(rows)} pairs"
    assert splits["test"] == TEST_PER_DIRECTION, f"{src}->{tgt}: {splits['test']} test pairs"


@pytest.mark.parametrize(("src", "tgt"), DIRECTIONS)
def test_seed_translation_script_of_each_side(src, tgt):
    for r in _by_direction(src, tgt):
        for lang, text in ((src, r["source"]), (tgt, r["target"])):
            if lang == "zh":
                assert CJK.search(text), f"{r['id']}: zh side without CJK: {text!r}"
                assert not TRADITIONAL & set(text), (
                    f"{r['id']}: Traditional characters {TRADITIONAL & set(text)}"
                )
                # Sentence punctuation is full-width in Chinese; ASCII ',' '?' '!' ';' never belong there.
                assert not re.search(r"[,?!;]", text), f"{r['id']}: ASCII punctuation in zh: {text!r}"
                assert not re.search(rf"{CJK.pattern}\.", text), f"{r['id']}: ASCII full stop in zh: {text!r}"
            else:
                assert not CJK.search(text), f"{r['id']}: CJK characters on the {lang} side: {text!r}"
                assert not re.search(r"[，。？！：；]", text), f"{r['id']}: full-width punctuation: {text!r}"
            if lang == "de":
                assert not GERMAN_ASCII.search(text), f"{r['id']}: umlaut or ß spelled in ASCII: {text!r}"


def test_seed_translation_german_uses_umlauts_and_eszett():
    german = " ".join(
        r["source"] if r["src_lang"] == "de" else r["target"]
        for r in ROWS
        if "de" in (r["src_lang"], r["tgt_lang"])
    )
    for ch in "äöüß":
        assert ch in german, f"no {ch!r} anywhere on the German side"


@pytest.mark.parametrize(("src", "tgt"), DIRECTIONS)
def test_seed_translation_lengths(src, tgt):
    # Sources: 4-30 words or 6-45 Chinese characters, 1-2 sentences; targets get some slack for expansion.
    for r in _by_direction(src, tgt):
        n = _units(r["source"], src)
        lo, hi = (6, 45) if src == "zh" else (4, 30)
        assert lo <= n <= hi, f"{r['id']}: source has {n} units"
        sentences = re.findall(r"[.?!。？！](?=\s|$|[”\"])", r["source"])
        assert 1 <= max(len(sentences), 1) <= 2, f"{r['id']}: {len(sentences)} sentences in source"
        m = _units(r["target"], tgt)
        lo, hi = (4, 60) if tgt == "zh" else (3, 40)
        assert lo <= m <= hi, f"{r['id']}: target has {m} units"


def test_seed_translation_placeholders_identical_on_both_sides():
    with_placeholders = 0
    for r in ROWS:
        src_ph = sorted(PLACEHOLDER.findall(r["source"]))
        assert src_ph == sorted(PLACEHOLDER.findall(r["target"])), f"{r['id']}: placeholders differ"
        with_placeholders += bool(src_ph)
    # The brief asks for "a few" in every direction so the model learns to copy them.
    for src, tgt in DIRECTIONS:
        n = sum(bool(PLACEHOLDER.search(r["source"])) for r in _by_direction(src, tgt))
        assert n >= 3, f"{src}->{tgt}: only {n} pairs with placeholders"
    assert with_placeholders >= 12


@pytest.mark.parametrize(("src", "tgt"), DIRECTIONS)
def test_seed_translation_no_duplicate_sources(src, tgt):
    norms = collections.Counter(_norm(r["source"]) for r in _by_direction(src, tgt))
    dupes = [s for s, c in norms.items() if c > 1]
    assert not dupes, f"{src}->{tgt}: duplicate sources {dupes[:3]}"


@pytest.mark.parametrize(("src", "tgt"), DIRECTIONS)
def test_seed_translation_test_split_is_not_a_copy_of_train(src, tgt):
    rows = _by_direction(src, tgt)
    train = {_norm(r["source"]) for r in rows if r["split"] == "train"}
    # Digits removed as well, so a test sentence that only changes a number still counts as a copy.
    train_nodigits = {re.sub(r"\d+", "", s) for s in train}
    for r in rows:
        if r["split"] == "test":
            assert _norm(r["source"]) not in train, f"{r['id']} equals a train source"
            assert re.sub(r"\d+", "", _norm(r["source"])) not in train_nodigits, (
                f"{r['id']} differs only in numbers"
            )


@pytest.mark.parametrize(("a", "b"), [("en", "zh"), ("en", "de")])
def test_seed_translation_reverse_direction_is_not_flipped(a, b):
    """zh->en sources are written in Chinese, not the en->zh targets turned around (same for de)."""
    forward_targets = {_norm(r["target"]) for r in _by_direction(a, b)}
    reverse_sources = {_norm(r["source"]) for r in _by_direction(b, a)}
    flipped = forward_targets & reverse_sources
    assert not flipped, f"{b}->{a} sources copied from {a}->{b} targets: {sorted(flipped)[:3]}"


def test_seed_translation_test_sentences_never_seen_in_train():
    """A held-out sentence must not reach training through another direction (as source or target)."""
    train = {_norm(r[k]) for r in ROWS if r["split"] == "train" for k in ("source", "target")}
    for r in ROWS:
        if r["split"] == "test":
            for k in ("source", "target"):
                assert _norm(r[k]) not in train, f"{r['id']}: {k} appears in a train pair"


def _features(text: str, lang: str) -> set[str]:
    """Word set for en/de, character bigrams for zh (no word boundaries there)."""
    text = _norm(text)
    if lang == "zh":
        text = text.replace(" ", "")
        return {text[i : i + 2] for i in range(len(text) - 1)}
    return set(text.split())


@pytest.mark.parametrize(("src", "tgt"), DIRECTIONS)
def test_seed_translation_test_sources_not_near_copies_of_train(src, tgt):
    # Highest Jaccard similarity of any test source to its closest train source was 0.46 when the file was
    # written (a shared "Hello {name}, your ... has been ..." frame); 0.6 flags a light edit of a train item.
    rows = _by_direction(src, tgt)
    train = [(r["source"], _features(r["source"], src)) for r in rows if r["split"] == "train"]
    for r in rows:
        if r["split"] != "test":
            continue
        f = _features(r["source"], src)
        sim, closest = max((len(f & g) / len(f | g), s) for s, g in train)
        assert sim < 0.6, f"{r['id']} is a near-copy ({sim:.2f}) of train source {closest!r}"
