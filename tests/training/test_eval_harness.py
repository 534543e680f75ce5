"""The evaluation harness on the tiny random-weight checkpoint: perplexity against direct computation, the
report files from `instructlm eval`, and each kind of bad input."""

from __future__ import annotations

import json
import math
import shutil

import msgspec
import pytest
import torch
import torch.nn.functional as F

from instructlm.cli import main
from training.data.record import ENCODER, Message, Record, Source
from training.evaluate import EvalOptions, Scored, evaluate, perplexity, scored_sequence


def _chat(i, task, user, answer, **meta):
    return Record(
        id=f"{task}-{i}",
        kind="chat",
        task=task,
        source=Source(file="fixture.jsonl", line=i + 1),
        messages=[Message("user", user), Message("assistant", answer)],
        meta=meta,
    )


def _records():
    recs = [
        _chat(0, "translation", "Translate to Chinese: my phone is lost", "我的手机丢了。", tgt_lang="zh"),
        _chat(1, "translation", "Translate to Chinese: my bill", "我的账单。", tgt_lang="zh"),
        _chat(
            2, "translation", "Translate to German: where is the store?", "Wo ist der Laden?", tgt_lang="de"
        ),
        _chat(
            3, "content", "Write a short story about a storm.", "The storm came at night and the phone rang."
        ),
        _chat(4, "content", "Write an ad for the Travel plan.", "Roaming in 30 countries, one price."),
        _chat(5, "customer_service", "How do I reset my password?", "Open the app and tap Forgot password."),
        Record(
            id="general-6",
            kind="text",
            task="general",
            source=Source(file="fixture.jsonl", line=7),
            text="The quick brown fox jumps over the lazy dog. " * 3,
        ),
    ]
    return recs


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("dataset")
    (root / "test.jsonl").write_bytes(b"".join(ENCODER.encode(r) + b"\n" for r in _records()))
    (root / "train.jsonl").write_bytes(ENCODER.encode(_records()[0]) + b"\n")
    return root


def _reference_nll(model, ids, mask):
    """Direct: one forward over the whole sequence, sum of -log p over the masked targets."""
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0, :-1]
    nll = F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")
    m = torch.tensor(mask[1:], dtype=torch.bool)
    return float(nll[m].double().sum()), int(m.sum())


def test_perplexity_is_token_weighted_over_the_masked_tokens(tiny_model, tiny_tokenizer):
    seqs = [scored_sequence(tiny_tokenizer, r) for r in _records()]
    got = perplexity(tiny_model, seqs, batch_tokens=256)
    refs = [_reference_nll(tiny_model, s.ids, s.mask) for s in seqs]
    nll, tokens = sum(r[0] for r in refs), sum(r[1] for r in refs)
    assert got["tokens"] == tokens
    # float32 logits, summed in float64 on both sides; batching and padding change rounding only (~1e-7 per
    # token), so 1e-5 relative bounds it with room.
    assert got["nll"] == pytest.approx(nll, rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    # Token-weighted, not the mean of per-record perplexities (which differ here: the records' lengths differ).
    mean_of_ppls = sum(math.exp(a / b) for a, b in refs) / len(refs)
    assert abs(got["ppl"] - mean_of_ppls) > 1e-3


def test_chat_perplexity_scores_only_the_answer_and_its_end_token(tiny_tokenizer):
    seq = scored_sequence(tiny_tokenizer, _records()[5])
    scored = [t for t, m in zip(seq.ids, seq.mask, strict=True) if m]
    assert (
        tiny_tokenizer.decode(scored, skip_special_tokens=False)
        == "Open the app and tap Forgot password.<|im_end|>"
    )


def test_sliding_window_with_stride_1_predicts_each_token_from_the_previous_window_minus_one(tiny_model):
    torch.manual_seed(0)
    ids = torch.randint(3, tiny_model.config.vocab_size, (40,)).tolist()
    window = 8
    got = perplexity(tiny_model, [Scored(ids, [0] + [1] * 39)], window=window, stride=1)
    # Reference: token t is predicted from ids[max(0, t - window + 1) : t], each by its own forward.
    nll = 0.0
    with torch.no_grad():
        for t in range(1, len(ids)):
            ctx = ids[max(0, t - window + 1) : t]
            logits = tiny_model(torch.tensor([ctx]))[0, -1]
            nll -= float(F.log_softmax(logits.double(), -1)[ids[t]])
    assert got["tokens"] == 39
    assert got["nll"] == pytest.approx(nll, rel=1e-5)
    # A long context really differs from the window-8 one (so the test above could fail).
    full = perplexity(tiny_model, [Scored(ids, [0] + [1] * 39)])
    assert full["nll"] != pytest.approx(nll, rel=1e-6)


def test_evaluate_reports_each_tasks_metrics(tiny_model, tiny_tokenizer):
    result = evaluate(tiny_model, tiny_tokenizer, _records(), EvalOptions(max_new_tokens=6, progress=False))
    rows = result.per_task
    assert set(rows) == {"translation", "content", "customer_service", "general"}
    assert {"bleu_zh", "bleu_de", "chrf_zh", "chrf_de", "bleu", "chrf"} <= set(rows["translation"])
    assert "rouge1" not in rows["translation"]
    assert {"rouge1", "rouge2", "rougeL", "distinct_1", "distinct_2", "repetition_4", "self_bleu"} <= set(
        rows["content"]
    )
    assert "distinct_1" not in rows["general"]  # a text record has nothing to answer
    assert rows["translation"]["generated"] == 3
    assert "tok:zh" in result.info["signatures"]["bleu_zh"]
    assert "tok:13a" in result.info["signatures"]["bleu_de"]
    # Overall perplexity pools the tasks' tokens.
    assert result.overall["tokens"] == sum(r["tokens"] for r in rows.values())
    # The harness' hypothesis is the decoded greedy continuation of the chat prompt.
    from model.chat import encode_chat
    from model.generate import generate

    s = next(s for s in result.samples if s.record.id == "content-3")
    prompt = encode_chat(
        tiny_tokenizer, [{"role": "user", "content": "Write a short story about a storm."}], True
    )
    assert s.prompt_ids == prompt.ids
    out = generate(tiny_model, [prompt.ids], 6, stop_ids=tiny_tokenizer.stop_ids)[0]
    assert s.hypothesis == tiny_tokenizer.decode(out.tokens).strip()


def test_eval_cli_writes_json_markdown_and_plots(tiny_checkpoint, dataset_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    rc = main(
        [
            "eval",
            "--checkpoint",
            str(tiny_checkpoint),
            "--dataset",
            str(dataset_dir),
            "--out",
            str(out),
            "--max-new-tokens",
            "4",
            "--task",
            "translation,general",
        ]
    )
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "tok:zh" in stdout and "overall perplexity" in stdout
    report = json.loads((out / "eval.json").read_text())
    assert set(report["per_task"]) == {"translation", "general"}
    assert report["per_task"]["general"]["ppl"] > 1
    md = (out / "eval.md").read_text()
    assert "| translation |" in md and "tok:zh" in md
    import matplotlib.image

    for name in ("eval_perplexity.png", "eval_metrics.png"):
        img = matplotlib.image.imread(out / name)
        assert img.shape[0] > 100 and img.shape[1] > 100


def _run_error(argv, capsys):
    assert main(argv) == 2
    return capsys.readouterr().err


def test_missing_split_names_the_splits_present(tiny_checkpoint, dataset_dir, capsys):
    err = _run_error(
        ["eval", "--checkpoint", str(tiny_checkpoint), "--dataset", str(dataset_dir), "--split", "val"],
        capsys,
    )
    assert "no split 'val'" in err and "splits present: test, train" in err


def test_missing_task_names_the_tasks_present(tiny_checkpoint, dataset_dir, capsys):
    err = _run_error(
        ["eval", "--checkpoint", str(tiny_checkpoint), "--dataset", str(dataset_dir), "--task", "qa"], capsys
    )
    assert "no records of task(s) qa" in err and "content, customer_service, general, translation" in err


def test_a_bad_record_names_file_and_line(tiny_checkpoint, tmp_path, capsys):
    lines = [ENCODER.encode(r) for r in _records()[:2]]
    (tmp_path / "test.jsonl").write_bytes(lines[0] + b"\n" + b'{"id": "x", "kind": "chat"}\n')
    err = _run_error(["eval", "--checkpoint", str(tiny_checkpoint), "--dataset", str(tmp_path)], capsys)
    assert "test.jsonl:2:" in err and "not a dataset record" in err


def test_a_tokenizer_that_does_not_match_the_checkpoint_is_refused(
    tiny_checkpoint, dataset_dir, tmp_path, capsys
):
    from model.tokenizer import train_tokenizer
    from tests.conftest import tiny_corpus

    # Same size, other merges (trained on reversed text): loads fine, but the ids mean other strings.
    other = train_tokenizer([t[::-1] for t in tiny_corpus()], vocab_size=512, min_frequency=1)
    other.save(tmp_path / "other")
    err = _run_error(
        [
            "eval",
            "--checkpoint",
            str(tiny_checkpoint),
            "--dataset",
            str(dataset_dir),
            "--tokenizer",
            str(tmp_path / "other"),
        ],
        capsys,
    )
    assert "vocabulary differs from the tokenizer saved with the checkpoint" in err
    # A bigger vocabulary than the embedding is refused even without a tokenizer of its own in the checkpoint.
    bigger = train_tokenizer(
        tiny_corpus() + [t[::-1] for t in tiny_corpus()], vocab_size=700, min_frequency=1
    )
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    bigger.save(ckpt)
    assert bigger.vocab_size > 512
    err = _run_error(["eval", "--checkpoint", str(ckpt), "--dataset", str(dataset_dir)], capsys)
    assert f"tokenizer has {bigger.vocab_size} tokens but the model's vocab_size is" in err


def test_bad_options_are_clear_errors(tiny_checkpoint, dataset_dir, capsys):
    base = ["eval", "--checkpoint", str(tiny_checkpoint), "--dataset", str(dataset_dir)]
    assert "stride must be in [1, window - 1], got 8 (window 8)" in _run_error(
        [*base, "--window", "8", "--stride", "8"], capsys
    )
    assert "window 999 exceeds the model's context 256" in _run_error([*base, "--window", "999"], capsys)
    assert "unknown metric(s) bluee" in _run_error([*base, "--metrics", "bluee"], capsys)
    assert "max_new_tokens must be at least 1" in _run_error([*base, "--max-new-tokens", "0"], capsys)


def test_record_decoding_matches_the_dataset_schema():
    # The fixture's lines round-trip through the record Struct the data pipeline writes.
    line = ENCODER.encode(_records()[0])
    assert msgspec.json.decode(line, type=Record).meta == {"tgt_lang": "zh"}


def test_a_registered_evaluator_reports_into_the_same_table(tiny_model, tiny_tokenizer):
    """How the task endpoints add their metrics: register an evaluator for some tasks; it gets the task's
    generated samples and the model/tokenizer, and its numbers land in that task's row."""
    from training.evaluate import EVALUATORS, register_evaluator

    seen = {}

    @register_evaluator("exact_match_test", tasks=("customer_service",))
    def exact(samples, ctx):
        seen["ctx"] = ctx
        return {
            "exact_match": sum(s.hypothesis == s.reference for s in samples) / len(samples),
            "n_scored": len(samples),
        }

    try:
        result = evaluate(
            tiny_model,
            tiny_tokenizer,
            _records(),
            EvalOptions(max_new_tokens=3, progress=False, metrics=["exact_match_test"]),
        )
    finally:
        EVALUATORS.pop("exact_match_test")
    assert result.per_task["customer_service"]["exact_match"] == 0.0  # a random model never says it
    assert result.per_task["customer_service"]["n_scored"] == 1
    assert "exact_match" not in result.per_task["content"]
    assert "bleu" not in result.per_task["translation"]  # only the evaluators asked for ran
    assert seen["ctx"].model is tiny_model and seen["ctx"].tokenizer is tiny_tokenizer
