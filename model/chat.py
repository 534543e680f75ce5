"""The chat format, once: training and serving both call `encode_chat`, so the service prompts the model with
exactly the tokens it was trained on. The same template is stored as Jinja (`CHAT_TEMPLATE`) in
tokenizer_config.json so `transformers.apply_chat_template` renders identical ids (tested).

ChatML layout: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message; the generation prompt is
`<|im_start|>assistant\\n`. The loss mask covers each assistant message's content and its `<|im_end|>`
(the model learns to stop), nothing else.

Torch-free.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from model.tokenizer import Tokenizer

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ROLES = ("system", "user", "assistant")

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class ChatFormatError(ValueError):
    """A message list that the chat format cannot render; the message names the index and field."""


@dataclass(frozen=True)
class ChatEncoding:
    ids: list[int]
    # 1 where the token is trained on (assistant content and its <|im_end|>), else 0.
    loss_mask: list[int]


def _check(messages: Sequence[Mapping[str, Any]]) -> None:
    if not messages:
        raise ChatFormatError("messages is empty")
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ChatFormatError(f"messages[{i}].role is {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ChatFormatError(f"messages[{i}].content must be a string, got {type(content).__name__}")


def render(
    messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False
) -> tuple[str, list[tuple[int, int]]]:
    """The prompt text and the character spans [start, end) that the loss covers."""
    _check(messages)
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = 0
    for m in messages:
        head = f"{IM_START}{m['role']}\n"
        body = f"{m['content']}{IM_END}"
        if m["role"] == "assistant":
            spans.append((pos + len(head), pos + len(head) + len(body)))
        chunk = head + body + "\n"
        parts.append(chunk)
        pos += len(chunk)
    if add_generation_prompt:
        parts.append(f"{IM_START}assistant\n")
    return "".join(parts), spans


def encode_chat(
    tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False
) -> ChatEncoding:
    """Render and tokenize in one pass; the mask comes from each token's character offsets, so it is exact
    whatever the BPE merges do at segment boundaries."""
    text, spans = render(messages, add_generation_prompt)
    ids, offsets = tokenizer.encode_with_offsets(text)
    mask = [0] * len(ids)
    si = 0
    for t, (start, _end) in enumerate(offsets):
        while si < len(spans) and start >= spans[si][1]:
            si += 1
        if si < len(spans) and spans[si][0] <= start < spans[si][1]:
            mask[t] = 1
    return ChatEncoding(ids, mask)


def render_template(
    template: str, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool, **extra
) -> str:
    """Render a checkpoint's own Jinja chat template in a sandbox, as transformers does."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message: str):
        raise TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(
        messages=list(messages), add_generation_prompt=add_generation_prompt, **extra
    )
