"""Prometheus metrics, one registry per app (so several apps can live in one test process)."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # HTTP requests, characters and sessions
        self.requests = Counter(
            "chargen_http_requests", "HTTP requests by route and status", ["method", "route", "status"], registry=r
        )
        # Per model: every series a model's engine or its requests write carries a `model` label.
        self.chars_generated = EngineCounterFamily("chargen_chars_generated", "characters sampled", registry=r)
        self.time_to_first_char = Histogram(
            "chargen_time_to_first_char_seconds",
            "request arrival to the first character handed to the client",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.time_between_chars = EngineHistogramFamily(
            "chargen_time_between_chars_seconds",
            "time between consecutive characters of one stream (engine side)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.active_streams = Gauge("chargen_active_streams", "generation requests in progress", ["model"], registry=r)
        self.sessions_created = Counter("chargen_sessions_created", "sessions created (incl. forks)", registry=r)
        self.sessions_expired = Counter("chargen_sessions_expired", "sessions whose TTL ran out", registry=r)
        # the batching engines, one per model
        self.batch_size = EngineHistogramFamily(
            "chargen_engine_batch_size", "rows per model step", buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_length = Gauge("chargen_engine_queue_length", "generations waiting for a row", ["model"], registry=r)
        self.streams_running = Gauge("chargen_engine_streams_running", "rows in the engine", ["model"], registry=r)
        self.tick_seconds = EngineHistogramFamily(
            "chargen_engine_tick_seconds",
            "engine tick (prefill chunk + step + sampling)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.models_loaded = Gauge("chargen_models_loaded", "model versions loaded, by status", ["status"], registry=r)
        self._per_model: dict[str, ModelMetrics] = {}

    def for_model(self, model_id: str) -> ModelMetrics:
        """The series of one model, made on first use and the same object after."""
        found = self._per_model.get(model_id)
        if found is None:
            found = self._per_model[model_id] = ModelMetrics(
                chars_generated=self.chars_generated.labels(model_id),
                time_to_first_char=self.time_to_first_char.labels(model_id),
                time_between_chars=self.time_between_chars.labels(model_id),
                active_streams=self.active_streams.labels(model_id),
                batch_size=self.batch_size.labels(model_id),
                queue_length=self.queue_length.labels(model_id),
                streams_running=self.streams_running.labels(model_id),
                tick_seconds=self.tick_seconds.labels(model_id),
            )
        return found


@dataclass(frozen=True)
class ModelMetrics:
    """One model's children of the labelled series: what its engine and its jobs write."""

    chars_generated: EngineCounter
    time_to_first_char: Any
    time_between_chars: EngineHistogram
    active_streams: Any
    batch_size: EngineHistogram
    queue_length: Any
    streams_running: Any
    tick_seconds: EngineHistogram


class EngineHistogram(Collector):
    """A histogram that only the engine thread writes: no lock, a list of bucket counts.

    prometheus_client's Histogram takes a lock per observation (~2 µs on the CI CPU); the engine
    observes once per character of every row, 64 times per tick at 64 streams. A scrape that
    lands between the bucket and the sum of one observation sees them one apart, as harmless as
    a scrape a microsecond earlier.
    """

    def __init__(self, buckets: Sequence[float]) -> None:
        self.bounds = [*buckets, float("inf")]
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # bucket "le": value <= bound
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        cumulative = list(accumulate(self.counts))
        return [(floatToGoString(b), n) for b, n in zip(self.bounds, cumulative, strict=True)]


class EngineCounter(Collector):
    """A counter that only the engine thread writes (see EngineHistogram)."""

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount


class EngineHistogramFamily(Collector):
    """EngineHistograms by model, collected as one labelled histogram."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float], registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self.bucket_bounds = tuple(buckets)
        self.children: dict[str, EngineHistogram] = {}
        registry.register(self)

    def labels(self, model_id: str) -> EngineHistogram:
        return self.children.setdefault(model_id, EngineHistogram(self.bucket_bounds))

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=["model"])
        for model_id, child in list(self.children.items()):
            family.add_metric([model_id], child.buckets(), child.sum)
        yield family


class EngineCounterFamily(Collector):
    """EngineCounters by model, collected as one labelled counter."""

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self.children: dict[str, EngineCounter] = {}
        registry.register(self)

    def labels(self, model_id: str) -> EngineCounter:
        return self.children.setdefault(model_id, EngineCounter())

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=["model"])
        for model_id, child in list(self.children.items()):
            family.add_metric([model_id], child.value)
        yield family
