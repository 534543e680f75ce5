"""The OpenAI-compatible API through the official `openai` client against a live server, with each runner."""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest

from model.chat import encode_chat, render_template
from model.generate import generate
from model.sampling import GREEDY, log_softmax
from model.tokenizer import Tokenizer
from service.api import protocol as P
from service.api.generation import chat_prompt
from tests.service.conftest import MODEL_NAME

PROMPTS = [
    "How do I reset my password?",
    "Translate to German: Where is the nearest store?",
    "请把这句话翻译成英文：我的手机丢了。",
    "Your bill is due on the first day of each month.",
    "Write a short story about a lost phone.",
    "Roaming is included in the Travel plan.",
    "def add(a, b):",
    "Numbers like 42 and 3.14",
]


def user(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def chat_ids(tok: Tokenizer, content: str) -> list[int]:
    return encode_chat(tok, user(content), add_generation_prompt=True).ids


def test_chat_greedy_matches_reference_generation_with_logprobs(client, tiny_model, tiny_tokenizer):
    """Tokens (as bytes) and logprobs equal model.generate's greedy run on the same prompt ids."""
    ids = chat_ids(tiny_tokenizer, PROMPTS[0])
    ref = generate(tiny_model, [ids], 20, GREEDY, stop_ids=tiny_tokenizer.stop_ids, return_logits=True)[0]
    r = client.chat.completions.create(
        model=MODEL_NAME,
        messages=user(PROMPTS[0]),
        max_tokens=20,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    choice = r.choices[0]
    assert choice.finish_reason == ref.finish_reason
    content = choice.logprobs.content
    assert len(content) == len(ref.tokens) == r.usage.completion_tokens
    assert r.usage.prompt_tokens == len(ids)
    served = b"".join(bytes(t.bytes) for t in content)
    assert served == b"".join(tiny_tokenizer.token_bytes(t) for t in ref.tokens)
    for t, tok_id, logits in zip(content, ref.tokens, ref.logits, strict=True):
        lp = log_softmax(logits[None])[0]
        assert t.logprob == pytest.approx(float(lp[tok_id]), abs=1e-4)
        assert len(t.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one, and the alternatives come in descending order.
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-6)
        tops = [x.logprob for x in t.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        assert tops == pytest.approx(sorted(lp.tolist(), reverse=True)[:3], abs=1e-4)


def _stream_chat(client, **kw):
    chunks = list(client.chat.completions.create(model=MODEL_NAME, stream=True, **kw))
    return chunks


def test_chat_stream_equals_non_stream_for_the_same_seed(client):
    kw = dict(messages=user(PROMPTS[1]), max_tokens=24, temperature=0.9, top_p=0.95, seed=11)
    full = client.chat.completions.create(model=MODEL_NAME, **kw)
    chunks = _stream_chat(client, stream_options={"include_usage": True}, **kw)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    # The usage chunk comes last, with no choices.
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_completions_stream_equals_non_stream_and_sse_ends_with_done(client, live):
    kw = dict(prompt=PROMPTS[3], max_tokens=16, temperature=0.8, seed=3)
    full = client.completions.create(model=MODEL_NAME, **kw)
    parts = list(client.completions.create(model=MODEL_NAME, stream=True, **kw))
    assert "".join(p.choices[0].text for p in parts if p.choices) == full.choices[0].text
    assert full.usage.completion_tokens == 16 and full.choices[0].finish_reason == "length"
    # The raw event stream: `data: {json}` events, then `data: [DONE]`.
    body = {"model": MODEL_NAME, "stream": True, **kw}
    with httpx.stream("POST", f"{live.url}/v1/completions", json=body, timeout=30) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [line for line in resp.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-1])


def test_n2_gives_two_different_choices(client):
    r = client.chat.completions.create(
        model=MODEL_NAME, messages=user(PROMPTS[4]), max_tokens=12, temperature=1.0, n=2, seed=5
    )
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].message.content != r.choices[1].message.content
    assert r.usage.completion_tokens == sum(12 for _ in r.choices)
    chunks = _stream_chat(client, messages=user(PROMPTS[4]), max_tokens=12, temperature=1.0, n=2, seed=5)
    for i in (0, 1):
        streamed = "".join(
            c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i
        )
        assert streamed == r.choices[i].message.content


def _boundary_stop(pieces: list[str]) -> tuple[str, int]:
    """A stop string that spans a token boundary: the last 2 characters of one token's text and the first of the
    next, at its first occurrence in the text."""
    text = "".join(pieces)
    pos = 0
    for a, b in zip(pieces, pieces[1:], strict=False):
        pos += len(a)
        if pos > 2 and len(a) >= 2 and b and "\ufffd" not in a + b:
            stop = a[-2:] + b[0]
            if text.find(stop) == pos - 2:
                return stop, pos - 2
    pytest.fail(f"no clean token boundary in {text!r}")


def test_stop_string_across_tokens_ends_with_stop_and_never_leaks(client):
    kw = dict(messages=user(PROMPTS[5]), max_tokens=32, temperature=0.7, seed=21)
    full = client.chat.completions.create(model=MODEL_NAME, logprobs=True, **kw)
    # The stop token that may end the run is reported in logprobs but is no text.
    pieces = [
        bytes(t.bytes).decode("utf-8", errors="replace")
        for t in full.choices[0].logprobs.content
        if t.token not in ("<|im_end|>", "<|endoftext|>")
    ]
    assert "".join(pieces) == full.choices[0].message.content
    stop, at = _boundary_stop(pieces)
    expected = full.choices[0].message.content[:at]
    r = client.chat.completions.create(model=MODEL_NAME, stop=[stop, "\x00never"], **kw)
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == expected
    chunks = _stream_chat(client, stop=stop, **kw)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == expected and stop not in streamed
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "stop"
    ]


def test_models_tokenize_health_and_openapi(live, client, tiny_tokenizer):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    r = httpx.post(f"{live.url}/tokenize", json={"messages": user(PROMPTS[2])})
    assert r.status_code == 200 and r.json()["tokens"] == chat_ids(tiny_tokenizer, PROMPTS[2])
    for path in ("/health", "/health/live", "/health/ready"):
        assert httpx.get(live.url + path).status_code == 200
    schema = httpx.get(f"{live.url}/docs/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize"} <= set(schema["paths"])
    assert httpx.get(f"{live.url}/docs").status_code == 200


def test_eight_concurrent_greedy_requests_match_each_alone(live):
    """Batching must not change greedy results; where float rounding across batch shapes flips a near-tie, the
    two candidates' logprobs agree within 1e-4 at that point (docs/serving.md)."""
    import openai

    async def one(c, prompt):
        r = await c.chat.completions.create(
            model=MODEL_NAME,
            messages=user(prompt),
            max_tokens=16,
            temperature=0,
            logprobs=True,
            top_logprobs=5,
        )
        return r.choices[0].logprobs.content

    async def run():
        async with openai.AsyncOpenAI(base_url=f"{live.url}/v1", api_key="x", max_retries=0) as c:
            alone = [await one(c, p) for p in PROMPTS]
            steps0, rows0 = live.engine.step_count, live.engine.decode_rows
            together = await asyncio.gather(*(one(c, p) for p in PROMPTS))
            return alone, together, live.engine.step_count - steps0, live.engine.decode_rows - rows0

    alone, together, steps, rows = asyncio.run(run())
    assert rows > steps, "the concurrent requests never shared a decode step"
    for a, b in zip(alone, together, strict=True):
        ta = [bytes(t.bytes) for t in a]
        tb = [bytes(t.bytes) for t in b]
        if ta == tb:
            for x, y in zip(a, b, strict=True):
                assert x.logprob == pytest.approx(y.logprob, abs=1e-4)
            continue
        j = next(i for i, (x, y) in enumerate(zip(ta, tb, strict=False)) if x != y)
        lp_a = {bytes(t.bytes): t.logprob for t in a[j].top_logprobs}
        lp_b = {bytes(t.bytes): t.logprob for t in b[j].top_logprobs}
        # A flip is only acceptable between two near-tied candidates, each seen by both runs.
        assert ta[j] in lp_b and tb[j] in lp_a
        assert abs(lp_a[ta[j]] - lp_a[tb[j]]) < 1e-4 and abs(lp_b[ta[j]] - lp_b[tb[j]]) < 1e-4


def test_checkpoint_chat_template_is_used_when_it_differs_from_ours(tiny_tokenizer):
    template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    custom = Tokenizer(tiny_tokenizer.hf, {**tiny_tokenizer.config, "chat_template": template})
    msgs = [P.ChatMessage(role="system", content="Be brief."), P.ChatMessage(role="user", content="Hi")]
    plain = [{"role": m.role, "content": m.content} for m in msgs]
    expected = tiny_tokenizer.encode(render_template(template, plain, add_generation_prompt=True))
    assert chat_prompt(custom, msgs) == expected
    # Our own template goes through encode_chat (identical ids to training).
    assert (
        chat_prompt(tiny_tokenizer, msgs)
        == encode_chat(tiny_tokenizer, plain, add_generation_prompt=True).ids
    )
    assert expected != chat_prompt(tiny_tokenizer, msgs)


def test_json_chunks_are_openai_shaped(live):
    """Raw JSON: the body keys a strict client reads."""
    body = {"model": MODEL_NAME, "messages": user("Hi"), "max_tokens": 3, "temperature": 0}
    r = httpx.post(f"{live.url}/v1/chat/completions", json=body)
    data = r.json()
    assert r.status_code == 200 and data["object"] == "chat.completion"
    assert set(data["usage"]) >= {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert data["choices"][0]["message"]["role"] == "assistant"
    assert json.loads(json.dumps(data)) == data and np.isfinite(data["created"])
