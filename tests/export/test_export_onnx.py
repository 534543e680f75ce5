"""`instructlm export onnx`: the bundle's files and report, the optimum-layout graph driven the way transformers
drives it, int8 against a fake-quantized PyTorch reference, and bad input."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from export.onnx_export import KV_CHUNK, rotation_matmuls
from export.runtime import OnnxRunner
from instructlm.cli import main
from model.generate import ragged_batch

TOL = 1e-4  # issue 7's gate for fp32 files


@pytest.fixture(scope="module")
def report(tiny_bundle):
    return json.loads((tiny_bundle / "export_report.json").read_text())


def test_bundle_layout(tiny_bundle):
    for name in (
        "model.onnx",
        "model.int8.onnx",
        "optimum/model.onnx",
        "optimum/config.json",
        "optimum/tokenizer.json",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "export_report.json",
    ):
        assert (tiny_bundle / name).is_file(), name
    assert not list(tiny_bundle.glob("*.raw.onnx"))  # the unoptimized export is checked, then not shipped


def test_report_parity_within_gate(report):
    assert report["passed"] is True
    for name in ("model.onnx", "optimum/model.onnx"):
        parity = report["files"][name]["parity"]
        errors = {k: v for k, v in parity.items() if k.endswith("_max_abs")}
        assert len(errors) == 4 and all(v <= TOL for v in errors.values()), (name, errors)
        assert parity["decode_steps"] >= 8
        assert len(set(parity["rows"])) == len(parity["rows"])  # ragged: every row a different length
    served = report["files"]["model.onnx"]["parity"]
    assert served["greedy_tokens"] == 64 and served["greedy_identical"] is True
    assert all(v <= TOL for k, v in report["exported_graph_parity"].items() if k.endswith("_max_abs"))


def test_report_counts_ops_and_shows_fusions(report):
    ops = report["ops"]
    exported, optimized, int8 = ops["served_exported"], ops["served_optimized"], ops["served_int8"]
    # RMSNorm is Pow/ReduceMean/Add/Sqrt/Div/Mul as exported; fused into one op per norm (2 layers x 2 + final).
    assert exported.get("SimplifiedLayerNormalization", 0) == 0 and exported["ReduceMean"] == 5
    assert optimized["SimplifiedLayerNormalization"] == 5 and "ReduceMean" not in optimized
    assert sum(optimized.values()) < sum(exported.values())
    # int8: every weight MatMul (4 per layer: qkv, o, gate_up, down; + lm_head) runs on int8 weights.
    quantized = int8.get("com.microsoft.DynamicQuantizeMatMul", 0) + int8.get(
        "com.microsoft.MatMulIntegerToFloat", 0
    )
    assert quantized == 2 * 4 + 1


def test_graphs_check_and_have_dynamic_axes(tiny_bundle, tiny_gather_bundle, report):
    assert report["onnx_checker"] == {"served (as exported)": "passed", "optimum/model.onnx": "passed"}
    for name in ("model.onnx", "optimum/model.onnx"):
        model = onnx.load(str(tiny_bundle / name))
        if name == "optimum/model.onnx":
            onnx.checker.check_model(model, full_check=True)
        dims = {
            i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in model.graph.input
        }
        assert dims["input_ids"] == (
            ["batch", "seq"] if name == "model.onnx" else ["batch_size", "sequence_length"]
        )

    def input_dims(bundle):
        served = onnx.load(str(bundle / "model.onnx"))
        dims = {
            i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in served.graph.input
        }
        return served, dims

    # The slot design: the whole cache of a layer, slot ids per row, one SlotAttention node per layer.
    served, dims = input_dims(tiny_bundle)
    assert report["served_graph"]["attention"] == "slot"
    assert dims["slot_ids"] == dims["seq_lens"] == ["rows"]
    assert dims["past_key.0"] == ["slots", 2, "cache_len", 16]  # 2 KV heads, head_dim 16
    layers = report["config"]["num_hidden_layers"]
    assert report["ops"]["served_optimized"]["ai.instructlm.SlotAttention"] == layers
    assert {o.domain: o.version for o in served.opset_import}["ai.instructlm"] == 1
    # The gather design: standard ops only, chunk rows of the cache picked by kv_index.
    served, dims = input_dims(tiny_gather_bundle)
    assert dims["kv_index"] == ["batch", 2, "past"]
    assert dims["past_key.0"] == ["cache_rows", 16 * KV_CHUNK]  # head_dim 16, KV_CHUNK positions a row
    assert not [n.op_type for n in served.graph.node if n.domain == "ai.instructlm"]


def test_optimum_graph_generates_like_transformers(tiny_bundle, tiny_checkpoint):
    """Drive optimum/model.onnx the way transformers' generate drives a Llama (left padding, position ids from
    the mask, present fed back as past) and compare with transformers itself on the same checkpoint."""
    import onnxruntime as ort
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, torch_dtype=torch.float32).eval()
    prompts = [[5, 17, 300, 42, 9, 88, 120], [64, 77, 250]]
    width = max(map(len, prompts))
    ids = np.zeros((2, width), np.int64)
    mask = np.zeros((2, width), np.int64)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = p, 1
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            max_new_tokens=16,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )[:, width:].numpy()
        first = hf(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits[:, -1].numpy()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(
        str(tiny_bundle / "optimum/model.onnx"), opts, providers=["CPUExecutionProvider"]
    )
    names = [i.name for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
    past = {n: np.zeros((2, 2, 0, 16), np.float32) for n in names}
    pos = np.clip(mask.cumsum(1) - 1, 0, None)
    feed_ids, out = ids, []
    for step in range(16):
        res = sess.run(None, {"input_ids": feed_ids, "attention_mask": mask, "position_ids": pos, **past})
        if step == 0:
            np.testing.assert_allclose(res[0][:, -1], first, atol=TOL, rtol=0)
        nxt = res[0][:, -1].argmax(-1)
        out.append(nxt)
        past = dict(zip(names, res[1:], strict=True))
        feed_ids = nxt[:, None]
        pos = pos[:, -1:] + 1
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
    np.testing.assert_array_equal(np.stack(out, 1), ref)


def _fake_quant(model):
    """The reference for int8: PyTorch with every Linear's weight rounded to int8 per output channel (symmetric)
    and its input to uint8 per tensor (asymmetric), as onnxruntime's dynamic quantization does."""
    q = copy.deepcopy(model)

    def quant_input(_, args):
        x = args[0]
        lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
        scale = (hi - lo) / 255
        zero = round(-lo / scale)
        return ((((x / scale).round() + zero).clamp(0, 255) - zero) * scale,)

    with torch.no_grad():
        for mod in q.modules():
            if isinstance(mod, torch.nn.Linear):
                w = mod.weight
                s = w.abs().amax(1, keepdim=True) / 127
                mod.weight = torch.nn.Parameter((w / s).round().clamp(-127, 127) * s)
                mod.register_forward_pre_hook(quant_input)
    return q


def test_int8_error_within_twice_a_fake_quantized_reference(tiny_bundle, tiny_model, report):
    rng = np.random.default_rng(3)
    rows = [rng.integers(3, tiny_model.config.vocab_size, n).tolist() for n in (7, 3, 12)]
    ids, pos = ragged_batch(rows)
    with torch.no_grad():
        ref, fq = tiny_model(ids, pos), _fake_quant(tiny_model)(ids, pos)
    ref_err = float((ref - fq).abs()[pos >= 0].max())
    runner = OnnxRunner(tiny_bundle, 3, 64, model_file="model.int8.onnx")
    got = runner.prefill(rows, [0, 1, 2], [0, 0, 0], all_logits=True)
    err = max(
        float(np.abs(g - ref[i, : len(r)].numpy()).max())
        for i, (g, r) in enumerate(zip(got, rows, strict=True))
    )
    assert 0 < err <= 2 * ref_err
    # The rotary's +-1 permutation MatMuls (two per layer) stay fp32: int8 would only round their activations.
    assert len(rotation_matmuls(tiny_bundle / "model.int8.onnx")) == 2 * tiny_model.config.num_hidden_layers
    q = report["int8"]
    assert q["size_ratio"] < 0.75
    assert q["val_tokens"] > 100 and np.isfinite(q["perplexity_int8"])
    assert q["perplexity_rel_change"] == pytest.approx(q["perplexity_int8"] / q["perplexity_fp32"] - 1)


# --- bad input -------------------------------------------------------------------------------------------------
def test_refuses_existing_output_unless_forced(tiny_checkpoint, tiny_bundle, tmp_path, capsys):
    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, out)
    (out / "model.int8.onnx").unlink()
    assert main(["export", "onnx", "--checkpoint", str(tiny_checkpoint), "--out", str(out)]) == 2
    assert f"{out}: already exists; pass --force" in capsys.readouterr().err
    assert main(["export", "onnx", "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--force"]) == 0
    printed = capsys.readouterr().out
    assert "model.onnx" in printed and "greedy 64 identical: True" in printed
    assert json.loads((out / "export_report.json").read_text())["passed"] is True
    assert not (out / "model.int8.onnx").exists()  # replaced whole, nothing stale left behind
    assert not list(tmp_path.glob(".bundle.*"))  # no temporary directory left


def test_failed_parity_exits_1_and_says_so(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    import export.onnx_export as ox

    monkeypatch.setattr(ox, "FP32_TOL", 0.0)  # no fp32 graph matches PyTorch bit for bit
    out = tmp_path / "bundle"
    assert main(["export", "onnx", "--checkpoint", str(tiny_checkpoint), "--out", str(out)]) == 1
    assert "parity check FAILED" in capsys.readouterr().err
    rep = json.loads((out / "export_report.json").read_text())
    assert rep["passed"] is False and rep["files"]["model.onnx"]["parity"]["passed"] is False


def test_refuses_to_replace_a_directory_that_is_not_a_bundle(tiny_checkpoint, tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    assert (
        main(
            [
                "export",
                "onnx",
                "--checkpoint",
                str(tiny_checkpoint),
                "--out",
                str(tmp_path / "notes"),
                "--force",
            ]
        )
        == 2
    )
    assert "is not a bundle; refusing" in capsys.readouterr().err
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


def test_missing_checkpoint(tmp_path, capsys):
    assert main(["export", "onnx", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "b")]) == 2
    assert "checkpoint directory does not exist" in capsys.readouterr().err


def test_corrupt_checkpoint(tiny_checkpoint, tmp_path, capsys):
    bad = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 3])
    assert main(["export", "onnx", "--checkpoint", str(bad), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors" in err and err.count("\n") == 1
    assert not (tmp_path / "b").exists()


def test_checkpoint_without_tokenizer(tiny_checkpoint, tmp_path, capsys):
    bad = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, bad)
    (bad / "tokenizer.json").unlink()
    assert main(["export", "onnx", "--checkpoint", str(bad), "--out", str(tmp_path / "b")]) == 2
    assert "tokenizer.json missing" in capsys.readouterr().err


def test_checkpoint_without_generation_config_gets_one(tiny_checkpoint, tmp_path, tiny_config):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    (ckpt / "generation_config.json").unlink()
    assert main(["export", "onnx", "--checkpoint", str(ckpt), "--out", str(tmp_path / "b")]) == 0
    gen = json.loads((tmp_path / "b" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tiny_config.eos_token_id and gen["do_sample"] is False


def test_bad_val_data_names_file_and_line(tiny_checkpoint, tmp_path, capsys):
    val = tmp_path / "val.jsonl"
    val.write_text('{"text": "fine"}\n{"text": broken\n')
    args = [
        "export",
        "onnx",
        "--checkpoint",
        str(tiny_checkpoint),
        "--out",
        str(tmp_path / "b"),
        "--quantize",
        "int8",
    ]
    assert main([*args, "--val-data", str(val)]) == 2
    assert f"{val}:2: not valid JSON" in capsys.readouterr().err


def test_untied_multi_head_variant_exports_within_gate(tiny_tokenizer, tmp_path, torch_threads):
    """The other shape branches: one query head per KV head (no grouping) and an untied LM head."""
    from export.onnx_export import export_bundle
    from model.checkpoint import save_checkpoint
    from model.config import preset
    from model.transformer import Transformer

    cfg = preset(
        "tiny",
        vocab_size=tiny_tokenizer.vocab_size,
        num_hidden_layers=1,
        num_key_value_heads=4,
        tie_word_embeddings=False,
        pad_token_id=tiny_tokenizer.pad_id,
    )
    model = Transformer(cfg)
    model.init_weights(seed=5)
    tiny_tokenizer.save(tmp_path / "tok", model_max_length=cfg.max_position_embeddings)
    ckpt = save_checkpoint(model.eval(), tmp_path / "ckpt", tokenizer_dir=tmp_path / "tok")
    rep = export_bundle(ckpt, tmp_path / "bundle")
    assert rep["passed"] is True
    assert rep["files"]["model.onnx"]["parity"]["greedy_identical"] is True
    assert "model.int8.onnx" not in rep["files"]
