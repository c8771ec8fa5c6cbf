"""The engine as the event loop sees it: submit a request, get a handle, stop at the end."""

from __future__ import annotations

import asyncio
import threading

from service.artifact import LoadedModel
from service.engine.handover import Event, Handover
from service.engine.loop import EngineLoop
from service.engine.requests import EngineFull, EngineStopped, Finished, GenerationRequest, Inbox, StreamHandle
from service.metrics import Metrics


class Engine:
    """One thread owns the model; every active generation is a row of its batched steps.

    Everything here runs on the event loop, except `_thread_main` (the engine's thread) and
    `stop` (called from a worker thread at shutdown).
    """

    def __init__(
        self,
        model: LoadedModel,
        metrics: Metrics,
        *,
        max_streams: int = 64,
        max_queue: int = 64,
        max_batch: int = 64,
        step_min_rows: int | None = None,  # None: measured at start-up (calibration.py)
        prefill_chunk: int = 64,
        step_prefill_chars: int = 32,
        decode_steps: int = 8,
        multi_step_rows: int = 16,
        stream_window: int = 128,
        flush_interval_s: float = 0.02,
        torch_threads: int = 1,
    ) -> None:
        self.model = model
        self.metrics = metrics
        self.max_streams = max_streams
        self.max_queue = max_queue
        self.step_min_rows = step_min_rows  # the padding in use once started
        self.batch_invariant: bool | None = None  # known once started
        self.failure: str | None = None  # why the engine thread died, if it did
        self._inbox = Inbox()
        self._wake = threading.Event()
        self._open: set[StreamHandle] = set()  # submitted and not yet finished
        self._thread: threading.Thread | None = None
        self._handover = Handover(self._deliver, flush_interval_s)
        self.worker = EngineLoop(
            model,
            metrics,
            self._inbox,
            self._wake,
            self._handover,
            self._died,
            max_streams=max_streams,
            max_batch=max_batch,
            step_min_rows=step_min_rows,
            prefill_chunk=prefill_chunk,
            step_prefill_chars=step_prefill_chars,
            decode_steps=decode_steps,
            multi_step_rows=multi_step_rows,
            stream_window=stream_window,
            torch_threads=torch_threads,
        )

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
        the engine stops or dies."""
        if not self.alive:
            raise EngineStopped(self.failure or "the engine is not running")
        if len(self._open) >= self.max_streams + self.max_queue:
            raise EngineFull(
                f"{len(self._open)} generations running or queued (limit "
                f"{self.max_streams} running + {self.max_queue} queued)"
            )
        handle = StreamHandle(self._wake.set)
        if not self._inbox.put(handle, req):  # the thread took its last look at the inbox already
            raise EngineStopped(self.failure or "the engine is not running")
        self._open.add(handle)
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
