"""LoRA through peft on our Transformer: only adapters train, merged weights give the adapter model's logits, the
merged checkpoint is an ordinary one, and a bad target name is a clear error."""

from __future__ import annotations

import copy

import pytest
import torch

from model.errors import ConfigError
from training.lora import LoraSettings, add_lora, is_lora, lora_state_dict, merge_lora, trainable_parameters


def _randomize_b(model, seed=1):
    # B starts at zero (the adapted model equals the base); give it values so merging has something to merge.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.05)


def _ids(model, n=12):
    return torch.randint(3, model.config.vocab_size, (2, n), generator=torch.Generator().manual_seed(0))


def test_adapters_start_at_the_base_model_and_only_they_train(tiny_model):
    model = add_lora(copy.deepcopy(tiny_model), LoraSettings(r=4, alpha=8))
    ids = _ids(model)
    with torch.no_grad():
        assert torch.equal(model(ids), tiny_model(ids))  # B = 0
    trainable, total = trainable_parameters(model)
    # r (in + out) per adapted projection: q,o: 64x64; k,v: 64x32; gate,up: 64x192 (in 64, out 192); down: 192x64
    cfg = tiny_model.config
    h, kv, i = cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim, cfg.intermediate_size
    per_layer = 4 * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 3)
    assert trainable == per_layer * cfg.num_hidden_layers
    assert total == tiny_model.num_parameters() + trainable
    base_before = {n: p.clone() for n, p in model.named_parameters() if "lora_" not in n}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = torch.nn.functional.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base_before[n]), n
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_merged_weights_give_the_adapter_models_logits(tiny_model, dtype):
    model = add_lora(copy.deepcopy(tiny_model).to(dtype), LoraSettings(r=4, alpha=8, dropout=0.1))
    _randomize_b(model)
    model.eval()  # dropout off: the adapter model is deterministic
    ids = _ids(model)
    with torch.no_grad():
        adapted = model(ids)
        base = (
            tiny_model.to(dtype)(ids) if dtype == torch.float32 else copy.deepcopy(tiny_model).double()(ids)
        )
        merged_model = merge_lora(model)
        merged = merged_model(ids)
    assert not is_lora(merged_model) and type(merged_model).__name__ == "Transformer"
    assert set(merged_model.state_dict()) == set(tiny_model.state_dict())
    assert (adapted - base).abs().max() > 1e-3  # the adapter changed the logits, so the check below has teeth
    # Reordering x W^T + s (x A^T) B^T into x (W + s B A)^T changes rounding only: float64 ~1e-15, float32 ~1e-6
    # (logits of magnitude ~1 summed over 64-192 products).
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert (merged - adapted).abs().max() < tol


def test_merged_model_saves_as_an_ordinary_checkpoint(tiny_model, tiny_tokenizer, tmp_path):
    from model.checkpoint import load_checkpoint, save_checkpoint

    model = add_lora(
        copy.deepcopy(tiny_model), LoraSettings(r=2, alpha=4, target_modules=["q_proj", "up_proj"])
    )
    _randomize_b(model)
    assert all(".q_proj." in n or ".up_proj." in n for n in lora_state_dict(model))
    ids = _ids(model)
    with torch.no_grad():
        adapted = model.eval()(ids)
    out = save_checkpoint(merge_lora(model), tmp_path / "merged")
    with torch.no_grad():
        reloaded = load_checkpoint(out)(ids)
    assert (reloaded - adapted).abs().max() < 1e-5


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        (["qproj"], "no linear layer named 'qproj'; did you mean 'q_proj'?"),
        (["attention"], "no linear layer named 'attention'; known: down_proj, gate_proj, k_proj"),
        (["embed_tokens"], "'embed_tokens' is not a linear layer (Embedding)"),
        (["lm_head"], "'lm_head' shares its weight with embed_tokens"),
    ],
)
def test_a_bad_target_module_is_a_clear_error(tiny_model, targets, message):
    model = copy.deepcopy(tiny_model)
    with pytest.raises(ConfigError, match="lora.target_modules") as exc:
        add_lora(model, LoraSettings(target_modules=targets))
    assert message in str(exc.value)
    assert not is_lora(model)  # nothing was injected


def test_bad_settings_are_clear_errors(tiny_model):
    with pytest.raises(ConfigError, match="lora.r must be at least 1"):
        add_lora(copy.deepcopy(tiny_model), LoraSettings(r=0))
    with pytest.raises(ConfigError, match=r"lora.dropout must be in \[0, 1\)"):
        add_lora(copy.deepcopy(tiny_model), LoraSettings(dropout=1.0))


def test_state_helpers_round_trip_and_merge_like_peft(tiny_model):
    from training.lora import join_state, merged_state, split_state

    settings = LoraSettings(r=4, alpha=12, target_modules=["q_proj", "down_proj"])
    model = add_lora(copy.deepcopy(tiny_model), settings)
    _randomize_b(model)
    sd = model.state_dict()
    base, adapters = split_state(sd)
    assert set(base) == set(tiny_model.state_dict())
    assert (
        all(".lora_" in n for n in adapters) and len(adapters) == 2 * 2 * tiny_model.config.num_hidden_layers
    )
    joined = join_state(base, adapters)
    assert set(joined) == set(sd) and all(torch.equal(joined[k], sd[k]) for k in sd)
    merged = merged_state(sd, settings)
    reference = merge_lora(model).state_dict()  # peft's own merge
    assert set(merged) == set(reference)
    for k in reference:
        assert (merged[k] - reference[k]).abs().max() < 1e-6, k  # fp64 fold vs peft's fp32: ~1e-8 apart


def test_a_user_brought_llama_checkpoint_adapts_merges_and_loads_back_in_transformers(
    tmp_path, torch_threads
):
    """A checkpoint written by transformers (untied head, 8 heads over 2 KV heads) -> our model -> LoRA on every
    projection and lm_head -> merged checkpoint that transformers loads with the adapter model's logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from model.checkpoint import load_checkpoint, save_checkpoint

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
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "theirs")
    model = load_checkpoint(tmp_path / "theirs")
    add_lora(model, LoraSettings(r=4, alpha=8, target_modules=[*LoraSettings().target_modules, "lm_head"]))
    _randomize_b(model)
    ids = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        adapted = model.eval()(ids)
    save_checkpoint(merge_lora(model), tmp_path / "merged")
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        # Same tolerance as the interop test of our model against transformers (float32, different op order).
        torch.testing.assert_close(hf(ids).logits, adapted, atol=1e-5, rtol=0)
