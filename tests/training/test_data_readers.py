"""Each reader on a fixture in its exact upstream schema: what it keeps, what it rejects and why, and where."""

from __future__ import annotations

import bz2
import shutil
import struct

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_fixtures.helpers import FIXTURES, build_sources, read_jsonl, records

from model.tasks import SYSTEM_PROMPTS, render_instruction


def _turns(rec):
    return [(m["role"], m["content"]) for m in rec["messages"]]


def _rejected(out):
    return {
        r["source"].get("line", r["source"].get("index", r["source"].get("row"))): r
        for r in read_jsonl(out / "rejected.jsonl")
    }


def test_alpaca_json_array_and_jsonl(tmp_path):
    m = build_sources(
        tmp_path / "a",
        [{"reader": "alpaca", "path": "alpaca.json"}, {"reader": "alpaca", "path": "alpaca.jsonl"}],
    )
    recs = records(tmp_path / "a")
    by_loc = {(r["meta"]["source_name"], r["source"].get("index", r["source"].get("line"))): r for r in recs}
    first = by_loc[("alpaca", 0)]
    assert _turns(first) == [
        ("user", "Give three tips for staying healthy."),
        ("assistant", "1. Eat a balanced diet.\n2. Exercise regularly.\n3. Get enough sleep."),
    ]
    assert first["source"] == {"file": "alpaca.json", "index": 0}
    with_input = by_loc[("alpaca", 1)]
    assert (
        with_input["messages"][0]["content"]
        == "Translate the sentence into French.\n\nWhere is the train station?"
    )
    assert with_input["task"] == "translation"  # by rule: the instruction says "Translate"
    rej = read_jsonl(tmp_path / "a" / "rejected.jsonl")
    assert len(rej) == 1 and rej[0]["source"] == {"file": "alpaca.json", "index": 2}
    assert "Expected `str`, got `int`" in rej[0]["reason"] and "output" in rej[0]["reason"]
    assert by_loc[("alpaca_1", 2)]["source"] == {"file": "alpaca.jsonl", "line": 2}
    assert m["counts"]["inputs"] == 5


def test_dolly_context_and_category_tasks(tmp_path):
    build_sources(tmp_path / "d", [{"reader": "dolly", "path": "dolly.jsonl"}])
    recs = {r["source"]["line"]: r for r in records(tmp_path / "d")}
    assert recs[1]["messages"][0]["content"].startswith(
        "When did Virgin Australia start operating?\n\nVirgin Australia"
    )
    assert recs[1]["task"] == "qa" and recs[1]["meta"]["category"] == "closed_qa"
    assert recs[2]["task"] == "content"
    assert recs[3]["task"] == "general"


def test_sharegpt_roles_and_unknown_speaker(tmp_path):
    build_sources(tmp_path / "s", [{"reader": "sharegpt", "path": "sharegpt.json"}])
    (rec,) = records(tmp_path / "s")
    assert _turns(rec) == [
        ("system", "You are a helpful assistant."),
        ("user", "What is the capital of Norway?"),
        ("assistant", "The capital of Norway is Oslo."),
        ("user", "And of Sweden?"),
        ("assistant", "Stockholm."),
    ]
    assert rec["task"] == "dialog" and rec["meta"]["sharegpt_id"] == "conv-1"
    (rej,) = read_jsonl(tmp_path / "s" / "rejected.jsonl")
    assert rej["source"] == {"file": "sharegpt.json", "index": 1}
    assert rej["reason"] == "sharegpt: unknown speaker 'robot' at conversations[1].from"


def test_openai_messages_structure_is_validated(tmp_path):
    build_sources(tmp_path / "m", [{"reader": "messages", "path": "messages.jsonl"}])
    (kept,) = records(tmp_path / "m")
    assert _turns(kept) == [("user", "Say hi in German."), ("assistant", "Hallo!")]
    rej = _rejected(tmp_path / "m")
    assert rej[2]["stage"] == "validate" and "expected role 'assistant', got 'user'" in rej[2]["reason"]
    assert rej[3]["reason"] == "messages[1] (assistant): empty content"
    assert rej[4]["stage"] == "read" and "narrator" in rej[4]["reason"]


def test_coqa_becomes_multi_turn_over_the_story(tmp_path):
    build_sources(tmp_path / "c", [{"reader": "coqa", "path": "coqa.json"}])
    (rec,) = records(tmp_path / "c")
    roles = [m["role"] for m in rec["messages"]]
    assert roles == ["user", "assistant", "user", "assistant"]
    assert rec["messages"][0]["content"].startswith(
        "Read the text and answer the question.\n\nOnce upon a time"
    )
    assert rec["messages"][0]["content"].endswith("Question: what color was cotton?")
    assert rec["messages"][1]["content"] == "white" and rec["messages"][3]["content"] == "in a barn"
    (rej,) = read_jsonl(tmp_path / "c" / "rejected.jsonl")
    assert rej["source"]["index"] == 1 and "turn_id [1]" in rej["reason"]


def test_triviaqa_and_nq_open(tmp_path):
    build_sources(
        tmp_path / "q",
        [{"reader": "triviaqa", "path": "triviaqa.json"}, {"reader": "nq_open", "path": "nq_open.jsonl"}],
    )
    recs = records(tmp_path / "q")
    assert {(r["messages"][0]["content"], r["messages"][1]["content"]) for r in recs} == {
        ("Which Lloyd Webber musical premiered in the US on 10th December 1993?", "Sunset Boulevard"),
        ("where is the world's largest ice sheet located today", "Antarctica"),
    }
    assert all(r["task"] == "qa" for r in recs)
    reasons = sorted(r["reason"] for r in read_jsonl(tmp_path / "q" / "rejected.jsonl"))
    assert reasons[0] == "nq_open: empty 'answer' list"
    assert "Question" in reasons[1] and "missing required field" in reasons[1]


def test_csv_with_crlf_quoted_newlines_and_tsv_extra_field(tmp_path):
    build_sources(
        tmp_path / "t",
        [
            {
                "reader": "csv",
                "path": "table.csv",
                "columns": {"instruction": "prompt", "output": "response"},
            },
            {"reader": "tsv", "path": "table.tsv", "columns": {"question": "question", "answer": "answer"}},
        ],
    )
    recs = records(tmp_path / "t")
    csv_recs = [r for r in recs if r["source"]["file"] == "table.csv"]
    assert [r["source"] for r in csv_recs] == [
        {"file": "table.csv", "line": 2, "row": 1},
        {"file": "table.csv", "line": 4, "row": 2},
    ]
    assert csv_recs[0]["messages"][1]["content"] == "Water vapour condenses into drops\nthat fall."
    tsv = [r for r in recs if r["source"]["file"] == "table.tsv"]
    assert len(tsv) == 1 and tsv[0]["messages"][1]["content"] == "Rome"
    (rej,) = read_jsonl(tmp_path / "t" / "rejected.jsonl")
    assert (
        rej["source"] == {"file": "table.tsv", "line": 3, "row": 2}
        and "more than the header" in rej["reason"]
    )


def test_parquet_rows(tmp_path):
    table = pa.table({"instruction": ["Say yes.", "Say no."], "output": ["Yes.", None], "lang": ["en", "en"]})
    pq.write_table(table, tmp_path / "rows.parquet")
    build_sources(
        tmp_path / "p",
        [
            {
                "reader": "parquet",
                "path": "rows.parquet",
                "columns": {"instruction": "instruction", "output": "output"},
            }
        ],
        base_dir=tmp_path,
    )
    (rec,) = records(tmp_path / "p")
    assert rec["source"] == {"file": "rows.parquet", "row": 1} and _turns(rec)[1] == ("assistant", "Yes.")
    (rej,) = read_jsonl(tmp_path / "p" / "rejected.jsonl")
    assert rej["source"]["row"] == 2 and "empty content" in rej["reason"]


def test_plain_text_paragraphs(tmp_path):
    build_sources(tmp_path / "x", [{"reader": "text", "path": "corpus.txt"}])
    recs = records(tmp_path / "x")
    assert [(r["kind"], r["source"]["line"]) for r in recs] == [("text", 1), ("text", 3), ("text", 6)]
    assert recs[2]["text"] == "A third paragraph\nspans two lines."


@pytest.mark.parametrize("compressed", [False, True])
def test_mediawiki_dump_plain_and_bz2(tmp_path, compressed):
    name = "wiki.xml.bz2" if compressed else "wiki.xml"
    data = (FIXTURES / "wiki.xml").read_bytes()
    (tmp_path / name).write_bytes(bz2.compress(data) if compressed else data)
    build_sources(tmp_path / "w", [{"reader": "mediawiki", "path": name}], base_dir=tmp_path)
    (rec,) = records(tmp_path / "w")
    assert rec["meta"]["title"] == "Kestrel"
    assert (
        rec["text"]
        == "The kestrel is a raptor in the falcon family.\n\nBehaviour\nKestrels hover over open ground."
    )
    reasons = [r["reason"] for r in read_jsonl(tmp_path / "w" / "rejected.jsonl")]
    assert reasons == [
        "redirect page 'Windhover'",
        "page 'Talk:Kestrel' is in namespace 1 (only articles, ns 0)",
    ]


def test_po_catalogue_pairs_placeholders_and_flags(tmp_path):
    m = build_sources(tmp_path / "po", [{"reader": "po", "path": "catalog.po"}])
    recs = {r["source"]["line"]: r for r in records(tmp_path / "po")}
    assert set(recs) == {9, 13, 26}
    assert recs[9]["messages"][0]["content"] == render_instruction(
        "translate", src_lang="en", tgt_lang="de", source="Save changes"
    )
    assert recs[9]["messages"][1]["content"] == "Änderungen speichern" and recs[9]["task"] == "translation"
    assert recs[13]["meta"]["fields"]["source"] == "Delete %(count)s files from your account?"
    assert recs[26]["meta"]["msgctxt"] == "menu"
    rej = _rejected(tmp_path / "po")
    assert rej[19]["reason"] == "fuzzy (unreviewed) translation"
    assert rej[22]["reason"] == "placeholders differ: source ['%d', '%s'] vs translation ['%d']"
    assert rej[29]["reason"] == "untranslated (empty msgstr)"
    assert "obsolete" in rej[32]["reason"]
    assert m["counts"]["by_source"]["po"]["skipped_headers"] == 1


def write_mo(path, entries, big_endian=False):
    """A GNU .mo catalogue: header (magic, revision 0, N, table offsets), two (length, offset) tables sorted by
    msgid, then the NUL-terminated strings."""
    entries = sorted(entries)
    order = ">" if big_endian else "<"
    n = len(entries)
    orig_at, trans_at = 28, 28 + 8 * n
    data_at = trans_at + 8 * n
    blob, otab, ttab = b"", [], []
    for key, value in entries:
        k, v = key.encode(), value.encode()
        otab.append((len(k), data_at + len(blob)))
        blob += k + b"\0"
        ttab.append((len(v), data_at + len(blob)))
        blob += v + b"\0"
    header = struct.pack(order + "7I", 0x950412DE, 0, n, orig_at, trans_at, 0, 0)
    tables = b"".join(struct.pack(order + "2I", *t) for t in otab + ttab)
    path.write_bytes(header + tables + blob)


@pytest.mark.parametrize("big_endian", [False, True])
def test_mo_catalogue(tmp_path, big_endian):
    write_mo(
        tmp_path / "de.mo",
        [
            ("", "Language: de\nContent-Type: text/plain; charset=UTF-8\n"),
            ("Good morning", "Guten Morgen"),
            ("menu\x04Quit", "Beenden"),
            ("%d file\x00%d files", "%d Datei\x00%d Dateien"),
            ("Send %s", "Senden"),
        ],
        big_endian,
    )
    build_sources(tmp_path / "mo", [{"reader": "mo", "path": "de.mo"}], base_dir=tmp_path)
    pairs = {r["meta"]["fields"]["source"]: r["messages"][1]["content"] for r in records(tmp_path / "mo")}
    assert pairs == {"Good morning": "Guten Morgen", "Quit": "Beenden", "%d file": "%d Datei"}
    (rej,) = read_jsonl(tmp_path / "mo" / "rejected.jsonl")
    assert rej["reason"].startswith("placeholders differ")


def test_mo_not_a_catalogue(tmp_path):
    (tmp_path / "x.mo").write_bytes(b"\x00" * 40)
    build_sources(tmp_path / "o", [{"reader": "mo", "path": "x.mo", "tgt_lang": "de"}], base_dir=tmp_path)
    (rej,) = read_jsonl(tmp_path / "o" / "rejected.jsonl")
    assert rej["reason"] == "not a .mo file (magic 0x00000000)" and rej["source"] == {"file": "x.mo"}


def test_chatterbot_and_chitchat_package_corpora(tmp_path):
    m = build_sources(
        tmp_path / "k",
        [{"reader": "chatterbot", "languages": ["english"]}, {"reader": "chitchat", "limit": 40}],
    )
    recs = records(tmp_path / "k")
    tech = [r for r in recs if r["source"]["file"].endswith("english/tech_support.yml")]
    assert tech and all(r["task"] == "customer_service" for r in tech)
    assert _turns(tech[0]) == [
        ("user", "My system is overheating."),
        ("assistant", "Ensure air vents aren't blocked and clean any dust."),
    ]
    chit = [r for r in recs if r["meta"]["source_name"] == "chitchat"]
    assert chit and all(r["task"] == "dialog" and r["messages"][-1]["role"] == "assistant" for r in chit)
    assert m["counts"]["by_source"]["chitchat"]["inputs"] == 40
    assert any(k.startswith("chatterbot_corpus/data/english/") for k in m["input_files"])


def test_chatterbot_fixture_yaml_keeps_strings(tmp_path):
    (tmp_path / "english").mkdir()
    (tmp_path / "english" / "mini.yml").write_text(
        "categories:\n- tech support\nconversations:\n- - yes\n  - 'no'\n  - why?\n- - only one\n",
        encoding="utf-8",
    )
    build_sources(tmp_path / "y", [{"reader": "chatterbot", "path": "."}], base_dir=tmp_path)
    (rec,) = records(tmp_path / "y")
    assert _turns(rec) == [("user", "yes"), ("assistant", "no")]  # BaseLoader: "yes" is text, not True
    (rej,) = read_jsonl(tmp_path / "y" / "rejected.jsonl")
    assert rej["source"] == {"file": "./english/mini.yml", "index": 1}


def test_seed_readers_keep_splits_and_render_task_templates(tmp_path):
    seed = tmp_path / "seed"
    seed.mkdir()
    (seed / "faq.jsonl").write_text(
        '{"id": "faq-1", "category": "plans", "question": "What plans exist?", '
        '"answer": "Go and Flex.", "paraphrases": ["Which plans do you sell?", "List your plans"]}\n'
    )
    (seed / "intent_labels.jsonl").write_text(
        '{"intent": "human_agent", "label_text": "wants a person", "description": "d", "handoff": true}\n'
        '{"intent": "billing_question", "label_text": "bill", "description": "d", "handoff": false}\n'
    )
    (seed / "intents.jsonl").write_text(
        '{"id": "i1", "text": "let me talk to a person", "intent": "human_agent", "split": "test"}\n'
        '{"id": "i2", "text": "hi", "intent": "weather", "split": "train"}\n'
    )
    (seed / "content.jsonl").write_text(
        '{"id": "c1", "kind": "story", "topic": "a lost phone", "keywords": ["bus", "rain"], '
        '"tone": "warm", "target_words": 120, "output": "It rained.", "split": "val"}\n'
    )
    shutil.copy(
        FIXTURES.parent.parent.parent / "data" / "seed" / "translation.jsonl", seed / "translation.jsonl"
    )
    m = build_sources(
        tmp_path / "o",
        [
            {"reader": "seed_faq", "path": "faq.jsonl"},
            {"reader": "seed_intents", "path": "intents.jsonl"},
            {"reader": "seed_content", "path": "content.jsonl"},
            {"reader": "seed_translation", "path": "translation.jsonl", "limit": 3},
        ],
        base_dir=seed,
    )
    recs = records(tmp_path / "o")
    faq = [r for r in recs if r["meta"]["source_name"] == "seed_faq"]
    assert [(r["meta"]["split"], r["messages"][1]["content"]) for r in faq] == [
        ("train", "What plans exist?"),
        ("test", "Which plans do you sell?"),
        ("test", "List your plans"),
    ]
    assert faq[0]["messages"][0] == {"role": "system", "content": SYSTEM_PROMPTS["customer_service"]}
    (intent,) = [r for r in recs if r["meta"]["source_name"] == "seed_intents"]
    assert intent["meta"]["split"] == "test" and intent["messages"][-1]["content"] == "human_agent"
    assert "human_agent, billing_question" in intent["messages"][0]["content"]
    (story,) = [r for r in recs if r["task"] == "content"]
    assert story["meta"]["split"] == "val" and "bus, rain" in story["messages"][0]["content"]
    assert m["counts"]["by_source"]["seed_translation"]["inputs"] == 3
    (rej,) = read_jsonl(tmp_path / "o" / "rejected.jsonl")
    assert "unknown intent 'weather'" in rej["reason"] and rej["source"]["line"] == 2
