"""`torchrun --nproc_per_node=2` (gloo, CPU) under DDP and FSDP2 equals one process with the same global batch,
with ranks carrying different numbers of label tokens."""
# ruff: noqa: F811  (pytest fixtures imported from train_fixtures are redefined as test arguments)

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.training.train_fixtures import tokenizer_dir, train_dataset, write_config  # noqa: F401
from training import train as TR

REPO = Path(__file__).resolve().parents[2]
# 3 SFT steps, 4 packed rows per step: one process runs 2 micro-batches of 2, two processes one of 2 each.
STEPS = 3


def _sft_only(path: Path) -> Path:
    path.write_text(path.read_text().replace('stages = ["pretrain", "sft"]', 'stages = ["sft"]'))
    return path


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, train_dataset, tokenizer_dir):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("one")
    cfg = _sft_only(
        write_config(
            root / "t.toml",
            train_dataset,
            tokenizer_dir,
            root / "out",
            steps=STEPS,
            batch_size=2,
            grad_accum=2,
        )
    )
    TR.train(TR.load_config(cfg))
    return root / "out"


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "train/sft/metrics.jsonl").read_text().splitlines()]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one(strategy, one_process, tmp_path, train_dataset, tokenizer_dir):
    cfg = _sft_only(
        write_config(
            tmp_path / "t.toml",
            train_dataset,
            tokenizer_dir,
            tmp_path / "out",
            steps=STEPS,
            batch_size=2,
            grad_accum=1,
            extra=f'distributed = "{strategy}"',
        )
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "instructlm",
            "train",
            "--config",
            str(cfg),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    two, one = _metrics(tmp_path / "out"), _metrics(one_process)
    assert len(two) == len(one) == STEPS
    # The ranks' label-token counts differ (packed chats of very different lengths), so a per-rank mean would
    # weigh them wrongly; the all-reduced count keeps the global mean.
    assert any(r["rank_label_tokens"][0] != r["rank_label_tokens"][1] for r in two)
    for a, b in zip(two, one, strict=True):
        assert a["label_tokens"] == b["label_tokens"] == sum(a["rank_label_tokens"])
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(b["loss"])
        # Adam hides a constant gradient scale in the weights; the pre-clip norm does not.
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * b["grad_norm"]
    assert abs(two[-1]["val_loss"] - one[-1]["val_loss"]) <= 1e-5 * one[-1]["val_loss"]
    wa = load_file(tmp_path / "out/checkpoint/model.safetensors")
    wb = load_file(one_process / "checkpoint/model.safetensors")
    for k in wb:
        assert _rel(wa[k], wb[k]) <= 1e-5, k
