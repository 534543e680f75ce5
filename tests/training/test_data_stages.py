"""Dedup, splits, augmentation and balance on small fixtures where the right answer is known."""

from __future__ import annotations

import json
import random

import pytest
from data_fixtures.helpers import build_sources, read_jsonl, records

from training.data.dedup import Features, SplitConfig, similar
from training.data.mixing import mixing_weights

WORDS = ["river", "stone", "lamp", "violet", "engine", "harbor", "pepper", "quiet", "ladder", "mirror", "saddle", "copper", "lantern", "meadow", "cobalt", "whistle", "orchard", "falcon", "timber", "velvet", "canyon", "ember", "glacier", "marble", "nectar", "quartz", "thistle", "walnut", "zephyr", "basil", "cedar", "dune", "fjord", "grove", "hazel", "iris", "juniper", "kelp", "lichen", "maple"]  # fmt: skip


def sentence(rng: random.Random, n: int = 12) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def write_alpaca(path, rows):
    path.write_text(
        "".join(json.dumps({"instruction": i, "input": x, "output": o}) + "\n" for i, x, o in rows)
    )


def test_exact_near_and_self_instruct_duplicates(tmp_path):
    rng = random.Random(0)
    answer = " ".join(sentence(rng, 15) for _ in range(3))
    words = answer.split()
    near = " ".join([*words[:-1], "zanzibar"])  # last of 45 words changed: 5-gram Jaccard 40/42
    rows = [
        ("Describe the harbor at dawn in detail.", "", answer),
        ("Describe the harbor at dawn in detail.", "", answer),  # exact
        (
            "Describe  the harbor at dawn in detail!",
            "",
            near,
        ),  # near: same prompt once normalized, answer 1 word off
        ("Write a poem about cats.", "", sentence(rng)),
        ("Write a poem about dogs.", "", sentence(rng)),  # Self-Instruct: ROUGE-L 0.8 with the cats one
        ("Explain how glaciers carve fjords.", "", sentence(rng)),
    ]
    write_alpaca(tmp_path / "a.jsonl", rows)
    m = build_sources(tmp_path / "o", [{"reader": "alpaca", "path": "a.jsonl", "instruction_dedup": True}],
                      base_dir=tmp_path, augment={"rephrase": False, "alpaca_variants": False})  # fmt: skip
    dups = {d["source"]["line"]: d for d in read_jsonl(tmp_path / "o" / "duplicates.jsonl")}
    kept = {r["source"]["line"]: r["id"] for r in records(tmp_path / "o")}
    assert set(kept) == {1, 4, 6}
    assert dups[2]["method"] == "exact" and dups[2]["duplicate_of"] == kept[1]
    assert (
        dups[3]["method"] == "near_minhash" and dups[3]["duplicate_of"] == kept[1] and dups[3]["score"] >= 0.7
    )
    assert dups[5]["method"] == "instruction_rouge_l" and dups[5]["duplicate_of"] == kept[4]
    assert dups[5]["score"] == pytest.approx(0.8)
    assert m["counts"]["by_stage"]["duplicates"] == {"exact": 1, "instruction_rouge_l": 1, "near_minhash": 1}


def test_self_instruct_rule_is_per_source_and_same_question_different_answer_is_kept(tmp_path):
    rows = [
        ("Write a poem about cats.", "", "Soft paws on the sill."),
        ("Write a poem about dogs.", "", "Wet nose, loud bark."),
    ]
    write_alpaca(tmp_path / "a.jsonl", rows)
    m = build_sources(tmp_path / "o", [{"reader": "alpaca", "path": "a.jsonl"}], base_dir=tmp_path)
    assert m["counts"]["duplicates"] == 0


def test_splits_are_stratified_deterministic_and_keep_clusters_together(tmp_path):
    rng = random.Random(1)
    rows = [(f"Question {i}: {sentence(rng, 8)}", "", sentence(rng)) for i in range(200)]
    base = rows[0][0]
    rows += [(base + f" Variant {k}.", "", sentence(rng)) for k in range(5)]  # a cluster of 6 similar prompts
    write_alpaca(tmp_path / "a.jsonl", rows)
    src = [{"reader": "alpaca", "path": "a.jsonl"}]
    opts = {"split": {"val_fraction": 0.1, "test_fraction": 0.1}, "augment": {"rephrase": False}}
    m = build_sources(tmp_path / "o", src, base_dir=tmp_path, **opts)
    by_split = m["counts"]["by_split"]
    assert sum(by_split.values()) == 205
    assert 15 <= by_split["val"] <= 27 and 15 <= by_split["test"] <= 27
    recs = records(tmp_path / "o")
    cluster = {r["meta"]["split"] for r in recs if r["messages"][0]["content"].startswith(base)}
    assert len(cluster) == 1
    m2 = build_sources(tmp_path / "o2", src, base_dir=tmp_path, **opts)
    assert (tmp_path / "o" / "test.jsonl").read_bytes() == (tmp_path / "o2" / "test.jsonl").read_bytes()
    m3 = build_sources(tmp_path / "o3", src, base_dir=tmp_path, seed=7, **opts)
    assert (tmp_path / "o" / "test.jsonl").read_bytes() != (tmp_path / "o3" / "test.jsonl").read_bytes()
    assert m2["counts"]["by_split"] == by_split and sum(m3["counts"]["by_split"].values()) == 205


def test_similarity_links():
    cfg = SplitConfig()
    assert similar(Features("a poem about cats"), Features("a poem about dogs"), cfg) is not None
    assert (
        similar(Features("How do I reset my voicemail PIN?"), Features("Where is the nearest store?"), cfg)
        is None
    )
    assert similar(Features("我的手机没有信号了"), Features("我的手机没有信号"), cfg) is not None


def _translation_seed(tmp_path, pairs):
    lines = [json.dumps({"id": f"t{i}", "src_lang": "en", "tgt_lang": "de", "source": s, "target": t, "split": sp})
             for i, (s, t, sp) in enumerate(pairs)]  # fmt: skip
    (tmp_path / "tr.jsonl").write_text("\n".join(lines) + "\n")


def test_augmentation_is_train_only_carries_origin_and_never_resembles_held_out(tmp_path):
    pairs = [
        ("Where is the nearest shop?", "Wo ist der nächste Laden?", "train"),
        ("My phone has no signal today.", "Mein Handy hat heute keinen Empfang.", "train"),
        ("I would like to pay my bill.", "Ich möchte meine Rechnung bezahlen.", "test"),
        # The German side of this train pair is the test pair's German: its flip would leak, so the cluster moves.
        ("I want to pay the bill.", "Ich möchte meine Rechnung bezahlen.", "train"),
    ]
    _translation_seed(tmp_path, pairs)
    m = build_sources(tmp_path / "o", [{"reader": "seed_translation", "path": "tr.jsonl"}], base_dir=tmp_path,
                      augment={"rephrase_fraction": 1.0})  # fmt: skip
    train = read_jsonl(tmp_path / "o" / "train.jsonl")
    derived = [r for r in train if r["origin_id"]]
    originals = {r["id"]: r for r in train if not r["origin_id"]}
    assert len(originals) == 2 and {d["origin_id"] for d in derived} == set(originals)
    kinds = sorted(d["meta"]["augmentation"] for d in derived)
    assert kinds == ["flip", "flip", "rephrase", "rephrase"]
    flip = next(d for d in derived if d["meta"]["augmentation"] == "flip")
    origin = originals[flip["origin_id"]]
    assert flip["messages"][-1]["content"] == origin["meta"]["fields"]["source"]
    assert flip["meta"]["src_lang"] == "de" and flip["messages"][0]["content"].startswith(
        "Translate the following German"
    )
    test = read_jsonl(tmp_path / "o" / "test.jsonl")
    assert len(test) == 2 and all(not r["origin_id"] for r in test)
    moved = next(r for r in test if r["meta"].get("split_pinned"))
    assert (
        moved["meta"]["split_pinned"] == "train"
        and moved["meta"]["fields"]["source"] == "I want to pay the bill."
    )
    assert m["counts"]["derived"] == 4 and m["counts"]["by_stage"]["split"]["moved_by_cluster"] == 1


def test_balance_caps_are_counted_as_rejections_and_weights_follow_t5(tmp_path):
    rng = random.Random(2)
    rows = [(f"Translate {sentence(rng, 6)}", "", sentence(rng)) for _ in range(30)]  # rule: translation
    rows += [(f"Tell me about {sentence(rng, 6)}", "", sentence(rng)) for _ in range(10)]  # general
    write_alpaca(tmp_path / "a.jsonl", rows)
    m = build_sources(tmp_path / "o", [{"reader": "alpaca", "path": "a.jsonl"}], base_dir=tmp_path,
                      split={"val_fraction": 0.0, "test_fraction": 0.0}, augment={"rephrase": False},
                      balance={"max_per_task": 20, "cap": 15, "temperature": 2.0})  # fmt: skip
    c = m["counts"]
    assert c["by_stage"]["rejected"]["balance"] == 10 and c["rejected"] == 10 and c["kept"] == 30
    assert c["by_stage"]["flow"] == {"inputs": 40, "after_read": 40, "after_validate": 40, "after_filter": 40,
                                     "after_dedup": 40, "after_balance": 30}  # fmt: skip
    reasons = [r["reason"] for r in read_jsonl(tmp_path / "o" / "rejected.jsonl")]
    assert reasons == ["over max_per_task=20 for task 'translation'"] * 10
    assert c["train_by_task_with_derived"] == {"general": 10, "translation": 20}
    assert m["mixing"] == {"weights": mixing_weights({"general": 10, "translation": 20}, 15, 2.0), "cap": 15,
                           "temperature": 2.0}  # fmt: skip
