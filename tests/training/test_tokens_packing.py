"""Token data: assistant-only labels, packing that keeps examples apart, the pretraining memmap, resumable streams."""
# ruff: noqa: F811  (pytest fixtures imported from train_fixtures are redefined as test arguments)

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.training.train_fixtures import make_dataset, tokenizer_dir, train_dataset  # noqa: F401
from training import tokens as T


def _chat(user: str, answer: str, system: str | None = None) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    return [*msgs, {"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def test_sft_labels_are_the_next_assistant_token_only(tiny_tokenizer):
    from model.chat import encode_chat

    msgs = _chat("Where is the nearest store?", "Wo ist der nächste Laden?", system="Translate.")
    ex = T.sft_example(tiny_tokenizer, msgs, "translation", max_len=256)
    enc = encode_chat(tiny_tokenizer, msgs)
    assert ex.ids.tolist() == enc.ids
    labelled = np.flatnonzero(ex.labels != T.IGNORE)
    # Position t predicts token t+1, and exactly the assistant tokens (answer + <|im_end|>) are predicted.
    assert (labelled + 1).tolist() == [i for i, m in enumerate(enc.loss_mask) if m]
    assert ex.labels[labelled].tolist() == [enc.ids[t + 1] for t in labelled]
    answer = tiny_tokenizer.decode(ex.labels[labelled].tolist(), skip_special_tokens=False)
    assert answer == "Wo ist der nächste Laden?<|im_end|>"


def test_truncated_examples_are_counted_and_label_free_ones_dropped(tiny_tokenizer):
    long_user = " ".join(["The quick brown fox jumps over the lazy dog."] * 40)
    records = [
        {"kind": "chat", "task": "qa", "messages": _chat("Hi", "Hello there.")},
        {"kind": "chat", "task": "qa", "messages": _chat(long_user, "ok")},  # answer past max_len
        {"kind": "text", "task": "general", "text": "plain text"},
    ]
    data = T.sft_examples(tiny_tokenizer, records, max_len=32)
    assert data.num_examples == 1 and data.truncated == 1 and data.dropped == 1 and data.skipped_text == 1


def test_packed_logits_equal_each_example_alone(tiny_model, tiny_tokenizer):
    """Positions restart per example and attention stays inside it: a packed row's logits for each example equal
    that example run alone (fp32; the only difference is the masked vs causal SDPA path)."""
    chats = [
        _chat("How do I reset my password?", "Open the app and tap Forgot password."),
        _chat("Translate to German: Where is the nearest store?", "Wo ist der nächste Laden?"),
        _chat("你好", "你好，我想查询一下我的账单。"),
    ]
    examples = [T.sft_example(tiny_tokenizer, m, "x", 256) for m in chats]
    seq_len = sum(len(e.ids) for e in examples) + 5  # a padding tail too
    row = T.pack_row(examples, seq_len, tiny_tokenizer.pad_id)
    assert row.position_ids[: len(examples[0].ids)].tolist() == list(range(len(examples[0].ids)))
    with torch.no_grad():
        packed = tiny_model(torch.from_numpy(row.input_ids)[None], torch.from_numpy(row.position_ids)[None])[
            0
        ]
        at = 0
        for ex in examples:
            alone = tiny_model(torch.from_numpy(ex.ids.astype(np.int64))[None])[0]
            torch.testing.assert_close(packed[at : at + len(ex.ids)], alone, rtol=1e-5, atol=1e-5)
            at += len(ex.ids)
        # Without the restart (one long example), the second example's logits change: the test can fail.
        flat = tiny_model(torch.from_numpy(row.input_ids)[None])[0]
        n0 = len(examples[0].ids)
        assert not torch.allclose(flat[n0 : n0 + 3], packed[n0 : n0 + 3], atol=1e-3)
    assert (row.labels[at:] == T.IGNORE).all()


def test_packed_stream_follows_mixing_weights_and_resumes_exactly(tiny_tokenizer, train_dataset):
    from training.data.mixing import weights_from_manifest

    records = T.read_records(train_dataset, "train")
    data = T.sft_examples(tiny_tokenizer, records, 64)
    weights = weights_from_manifest(T.read_manifest(train_dataset))
    weights = {t: w for t, w in weights.items() if t in data.by_task}
    stream = T.PackedSFTStream(data.by_task, weights, seed=3, seq_len=64, pad_id=tiny_tokenizer.pad_id)
    rows = [stream.next_row() for _ in range(40)]
    for r in rows:
        assert r.input_ids.shape == (64,) and (r.labels != T.IGNORE).any()
    state = stream.state_dict()
    expected = [stream.next_row() for _ in range(25)]
    again = T.PackedSFTStream(data.by_task, weights, seed=3, seq_len=64, pad_id=tiny_tokenizer.pad_id)
    again.load_state_dict(state)
    for a, b in zip(expected, (again.next_row() for _ in range(25)), strict=True):
        assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.labels, b.labels)
    # Draws per task follow the manifest's weights (T5 examples-proportional): 2,000 draws, 4 sigma.
    mix = T.PackedSFTStream(data.by_task, weights, seed=0, seq_len=64, pad_id=0).mixer
    drawn = [task for task, _ in mix.take(2000)]
    total = sum(weights.values())
    for task, w in weights.items():
        p = w / total
        assert abs(drawn.count(task) / 2000 - p) < 4 * np.sqrt(p * (1 - p) / 2000), task


def test_token_file_and_windows(tmp_path, tiny_tokenizer, train_dataset):
    records = T.read_records(train_dataset, "train")
    toks = T.write_token_file(tiny_tokenizer, records, tmp_path / "train.bin", include_chat=True)
    assert toks.dtype == np.uint16
    n_docs = len(records)
    assert int((np.asarray(toks) == tiny_tokenizer.endoftext_id).sum()) == n_docs
    assert list(tmp_path.iterdir()) == [tmp_path / "train.bin"]  # no temporary file left
    reopened = T.open_token_file(tmp_path / "train.bin", tiny_tokenizer.vocab_size)
    assert np.array_equal(reopened, toks)

    stream = T.TokenWindowStream(toks, 32, seed=1, boundary_id=tiny_tokenizer.endoftext_id)
    seen = sorted(int(stream._perm[i]) for i in range(stream.num_windows))
    assert seen == list(range(stream.num_windows))  # one epoch visits every window once
    row = stream.next_row()
    assert np.array_equal(row.labels[:-1], row.input_ids[1:])  # shifted by one
    # Positions restart after every <|endoftext|>.
    ends = np.flatnonzero(row.input_ids[:-1] == tiny_tokenizer.endoftext_id)
    for e in ends:
        assert row.position_ids[e + 1] == 0
    for _ in range(stream.num_windows + 3):  # into the second epoch
        stream.next_row()
    state = stream.state_dict()
    nxt = stream.next_row()
    again = T.TokenWindowStream(toks, 32, seed=1, boundary_id=tiny_tokenizer.endoftext_id)
    again.load_state_dict(state)
    assert state["epoch"] == 1 and np.array_equal(again.next_row().input_ids, nxt.input_ids)
    with pytest.raises(T.DatasetError, match="windows"):
        T.TokenWindowStream(toks[:100], 32, 1, 0).load_state_dict(state)


def test_doc_positions():
    ids = np.array([5, 6, 0, 7, 0, 0, 8, 9])
    assert T.doc_positions(ids, 0).tolist() == [0, 1, 2, 0, 1, 0, 0, 1]


def test_dataset_without_manifest_is_named(tmp_path):
    (tmp_path / "train.jsonl").write_text("")
    with pytest.raises(T.DatasetError, match=r"no manifest\.json"):
        T.read_manifest(tmp_path)
    with pytest.raises(T.DatasetError, match="does not exist"):
        T.read_manifest(tmp_path / "nope")


def test_bad_record_names_file_and_line(tmp_path):
    make_dataset(tmp_path, {"qa": 5}, text_records=0)
    with open(tmp_path / "train.jsonl", "a") as f:
        f.write('{"kind": "chat", "task": "qa", "messages": "oops"}\n')
    n = len((tmp_path / "train.jsonl").read_text().splitlines())
    with pytest.raises(T.DatasetError, match=rf"train\.jsonl:{n}: chat record without a 'messages' list"):
        T.read_records(tmp_path, "train")
