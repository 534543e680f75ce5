"""The decoder: packing confines attention, the KV cache reproduces a full recompute, slots are independent."""

from __future__ import annotations

import copy

import pytest
import torch

from model.cache import KVCache
from model.config import PRESETS, ModelConfig, preset
from model.errors import ConfigError
from model.generate import generate, ragged_batch
from model.sampling import GREEDY
from model.transformer import Transformer


def test_presets_have_the_documented_sizes():
    assert preset("tiny").num_parameters() < 1_000_000
    demo = preset("demo")
    assert (demo.hidden_size, demo.num_hidden_layers, demo.num_attention_heads, demo.num_key_value_heads) == (
        256,
        6,
        8,
        4,
    )
    assert 6.4e6 < demo.num_parameters() < 6.6e6
    assert 90e6 < preset("small").num_parameters() < 110e6
    with torch.device("meta"):
        for name in PRESETS:
            cfg = preset(name)
            assert Transformer(cfg).num_parameters() == cfg.num_parameters()


def test_bad_config_names_the_field():
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        ModelConfig(num_attention_heads=8, num_key_value_heads=3)
    with pytest.raises(ConfigError, match="unknown model preset 'huge'"):
        preset("huge")


def test_forward_returns_logits_for_every_position(tiny_model):
    ids = torch.randint(0, tiny_model.config.vocab_size, (3, 7))
    with torch.no_grad():
        out = tiny_model(ids)
    assert out.shape == (3, 7, tiny_model.config.vocab_size)
    assert torch.isfinite(out).all()


def test_packed_examples_do_not_attend_across_the_boundary(tiny_model):
    torch.manual_seed(1)
    a = torch.randint(0, tiny_model.config.vocab_size, (1, 9))
    b = torch.randint(0, tiny_model.config.vocab_size, (1, 6))
    packed = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(9), torch.arange(6)]).unsqueeze(0)
    with torch.no_grad():
        out = tiny_model(packed, positions)
        alone_a, alone_b = tiny_model(a), tiny_model(b)
    torch.testing.assert_close(out[:, :9], alone_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(out[:, 9:], alone_b, atol=1e-5, rtol=0)
    # Without restarting positions the second example would see the first: the check above can fail.
    with torch.no_grad():
        leaky = tiny_model(packed)
    assert (leaky[:, 9:] - alone_b).abs().max() > 1e-3


def test_cached_decoding_matches_full_recompute_for_a_ragged_batch(tiny_model):
    torch.manual_seed(2)
    vocab = tiny_model.config.vocab_size
    prompts = [torch.randint(3, vocab, (n,)).tolist() for n in (5, 11, 1)]
    steps = 8
    results = generate(tiny_model, prompts, steps, GREEDY, return_logits=True)
    for prompt, res in zip(prompts, results, strict=True):
        assert len(res.tokens) == steps and res.finish_reason == "length"
        full = torch.tensor([prompt + res.tokens])
        with torch.no_grad():
            ref = tiny_model(full)[0]
        for t, logits in enumerate(res.logits):
            torch.testing.assert_close(
                torch.from_numpy(logits), ref[len(prompt) - 1 + t], atol=1e-5, rtol=0, msg=f"step {t}"
            )


def test_slots_are_independent_and_rows_join_between_steps(tiny_model):
    cfg = tiny_model.config
    cache = KVCache(cfg, num_slots=4, max_len=32)
    torch.manual_seed(3)
    a = torch.randint(0, cfg.vocab_size, (10,)).tolist()
    b = torch.randint(0, cfg.vocab_size, (4,)).tolist()
    with torch.no_grad():
        # Row A prefills into slot 2 alone.
        ids, pos = ragged_batch([a[:6]])
        tiny_model(ids, pos, cache, torch.tensor([2]))
        # Then A continues with a chunk while B joins in slot 0 with its prompt, in one ragged call.
        ids, pos = ragged_batch([a[6:], b], starts=[6, 0])
        out = tiny_model(ids, pos, cache, torch.tensor([2, 0]))
        ref_a, ref_b = tiny_model(torch.tensor([a]))[0], tiny_model(torch.tensor([b]))[0]
    torch.testing.assert_close(out[0, :4], ref_a[6:10], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1, :4], ref_b, atol=1e-5, rtol=0)
    assert cache.lengths.tolist() == [4, 0, 10, 0]
    cache.copy_prefix(2, 3, 10)
    assert torch.equal(cache.k[:, 3, :, :10], cache.k[:, 2, :, :10]) and cache.lengths[3] == 10


def test_cache_rejects_lengths_past_the_context(tiny_config):
    with pytest.raises(ValueError, match="max_position_embeddings"):
        KVCache(tiny_config, 1, max_len=tiny_config.max_position_embeddings + 1)


def test_generate_stops_on_a_stop_token(tiny_model):
    prompt = [5, 6, 7]
    first = generate(tiny_model, [prompt], 4, GREEDY)[0].tokens
    stop = first[-1]
    res = generate(tiny_model, [prompt], 4, GREEDY, stop_ids=[stop])[0]
    assert res.tokens == first[: first.index(stop) + 1] and res.finish_reason == "stop"


def test_attn_backend_is_validated(tiny_model):
    model = copy.deepcopy(tiny_model)
    with pytest.raises(ValueError, match="attn_backend"):
        model.set_attn_backend("flash3")
