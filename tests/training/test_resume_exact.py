"""Exact resume: SIGKILL during a checkpoint write, SIGTERM, corrupt and crafted checkpoints, changed configs."""
# ruff: noqa: F811  (pytest fixtures imported from train_fixtures are redefined as test arguments)

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model.errors import ConfigError
from tests.training.train_fixtures import tokenizer_dir, train_dataset, write_config  # noqa: F401
from training import checkpointing as ckpt
from training import train as TR

REPO = Path(__file__).resolve().parents[2]


def _start(config: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "instructlm", "train", "--config", str(config)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _kill_during_write(proc: subprocess.Popen, ckpt_dir: Path, step: int, timeout: float = 120) -> str:
    """SIGKILL the run while the checkpoint of `step` is being written (its temporary directory exists)."""
    prefix = f".step-{step:08d}.tmp-"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            names = os.listdir(ckpt_dir)
        except FileNotFoundError:
            names = []
        tmp = next((n for n in names if n.startswith(prefix)), None)
        if tmp is not None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return tmp
        if proc.poll() is not None:
            raise AssertionError(
                f"run ended before the step-{step} checkpoint write was seen:\n{proc.stdout.read()}"
            )
    proc.kill()
    raise AssertionError("timed out waiting for the checkpoint write")


def _losses(out: Path, stage: str) -> list[float]:
    lines = (out / "train" / stage / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["loss"] for x in lines]


def test_sigkill_during_checkpoint_writes_then_resume_equals_uninterrupted(
    tmp_path, train_dataset, tokenizer_dir, torch_threads
):
    ref_cfg = write_config(tmp_path / "ref.toml", train_dataset, tokenizer_dir, tmp_path / "ref")
    TR.train(TR.load_config(ref_cfg))

    cfg = write_config(tmp_path / "run.toml", train_dataset, tokenizer_dir, tmp_path / "run")
    out = tmp_path / "run"
    # Killed while pretraining's step-8 checkpoint is written: step 4 is the last complete one. (The SFT stream's
    # resume is exercised end to end by test_corrupt_latest_checkpoint_falls_back_to_previous.)
    tmp = _kill_during_write(_start(cfg), out / "train/pretrain/ckpt", 8)
    assert (out / "train/pretrain/ckpt" / tmp).exists()  # the half-written directory is still there
    assert [s for s, _ in ckpt.step_dirs(out / "train/pretrain/ckpt")] == [4]
    # Resume to the end.
    proc = _start(cfg)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log
    assert "pretrain: resumed from" in log and "step-00000004 (step 4)" in log

    for stage in ("pretrain", "sft"):
        assert _losses(out, stage) == _losses(tmp_path / "ref", stage)  # bit for bit, every step
    a = load_file(out / "checkpoint/model.safetensors")
    b = load_file(tmp_path / "ref/checkpoint/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(".tmp-" in p.name for p in (out / "train/pretrain/ckpt").iterdir())  # stale temp cleaned


def test_sigterm_saves_and_exits_cleanly(tmp_path, train_dataset, tokenizer_dir):
    cfg = write_config(
        tmp_path / "t.toml",
        train_dataset,
        tokenizer_dir,
        tmp_path / "out",
        steps=100000,
        checkpoint_every=100000,
    )
    metrics = tmp_path / "out/train/pretrain/metrics.jsonl"
    proc = _start(cfg)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, log
    last = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert f"pretrain: stopped by SIGTERM at step {last}; checkpoint saved" in log
    assert [s for s, _ in ckpt.step_dirs(tmp_path / "out/train/pretrain/ckpt")] == [last]
    assert not (tmp_path / "out/checkpoint").exists()


@pytest.fixture
def short_run(tmp_path, train_dataset, tokenizer_dir, torch_threads):
    """An SFT-only run of 8 steps with checkpoints at 4 and 8; its final/ is removed so the next run resumes."""
    path = write_config(tmp_path / "t.toml", train_dataset, tokenizer_dir, tmp_path / "out", steps=8)
    path.write_text(path.read_text().replace('stages = ["pretrain", "sft"]', 'stages = ["sft"]'))
    cfg = TR.load_config(path)
    TR.train(cfg)
    final = load_file(tmp_path / "out/checkpoint/model.safetensors")
    shutil.rmtree(tmp_path / "out/train/sft/final")
    return path, cfg, final, tmp_path / "out/train/sft/ckpt"


def test_corrupt_latest_checkpoint_falls_back_to_previous(short_run, caplog):
    path, cfg, final, ckpt_dir = short_run
    weights = ckpt_dir / "step-00000008/model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated, as after a disk-full write
    with caplog.at_level(logging.WARNING):
        TR.train(TR.load_config(path))
    assert any(
        "skipped unreadable checkpoint" in r.message and "step-00000008" in r.message for r in caplog.records
    )
    # Resumed from step 4 and redid 5..8: the same weights as the run that was never damaged.
    again = load_file(ckpt_dir.parents[2] / "checkpoint/model.safetensors")
    assert all(torch.equal(again[k], final[k]) for k in final)


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = Path("/tmp") / f"instructlm-pickle-ran-{os.getpid()}"


def test_crafted_pickle_training_state_is_never_executed(short_run, caplog):
    _path, cfg, _final, ckpt_dir = short_run
    state = ckpt_dir / "step-00000008" / ckpt.STATE_TENSORS
    state.write_bytes(pickle.dumps(_Payload()))
    (ckpt_dir / "step-00000008" / "training_state.pt").write_bytes(pickle.dumps(_Payload()))
    MARKER.unlink(missing_ok=True)
    tok = TR.Tokenizer.load(cfg.data.tokenizer)
    loaded, skipped = ckpt.load_latest(ckpt_dir, TR.model_config(cfg, tok))
    assert not MARKER.exists()
    assert loaded is not None and loaded.path.name == "step-00000004"
    assert "training_state.safetensors: unreadable" in skipped[0]


def test_resume_with_changed_config_or_world_size_is_refused(short_run):
    path, _cfg, _final, ckpt_dir = short_run
    with pytest.raises(ConfigError, match=r"another config \(sft\.lr: 0\.003 -> 0\.001\).*--fresh"):
        TR.train(TR.load_config(path, {"sft.lr": 0.001}))
    state = ckpt_dir / "step-00000008" / ckpt.STATE_JSON
    meta = json.loads(state.read_text())
    meta["world_size"] = 2
    state.write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=r"written by 2 process\(es\), this run has 1"):
        TR.train(TR.load_config(path))
    TR.train(TR.load_config(path), fresh=True)  # --fresh starts over
    assert (ckpt_dir.parent / "final/stage_summary.json").exists()


def test_resume_after_the_last_checkpoint_only_finishes_the_stage(short_run):
    path, _cfg, final, ckpt_dir = short_run
    metrics = ckpt_dir.parent / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"stage": "sft", "step": 9, "lo')  # a line cut short by a kill
    report = TR.train(TR.load_config(path))
    assert report["stages"][0]["val_loss"] == pytest.approx(
        json.loads(metrics.read_text().splitlines()[-1])["val_loss"]
    )
    assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()] == list(range(1, 9))
    again = load_file(ckpt_dir.parents[2] / "checkpoint/model.safetensors")
    assert all(torch.equal(again[k], final[k]) for k in final)


def test_completed_stage_is_skipped_only_with_the_same_config(
    tmp_path, train_dataset, tokenizer_dir, torch_threads
):
    path = write_config(tmp_path / "t.toml", train_dataset, tokenizer_dir, tmp_path / "out", steps=2)
    path.write_text(path.read_text().replace('stages = ["pretrain", "sft"]', 'stages = ["sft"]'))
    first = TR.train(TR.load_config(path))
    again = TR.train(TR.load_config(path, {"run.log_every": 5}))  # a logging key: skipped, same result
    assert again["stages"][0]["val_loss"] == first["stages"][0]["val_loss"]
    with pytest.raises(
        ConfigError, match=r"sft was completed in .* with another config \(sft\.steps: 2 -> 3\)"
    ):
        TR.train(TR.load_config(path, {"sft.steps": 3}))
