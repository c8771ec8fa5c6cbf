"""The engine's thread: calibrate once, then tick until stopped; it never dies silently."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import torch

from service.artifact import LoadedModel
from service.engine.batch import BatchBuilder
from service.engine.calibration import Padding, choose_padding
from service.engine.config import EngineConfig
from service.engine.handover import Handover
from service.engine.outputs import Outputs
from service.engine.requests import Finished, Inbox
from service.engine.row import Row
from service.engine.scheduler import Scheduler
from service.engine.step import Stepper
from service.metrics import ModelMetrics

log = logging.getLogger("chargen.engine")

SHUTTING_DOWN = "the service is shutting down"


class EngineLoop:
    """Each tick: admit waiting requests, hand the text of earlier ticks to the event loop when due,
    feed one chunk of one long prompt, run ONE step over every ready row (one scripted call).

    The hand-over goes just before the model's call, not after it: the event loop then writes the
    streams' events while the call runs without the GIL, instead of while this thread's Python
    (taking the step's output, building the next batch) waits for the GIL behind it. Only urgent
    text (a first character, a finished row) goes out at the end of a tick, and everything when
    the engine runs out of work.

    ``died`` is called (on this thread) with the reason if anything escapes a tick's own guard.
    """

    def __init__(
        self,
        model: LoadedModel,
        metrics: ModelMetrics,
        config: EngineConfig,
        inbox: Inbox,
        wake: threading.Event,
        handover: Handover,
        died: Callable[[str], None],
    ) -> None:
        self.model = model
        self.metrics = metrics
        self.config = config
        self.inbox = inbox
        self.wake = wake
        self.handover = handover
        self.died = died
        self.stopping = False
        self.calibrated = threading.Event()
        self.padding: Padding | None = None
        self.stepper = Stepper(model)
        self.batches = BatchBuilder(model, config)
        self.outputs = Outputs(model, metrics, handover, self._leave, self._join)
        self.scheduler = Scheduler(model, config, inbox, self.stepper, self.outputs)
        self._counts_shown = (-1, -1)  # (rows, queued) last written to the gauges

    def run(self) -> None:
        try:
            torch.set_num_threads(self.config.torch_threads)  # intra-op threads are per calling thread in OpenMP
            try:
                self.padding = choose_padding(self.model, self.config.max_batch, self.config.step_min_rows)
                self.batches.pad_to = self.padding.step_min_rows
            finally:
                self.calibrated.set()
            with torch.inference_mode():
                while not self.stopping:
                    self.wake.clear()
                    worked = self._guarded_tick()
                    if not worked or self.handover.urgent:
                        self._flush()
                    if not worked and not self.stopping:
                        self.wake.wait(1.0)  # submit, ack, cancel and stop set it
                self._shut_down()
        except BaseException as err:  # anything outside a tick's own guard: the engine is gone
            log.exception("the engine thread died; failing every open generation")
            self.died(f"the model engine stopped ({type(err).__name__}: {err})")

    def _guarded_tick(self) -> bool:
        try:
            return self.tick()
        except Exception:  # a bug or a broken model fails its rows, not the thread
            log.exception("engine tick failed; failing its rows")
            for row in list(self.scheduler.rows):
                self.outputs.finish(row, "error", row.sent(), error="internal error in the engine")
            self.scheduler.clear()
            self.batches.forget()
            return True

    def tick(self) -> bool:
        started = time.perf_counter()
        scheduler = self.scheduler
        scheduler.admit()
        scheduler.reap_cancelled()
        if self.handover.due(worked=True):  # before the model's call: see the class docstring
            self._flush()
        worked = False
        if scheduler.prefilling:
            scheduler.prefill_one()
            worked = True
        ready = scheduler.ready()
        if ready:
            batch = self.batches.build(ready, quiet=not self.inbox.waiting and not scheduler.prefilling)
            called = time.perf_counter()
            picks, states_h, states_c = self.stepper.decode(batch)
            self.batches.timed(batch, time.perf_counter() - called)
            self.batches.stepped(batch, states_h[-1], states_c[-1])
            self.outputs.take(batch, picks, states_h, states_c)
            worked = True
        if worked:
            self.metrics.tick_seconds.observe(time.perf_counter() - started)
        counts = (len(scheduler.rows), len(self.inbox.waiting))
        if counts != self._counts_shown:  # gauges only when they change: a lone stream's tick is ~0.4 ms
            self._counts_shown = counts
            self.metrics.streams_running.set(counts[0])
            self.metrics.queue_length.set(counts[1])
        return worked

    def _flush(self) -> None:
        self.handover.flush()
        for row in self.scheduler.rows:  # no rewind goes before what the client has been sent
            row.snapshots.forget_before(row.sent())

    def _join(self, row: Row) -> None:
        self.scheduler.join(row)

    def _leave(self, row: Row) -> None:
        self.scheduler.remove(row)
        self.batches.forget(row)

    def _shut_down(self) -> None:
        """Every row ends as cancelled (saving what its client was sent); nothing more is admitted."""
        for row in list(self.scheduler.rows):
            self.outputs.finish(row, "cancelled", row.sent(), error=SHUTTING_DOWN)
        for first, _ in self.inbox.close():
            for handle in [first, *first.siblings]:
                self.outputs.answer(handle, Finished("cancelled", 0, 0, None, SHUTTING_DOWN))
        self._flush()
