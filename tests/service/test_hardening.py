"""Errors, overload, cancellation, drain, metrics, security and the prefix cache, against live servers."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import schemathesis
from hypothesis import settings
from prometheus_client.parser import text_string_to_metric_families

from model.chat import encode_chat
from model.generate import generate
from model.sampling import GREEDY
from service.api.errors import ECHO_LIMIT
from tests.service.conftest import MODEL_NAME, serve_settings
from tests.service.server import LiveServer, free_port

KEY = "sk-test-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
CORS_ORIGIN = "https://app.example"


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        from service.app import JSONFormatter

        self.lines.append(JSONFormatter().format(record))


@pytest.fixture(scope="module")
def secured(tiny_checkpoint, torch_threads):
    """API key on, small body limit, CORS off, prompts not logged."""
    settings = serve_settings(tiny_checkpoint, "torch", api_keys=[KEY], max_body_bytes=8192, log_level="info")
    with LiveServer(settings) as srv:
        yield srv


@pytest.fixture(scope="module")
def long_model(tmp_path_factory, tiny_tokenizer, torch_threads):
    from model.checkpoint import save_checkpoint
    from model.config import preset
    from model.transformer import Transformer

    cfg = preset("tiny", vocab_size=tiny_tokenizer.vocab_size, max_position_embeddings=1280)
    model = Transformer(cfg)
    model.init_weights(seed=2)
    root = tmp_path_factory.mktemp("long_serve")
    tiny_tokenizer.save(root / "tok")
    return save_checkpoint(model, root / "ckpt", tokenizer_dir=root / "tok")


@pytest.fixture(scope="module")
def small(long_model):
    """One slot, one waiting place: overload is two requests away. CORS on, prompts logged."""
    settings = serve_settings(
        long_model,
        "torch",
        max_num_seqs=1,
        max_waiting=1,
        prefix_cache_slots=0,
        cors_origins=[CORS_ORIGIN],
        log_prompts=True,
        log_level="info",
    )
    with LiveServer(settings) as srv:
        yield srv


def chat_body(content="Hello", **kw):
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": content}], **kw}


def assert_error(r: httpx.Response, status: int, *, param=None, type_=None, code=None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    err = body["error"]
    assert isinstance(err["message"], str) and 0 < len(err["message"]) <= 300
    if param is not None:
        assert err["param"] == param
    if type_ is not None:
        assert err["type"] == type_
    if code is not None:
        assert err["code"] == code
    return err


BAD_REQUESTS = [
    # (id, raw body or JSON, expected param, expected code)
    ("malformed-json", b'{"model": "tiny", "messages": [', None, "invalid_json"),
    (
        "invalid-utf8",
        b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
        None,
        "invalid_json",
    ),
    ("wrong-type", chat_body(temperature="hot"), "temperature", "invalid_value"),
    ("unknown-field", chat_body(temprature=0.5), "temprature", "unknown_field"),
    ("temperature<0", chat_body(temperature=-0.5), "temperature", "invalid_value"),
    ("top_p=0", chat_body(top_p=0), "top_p", "invalid_value"),
    ("top_p>1", chat_body(top_p=1.5), "top_p", "invalid_value"),
    ("max_tokens<1", chat_body(max_tokens=0), "max_tokens", "invalid_value"),
    ("n>4", chat_body(n=5), "n", "invalid_value"),
    ("empty-messages", {"model": MODEL_NAME, "messages": []}, "messages", "invalid_value"),
    (
        "bad-role",
        {"model": MODEL_NAME, "messages": [{"role": "robot", "content": "x"}]},
        "messages[0].role",
        None,
    ),
    ("top_logprobs>5", chat_body(logprobs=True, top_logprobs=6), "top_logprobs", "invalid_value"),
]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_get_400_in_one_shape(secured, case):
    _, body, param, code = case
    url = f"{secured.url}/v1/chat/completions"
    if isinstance(body, bytes):
        r = httpx.post(url, content=body, headers={**AUTH, "content-type": "application/json"})
    else:
        r = httpx.post(url, json=body, headers=AUTH)
    assert_error(r, 400, param=param, type_="invalid_request_error", code=code)


def test_context_window_errors_carry_the_counts(secured, tiny_tokenizer):
    url = f"{secured.url}/v1/chat/completions"
    long_text = "Roaming is included in the Travel plan. " * 60
    n = len(encode_chat(tiny_tokenizer, [{"role": "user", "content": long_text}], True).ids)
    err = assert_error(
        httpx.post(url, json=chat_body(long_text), headers=AUTH), 400, type_="context_length_exceeded"
    )
    assert "256" in err["message"] and str(n) in err["message"]
    short = encode_chat(tiny_tokenizer, [{"role": "user", "content": "Hello"}], True).ids
    err = assert_error(
        httpx.post(url, json=chat_body(max_tokens=250), headers=AUTH),
        400,
        param="max_tokens",
        code="context_length_exceeded",
    )
    assert f"{len(short) + 250} tokens ({len(short)} in the prompt, 250 for the completion)" in err["message"]
    # The message never quotes the prompt.
    assert "Roaming" not in json.dumps(err)


def test_unknown_model_404_and_no_long_echo(secured):
    name = "model-" + "z" * 200
    r = httpx.post(f"{secured.url}/v1/chat/completions", json={**chat_body(), "model": name}, headers=AUTH)
    err = assert_error(r, 404, param="model", code="model_not_found")
    assert "z" * (ECHO_LIMIT + 1) not in err["message"]
    assert_error(httpx.get(f"{secured.url}/v1/models/{name}", headers=AUTH), 404)


def test_api_key_missing_or_wrong_is_401_and_health_stays_open(secured):
    url = f"{secured.url}/v1/chat/completions"
    assert_error(httpx.post(url, json=chat_body()), 401, type_="authentication_error", code="missing_api_key")
    bad = {"Authorization": "Bearer sk-test-0123456788"}
    assert_error(httpx.post(url, json=chat_body(), headers=bad), 401, code="invalid_api_key")
    assert_error(httpx.get(f"{secured.url}/v1/models", headers={"Authorization": KEY}), 401)
    assert httpx.post(url, json=chat_body(max_tokens=2), headers=AUTH).status_code == 200
    assert httpx.get(f"{secured.url}/health").status_code == 200


def test_body_over_the_limit_is_413(secured):
    r = httpx.post(f"{secured.url}/v1/chat/completions", json=chat_body("x" * 10_000), headers=AUTH)
    assert_error(r, 413, code="request_too_large")


def test_cors_is_off_unless_configured(secured, small):
    pre = {"Origin": CORS_ORIGIN, "Access-Control-Request-Method": "POST"}
    off = httpx.options(f"{secured.url}/v1/chat/completions", headers=pre)
    assert "access-control-allow-origin" not in off.headers
    on = httpx.options(f"{small.url}/v1/chat/completions", headers=pre)
    assert on.headers.get("access-control-allow-origin") == CORS_ORIGIN


def test_logs_are_json_with_request_id_and_prompts_only_when_enabled(secured, small):
    rec = Records()
    logger = logging.getLogger("instructlm")
    logger.addHandler(rec)
    try:
        secret = "my account number is 99887766"
        r1 = httpx.post(
            f"{secured.url}/v1/chat/completions",
            json=chat_body(secret, max_tokens=2),
            headers={**AUTH, "X-Request-ID": "req-abc-1"},
        )
        assert r1.headers["x-request-id"] == "req-abc-1"

        def logged() -> bool:
            return any(
                e.get("request_id") == "req-abc-1" and e.get("status") == 200
                for e in (json.loads(line) for line in list(rec.lines))
            )

        # The request line is written after the last byte is sent, so it may trail the client by a moment.
        for _ in range(200):
            if logged():
                break
            time.sleep(0.01)
        assert logged()
        assert not any(secret in line for line in rec.lines)
        rec.lines.clear()
        httpx.post(f"{small.url}/v1/chat/completions", json=chat_body(secret, max_tokens=2))
        assert any(secret in json.loads(line).get("prompt", "") for line in rec.lines)
    finally:
        logger.removeHandler(rec)


def metrics_of(url: str) -> dict:
    text = httpx.get(f"{url}/metrics").text
    return {f.name: f for f in text_string_to_metric_families(text)}, text


def sample_value(families: dict, name: str, labels: dict | None = None, suffix: str = "") -> float:
    fam = families[name]
    for s in fam.samples:
        if s.name == name + suffix and all(s.labels.get(k) == v for k, v in (labels or {}).items()):
            return s.value
    raise KeyError(f"{name}{suffix} {labels}")


def test_overload_gives_429_while_accepted_requests_finish(small):
    # The engine is held between steps while b takes the one waiting place and c arrives: on a fast, quiet
    # machine a finished first request would otherwise free the slot in time and c would be accepted.
    gate = threading.Event()
    engine_step = small.engine.step

    def held_step():
        gate.wait(30)
        return engine_step()

    async def run():
        async with httpx.AsyncClient(base_url=small.url, timeout=60) as c:
            body_a = chat_body("first", max_tokens=1000, ignore_eos=True, stream=True)
            async with c.stream("POST", "/v1/chat/completions", json=body_a) as ra:
                lines = ra.aiter_lines()
                # The role chunk is sent before a is admitted; a token chunk means a holds the slot.
                first = [await lines.__anext__() for _ in range(3)]
                assert first[0].startswith("data: ") and '"content":""' not in first[2].replace(" ", "")
                for _ in range(400):
                    if small.engine.num_waiting == 0 and len(small.engine.running) == 1:
                        break
                    await asyncio.sleep(0.005)
                small.engine.step = held_step  # a running, a's slot taken: nothing is admitted from here
                assert small.engine.num_waiting == 0
                task_b = asyncio.create_task(
                    c.post("/v1/chat/completions", json=chat_body("second", max_tokens=5, ignore_eos=True))
                )
                for _ in range(400):  # bounded wait until b holds the one waiting place
                    if small.engine.num_waiting == 1:
                        break
                    await asyncio.sleep(0.005)
                assert small.engine.num_waiting == 1
                rc = await c.post("/v1/chat/completions", json=chat_body("third", max_tokens=5))
                gate.set()
                rest = [line async for line in lines if line]
            rb = await task_b
            return rc, rest, rb

    families, _ = metrics_of(small.url)
    before = sample_value(families, "instructlm_request_failure", {"reason": "queue_full"}, "_total")
    try:
        rc, rest, rb = asyncio.run(run())
    finally:
        gate.set()
        vars(small.engine).pop("step", None)  # the class's step again
    assert_error(rc, 429, type_="rate_limit_error", code="queue_full")
    assert rc.headers["retry-after"] == "1"
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
    assert rb.status_code == 200 and rb.json()["usage"]["completion_tokens"] == 5
    families, _ = metrics_of(small.url)
    assert (
        sample_value(families, "instructlm_request_failure", {"reason": "queue_full"}, "_total") == before + 1
    )


def test_client_disconnect_frees_the_slot_and_is_counted(small):
    families, _ = metrics_of(small.url)
    before = sample_value(families, "instructlm_client_disconnects", suffix="_total")
    done_before = sample_value(
        families, "instructlm_request_success", {"finished_reason": "length"}, "_total"
    )
    body = chat_body("stream then leave", max_tokens=1200, ignore_eos=True, stream=True)
    with httpx.stream("POST", f"{small.url}/v1/chat/completions", json=body, timeout=30) as r:
        it = r.iter_lines()
        for _ in range(3):
            next(it)
    deadline = time.monotonic() + 20
    while (small.engine.running or small.engine.has_work()) and time.monotonic() < deadline:
        time.sleep(0.01)
    families, _ = metrics_of(small.url)
    assert sample_value(families, "instructlm_num_requests_running") == 0
    assert sample_value(families, "instructlm_client_disconnects", suffix="_total") == before + 1
    # It was stopped, not run to its 1,200 tokens.
    assert (
        sample_value(families, "instructlm_request_success", {"finished_reason": "length"}, "_total")
        == done_before
    )


def test_non_streaming_client_disconnect_frees_the_slot_and_is_counted(small):
    """A non-streaming request writes nothing until it ends, so only the ASGI disconnect can stop it."""
    import json
    import socket
    from urllib.parse import urlsplit

    families, _ = metrics_of(small.url)
    before = sample_value(families, "instructlm_client_disconnects", suffix="_total")
    done_before = sample_value(
        families, "instructlm_request_success", {"finished_reason": "length"}, "_total"
    )
    body = json.dumps(chat_body("wait then leave", max_tokens=1200, ignore_eos=True)).encode()
    url = urlsplit(small.url)
    steps_before = small.engine.step_count
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        deadline = time.monotonic() + 20
        while small.engine.step_count < steps_before + 5 and time.monotonic() < deadline:
            time.sleep(0.01)  # decoding has started
    deadline = time.monotonic() + 20
    while (small.engine.running or small.engine.has_work()) and time.monotonic() < deadline:
        time.sleep(0.01)
    families, _ = metrics_of(small.url)
    assert sample_value(families, "instructlm_num_requests_running") == 0
    assert sample_value(families, "instructlm_client_disconnects", suffix="_total") == before + 1
    assert (
        sample_value(families, "instructlm_request_success", {"finished_reason": "length"}, "_total")
        == done_before
    )


GAUGES = [
    "instructlm_num_requests_running",
    "instructlm_num_requests_waiting",
    "instructlm_kv_cache_usage_ratio",
]
COUNTERS = [
    "instructlm_prompt_tokens",
    "instructlm_generation_tokens",
    "instructlm_request_success",
    "instructlm_request_failure",
    "instructlm_client_disconnects",
    "instructlm_prefix_cache_queries",
    "instructlm_prefix_cache_hits",
]
HISTOGRAMS = [
    "instructlm_time_to_first_token_seconds",
    "instructlm_inter_token_latency_seconds",
    "instructlm_e2e_request_latency_seconds",
    "instructlm_request_queue_time_seconds",
    "instructlm_request_prompt_tokens",
    "instructlm_request_generation_tokens",
]


def test_metrics_parse_with_prometheus_parser_and_promtool(secured, tmp_path):
    r = httpx.post(
        f"{secured.url}/v1/chat/completions", json=chat_body("count me", max_tokens=4), headers=AUTH
    )
    usage = r.json()["usage"]
    families, text = metrics_of(secured.url)
    for name in GAUGES:
        assert families[name].type == "gauge"
    for name in COUNTERS:
        assert families[name].type == "counter"
    for name in HISTOGRAMS:
        assert families[name].type == "histogram"
        assert sample_value(families, name, suffix="_count") >= 1
    assert sample_value(families, "instructlm_prompt_tokens", suffix="_total") >= usage["prompt_tokens"]
    assert (
        sample_value(families, "instructlm_generation_tokens", suffix="_total") >= usage["completion_tokens"]
    )
    assert sample_value(families, "instructlm_request_success", {"finished_reason": "length"}, "_total") >= 1
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool missing in CI (.ci/run installs Debian's prometheus)")
        pytest.skip("promtool not installed (.ci/run installs Debian's prometheus)")
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_prefix_cache_over_http_reuses_the_system_prompt(secured, tiny_model, tiny_tokenizer):
    system = {"role": "system", "content": "You are the Kestrel Mobile assistant. Answer briefly. " * 2}
    url = f"{secured.url}/v1/chat/completions"
    families, _ = metrics_of(secured.url)
    hits = sample_value(families, "instructlm_prefix_cache_hits", suffix="_total")
    first = httpx.post(
        url,
        json={
            **chat_body(),
            "messages": [system, {"role": "user", "content": "Hi"}],
            "max_tokens": 6,
            "temperature": 0,
        },
        headers=AUTH,
    )
    msgs = [system, {"role": "user", "content": "How do I pay my bill?"}]
    second = httpx.post(
        url, json={**chat_body(), "messages": msgs, "max_tokens": 6, "temperature": 0}, headers=AUTH
    )
    assert first.status_code == second.status_code == 200
    cached = second.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= 16
    families, _ = metrics_of(secured.url)
    assert sample_value(families, "instructlm_prefix_cache_hits", suffix="_total") >= hits + 1
    ids = encode_chat(tiny_tokenizer, msgs, True).ids
    ref = generate(tiny_model, [ids], 6, GREEDY, stop_ids=tiny_tokenizer.stop_ids)[0]
    expected = tiny_tokenizer.decode(ref.tokens)
    assert second.json()["choices"][0]["message"]["content"] == expected


def test_bounded_load_has_no_5xx_and_every_stream_ends_with_done(secured):
    async def one(c, i):
        stream = i % 2 == 0
        body = chat_body(
            f"load {i}", max_tokens=4 + i % 7, temperature=(i % 3) * 0.5, seed=i, stream=stream, n=1 + i % 2
        )
        if not stream:
            r = await c.post("/v1/chat/completions", json=body)
            return r.status_code, None
        async with c.stream("POST", "/v1/chat/completions", json=body) as r:
            lines = [line async for line in r.aiter_lines() if line]
            return r.status_code, lines

    async def run():
        limits = httpx.Limits(max_connections=8)
        async with httpx.AsyncClient(base_url=secured.url, headers=AUTH, timeout=60, limits=limits) as c:
            return await asyncio.gather(*(one(c, i) for i in range(32)))

    results = asyncio.run(run())
    assert all(status < 500 for status, _ in results)
    for status, lines in results:
        if lines is not None and status == 200:
            assert lines[-1] == "data: [DONE]"


# --- schemathesis: generated requests from the server's own OpenAPI schema never get a 5xx ------------------
def test_schemathesis_finds_no_5xx(secured):
    """Every operation of ours (the task endpoints test their own), 15 generated cases each, fixed seed."""
    from hypothesis import HealthCheck, given

    schema = schemathesis.openapi.from_url(f"{secured.url}/docs/openapi.json").include(
        tag=["openai", "tools", "health"]
    )
    operations = [r.ok() for r in schema.get_all_operations()]
    assert {op.path for op in operations} >= {
        "/v1/chat/completions",
        "/v1/completions",
        "/tokenize",
        "/health",
    }
    seen = []
    for op in operations:

        @given(case=op.as_strategy())
        @settings(
            max_examples=15,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case):
            case.headers = {**(case.headers or {}), **AUTH}
            r = case.call(base_url=secured.url, timeout=30)
            seen.append(r.status_code)
            assert r.status_code < 500, f"{case.method} {case.path}: {r.status_code} {r.text[:200]}"

        check()
    assert len(seen) >= len(operations)


# --- SIGTERM: readiness off at once, open streams finish, the process exits 0 -------------------------------
def test_sigterm_drains_open_streams_then_exits_zero(tiny_checkpoint, tmp_path):
    port = free_port()
    env = {
        **os.environ,
        "INSTRUCTLM_DRAIN_TIMEOUT_S": "20",
        "INSTRUCTLM_SERVED_MODEL_NAME": MODEL_NAME,
        "INSTRUCTLM_LOG_LEVEL": "warning",
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, "-m", "instructlm", "serve", "--model", str(tiny_checkpoint), "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.1)

        async def streams():
            async with httpx.AsyncClient(base_url=url, timeout=60) as c:

                async def one(i):
                    body = chat_body(f"drain {i}", max_tokens=200, ignore_eos=True, stream=True)
                    async with c.stream("POST", "/v1/chat/completions", json=body) as r:
                        it = r.aiter_lines()
                        first = await it.__anext__()
                        started.append(first)
                        return [line async for line in it if line]

                started: list[str] = []
                tasks = [asyncio.create_task(one(i)) for i in range(2)]
                while len(started) < 2:
                    await asyncio.sleep(0.01)
                proc.send_signal(signal.SIGTERM)
                # Readiness fails at once: refused or 503, never 200.
                await asyncio.sleep(0.3)
                try:
                    ready = (await c.get("/health/ready")).status_code
                except httpx.TransportError:
                    ready = None
                return await asyncio.gather(*tasks), ready

        results, ready = asyncio.run(streams())
        assert ready != 200
        for lines in results:
            assert lines[-1] == "data: [DONE]"
            finals = [json.loads(x[6:]) for x in lines[:-1]]
            assert finals[-1]["choices"][0]["finish_reason"] == "length"
            assert (
                sum(1 for f in finals if f["choices"] and f["choices"][0]["delta"].get("content") is not None)
                > 0
            )
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_health_is_503_and_requests_refused_when_the_model_fails_to_load(tmp_path, torch_threads):
    """The port opens at once; the load error shows on /health (503) while /health/live stays 200."""
    import threading

    import uvicorn

    from service.app import create_app

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    app = create_app(serve_settings(broken, "auto", log_level="critical"))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(400):
            if app.state.server.load_error:
                break
            time.sleep(0.01)
        assert httpx.get(f"{url}/health/live").status_code == 200
        r = httpx.get(f"{url}/health")
        assert r.status_code == 503 and "neither a bundle" in r.json()["status"]
        err = assert_error(httpx.post(f"{url}/v1/chat/completions", json=chat_body()), 503, code="not_ready")
        assert "neither a bundle" in err["message"]
    finally:
        server.should_exit = True
        thread.join(10)
