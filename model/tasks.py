"""Per-task instruction templates: the one place the wording of a task prompt lives (torch-free).

The dataset pipeline renders its seed records with these templates and the service prompts the model with the
same ones, so a served request looks exactly like a training example. Every template has a canonical wording
(variant 0, what the service uses) and rephrasings (variants 1..n) that the pipeline's augmentation stage uses on
the train split only, so the model does not overfit one phrasing.

    render_instruction("translate", src_lang="en", tgt_lang="de", source="Hello")
    render_messages("cs_answer", {"question": "..."}, response="...")  # system + user (+ assistant)
    content_text("translate", fields)  # the part of a prompt that is data, not template (dedup, leak checks)
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from model.errors import UserError

TASKS = ("customer_service", "content", "translation", "qa", "dialog", "general")

LANGUAGE_NAMES = {
    "en": "English",
    "zh": "Chinese",
    "de": "German",
    "fr": "French",
    "es": "Spanish",
    "it": "Italian",
    "ja": "Japanese",
    "pt": "Portuguese",
    "nl": "Dutch",
    "ru": "Russian",
}

COMPANY = "Kestrel Mobile"

SYSTEM_PROMPTS = {
    "customer_service": (
        f"You are the customer service assistant of {COMPANY}. Answer briefly and politely from what you know "
        "about our plans, devices and policies; if you cannot help, offer to connect the customer to a human agent."
    ),
}


@dataclass(frozen=True)
class Template:
    name: str
    task: str
    variants: tuple[str, ...]
    # Fields that carry the example's own data (not the template's wording): dedup and the train/test leak
    # check compare these, because two prompts that share only a template are not similar examples.
    content_fields: tuple[str, ...]
    system: str | None = None

    @property
    def fields(self) -> tuple[str, ...]:
        names: list[str] = []
        for variant in self.variants:
            for _, name, _, _ in string.Formatter().parse(variant):
                if name and name not in names:
                    names.append(name)
        return tuple(names)


TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        Template(
            "cs_answer",
            "customer_service",
            (
                "{question}",
                "Customer question: {question}",
                'A customer writes: "{question}" How do you reply?',
                "Please help me with this: {question}",
            ),
            content_fields=("question",),
            system=SYSTEM_PROMPTS["customer_service"],
        ),
        Template(
            "cs_intent",
            "customer_service",
            (
                "Classify the intent of this customer message. Answer with one label from: {labels}.\n\nMessage: {text}",
                "Which intent does this message express? Choose one of: {labels}.\n\n{text}",
                "Intent labels: {labels}.\nCustomer message: {text}\nIntent:",
            ),
            content_fields=("text",),
        ),
        Template(
            "article",
            "content",
            (
                "Write an article of about {target_words} words on {topic} in a {tone} tone. "
                "Use these keywords: {keywords}.",
                "Write a {tone} article (roughly {target_words} words) about {topic}. Include: {keywords}.",
                "Topic: {topic}\nTone: {tone}\nKeywords: {keywords}\nLength: about {target_words} words\n"
                "Write the article.",
            ),
            content_fields=("topic", "keywords"),
        ),
        Template(
            "ad_copy",
            "content",
            (
                "Write ad copy of about {target_words} words for {topic} in a {tone} tone. "
                "Use these keywords: {keywords}.",
                "Create a short {tone} advertisement (about {target_words} words) for {topic} mentioning {keywords}.",
                "Product or offer: {topic}\nTone: {tone}\nKeywords: {keywords}\nWrite the ad copy.",
            ),
            content_fields=("topic", "keywords"),
        ),
        Template(
            "story",
            "content",
            (
                "Write a short story of about {target_words} words about {topic} in a {tone} tone. "
                "Use these keywords: {keywords}.",
                "Tell a {tone} story (about {target_words} words) about {topic}, using the words {keywords}.",
                "Story idea: {topic}\nTone: {tone}\nMust include: {keywords}\nWrite the story.",
            ),
            content_fields=("topic", "keywords"),
        ),
        Template(
            "translate",
            "translation",
            (
                "Translate the following {src_name} text into {tgt_name}.\n\n{source}",
                "Translate from {src_name} to {tgt_name}:\n{source}",
                "{source}\n\nPlease give the {tgt_name} translation of the {src_name} text above.",
            ),
            content_fields=("source",),
        ),
        Template(
            "qa_context",
            "qa",
            (
                "Read the text and answer the question.\n\n{context}\n\nQuestion: {question}",
                "{context}\n\nUsing the passage above, answer: {question}",
                "Passage:\n{context}\n\nQ: {question}",
            ),
            content_fields=("context", "question"),
        ),
        Template(
            "qa_open",
            "qa",
            ("{question}", "Answer the question: {question}", "Q: {question}\nA:"),
            content_fields=("question",),
        ),
        Template(
            "instruction",
            "general",
            ("{instruction}", "{instruction}\n\nRespond to the request above.", "Task: {instruction}"),
            content_fields=("instruction",),
        ),
        Template(
            "instruction_input",
            "general",
            (
                "{instruction}\n\n{input}",
                "{instruction}\n\nInput:\n{input}",
                "### Instruction:\n{instruction}\n\n### Input:\n{input}",
            ),
            content_fields=("instruction", "input"),
        ),
    )
}


def _derived_fields(fields: dict[str, object]) -> dict[str, object]:
    out = dict(fields)
    for side in ("src", "tgt"):
        code = out.get(f"{side}_lang")
        if isinstance(code, str) and f"{side}_name" not in out:
            out[f"{side}_name"] = LANGUAGE_NAMES.get(code, code)
    if isinstance(out.get("keywords"), (list, tuple)):
        out["keywords"] = ", ".join(str(k) for k in out["keywords"])  # type: ignore[union-attr]
    if isinstance(out.get("labels"), (list, tuple)):
        out["labels"] = ", ".join(str(k) for k in out["labels"])  # type: ignore[union-attr]
    return out


def get_template(name: str) -> Template:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise UserError(f"unknown task template '{name}'; known: {', '.join(TEMPLATES)}") from None


def render_instruction(name: str, variant: int = 0, **fields: object) -> str:
    """The user-turn text of template `name` (variant 0 = canonical, what the service sends)."""
    template = get_template(name)
    if not 0 <= variant < len(template.variants):
        raise UserError(f"template '{name}' has variants 0..{len(template.variants) - 1}, got {variant}")
    values = _derived_fields(fields)
    try:
        return template.variants[variant].format(**values)
    except KeyError as exc:
        raise UserError(
            f"template '{name}' needs field {exc.args[0]!r}; got {', '.join(sorted(fields))}"
        ) from None


def render_messages(
    name: str, fields: dict[str, object], response: str | None = None, variant: int = 0
) -> list[dict[str, str]]:
    """Chat messages for one example: the task's system prompt (if any), the user turn, and the assistant turn
    when `response` is given (training) or not (serving)."""
    template = get_template(name)
    messages = []
    if template.system:
        messages.append({"role": "system", "content": template.system})
    messages.append({"role": "user", "content": render_instruction(name, variant, **fields)})
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return messages


def content_text(name: str, fields: dict[str, object]) -> str:
    """The data part of a templated prompt, one field per line (for similarity, not for the model)."""
    template = get_template(name)
    values = _derived_fields(fields)
    return "\n".join(str(values[f]) for f in template.content_fields if values.get(f))


def task_of(name: str) -> str:
    return get_template(name).task
