"""What the chat and completions endpoints share: server state, request -> engine sequences, and the response
bodies and SSE chunks built from the engine's outputs.

Torch-free.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import lru_cache

import msgspec
from litestar import Request

from model.chat import CHAT_TEMPLATE, ChatFormatError, encode_chat, render_template
from model.sampling import SamplingParams
from model.tokenizer import Tokenizer
from service.api import protocol as P
from service.api.errors import APIError, clip
from service.engine import DrainingError, Engine, Output, QueueFullError, Sequence
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger("instructlm.api")


@dataclass
class ServerState:
    settings: Settings
    metrics: Metrics
    api_keys: list[str] = field(default_factory=list)
    engine: Engine | None = None
    tokenizer: Tokenizer | None = None
    max_len: int = 0
    ready: bool = False
    draining: bool = False
    load_error: str | None = None
    # (engine CPUs, HTTP CPUs) when settings.engine_cpus pins them (service/affinity.py), else None.
    cpu_plan: tuple[set[int], set[int]] | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def model_name(self) -> str:
        return self.settings.model_name

    def require_ready(self) -> tuple[Engine, Tokenizer]:
        if self.draining:
            raise APIError(503, "the server is shutting down", code="draining", headers={"Retry-After": "1"})
        if not self.ready or self.engine is None or self.tokenizer is None:
            why = f" ({clip(self.load_error, 200)})" if self.load_error else ""
            raise APIError(
                503, f"the model is not loaded yet{why}", code="not_ready", headers={"Retry-After": "2"}
            )
        return self.engine, self.tokenizer

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(
                404,
                f"The model `{clip(name)}` does not exist; this server serves `{self.model_name}`",
                param="model",
                code="model_not_found",
            )


# --- request -> sequences ----------------------------------------------------------------------------------
def sampling_params(req: P._Sampling, seed: int | None) -> SamplingParams:
    try:
        return SamplingParams(
            temperature=req.temperature,
            top_k=req.top_k,
            top_p=req.top_p,
            min_p=req.min_p,
            repetition_penalty=req.repetition_penalty,
            frequency_penalty=req.frequency_penalty,
            presence_penalty=req.presence_penalty,
            seed=seed,
        )
    except ValueError as exc:
        param = str(exc).split(" ", 1)[0]
        raise APIError(400, str(exc), param=param, code="invalid_value") from None


def stop_list(req: P._Sampling) -> list[str]:
    if req.stop is None:
        return []
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop)
    return [s for s in stops if s]


def chat_prompt(tokenizer: Tokenizer, messages: list[P.ChatMessage]) -> list[int]:
    """Our chat format through the one `encode_chat`; a checkpoint's own template (different from ours)
    rendered in a sandboxed Jinja environment, as transformers does."""
    msgs = [{"role": m.role, "content": m.content} for m in messages]
    template = tokenizer.config.get("chat_template")
    try:
        if template and template != CHAT_TEMPLATE:
            from jinja2.exceptions import TemplateError

            try:
                text = render_template(template, msgs, add_generation_prompt=True)
            except TemplateError as exc:
                raise APIError(400, f"chat template: {clip(str(exc), 120)}", param="messages") from None
            return tokenizer.encode(text)
        return encode_chat(tokenizer, msgs, add_generation_prompt=True).ids
    except ChatFormatError as exc:
        raise APIError(400, clip(str(exc), 120), param="messages") from None


def check_context(state: ServerState, prompt_len: int, max_tokens: int | None) -> int:
    """The completion budget, or 400 context_length_exceeded with the counts."""
    window = state.max_len
    if prompt_len == 0:
        raise APIError(400, "the prompt is empty after tokenization", param="prompt")
    if prompt_len >= window:
        raise APIError(
            400,
            f"This model's maximum context length is {window} tokens; the prompt has {prompt_len} tokens "
            f"and no room is left for the completion.",
            type="context_length_exceeded",
            param="messages",
            code="context_length_exceeded",
        )
    if max_tokens is None:
        return min(state.settings.max_tokens_default, window - prompt_len)
    if prompt_len + max_tokens > window:
        raise APIError(
            400,
            f"This model's maximum context length is {window} tokens; you requested {prompt_len + max_tokens} "
            f"tokens ({prompt_len} in the prompt, {max_tokens} for the completion).",
            type="context_length_exceeded",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return max_tokens


class Submission:
    """One request's sequences on the engine and the asyncio queue their outputs arrive on."""

    def __init__(
        self,
        state: ServerState,
        prompt: list[int],
        req: P._Sampling,
        max_tokens: int,
        logprobs: int | None,
        request_id: str,
    ) -> None:
        engine, _ = state.require_ready()
        self.engine = engine
        self.queue: asyncio.Queue[list[Output]] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        stops = stop_list(req)
        timeout = state.settings.request_timeout_s
        self.seqs = [
            Sequence(
                prompt=prompt,
                # numpy seeds must be non-negative: fold any integer into [0, 2**64).
                params=sampling_params(req, None if req.seed is None else (req.seed + i) % 2**64),
                max_tokens=max_tokens,
                stop=stops,
                logprobs=logprobs,
                index=i,
                deliver=self.queue.put_nowait,
                loop=loop,
                request_id=request_id,
                timeout_s=timeout,
                ignore_eos=req.ignore_eos,
            )
            for i in range(req.n)
        ]
        self.prompt_tokens = len(prompt)
        if state.settings.log_prompts:
            log.info(
                "prompt",
                extra={"fields": {"request_id": request_id, "prompt": state.tokenizer.decode(prompt, False)}},
            )
        submit(engine, self.seqs)
        self.remaining = len(self.seqs)

    async def outputs(self, request: Request | None = None) -> AsyncIterator[list[Output]]:
        """Each step's outputs until every sequence has finished; leaving early (a client that disconnected)
        aborts whatever is still running, and its slots are freed at the engine's next step.

        A stream notices a departed client when a write fails; a non-streaming request writes nothing until
        the end, so it passes `request` and this also watches the ASGI channel for `http.disconnect`."""
        watcher = watch_disconnect(request)
        try:
            while self.remaining:
                outs = await next_outputs(self.queue, watcher)
                if outs is None:
                    return  # the client left: the finally clause aborts what is still running
                self.remaining -= sum(1 for o in outs if o.finish_reason is not None)
                yield outs
        finally:
            if watcher is not None:
                watcher.cancel()
            if self.remaining:
                for s in self.seqs:
                    self.engine.abort(s)

    def usage(self, completion_tokens: int, cached: int) -> P.Usage:
        return P.Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=self.prompt_tokens + completion_tokens,
            prompt_tokens_details=P.PromptTokensDetails(cached_tokens=cached),
        )


def submit(engine: Engine, seqs: list[Sequence]) -> None:
    """Put a request's sequences on the engine, or map its refusal to the API's 429 / 503."""
    try:
        engine.submit(seqs)
    except QueueFullError as exc:
        raise APIError(
            429, f"server busy: {exc}; retry later", code="queue_full", headers={"Retry-After": "1"}
        ) from None
    except DrainingError:
        raise APIError(
            503, "the server is shutting down", code="draining", headers={"Retry-After": "1"}
        ) from None


def watch_disconnect(request: Request | None) -> asyncio.Future | None:
    """A future that completes when the client of a non-streaming request has gone (None: don't watch)."""
    return asyncio.ensure_future(_disconnected(request)) if request is not None else None


async def next_outputs(
    queue: asyncio.Queue[list[Output]], watcher: asyncio.Future | None
) -> list[Output] | None:
    """The next step's outputs, or None once `watcher` says the client has gone."""
    if watcher is None:
        return await queue.get()
    getter = asyncio.ensure_future(queue.get())
    await asyncio.wait((getter, watcher), return_when=asyncio.FIRST_COMPLETED)
    if not getter.done():
        getter.cancel()
        return None
    return getter.result()


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone. The body has been read, so the next ASGI message can only be
    `http.disconnect` (sent when the connection drops, or after the response is complete)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


# --- logprobs ----------------------------------------------------------------------------------------------
@lru_cache(maxsize=4)
def _token_table(tokenizer: Tokenizer) -> dict[int, tuple[str, list[int]]]:
    return {}


def token_text(tokenizer: Tokenizer, token_id: int) -> tuple[str, list[int]]:
    table = _token_table(tokenizer)
    hit = table.get(token_id)
    if hit is None:
        raw = tokenizer.token_bytes(token_id)
        hit = table[token_id] = (raw.decode("utf-8", errors="replace"), list(raw))
    return hit


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -9999.0  # JSON has no -inf; OpenAI reports -9999 for impossible tokens


def chat_logprob(tokenizer: Tokenizer, out: Output) -> P.TokenLogprob | None:
    if out.logprob is None or out.token is None:
        return None
    text, raw = token_text(tokenizer, out.token)
    tops = []
    for tid, lp in out.top or ():
        t, b = token_text(tokenizer, tid)
        tops.append(P.TopLogprob(token=t, logprob=_finite(lp), bytes=b))
    return P.TokenLogprob(token=text, logprob=_finite(out.logprob), bytes=raw, top_logprobs=tops)


# --- SSE ---------------------------------------------------------------------------------------------------
def sse(obj: msgspec.Struct) -> bytes:
    return b"data: " + msgspec.json.encode(obj) + b"\n\n"


DONE = b"data: [DONE]\n\n"
