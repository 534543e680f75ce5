"""The demo recipe end to end: accounting, determinism, held-out seed items, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from data_fixtures.helpers import assert_accounted, read_jsonl, records

from training.data.config import load_config
from training.data.pipeline import build

ROOT = Path(__file__).parents[2]
DEMO = ROOT / "configs" / "data" / "demo.toml"
OUTPUTS = ("train.jsonl", "val.jsonl", "test.jsonl", "rejected.jsonl", "duplicates.jsonl", "manifest.json")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "dataset"
    manifest = build(load_config(DEMO), out, config_path=DEMO, progress=False)
    return out, manifest


def test_demo_accounts_for_every_input(demo):
    out, manifest = demo
    assert_accounted(manifest, out)
    c = manifest["counts"]
    assert c["inputs"] > 3000 and c["kept"] > 0.7 * c["inputs"]
    assert set(c["by_task"]) >= {"customer_service", "content", "translation", "dialog"}
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert len(manifest["config_hash"]) == 64
    assert "data/seed/faq.jsonl" in manifest["input_files"]
    assert sum(manifest["mixing"]["weights"].values()) == pytest.approx(1.0)


def test_demo_keeps_seed_held_out_items_in_test(demo):
    out, _ = demo
    seed_test = [
        json.loads(line)
        for line in (ROOT / "data/seed/translation.jsonl").read_text().splitlines()
        if json.loads(line)["split"] == "test"
    ]
    test_ids = {r["meta"].get("seed_id") for r in read_jsonl(out / "test.jsonl")}
    assert {r["id"] for r in seed_test} <= test_ids
    train = read_jsonl(out / "train.jsonl")
    assert not any(r["meta"].get("paraphrase") for r in train)  # FAQ paraphrases are held out
    assert all(r["meta"]["split"] == "train" for r in train)


def test_demo_build_is_byte_identical(demo, tmp_path):
    out, _ = demo
    again = tmp_path / "again"
    build(load_config(DEMO), again, config_path=DEMO, progress=False)
    for name in OUTPUTS:
        assert (out / name).read_bytes() == (again / name).read_bytes(), name


def test_cli_builds_with_flag_overrides(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"instruction": "Name a colour.", "input": "", "output": "Blue."}\n')
    (tmp_path / "r.toml").write_text('name = "x"\n[[sources]]\nreader = "alpaca"\npath = "a.jsonl"\n')
    proc = subprocess.run([sys.executable, "-m", "instructlm", "data", "build", "--config", str(tmp_path / "r.toml"),
                           "--out", str(tmp_path / "o"), "--name", "flagged", "--no-progress"],
                          capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "1 inputs → 1 kept" in proc.stdout
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["name"] == "flagged"
    assert len(records(tmp_path / "o")) == 1
