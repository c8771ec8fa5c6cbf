"""The engine's lock-free metrics expose exactly what prometheus_client's own types would."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from service.metrics import LATENCY_BUCKETS, EngineCounterFamily, EngineHistogramFamily


def samples(registry: CollectorRegistry) -> list[str]:
    """Exposition lines without comments and without prometheus_client's `_created` samples."""
    text = generate_latest(registry).decode()
    return [line for line in text.splitlines() if not line.startswith("#") and "_created" not in line]


def test_engine_histogram_and_counter_match_prometheus_client() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    histogram = EngineHistogramFamily("x_seconds", "doc", LATENCY_BUCKETS, ours).labels("m")
    reference = Histogram("x_seconds", "doc", ["model"], buckets=LATENCY_BUCKETS, registry=theirs).labels("m")
    counter = EngineCounterFamily("y", "doc", ours).labels("m")
    reference_counter = Counter("y", "doc", ["model"], registry=theirs).labels("m")
    rng = random.Random(4)
    values = [rng.choice(LATENCY_BUCKETS) for _ in range(50)]  # exactly on a bound: "le" includes it
    values += [rng.uniform(0, 12) for _ in range(200)] + [0.0, 1e9]
    for value in values:
        histogram.observe(value)
        reference.observe(value)
        counter.inc(3)
        reference_counter.inc(3)
    assert samples(ours) == samples(theirs)
    assert ours.get_sample_value("x_seconds_count", {"model": "m"}) == len(values)
