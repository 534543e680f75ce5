"""Intent rank-classification: label log-likelihoods vs the model's own forward, temperature scaling vs scipy,
ECE by hand, history truncation and the conversation rules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model.chat import encode_chat
from model.errors import UserError
from service.tasks.calibration import (
    continuation_logprob,
    expected_calibration_error,
    fit_temperature,
    nll,
    softmax,
)
from service.tasks.customer_service import (
    ContextTooLong,
    IntentClassifier,
    calibrate,
    check_conversation,
    fit_history,
    load_intent_labels,
    runner_scorer,
)

SEED = Path(__file__).resolve().parents[2] / "data" / "seed"


def test_ece_by_hand():
    # Four predictions, each in its own 1/15-wide bin (confidences 0.9, 0.8, 0.6, 0.7; right, wrong, right,
    # right): ECE = (0.1 + 0.8 + 0.4 + 0.3) / 4.
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    assert expected_calibration_error(probs, [0, 1, 0, 1]) == pytest.approx(0.4, abs=1e-12)
    # Two in one bin (0.88, 0.92, bin (0.867, 0.933]), one right: |0.5 - 0.9| weighted 2/3; 0.6 right: 0.4/3.
    probs = np.array([[0.88, 0.12], [0.92, 0.08], [0.6, 0.4]])
    assert expected_calibration_error(probs, [0, 1, 0]) == pytest.approx(2 / 3 * 0.4 + 1 / 3 * 0.4, abs=1e-12)
    assert expected_calibration_error(np.eye(3), [0, 1, 2]) == 0.0


def test_temperature_fit_is_the_nll_minimum_found_by_scipy():
    from scipy.optimize import minimize_scalar

    rng = np.random.default_rng(0)
    scores = rng.normal(0, 3, size=(3000, 6))
    true_t = 2.5
    p = softmax(scores, true_t)
    labels = [int(rng.choice(6, p=row)) for row in p]
    t = fit_temperature(scores, labels)
    ref = minimize_scalar(
        lambda lt: nll(scores, labels, np.exp(lt)), bounds=(-4, 4), method="bounded", options={"xatol": 1e-10}
    )
    assert t == pytest.approx(np.exp(ref.x), rel=1e-6)
    assert t == pytest.approx(true_t, rel=0.1)  # 3,000 draws: the MLE lands within a few percent
    # Over-confident scores (true T = 2.5 read at T = 1): scaling lowers both NLL and ECE.
    cal = calibrate(scores, labels)
    assert cal.nll_after < cal.nll_before and cal.ece_after < cal.ece_before


def test_continuation_logprob_matches_torch_log_softmax(tiny_model):
    import torch

    row = [5, 17, 42, 99, 3, 250, 7]
    with torch.no_grad():
        logits = tiny_model(torch.tensor([row]), torch.arange(len(row))[None])[0]  # [S, V]
    ref = torch.log_softmax(logits.double(), -1)
    expected = sum(ref[j - 1, row[j]].item() for j in range(4, len(row)))
    assert continuation_logprob(logits.numpy(), row, 4) == pytest.approx(expected, abs=1e-9)
    with pytest.raises(ValueError, match="non-empty continuation"):
        continuation_logprob(logits.numpy(), row, len(row))


@pytest.fixture(scope="module")
def classifier(tiny_tokenizer):
    return IntentClassifier(tiny_tokenizer, load_intent_labels(SEED / "intent_labels.jsonl"))


def test_label_rows_are_the_trained_assistant_tokens(classifier, tiny_tokenizer):
    rows, prompt_len = classifier.rows("where is my parcel")
    assert len(rows) == 14
    for name, row in zip(classifier.names, rows, strict=True):
        assert tiny_tokenizer.decode(row[prompt_len:], skip_special_tokens=False) == name + "<|im_end|>"
        assert row[-1] == tiny_tokenizer.eos_id


def test_runner_scores_equal_separate_forwards(classifier, tiny_checkpoint, tiny_model):
    import torch

    from service.runners.torch_runner import TorchRunner

    runner = TorchRunner(tiny_checkpoint, num_slots=16, max_len=256, threads=1)
    result = classifier.classify("I want to talk to a real person", runner_scorer(runner, list(range(2, 16))))
    rows, prompt_len = classifier.rows("I want to talk to a real person")
    for i, row in enumerate(rows):  # reference: each row alone through the model without a cache
        with torch.no_grad():
            logits = tiny_model(torch.tensor([row]), torch.arange(len(row))[None])[0].numpy()
        assert result.scores[i] == pytest.approx(continuation_logprob(logits, row, prompt_len), abs=1e-4)
    probs = softmax(result.scores)
    assert result.intent == classifier.names[int(np.argmax(probs))]
    assert result.confidence == pytest.approx(probs.max())
    assert [c[1] for c in result.candidates] == sorted((c[1] for c in result.candidates), reverse=True)
    assert runner.cache.lengths[2:].sum() == 0  # scoring slots released


def test_handoff_on_human_agent_or_low_confidence(classifier):
    scores = np.zeros(14)
    scores[classifier.names.index("human_agent")] = 10.0
    r = classifier.result(scores)
    assert r.intent == "human_agent" and classifier.needs_handoff(r, threshold=0.4)
    scores = np.zeros(14)
    scores[0] = 10.0
    assert not classifier.needs_handoff(classifier.result(scores), threshold=0.4)
    classifier_hot = IntentClassifier(classifier.tokenizer, classifier.labels, temperature=20.0)
    r = classifier_hot.result(scores)  # same winner, flattened by T = 20: confidence 0.13 < 0.4
    assert r.intent == classifier.names[0] and classifier.needs_handoff(r, threshold=0.4)


def test_conversation_rules():
    with pytest.raises(UserError, match="conversation is empty"):
        check_conversation([])
    with pytest.raises(UserError, match=r"messages\[1\]: the last turn must be from the user"):
        check_conversation([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    with pytest.raises(UserError, match=r"messages\[1\]: a system turn may only come first"):
        check_conversation(
            [
                {"role": "user", "content": "a"},
                {"role": "system", "content": "b"},
                {"role": "user", "content": "c"},
            ]
        )
    check_conversation([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}])


def test_history_drops_oldest_turns_never_system_or_latest_user(tiny_tokenizer):
    def count(msgs):
        return len(encode_chat(tiny_tokenizer, msgs, add_generation_prompt=True).ids)

    system = {"role": "system", "content": "You are the assistant of Kestrel Mobile."}
    turns = []
    for i in range(6):
        turns += [
            {"role": "user", "content": f"question number {i} about my bill"},
            {"role": "assistant", "content": f"answer number {i} about your bill"},
        ]
    msgs = [system, *turns, {"role": "user", "content": "and the latest question"}]
    full = count(msgs)
    kept, dropped = fit_history(msgs, count, full)
    assert kept == msgs and dropped == 0
    kept, dropped = fit_history(msgs, count, full - 1)
    assert kept[0] == system and kept[-1] == msgs[-1]
    assert kept[1]["role"] == "user" and dropped == 2  # the oldest pair, not a lone user turn
    assert kept == [system, *msgs[3:]]
    minimal = count([system, msgs[-1]])
    kept, dropped = fit_history(msgs, count, minimal)
    assert kept == [system, msgs[-1]] and dropped == 12
    with pytest.raises(ContextTooLong, match=f"take {minimal} tokens; the context budget is {minimal - 1}"):
        fit_history(msgs, count, minimal - 1)


def test_onnx_runner_scores_match_the_torch_runner(tiny_bundle, tiny_checkpoint, tiny_tokenizer):
    """The CPU serving image scores intents through the ONNX bundle: same label log-likelihoods as PyTorch."""
    from service.runners.base import open_runner

    labels = load_intent_labels(SEED / "intent_labels.jsonl")[:4]  # 4 labels: the prompt fits the 256 window
    clf = IntentClassifier(tiny_tokenizer, labels)
    onnx = open_runner(tiny_bundle, "onnx", num_slots=4, threads=1)
    torch_r = open_runner(tiny_checkpoint, "torch", num_slots=4, threads=1)
    a = clf.classify("my bill is wrong", runner_scorer(onnx, range(4))).scores
    b = clf.classify("my bill is wrong", runner_scorer(torch_r, range(4))).scores
    # fp32 both ways: measured 1.2e-7 apart; 1e-5 leaves room for other CPUs' kernels, far below the ~0.1 gaps
    # between label scores that decide a prediction.
    np.testing.assert_allclose(a, b, atol=1e-5)
