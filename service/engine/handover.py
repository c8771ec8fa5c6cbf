"""Handing the engine thread's output to the event loop: one thread-safe call per hand-over."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

from service.engine.requests import Finished, StreamHandle
from service.engine.row import Row

Event = tuple[StreamHandle, str | Finished]


class Handover:
    """Text pieces and results, in order per row, handed over at most every ``interval_s``.

    Each hand-over costs the event loop (and every client) one event per stream, and the loop
    competes with the engine's thread for the GIL and the other core: handing over every 5 ms
    tick at 64 streams held the engine to ~0.45 x its step's speed, every 25 ms to ~0.75 x. So
    text collects in each row's outbox (one piece per row per hand-over), and only a stream's
    first text and a finished row (``urgent``) go out at once.

    With many streams the interval also grows so that hand-overs carry at most ``events_per_s``
    events a second: the event loop's (and the clients') cost stays bounded however many streams
    a worker runs, instead of growing with them. Where every core runs an engine (``--workers
    auto``) that cost is taken from the engines: 64 streams on two workers ran x 1.067 faster with
    text handed over every 80 ms instead of every 20 (docs/benchmarks.md).
    """

    def __init__(self, deliver: Callable[[list[Event]], None], interval_s: float, events_per_s: float = 0.0) -> None:
        self.deliver = deliver  # runs on the event loop
        self.interval_s = interval_s
        self.events_per_s = events_per_s  # 0: no budget, every interval_s
        self.loop: asyncio.AbstractEventLoop | None = None  # set when the engine starts
        self.events: list[Event] = []
        self.outboxes: dict[Row, None] = {}  # running rows with text in their outbox, in order
        self.urgent = False  # a row's first text or a finished row waits: hand over now
        self._flushed_at = 0.0

    def due(self, worked: bool) -> bool:
        """Whether to hand over now (always when the engine runs out of work)."""
        if not worked or self.urgent:
            return True
        return time.perf_counter() - self._flushed_at >= self.interval(len(self.outboxes))

    def interval(self, streams: int) -> float:
        """How long text waits between hand-overs while `streams` streams have some: interval_s,
        or longer where that would hand the event loop more than events_per_s events a second."""
        if self.events_per_s <= 0:
            return self.interval_s
        return max(self.interval_s, streams / self.events_per_s)

    def text(self, row: Row, text: str) -> None:
        """Released text of a running row."""
        row.outbox += text
        self.outboxes[row] = None

    def finished(self, row: Row | None, handle: StreamHandle, result: Finished) -> None:
        """A generation's end: its last text (if any) first, then the result."""
        if row is not None:
            if row.outbox:
                self.events.append((handle, row.outbox))
                row.outbox = ""
            self.outboxes.pop(row, None)
        self.events.append((handle, result))
        self.urgent = True

    def flush(self) -> None:
        """Hand every row's new text (one piece per row) and every result to the event loop."""
        self._flushed_at = time.perf_counter()
        self.urgent = False
        for row in self.outboxes:
            self.events.append((row.handle, row.outbox))
            row.outbox = ""
        self.outboxes.clear()
        if not self.events:
            return
        events, self.events = self.events, []
        self.post(self.deliver, events)

    def post(self, fn: Callable[[Any], None], arg: Any) -> None:
        """Run fn(arg) on the event loop, soon (thread-safe)."""
        loop = self.loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed under us at shutdown
                loop.call_soon_threadsafe(fn, arg)
