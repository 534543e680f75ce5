"""OpenAI-compatible controllers: /v1/chat/completions, /v1/completions, /v1/models, and /tokenize."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

from litestar import Controller, Request, Response, get, post
from litestar.datastructures import State
from litestar.params import FromPath, JSONBody
from litestar.response import Stream

from service.api import protocol as P
from service.api.generation import (
    DONE,
    ServerState,
    Submission,
    chat_logprob,
    chat_prompt,
    check_context,
    new_id,
    sse,
    token_text,
)
from service.api.security import require_api_key
from service.engine import Output

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _server(state: State) -> ServerState:
    return state.server


class ChatController(Controller):
    path = "/v1/chat/completions"
    guards = [require_api_key]
    tags = ["openai"]

    @post(status_code=200, summary="Chat completion (JSON or SSE stream)")
    async def create(
        self, state: State, request: Request, data: JSONBody[P.ChatCompletionRequest]
    ) -> Response:
        srv = _server(state)
        srv.check_model(data.model)
        _, tokenizer = srv.require_ready()
        prompt = chat_prompt(tokenizer, data.messages)
        max_tokens = data.max_completion_tokens if data.max_completion_tokens is not None else data.max_tokens
        budget = check_context(srv, len(prompt), max_tokens)
        top = (data.top_logprobs or 0) if data.logprobs else None
        rid = new_id("chatcmpl")
        request.scope.setdefault("state", {})["request_id"] = rid
        sub = Submission(srv, prompt, data, budget, top, rid)
        created = int(time.time())
        if data.stream:
            usage = data.stream_options is not None and data.stream_options.include_usage
            return Stream(
                _chat_stream(srv, sub, rid, created, usage),
                media_type="text/event-stream",
                headers=_SSE_HEADERS,
            )
        texts = [[] for _ in sub.seqs]
        lps: list[list[P.TokenLogprob]] = [[] for _ in sub.seqs]
        reasons: list[str | None] = [None] * len(sub.seqs)
        completion = cached = 0
        async for outs in sub.outputs(request):
            for o in outs:
                texts[o.index].append(o.text)
                if top is not None and (lp := chat_logprob(tokenizer, o)) is not None:
                    lps[o.index].append(lp)
                if o.finish_reason is not None:
                    reasons[o.index] = o.finish_reason
                    completion += o.completion_tokens
                    cached = o.cached_tokens
        choices = [
            P.ChatChoice(
                index=i,
                message=P.AssistantMessage(content="".join(texts[i])),
                finish_reason=reasons[i],
                logprobs=P.ChoiceLogprobs(content=lps[i]) if top is not None else None,
            )
            for i in range(len(sub.seqs))
        ]
        body = P.ChatCompletion(
            id=rid,
            created=created,
            model=srv.model_name,
            choices=choices,
            usage=sub.usage(completion, cached),
        )
        return Response(body, status_code=200)


async def _stream_chunks(
    sub: Submission,
    include_usage: bool,
    choice: Callable[[Output], object | None],
    chunk: Callable[..., object],
) -> AsyncIterator[bytes]:
    """The SSE loop both OpenAI endpoints share: one chunk per engine step with the choices `choice` builds
    (None: nothing to send yet), the usage chunk when asked for, then [DONE]. `chunk(choices, usage=None)`
    wraps them in the endpoint's chunk type."""
    completion = cached = 0
    async for outs in sub.outputs():
        choices = []
        for o in outs:
            if o.finish_reason == "abort":
                continue
            c = choice(o)
            if c is None:
                continue
            choices.append(c)
            if o.finish_reason is not None:
                completion += o.completion_tokens
                cached = o.cached_tokens
        if choices:
            yield sse(chunk(choices))
    if include_usage:
        yield sse(chunk([], usage=sub.usage(completion, cached)))
    yield DONE


async def _chat_stream(
    srv: ServerState, sub: Submission, rid: str, created: int, include_usage: bool
) -> AsyncIterator[bytes]:
    tokenizer = srv.tokenizer
    model = srv.model_name

    def chunk(choices, usage=None):
        return P.ChatCompletionChunk(id=rid, created=created, model=model, choices=choices, usage=usage)

    yield sse(
        chunk(
            [P.ChatChunkChoice(index=s.index, delta=P.Delta(role="assistant", content="")) for s in sub.seqs]
        )
    )
    want_lp = sub.seqs[0].logprobs is not None

    def choice(o: Output) -> P.ChatChunkChoice | None:
        lp = chat_logprob(tokenizer, o) if want_lp else None
        if not o.text and o.finish_reason is None and lp is None:
            return None  # a held-back character or stop-string prefix: nothing to send yet
        return P.ChatChunkChoice(
            index=o.index,
            delta=P.Delta(content=o.text) if o.text else P.Delta(),
            finish_reason=o.finish_reason,
            logprobs=P.ChoiceLogprobs(content=[lp]) if lp is not None else None,
        )

    async for data in _stream_chunks(sub, include_usage, choice, chunk):
        yield data


class CompletionsController(Controller):
    path = "/v1/completions"
    guards = [require_api_key]
    tags = ["openai"]

    @post(status_code=200, summary="Text completion (JSON or SSE stream)")
    async def create(self, state: State, request: Request, data: JSONBody[P.CompletionRequest]) -> Response:
        srv = _server(state)
        srv.check_model(data.model)
        _, tokenizer = srv.require_ready()
        prompt = tokenizer.encode(data.prompt)
        budget = check_context(srv, len(prompt), data.max_tokens)
        rid = new_id("cmpl")
        request.scope.setdefault("state", {})["request_id"] = rid
        sub = Submission(srv, prompt, data, budget, data.logprobs, rid)
        created = int(time.time())
        echo = data.prompt if data.echo else ""
        if data.stream:
            usage = data.stream_options is not None and data.stream_options.include_usage
            return Stream(
                _completion_stream(srv, sub, rid, created, usage, echo),
                media_type="text/event-stream",
                headers=_SSE_HEADERS,
            )
        n = len(sub.seqs)
        texts: list[list[str]] = [[echo] for _ in range(n)]
        lps = [_CompletionLogprobs(len(echo)) for _ in range(n)]
        reasons: list[str | None] = [None] * n
        completion = cached = 0
        async for outs in sub.outputs(request):
            for o in outs:
                texts[o.index].append(o.text)
                if data.logprobs is not None:
                    lps[o.index].add(tokenizer, o)
                if o.finish_reason is not None:
                    reasons[o.index] = o.finish_reason
                    completion += o.completion_tokens
                    cached = o.cached_tokens
        choices = [
            P.CompletionChoice(
                index=i,
                text="".join(texts[i]),
                finish_reason=reasons[i],
                logprobs=lps[i].build() if data.logprobs is not None else None,
            )
            for i in range(n)
        ]
        body = P.Completion(
            id=rid,
            created=created,
            model=srv.model_name,
            choices=choices,
            usage=sub.usage(completion, cached),
        )
        return Response(body, status_code=200)


class _CompletionLogprobs:
    def __init__(self, offset: int) -> None:
        self.offset = offset
        self.tokens: list[str] = []
        self.lps: list[float] = []
        self.tops: list[dict[str, float]] = []
        self.offsets: list[int] = []

    def add(self, tokenizer, o) -> None:
        lp = chat_logprob(tokenizer, o)
        if lp is None:
            return
        self.tokens.append(lp.token)
        self.lps.append(lp.logprob)
        self.tops.append({t.token: t.logprob for t in lp.top_logprobs})
        self.offsets.append(self.offset)
        self.offset += len(token_text(tokenizer, o.token)[0])

    def build(self) -> P.CompletionLogprobs:
        return P.CompletionLogprobs(
            tokens=self.tokens, token_logprobs=self.lps, top_logprobs=self.tops, text_offset=self.offsets
        )


async def _completion_stream(
    srv: ServerState, sub: Submission, rid: str, created: int, include_usage: bool, echo: str
) -> AsyncIterator[bytes]:
    tokenizer = srv.tokenizer
    model = srv.model_name

    def chunk(choices, usage=None):
        return P.Completion(id=rid, created=created, model=model, choices=choices, usage=usage)

    if echo:
        yield sse(chunk([P.CompletionChoice(index=s.index, text=echo, finish_reason=None) for s in sub.seqs]))
    want_lp = sub.seqs[0].logprobs is not None
    offsets = [len(echo)] * len(sub.seqs)

    def choice(o: Output) -> P.CompletionChoice | None:
        logprobs = None
        if want_lp and o.token is not None:
            acc = _CompletionLogprobs(offsets[o.index])
            acc.add(tokenizer, o)
            offsets[o.index] = acc.offset
            logprobs = acc.build()
        if not o.text and o.finish_reason is None and logprobs is None:
            return None
        return P.CompletionChoice(
            index=o.index, text=o.text, finish_reason=o.finish_reason, logprobs=logprobs
        )

    async for data in _stream_chunks(sub, include_usage, choice, chunk):
        yield data


class ModelsController(Controller):
    path = "/v1/models"
    guards = [require_api_key]
    tags = ["openai"]

    @get(summary="The served model")
    async def list_models(self, state: State) -> P.ModelList:
        srv = _server(state)
        return P.ModelList(
            data=[P.ModelCard(id=srv.model_name, created=srv.created, max_model_len=srv.max_len or None)]
        )

    @get("/{model_id:str}", summary="One model")
    async def get_model(self, state: State, model_id: FromPath[str]) -> P.ModelCard:
        srv = _server(state)
        srv.check_model(model_id)
        return P.ModelCard(id=srv.model_name, created=srv.created, max_model_len=srv.max_len or None)


class TokenizeController(Controller):
    path = "/tokenize"
    guards = [require_api_key]
    tags = ["tools"]

    @post(status_code=200, summary="Token ids of a prompt or of rendered chat messages")
    async def tokenize(self, state: State, data: JSONBody[P.TokenizeRequest]) -> P.TokenizeResponse:
        from service.api.errors import APIError

        srv = _server(state)
        srv.check_model(data.model)
        _, tokenizer = srv.require_ready()
        if (data.prompt is None) == (data.messages is None):
            raise APIError(400, "give exactly one of `prompt` or `messages`", param="prompt")
        if data.messages is not None:
            ids = chat_prompt(tokenizer, data.messages)
        else:
            ids = tokenizer.encode(data.prompt or "")
        return P.TokenizeResponse(tokens=ids, count=len(ids), max_model_len=srv.max_len)
