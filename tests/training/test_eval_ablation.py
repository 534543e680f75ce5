"""The data ablation: the raw run's training set never holds a held-out record, the comparison picks the right
winner per metric direction, and (slow) the whole `make ablation` flow at tiny scale."""

from __future__ import annotations

import json

import pytest

from model.errors import ConfigError
from training.ablation import assemble_raw, comparison_rows, load_config, write_report


def _rec(rid, task, user, answer="ok"):
    return {
        "id": rid,
        "kind": "chat",
        "task": task,
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
        "text": None,
        "source": {"file": "x.jsonl", "line": 1},
        "meta": {"split": "train"},
        "origin_id": None,
    }


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_raw_set_excludes_held_out_records_by_id_and_by_identical_prompt(tmp_path):
    clean, raw = tmp_path / "clean", tmp_path / "raw"
    clean.mkdir()
    raw.mkdir()
    _write(clean / "train.jsonl", [_rec("a", "qa", "What is roaming?")])
    _write(clean / "val.jsonl", [_rec("v", "qa", "How do I pay?")])
    _write(clean / "test.jsonl", [_rec("t", "content", "Write  a poem about  Rain.")])
    _write(
        raw / "train.jsonl",
        [
            _rec("a", "qa", "What is roaming?"),
            _rec("a2", "qa", "What is roaming?"),  # a duplicate the raw build keeps
            _rec("t", "content", "Write a poem about rain."),  # the held-out record itself
            _rec("t-copy", "content", "write a poem  about rain."),  # same prompt after folding, other id
            _rec("x", "dialog", "hello"),
        ],
    )
    _write(raw / "test.jsonl", [_rec("v", "qa", "How do I pay?")])
    counts = assemble_raw(raw, clean, tmp_path / "out")
    train = [json.loads(x) for x in (tmp_path / "out" / "train.jsonl").read_text().splitlines()]
    assert [r["id"] for r in train] == ["a", "a2", "x"]
    assert counts == {
        "pool": 6,
        "train": 3,
        "removed_id": 2,
        "removed_prompt": 1,
        "tasks": {"qa": 2, "dialog": 1},
    }
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    # No balancing: examples-proportional weights.
    assert manifest["mixing"]["weights"] == pytest.approx({"dialog": 1 / 3, "qa": 2 / 3})
    assert (tmp_path / "out" / "test.jsonl").read_bytes() == (clean / "test.jsonl").read_bytes()


def test_assemble_refuses_a_dataset_without_a_test_split(tmp_path):
    (tmp_path / "clean").mkdir()
    with pytest.raises(ConfigError, match="no test split"):
        assemble_raw(tmp_path, tmp_path / "clean", tmp_path / "out")


def _eval(ppl, bleu, rep):
    return {
        "overall": {"ppl": ppl},
        "per_task": {"translation": {"ppl": ppl, "bleu": bleu, "repetition_4": rep, "records": 3}},
    }


def test_comparison_uses_each_metrics_direction(tmp_path):
    rows = comparison_rows(_eval(10.0, 5.0, 0.2), _eval(12.0, 7.0, 0.2))
    assert ("overall", "ppl", 10.0, 12.0, "clean") in rows  # lower perplexity wins
    assert ("translation", "bleu", 5.0, 7.0, "raw") in rows  # higher BLEU wins
    assert ("translation", "repetition_4", 0.2, 0.2, "=") in rows
    assert not any(m == "records" for _, m, *_ in rows)
    facts = {
        "command": "make ablation",
        "config": "c.toml",
        "date": "today",
        "machine": "m",
        "seconds": 1.0,
        "timings": {"train clean": 1.0},
        "clean_train": 10,
        "raw": {"train": 12, "removed_id": 2, "removed_prompt": 1},
        "clean_tokens": 100,
        "raw_tokens": 100,
        "clean_val": 2.0,
        "raw_val": 2.5,
        "overrides": {"dedup.exact": False},
        "tokenizer": "tok",
    }
    write_report(tmp_path / "EVALUATION.md", facts, _eval(10.0, 5.0, 0.2), _eval(12.0, 7.0, 0.2))
    md = (tmp_path / "EVALUATION.md").read_text()
    assert "**10.00** trained on the built dataset vs **12.00**" in md
    assert "| translation | bleu | 5.00 | 7.00 | raw |" in md
    assert (tmp_path / "ablation.png").stat().st_size > 10_000
    # A rewrite keeps what other commands wrote after the marker, and replaces the rest.
    from training.ablation import KEEP_MARKER

    (tmp_path / "EVALUATION.md").write_text(
        md.replace("**10.00**", "**stale**") + f"\n{KEEP_MARKER}\n## Tasks\nkept\n"
    )
    write_report(tmp_path / "EVALUATION.md", facts, _eval(10.0, 5.0, 0.2), _eval(12.0, 7.0, 0.2))
    again = (tmp_path / "EVALUATION.md").read_text()
    assert "**stale**" not in again and "**10.00**" in again
    assert again.endswith(f"{KEEP_MARKER}\n## Tasks\nkept\n") and again.count(KEEP_MARKER) == 1


def test_the_shipped_ablation_recipe_loads_and_its_raw_overrides_are_data_recipe_keys():
    from training.data.config import load_config as load_data_config

    cfg = load_config("configs/train/ablation.toml")
    data = load_data_config(cfg.data_recipe, dict(cfg.raw.overrides))
    assert data.dedup.exact is False and data.dedup.near is False and data.balance.cap == 0


@pytest.mark.slow
def test_ablation_end_to_end_at_tiny_scale(tmp_path, monkeypatch):
    """`make ablation` with the tiny preset and a few steps: both runs train, evaluate and the report is written."""
    from training.ablation import main

    recipe = tmp_path / "ablation.toml"
    recipe.write_text(
        f'out_dir = "{tmp_path / "runs"}"\nreport = "{tmp_path / "EVALUATION.md"}"\ntokenizer_vocab = 512\n'
        '[train_overrides]\n"model.preset" = "tiny"\n"pretrain.steps" = 4\n"sft.steps" = 4\n'
        '"pretrain.checkpoint_every" = 4\n"sft.checkpoint_every" = 4\n"data.seq_len" = 128\n"run.threads" = 1\n'
        '"run.tensorboard" = false\n[eval]\nmax_new_tokens = 4\nlimit = 3\n'
    )
    assert main(["--config", str(recipe)]) == 0
    md = (tmp_path / "EVALUATION.md").read_text()
    assert "| overall | ppl |" in md
    for name in ("clean", "raw"):
        assert (tmp_path / "runs" / name / "eval" / "eval.json").is_file()
