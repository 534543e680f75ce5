"""Tokenizer and chat format: transformers' apply_chat_template gives exactly our ids; the loss mask covers
assistant content and its end token only."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from model.chat import ChatFormatError, encode_chat, render, render_template
from model.tokenizer import SPECIAL_TOKENS, Tokenizer

CONVERSATIONS = {
    "single-turn": [{"role": "user", "content": "How do I reset my password?"}],
    "system": [
        {"role": "system", "content": "You are Kestrel Mobile's assistant."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
    ],
    "multi-turn": [
        {"role": "user", "content": "Translate to German: good morning"},
        {"role": "assistant", "content": " Guten Morgen\n"},
        {"role": "user", "content": "请翻译：谢谢"},
        {"role": "assistant", "content": "Thank you."},
        {"role": "user", "content": "  spaces  and\ttabs "},
    ],
}


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_checkpoint):
    return AutoTokenizer.from_pretrained(tiny_checkpoint)


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("gen", [False, True], ids=["no-gen-prompt", "gen-prompt"])
def test_transformers_renders_identical_ids(tiny_tokenizer, hf_tokenizer, name, gen):
    messages = CONVERSATIONS[name]
    theirs = hf_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen)
    if not isinstance(theirs, list):
        theirs = theirs["input_ids"]
    assert encode_chat(tiny_tokenizer, messages, gen).ids == list(theirs)
    assert render_template(tiny_tokenizer.chat_template, messages, gen) == render(messages, gen)[0]


def test_loss_mask_covers_assistant_content_and_end_token(tiny_tokenizer):
    enc = encode_chat(tiny_tokenizer, CONVERSATIONS["multi-turn"])
    trained = tiny_tokenizer.decode(
        [t for t, m in zip(enc.ids, enc.loss_mask, strict=True) if m], skip_special_tokens=False
    )
    assert trained == " Guten Morgen\n<|im_end|>Thank you.<|im_end|>"
    assert len(enc.ids) == len(enc.loss_mask)


def test_generation_prompt_is_the_training_prefix(tiny_tokenizer):
    conv = CONVERSATIONS["system"]
    prompt = encode_chat(tiny_tokenizer, conv[:-1], add_generation_prompt=True).ids
    full = encode_chat(tiny_tokenizer, conv).ids
    assert full[: len(prompt)] == prompt


@pytest.mark.parametrize(
    "messages, match",
    [
        ([], "messages is empty"),
        ([{"role": "robot", "content": "x"}], r"messages\[0\]\.role is 'robot'"),
        (
            [{"role": "user", "content": "a"}, {"role": "user", "content": 3}],
            r"messages\[1\]\.content must be a string",
        ),
    ],
)
def test_bad_messages_name_the_index(tiny_tokenizer, messages, match):
    with pytest.raises(ChatFormatError, match=match):
        encode_chat(tiny_tokenizer, messages)


def test_special_tokens_have_fixed_ids_and_bytes_round_trip(tiny_tokenizer, tmp_path):
    assert [tiny_tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    text = "Grüße, 你好! Tabs\tand\nnewlines 😀"
    ids = tiny_tokenizer.encode(text)
    assert tiny_tokenizer.decode(ids) == text
    assert b"".join(tiny_tokenizer.token_bytes(i) for i in ids) == text.encode()
    tiny_tokenizer.save(tmp_path)
    assert Tokenizer.load(tmp_path).encode(text) == ids
