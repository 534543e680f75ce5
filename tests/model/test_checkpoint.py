"""Bad checkpoints fail with one message naming the file and the tensor or field; pickles are refused."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.checkpoint import checkpoint_info, load_checkpoint, save_checkpoint
from model.errors import CheckpointError


@pytest.fixture
def ck(tmp_path, tiny_checkpoint):
    dst = tmp_path / "ck"
    shutil.copytree(tiny_checkpoint, dst)
    return dst


def test_round_trip_is_exact(ck, tiny_model):
    model = load_checkpoint(ck)
    for (name, a), (_, b) in zip(
        sorted(model.state_dict().items()), sorted(tiny_model.state_dict().items()), strict=True
    ):
        assert torch.equal(a, b), name
    assert model.lm_head.weight is model.embed_tokens.weight  # still tied after load


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")


def test_missing_tensor_is_named(ck):
    sd = load_file(ck / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, ck / "model.safetensors")
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors: tensor model\.layers\.1\.mlp\.up_proj\.weight is missing"
    ):
        load_checkpoint(ck)


def test_shape_mismatch_names_tensor_and_shapes(ck):
    cfg = json.loads((ck / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError,
        match=r"tensor model\.layers\.0\.mlp\.down_proj\.weight has shape \[64, 192\], config\.json implies \[64, 128\]",
    ):
        load_checkpoint(ck)


def test_unknown_model_type(ck):
    cfg = json.loads((ck / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: model_type is 'gpt2'"):
        load_checkpoint(ck)


def test_truncated_weights(ck):
    data = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_checkpoint(ck)


def test_missing_config_field(ck):
    cfg = json.loads((ck / "config.json").read_text())
    del cfg["hidden_size"]
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="missing field.*hidden_size"):
        load_checkpoint(ck)


def test_pickle_only_directory_is_refused_without_unpickling(tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text("{}")
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"x": Exploit()}, d / "pytorch_model.bin")
    with pytest.raises(
        CheckpointError, match=r"only pickle weights found \(pytorch_model\.bin\).*arbitrary code"
    ):
        load_checkpoint(d)
    assert not marker.exists()


def test_save_replaces_atomically_and_leaves_no_temp_files(tmp_path, tiny_model):
    out = tmp_path / "ck"
    save_checkpoint(tiny_model, out)
    first = (out / "model.safetensors").read_bytes()
    save_checkpoint(tiny_model, out)
    assert (out / "model.safetensors").read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_info_reports_parameters_without_loading(tiny_checkpoint, tiny_model):
    info = checkpoint_info(tiny_checkpoint)
    assert info["parameters"] == tiny_model.num_parameters()
    assert info["dtypes"] == {"F32": tiny_model.num_parameters()}
    assert info["has_tokenizer"]
