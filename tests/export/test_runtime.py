"""The torch-free ONNX runner core over the tiny bundle: ragged batches against PyTorch, slot bookkeeping,
a run with torch absent, and bundles with a missing or mismatched file."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from export.runtime import BundleError, OnnxRunner, open_bundle, pick_providers
from model.cache import KVCache
from model.generate import ragged_batch

# The gate for fp32 graphs; measured errors are about 4e-7.
TOL = 1e-4
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", params=["slot", "gather"])
def design_bundle(request):
    """Each served-graph design's bundle: the slot op (default) and standard ops only."""
    return request.getfixturevalue("tiny_bundle" if request.param == "slot" else "tiny_gather_bundle")


@pytest.fixture(scope="module")
def runner(design_bundle):
    return OnnxRunner(design_bundle, num_slots=6, max_len=96, threads=1)


def _torch_prefill(model, cache, rows, slots, starts):
    ids, pos = ragged_batch(rows, starts)
    with torch.no_grad():
        return model(ids, pos, cache, torch.tensor(slots))


def test_ragged_prefill_chunks_and_decode_match_pytorch(tiny_model, runner):
    rng = np.random.default_rng(1)
    v = tiny_model.config.vocab_size
    rows = [rng.integers(3, v, n).tolist() for n in (9, 2, 17, 5)]
    slots = [4, 0, 2, 5]  # not the row order: the graph must index the cache by slot
    for s in range(runner.num_slots):
        runner.release(s)
    cache = KVCache(tiny_model.config, runner.num_slots, runner.max_len)

    got = runner.prefill(rows, slots, [0, 0, 0, 0], all_logits=True)
    ref = _torch_prefill(tiny_model, cache, rows, slots, [0, 0, 0, 0])
    assert [g.shape for g in got] == [(len(r), v) for r in rows]
    for i, r in enumerate(rows):
        np.testing.assert_allclose(got[i], ref[i, : len(r)].numpy(), atol=TOL, rtol=0)
    assert runner.lengths[slots].tolist() == [9, 2, 17, 5]

    # A second chunk of different lengths on top of different past lengths (chunked prefill).
    rows2 = [rng.integers(3, v, n).tolist() for n in (4, 11, 1)]
    slots2, starts2 = [0, 4, 5], [2, 9, 5]
    got = runner.prefill(rows2, slots2, starts2)
    ref = _torch_prefill(tiny_model, cache, rows2, slots2, starts2)
    last = ref[torch.arange(3), torch.tensor([3, 10, 0])].numpy()
    assert got.shape == (3, v)
    np.testing.assert_allclose(got, last, atol=TOL, rtol=0)

    # Decode all four slots together for 10 steps, each at its own position.
    slots_d = np.array([4, 0, 2, 5])
    positions = np.array([20, 6, 17, 6])
    tokens = rng.integers(3, v, 4)
    for _ in range(10):
        got = runner.decode(tokens, slots_d, positions)
        with torch.no_grad():
            ref = tiny_model(
                torch.tensor(tokens)[:, None], torch.tensor(positions)[:, None], cache, torch.tensor(slots_d)
            )[:, 0].numpy()
        np.testing.assert_allclose(got, ref, atol=TOL, rtol=0)
        tokens, positions = ref.argmax(-1), positions + 1
    # The cache the runner wrote equals PyTorch's, position for position.
    for slot, n in zip(slots_d, positions, strict=True):
        np.testing.assert_allclose(
            runner.k[:, slot, :, :n], cache.k[:, slot, :, :n].numpy(), atol=TOL, rtol=0
        )
        np.testing.assert_allclose(
            runner.v[:, slot, :, :n], cache.v[:, slot, :, :n].numpy(), atol=TOL, rtol=0
        )


def test_copy_prefix_and_release(tiny_model, runner):
    rng = np.random.default_rng(2)
    v = tiny_model.config.vocab_size
    prompt = rng.integers(3, v, 12).tolist()
    runner.prefill([prompt], [1], [0])
    # Slot 3 gets slot 1's first 8 positions, then prefills the last 4 itself: same logits as a full prefill.
    runner.copy_prefix(1, 3, 8)
    assert runner.lengths[3] == 8
    tail = runner.prefill([prompt[8:]], [3], [8])
    full = runner.prefill([prompt], [2], [0])
    np.testing.assert_allclose(tail, full, atol=TOL, rtol=0)
    # A released slot reused for a shorter prompt never reads the stale positions past it.
    runner.release(2)
    assert runner.lengths[2] == 0
    short = prompt[:3]
    again = runner.prefill([short], [2], [0])
    with torch.no_grad():
        ref = tiny_model(torch.tensor([short]))[0, -1].numpy()
    np.testing.assert_allclose(again[0], ref, atol=TOL, rtol=0)


def test_bad_rows_are_refused(runner):
    with pytest.raises(ValueError, match="slot 6 out of range"):
        runner.decode(np.array([5]), np.array([6]), np.array([0]))
    with pytest.raises(ValueError, match="past the cache length 96"):
        runner.prefill([[5] * 10], [0], [90])
    with pytest.raises(ValueError, match="row 1 is empty"):
        runner.prefill([[5], []], [0, 1], [0, 0])
    runner.release(1)
    with pytest.raises(ValueError, match="slot 1 holds 0 positions; a row cannot start at position 4"):
        runner.prefill([[5, 6]], [1], [4])
    with pytest.raises(ValueError, match="slot 1 holds 0 positions; a row cannot start at position 3"):
        runner.decode(np.array([5]), np.array([1]), np.array([3]))
    with pytest.raises(ValueError, match="repeat a slot"):
        runner.prefill([[5], [6]], [1, 1], [0, 0])


def test_providers_are_what_onnxruntime_registered(runner, design_bundle):
    # No CUDA build here: CPU only, and the runner reports the session's real providers, not the wish list.
    assert pick_providers() == ["CPUExecutionProvider"]
    assert runner.providers == ["CPUExecutionProvider"]
    asked = OnnxRunner(design_bundle, 1, 16, providers=["CUDAExecutionProvider"], verify_hash=False)
    assert asked.providers == ["CPUExecutionProvider"]


def test_runs_without_torch(tiny_bundle, tiny_model, tmp_path):
    """The serving image has no torch: a subprocess where `import torch` fails runs a ragged batch."""
    rows = [[5, 9, 13, 200, 7], [42, 8]]
    ids, pos = ragged_batch(rows)
    with torch.no_grad():
        ref = tiny_model(ids, pos)
    np.save(tmp_path / "ref.npy", ref[torch.arange(2), torch.tensor([4, 1])].numpy())
    script = f"""
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
import numpy as np
from export.runtime import OnnxRunner
r = OnnxRunner({str(tiny_bundle)!r}, num_slots=2, max_len=32)
got = r.prefill({rows!r}, [1, 0], [0, 0])
ref = np.load({str(tmp_path / "ref.npy")!r})
print(float(np.abs(got - ref).max()))
assert not any(m == "torch" or m.startswith("torch.") for m, v in sys.modules.items() if v is not None)
"""
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip().splitlines()[-1]) <= TOL


def _prefill_then_decode_worst(model, runner, rows, slots, decode_steps) -> float:
    """Prefill `rows` into `slots`, then `decode_steps` greedy decode steps; the largest logit difference."""
    cache = KVCache(model.config, runner.num_slots, runner.max_len)
    got = runner.prefill(rows, slots, [0] * len(rows), all_logits=True)
    ref = _torch_prefill(model, cache, rows, slots, [0] * len(rows))
    worst = max(
        float(np.abs(g - ref[i, : len(r)].numpy()).max())
        for i, (g, r) in enumerate(zip(got, rows, strict=True))
    )
    tokens = np.array([int(ref[i, len(r) - 1].argmax()) for i, r in enumerate(rows)])
    pos = np.array([len(r) for r in rows])
    for _ in range(decode_steps):
        got = runner.decode(tokens, np.array(slots), pos)
        with torch.no_grad():
            ref = model(torch.tensor(tokens)[:, None], torch.tensor(pos)[:, None], cache, torch.tensor(slots))
        worst = max(worst, float(np.abs(got - ref[:, 0].numpy()).max()))
        tokens, pos = ref[:, 0].argmax(-1).numpy(), pos + 1
    return worst


def test_cache_length_that_is_not_a_whole_number_of_chunks(tiny_model, tiny_gather_bundle):
    """max_len 37 with 16-position chunks (gather design): the cache is allocated in whole chunks (48), rows
    read up to 3 chunks whose tail is masked, and the last position (36) is still usable and correct."""
    runner = OnnxRunner(tiny_gather_bundle, num_slots=3, max_len=37, threads=1, verify_hash=False)
    assert runner.kv_chunk == 16 and runner.k.shape[3] == 48
    rng = np.random.default_rng(11)
    rows = [rng.integers(3, tiny_model.config.vocab_size, n).tolist() for n in (30, 17)]
    # 7 steps: row 0 ends at position 36 (= max_len - 1), row 1 crosses the 16- and 32-position chunk edges.
    assert _prefill_then_decode_worst(tiny_model, runner, rows, [2, 0], decode_steps=7) <= TOL
    with pytest.raises(ValueError, match="past the cache length 37"):
        runner.decode(np.array([5]), np.array([2]), np.array([37]))


def test_slot_cache_is_exactly_max_len(tiny_model, tiny_bundle):
    """The slot op reads positions, not chunks: max_len 37 allocates 37 positions, and the last one works."""
    runner = OnnxRunner(tiny_bundle, num_slots=3, max_len=37, threads=1, verify_hash=False)
    assert runner.attention == "slot" and runner.k.shape[3] == 37
    rng = np.random.default_rng(11)
    rows = [rng.integers(3, tiny_model.config.vocab_size, n).tolist() for n in (30, 17)]
    assert _prefill_then_decode_worst(tiny_model, runner, rows, [2, 0], decode_steps=7) <= TOL
    with pytest.raises(ValueError, match="past the cache length 37"):
        runner.decode(np.array([5]), np.array([2]), np.array([37]))


def test_bundle_traced_with_one_position_per_row_still_runs(tiny_model, tiny_gather_bundle, tmp_path):
    """Bundles exported before the chunked layout bind past rows of one position (past [R, head_dim]) and have
    no attention entry in their report; the runner reads the chunk size from the graph, so they keep working."""
    from export.onnx_export import export_served
    from export.runtime import sha256_file

    bundle_copy = tmp_path / "old"
    shutil.copytree(tiny_gather_bundle, bundle_copy)
    export_served(tiny_model, bundle_copy / "model.onnx", "gather", kv_chunk=1)
    report = json.loads((bundle_copy / "export_report.json").read_text())
    del report["served_graph"]["attention"]
    entry = report["files"]["model.onnx"]
    entry["bytes"], entry["sha256"] = (
        (bundle_copy / "model.onnx").stat().st_size,
        sha256_file(bundle_copy / "model.onnx"),
    )
    (bundle_copy / "export_report.json").write_text(json.dumps(report))
    runner = OnnxRunner(bundle_copy, num_slots=4, max_len=40, threads=1)
    assert runner.kv_chunk == 1
    rows = [[5, 17, 300, 42, 9, 88, 120], [64, 77, 250]]
    assert _prefill_then_decode_worst(tiny_model, runner, rows, [3, 1], decode_steps=5) <= TOL


# --- bad bundles ----------------------------------------------------------------------------------------------
@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dst)
    return dst


def test_missing_file_is_named(bundle_copy):
    (bundle_copy / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match=r"tokenizer\.json: missing"):
        open_bundle(bundle_copy)


def test_missing_graph_is_named(bundle_copy):
    (bundle_copy / "model.onnx").unlink()
    with pytest.raises(BundleError, match=r"model\.onnx: missing"):
        OnnxRunner(bundle_copy)


def test_truncated_graph_is_caught(bundle_copy):
    data = (bundle_copy / "model.onnx").read_bytes()
    (bundle_copy / "model.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(
        BundleError, match=rf"model\.onnx: {len(data) // 2} bytes, export_report\.json expects {len(data)}"
    ):
        open_bundle(bundle_copy)


def test_corrupted_graph_is_caught(bundle_copy):
    data = bytearray((bundle_copy / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle_copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256 differs"):
        open_bundle(bundle_copy)


def test_config_that_does_not_match_the_graphs(bundle_copy):
    cfg = json.loads((bundle_copy / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (bundle_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        BundleError, match=r"config\.json: num_hidden_layers is 3 but export_report\.json says .* 2"
    ):
        open_bundle(bundle_copy)


def test_graph_that_does_not_match_config_and_report(bundle_copy):
    # Both config.json and the report claim 3 layers: only the graph itself can tell.
    for name in ("config.json",):
        cfg = json.loads((bundle_copy / name).read_text())
        cfg["num_hidden_layers"] = 3
        (bundle_copy / name).write_text(json.dumps(cfg))
    report = json.loads((bundle_copy / "export_report.json").read_text())
    report["config"]["num_hidden_layers"] = 3
    (bundle_copy / "export_report.json").write_text(json.dumps(report))
    with pytest.raises(
        BundleError, match=r"model\.onnx: graph lacks input\(s\) past_key\.2.*3 layers, the graph has 2"
    ):
        OnnxRunner(bundle_copy)


def test_unknown_report_is_refused(bundle_copy):
    (bundle_copy / "export_report.json").write_text("{not json")
    with pytest.raises(BundleError, match=r"export_report\.json: not valid JSON"):
        open_bundle(bundle_copy)


def test_random_engine_schedule_matches_pytorch(tiny_model, design_bundle):
    """What a continuous-batching engine does, in a random order: chunked prefills of mixed lengths, decode
    steps over whichever slots are active, prefix copies and releases; every call's logits against PyTorch
    running the same calls over its own KVCache."""
    rng = np.random.default_rng(7)
    cfg = tiny_model.config
    slots_n, max_len = 5, 64
    runner = OnnxRunner(design_bundle, slots_n, max_len, verify_hash=False)
    cache = KVCache(cfg, slots_n, max_len)
    lengths = [0] * slots_n
    worst = 0.0
    for _ in range(40):
        op = rng.choice(["prefill", "decode", "copy", "release"], p=[0.35, 0.45, 0.1, 0.1])
        if op == "prefill":
            chosen = sorted(rng.choice(slots_n, size=rng.integers(1, 4), replace=False).tolist())
            rows, starts, slots = [], [], []
            for s in chosen:
                n = int(rng.integers(1, 9))
                if lengths[s] + n <= max_len:
                    rows.append(rng.integers(3, cfg.vocab_size, n).tolist())
                    starts.append(lengths[s])
                    slots.append(s)
            if not rows:
                continue
            got = runner.prefill(rows, slots, starts, all_logits=True)
            ref = _torch_prefill(tiny_model, cache, rows, slots, starts)
            for i, r in enumerate(rows):
                worst = max(worst, float(np.abs(got[i] - ref[i, : len(r)].numpy()).max()))
                lengths[slots[i]] += len(r)
        elif op == "decode":
            active = [s for s in range(slots_n) if 0 < lengths[s] < max_len]
            if not active:
                continue
            tokens = rng.integers(3, cfg.vocab_size, len(active))
            pos = np.array([lengths[s] for s in active])
            got = runner.decode(tokens, np.array(active), pos)
            with torch.no_grad():
                ref = tiny_model(
                    torch.tensor(tokens)[:, None], torch.tensor(pos)[:, None], cache, torch.tensor(active)
                )
            worst = max(worst, float(np.abs(got - ref[:, 0].numpy()).max()))
            for s in active:
                lengths[s] += 1
        elif op == "copy":
            src, dst = rng.choice(slots_n, size=2, replace=False).tolist()
            n = int(rng.integers(0, lengths[src] + 1))
            runner.copy_prefix(src, dst, n)
            cache.copy_prefix(src, dst, n)
            lengths[dst] = n
        else:
            s = int(rng.integers(slots_n))
            runner.release(s)
            cache.reset([s])
            lengths[s] = 0
        assert runner.lengths.tolist() == lengths
    assert 0 < worst <= TOL


def _resident_bytes_of(arr: np.ndarray) -> int:
    """Resident bytes of the memory mappings that hold `arr` (Linux /proc/self/smaps), so what other code frees
    or allocates meanwhile does not count."""
    lo, hi = arr.ctypes.data, arr.ctypes.data + arr.nbytes
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=1)[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start < hi and end > lo
            elif inside and head == "Rss:":
                total += int(line.split()[1]) * 1024
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads resident memory from Linux's /proc")
def test_the_cache_is_resident_from_the_start(tiny_bundle):
    """The slot cache is committed when the runner opens (np.zeros alone maps pages lazily): the process's
    memory is known at start and a slot's first use does not page-fault in the middle of serving."""
    runner = OnnxRunner(tiny_bundle, num_slots=256, max_len=256, threads=1)
    assert runner._kv.nbytes >= 32 << 20  # its own mapping, not a corner of the heap
    resident = _resident_bytes_of(runner._kv)
    assert resident >= runner._kv.nbytes, (resident, runner._kv.nbytes)


def test_mixed_step_is_one_forward_matching_pytorch(tiny_model, tiny_bundle, tiny_gather_bundle):
    """The slot graph packs a step's decode rows and prefill chunks into one call (`step`): every logit and
    the cache it writes match PyTorch running the same rows; the gather graph says it cannot."""
    rng = np.random.default_rng(5)
    v = tiny_model.config.vocab_size
    runner = OnnxRunner(tiny_bundle, num_slots=6, max_len=64, threads=1, verify_hash=False)
    assert runner.has_mixed_step
    cache = KVCache(tiny_model.config, 6, 64)
    first = [rng.integers(3, v, n).tolist() for n in (7, 12)]
    runner.prefill(first, [2, 5], [0, 0])
    _torch_prefill(tiny_model, cache, first, [2, 5], [0, 0])
    tokens, dslots, dpos = np.array([11, 40]), np.array([2, 5]), np.array([7, 12])
    rows = [rng.integers(3, v, n).tolist() for n in (9, 1, 4)]  # a new prompt, and chunks on top of a past
    runner.prefill([rows[2][:2]], [1], [0])
    _torch_prefill(tiny_model, cache, [rows[2][:2]], [1], [0])
    chunks, cslots, cstarts = [rows[0], rows[1], rows[2][2:]], [0, 3, 1], [0, 0, 2]
    got_p, got_d = runner.step(chunks, cslots, cstarts, tokens, dslots, dpos)
    with torch.no_grad():
        ref_d = tiny_model(
            torch.tensor(tokens)[:, None], torch.tensor(dpos)[:, None], cache, torch.tensor(dslots)
        )
    ref_p = _torch_prefill(tiny_model, cache, chunks, cslots, cstarts)
    last = ref_p[torch.arange(3), torch.tensor([len(c) - 1 for c in chunks])].numpy()
    assert got_p.shape == (3, v) and got_d.shape == (2, v)
    np.testing.assert_allclose(got_d, ref_d[:, 0].numpy(), atol=TOL, rtol=0)
    np.testing.assert_allclose(got_p, last, atol=TOL, rtol=0)
    assert runner.lengths[[0, 1, 2, 3, 5]].tolist() == [9, 4, 8, 1, 13]
    for slot, n in ((0, 9), (1, 4), (2, 8), (3, 1), (5, 13)):
        np.testing.assert_allclose(
            runner.k[:, slot, :, :n], cache.k[:, slot, :, :n].numpy(), atol=TOL, rtol=0
        )
        np.testing.assert_allclose(
            runner.v[:, slot, :, :n], cache.v[:, slot, :, :n].numpy(), atol=TOL, rtol=0
        )
    with pytest.raises(ValueError, match="repeat a slot"):
        runner.step([[5]], [2], [8], np.array([3]), np.array([2]), np.array([8]))
    gather = OnnxRunner(tiny_gather_bundle, num_slots=2, max_len=32, threads=1, verify_hash=False)
    assert not gather.has_mixed_step
    with pytest.raises(ValueError, match="separate calls"):
        gather.step([[5]], [0], [0], np.array([], np.int64), np.array([], np.int64), np.array([], np.int64))
