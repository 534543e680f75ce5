"""Bad input: each case gets a message naming the file and line or the config key, and loses nothing else."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from data_fixtures.helpers import build_sources, read_jsonl, records

from model.errors import ConfigError
from training.data.config import load_config

GOOD = {"instruction": "Name a colour.", "input": "", "output": "Blue."}


def _jsonl(path: Path, *lines: str | bytes, sep: bytes = b"\n") -> None:
    path.write_bytes(sep.join(x if isinstance(x, bytes) else x.encode() for x in lines) + sep)


def _one_source(tmp_path, name, **source):
    return build_sources(tmp_path / "out", [{"reader": "alpaca", "path": name, **source}], base_dir=tmp_path)


def _reasons(tmp_path):
    return {r["source"]["line"]: r["reason"] for r in read_jsonl(tmp_path / "out" / "rejected.jsonl")}


def test_malformed_line_wrong_shape_missing_field_wrong_type_each_rejected_with_line(tmp_path):
    _jsonl(
        tmp_path / "a.jsonl",
        json.dumps(GOOD),
        '{"instruction": "x", "output": ',
        "[1, 2, 3]",
        '{"instruction": "Name a fruit."}',
        '{"instruction": "Name a fruit.", "output": ["apple"]}',
        json.dumps({**GOOD, "output": "Green."}),
    )
    m = _one_source(tmp_path, "a.jsonl")
    assert m["counts"]["inputs"] == 6 and m["counts"]["kept"] == 2
    reasons = _reasons(tmp_path)
    assert reasons[2].startswith("alpaca: malformed JSON: ")
    assert reasons[3] == "alpaca: wrong shape: Expected `object`, got `array`"
    assert reasons[4] == "alpaca: wrong shape: Object missing required field `output`"
    assert reasons[5] == "alpaca: wrong shape: Expected `str`, got `array` - at `output`"


def test_latin1_file_is_named_not_mojibaked_and_reads_with_its_encoding(tmp_path):
    _jsonl(
        tmp_path / "l.jsonl",
        json.dumps(GOOD),
        '{"instruction": "Caf\xe9?", "output": "Oui."}'.encode("latin-1"),
    )
    _one_source(tmp_path, "l.jsonl")
    reason = _reasons(tmp_path)[2]
    assert (
        reason
        == "not valid utf-8: byte 0xe9 at column 21; set `encoding` for this source (e.g. 'latin-1', 'cp1252', 'gb18030')"
    )
    _one_source(tmp_path, "l.jsonl", encoding="latin-1")
    assert [r["messages"][0]["content"] for r in records(tmp_path / "out")] == ["Name a colour.", "Café?"]


def test_utf16_with_bom_utf8_bom_crlf_and_blank_lines_read_correctly(tmp_path):
    text = (
        json.dumps(GOOD, ensure_ascii=False)
        + "\r\n\r\n"
        + json.dumps({**GOOD, "output": "Grün."}, ensure_ascii=False)
        + "\r\n"
    )
    (tmp_path / "u16.jsonl").write_bytes(text.encode("utf-16"))  # with BOM
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    for name in ("u16.jsonl", "bom.jsonl"):
        m = _one_source(tmp_path, name)
        recs = records(tmp_path / "out")
        assert [(r["source"]["line"], r["messages"][1]["content"]) for r in recs] == [
            (1, "Blue."),
            (3, "Grün."),
        ], name
        assert m["counts"]["by_source"]["alpaca"]["skipped_blank_lines"] == 1
        assert m["counts"]["rejected"] == 0


def test_bom_before_a_json_array(tmp_path):
    (tmp_path / "arr.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([GOOD]).encode())
    assert _one_source(tmp_path, "arr.json")["counts"]["kept"] == 1


def test_truncated_json_array_is_one_rejected_input_naming_the_file(tmp_path):
    (tmp_path / "arr.json").write_text('[{"instruction": "a", "output": "b"}, {"instr')
    (tmp_path / "ok.jsonl").write_text(json.dumps(GOOD) + "\n")
    m = build_sources(
        tmp_path / "out",
        [{"reader": "alpaca", "path": "arr.json"}, {"reader": "alpaca", "path": "ok.jsonl", "name": "ok"}],
        base_dir=tmp_path,
    )
    (rej,) = read_jsonl(tmp_path / "out" / "rejected.jsonl")
    assert rej["source"] == {"file": "arr.json"} and rej["reason"].startswith(
        "file is not the expected JSON:"
    )
    assert m["counts"]["kept"] == 1 and m["counts"]["inputs"] == 2


def test_empty_file_gives_an_empty_valid_dataset(tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    m = _one_source(tmp_path, "empty.jsonl")
    assert m["counts"]["inputs"] == 0 and m["mixing"]["weights"] == {}
    for name in (
        "train.jsonl",
        "val.jsonl",
        "test.jsonl",
        "rejected.jsonl",
        "duplicates.jsonl",
        "manifest.json",
    ):
        assert (tmp_path / "out" / name).exists()


def _recipe(tmp_path, body: str) -> Path:
    (tmp_path / "a.jsonl").write_text(json.dumps(GOOD) + "\n")
    path = tmp_path / "recipe.toml"
    path.write_text(body)
    return path


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            '[[sources]]\nreader = "alpaca"\npath = "missing.jsonl"\n',
            "sources[0].path: missing.jsonl does not exist",
        ),
        (
            '[[sources]]\nreader = "alpacca"\npath = "a.jsonl"\n',
            "sources[0].reader: unknown reader 'alpacca'; did you mean 'alpaca'?",
        ),
        (
            'workers = "two"\n[[sources]]\nreader = "alpaca"\npath = "a.jsonl"\n',
            "Expected `int`, got `str` - at `workers`",
        ),
        (
            '[[sources]]\nreader = "alpaca"\npath = "a.jsonl"\nlimt = 3\n',
            "unknown field `limt` - at `sources[0]`",
        ),
        ('[[sources]]\nreader = "alpaca"\npath = "a.jsonl"\nlimit = -1\n', "sources[0].limit must be >= 0"),
        (
            '[[sources]]\nreader = "alpaca"\npath = "a.jsonl"\ntask = "poetry"\n',
            "sources[0].task: unknown task 'poetry'",
        ),
        (
            '[[sources]]\nreader = "alpaca"\npath = "a.jsonl"\nencoding = "latin-9x"\n',
            "unknown encoding 'latin-9x'",
        ),
        ("[normalise]\npii = []\n", "unknown key 'normalise'; did you mean 'normalize'?"),
        (
            '[[sources]]\nreader = "csv"\npath = "a.jsonl"\n',
            "sources[0].columns: the csv reader needs a column mapping",
        ),
    ],
)
def test_config_errors_name_the_key(tmp_path, body, message):
    from training.data.pipeline import build

    path = _recipe(tmp_path, body)
    with pytest.raises(ConfigError) as err:
        build(load_config(path), tmp_path / "out", config_path=path, progress=False)
    assert message in str(err.value)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_cli_prints_one_line_and_exits_2(tmp_path):
    path = _recipe(tmp_path, '[[sources]]\nreader = "alpacca"\npath = "a.jsonl"\n')
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "instructlm",
            "data",
            "build",
            "--config",
            str(path),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[2],
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "instructlm data: error:" in proc.stderr and "alpacca" in proc.stderr
