"""Detokenizer, stop matching, settings and the torch-free import path, without a server."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.errors import ConfigError
from service.detokenizer import IncrementalDetokenizer, StopMatcher
from service.settings import Settings, load_settings


def byte_tokens(tokenizer, data: bytes) -> list[int]:
    """One token per byte (the byte-level alphabet), so multi-byte characters are split across tokens."""
    from model.tokenizer import _BYTE_DECODER

    by_byte = {b: ch for ch, b in _BYTE_DECODER.items()}
    return [tokenizer.token_to_id(by_byte[b]) for b in data]


def test_detokenizer_never_emits_half_a_character(tiny_tokenizer):
    text = "Grüße 你好 € 🙂!"
    det = IncrementalDetokenizer(tiny_tokenizer)
    pieces = [det.push(t) for t in byte_tokens(tiny_tokenizer, text.encode())]
    assert "".join(pieces) + det.flush() == text
    assert all("\ufffd" not in p for p in pieces)
    # The 4-byte emoji: nothing until its last byte arrives.
    start = len("Grüße 你好 € ".encode())
    assert pieces[start : start + 3] == ["", "", ""] and pieces[start + 3] == "🙂"


@given(st.text(max_size=40))
@settings(max_examples=60, deadline=None)
def test_detokenizer_matches_full_decode(tiny_tokenizer, text):
    ids = tiny_tokenizer.encode(text)
    det = IncrementalDetokenizer(tiny_tokenizer)
    assert "".join(det.push(t) for t in ids) + det.flush() == text


def test_unfinished_character_at_the_end_becomes_replacement(tiny_tokenizer):
    det = IncrementalDetokenizer(tiny_tokenizer)
    out = "".join(det.push(t) for t in byte_tokens(tiny_tokenizer, "a€".encode()[:-1]))
    assert out == "a" and det.flush() == "\ufffd"


@given(
    st.lists(st.text(alphabet="abc", min_size=1, max_size=3), min_size=1, max_size=20),
    st.lists(st.text(alphabet="abc", min_size=1, max_size=4), min_size=1, max_size=3),
)
@settings(max_examples=200, deadline=None)
def test_stop_matcher_is_exact_across_any_split(deltas, stops):
    """Whatever the split into deltas: output = text before the first stop string completed; nothing leaks."""
    m = StopMatcher(stops)
    out, hit = [], False
    for d in deltas:
        text, hit = m.push(d)
        out.append(text)
        if hit:
            break
    if not hit:
        out.append(m.flush())
    full = "".join(deltas)
    # Reference: the text read one character at a time; cut before the first stop string to be completed.
    cut = None
    for end in range(1, len(full) + 1):
        starts = [end - len(s) for s in stops if full[:end].endswith(s)]
        if starts:
            cut = min(starts)
            break
    if cut is not None:
        assert hit and "".join(out) == full[:cut]
    else:
        assert not hit and "".join(out) == full


def test_settings_precedence_and_errors(tmp_path):
    f = tmp_path / "serve.toml"
    f.write_text('model = "from-file"\nport = 9000\nmax_num_seqs = 4\n')
    env = {"INSTRUCTLM_PORT": "9100", "INSTRUCTLM_API_KEYS": "a, b"}
    s = load_settings(f, {"max_num_seqs": 8, "host": None}, environ=env)
    assert (s.model, s.port, s.max_num_seqs, s.api_keys, s.host) == (
        "from-file",
        9100,
        8,
        ["a", "b"],
        "127.0.0.1",
    )
    f.write_text("max_num_seq = 4\n")
    with pytest.raises(
        ConfigError, match=r"serve.toml: unknown key 'max_num_seq'; did you mean 'max_num_seqs'"
    ):
        load_settings(f, environ={})
    with pytest.raises(ConfigError, match=r"environment.*port"):
        load_settings(None, environ={"INSTRUCTLM_PORT": "eighty"})
    with pytest.raises(ConfigError, match="max_num_seqs must be >= 1"):
        Settings(max_num_seqs=0)
    with pytest.raises(ConfigError, match="api_key_file"):
        Settings(api_key_file=str(tmp_path / "missing")).resolved_api_keys()
    secret = tmp_path / "keys"
    secret.write_text("# rotated 2026-11\nsk-one\n\n  sk-two  \n")
    assert Settings(api_keys=["sk-env"], api_key_file=str(secret)).resolved_api_keys() == [
        "sk-env",
        "sk-one",
        "sk-two",
    ]


def test_key_comparison_checks_every_key():
    from service.api.security import key_matches

    assert key_matches("b", ["a", "b"]) and not key_matches("c", ["a", "b"]) and not key_matches("", ["a"])


def test_cli_check_reports_bad_model_path_in_one_line(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "instructlm", "serve", "--model", str(tmp_path / "nope"), "--check"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "model path does not exist" in r.stderr


def test_onnx_serving_path_never_imports_torch(tiny_bundle):
    """A clean interpreter serves one request from the bundle through the app, and torch is never imported."""
    code = textwrap.dedent(
        f"""
        import sys, threading
        import httpx, uvicorn
        from service.app import create_app
        from service.settings import Settings
        from tests.service.server import LiveServer
        with LiveServer(Settings(model={str(tiny_bundle)!r}, runner="onnx", served_model_name="m",
                                 max_num_seqs=2, log_level="warning")) as srv:
            r = httpx.post(srv.url + "/v1/completions", json={{"model": "m", "prompt": "Hi", "max_tokens": 3}})
            assert r.status_code == 200, r.text
        bad = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
        print("TORCH_MODULES", bad)
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "TORCH_MODULES []" in r.stdout
