"""The SlotAttention custom op (export/csrc/slot_attention.cc) against its PyTorch reference, its errors, and
what happens without its library: the exporter and the runner say how to build it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export import custom_ops
from export.graphs import slot_attention_reference
from export.onnx_export import ExportError, export_bundle
from export.runtime import BundleError, OnnxRunner

REPO = Path(__file__).resolve().parents[2]


def _session(h: int, kv: int, d: int, threads: int = 1) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.register_custom_ops_library(str(custom_ops.find_library()))
    model = custom_ops.slot_attention_model(h, kv, d)
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def _case(rng, h, kv, d, slots, cache_len, rows, pad=2):
    """rows: (slot, start, n) per row, packed one after another into one row of tokens, then `pad` padding
    tokens (position -1), as the runner packs a step."""
    t = sum(n for _, _, n in rows) + pad
    pos = np.full((1, t), -1, dtype=np.int64)
    i = 0
    for _, start, n in rows:
        pos[0, i : i + n] = np.arange(start, start + n)
        i += n
    return {
        "q": rng.standard_normal((1, t, h * d), dtype=np.float32),
        "k": rng.standard_normal((1, t, kv, d), dtype=np.float32),
        "v": rng.standard_normal((1, t, kv, d), dtype=np.float32),
        "past_k": rng.standard_normal((slots, kv, cache_len, d), dtype=np.float32),
        "past_v": rng.standard_normal((slots, kv, cache_len, d), dtype=np.float32),
        "slot_ids": np.array([slot for slot, _, _ in rows], dtype=np.int64),
        "position_ids": pos,
        "seq_lens": np.array([n for _, _, n in rows], dtype=np.int64),
    }


@pytest.mark.parametrize(
    ("h", "kv", "d"),
    [(8, 4, 32), (4, 4, 64), (6, 2, 24), (16, 1, 128)],  # the demo shape, no grouping, odd head_dim, MQA
)
def test_op_matches_the_pytorch_reference(h, kv, d):
    """Ragged rows (decode rows, prefill chunks longer than the op's 8-query block, rows on top of a past and
    rows without one), slots in any order, right padding: every output within fp32 rounding of the reference."""
    rng = np.random.default_rng(h * 100 + d)
    rows = [(3, 40, 1), (0, 0, 19), (5, 7, 9), (1, 62, 2), (2, 0, 1)]  # (slot, start, new tokens)
    feed = _case(rng, h, kv, d, slots=6, cache_len=64, rows=rows)
    got = _session(h, kv, d).run(None, feed)[0]
    ref = slot_attention_reference(*(torch.from_numpy(feed[n]) for n in feed)).numpy()
    # Reference and op sum in different orders; outputs are averages of unit-normal values.
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=0)
    assert not got[0, -2:].any()  # padding tokens are zero, not garbage
    # Each row alone in a call of its own gives the same outputs: rows never see each other.
    i = 0
    for slot, _, n in rows:
        one = {**feed, "slot_ids": np.array([slot]), "seq_lens": np.array([n])}
        for name in ("q", "k", "v", "position_ids"):
            one[name] = feed[name][:, i : i + n]
        np.testing.assert_allclose(
            _session(h, kv, d).run(None, one)[0][0], got[0, i : i + n], atol=1e-6, rtol=0
        )
        i += n


def test_op_with_threads_matches_one_thread():
    rng = np.random.default_rng(3)
    feed = _case(rng, 8, 4, 32, slots=16, cache_len=128, rows=[(s, 5 * s, 1 + s % 3) for s in range(16)])
    one = _session(8, 4, 32, threads=1).run(None, feed)[0]
    two = _session(8, 4, 32, threads=2).run(None, feed)[0]
    np.testing.assert_array_equal(one, two)  # pairs are independent: same arithmetic on any thread


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([(6, 0, 1)], r"row 0: slot 6 is outside 0\.\.5"),
        ([(0, 0, 1), (1, 60, 5)], r"row 1: positions 60\.\.64 are outside the cache's 0\.\.63"),
        ([(0, 0, 3), (1, 0, 2)], r"row 1: 9 tokens from token 3 do not fit the call's 7 tokens"),
    ],
)
def test_op_refuses_rows_outside_the_cache(rows, message):
    """A bad slot, position or row length is an error naming the row, never a read outside the cache."""
    feed = _case(np.random.default_rng(0), 8, 4, 32, slots=6, cache_len=64, rows=rows)
    if "9 tokens" in message:
        feed["seq_lens"] = np.array([3, 9])
    with pytest.raises(Exception, match=message):
        _session(8, 4, 32).run(None, feed)


def test_op_refuses_mismatched_shapes():
    feed = _case(np.random.default_rng(0), 8, 4, 32, slots=6, cache_len=64, rows=[(0, 0, 2)])
    feed["v"] = feed["v"][:, :1]
    with pytest.raises(Exception, match=r"SlotAttention: inconsistent shapes: .* v \[1, 1, 4, 32\]"):
        _session(8, 4, 32).run(None, feed)


def test_without_the_library_export_and_runner_say_how_to_build_it(tiny_checkpoint, tiny_bundle, tmp_path):
    env = {**os.environ, custom_ops.ENV_LIBRARY: str(tmp_path / "missing.so")}
    script = f"""
from export.onnx_export import ExportError, export_bundle
from export.runtime import BundleError, OnnxRunner
try:
    export_bundle({str(tiny_checkpoint)!r}, {str(tmp_path / "b")!r}, attention="slot")
except ExportError as exc:
    print("export:", exc)
try:
    OnnxRunner({str(tiny_bundle)!r}, 1, 16)
except BundleError as exc:
    print("runner:", exc)
"""
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    export_line, runner_line = out.stdout.strip().splitlines()
    assert "missing.so" in export_line and "python -m export.custom_ops build" in export_line
    assert "--attention gather" in export_line
    assert runner_line.startswith("runner: ") and "SlotAttention" in runner_line
    assert "missing.so" in runner_line and "python -m export.custom_ops build" in runner_line


def test_auto_falls_back_to_gather_without_the_library(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv(custom_ops.ENV_LIBRARY, str(tmp_path / "missing.so"))
    report = export_bundle(tiny_checkpoint, tmp_path / "b", attention="auto")
    assert report["served_graph"]["attention"] == "gather"
    assert report["passed"]
    assert OnnxRunner(tmp_path / "b", 2, 32).attention == "gather"
    with pytest.raises(ExportError, match="--attention 'flash': one of auto, slot, gather"):
        export_bundle(tiny_checkpoint, tmp_path / "c", attention="flash")


def test_report_that_names_an_unknown_design_is_refused(tiny_bundle, tmp_path):
    import json
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    report = json.loads((copy / "export_report.json").read_text())
    report["served_graph"]["attention"] = "paged"
    (copy / "export_report.json").write_text(json.dumps(report))
    with pytest.raises(BundleError, match="served_graph.attention is 'paged'"):
        OnnxRunner(copy, 1, 16)


def test_build_compiles_and_skips_when_up_to_date(tmp_path, monkeypatch):
    """A fresh build to another path with the headers make install fetched; a second call compiles nothing."""
    include = custom_ops.find_library().parent / "include"
    monkeypatch.setenv(custom_ops.ENV_INCLUDE, str(include))
    lib = custom_ops.build(tmp_path / "lib.so", quiet=True)
    assert lib.stat().st_size > 10_000
    before = lib.stat().st_mtime_ns
    assert custom_ops.build(tmp_path / "lib.so", quiet=True) == lib
    assert lib.stat().st_mtime_ns == before
    monkeypatch.setenv(custom_ops.ENV_INCLUDE, str(tmp_path))
    with pytest.raises(custom_ops.OpsBuildError, match="no onnxruntime_cxx_api.h there"):
        custom_ops.build(tmp_path / "other.so", quiet=True)


def test_a_download_that_is_not_a_deb_is_refused():
    with pytest.raises(custom_ops.OpsBuildError, match="not a .deb archive"):
        custom_ops._deb_data(b"<html>proxy error</html>")
