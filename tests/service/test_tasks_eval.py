"""`instructlm eval --tasks`: intent / retrieval / translation / content metrics next to their baselines, in the
same report; the metric helpers against hand-computed values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from instructlm.cli import main
from service.tasks.customer_service import Calibration
from service.tasks.evaluate import macro_f1, nearest_neighbour
from service.tasks.retrieval import KnowledgeBase
from tests.service.tasks_fixtures import build_long_checkpoint

SEED = Path(__file__).resolve().parents[2] / "data" / "seed"


@pytest.fixture(scope="module")
def long_checkpoint(tmp_path_factory, tiny_tokenizer, torch_threads):
    return build_long_checkpoint(tmp_path_factory, tiny_tokenizer)


def test_macro_f1_by_hand():
    # a: TP 1, FN 1 -> 2/3; b: TP 1, FP 2 -> 1/2; c: FN 1 -> 0; d: absent and never predicted -> left out.
    got = macro_f1(["a", "a", "b", "c"], ["a", "b", "b", "b"], ["a", "b", "c", "d"])
    assert got == pytest.approx((2 / 3 + 1 / 2 + 0) / 3, abs=1e-12)
    assert macro_f1(["x", "y"], ["x", "y"], ["x", "y"]) == 1.0


def test_nearest_neighbour_baseline():
    train = [("reset my password", "account"), ("roaming prices abroad", "roaming"), ("store hours", "store")]
    assert nearest_neighbour(train, ["password reset please", "prices for roaming in spain", "zzz"]) == [
        "account",
        "roaming",
        "account",  # no shared token: every similarity is 0, the first train utterance wins
    ]


def test_eval_tasks_cli_writes_task_metrics_into_the_report(long_checkpoint, tmp_path, capsys):
    from training.data.record import ENCODER, Record, Source

    ds = tmp_path / "dataset"
    ds.mkdir()
    rec = Record(
        id="g-0", kind="text", task="general", source=Source(file="f.jsonl", line=1), text="Hello there. " * 4
    )
    (ds / "test.jsonl").write_bytes(ENCODER.encode(rec) + b"\n")
    out = tmp_path / "eval"
    argv = [
        "eval",
        "--checkpoint",
        str(long_checkpoint),
        "--dataset",
        str(ds),
        "--out",
        str(out),
        "--no-generate",
    ]
    assert (
        main(
            [
                *argv,
                "--tasks",
                "--limit",
                "1",
                "--seed-dir",
                str(SEED),
                "--batch-size",
                "4",
                "--max-new-tokens",
                "8",
            ]
        )
        == 0
    )
    stdout = capsys.readouterr().out
    assert "## Task endpoints" in stdout and "copy source" in stdout
    tasks = json.loads((out / "tasks.json").read_text())
    report = json.loads((out / "eval.json").read_text())
    assert report["tasks"] == tasks and "## Task endpoints" in (out / "eval.md").read_text()

    intent = tasks["intent"]
    assert intent["test_utterances"] == 1 and intent["val_utterances"] == 1
    assert 0 <= intent["accuracy"] <= 1 and 0 <= intent["baseline_nn_accuracy"] <= 1
    assert Calibration.load(out / "intent_calibration.json").temperature == pytest.approx(
        intent["temperature"]
    )
    assert (out / "intent_reliability.png").stat().st_size > 1000

    # Retrieval does not depend on the model: the numbers are BM25's over the seed FAQ, computed here again.
    kb = KnowledgeBase.load(SEED / "faq.jsonl")
    rows = [json.loads(line) for line in (SEED / "faq.jsonl").read_text().splitlines()]
    queries = [(p, r["id"]) for r in rows for p in r["paraphrases"]]
    r1 = sum([h.entry.id for h in kb.search(q, k=1)] == [i] for q, i in queries) / len(queries)
    assert tasks["retrieval"]["queries"] == 162 and tasks["retrieval"]["recall_at_1"] == pytest.approx(r1)

    tr = tasks["translation"]
    assert {k for k in tr if "-" in k} == {"en-zh", "zh-en", "en-de", "de-en"}
    assert all(tr[d]["pairs"] == 1 for d in ("en-zh", "zh-en", "en-de", "de-en"))
    assert "tok:zh" in tr["signatures"]["zh"]
    assert tasks["content"]["briefs"] == 1 and 0 <= tasks["content"]["keyword_coverage"] <= 1


def test_eval_tasks_missing_seed_dir_is_a_clear_error(tiny_checkpoint, tmp_path, capsys):
    from training.data.record import ENCODER, Record, Source

    ds = tmp_path / "dataset"
    ds.mkdir()
    rec = Record(
        id="g-0", kind="text", task="general", source=Source(file="f.jsonl", line=1), text="Hi there. " * 4
    )
    (ds / "test.jsonl").write_bytes(ENCODER.encode(rec) + b"\n")
    argv = ["eval", "--checkpoint", str(tiny_checkpoint), "--dataset", str(ds), "--out", str(tmp_path / "e")]
    assert main([*argv, "--no-generate", "--tasks", "--seed-dir", str(tmp_path / "nothing")]) == 2
    assert "intent_labels.jsonl: file not found" in capsys.readouterr().err
