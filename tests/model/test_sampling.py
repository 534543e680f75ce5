"""The one sampling module, checked against transformers' logits processors and by its own draws."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from model.sampling import (
    GREEDY,
    SamplingParams,
    apply_penalties,
    filtered_probs,
    make_rng,
    sample,
    token_logprobs,
)

V = 64


@pytest.fixture
def logits():
    return np.random.default_rng(0).normal(size=(4, V)).astype(np.float32) * 3


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7, top_k=5),
        SamplingParams(temperature=1.3, top_p=0.8),
        SamplingParams(temperature=1.0, min_p=0.1),
        SamplingParams(temperature=0.5, top_k=10, top_p=0.9),
    ],
    ids=["top_k", "top_p", "min_p", "top_k+top_p"],
)
def test_filtered_distribution_matches_transformers(logits, params):
    scores = torch.from_numpy(logits.copy())
    warpers = [TemperatureLogitsWarper(params.temperature)]
    if params.top_k:
        warpers.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1:
        warpers.append(TopPLogitsWarper(params.top_p))
    if params.min_p:
        warpers.append(MinPLogitsWarper(params.min_p))
    for w in warpers:
        scores = w(None, scores)
    expected = torch.softmax(scores, dim=-1).numpy()
    ours = filtered_probs(logits, [params] * len(logits))
    np.testing.assert_array_equal(ours > 0, expected > 0)
    np.testing.assert_allclose(ours, expected, atol=1e-6)


def test_repetition_penalty_matches_transformers(logits):
    prompt = [[1, 2, 3], [], [5], [7, 7]]
    output = [[4], [2, 2], [], [8]]
    params = [SamplingParams(repetition_penalty=1.3)] * 4
    ours = apply_penalties(logits, params, output, prompt)
    proc = RepetitionPenaltyLogitsProcessor(1.3)
    for i in range(4):
        seen = (
            torch.tensor([prompt[i] + output[i]])
            if prompt[i] + output[i]
            else torch.zeros((1, 0), dtype=torch.long)
        )
        ref = proc(seen, torch.from_numpy(logits[i : i + 1].copy()))
        np.testing.assert_allclose(ours[i], ref[0].numpy(), atol=1e-6)


def test_frequency_and_presence_penalties_follow_openai_formula(logits):
    output = [[3, 3, 3, 9], [], [1], [2, 2]]
    params = [SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)] * 4
    ours = apply_penalties(logits, params, output, None)
    for i, toks in enumerate(output):
        counts = np.bincount(np.asarray(toks, dtype=np.int64), minlength=V)
        np.testing.assert_allclose(ours[i], logits[i] - 0.5 * counts - 0.25 * (counts > 0), atol=1e-6)


def test_greedy_and_top_k_1_pick_the_argmax(logits):
    rngs = [make_rng(i) for i in range(4)]
    assert (sample(logits, [GREEDY] * 4, rngs) == logits.argmax(-1)).all()
    assert (sample(logits, [SamplingParams(temperature=2.0, top_k=1)] * 4, rngs) == logits.argmax(-1)).all()


def test_same_seed_same_tokens_and_draws_follow_the_distribution(logits):
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=123)
    n = 20000
    many = np.repeat(logits[:1], n, axis=0)
    seeds = np.random.SeedSequence(5).spawn(n)
    draws = sample(many, [params] * n, [np.random.default_rng(s) for s in seeds])
    again = sample(many, [params] * n, [np.random.default_rng(s) for s in np.random.SeedSequence(5).spawn(n)])
    assert (draws == again).all()
    empirical = np.bincount(draws, minlength=V) / n
    expected = filtered_probs(logits[:1], [params])[0]
    assert empirical[expected == 0].sum() == 0
    # 4 standard errors of a binomial proportion: fails if the inverse CDF is off by one token.
    assert np.all(np.abs(empirical - expected) <= 4 * np.sqrt(expected * (1 - expected) / n) + 1e-9)


def test_logprobs_are_the_raw_model_distribution(logits):
    tokens = np.array([0, 5, 9, 63])
    chosen, top_ids, top_lp = token_logprobs(logits, tokens, top_n=3)
    ref = torch.log_softmax(torch.from_numpy(logits), -1).numpy()
    np.testing.assert_allclose(chosen, ref[np.arange(4), tokens], atol=1e-5)
    np.testing.assert_array_equal(top_ids, np.argsort(-ref, -1)[:, :3])
    np.testing.assert_allclose(top_lp, np.sort(ref, -1)[:, ::-1][:, :3], atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 2}, "min_p"),
    ],
)
def test_bad_params_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_torch_free_modules_import_without_torch(tiny_checkpoint):
    code = f"""
import sys
sys.modules['torch'] = None  # any import of torch now fails
import numpy as np
from model.config import ModelConfig
from model.tokenizer import Tokenizer
from model.chat import encode_chat
from model.sampling import sample, SamplingParams, make_rng
cfg = ModelConfig.load({str(tiny_checkpoint / "config.json")!r})
tok = Tokenizer.load({str(tiny_checkpoint)!r})
ids = encode_chat(tok, [{{'role': 'user', 'content': 'hi'}}], True).ids
print(len(ids), sample(np.zeros((1, cfg.vocab_size)), [SamplingParams(seed=1)], [make_rng(1)])[0] >= 0)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split()[1] == "True"
