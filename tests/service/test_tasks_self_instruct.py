"""`instructlm data self-instruct` against our own server (tiny random model): every generated row reaches the
dataset pipeline and ends kept, rejected (with a reason) or a duplicate; bad endpoints are clear errors."""

from __future__ import annotations

import json
from pathlib import Path

from instructlm.cli import main
from tests.service.conftest import serve_settings
from tests.service.server import LiveServer
from tests.service.tasks_fixtures import build_long_checkpoint
from training.data.self_instruct import new_instruction_prompt, parse_instruction, seed_pool

SEED = Path(__file__).resolve().parents[2] / "data" / "seed"


def test_seed_pool_uses_train_items_only_and_the_canonical_templates():
    pool = seed_pool(SEED)
    assert len(pool["customer_service"]) == 81
    assert len(pool["content"]) == 120 and len(pool["translation"]) == 580
    held_out = [json.loads(line) for line in (SEED / "translation.jsonl").read_text().splitlines()]
    test_sources = {r["source"] for r in held_out if r["split"] == "test"}
    assert not any(any(s in t for s in test_sources) for t in pool["translation"])
    assert pool["translation"][0].startswith("Translate the following ")


def test_prompt_and_parsing():
    prompt = new_instruction_prompt(["A?", "B?"])
    assert "Task 1: A?\nTask 2: B?" in prompt and prompt.endswith("as Task 3.")
    assert parse_instruction("Task 3: Ask about roaming.\n\nMore text") == "Ask about roaming."
    assert parse_instruction("  \n\n3) Write an ad.") == "Write an ad."
    assert parse_instruction("") == ""


def test_self_instruct_against_our_server(tmp_path_factory, tiny_tokenizer, tmp_path, capsys, torch_threads):
    # Four content briefs as examples take ~400 tokens of the test BPE: the 1024-position tiny model.
    settings = serve_settings(build_long_checkpoint(tmp_path_factory, tiny_tokenizer), "torch")
    settings.tasks.enabled = False  # only the OpenAI endpoint is needed here
    with LiveServer(settings) as srv:
        out = tmp_path / "si"
        # Dedup against the FAQ only: the four seed sources take the pipeline ~20 s on one core.
        recipe = tmp_path / "recipe.toml"
        recipe.write_text(f'name = "si"\n[[sources]]\nreader = "seed_faq"\npath = "{SEED / "faq.jsonl"}"\n')
        argv = ["data", "self-instruct", "--endpoint", f"{srv.url}/v1", "--out", str(out), "--num", "6",
                "--max-tokens", "24", "--no-progress", "--config", str(recipe)]  # fmt: skip
        assert main(argv) == 0
    printed = capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "generated.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    assert [r["task"] for r in rows] == ["customer_service", "content", "translation"] * 2
    for r in rows:
        assert r["messages"][-1]["role"] == "assistant" and r["messages"][-2]["role"] == "user"
    manifest = json.loads((out / "dataset" / "manifest.json").read_text())
    c = manifest["counts"]["by_source"]["self_instruct"]
    assert c["inputs"] == 6 and c["kept"] + c["rejected"] + c["duplicates"] == 6
    assert f"6 generated → {c['kept']} kept" in printed
    rejected = [json.loads(line) for line in (out / "dataset" / "rejected.jsonl").read_text().splitlines()]
    mine = [r for r in rejected if "generated.jsonl" in json.dumps(r)]
    assert len(mine) == c["rejected"] and all(r.get("reason") for r in mine)


def test_unreachable_endpoint_is_a_clear_error(tmp_path, capsys):
    argv = ["data", "self-instruct", "--endpoint", "http://127.0.0.1:9/v1", "--model", "m", "--out",
            str(tmp_path / "x"), "--num", "1", "--no-progress"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "http://127.0.0.1:9/v1/chat/completions: cannot reach the endpoint" in err
