"""Prometheus metrics, one registry per app (so several apps can live in one test process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # issue 3: the service
        self.requests = Counter(
            "chargen_http_requests", "HTTP requests by route and status", ["method", "route", "status"], registry=r
        )
        self.chars_generated = Counter("chargen_chars_generated", "characters sampled", registry=r)
        self.time_to_first_char = Histogram(
            "chargen_time_to_first_char_seconds",
            "request arrival to the first character handed to the client",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.time_between_chars = Histogram(
            "chargen_time_between_chars_seconds",
            "time between consecutive characters of one stream (engine side)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.active_streams = Gauge("chargen_active_streams", "generation requests in progress", registry=r)
        self.sessions_created = Counter("chargen_sessions_created", "sessions created (incl. forks)", registry=r)
        self.sessions_expired = Counter("chargen_sessions_expired", "sessions whose TTL ran out", registry=r)
        # issue 4: the batching engine
        self.batch_size = Histogram(
            "chargen_engine_batch_size", "rows per model step", buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_length = Gauge("chargen_engine_queue_length", "generations waiting for a row", registry=r)
        self.streams_running = Gauge("chargen_engine_streams_running", "rows in the engine", registry=r)
        self.tick_seconds = Histogram(
            "chargen_engine_tick_seconds",
            "engine tick (prefill chunk + step + sampling)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
