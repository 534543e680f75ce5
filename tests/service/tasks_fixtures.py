"""A tiny random model with a 1024-position window for the task tests: an intent prompt lists 14 labels and a
knowledge-base prompt three FAQ entries, which take 300-600 tokens of the 512-token test BPE."""

from __future__ import annotations


def build_long_checkpoint(tmp_path_factory, tiny_tokenizer):
    from model.checkpoint import save_checkpoint
    from model.config import preset
    from model.transformer import Transformer

    config = preset(
        "tiny",
        vocab_size=tiny_tokenizer.vocab_size,
        eos_token_id=[tiny_tokenizer.eos_id, tiny_tokenizer.endoftext_id],
        pad_token_id=tiny_tokenizer.pad_id,
        max_position_embeddings=1024,
    )
    model = Transformer(config)
    model.init_weights(seed=1)
    root = tmp_path_factory.mktemp("long")
    tiny_tokenizer.save(root / "tokenizer", model_max_length=1024)
    return save_checkpoint(model.eval(), root / "checkpoint", tokenizer_dir=root / "tokenizer")
