"""HTTP endpoints of the tasks: customer service, content, translation (JSON, SSE) and live translation
(WebSocket). Requests go through the serving engine like the OpenAI endpoints; errors use the shared shape.

`task_lifespan(srv)` builds the task state at start (knowledge base, intent labels, guards, metrics) and,
once the model is loaded, the intent scorer. Torch-free.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import msgspec
from litestar import Controller, Request, Response, WebSocket, post, websocket
from litestar.datastructures import State
from litestar.exceptions import WebSocketDisconnect
from litestar.params import JSONBody, QueryParameter
from litestar.response import Stream

from model.chat import encode_chat
from model.errors import UserError
from model.sampling import SamplingParams
from service.api.errors import APIError, clip
from service.api.generation import DONE, ServerState, new_id, next_outputs, submit, watch_disconnect
from service.api.security import require_api_key
from service.engine import Sequence
from service.tasks import content as C
from service.tasks import customer_service as CS
from service.tasks import translation as T
from service.tasks.guard import Guard, StreamGuard
from service.tasks.metrics import TaskMetrics
from service.tasks.retrieval import ReloadingKnowledgeBase
from service.tasks.settings import TaskSettings

log = logging.getLogger("instructlm.tasks")
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# --- protocol ------------------------------------------------------------------------------------------------
class Turn(msgspec.Struct, forbid_unknown_fields=True):
    role: str
    content: str


class _Gen(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    stream: bool = False
    temperature: float = msgspec.field(default=0.0)
    seed: int | None = None
    max_tokens: int | None = None


class CustomerServiceRequest(_Gen, kw_only=True):
    messages: list[Turn]
    top_k: int | None = None


class ContentRequest(_Gen, kw_only=True):
    kind: str
    topic: str
    target_words: int
    keywords: list[str] = []
    tone: str = "informative"


class TranslateRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    text: str | list[str]
    target_lang: str
    source_lang: str | None = None
    temperature: float = 0.0
    seed: int | None = None
    stream: bool = False


class IntentCandidate(msgspec.Struct):
    label: str
    probability: float


class Intent(msgspec.Struct):
    label: str
    confidence: float
    candidates: list[IntentCandidate]
    temperature: float


class KnowledgeHit(msgspec.Struct):
    id: str
    question: str
    score: float


class GuardReport(msgspec.Struct):
    flagged: bool
    hits: dict[str, int]


class TaskUsage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CustomerServiceResponse(msgspec.Struct):
    id: str
    intent: Intent
    knowledge: list[KnowledgeHit]
    reply: str
    handoff: bool
    handoff_reason: str | None
    dropped_turns: int
    guard: GuardReport
    finish_reason: str
    usage: TaskUsage
    object: str = "customer_service.reply"


class KeywordHit(msgspec.Struct):
    keyword: str
    present: bool


class ContentResponse(msgspec.Struct):
    id: str
    kind: str
    text: str
    words: int
    target_words: int
    keywords: list[KeywordHit]
    keyword_coverage: float
    guard: GuardReport
    finish_reason: str
    usage: TaskUsage
    object: str = "content.generation"


class Translation(msgspec.Struct):
    text: str
    source_lang: str
    target_lang: str
    sentences: int


class TranslateResponse(msgspec.Struct):
    id: str
    translations: list[Translation]
    guard: GuardReport
    usage: TaskUsage
    object: str = "translation"


# --- state ---------------------------------------------------------------------------------------------------
@dataclass
class TaskState:
    settings: TaskSettings
    metrics: TaskMetrics
    kb: ReloadingKnowledgeBase
    labels: list[CS.IntentLabel]
    guards: dict[str, Guard]
    temperature: float = 1.0
    classifier: CS.IntentClassifier | None = None
    scorer: CS.Scorer | None = None
    scorer_error: str | None = None
    score_lock: threading.Lock = field(default_factory=threading.Lock)

    def knowledge_base(self):
        before = self.kb.reloads
        err_before = self.kb.error
        kb = self.kb.check()
        if self.kb.reloads != before:
            self.metrics.kb_reloads.labels(result="ok").inc()
            self.metrics.kb_entries.set(len(kb.entries))
        elif self.kb.error and self.kb.error != err_before:
            self.metrics.kb_reloads.labels(result="error").inc()
        return kb


_REPO = Path(__file__).resolve().parents[2]


def _data_path(value: str) -> Path:
    """A relative path from the settings: against the working directory, else against the repository (so the
    default data/seed/... files are found from any directory in a source checkout)."""
    p = Path(value)
    if p.is_absolute() or p.exists() or not (_REPO / p).exists():
        return p
    return _REPO / p


def build_task_state(srv: ServerState) -> TaskState:
    """At start: a required knowledge base that cannot be loaded stops the server here (KnowledgeBaseError)."""
    ts = srv.settings.tasks
    cs = ts.customer_service
    metrics = TaskMetrics(srv.metrics.registry)
    encoder = None
    if cs.encoder:
        from service.tasks.encoder import SentenceEncoder

        encoder = SentenceEncoder(_data_path(cs.encoder), threads=srv.settings.threads)
    kb = ReloadingKnowledgeBase(
        _data_path(cs.knowledge_base),
        required=cs.knowledge_base_required,
        encoder=encoder,
        dense_weight=cs.dense_weight,
    )
    if kb.kb is not None:
        metrics.kb_reloads.labels(result="ok").inc()
        metrics.kb_entries.set(len(kb.kb.entries))
    else:
        metrics.kb_reloads.labels(result="error").inc()
        log.error("starting without a knowledge base (knowledge_base_required = false): %s", kb.error)
    labels = CS.load_intent_labels(_data_path(cs.intent_labels))
    calibration = cs.intent_calibration
    if calibration == "auto":
        found = Path(srv.settings.model).resolve().parent / "eval" / "intent_calibration.json"
        calibration = str(found) if found.is_file() else ""
    temperature = CS.Calibration.load(calibration).temperature if calibration else 1.0
    log.info("intent temperature %.3f (%s)", temperature, calibration or "uncalibrated: T = 1")
    guards = {
        "customer_service": Guard(cs.guard),
        "content": Guard(ts.content.guard),
        "translate": Guard(ts.translation.guard),
    }
    return TaskState(ts, metrics, kb, labels, guards, temperature)


def _load_scorer(srv: ServerState, tasks: TaskState) -> None:
    """Intent scoring needs every position's logits of one row per label. The engine's slots belong to its
    thread, so scoring runs on a runner of its own (same model files, one slot per label), serialized by a
    lock; it loads after the engine so /health is not delayed by it."""
    from service.runners.base import open_runner

    while not srv.ready and not srv.load_error and not srv.draining:
        time.sleep(0.05)
    if not srv.ready:
        return
    s = srv.settings
    try:
        runner = open_runner(
            s.model,
            s.runner,
            num_slots=len(tasks.labels),
            max_len=s.max_model_len,
            threads=s.threads,
            device=s.device,
        )
        tasks.classifier = CS.IntentClassifier(srv.tokenizer, tasks.labels, tasks.temperature)
        tasks.scorer = CS.runner_scorer(runner, list(range(len(tasks.labels))))
    except Exception as exc:  # reported by the endpoint (503), not fatal for the other endpoints
        tasks.scorer_error = f"{type(exc).__name__}: {exc}"
        log.exception("intent scorer failed to load")


def task_lifespan(srv: ServerState):
    @asynccontextmanager
    async def lifespan(app):
        if not srv.settings.tasks.enabled:
            yield
            return
        tasks = build_task_state(srv)
        app.state.tasks = tasks
        tasks.kb.install_sighup()
        threading.Thread(
            target=_load_scorer, args=(srv, tasks), name="instructlm-intent", daemon=True
        ).start()
        yield

    return lifespan


def _tasks(state: State) -> TaskState:
    tasks = getattr(state, "tasks", None)
    if tasks is None:
        raise APIError(404, "the task endpoints are disabled on this server (tasks.enabled = false)")
    return tasks


# --- engine I/O ----------------------------------------------------------------------------------------------
def _params(temperature: float, seed: int | None) -> SamplingParams:
    try:
        return SamplingParams(temperature=temperature, seed=seed)
    except ValueError as exc:
        raise APIError(400, str(exc), param="temperature", code="invalid_value") from None


def _budget(srv: ServerState, prompt_len: int, wanted: int, param: str) -> int:
    window = srv.max_len
    if prompt_len >= window:
        raise APIError(
            400,
            f"This model's maximum context length is {window} tokens; the prompt has {prompt_len} tokens "
            "and no room is left for the output.",
            type="context_length_exceeded",
            param=param,
            code="context_length_exceeded",
        )
    return max(1, min(wanted, window - prompt_len))


class Generation:
    """Sequences of one request on the engine; `events()` yields (row, text delta, finish_reason or None)."""

    def __init__(
        self, srv: ServerState, prompts: list[list[int]], budgets: list[int], params: SamplingParams
    ):
        engine, _ = srv.require_ready()
        self.engine = engine
        self.queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self.seqs = [
            Sequence(
                prompt=p,
                params=params,
                max_tokens=b,
                index=i,
                deliver=self.queue.put_nowait,
                loop=loop,
                timeout_s=srv.settings.request_timeout_s,
            )
            for i, (p, b) in enumerate(zip(prompts, budgets, strict=True))
        ]
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.completion_tokens = 0
        submit(engine, self.seqs)
        self.remaining = len(self.seqs)

    async def events(self, request: Request | None = None) -> AsyncIterator[tuple[int, str, str | None]]:
        """`request`: a non-streaming caller's, so a departed client stops the work (see Submission.outputs)."""
        watcher = watch_disconnect(request)
        try:
            while self.remaining:
                outs = await next_outputs(self.queue, watcher)
                if outs is None:
                    return
                for out in outs:
                    if out.finish_reason is not None:
                        self.remaining -= 1
                        self.completion_tokens += out.completion_tokens
                    yield out.index, out.text, out.finish_reason
        finally:
            if watcher is not None:
                watcher.cancel()
            if self.remaining:
                for s in self.seqs:
                    self.engine.abort(s)

    async def texts(self, request: Request | None = None) -> tuple[list[str], list[str]]:
        texts = [[] for _ in self.seqs]
        finish = [""] * len(self.seqs)
        async for i, text, reason in self.events(request):
            texts[i].append(text)
            if reason:
                finish[i] = reason
        return ["".join(t) for t in texts], finish

    def usage(self) -> TaskUsage:
        return TaskUsage(
            self.prompt_tokens, self.completion_tokens, self.prompt_tokens + self.completion_tokens
        )


def _guard_report(hits) -> GuardReport:
    return GuardReport(flagged=bool(hits), hits={k: int(v) for k, v in hits.items()})


def _count_guard(tasks: TaskState, endpoint: str, hits) -> None:
    for kind, n in hits.items():
        tasks.metrics.guard_hits.labels(endpoint=endpoint, kind=kind).inc(n)


def _sse_event(obj) -> bytes:
    return b"data: " + msgspec.json.encode(obj) + b"\n\n"


class _Timed:
    """Counts a request by endpoint and status and observes its latency (streams: until the last event)."""

    def __init__(self, tasks: TaskState, endpoint: str) -> None:
        self.tasks, self.endpoint, self.t0 = tasks, endpoint, time.perf_counter()

    def done(self, status: int) -> None:
        m = self.tasks.metrics
        m.requests.labels(endpoint=self.endpoint, status=str(status)).inc()
        m.latency.labels(endpoint=self.endpoint).observe(time.perf_counter() - self.t0)


async def _measured(tasks: TaskState, endpoint: str, handler):
    timer = _Timed(tasks, endpoint)
    try:
        result = await handler(timer)
    except APIError as exc:
        timer.done(exc.status)
        raise
    except UserError:
        timer.done(400)
        raise
    except Exception:
        timer.done(500)
        raise
    if isinstance(result, Stream):
        return result  # counted when the stream ends
    timer.done(200)
    return Response(result, status_code=200)


def _user_error(exc: UserError, param: str | None = None) -> APIError:
    return APIError(400, clip(str(exc), 200), param=getattr(exc, "param", param), code="invalid_value")


# --- customer service ----------------------------------------------------------------------------------------
class CustomerServiceController(Controller):
    path = "/v1/customer-service/chat"
    guards = [require_api_key]
    tags = ["tasks"]

    @post(
        status_code=200,
        summary="Customer service: intent, knowledge-base entries, reply, handoff (JSON or SSE)",
    )
    async def chat(self, state: State, request: Request, data: JSONBody[CustomerServiceRequest]) -> Response:
        tasks = _tasks(state)
        return await _measured(
            tasks, "customer_service", lambda t: _customer_service(state.server, tasks, data, t, request)
        )


async def _customer_service(
    srv: ServerState, tasks: TaskState, data: CustomerServiceRequest, timer: _Timed, request: Request
):
    cs = tasks.settings.customer_service
    messages = [{"role": m.role, "content": m.content} for m in data.messages]
    try:
        CS.check_conversation(messages)
    except UserError as exc:
        raise _user_error(exc, "messages") from None
    _, tokenizer = srv.require_ready()
    kb = tasks.knowledge_base()
    if kb is None:
        raise APIError(
            503,
            f"knowledge base unavailable: {clip(tasks.kb.error or '', 160)}",
            code="knowledge_base_unavailable",
            headers={"Retry-After": "5"},
        )
    if tasks.scorer is None:
        why = f" ({clip(tasks.scorer_error, 160)})" if tasks.scorer_error else ""
        raise APIError(
            503,
            f"the intent classifier is not loaded yet{why}",
            code="not_ready",
            headers={"Retry-After": "2"},
        )
    question = messages[-1]["content"]
    top_k = cs.top_k if data.top_k is None else data.top_k
    if not 0 <= top_k <= 20:
        raise APIError(400, f"top_k must be in [0, 20], got {top_k}", param="top_k", code="invalid_value")
    hits = kb.search(question, k=top_k) if top_k else []
    tasks.metrics.retrieval_queries.inc()
    if hits:
        tasks.metrics.retrieval_hits.inc()
    history = [m for m in messages if m["role"] != "system"]
    max_tokens = data.max_tokens or cs.max_tokens
    budget_in = srv.max_len - max_tokens

    def count(msgs):
        return len(encode_chat(tokenizer, msgs, add_generation_prompt=True).ids)

    # A client's own system turn is kept, after ours (company prompt + knowledge entries).
    extra = "\n\n" + messages[0]["content"] if messages[0]["role"] == "system" else ""

    def system_with(entries):
        pairs = [(h.entry.question, h.entry.answer) for h in entries]
        return {"role": "system", "content": CS.knowledge_prompt(pairs) + extra}

    # The entries must fit beside the latest user turn: the weakest go first, before any old turn is dropped.
    used = list(hits)
    while used and count([system_with(used), history[-1]]) > budget_in:
        used.pop()
    try:
        kept, dropped = CS.fit_history([system_with(used), *history], count, budget_in)
    except CS.ContextTooLong as exc:
        raise APIError(
            400,
            f"This model's maximum context length is {srv.max_len} tokens; {exc} after reserving "
            f"{max_tokens} for the reply",
            type="context_length_exceeded",
            param="messages",
            code="context_length_exceeded",
        ) from None
    tasks.metrics.dropped_turns.inc(dropped)
    prompt = encode_chat(tokenizer, kept, add_generation_prompt=True).ids
    budget = _budget(srv, len(prompt), max_tokens, "max_tokens")
    rows, _ = tasks.classifier.rows(question)
    if max(len(r) for r in rows) > srv.max_len:
        raise APIError(
            400,
            f"the latest user turn is too long to classify ({max(len(r) for r in rows)} tokens, "
            f"window {srv.max_len})",
            type="context_length_exceeded",
            param="messages",
            code="context_length_exceeded",
        )

    def score():
        with tasks.score_lock:
            return tasks.classifier.classify(question, tasks.scorer)

    params = _params(data.temperature, data.seed)
    gen = Generation(srv, [prompt], [budget], params)  # the reply starts while the intent is scored
    try:
        result = await asyncio.to_thread(score)
    except BaseException:
        for s in gen.seqs:
            gen.engine.abort(s)
        raise
    reason = None
    label = tasks.labels[tasks.classifier.names.index(result.intent)]
    if label.handoff:
        reason = "intent"
    elif result.confidence < cs.handoff_threshold:
        reason = "low_confidence"
    tasks.metrics.intents.labels(intent=result.intent).inc()
    if reason:
        tasks.metrics.handoffs.labels(reason=reason).inc()
    intent = Intent(
        result.intent,
        result.confidence,
        [IntentCandidate(n, p) for n, p in result.candidates],
        tasks.classifier.temperature,
    )
    knowledge = [KnowledgeHit(h.entry.id, h.entry.question, h.score) for h in used]
    rid = new_id("cs")
    guard = tasks.guards["customer_service"]
    if not data.stream:
        texts, finish = await gen.texts(request)
        g = guard.apply(texts[0].strip())
        _count_guard(tasks, "customer_service", g.hits)
        return CustomerServiceResponse(
            rid,
            intent,
            knowledge,
            g.text,
            reason is not None,
            reason,
            dropped,
            _guard_report(g.hits),
            finish[0],
            gen.usage(),
        )

    async def events():
        sg = StreamGuard(guard)
        status = 200
        try:
            head = {
                "id": rid,
                "object": "customer_service.head",
                "intent": intent,
                "knowledge": knowledge,
                "handoff": reason is not None,
                "handoff_reason": reason,
                "dropped_turns": dropped,
            }
            yield _sse_event(head)
            finish = ""
            async for _, text, fin in gen.events():
                out = sg.feed(text)
                if fin:
                    out += sg.flush()
                    finish = fin
                if out:
                    yield _sse_event({"id": rid, "object": "customer_service.delta", "delta": out})
            _count_guard(tasks, "customer_service", sg.hits)
            yield _sse_event(
                {
                    "id": rid,
                    "object": "customer_service.done",
                    "finish_reason": finish,
                    "guard": _guard_report(sg.hits),
                    "usage": gen.usage(),
                }
            )
            yield DONE
        except BaseException:
            status = 499
            raise
        finally:
            timer.done(status)

    return Stream(events(), media_type="text/event-stream", headers=_SSE_HEADERS)


# --- content -------------------------------------------------------------------------------------------------
class ContentController(Controller):
    path = "/v1/content/generate"
    guards = [require_api_key]
    tags = ["tasks"]

    @post(status_code=200, summary="Content generation: article, ad copy or story from a brief (JSON or SSE)")
    async def generate(self, state: State, request: Request, data: JSONBody[ContentRequest]) -> Response:
        tasks = _tasks(state)
        return await _measured(tasks, "content", lambda t: _content(state.server, tasks, data, t, request))


async def _content(srv: ServerState, tasks: TaskState, data: ContentRequest, timer: _Timed, request: Request):
    cfg = tasks.settings.content
    try:
        C.check_brief(data.kind, data.topic, data.keywords, data.target_words, cfg.min_words, cfg.max_words)
    except C.ContentError as exc:
        raise APIError(400, str(exc), param=exc.param, code="invalid_value") from None
    _, tokenizer = srv.require_ready()
    prompt = C.content_prompt(tokenizer, data.kind, data.topic, data.keywords, data.tone, data.target_words)
    wanted = data.max_tokens or int(data.target_words * cfg.tokens_per_word) + 16
    budget = _budget(srv, len(prompt), wanted, "topic")
    gen = Generation(srv, [prompt], [budget], _params(data.temperature, data.seed))
    rid = new_id("content")
    guard = tasks.guards["content"]

    def final(text: str, finish: str, hits) -> dict:
        kw, share, words = C.coverage(text, data.keywords)
        return {
            "words": words,
            "keywords": [KeywordHit(k, h) for k, h in zip(data.keywords, kw, strict=True)],
            "keyword_coverage": share,
            "guard": _guard_report(hits),
            "finish_reason": finish,
        }

    if not data.stream:
        texts, finish = await gen.texts(request)
        g = guard.apply(texts[0].strip())
        _count_guard(tasks, "content", g.hits)
        f = final(g.text, finish[0], g.hits)
        return ContentResponse(
            rid,
            data.kind,
            g.text,
            f["words"],
            data.target_words,
            f["keywords"],
            f["keyword_coverage"],
            f["guard"],
            f["finish_reason"],
            gen.usage(),
        )

    async def events():
        sg = StreamGuard(guard)
        parts: list[str] = []
        status = 200
        try:
            async for _, text, fin in gen.events():
                out = sg.feed(text)
                if fin:
                    out += sg.flush()
                if out:
                    parts.append(out)
                    yield _sse_event({"id": rid, "object": "content.delta", "delta": out})
                if fin:
                    _count_guard(tasks, "content", sg.hits)
                    done = {
                        "id": rid,
                        "object": "content.done",
                        **final("".join(parts).strip(), fin, sg.hits),
                        "usage": gen.usage(),
                    }
                    yield _sse_event(done)
            yield DONE
        except BaseException:
            status = 499
            raise
        finally:
            timer.done(status)

    return Stream(events(), media_type="text/event-stream", headers=_SSE_HEADERS)


# --- translation ---------------------------------------------------------------------------------------------
def _translation_budget(srv: ServerState, tasks: TaskState, prompt: list[int], sentence_tokens: int) -> int:
    wanted = int(sentence_tokens * tasks.settings.translation.max_tokens_factor) + 16
    return _budget(srv, len(prompt), wanted, "text")


class TranslateController(Controller):
    path = "/v1/translate"
    guards = [require_api_key]
    tags = ["tasks"]

    @post(status_code=200, summary="Translate one text or a list (sentences translated as one batch)")
    async def translate(self, state: State, request: Request, data: JSONBody[TranslateRequest]) -> Response:
        tasks = _tasks(state)
        return await _measured(
            tasks, "translate", lambda t: _translate(state.server, tasks, data, t, request)
        )


async def _translate(
    srv: ServerState, tasks: TaskState, data: TranslateRequest, timer: _Timed, request: Request
):
    cfg = tasks.settings.translation
    texts = [data.text] if isinstance(data.text, str) else list(data.text)
    if not texts:
        raise APIError(400, "text: the list is empty", param="text", code="invalid_value")
    if len(texts) > cfg.max_texts:
        raise APIError(
            400,
            f"text: at most {cfg.max_texts} texts per call, got {len(texts)}",
            param="text",
            code="invalid_value",
        )
    _, tokenizer = srv.require_ready()
    langs, prompts, budgets, index, plans = [], [], [], [], T.plan(texts)
    for i, (text, segs) in enumerate(zip(texts, plans, strict=True)):
        where = "text" if isinstance(data.text, str) else f"text[{i}]"
        if not segs:
            raise APIError(400, f"{where} is empty", param=where, code="invalid_value")
        try:
            src, tgt = T.resolve_pair(text, data.source_lang, data.target_lang, tasks.settings.pairs(), where)
        except T.TranslationError as exc:
            raise APIError(400, str(exc), param=exc.param, code="unsupported_language_pair") from None
        langs.append((src, tgt))
        for j, seg in enumerate(segs):
            prompt = T.sentence_prompt(tokenizer, seg.text, src, tgt)
            try:
                budgets.append(_translation_budget(srv, tasks, prompt, len(tokenizer.encode(seg.text))))
            except APIError as exc:
                exc.message = f"{where}, sentence {j}: {exc.message}"
                exc.param = where
                raise
            prompts.append(prompt)
            index.append(i)
    gen = Generation(srv, prompts, budgets, _params(data.temperature, data.seed))
    guard = tasks.guards["translate"]
    rid = new_id("tr")

    def assemble(outs: list[str]) -> tuple[list[Translation], dict[str, int]]:
        hits_total: dict[str, int] = {}
        results = []
        for i, segs in enumerate(plans):
            sentences = [o for o, k in zip(outs, index, strict=True) if k == i]
            g = guard.apply(T.join(sentences, segs, langs[i][1]))
            for k, v in g.hits.items():
                hits_total[k] = hits_total.get(k, 0) + v
            results.append(Translation(g.text, langs[i][0], langs[i][1], len(segs)))
        _count_guard(tasks, "translate", hits_total)
        return results, hits_total

    if not data.stream:
        outs, _ = await gen.texts(request)
        results, hits = assemble(outs)
        return TranslateResponse(rid, results, _guard_report(hits), gen.usage())

    # SSE: each sentence as soon as it is translated (sentences of one batch finish in any order), then the
    # joined, guarded texts.
    first_of = {i: index.index(i) for i in set(index)}

    async def events():
        parts = [[] for _ in prompts]
        status = 200
        try:
            async for row, text, fin in gen.events():
                parts[row].append(text)
                if fin:
                    sentence = guard.apply("".join(parts[row]).strip()).text
                    yield _sse_event({"id": rid, "object": "translation.sentence", "text_index": index[row],
                                      "sentence_index": row - first_of[index[row]], "translation": sentence})  # fmt: skip
            results, hits = assemble(["".join(p) for p in parts])
            yield _sse_event({"id": rid, "object": "translation.done", "translations": results,
                              "guard": _guard_report(hits), "usage": gen.usage()})  # fmt: skip
            yield DONE
        except BaseException:
            status = 499
            raise
        finally:
            timer.done(status)

    return Stream(events(), media_type="text/event-stream", headers=_SSE_HEADERS)


@websocket("/v1/translate/stream", guards=[require_api_key])
async def translate_stream(
    socket: WebSocket,
    target_lang: Annotated[str, QueryParameter(name="target_lang")],
    source_lang: Annotated[str | None, QueryParameter(name="source_lang")] = None,
) -> None:
    """Simultaneous translation. The client sends text as it arrives (plain text frames, or JSON
    {"text": ..., "final": true}); each sentence is translated as soon as it is complete and sent back in order
    as {"index", "source", "translation", "latency_ms"}. A final frame (or {"final": true}) flushes the rest and
    ends with {"event": "done", "sentences": n}. Closing the socket cancels the sentences still pending."""
    srv: ServerState = socket.app.state.server
    tasks = getattr(socket.app.state, "tasks", None)
    await socket.accept()

    async def fail(err: APIError) -> None:
        await socket.send_json(
            {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}
        )
        await socket.close(code=1008 if err.status < 500 else 1011)

    if tasks is None:
        await fail(APIError(404, "the task endpoints are disabled on this server"))
        return
    try:
        _, tokenizer = srv.require_ready()
    except APIError as err:
        await fail(err)
        return
    pairs = tasks.settings.pairs()
    if source_lang is not None and (source_lang, target_lang) not in pairs:
        supported = ", ".join(f"{a}-{b}" for a, b in pairs)
        await fail(
            APIError(
                400,
                f"unsupported language pair {source_lang}-{target_lang}; supported: {supported}",
                param="target_lang",
                code="unsupported_language_pair",
            )
        )
        return
    from service.tasks.text import SentenceStream

    stream = SentenceStream()
    pending: asyncio.Queue = (
        asyncio.Queue()
    )  # (index, source, completed_at, task) in arrival order; None = end
    guard = tasks.guards["translate"]
    params = _params(0.0, None)
    src_lang = source_lang
    count = 0

    async def translate_one(sentence: str) -> str:
        prompt = T.sentence_prompt(tokenizer, sentence, src_lang, target_lang)
        budget = _translation_budget(srv, tasks, prompt, len(tokenizer.encode(sentence)))
        outs, _ = await Generation(srv, [prompt], [budget], params).texts()
        return outs[0].strip()

    async def sender() -> None:
        while True:
            item = await pending.get()
            if item is None:
                return
            i, sentence, t0, task = item
            try:
                text = await task
            except APIError as err:
                await socket.send_json(
                    {
                        "index": i,
                        "source": sentence,
                        "error": {"message": err.message, "type": err.type, "code": err.code},
                    }
                )
                continue
            g = guard.apply(text)
            _count_guard(tasks, "translate_stream", g.hits)
            latency = time.perf_counter() - t0
            tasks.metrics.sentence_latency.observe(latency)
            await socket.send_json(
                {
                    "index": i,
                    "source": sentence,
                    "translation": g.text,
                    "latency_ms": round(latency * 1000, 2),
                }
            )

    async def enqueue(sentences: list[str]) -> None:
        nonlocal src_lang, count
        for sentence in sentences:
            if src_lang is None:
                detected = T.detect_language(sentence)
                if detected is None or (detected, target_lang) not in pairs:
                    supported = ", ".join(f"{a}-{b}" for a, b in pairs)
                    raise APIError(
                        400,
                        f"unsupported or undetectable source language ({detected}) for "
                        f"{target_lang}; supported: {supported}",
                        param="source_lang",
                        code="unsupported_language_pair",
                    )
                src_lang = detected
            task = asyncio.create_task(translate_one(sentence))
            await pending.put((count, sentence, time.perf_counter(), task))
            count += 1

    timer = _Timed(tasks, "translate_stream")
    send_task = asyncio.create_task(sender())
    status = 200
    try:
        while True:
            raw = await socket.receive_text()
            final, text = False, raw
            if raw.startswith("{"):
                try:
                    msg = json.loads(raw)
                    text, final = str(msg.get("text", "")), bool(msg.get("final", False))
                except (ValueError, AttributeError):
                    text = raw
            await enqueue(stream.feed(text))
            if final:
                await enqueue(stream.flush())
                await pending.put(None)
                await send_task
                await socket.send_json({"event": "done", "sentences": count})
                await socket.close()
                return
    except WebSocketDisconnect:
        status = 499
    except APIError as err:
        status = err.status
        await fail(err)
    finally:
        # Whatever is still queued or running belongs to a client that left: cancel it (each Generation aborts
        # its engine sequences when its task is cancelled).
        if not send_task.done():
            send_task.cancel()
        while not pending.empty():
            item = pending.get_nowait()
            if item is not None:
                item[3].cancel()
        timer.done(status)


TASK_HANDLERS = [CustomerServiceController, ContentController, TranslateController, translate_stream]
