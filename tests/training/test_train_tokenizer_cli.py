"""`instructlm tokenizer train`: the result loads in transformers.AutoTokenizer and renders chats identically."""
# ruff: noqa: F811  (pytest fixtures imported from train_fixtures are redefined as test arguments)

from __future__ import annotations

import json

from instructlm.cli import main
from tests.training.train_fixtures import train_dataset  # noqa: F401


def test_tokenizer_cli_output_loads_in_transformers(tmp_path, train_dataset, capsys):
    from transformers import AutoTokenizer

    from model.chat import encode_chat
    from model.tokenizer import Tokenizer

    out = tmp_path / "tok"
    args = [
        "tokenizer",
        "train",
        "--dataset",
        str(train_dataset),
        "--vocab-size",
        "400",
        "--min-frequency",
        "1",
    ]
    assert main([*args, "--model-max-length", "256", "--out", str(out)]) == 0
    assert "tokenizer: 400 tokens from" in capsys.readouterr().out
    ours = Tokenizer.load(out)
    theirs = AutoTokenizer.from_pretrained(str(out))
    assert ours.vocab_size == len(theirs) == 400
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 256
    first = json.loads((train_dataset / "train.jsonl").read_text().splitlines()[0])
    msgs = first["messages"]
    text = msgs[-1]["content"]
    assert theirs(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
    rendered = theirs.apply_chat_template(msgs, tokenize=True, add_generation_prompt=False)
    rendered = rendered["input_ids"] if hasattr(rendered, "keys") else rendered
    assert list(rendered) == encode_chat(ours, msgs).ids


def test_tokenizer_cli_bad_inputs_are_one_line(tmp_path, train_dataset, capsys):
    out = str(tmp_path / "tok")
    assert (
        main(["tokenizer", "train", "--dataset", str(train_dataset), "--vocab-size", "100", "--out", out])
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--vocab-size 100 is below 259" in err
    (tmp_path / "empty").mkdir()
    assert main(["tokenizer", "train", "--dataset", str(tmp_path / "empty"), "--out", out]) == 2
    assert "no manifest.json" in capsys.readouterr().err
