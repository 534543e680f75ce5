"""GGUF export: every key and tensor read back with gguf's own reader, a numpy forward pass in llama.cpp's
conventions (interleaved rotary pairs) against our PyTorch logits, and llama-cpp-python parity where installed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from export.gguf_export import gguf_tensor_names, permute_rotary_rows, unpermute_rotary_rows
from instructlm.cli import main

gguf = pytest.importorskip("gguf")

DEMO = Path(__file__).resolve().parents[2] / "runs" / "demo" / "checkpoint"


@pytest.fixture(scope="module")
def gguf_files(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    files = {}
    for t in ("f32", "f16", "q8_0"):
        files[t] = out / f"tiny.{t}.gguf"
        assert (
            main(
                ["export", "gguf", "--checkpoint", str(tiny_checkpoint), "--out", str(files[t]), "--type", t]
            )
            == 0
        )
    return files


def _fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _tensors(reader) -> dict[str, np.ndarray]:
    return {t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32) for t in reader.tensors}


def test_metadata_and_vocabulary(gguf_files, tiny_config, tiny_tokenizer):
    f = _fields(gguf.GGUFReader(gguf_files["f16"]))
    c = tiny_config
    assert f["general.architecture"] == "llama"
    assert f["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_F16)
    expected = {
        "llama.vocab_size": c.vocab_size,
        "llama.context_length": c.max_position_embeddings,
        "llama.embedding_length": c.hidden_size,
        "llama.block_count": c.num_hidden_layers,
        "llama.feed_forward_length": c.intermediate_size,
        "llama.attention.head_count": c.num_attention_heads,
        "llama.attention.head_count_kv": c.num_key_value_heads,
        "llama.rope.dimension_count": c.head_dim,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.eos_token_id": tiny_tokenizer.eos_id,
        "tokenizer.ggml.padding_token_id": tiny_tokenizer.pad_id,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": tiny_tokenizer.chat_template,
    }
    assert {k: f[k] for k in expected} == expected
    assert f["llama.rope.freq_base"] == pytest.approx(c.rope_theta)
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(c.rms_norm_eps)
    tokens = f["tokenizer.ggml.tokens"]
    assert tokens == [tiny_tokenizer.id_to_token(i) for i in range(c.vocab_size)]
    types = f["tokenizer.ggml.token_type"]
    control = [i for i, t in enumerate(types) if t == int(gguf.TokenType.CONTROL)]
    assert control == [tiny_tokenizer.endoftext_id, tiny_tokenizer.im_start_id, tiny_tokenizer.eos_id]
    merges = json.loads(tiny_tokenizer.hf.to_str())["model"]["merges"]
    assert f["tokenizer.ggml.merges"] == [" ".join(m) for m in merges]


def _checkpoint_tensors(checkpoint, config):
    """The checkpoint's tensors under llama.cpp's names, q/k rows permuted, as the file should hold them."""
    sd = load_file(str(checkpoint / "model.safetensors"))
    want = {}
    for hf, name in gguf_tensor_names(config.num_hidden_layers, config.tie_word_embeddings).items():
        w = sd[hf]
        if "q_proj" in hf:
            w = permute_rotary_rows(w, config.num_attention_heads)
        elif "k_proj" in hf:
            w = permute_rotary_rows(w, config.num_key_value_heads)
        want[name] = w
    return want


def test_every_tensor_round_trips(gguf_files, tiny_checkpoint, tiny_config):
    want = _checkpoint_tensors(tiny_checkpoint, tiny_config)
    assert "output.weight" not in want  # tied: llama.cpp reuses token_embd
    for kind, path in gguf_files.items():
        reader = gguf.GGUFReader(path)
        got = _tensors(reader)
        assert sorted(got) == sorted(want), kind
        types = {t.name: t.tensor_type for t in reader.tensors}
        for name, w in want.items():
            assert got[name].shape == w.shape, (kind, name)
            if w.ndim == 1 or kind == "f32":
                assert types[name] == gguf.GGMLQuantizationType.F32
                np.testing.assert_array_equal(got[name], w)
            elif kind == "f16":
                assert types[name] == gguf.GGMLQuantizationType.F16
                np.testing.assert_array_equal(got[name], w.astype(np.float16).astype(np.float32))
            else:
                # q8_0: per block of 32, scale = max|w| / 127 stored in f16; rounding error at most half a step
                # (plus the f16 rounding of the scale, relative 2^-11, times 127 steps).
                assert types[name] == gguf.GGMLQuantizationType.Q8_0
                blocks = w.reshape(-1, 32)
                step = np.abs(blocks).max(1, keepdims=True) / 127
                bound = step * (0.5 + 127 * 2.0**-11) + 1e-12
                assert (np.abs(got[name].reshape(-1, 32) - blocks) <= bound).all(), name


def test_permutation_inverts():
    w = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)  # 2 heads of head_dim 4
    p = permute_rotary_rows(w, 2)
    # head 0 rows [0, 1, 2, 3] (halves [0, 1] and [2, 3]) become [0, 2, 1, 3]
    np.testing.assert_array_equal(p[:, 0], w[[0, 2, 1, 3, 4, 6, 5, 7], 0])
    np.testing.assert_array_equal(unpermute_rotary_rows(p, 2), w)


def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope_interleaved(x, pos, theta):
    """llama.cpp's LLAMA rope (mode 0): rotate adjacent pairs (2i, 2i+1) by pos * theta^(-2i/D). x [S, H, D]."""
    d = x.shape[-1]
    ang = pos[:, None] * theta ** (-np.arange(0, d, 2) / d)[None, :]  # [S, D/2]
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = a * cos - b * sin
    out[..., 1::2] = a * sin + b * cos
    return out


def gguf_forward(path, ids: list[int], undo_permutation: bool = False) -> np.ndarray:
    """A numpy llama forward over the GGUF file alone, in llama.cpp's conventions -> logits [S, V] (float64)."""
    reader = gguf.GGUFReader(path)
    f, t = _fields(reader), {k: v.astype(np.float64) for k, v in _tensors(reader).items()}
    if undo_permutation:  # what a converter that forgot the permutation would have written
        for name in t:
            if name.endswith("attn_q.weight"):
                t[name] = unpermute_rotary_rows(t[name], f["llama.attention.head_count"])
            elif name.endswith("attn_k.weight"):
                t[name] = unpermute_rotary_rows(t[name], f["llama.attention.head_count_kv"])
    n_layers, heads, kv = (
        f["llama.block_count"],
        f["llama.attention.head_count"],
        f["llama.attention.head_count_kv"],
    )
    eps, theta = f["llama.attention.layer_norm_rms_epsilon"], f["llama.rope.freq_base"]
    x = t["token_embd.weight"][ids]  # [S, H]
    s = len(ids)
    pos = np.arange(s, dtype=np.float64)
    causal = np.tril(np.ones((s, s), bool))
    for i in range(n_layers):
        h = _rms(x, t[f"blk.{i}.attn_norm.weight"], eps)
        q = (h @ t[f"blk.{i}.attn_q.weight"].T).reshape(s, heads, -1)
        k = (h @ t[f"blk.{i}.attn_k.weight"].T).reshape(s, kv, -1)
        v = (h @ t[f"blk.{i}.attn_v.weight"].T).reshape(s, kv, -1)
        d = q.shape[-1]
        q, k = _rope_interleaved(q, pos, theta), _rope_interleaved(k, pos, theta)
        rep = heads // kv
        att = np.einsum("qhd,khd->hqk", q, np.repeat(k, rep, axis=1)) / np.sqrt(d)
        att = np.where(causal, att, -np.inf)
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        o = np.einsum("hqk,khd->qhd", att, np.repeat(v, rep, axis=1)).reshape(s, heads * d)
        x = x + o @ t[f"blk.{i}.attn_output.weight"].T
        h = _rms(x, t[f"blk.{i}.ffn_norm.weight"], eps)
        g = h @ t[f"blk.{i}.ffn_gate.weight"].T
        x = (
            x
            + ((g / (1 + np.exp(-g))) * (h @ t[f"blk.{i}.ffn_up.weight"].T)) @ t[f"blk.{i}.ffn_down.weight"].T
        )
    x = _rms(x, t["output_norm.weight"], eps)
    return x @ t.get("output.weight", t["token_embd.weight"]).T


def test_llama_cpp_conventions_reproduce_our_logits(gguf_files, tiny_model):
    """Interleaved rotary over the permuted q/k rows computes what our half-split rotary computes: the f32 file
    run in llama.cpp's conventions gives our logits (fp32 vs float64: ~1e-6)."""
    ids = [5, 17, 300, 42, 9, 88, 120, 3, 64, 77, 250, 11]
    with torch.no_grad():
        ref = tiny_model(torch.tensor([ids]))[0].double().numpy()
    got = gguf_forward(gguf_files["f32"], ids)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    # Without the permutation the same forward is wrong: the comparison above can fail.
    unpermuted = gguf_forward(gguf_files["f32"], ids, undo_permutation=True)
    assert np.abs(unpermuted - ref).max() > 1e-3


def test_refuses_existing_output_and_bad_checkpoint(gguf_files, tmp_path, capsys, tiny_checkpoint):
    existing = gguf_files["f16"]
    assert main(["export", "gguf", "--checkpoint", str(tiny_checkpoint), "--out", str(existing)]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert (
        main(["export", "gguf", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "x.gguf")])
        == 2
    )
    assert "checkpoint directory does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama-cpp-python not installed (the `bench` extra; it compiles llama.cpp for ~12 minutes)",
)
def test_llama_cpp_greedy_matches_ours(tmp_path, tiny_checkpoint):
    """f32 greedy generation in llama.cpp matches ours for 32 tokens, and its tokenizer splits text as ours does
    (demo model when `make demo` has run, else the tiny one)."""
    from llama_cpp import Llama

    from model.checkpoint import load_checkpoint
    from model.generate import generate
    from model.sampling import GREEDY
    from model.tokenizer import Tokenizer

    ckpt = DEMO if (DEMO / "model.safetensors").exists() else tiny_checkpoint
    out = tmp_path / "m.gguf"
    assert main(["export", "gguf", "--checkpoint", str(ckpt), "--out", str(out), "--type", "f32"]) == 0
    tok = Tokenizer.load(ckpt)
    prompt = tok.encode("Hello! How do I reset my password?")
    ours = generate(load_checkpoint(ckpt), [prompt], 32, GREEDY, stop_ids=())[0].tokens
    llm = Llama(model_path=str(out), n_ctx=256, n_threads=1, logits_all=False, verbose=False)
    # llama.cpp's own tokenizer, driven by the GGUF vocabulary, merges and `pre = gpt-2`, splits as ours does.
    for text in (
        "Hello! How do I reset my password?",
        "Grüße aus Berlin!",
        "我的手机丢了。",
        "<|im_start|>user\nhi<|im_end|>",
    ):
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text), text
    theirs = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0, reset=True):
        theirs.append(token)
        if len(theirs) == 32:
            break
    assert theirs == ours
