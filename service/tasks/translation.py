"""Translation: language pair checks, sentence-level prompts with the dataset's template, joining.

A long text is split into sentences (`service.tasks.text.split_sentences`), every sentence of every text of a
call becomes one prompt, the prompts go to the engine together (one batch), and the translations are joined
back per text with the paragraph breaks of the source. The seed pairs are 1-2 sentences, so a sentence is
what the model was trained to translate. Torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence

from model.chat import encode_chat
from model.errors import UserError
from model.tasks import LANGUAGE_NAMES, render_messages
from service.tasks.text import Segment, detect_language, join_translations, split_sentences


class TranslationError(UserError):
    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def resolve_pair(
    text: str,
    source_lang: str | None,
    target_lang: str,
    pairs: Sequence[tuple[str, str]],
    where: str = "text",
) -> tuple[str, str]:
    supported = ", ".join(f"{a}-{b}" for a, b in pairs)
    src = source_lang
    if not src:
        src = detect_language(text)
        if src is None:
            raise TranslationError(
                f"{where}: cannot detect the source language; pass source_lang", "source_lang"
            )
    if (src, target_lang) not in pairs:
        how = "given" if source_lang else "detected"
        raise TranslationError(
            f"unsupported language pair {src}-{target_lang} (source {how}); supported: {supported}",
            "target_lang" if source_lang or src != target_lang else "source_lang",
        )
    return src, target_lang


def sentence_prompt(tokenizer, sentence: str, src: str, tgt: str) -> list[int]:
    fields = {"src_lang": src, "tgt_lang": tgt, "source": sentence}
    return encode_chat(tokenizer, render_messages("translate", fields), add_generation_prompt=True).ids


def plan(texts: Sequence[str]) -> list[list[Segment]]:
    return [split_sentences(t) for t in texts]


def join(translations: Sequence[str], segments: list[Segment], tgt: str) -> str:
    return join_translations(list(translations), segments, tgt)


def language_name(code: str) -> str:
    return LANGUAGE_NAMES.get(code, code)
