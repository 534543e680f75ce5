"""Checkpoints that transformers reads, and transformers checkpoints that we read: logits within 1e-5 (fp32)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import preset
from model.transformer import Transformer


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # tiny: GQA (4 heads, 2 KV heads) and tied embeddings
        {"tie_word_embeddings": False, "num_key_value_heads": 4},
        {"num_key_value_heads": 1, "rope_theta": 500000.0},
    ],
    ids=["gqa-tied", "mha-untied", "mqa-theta"],
)
def test_ours_to_transformers(tmp_path, overrides, torch_threads):
    cfg = preset("tiny", **overrides)
    model = Transformer(cfg)
    model.init_weights(seed=7)
    save_checkpoint(model.eval(), tmp_path / "ck")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ck").eval()
    assert isinstance(hf, LlamaForCausalLM)
    ids = torch.randint(0, cfg.vocab_size, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-5, rtol=0)


def test_transformers_to_ours(tmp_path, torch_threads):
    cfg = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    hf = LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = load_checkpoint(tmp_path / "hf")
    ids = torch.randint(0, 300, (3, 13))
    pos = torch.arange(13).expand(3, 13)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, pos), hf(ids).logits, atol=1e-5, rtol=0)


def test_tokenizer_and_model_load_offline_from_our_checkpoint(tiny_checkpoint, tiny_tokenizer):
    tok = AutoTokenizer.from_pretrained(tiny_checkpoint)
    text = "Grüße 你好, how are you?"
    assert tok(text, add_special_tokens=False)["input_ids"] == tiny_tokenizer.encode(text)
    assert tok.eos_token == "<|im_end|>"
