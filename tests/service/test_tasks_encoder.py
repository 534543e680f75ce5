"""Hybrid retrieval's sentence encoder: export of a tiny random BERT (built here with transformers) to ONNX,
embeddings against transformers' own forward, and the hybrid score against its formula."""

from __future__ import annotations

import json

import numpy as np
import pytest

from instructlm.cli import main
from service.tasks.encoder import EncoderError, SentenceEncoder
from service.tasks.retrieval import BM25, Entry, KnowledgeBase, ReloadingKnowledgeBase, tokenize
from tests.conftest import tiny_corpus


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory, torch_threads):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(tiny_corpus(), trainers.WordPieceTrainer(vocab_size=300, special_tokens=special))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    root = tmp_path_factory.mktemp("bert")
    cfg = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)  # fmt: skip
    import torch

    torch.manual_seed(0)
    BertModel(cfg).eval().save_pretrained(root)
    tok.save(str(root / "tokenizer.json"))
    (root / "1_Pooling").mkdir()
    (root / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    return root


@pytest.fixture(scope="module")
def encoder_dir(bert_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("enc")
    assert main(["encoder", "export", "--model-dir", str(bert_dir), "--out", str(out)]) == 0
    return out


def test_onnx_embeddings_match_transformers_mean_pooling(bert_dir, encoder_dir):
    import torch
    from tokenizers import Tokenizer
    from transformers import BertModel

    texts = ["How do I reset my password?", "Roaming is included in the Travel plan for 30 countries.", "hi"]
    tok = Tokenizer.from_file(str(bert_dir / "tokenizer.json"))
    tok.enable_padding()
    enc = tok.encode_batch(texts)
    ids = torch.tensor([e.ids for e in enc])
    mask = torch.tensor([e.attention_mask for e in enc])
    with torch.no_grad():
        hidden = (
            BertModel.from_pretrained(bert_dir).eval()(input_ids=ids, attention_mask=mask).last_hidden_state
        )
    m = mask[..., None].float()
    ref = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=1).numpy()
    got = SentenceEncoder(encoder_dir).encode(texts)
    assert got.shape == (3, 32)
    # fp32 both ways; padding rows differ in length, so this also checks the mask in the exported graph.
    np.testing.assert_allclose(got, ref, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


def test_hybrid_score_is_the_weighted_sum_and_chinese_stays_bm25(encoder_dir):
    enc = SentenceEncoder(encoder_dir)
    entries = [Entry("a", "reset password", "tap forgot password"), Entry("b", "roaming prices", "8 per day"),
               Entry("c", "账单", "每月一号")]  # fmt: skip
    kb = KnowledgeBase(entries, encoder=enc, dense_weight=0.7)
    query = "forgot my password"
    bm = np.array(BM25([tokenize(f"{e.question} {e.answer}") for e in entries]).scores(tokenize(query)))
    vecs = enc.encode([f"{e.question} {e.answer}" for e in entries])
    expected = 0.7 * vecs @ enc.encode([query])[0] + 0.3 * bm / bm.max()
    hits = kb.search(query, k=3, min_score=-10)
    assert [h.entry.id for h in hits] == [entries[i].id for i in np.argsort(-expected, kind="stable")]
    assert [h.score for h in hits] == pytest.approx(sorted(expected, reverse=True), abs=1e-6)
    zh = kb.search("我的账单", k=3)
    assert [h.entry.id for h in zh] == ["c"] and zh[0].score == pytest.approx(
        BM25([tokenize(f"{e.question} {e.answer}") for e in entries]).scores(tokenize("我的账单"))[2]
    )


def test_reload_recomputes_the_vectors(encoder_dir, tmp_path):
    path = tmp_path / "kb.jsonl"
    path.write_text(json.dumps({"id": "a", "question": "q one", "answer": "a one"}) + "\n")
    live = ReloadingKnowledgeBase(path, encoder=SentenceEncoder(encoder_dir))
    assert live.check().vectors.shape == (1, 32)
    path.write_text(
        "".join(json.dumps({"id": f"x{i}", "question": f"q {i}", "answer": "a"}) + "\n" for i in range(3))
    )
    live.request_reload()
    assert live.check().vectors.shape == (3, 32)


def test_missing_encoder_files_are_a_clear_error(tmp_path):
    with pytest.raises(EncoderError, match="no encoder.onnx"):
        SentenceEncoder(tmp_path)
    assert main(["encoder", "export", "--model-dir", str(tmp_path), "--out", str(tmp_path / "o")]) == 2


def test_task_eval_dense_recall_matches_a_cosine_ranking(encoder_dir):
    from pathlib import Path

    from service.tasks.evaluate import retrieval_recall

    seed = Path(__file__).resolve().parents[2] / "data" / "seed"
    got = retrieval_recall(seed, encoder_dir)
    rows = [json.loads(line) for line in (seed / "faq.jsonl").read_text().splitlines()]
    enc = SentenceEncoder(encoder_dir)
    docs = enc.encode([f"{r['question']} {r['answer']}" for r in rows])
    queries = [(p, n) for n, r in enumerate(rows) for p in r["paraphrases"]]
    sims = enc.encode([q for q, _ in queries]) @ docs.T
    top = np.argsort(-sims, axis=1, kind="stable")
    assert got["dense_recall_at_1"] == pytest.approx(
        np.mean([t[0] == n for t, (_, n) in zip(top, queries, strict=True)])
    )
    assert got["dense_recall_at_3"] == pytest.approx(
        np.mean([n in t[:3] for t, (_, n) in zip(top, queries, strict=True)])
    )
    assert 0 <= got["hybrid_recall_at_1"] <= got["hybrid_recall_at_3"] <= 1 and got["queries"] == 162
