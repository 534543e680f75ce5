"""Prometheus metrics, with the names DESIGN.md fixes (the gauges Kubernetes LLM routers and autoscalers read).

One registry per app (not the process-global one), so two apps in one test process never share counts. One
engine per process (gunicorn runs one worker; scale with pods), so no multiprocess collector is needed.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE  # noqa: F401  (re-exported for the API)
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

# Latency buckets from 1 ms (one demo decode step is ~2-3 ms) to 2 minutes.
# The `_created` series double the scrape size and no router or dashboard reads them.
disable_created_metrics()

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKENS = (1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        p = "instructlm_"
        self.running = Gauge(f"{p}num_requests_running", "Sequences holding a KV-cache slot.", registry=r)
        self.waiting = Gauge(f"{p}num_requests_waiting", "Sequences waiting for a slot.", registry=r)
        self.kv_usage = Gauge(
            f"{p}kv_cache_usage_ratio", "Fraction of sequence KV-cache slots in use (0..1).", registry=r
        )
        self.prompt_tokens = Counter(f"{p}prompt_tokens", "Prompt tokens of admitted sequences.", registry=r)
        self.generation_tokens = Counter(f"{p}generation_tokens", "Tokens generated.", registry=r)
        self.success = Counter(
            f"{p}request_success", "Sequences finished, by finish reason.", ["finished_reason"], registry=r
        )
        self.failure = Counter(f"{p}request_failure", "Requests failed, by reason.", ["reason"], registry=r)
        self.disconnects = Counter(
            f"{p}client_disconnects", "Requests whose client left before the end.", registry=r
        )
        self.prefix_queries = Counter(f"{p}prefix_cache_queries", "Prefix-cache lookups.", registry=r)
        self.prefix_hits = Counter(
            f"{p}prefix_cache_hits", "Prefix-cache lookups that reused a prefix.", registry=r
        )
        self.prefix_hit_tokens = Counter(
            f"{p}prefix_cache_hit_tokens",
            "Prompt tokens copied from the prefix cache instead of computed.",
            registry=r,
        )
        self.ttft = Histogram(
            f"{p}time_to_first_token_seconds", "Arrival to first token.", buckets=_LATENCY, registry=r
        )
        self.itl = Histogram(
            f"{p}inter_token_latency_seconds",
            "Time between two tokens of a sequence.",
            buckets=_LATENCY,
            registry=r,
        )
        self.e2e = Histogram(
            f"{p}e2e_request_latency_seconds", "Arrival to last token.", buckets=_LATENCY, registry=r
        )
        self.queue_time = Histogram(
            f"{p}request_queue_time_seconds",
            "Arrival to admission into a slot.",
            buckets=_LATENCY,
            registry=r,
        )
        self.req_prompt_tokens = Histogram(
            f"{p}request_prompt_tokens", "Prompt length per sequence.", buckets=_TOKENS, registry=r
        )
        self.req_generation_tokens = Histogram(
            f"{p}request_generation_tokens", "Generated length per sequence.", buckets=_TOKENS, registry=r
        )
        self.steps = Counter(f"{p}engine_steps", "Engine steps run.", registry=r)
        # Where a step's time goes (bench/serve.py prints the per-step profile from these).
        self.step_seconds = Counter(
            f"{p}engine_step_seconds", "Engine step time by phase.", ["phase"], registry=r
        )
        self.phase = {
            ph: self.step_seconds.labels(phase=ph)
            for ph in ("schedule", "prefill", "mixed", "decode", "update")
        }
        for reason in ("stop", "length"):
            self.success.labels(finished_reason=reason)
        for reason in ("queue_full", "timeout", "error", "client_disconnect", "draining"):
            self.failure.labels(reason=reason)

    def render(self) -> bytes:
        return generate_latest(self.registry)
