"""Shared fixtures: one tiny tokenizer, model and checkpoint per test run (built in about a second).

Expensive artefacts are session-scoped; tests that mutate them must copy first.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

# A small multilingual corpus written for the tests: enough for a 512-token byte-level BPE.
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "How do I reset my password? Open the app and tap Forgot password.",
    "Your bill is due on the first day of each month.",
    "Roaming is included in the Travel plan for 30 countries.",
    "Please write a short story about a lost phone in a storm.",
    "Translate to German: Where is the nearest store?",
    "Wo ist der nächste Laden? Wir öffnen um neun Uhr.",
    "Grüße aus Berlin! Das Wetter ist schön und die Straßen sind voll.",
    "请把这句话翻译成英文：我的手机丢了。",
    "你好，我想查询一下我的账单。谢谢！",
    "Numbers like 42, 3.14 and 2026 appear in text too.",
    "def add(a, b):\n    return a + b\n",
]


def tiny_corpus() -> list[str]:
    return [f"{line} {i}" for i in range(20) for line in _CORPUS]


@pytest.fixture(scope="session")
def torch_threads():
    import torch

    torch.set_num_threads(1)
    return 1


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from model.tokenizer import train_tokenizer

    return train_tokenizer(tiny_corpus(), vocab_size=512, min_frequency=1, model_max_length=256)


@pytest.fixture(scope="session")
def tiny_config(tiny_tokenizer):
    from model.config import preset

    return preset(
        "tiny",
        vocab_size=tiny_tokenizer.vocab_size,
        eos_token_id=[tiny_tokenizer.eos_id, tiny_tokenizer.endoftext_id],
        pad_token_id=tiny_tokenizer.pad_id,
    )


@pytest.fixture(scope="session")
def tiny_model(tiny_config, torch_threads):
    """A random-weight tiny model (eval mode). Do not modify: copy.deepcopy it first."""
    from model.transformer import Transformer

    model = Transformer(tiny_config)
    model.init_weights(seed=0)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_model, tiny_tokenizer):
    """A complete HF-layout checkpoint directory (weights, config, tokenizer). Read-only: copy to modify."""
    from model.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    tiny_tokenizer.save(root / "tokenizer", model_max_length=tiny_model.config.max_position_embeddings)
    return save_checkpoint(tiny_model, root / "checkpoint", tokenizer_dir=root / "tokenizer")


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_checkpoint, torch_threads):
    """The tiny checkpoint exported once per run (served fp32 + int8 + optimum graphs, parity report; about
    2 s). Read-only: tests that break files copy it first."""
    import json

    from export.onnx_export import export_bundle

    root = tmp_path_factory.mktemp("bundle")
    val = root / "val.jsonl"
    val.write_text("".join(json.dumps({"text": t}) + "\n" for t in tiny_corpus()[:24]))
    # The slot design (the default where its op library is built, as `make install` does): explicit, so a
    # missing library fails here with the message saying how to build it instead of testing the other design.
    export_bundle(tiny_checkpoint, root / "bundle", quantize="int8", val_data=val, attention="slot")
    return root / "bundle"


@pytest.fixture(scope="session")
def tiny_gather_bundle(tmp_path_factory, tiny_checkpoint, torch_threads):
    """The tiny checkpoint with the standard-ops served graph (attention="gather"), fp32 only. Read-only."""
    from export.onnx_export import export_bundle

    root = tmp_path_factory.mktemp("gather")
    export_bundle(tiny_checkpoint, root / "bundle", attention="gather")
    return root / "bundle"
