"""Prometheus metrics, one registry per app (so several apps can live in one test process).

With worker processes (``chargen serve --workers N``) the supervisor points every worker at one
``PROMETHEUS_MULTIPROC_DIR``: prometheus-client's multiprocess mode, where each process writes its
values to files there and ``/metrics``, whichever worker answers, shows the sum over all of them
(gauges: over the live workers). The engine's lock-free collectors copy their totals into those
files once a second and at each scrape (`Metrics.flush`).
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"  # set by the supervisor for its workers (service/workers.py)
FLUSH_INTERVAL_S = 1.0  # how stale another worker's engine figures may be in a scrape

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256)


def multiprocess() -> bool:
    """Whether this process is one of several workers writing to a shared metrics directory."""
    return bool(os.environ.get(MULTIPROCESS_DIR))


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()  # what /metrics shows
        self.shared = multiprocess()
        # a worker's own metrics live in a registry of their own; /metrics shows every worker's files
        r = CollectorRegistry() if self.shared else self.registry
        if self.shared:
            self.registry.register(AllWorkers(self))
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
        self.active_streams = Gauge(
            "chargen_active_streams",
            "generation requests in progress",
            ["model"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.sessions_created = Counter("chargen_sessions_created", "sessions created (incl. forks)", registry=r)
        self.sessions_expired = Counter("chargen_sessions_expired", "sessions whose TTL ran out", registry=r)
        # the batching engines, one per model
        self.batch_size = EngineHistogramFamily(
            "chargen_engine_batch_size", "rows per model step", buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_length = Gauge(
            "chargen_engine_queue_length",
            "generations waiting for a row",
            ["model"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.streams_running = Gauge(
            "chargen_engine_streams_running", "rows in the engine", ["model"], registry=r, multiprocess_mode="livesum"
        )
        self.tick_seconds = EngineHistogramFamily(
            "chargen_engine_tick_seconds",
            "engine tick (prefill chunk + step + sampling)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.models_loaded = Gauge(
            "chargen_models_loaded",
            "model versions loaded, by status",
            ["status"],
            registry=r,
            multiprocess_mode="livesum",
        )
        # 1 per worker process: the sum says how many serve (1 without --workers)
        self.workers = Gauge("chargen_workers", "worker processes serving", registry=r, multiprocess_mode="livesum")
        self.workers.set(1)
        # per worker (a pid label), with --workers only: how evenly the connections spread (service/balancer.py)
        self.worker_connections = Gauge(
            "chargen_worker_connections",
            "open connections of each worker process",
            registry=r,
            multiprocess_mode="liveall",
        )
        self._engine_side = [self.chars_generated, self.time_between_chars, self.batch_size, self.tick_seconds]
        self._per_model: dict[str, ModelMetrics] = {}

    def flush(self) -> None:
        """Copy the engines' lock-free totals into this worker's multiprocess files (a no-op alone)."""
        if self.shared:
            for family in self._engine_side:
                family.flush()

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


class AllWorkers(Collector):
    """Every worker's metrics from the shared directory, this worker's engine figures fresh."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        self.metrics.flush()
        yield from MultiProcessCollector(None).collect()


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

    def __init__(self, buckets: Sequence[float], files: list[Any] | None = None) -> None:
        self.bounds = [*buckets, float("inf")]
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0
        self._files = files or []  # multiprocess: per bucket, then the sum

    def flush(self) -> None:
        """Write the totals to the multiprocess files (per-bucket counts, as Histogram stores them)."""
        for file, value in zip(self._files, [*self.counts, self.sum], strict=False):
            file.set(value)

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # bucket "le": value <= bound
        self.sum += value

    def observe_repeated(self, value: float, times: int) -> None:
        """`observe` ``times`` times."""
        self.counts[bisect_left(self.bounds, value)] += times
        self.sum += value * times

    def buckets(self) -> list[tuple[str, float]]:
        cumulative = list(accumulate(self.counts))
        return [(floatToGoString(b), n) for b, n in zip(self.bounds, cumulative, strict=True)]


class EngineCounter(Collector):
    """A counter that only the engine thread writes (see EngineHistogram)."""

    def __init__(self, file: Any = None) -> None:
        self.value = 0.0
        self._file = file  # multiprocess: the counter's value in this worker's file

    def inc(self, amount: float = 1) -> None:
        self.value += amount

    def flush(self) -> None:
        if self._file is not None:
            self._file.set(self.value)


class EngineHistogramFamily(Collector):
    """EngineHistograms by model, collected as one labelled histogram."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float], registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self.bucket_bounds = tuple(buckets)
        self.children: dict[str, EngineHistogram] = {}
        registry.register(self)

    def labels(self, model_id: str) -> EngineHistogram:
        child = self.children.get(model_id)
        if child is None:
            files = None
            if multiprocess():
                name, doc = self.name, self.documentation
                bounds = [*self.bucket_bounds, float("inf")]
                labels = ("model", "le")
                files = [
                    values.ValueClass("histogram", name, name + "_bucket", labels, (model_id, floatToGoString(b)), doc)
                    for b in bounds
                ]
                files.append(values.ValueClass("histogram", name, name + "_sum", ("model",), (model_id,), doc))
            child = self.children[model_id] = EngineHistogram(self.bucket_bounds, files)
        return child

    def flush(self) -> None:
        for child in list(self.children.values()):
            child.flush()

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
        child = self.children.get(model_id)
        if child is None:
            file = None
            if multiprocess():
                name = self.name
                file = values.ValueClass("counter", name, name + "_total", ("model",), (model_id,), self.documentation)
            child = self.children[model_id] = EngineCounter(file)
        return child

    def flush(self) -> None:
        for child in list(self.children.values()):
            child.flush()

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=["model"])
        for model_id, child in list(self.children.items()):
            family.add_metric([model_id], child.value)
        yield family
