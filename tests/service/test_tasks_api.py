"""The task endpoints on a live server over the tiny random model: shapes, intent and retrieval wiring, guard,
history truncation, streaming, the WebSocket, metrics, and every bad input in the shared error shape."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import httpx
import msgspec
import pytest

from model.errors import UserError
from service.settings import Settings
from service.tasks.guard import Guard, GuardConfig
from service.tasks.settings import TaskSettings
from tests.service.server import LiveServer
from tests.service.tasks_fixtures import build_long_checkpoint

SEED = Path(__file__).resolve().parents[2] / "data" / "seed"


@pytest.fixture(scope="module")
def long_checkpoint(tmp_path_factory, tiny_tokenizer, torch_threads):
    return build_long_checkpoint(tmp_path_factory, tiny_tokenizer)


def _settings(model, kb: Path, **cs) -> Settings:
    cs_table = {
        "knowledge_base": str(kb),
        "intent_labels": str(SEED / "intent_labels.jsonl"),
        "max_tokens": 24,
    }
    tasks = msgspec.convert(
        {"customer_service": {**cs_table, **cs}, "translation": {"max_texts": 3}}, TaskSettings
    )
    return Settings(
        model=str(model),
        runner="torch",
        served_model_name="tiny",
        max_num_seqs=8,
        max_num_batched_tokens=128,
        prefix_cache_slots=0,
        threads=1,
        log_level="warning",
        tasks=tasks,
    )


@pytest.fixture(scope="module")
def kb_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("kb") / "faq.jsonl"
    shutil.copy(SEED / "faq.jsonl", path)
    return path


@pytest.fixture(scope="module")
def live(long_checkpoint, kb_file):
    with LiveServer(_settings(long_checkpoint, kb_file)) as srv:
        tasks = srv.app.state.tasks
        for _ in range(600):  # the intent scorer loads after the engine
            if tasks.scorer is not None or tasks.scorer_error:
                break
            time.sleep(0.05)
        assert tasks.scorer is not None, tasks.scorer_error
        yield srv


def post(live, path, body, **kw):
    return httpx.post(f"{live.url}{path}", json=body, timeout=60, **kw)


def _error(r, status, param=None, code=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err["message"]


CONVERSATION = [
    {"role": "user", "content": "hi, my bill is higher than usual"},
    {"role": "assistant", "content": "Sorry to hear that."},
    {"role": "user", "content": "How can I pay my bill in a store?"},
]


def test_customer_service_reply_intent_knowledge(live, long_checkpoint):
    r = post(live, "/v1/customer-service/chat", {"messages": CONVERSATION})
    assert r.status_code == 200, r.text
    body = r.json()
    intent = body["intent"]
    names = [json.loads(x)["intent"] for x in (SEED / "intent_labels.jsonl").read_text().splitlines()]
    assert intent["label"] in names and len(intent["candidates"]) == 3
    probs = [c["probability"] for c in intent["candidates"]]
    assert probs == sorted(probs, reverse=True) and intent["confidence"] == probs[0]
    # Reference: the same classification on a runner of our own.
    from service.runners.torch_runner import TorchRunner
    from service.tasks.customer_service import IntentClassifier, load_intent_labels, runner_scorer

    clf = IntentClassifier(live.state.tokenizer, load_intent_labels(SEED / "intent_labels.jsonl"))
    ref = clf.classify(
        CONVERSATION[-1]["content"], runner_scorer(TorchRunner(long_checkpoint, num_slots=14), range(14))
    )
    assert intent["label"] == ref.intent and intent["confidence"] == pytest.approx(ref.confidence, abs=1e-5)
    # Retrieval: BM25 over the knowledge base file, top 3.
    assert [k["id"] for k in body["knowledge"]][:1] == ["faq-014"] or "faq-014" in [
        k["id"] for k in body["knowledge"]
    ]
    scores = [k["score"] for k in body["knowledge"]]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True)
    # Random weights: confidence over 14 labels is low, so the handoff is the low-confidence one.
    assert body["handoff"] == (intent["label"] == "human_agent" or intent["confidence"] < 0.4)
    assert body["dropped_turns"] == 0 and body["finish_reason"] in ("stop", "length")
    assert body["usage"]["completion_tokens"] >= 1


def test_customer_service_drops_old_turns_to_fit(live):
    long_turns = []
    for i in range(40):
        long_turns += [
            {"role": "user", "content": f"question {i} about roaming in many countries abroad"},
            {"role": "assistant", "content": f"answer {i} about roaming prices per day"},
        ]
    body = post(
        live,
        "/v1/customer-service/chat",
        {"messages": [*long_turns, {"role": "user", "content": "and now?"}], "top_k": 1},
    ).json()
    assert body["dropped_turns"] > 0 and body["dropped_turns"] % 2 == 0  # whole user/assistant pairs


def test_customer_service_stream(live):
    events = []
    with httpx.stream(
        "POST",
        f"{live.url}/v1/customer-service/chat",
        json={"messages": CONVERSATION, "stream": True},
        timeout=60,
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    parsed = [json.loads(e) for e in events[:-1]]
    assert parsed[0]["object"] == "customer_service.head" and "intent" in parsed[0]
    assert parsed[-1]["object"] == "customer_service.done"
    streamed = "".join(p.get("delta", "") for p in parsed)
    full = post(live, "/v1/customer-service/chat", {"messages": CONVERSATION}).json()
    assert streamed.strip() == full["reply"]  # greedy: the stream and the JSON body say the same


def test_customer_service_bad_input(live):
    _error(post(live, "/v1/customer-service/chat", {"messages": []}), 400, "messages")
    msg = _error(post(live, "/v1/customer-service/chat", {"messages": CONVERSATION[:2]}), 400, "messages")
    assert "last turn must be from the user" in msg
    _error(post(live, "/v1/customer-service/chat", {"messages": [{"role": "robot", "content": "x"}]}), 400)
    huge = "roaming " * 2000
    msg = _error(
        post(live, "/v1/customer-service/chat", {"messages": [{"role": "user", "content": huge}]}),
        400,
        code="context_length_exceeded",
    )
    assert (
        "maximum context length is 1024" in msg
        and "roaming roaming roaming roaming roaming roaming" not in msg
    )


def test_content_generate_and_keywords(live):
    brief = {
        "kind": "ad_copy",
        "topic": "Kestrel Travel Pass",
        "keywords": ["roaming", "travel"],
        "tone": "playful",
        "target_words": 30,
    }
    r = post(live, "/v1/content/generate", brief)
    assert r.status_code == 200, r.text
    body = r.json()
    from service.tasks.text import keyword_hits, word_count

    assert [k["keyword"] for k in body["keywords"]] == ["roaming", "travel"]
    assert [k["present"] for k in body["keywords"]] == keyword_hits(body["text"], ["roaming", "travel"])
    assert body["words"] == word_count(body["text"]) and body["target_words"] == 30
    # The guard, reconfigured at run time: block a word the (greedy) model wrote; the same request masks it.
    words = [w for w in body["text"].split() if w.isalpha() and len(w) > 2]
    if words:
        live.app.state.tasks.guards["content"] = Guard(GuardConfig(blocked_terms=[words[0]]))
        try:
            again = post(live, "/v1/content/generate", brief).json()
            assert again["guard"]["flagged"] and again["guard"]["hits"]["blocked_term"] >= 1
            assert "*" * len(words[0]) in again["text"]
            metrics = httpx.get(f"{live.url}/metrics").text
            assert 'instructlm_task_guard_hits_total{endpoint="content",kind="blocked_term"}' in metrics
        finally:
            live.app.state.tasks.guards["content"] = Guard(GuardConfig())


def test_content_bad_input(live):
    ok = {"kind": "story", "topic": "a lost phone", "target_words": 50}
    msg = _error(post(live, "/v1/content/generate", {**ok, "kind": "poem"}), 400, "kind")
    assert "article, ad_copy, story" in msg
    msg = _error(post(live, "/v1/content/generate", {**ok, "target_words": 5000}), 400, "target_words")
    assert "[10, 400]" in msg
    _error(post(live, "/v1/content/generate", {**ok, "target_words": 0}), 400, "target_words")
    _error(post(live, "/v1/content/generate", {**ok, "target_words": "many"}), 400, "target_words")
    _error(post(live, "/v1/content/generate", {**ok, "colour": "red"}), 400)


def test_translate_list_with_sentences(live):
    r = post(
        live,
        "/v1/translate",
        {
            "text": ["Hello. Where is the store?\n\nThanks!", "你好。我的手机丢了！"],
            "target_lang": "en",
            "source_lang": None,
        },
    )
    # source_lang None: detected per text; en->en is not a pair, so the first text fails and names it.
    msg = _error(r, 400, code="unsupported_language_pair")
    assert "en-en" in msg and "en-zh, zh-en, en-de, de-en" in msg
    r = post(
        live,
        "/v1/translate",
        {"text": ["Hello. Where is the store?\n\nThanks!", "How are you?"], "target_lang": "de"},
    )
    assert r.status_code == 200, r.text
    tr = r.json()["translations"]
    assert [t["sentences"] for t in tr] == [3, 1]
    assert all(t["source_lang"] == "en" and t["target_lang"] == "de" for t in tr)
    zh = post(live, "/v1/translate", {"text": "你好。我的手机丢了！", "target_lang": "en"}).json()
    assert zh["translations"][0]["source_lang"] == "zh" and zh["translations"][0]["sentences"] == 2


def test_translate_bad_input(live):
    msg = _error(post(live, "/v1/translate", {"text": ["a."] * 4, "target_lang": "de"}), 400, "text")
    assert "at most 3 texts" in msg
    _error(post(live, "/v1/translate", {"text": [], "target_lang": "de"}), 400, "text")
    _error(post(live, "/v1/translate", {"text": ["ok", "  "], "target_lang": "de"}), 400, "text[1]")
    msg = _error(
        post(live, "/v1/translate", {"text": "Hallo", "source_lang": "de", "target_lang": "fr"}),
        400,
        "target_lang",
        "unsupported_language_pair",
    )
    assert "supported: en-zh, zh-en, en-de, de-en" in msg
    long = "word " * 1200 + "end."
    msg = _error(
        post(live, "/v1/translate", {"text": long, "target_lang": "de"}), 400, code="context_length_exceeded"
    )
    assert "sentence 0" in msg


def test_translate_stream_websocket_in_order_with_latency(live):
    from websockets.sync.client import connect

    url = f"ws://127.0.0.1:{live.port}/v1/translate/stream?source_lang=en&target_lang=de"
    with connect(url, open_timeout=30) as ws:
        ws.send("Hello there. How are")
        ws.send(" you today? I paid 3.")
        ws.send(json.dumps({"text": "14 dollars. Bye", "final": True}))
        got = []
        while True:
            msg = json.loads(ws.recv(timeout=60))
            got.append(msg)
            if msg.get("event") == "done":
                break
    sentences = got[:-1]
    assert [m["index"] for m in sentences] == [0, 1, 2, 3]
    assert [m["source"] for m in sentences] == [
        "Hello there.",
        "How are you today?",
        "I paid 3.14 dollars.",
        "Bye",
    ]
    assert all(m["latency_ms"] >= 0 and isinstance(m["translation"], str) for m in sentences)
    assert got[-1] == {"event": "done", "sentences": 4}


def test_translate_stream_close_cancels_pending(live):
    from websockets.sync.client import connect

    engine = live.engine
    url = f"ws://127.0.0.1:{live.port}/v1/translate/stream?source_lang=en&target_lang=de"
    before = engine.metrics.failure.labels(reason="client_disconnect")._value.get()
    with connect(url, open_timeout=30) as ws:
        ws.send(
            " ".join(f"Sentence number {i} is here and it is a long one about roaming." for i in range(24))
            + " "
        )
        first = json.loads(ws.recv(timeout=60))  # work is under way (8 slots: most sentences still wait)
        assert first["index"] == 0
    # Closed: the sentences still queued or running are aborted, none is left on the engine.
    deadline = time.monotonic() + 30
    while (engine.running or engine.waiting) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not engine.running and not engine.waiting
    after = engine.metrics.failure.labels(reason="client_disconnect")._value.get()
    assert after > before


def test_translate_stream_unsupported_pair(live):
    from websockets.sync.client import connect

    with connect(f"ws://127.0.0.1:{live.port}/v1/translate/stream?source_lang=de&target_lang=zh") as ws:
        msg = json.loads(ws.recv(timeout=30))
    assert msg["error"]["code"] == "unsupported_language_pair" and "de-zh" in msg["error"]["message"]


def test_task_metrics(live):
    post(live, "/v1/customer-service/chat", {"messages": CONVERSATION})
    text = httpx.get(f"{live.url}/metrics").text
    for name in (
        'instructlm_task_requests_total{endpoint="customer_service",status="200"}',
        'instructlm_task_requests_total{endpoint="content",status="400"}',
        "instructlm_task_request_latency_seconds_bucket",
        "instructlm_task_intent_total{intent=",
        "instructlm_task_retrieval_queries_total",
        "instructlm_task_retrieval_hits_total",
        "instructlm_task_knowledge_base_entries 81.0",
        "instructlm_task_handoff_total",
    ):
        assert name in text, name


def test_knowledge_base_hot_reload_through_the_endpoint(live, kb_file):
    original = kb_file.read_text()
    try:
        kb_file.write_text(
            json.dumps({"id": "new-1", "question": "Do you sell zeppelin insurance?", "answer": "No."}) + "\n"
        )
        st = kb_file.stat()
        os.utime(kb_file, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
        body = post(
            live,
            "/v1/customer-service/chat",
            {"messages": [{"role": "user", "content": "zeppelin insurance?"}]},
        ).json()
        assert [k["id"] for k in body["knowledge"]] == ["new-1"]
    finally:
        kb_file.write_text(original)
        st = kb_file.stat()
        os.utime(kb_file, ns=(st.st_atime_ns, st.st_mtime_ns + 4_000_000_000))


def test_missing_knowledge_base_refuses_to_start_or_starts_and_says_so(tiny_checkpoint, tmp_path):
    # The tiny model's window (256) is enough here: no request reaches the model with knowledge in it.
    from litestar.testing import TestClient

    from service.app import create_app
    from service.tasks.retrieval import KnowledgeBaseError

    missing = tmp_path / "nope.jsonl"
    # The lifespan fails, so the app never serves (the ASGI server exits); anyio wraps the error in a group.
    with pytest.raises(BaseException) as info, TestClient(create_app(_settings(tiny_checkpoint, missing))):
        pass
    errors = [info.value]
    while isinstance(errors[-1], BaseExceptionGroup):
        errors.append(errors[-1].exceptions[0])
    assert isinstance(errors[-1], KnowledgeBaseError) and "nope.jsonl does not exist" in str(errors[-1])
    bad = tmp_path / "bad.yaml"
    bad.write_text("- id: a\n  question: [x\n")
    with LiveServer(_settings(tiny_checkpoint, bad, knowledge_base_required=False)) as srv:
        r = post(srv, "/v1/customer-service/chat", {"messages": [{"role": "user", "content": "hi"}]})
        msg = _error(r, 503, code="knowledge_base_unavailable")
        assert "bad.yaml" in msg and "not valid YAML" in msg
        # The other endpoints work.
        assert post(srv, "/v1/translate", {"text": "Hello.", "target_lang": "de"}).status_code == 200


def test_intent_calibration_file_auto_explicit_and_bad(tmp_path):
    from service.api.generation import ServerState
    from service.metrics import Metrics
    from service.tasks.api import build_task_state

    model = tmp_path / "run" / "bundle"
    model.mkdir(parents=True)
    cal = {
        "temperature": 2.5,
        "ece_before": 0.2,
        "ece_after": 0.05,
        "nll_before": 1.0,
        "nll_after": 0.8,
        "n": 56,
    }

    def state(**cs):
        return build_task_state(
            ServerState(settings=_settings(model, SEED / "faq.jsonl", **cs), metrics=Metrics())
        )

    assert state().temperature == 1.0  # auto, nothing beside the model
    (tmp_path / "run" / "eval").mkdir()
    (tmp_path / "run" / "eval" / "intent_calibration.json").write_text(json.dumps(cal))
    assert state().temperature == 2.5  # auto finds MODEL/../eval/intent_calibration.json
    assert state(intent_calibration="").temperature == 1.0
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**cal, "temperature": -1}))
    with pytest.raises(UserError, match="bad.json: temperature must be > 0"):
        state(intent_calibration=str(bad))


def test_client_system_turn_is_kept_after_the_company_prompt(live):
    user = {"role": "user", "content": "Where is my order?"}
    plain = post(live, "/v1/customer-service/chat", {"messages": [user], "top_k": 0}).json()
    extra = "Answer in one short sentence."
    with_sys = post(
        live,
        "/v1/customer-service/chat",
        {"messages": [{"role": "system", "content": extra}, user], "top_k": 0},
    ).json()
    tok = live.state.tokenizer
    grown = with_sys["usage"]["prompt_tokens"] - plain["usage"]["prompt_tokens"]
    # BPE may merge one token differently where the two texts meet.
    assert abs(grown - len(tok.encode("\n\n" + extra))) <= 1 and grown > 3


def test_translate_stream_sse_sentences_then_the_joined_texts(live):
    body = {"text": ["Hello there. How are you?", "Thanks!"], "source_lang": "en", "target_lang": "de"}
    events = []
    with httpx.stream("POST", f"{live.url}/v1/translate", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    parsed = [json.loads(e) for e in events[:-1]]
    sentences = [p for p in parsed if p["object"] == "translation.sentence"]
    assert sorted((p["text_index"], p["sentence_index"]) for p in sentences) == [(0, 0), (0, 1), (1, 0)]
    done = parsed[-1]
    assert done["object"] == "translation.done"
    full = post(live, "/v1/translate", body).json()
    # Greedy: the streamed sentences, joined, are the JSON answer.
    assert [t["text"] for t in done["translations"]] == [t["text"] for t in full["translations"]]


def test_non_streaming_task_request_stops_when_its_client_leaves(live):
    """The engine is held while the client sends a content brief and hangs up; once released, the request is
    dropped as a client disconnect instead of generating its answer for nobody."""
    import socket
    import threading
    from urllib.parse import urlsplit

    from prometheus_client.parser import text_string_to_metric_families

    def disconnects() -> float:
        text = httpx.get(f"{live.url}/metrics", timeout=10).text
        for fam in text_string_to_metric_families(text):
            if fam.name == "instructlm_client_disconnects":
                return sum(s.value for s in fam.samples if s.name.endswith("_total"))
        raise AssertionError("no instructlm_client_disconnects in /metrics")

    before = disconnects()
    gate = threading.Event()
    engine_step = live.engine.step
    live.engine.step = lambda: (gate.wait(30), engine_step())[1]
    try:
        body = msgspec.json.encode(
            {
                "kind": "story",
                "topic": "a lost phone",
                "keywords": ["storm"],
                "tone": "warm",
                "target_words": 120,
            }
        )
        url = urlsplit(live.url)
        with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
            sock.sendall(
                b"POST /v1/content/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            for _ in range(400):  # bounded wait until the request is on the engine
                if live.engine.num_waiting == 1:
                    break
                time.sleep(0.005)
            assert live.engine.num_waiting == 1
        # The engine is held, so the request stays queued until the server has read the hang-up and cancelled it.
        queued = list(live.engine._inbox) + list(live.engine.waiting)
        for _ in range(1000):  # bounded: 10 s
            if any(s.cancelled for s in queued):
                break
            time.sleep(0.01)
        assert any(s.cancelled for s in queued)
    finally:
        gate.set()
        vars(live.engine).pop("step", None)
    for _ in range(400):
        if not live.engine.has_work():
            break
        time.sleep(0.01)
    assert not live.engine.running
    assert disconnects() == before + 1
