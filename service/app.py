"""`create_app()`: the Litestar application (gunicorn runs `service.app:create_app()` in its one worker).

The model loads on a background thread after the server starts listening, so /health/live answers at once and
/health turns 200 only after the model is loaded and one forward has run. On SIGTERM readiness fails at once
and new generation requests get 503, while the running ones finish (uvicorn waits for open connections; the
engine keeps stepping); gunicorn's graceful timeout is derived from `drain_timeout_s`.

The ONNX path imports no torch: everything here is torch-free and the torch runner is imported only when asked.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import threading
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from litestar import Litestar
from litestar.config.cors import CORSConfig
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import ScalarRenderPlugin, SwaggerRenderPlugin

from service.affinity import cpu_plan, pin_current_thread
from service.api.errors import EXCEPTION_HANDLERS
from service.api.generation import ServerState
from service.api.health import HealthController, MetricsController
from service.api.openai import ChatController, CompletionsController, ModelsController, TokenizeController
from service.metrics import Metrics
from service.settings import Settings, load_settings
from service.tasks.api import TASK_HANDLERS, task_lifespan

log = logging.getLogger("instructlm.service")


class JSONFormatter(logging.Formatter):
    """One JSON object per line; extra fields passed as `extra={"fields": {...}}` are merged in."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(level: str) -> None:
    logger = logging.getLogger("instructlm")
    if not any(isinstance(h.formatter, JSONFormatter) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(JSONFormatter())
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level.upper())


def _load(srv: ServerState) -> None:
    """Tokenizer, runner, engine, one warm-up forward, then ready. Runs on a thread; errors go to /health."""
    from model.tokenizer import Tokenizer
    from service.engine import Engine
    from service.runners.base import model_kind, open_runner

    s = srv.settings
    t0 = time.perf_counter()
    try:
        if srv.cpu_plan is not None:
            # Before the runner exists: its intra-op threads and the engine thread inherit this mask.
            pin_current_thread(srv.cpu_plan[0])
        model_kind(s.model)  # names what the directory lacks before the tokenizer complains about its part
        tokenizer = Tokenizer.load(Path(s.model))
        runner = open_runner(
            s.model,
            s.runner,
            num_slots=s.max_num_seqs + s.prefix_cache_slots,
            max_len=s.max_model_len,
            threads=s.threads,
            device=s.device,
        )
        engine = Engine(
            runner,
            tokenizer,
            max_num_seqs=s.max_num_seqs,
            max_num_batched_tokens=s.max_num_batched_tokens,
            max_waiting=s.max_waiting,
            prefix_cache_slots=s.prefix_cache_slots,
            prefix_cache_min_tokens=s.prefix_cache_min_tokens,
            metrics=srv.metrics,
        )
        engine.warmup()
        engine.start()
    except Exception as exc:
        srv.load_error = f"{type(exc).__name__}: {exc}"
        log.exception("model load failed")
        return
    srv.tokenizer, srv.engine, srv.max_len = tokenizer, engine, runner.max_len
    srv.ready = True
    log.info(
        "model ready",
        extra={
            "fields": {
                "model": s.model,
                "runner": type(runner).__name__,
                "slots": s.max_num_seqs,
                "max_len": runner.max_len,
                "load_s": round(time.perf_counter() - t0, 3),
            }
        },
    )


def _install_drain_on_sigterm(srv: ServerState) -> None:
    """Wrap the server's SIGTERM handler: readiness fails and admission stops before uvicorn starts draining."""
    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):
        begin_drain(srv)
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)


def begin_drain(srv: ServerState) -> None:
    if not srv.draining:
        log.info("draining: readiness off, admission closed", extra={"fields": {"running": _running(srv)}})
    srv.draining = True
    if srv.engine is not None:
        srv.engine.accepting = False


def _running(srv: ServerState) -> int:
    return len(srv.engine.running) if srv.engine is not None else 0


def make_lifespan(srv: ServerState):
    @asynccontextmanager
    async def lifespan(app: Litestar):
        _install_drain_on_sigterm(srv)
        srv.cpu_plan = cpu_plan(srv.settings.engine_cpus, srv.settings.threads)
        if srv.cpu_plan is not None:
            engine_cpus, http_cpus = srv.cpu_plan
            # This thread runs the event loop; threads it starts from now on (the loader, the default
            # executor's) start from this mask, and the loader moves itself to the engine's CPUs.
            pin_current_thread(http_cpus)
            log.info(
                "engine on its own CPUs",
                extra={"fields": {"engine": sorted(engine_cpus), "http": sorted(http_cpus)}},
            )
        loader = threading.Thread(target=_load, args=(srv,), name="instructlm-load", daemon=True)
        loader.start()
        try:
            yield
        finally:
            begin_drain(srv)
            engine = srv.engine
            if engine is not None:
                deadline = time.monotonic() + srv.settings.drain_timeout_s
                while engine.has_work() and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                engine.stop()
            log.info("stopped")

    return lifespan


class RequestLogMiddleware:
    """A request id (the client's X-Request-ID, clipped, or a new one) on every response and one JSON log line
    per request with status and duration. No prompt text here: handlers log it only with `log_prompts`."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(b"x-request-id", b"")[:64].decode("ascii", "replace")
        rid = "".join(c for c in given if c.isalnum() or c in "-_.") or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        t0 = time.perf_counter()
        status = 0

        async def send_with_id(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if scope.get("path") not in ("/metrics", "/health/live", "/health/ready", "/health"):
                log.info(
                    "request",
                    extra={
                        "fields": {
                            "request_id": rid,
                            "method": scope.get("method"),
                            "path": scope.get("path"),
                            "status": status,
                            "duration_ms": round((time.perf_counter() - t0) * 1000, 2),
                        }
                    },
                )


def create_app(settings: Settings | None = None) -> Litestar:
    settings = settings or load_settings()
    setup_logging(settings.log_level)
    srv = ServerState(settings=settings, metrics=Metrics(), api_keys=settings.resolved_api_keys())
    cors = CORSConfig(allow_origins=list(settings.cors_origins)) if settings.cors_origins else None
    app = Litestar(
        route_handlers=[
            ChatController,
            CompletionsController,
            ModelsController,
            TokenizeController,
            HealthController,
            MetricsController,
            *TASK_HANDLERS,
        ],
        lifespan=[make_lifespan(srv), task_lifespan(srv)],
        exception_handlers=EXCEPTION_HANDLERS,
        cors_config=cors,
        request_max_body_size=settings.max_body_bytes,
        openapi_config=OpenAPIConfig(
            title="instructlm",
            version="0.1.0",
            description="OpenAI-compatible serving of an instructlm model.",
            path="/docs",
            render_plugins=[ScalarRenderPlugin(), SwaggerRenderPlugin(path="/swagger")],
        ),
        middleware=[lambda app: RequestLogMiddleware(app)],
        debug=False,
    )
    app.state.server = srv
    return app
