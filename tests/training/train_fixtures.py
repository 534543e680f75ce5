"""Small datasets in the exact record layout of `instructlm data build` (DESIGN.md "Example record"), a saved tiny
tokenizer and training recipes for the training tests. Import the fixtures into a test module to use them."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.conftest import tiny_corpus

TASKS = ("content", "customer_service", "dialog", "translation")


def _record(i: int, task: str, rng: random.Random, lines: list[str]) -> dict:
    """A chat whose length varies a lot (1-6 sentences per turn, 1-3 turns), so packed rows and micro-batches
    carry very different label-token counts."""
    messages = []
    if rng.random() < 0.5:
        messages.append({"role": "system", "content": "You are the customer service assistant."})
    for _turn in range(rng.randint(1, 3) if task == "dialog" else 1):
        messages.append({"role": "user", "content": " ".join(rng.sample(lines, rng.randint(1, 3)))})
        messages.append({"role": "assistant", "content": " ".join(rng.sample(lines, rng.randint(1, 6)))})
    return {
        "id": f"{task}-{i:04d}",
        "kind": "chat",
        "task": task,
        "messages": messages,
        "text": None,
        "source": {"file": "fixture.jsonl", "line": i + 1},
        "meta": {},
        "origin_id": None,
    }


def make_dataset(root: Path, per_task: dict[str, int], seed: int = 0, text_records: int = 20) -> Path:
    from training.data.mixing import mixing_weights

    rng = random.Random(seed)
    lines = sorted(set(tiny_corpus()))
    root.mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for task, n in per_task.items():
        for i in range(n):
            rec = _record(i, task, rng, lines)
            split = "val" if i % 10 == 8 else "test" if i % 10 == 9 else "train"
            splits[split].append(rec)
    for i in range(text_records):
        splits["train"].append(
            {
                "id": f"text-{i:04d}",
                "kind": "text",
                "task": "general",
                "messages": None,
                "text": "\n".join(rng.sample(lines, 8)),
                "source": {"file": "corpus.txt", "line": i + 1},
                "meta": {},
                "origin_id": None,
            }
        )
    counts = {t: sum(1 for r in splits["train"] if r["task"] == t) for t in (*per_task, "general")}
    for name, recs in splits.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
    for name in ("rejected", "duplicates"):
        (root / f"{name}.jsonl").write_text("")
    manifest = {
        "name": "fixture",
        "counts": {"train": len(splits["train"]), "val": len(splits["val"]), "test": len(splits["test"])},
        "mixing": {"weights": mixing_weights(counts, cap=0, temperature=1.0), "cap": 0, "temperature": 1.0},
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return root


@pytest.fixture(scope="session")
def train_dataset(tmp_path_factory) -> Path:
    """Read-only: about 200 chats over four tasks plus 20 text records."""
    return make_dataset(
        tmp_path_factory.mktemp("train_data") / "dataset",
        {"content": 30, "customer_service": 80, "dialog": 60, "translation": 40},
    )


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    d = tmp_path_factory.mktemp("train_tok") / "tokenizer"
    tiny_tokenizer.save(d, model_max_length=256)
    return d


def write_config(path: Path, dataset: Path, tokenizer: Path, out_dir: Path, extra: str = "", **stage) -> Path:
    """A tiny-preset recipe; `stage` sets keys of both stage tables (steps, batch_size, ...)."""
    stage_keys = {
        "steps": 12,
        "batch_size": 4,
        "grad_accum": 1,
        "lr": 3e-3,
        "warmup_steps": 3,
        "checkpoint_every": 4,
    }
    stage_keys.update(stage)
    body = "\n".join(f"{k} = {json.dumps(v)}" for k, v in stage_keys.items())
    path.write_text(
        f"""out_dir = "{out_dir}"
stages = ["pretrain", "sft"]

[model]
preset = "tiny"

[data]
dataset = "{dataset}"
tokenizer = "{tokenizer}"
seq_len = 64
val_max_rows = 8

[pretrain]
{body}

[sft]
{body}

[run]
seed = 0
device = "cpu"
threads = 1
log_every = 1000
tensorboard = false
plots = false
samples_per_task = 1
sample_tokens = 4
{extra}
"""
    )
    return path
