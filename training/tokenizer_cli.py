"""Train the project's tokenizer (model.tokenizer.train_tokenizer) on a dataset's train split and save it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from model.errors import ConfigError
from training import tokens as T

MIN_VOCAB = 259  # 256 byte tokens + 3 special tokens


def train_from_dataset(
    dataset: str | Path,
    vocab_size: int,
    out: str | Path,
    min_frequency: int = 2,
    model_max_length: int = 1024,
) -> dict[str, Any]:
    from model.tokenizer import train_tokenizer

    if vocab_size < MIN_VOCAB:
        raise ConfigError(f"--vocab-size {vocab_size} is below {MIN_VOCAB} (256 bytes + 3 special tokens)")
    if min_frequency < 1:
        raise ConfigError(f"--min-frequency must be >= 1, got {min_frequency}")
    T.read_manifest(dataset)
    records = T.read_records(
        dataset, "train"
    )  # train split only: val/test text must not shape the vocabulary
    if not records:
        raise T.DatasetError(f"{dataset}/train.jsonl: no records")
    texts = list(T.record_texts(records))
    tok = train_tokenizer(
        texts, vocab_size, min_frequency=min_frequency, show_progress=True, model_max_length=model_max_length
    )
    tok.save(out, model_max_length=model_max_length)
    chars = sum(len(t) for t in texts)
    n_tokens = sum(len(ids) for ids in tok.encode_batch(texts))
    return {
        "vocab_size": tok.vocab_size,
        "records": len(records),
        "chars": chars,
        "tokens": n_tokens,
        "chars_per_token": chars / max(n_tokens, 1),
    }
