"""Text metrics of the evaluation harness, checked against values worked out by hand."""

from __future__ import annotations

import math

import pytest

from training.evaluate import (
    bleu_chrf,
    distinct_n,
    repetition_rate,
    rouge,
    sacrebleu_tokenize,
    self_bleu,
    windows,
    words,
)


def test_words_split_cjk_per_character_and_lowercase_the_rest():
    assert words("我的手机丢了 Hello, World! 42") == [
        "我",
        "的",
        "手",
        "机",
        "丢",
        "了",
        "hello",
        "world",
        "42",
    ]
    assert words("Grüße aus Berlin") == ["grüße", "aus", "berlin"]
    assert words("こんにちは") == list("こんにちは")


def test_rouge_keeps_chinese_where_rouge_scores_default_tokenizer_drops_it():
    from rouge_score.rouge_scorer import RougeScorer

    # rouge-score's default tokenizer keeps [a-z0-9] only: identical Chinese texts score 0.
    assert RougeScorer(["rouge1"]).score("我的手机", "我的手机")["rouge1"].fmeasure == 0.0
    # Ours: unigrams 我 的 手 机 vs 我 的 账 单 share 2 of 4 -> F 50; bigrams share 我的 of 3 -> F 33.3.
    scores = rouge(["我的手机"], ["我的账单"])
    assert scores["rouge1"] == pytest.approx(50.0)
    assert scores["rouge2"] == pytest.approx(100 / 3)
    assert scores["rougeL"] == pytest.approx(50.0)
    assert rouge(["我的手机丢了"], ["我的手机丢了"])["rouge1"] == pytest.approx(100.0)


def test_rouge_is_the_mean_over_pairs():
    # pair 1: identical (100); pair 2: "a b" vs "c d" (0)
    assert rouge(["a b", "a b"], ["a b", "c d"])["rouge1"] == pytest.approx(50.0)


def test_bleu_uses_zh_tokenization_for_chinese_targets():
    hyp, ref = ["我的手机丢了，请帮我。"], ["我的手机坏了，请帮我。"]
    zh = bleu_chrf(hyp, ref, "zh")
    assert "tok:zh" in zh["bleu_signature"]
    assert 0 < zh["bleu"] < 100
    # With 13a an unspaced Chinese sentence is one word: any difference scores 0.
    assert bleu_chrf(hyp, ref, "de")["bleu"] == pytest.approx(0.0)
    assert bleu_chrf(ref, ref, "zh")["bleu"] == pytest.approx(100.0)
    assert sacrebleu_tokenize("zh-CN") == "zh"
    assert sacrebleu_tokenize("ja") == "char"
    assert sacrebleu_tokenize("en") == "13a"


def test_distinct_n_counts_unique_ngrams_over_all_generations():
    texts = ["a b a b", "a b c"]
    assert distinct_n(texts, 1) == pytest.approx(3 / 7)  # a b a b a b c
    assert distinct_n(texts, 2) == pytest.approx(3 / 5)  # ab ba ab | ab bc
    assert math.isnan(distinct_n([""], 1))  # no n-gram: undefined, not "no diversity"


def test_repetition_rate_is_seq_rep_4_averaged():
    loop = "a b c d a b c d a b c d"  # 9 four-grams, 4 distinct -> 5/9 repeat
    assert repetition_rate([loop]) == pytest.approx(5 / 9)
    assert repetition_rate([loop, "x y z w v"]) == pytest.approx(5 / 18)
    assert repetition_rate([loop, "too short"]) == pytest.approx(5 / 9)  # no 4-gram: not counted
    assert math.isnan(repetition_rate(["too short", ""]))  # empty answers do not score as "no repetition"


def test_self_bleu_is_100_for_copies_and_0_for_disjoint_texts():
    same = ["the plan costs ten euros a month"] * 3
    assert self_bleu(same) == pytest.approx(100.0)
    assert self_bleu(
        ["alpha beta gamma delta", "one two three four", "red green blue yellow"]
    ) == pytest.approx(0.0)
    assert self_bleu(["only one"]) != self_bleu(["only one"])  # NaN: undefined for fewer than two


@pytest.mark.parametrize("length", [2, 3, 7, 16, 17, 40])
@pytest.mark.parametrize(("window", "stride"), [(2, 1), (4, 1), (4, 3), (8, 4), (16, 15)])
def test_windows_score_every_token_once_with_its_context_inside_the_window(length, window, stride):
    scored = []
    for begin, end, first in windows(length, window, stride):
        assert end - begin <= window
        assert begin < first <= end  # each scored token has its predecessor inside the window
        scored.extend(range(first, end))
    assert scored == list(range(1, length))


def test_windows_reject_a_bad_stride():
    with pytest.raises(ValueError, match="stride"):
        windows(10, 4, 4)
