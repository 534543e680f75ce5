"""The optimizer step: accumulation normalized by label tokens, decay groups, schedule, non-finite steps, configs."""
# ruff: noqa: F811  (pytest fixtures imported from train_fixtures are redefined as test arguments)

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from model.errors import CheckpointError, ConfigError
from tests.training.train_fixtures import tokenizer_dir, train_dataset, write_config  # noqa: F401
from training import distributed as D
from training import tokens as T
from training import train as TR

ONE = D.DistInfo(0, 1, 0, torch.device("cpu"))


def _rows(tiny_tokenizer, dataset, n: int, seq_len: int = 48) -> list[T.Row]:
    data = T.sft_examples(tiny_tokenizer, T.read_records(dataset, "train"), seq_len)
    examples = [ex for t in sorted(data.by_task) for ex in data.by_task[t]]
    return T.pack_in_order(examples, seq_len, tiny_tokenizer.pad_id)[:n]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def test_accumulation_equals_one_large_batch_under_uneven_masks(tiny_model, tiny_tokenizer, train_dataset):
    rows = _rows(tiny_tokenizer, train_dataset, 6)
    # Make the micro-batches deliberately uneven: the first keeps a single labelled token per row.
    for r in rows[:2]:
        keep = np.flatnonzero(r.labels != T.IGNORE)[:1]
        mask = np.full_like(r.labels, T.IGNORE)
        mask[keep] = r.labels[keep]
        r.labels[:] = mask
    counts = [int((r.labels != T.IGNORE).sum()) for r in rows]
    assert counts[0] + counts[1] < (counts[2] + counts[3]) / 4  # very different per micro-batch

    o = TR.OptimSection(grad_clip=0.0)
    big, small = copy.deepcopy(tiny_model).train(), copy.deepcopy(tiny_model).train()
    opt_big, opt_small = TR.build_optimizer(big, o, 1e-3), TR.build_optimizer(small, o, 1e-3)

    loss_big, n_big = TR.accumulate(big, [TR.to_batch(rows, torch.device("cpu"))], ONE)
    micro = [TR.to_batch(rows[i : i + 2], torch.device("cpu")) for i in range(0, 6, 2)]
    loss_small, n_small = TR.accumulate(small, micro, ONE)
    assert n_big == n_small == sum(counts)
    assert abs(loss_big - loss_small) <= 1e-6 * abs(loss_big)
    for (name, pb), ps in zip(big.named_parameters(), small.parameters(), strict=True):
        assert _rel(ps.grad, pb.grad) <= 1e-6, name
    # The mean of per-micro-batch means (the common bug) is measurably different: the test can fail.
    with torch.no_grad():
        naive = np.mean([float(TR.loss_sum(big, b, None)) / int((b[2] != T.IGNORE).sum()) for b in micro])
    assert abs(naive - loss_big) > 1e-3

    opt_big.step()
    opt_small.step()
    for pb, ps in zip(big.parameters(), small.parameters(), strict=True):
        assert _rel(ps.detach(), pb.detach()) <= 1e-6


def test_weight_decay_only_on_matrices(tiny_model):
    groups = TR.param_groups(tiny_model, 0.1)
    assert groups[0]["weight_decay"] == 0.1 and all(p.dim() == 2 for p in groups[0]["params"])
    assert groups[1]["weight_decay"] == 0.0 and all(p.dim() == 1 for p in groups[1]["params"])
    n = len(list(tiny_model.parameters()))  # the tied embedding counted once
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == n
    assert len(groups[1]["params"]) == 2 * tiny_model.config.num_hidden_layers + 1  # the RMSNorm gains


def test_warmup_then_cosine():
    s = TR.StageSection(steps=110, lr=1.0, min_lr_ratio=0.1, warmup_steps=10)
    assert TR.lr_at(0, s) == pytest.approx(0.1) and TR.lr_at(9, s) == pytest.approx(1.0)
    assert TR.lr_at(10, s) == pytest.approx(1.0)
    assert TR.lr_at(60, s) == pytest.approx(0.55)  # half way: the mean of lr and min_lr
    assert TR.lr_at(110, s) == pytest.approx(0.1)
    lrs = [TR.lr_at(i, s) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


def test_nonfinite_step_is_skipped_and_training_continues(tiny_model, tiny_tokenizer, train_dataset):
    model = copy.deepcopy(tiny_model).train()
    opt = TR.build_optimizer(model, TR.OptimSection(), 1e-3)
    batch = [TR.to_batch(_rows(tiny_tokenizer, train_dataset, 2), torch.device("cpu"))]
    poison = model.layers[0].mlp.register_forward_hook(lambda m, i, out: out * float("nan"))
    before = [p.detach().clone() for p in model.parameters()]
    r = TR.train_step(model, opt, batch, ONE, TR.OptimSection(), 1e-3)
    poison.remove()
    assert not r.applied and math.isnan(r.loss)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert all(p.grad is None for p in model.parameters())  # nothing leaks into the next step
    r = TR.train_step(model, opt, batch, ONE, TR.OptimSection(), 1e-3)
    assert r.applied and math.isfinite(r.loss)
    assert not all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_diverging_run_stops_after_max_nonfinite(tmp_path, train_dataset, tokenizer_dir, torch_threads):
    """lr 1e30 blows the weights up on the first update; every later step is non-finite and skipped; the run stops
    after run.max_nonfinite of them in a row, with each skip in metrics.jsonl."""
    path = write_config(
        tmp_path / "t.toml",
        train_dataset,
        tokenizer_dir,
        tmp_path / "out",
        extra="max_nonfinite = 3",
        lr=1e30,
        warmup_steps=1,
        steps=20,
        checkpoint_every=100,
    )
    cfg = TR.load_config(path)
    with pytest.raises(TR.TrainingDiverged, match=r"3 non-finite steps in a row \(run\.max_nonfinite = 3\)"):
        TR.train(cfg)
    records = [
        json.loads(x) for x in (tmp_path / "out/train/pretrain/metrics.jsonl").read_text().splitlines()
    ]
    assert [r.get("skipped", False) for r in records][-3:] == [True, True, True]
    assert records[-1]["nonfinite_total"] == 3 and not records[0].get("skipped", False)


def test_unigram_baseline():
    train = np.array([1, 1, 1, 2, T.IGNORE])
    val = np.array([1, 2, T.IGNORE])
    # add-one over vocab 4: counts 1,4,2,1 -> p(1) = 4/8, p(2) = 2/8
    expected = -(math.log(4 / 8) + math.log(2 / 8)) / 2
    assert TR.unigram_loss(train, val, 4) == pytest.approx(expected)


def test_mistyped_config_key_names_it_and_suggests(tmp_path, train_dataset, tokenizer_dir):
    path = write_config(tmp_path / "t.toml", train_dataset, tokenizer_dir, tmp_path / "out")
    path.write_text(path.read_text().replace("warmup_steps", "warmup_step", 1))
    with pytest.raises(
        ConfigError,
        match=r"t\.toml: unknown key 'pretrain\.warmup_step'; did you mean 'pretrain\.warmup_steps'",
    ):
        TR.load_config(path)
    path = write_config(tmp_path / "t.toml", train_dataset, tokenizer_dir, tmp_path / "out")
    with pytest.raises(ConfigError, match=r"sft\.batch_size must be >= 1"):
        TR.load_config(path, {"sft.batch_size": 0})


def test_model_override_unknown_field(tmp_path, train_dataset, tokenizer_dir, tiny_tokenizer):
    path = write_config(tmp_path / "t.toml", train_dataset, tokenizer_dir, tmp_path / "out")
    cfg = TR.load_config(path, {"model.overrides": {"hiden_size": 32}})
    with pytest.raises(ConfigError, match="unknown field 'hiden_size'; did you mean 'hidden_size'"):
        TR.model_config(cfg, tiny_tokenizer)


def test_init_checkpoint_of_another_shape_is_refused(tmp_path, train_dataset, tokenizer_dir, tiny_checkpoint):
    path = write_config(tmp_path / "t.toml", train_dataset, tokenizer_dir, tmp_path / "out")
    cfg = TR.load_config(
        path, {"model.init_from": str(tiny_checkpoint), "model.overrides": {"hidden_size": 32}}
    )
    with pytest.raises(
        CheckpointError, match=r"does not match the requested model: hidden_size: checkpoint 64, requested 32"
    ):
        TR.train(cfg)


def test_dataset_without_manifest_via_cli(tmp_path, tokenizer_dir, capsys):
    from instructlm.cli import main

    (tmp_path / "ds").mkdir()
    path = write_config(tmp_path / "t.toml", tmp_path / "ds", tokenizer_dir, tmp_path / "out")
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no manifest.json" in err and str(tmp_path / "ds") in err


def test_max_seconds_ends_a_stage_early_and_says_so(
    tmp_path, train_dataset, tokenizer_dir, torch_threads, caplog
):
    import logging

    path = write_config(tmp_path / "t.toml", train_dataset, tokenizer_dir, tmp_path / "out", steps=100000)
    path.write_text(path.read_text().replace('stages = ["pretrain", "sft"]', 'stages = ["sft"]'))
    cfg = TR.load_config(path, {"sft.max_seconds": 0.5})
    with caplog.at_level(logging.WARNING):
        report = TR.train(cfg)
    sft = report["stages"][0]
    assert 1 <= sft["steps_done"] < 100000 and math.isfinite(sft["val_loss"])
    assert any("max_seconds 0 reached; stage ended at step" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "out/checkpoint/model.safetensors").exists()


def test_configs_shipped_load(tmp_path):
    from pathlib import Path

    for name in ("demo", "small"):
        cfg = TR.load_config(Path(__file__).resolve().parents[2] / f"configs/train/{name}.toml")
        assert cfg.stages == ["pretrain", "sft"]


@pytest.mark.slow
def test_compiled_run_writes_plain_checkpoints(tmp_path, train_dataset, tokenizer_dir, torch_threads):
    """run.compile: inductor on the CPU (about a minute to compile), state dicts still under plain names."""
    path = write_config(tmp_path / "t.toml", train_dataset, tokenizer_dir, tmp_path / "out", steps=2)
    path.write_text(path.read_text().replace('stages = ["pretrain", "sft"]', 'stages = ["sft"]'))
    report = TR.train(TR.load_config(path, {"run.compile": True}))
    assert math.isfinite(report["stages"][0]["val_loss"])
    from model.checkpoint import load_checkpoint

    load_checkpoint(tmp_path / "out/checkpoint")  # strict names and shapes


def test_time_capped_schedule_warms_up_and_decays_within_the_time():
    s = TR.StageSection(steps=100, lr=1.0, min_lr_ratio=0.1, warmup_steps=10)
    # A slow machine: 5 steps done but half the time gone -> past warmup, half way down... of the cosine part.
    assert TR.lr_at(5, s, time_fraction=0.55) == pytest.approx(TR.lr_at(55, s))
    assert TR.lr_at(3, s, time_fraction=1.0) == pytest.approx(0.1)
    # Time that does not bind changes nothing.
    assert all(TR.lr_at(i, s, time_fraction=i / 200) == TR.lr_at(i, s) for i in range(100))
