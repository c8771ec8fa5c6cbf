"""The engine's knobs (the service sets them from CHARGEN_* settings; docs/service.md)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    max_streams: int = 64  # generations running at once: rows in the engine
    max_queue: int = 64  # generations waiting for a row; past it submit() refuses
    max_batch: int = 64  # rows per model step (1: batching off)
    step_min_rows: int | None = None  # pad steps with a reproducible row to this; None: measured at start-up
    prefill_chunk: int = 64  # characters of a long prompt fed per tick, with `forward`
    step_prefill_chars: int = 32  # a prompt with at most this many characters left rides in the steps
    decode_steps: int = 16  # characters a batch takes per tick while nobody waits, at most
    multi_step_ms: float = 20.0  # ...and only as many as fit in this long a tick (a newcomer waits that long)
    stream_window: int = 128  # characters a stream may run ahead of what its client was sent
    flush_interval_s: float = 0.02  # hand text to the event loop at most this often while busy
    flush_events_per_s: float = 800.0  # ...and less often with many streams: at most this many events a second
    torch_threads: int = 1  # intra-op threads of the engine's thread
