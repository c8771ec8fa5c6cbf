"""The engine as the event loop sees it: submit a request, get a handle, stop at the end."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from typing import Any

from service.artifact import LoadedModel
from service.engine.config import EngineConfig
from service.engine.handover import Event, Handover
from service.engine.loop import EngineLoop
from service.engine.requests import EngineFull, EngineStopped, Finished, GenerationRequest, Inbox, StreamHandle
from service.metrics import Metrics, ModelMetrics


class Engine:
    """One thread owns the model; every active generation is a row of its batched steps.

    Everything here runs on the event loop, except `_thread_main` (the engine's thread) and
    `stop` (called from a worker thread at shutdown).
    """

    def __init__(
        self,
        model: LoadedModel,
        metrics: Metrics | ModelMetrics,
        config: EngineConfig | None = None,
        **overrides: Any,
    ) -> None:
        """``overrides``: fields of EngineConfig, over ``config`` (or the defaults). The engine
        writes its model's series of ``metrics`` (labelled with the model's id)."""
        self.config = config = dataclasses.replace(config or EngineConfig(), **overrides)
        self.model = model
        self.metrics = metrics = metrics.for_model(model.model_id) if isinstance(metrics, Metrics) else metrics
        self.step_min_rows = config.step_min_rows  # the padding in use once started
        self.batch_invariant: bool | None = None  # known once started
        self.failure: str | None = None  # why the engine thread died, if it did
        self._inbox = Inbox()
        self._wake = threading.Event()
        self._open: set[StreamHandle] = set()  # submitted and not yet finished
        self._thread: threading.Thread | None = None
        self._handover = Handover(self._deliver, config.flush_interval_s, config.flush_events_per_s)
        self.worker = EngineLoop(model, metrics, config, self._inbox, self._wake, self._handover, self._died)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the engine's thread; returns once it has measured its padding (on its own thread,
        with its thread count)."""
        self._handover.loop = loop
        self._thread = threading.Thread(target=self._thread_main, name="chargen-engine", daemon=True)
        self._thread.start()
        self.worker.calibrated.wait()
        if self.worker.padding is not None:
            self.step_min_rows = self.worker.padding.step_min_rows
            self.batch_invariant = self.worker.padding.batch_invariant

    def _thread_main(self) -> None:
        self.worker.run()

    @property
    def alive(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive() and not self.worker.stopping and self.failure is None

    @property
    def in_flight(self) -> int:
        return len(self._open)

    def wake(self) -> None:
        self._wake.set()

    def submit(self, req: GenerationRequest) -> StreamHandle:
        """Queue a generation; raises EngineFull past max_streams + max_queue, EngineStopped once
        the engine stops or dies. With ``req.n`` > 1 the handle's ``siblings`` are choices 1..n-1."""
        if not self.alive:
            raise EngineStopped(self.failure or "the engine is not running")
        config = self.config
        if len(self._open) + req.n > config.max_streams + config.max_queue:
            raise EngineFull(
                f"{len(self._open)} generations running or queued (limit "
                f"{config.max_streams} running + {config.max_queue} queued)"
            )
        handle = StreamHandle(self._wake.set)
        handle.siblings = [StreamHandle(self._wake.set) for _ in range(req.n - 1)]
        if not self._inbox.put(handle, req):  # the thread took its last look at the inbox already
            raise EngineStopped(self.failure or "the engine is not running")
        self._open.add(handle)
        self._open.update(handle.siblings)
        self.metrics.queue_length.set(len(self._inbox))
        self._wake.set()
        return handle

    def stop(self, timeout: float = 10.0) -> None:
        """Finish every row as cancelled (saving what was sent) and join the thread."""
        self.worker.stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _deliver(self, events: list[Event]) -> None:
        """The engine thread's hand-over, on the loop: text to its stream, results to their futures."""
        for handle, item in events:
            if isinstance(item, str):
                handle.text.put_nowait(item)
            else:
                self._open.discard(handle)
                handle._finish(item)

    def _died(self, message: str) -> None:
        """On the dying engine thread: refuse new work; the loop ends every open generation."""
        self.failure = message
        self._inbox.close()
        self._handover.post(self._fail_open, message)

    def _fail_open(self, message: str) -> None:
        for handle in list(self._open):
            handle._finish(Finished("engine_stopped", 0, 0, None, message))
        self._open.clear()
