"""`instructlm train` with a [lora] section: fine-tunes a checkpoint it loads, trains only the adapters, merges
them into a plain final checkpoint, and resumes a LoRA run exactly."""

# ruff: noqa: F811  (pytest fixtures imported from train_fixtures are redefined as test arguments)
from __future__ import annotations

import shutil

import pytest
from safetensors.torch import load_file

from instructlm.cli import main
from tests.training.train_fixtures import tokenizer_dir, train_dataset, write_config  # noqa: F401
from training import train as TR

LORA = '\n[lora]\nr = 4\nalpha = 8\ntarget_modules = ["q_proj", "v_proj"]\n'


def _config(tmp_path, name, dataset, tok, init, extra=LORA):
    path = write_config(
        tmp_path / f"{name}.toml",
        dataset,
        tok,
        tmp_path / name,
        extra=extra,
        steps=6,
        checkpoint_every=3,
        warmup_steps=2,
    )
    text = path.read_text().replace('stages = ["pretrain", "sft"]', 'stages = ["sft"]')
    text = text.replace('[model]\npreset = "tiny"', f'[model]\npreset = "tiny"\ninit_from = "{init}"')
    path.write_text(text)
    return path


def _weights(directory):
    return load_file(str(directory / "model.safetensors"))


def test_lora_fine_tunes_a_checkpoint_and_merges_only_the_targets(
    tmp_path, train_dataset, tokenizer_dir, tiny_checkpoint, torch_threads
):
    cfg = TR.load_config(_config(tmp_path, "a", train_dataset, tokenizer_dir, tiny_checkpoint))
    TR.train(cfg)
    final = tmp_path / "a" / "checkpoint"
    before, after = _weights(tiny_checkpoint), _weights(final)
    assert set(before) == set(after)  # a plain checkpoint: no base_layer / lora_ names
    changed = sorted(k for k in before if not (before[k] == after[k]).all())
    # Only the adapted projections moved (by the merged B A); embeddings, norms, k/o/MLP are bit-identical.
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)
    assert len(changed) == 2 * 2  # q and v in each of the 2 layers
    step3 = tmp_path / "a" / "train" / "sft" / "ckpt" / "step-00000003"
    adapters = load_file(str(step3 / "adapter_model.safetensors"))
    assert adapters and all(".lora_" in k for k in adapters)
    # The training checkpoint's weights are the frozen base, not merged ones.
    base = _weights(step3)
    assert all((base[k] == before[k]).all() for k in before)


def test_a_lora_run_resumes_exactly(tmp_path, train_dataset, tokenizer_dir, tiny_checkpoint, torch_threads):
    full = TR.load_config(_config(tmp_path, "full", train_dataset, tokenizer_dir, tiny_checkpoint))
    TR.train(full)
    cut = TR.load_config(_config(tmp_path, "cut", train_dataset, tokenizer_dir, tiny_checkpoint))
    TR.train(cut)
    # Pretend the run died after step 3: drop what came later, then run the same command again.
    stage = tmp_path / "cut" / "train" / "sft"
    shutil.rmtree(stage / "final")
    shutil.rmtree(stage / "ckpt" / "step-00000006")
    shutil.rmtree(tmp_path / "cut" / "checkpoint")
    TR.train(cut)
    a, b = _weights(tmp_path / "full" / "checkpoint"), _weights(tmp_path / "cut" / "checkpoint")
    assert all((a[k] == b[k]).all() for k in a)


def test_a_bad_lora_target_in_the_recipe_is_one_clear_line(
    tmp_path, train_dataset, tokenizer_dir, tiny_checkpoint, capsys
):
    bad = '\n[lora]\ntarget_modules = ["q_proj", "qkv_proj"]\n'
    path = _config(tmp_path, "bad", train_dataset, tokenizer_dir, tiny_checkpoint, extra=bad)
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert (
        "lora.target_modules: no linear layer named 'qkv_proj'" in err and len(err.strip().splitlines()) == 1
    )


@pytest.mark.parametrize(
    ("line", "message"),
    [("r = 0", "lora.r must be at least 1"), ("rank = 4", "unknown field `rank` - at `lora`")],
)
def test_bad_lora_settings_are_config_errors(
    tmp_path, train_dataset, tokenizer_dir, tiny_checkpoint, line, message
):
    from model.errors import ConfigError

    path = _config(
        tmp_path, "bad", train_dataset, tokenizer_dir, tiny_checkpoint, extra=f"\n[lora]\n{line}\n"
    )
    with pytest.raises(ConfigError, match=message):
        TR.load_config(path)
