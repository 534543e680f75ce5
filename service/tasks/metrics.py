"""Task-endpoint metrics (`instructlm_task_*`), registered in the app's one registry beside the engine's."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from service.metrics import _LATENCY

ENDPOINTS = ("customer_service", "content", "translate", "translate_stream")


class TaskMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        p, r = "instructlm_task_", registry
        self.requests = Counter(
            f"{p}requests",
            "Task-endpoint requests by endpoint and HTTP status.",
            ["endpoint", "status"],
            registry=r,
        )
        self.latency = Histogram(
            f"{p}request_latency_seconds", "Task request latency.", ["endpoint"], buckets=_LATENCY, registry=r
        )
        self.intents = Counter(
            f"{p}intent", "Customer-service requests by predicted intent.", ["intent"], registry=r
        )
        self.handoffs = Counter(
            f"{p}handoff", "Conversations handed to a human agent, by reason.", ["reason"], registry=r
        )
        self.retrieval_queries = Counter(f"{p}retrieval_queries", "Knowledge-base searches.", registry=r)
        self.retrieval_hits = Counter(
            f"{p}retrieval_hits", "Knowledge-base searches that found at least one entry.", registry=r
        )
        self.kb_entries = Gauge(
            f"{p}knowledge_base_entries", "Entries in the knowledge base in use.", registry=r
        )
        self.kb_reloads = Counter(
            f"{p}knowledge_base_reloads", "Knowledge-base (re)loads by result.", ["result"], registry=r
        )
        self.guard_hits = Counter(
            f"{p}guard_hits",
            "Masked spans in task outputs by endpoint and kind.",
            ["endpoint", "kind"],
            registry=r,
        )
        self.dropped_turns = Counter(
            f"{p}history_dropped_turns", "Old conversation turns dropped to fit the context.", registry=r
        )
        self.sentence_latency = Histogram(
            f"{p}translation_sentence_latency_seconds",
            "Simultaneous translation: sentence complete to its translation sent.",
            buckets=_LATENCY,
            registry=r,
        )
        for e in ENDPOINTS:
            self.latency.labels(endpoint=e)
        for reason in ("intent", "low_confidence"):
            self.handoffs.labels(reason=reason)
        for result in ("ok", "error"):
            self.kb_reloads.labels(result=result)
