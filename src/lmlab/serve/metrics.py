"""Prometheus metrics of `lmlab serve` (prometheus_client, one registry per app)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("lmlab_requests", "HTTP requests by path and status", ["path", "status"], registry=r)
        self.latency = Histogram("lmlab_request_seconds", "HTTP request latency", ["path"], buckets=LATENCY, registry=r)
        self.ttft = Histogram(
            "lmlab_time_to_first_token_seconds", "submission to first token", buckets=LATENCY, registry=r
        )
        self.itl = Histogram(
            "lmlab_inter_token_latency_seconds", "between a stream's tokens", buckets=LATENCY, registry=r
        )
        self.tokens = Counter("lmlab_generated_tokens", "tokens generated", registry=r)
        self.queue = Gauge("lmlab_queue_depth", "requests waiting for a slot", registry=r)
        self.batch = Gauge("lmlab_batch_size", "rows in the running decode batch", registry=r)
        self.batch_hist = Histogram(
            "lmlab_decode_batch_rows", "rows per decode step", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r
        )
        self.engine = Gauge("lmlab_engine_requests", "engine counters", ["kind"], registry=r)

    def request(self, path: str, status: int, seconds: float) -> None:
        path = path if path in _KNOWN else "other"  # unbounded label values would grow the registry
        self.requests.labels(path, str(status)).inc()
        self.latency.labels(path).observe(seconds)

    def on_step(self, rows: int) -> None:
        """Called by the engine thread after every step."""
        self.batch.set(rows)
        if rows:
            self.batch_hist.observe(rows)

    def observe_engine(self, stats: dict[str, int]) -> None:
        self.queue.set(stats["queue"])
        for kind in ("requests", "finished", "cancelled", "failed", "prompt_tokens", "generated_tokens"):
            self.engine.labels(kind).set(stats[kind])

    def timed(self, emit: Callable[[Any], None]) -> Callable[[Any], None]:
        """Wrap a request's emit to record its time to first token and its inter-token latencies."""
        started, last = time.perf_counter(), [None]

        def wrapped(delta: Any) -> None:
            now = time.perf_counter()
            n = len(delta.tokens)
            if n:
                self.tokens.inc(n)
                if last[0] is None:
                    self.ttft.observe(now - started)
                else:
                    self.itl.observe(now - last[0])
                last[0] = now
            emit(delta)

        return wrapped

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


_KNOWN = {
    "/",
    "/health",
    "/metrics",
    "/v1/models",
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/fill-mask",
    "/v1/classify",
    "/v1/token-classify",
    "/v1/question-answering",
    "/openapi.json",
    "/docs",
}
