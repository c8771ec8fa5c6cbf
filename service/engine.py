"""The batching engine: one thread owns the model; every active generation is a row.

Each tick the engine
1. admits waiting requests as new rows (up to ``max_streams``),
2. feeds one chunk (``prefill_chunk`` characters) of one long prompt with ``forward``, round-robin
   over the rows still reading a long prompt, so a long prompt never stalls the others for more
   than one chunk,
3. runs ONE ``step`` over every row that needs a character (up to ``max_batch``): decoding rows
   feed their last character and sample the next one, each with its own parameters and PRNG, and
   apply their stop strings; rows with a short prompt left (at most ``step_prefill_chars``) feed
   their next prompt character in the same step, so a burst of new streams with short prompts is
   read in a few batched steps instead of one ``forward`` per stream, and
4. hands the new text to the event loop in one thread-safe call, at most every
   ``flush_interval_s`` while it keeps working (every tick when ticks are slower than that).

Step 3 is one scripted call (`StepSampler`) for any batch but a few unseeded rows, and a batch
of up to ``MULTI_STEP_ROWS`` rows takes ``decode_steps`` characters per tick while nobody waits
(no request to admit, no prompt being read, no row before its first character, none left out of
the batch): the engine's Python then runs once per that many characters. Every step is the same
call at the same batch size and each row draws its numbers in order, so the text is the same.

State representation. A row's state is (h, c) after all of its text but the last character, plus
that last character, "pending", not yet fed. Feeding the pending character gives the distribution
of the next one. This is also exactly what a session stores, so the state "after the text returned
so far" is available after every tick with no extra model step: the engine keeps these snapshots
(references into each tick's output tensors, no copies) from the last character the client was
sent onwards, and a stop string or a client disconnect rewinds to the right one.

Batch invariance. MKL picks different matrix kernels for small and large row counts, which
changes the last bits of the results: on AMD EPYC (AVX2) sizes 1, 2-3 and >= 4 differ, on an Intel
Xeon with AVX-512 every size below 16 differs from 16 and up. A step that carries a reproducible
row (seeded, greedy or top-k 1) is therefore padded to ``step_min_rows`` rows, the smallest size
from which every size agrees, measured for the loaded model at start-up (`find_step_min_rows`);
long prompts are fed one row at a time. So such a row's numbers, and with per-row PRNGs its
text, never depend on which other streams share its batches. Which path feeds which character of
a prompt depends only on the prompt's length and the settings, never on the other streams.
Steps of only unseeded sampling rows are not padded: their text is random anyway, a last-bit
difference in the logits cannot be told from another draw, and a lone stream then pays the
1-row price.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from service.artifact import LoadedModel
from service.metrics import Metrics
from service.sampling import BatchParams, SamplingParams, sample_row, step_sampler
from service.state_codec import SessionState, encode_state

log = logging.getLogger("chargen.engine")

SMALL_BATCH = 4  # up to this many unseeded rows are sampled in plain Python (`sample_row`)
MULTI_STEP_ROWS = 16  # up to this many rows take `decode_steps` characters per tick (ticks of ~10 ms at most)


class EngineFull(RuntimeError):
    """Every row and every queue slot is taken."""


class EngineStopped(RuntimeError):
    pass


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    max_new_chars: int
    params: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    state: SessionState | None = None  # None: start from the model's initial state
    auto_ack: bool = True  # True: not streamed; text counts as delivered as soon as it is produced
    want_state: bool = False  # encode the final state (for sessions)


@dataclass
class Finished:
    # "length" | "stop" | "cancelled" | "error" (this generation failed) | "engine_stopped" (the
    # engine thread died under it: nothing was saved)
    reason: str
    completion_chars: int  # characters returned to the client (cancelled: those it was sent)
    chars_consumed: int  # the session's whole text length after this request
    state: bytes | None  # encoded session state; None when not wanted or nothing changed
    error: str | None = None


class StreamHandle:
    """The event loop's end of one generation: text pieces, then one Finished."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.text: asyncio.Queue[str | None] = asyncio.Queue()
        self.finished: asyncio.Future[Finished] = asyncio.get_running_loop().create_future()
        self.acked = 0  # characters the client was sent; written by the loop, read by the engine
        self.cancelled = False

    def ack(self, chars: int) -> None:
        self.acked += chars
        self._engine.wake()

    def cancel(self) -> None:
        if not self.cancelled and not self.finished.done():
            self.cancelled = True
            self._engine.wake()

    def _finish(self, result: Finished) -> None:
        self.text.put_nowait(None)
        if not self.finished.done():
            self.finished.set_result(result)


class _Row:
    """One generation inside the engine thread."""

    __slots__ = (
        "c_src",
        "consumed_base",
        "decoding",
        "emitted",
        "fed",
        "feeding_in_steps",
        "finished",
        "generated",
        "greedy",
        "h_src",
        "handle",
        "held",
        "idx",
        "last_char_at",
        "max_new",
        "outbox",
        "params",
        "pending",
        "reproducible",
        "req",
        "rng",
        "snap_base",
        "snaps",
        "stop",
        "to_prefill",
    )

    def __init__(
        self,
        handle: StreamHandle,
        req: GenerationRequest,
        h: Tensor,
        c: Tensor,
        pending: int,
        to_prefill: list[int],
        consumed_base: int,
    ) -> None:
        self.handle = handle
        self.req = req
        self.params = req.params
        self.stop = req.stop
        self.max_new = req.max_new_chars
        self.rng = req.params.rng()
        # its text must not depend on the batch, so its steps are padded (see module docstring)
        p = req.params
        self.reproducible = p.seed is not None or p.greedy or p.top_k == 1
        self.greedy = p.greedy
        self.h_src, self.c_src, self.idx = h, c, 0  # state = h_src[:, idx], c_src[:, idx]
        self.pending = pending
        self.to_prefill = to_prefill
        self.fed = 0
        self.feeding_in_steps = False  # True while the rest of the prompt rides in the batched steps
        self.decoding = False  # True once the prompt is fed
        self.finished = False  # True once it has left the engine
        self.consumed_base = consumed_base
        self.generated = 0
        self.emitted = 0
        self.held = ""  # generated text that may be the start of a stop string
        self.outbox = ""  # text returned but not yet handed to the event loop
        self.snaps: deque[tuple[Tensor, Tensor, int, int]] = deque()  # state after snap_base + k chars
        self.snap_base = 0
        self.last_char_at = 0.0

    def delivered(self) -> int:
        return self.emitted if self.req.auto_ack else min(self.handle.acked, self.emitted)


def find_step_min_rows(model: LoadedModel, max_batch: int) -> int | None:
    """The smallest batch size from which a row's `step` output is bit-identical at every size up
    to ``max_batch`` and wherever the row sits; None when even that does not hold.

    Which sizes share a kernel depends on the CPU and the BLAS build: on AMD EPYC (AVX2) every
    size >= 4 agrees, on an Intel Xeon with AVX-512 only sizes >= 16 do. So it is measured on the
    machine and thread count that serve, not assumed: one step at each size from ``max_batch``
    down to the first that differs (100-200 ms for the 3x256 model at 64 rows).
    """
    m = model.module
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        h = torch.randn(model.layers, max_batch, model.hidden, generator=gen) * 0.5
        c = torch.randn(model.layers, max_batch, model.hidden, generator=gen)
        tokens = torch.randint(0, len(model.vocab), (max_batch,), generator=gen)
        reference = m.step(tokens, h, c)

        def same(rows: slice, out: tuple[Tensor, Tensor, Tensor], at: slice) -> bool:
            return bool(
                torch.equal(out[0][at], reference[0][rows])
                and torch.equal(out[1][:, at], reference[1][:, rows])
                and torch.equal(out[2][:, at], reference[2][:, rows])
            )

        # the same rows, rotated by one: a row's numbers must not depend on its position
        shift = torch.cat([torch.arange(1, max_batch), torch.arange(1)])
        rotated = m.step(tokens[shift], h[:, shift].contiguous(), c[:, shift].contiguous())
        if max_batch > 1 and not same(slice(1, max_batch), rotated, slice(0, max_batch - 1)):
            return None
        smallest = max_batch
        for rows in range(max_batch - 1, 0, -1):
            out = m.step(tokens[:rows], h[:, :rows].contiguous(), c[:, :rows].contiguous())
            if not same(slice(0, rows), out, slice(0, rows)):
                break
            smallest = rows
        return smallest


def gather_runs(rows: list[_Row]) -> tuple[list[Tensor], list[Tensor], list[tuple[int, int, int]]]:
    """The rows' state as source tensors and runs (source, start, end) of rows that sit side by side
    in the same source (rows that stepped together last tick): `gather` in the scripted call
    slices and joins them, one slice per run, not one per row.

    When a stream joins or leaves, the others still sit in last tick's output in order, so the
    new batch is a few slices instead of 2 x 64 one-row slices. Only Python here: any torch op on
    the engine's thread gives up the GIL (see `StepSampler`).
    """
    sources_h: list[Tensor] = []
    sources_c: list[Tensor] = []
    numbers: dict[int, int] = {}  # id(h source) -> its index in sources
    runs: list[tuple[int, int, int]] = []
    for row in rows:
        k = numbers.get(id(row.h_src))
        if k is None:
            k = numbers[id(row.h_src)] = len(sources_h)
            sources_h.append(row.h_src)
            sources_c.append(row.c_src)
        if runs and runs[-1][0] == k and runs[-1][2] == row.idx:
            runs[-1] = (k, runs[-1][1], row.idx + 1)
        else:
            runs.append((k, row.idx, row.idx + 1))
    return sources_h, sources_c, runs


class Engine:
    def __init__(
        self,
        model: LoadedModel,
        metrics: Metrics,
        *,
        max_streams: int = 64,
        max_queue: int = 64,
        max_batch: int = 64,
        step_min_rows: int | None = None,  # None: measured at start-up (`find_step_min_rows`)
        prefill_chunk: int = 64,
        step_prefill_chars: int = 32,
        decode_steps: int = 8,
        stream_window: int = 128,
        flush_interval_s: float = 0.02,
        torch_threads: int = 1,
    ) -> None:
        self.model = model
        self.metrics = metrics
        self.max_streams = max_streams
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.step_min_rows = step_min_rows
        self.prefill_chunk = prefill_chunk
        self.step_prefill_chars = step_prefill_chars
        self.decode_steps = decode_steps
        self.stream_window = stream_window
        self.flush_interval_s = flush_interval_s
        self._flushed_at = 0.0
        self.torch_threads = torch_threads
        self.batch_invariant: bool | None = None
        self._inbox: deque[tuple[StreamHandle, GenerationRequest]] = deque()
        self._wake = threading.Event()
        self._padding_chosen = threading.Event()
        self._pad_to = 1  # rows a reproducible step is padded to: `step_min_rows` once chosen
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._open: set[StreamHandle] = set()  # submitted and not yet finished; touched only on the event loop
        self._inbox_lock = threading.Lock()  # submit() against the engine thread's last look at the inbox
        self._inbox_closed = False
        self.failure: str | None = None  # why the engine thread died, if it did
        # engine-thread state
        self._rows: list[_Row] = []
        self._prefilling: deque[_Row] = deque()
        self._events: list[tuple[StreamHandle, str | Finished]] = []  # in order, per row
        self._outboxes: dict[_Row, None] = {}  # running rows with text in their outbox, in order
        self._urgent = False  # a row's first text or a finished row waits: hand over now
        self._counts_shown = (-1, -1)  # (rows, queued) last written to the gauges
        self._rotate = 0
        self._last_batch: list[_Row] = []
        self._last_h: Tensor | None = None
        self._last_c: Tensor | None = None
        self._last_params: BatchParams | None = None
        self._pad_cache: dict[int, tuple[Tensor, Tensor]] = {}
        self._step_sampler = step_sampler(model.module)
        self._fresh = model.module.init_state(1)  # (h, c) of a row with no text yet

    # ---- event-loop side -------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="chargen-engine", daemon=True)
        self._thread.start()
        self._padding_chosen.wait()  # measured on the engine's thread, with its thread count

    def _choose_padding(self) -> None:
        """Pad reproducible steps to the smallest batch size from which every size agrees bit for
        bit, as measured for this model on this machine (unless ``step_min_rows`` was given)."""
        try:
            top = max(self.max_batch, self.step_min_rows or 1)
            smallest = find_step_min_rows(self.model, top)
        except Exception:
            log.exception("measuring the model's batch invariance failed")
            smallest = None
        if self.step_min_rows is None:
            self.step_min_rows = smallest or 1  # no size helps when a row's position matters
        self._pad_to = self.step_min_rows
        self.batch_invariant = smallest is not None and smallest <= self.step_min_rows
        if self.batch_invariant:
            log.info(
                "steps with a seeded or greedy row are padded to %d rows (batch sizes %d-%d give "
                "bit-identical rows on this machine)",
                self.step_min_rows,
                smallest,
                top,
            )
        else:
            log.warning(
                "batched steps are not bit-identical at every batch size from %d rows on this machine "
                "(they are from %s): seeded output may differ in rare near-ties depending on concurrent streams",
                self.step_min_rows,
                smallest,
            )

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping and self.failure is None

    @property
    def in_flight(self) -> int:
        return len(self._open)

    def wake(self) -> None:
        self._wake.set()

    def submit(self, req: GenerationRequest) -> StreamHandle:
        """Queue a generation; raises EngineFull past max_streams + max_queue (call on the loop)."""
        if not self.alive:
            raise EngineStopped(self.failure or "the engine is not running")
        if len(self._open) >= self.max_streams + self.max_queue:
            raise EngineFull(
                f"{len(self._open)} generations running or queued (limit "
                f"{self.max_streams} running + {self.max_queue} queued)"
            )
        handle = StreamHandle(self)
        with self._inbox_lock:  # else the thread could take its last look at the inbox before this lands
            if self._inbox_closed:
                raise EngineStopped(self.failure or "the engine is not running")
            self._inbox.append((handle, req))
        self._open.add(handle)
        self.metrics.queue_length.set(len(self._inbox))
        self._wake.set()
        return handle

    def stop(self, timeout: float = 10.0) -> None:
        """Finish every row as cancelled (saving what was sent) and join the thread."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _deliver(self, events: list[tuple[StreamHandle, str | Finished]]) -> None:
        for handle, item in events:
            if isinstance(item, str):
                handle.text.put_nowait(item)
            else:
                self._open.discard(handle)
                handle._finish(item)

    def _fail_open(self, message: str) -> None:
        """The engine thread died: end every generation it had, on the loop (nothing is saved)."""
        for handle in list(self._open):
            handle._finish(Finished("engine_stopped", 0, 0, None, message))
        self._open.clear()

    # ---- engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            torch.set_num_threads(self.torch_threads)  # intra-op threads are per calling thread in OpenMP
            try:
                self._choose_padding()
            finally:
                self._padding_chosen.set()
            with torch.inference_mode():
                self._serve()
                self._shut_down()
        except BaseException as err:  # anything outside a tick's own guard: the engine is gone
            log.exception("the engine thread died; failing every open generation")
            self._died(f"the model engine stopped ({type(err).__name__}: {err})")

    def _serve(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                worked = self._tick()
            except Exception:  # a bug or a broken model fails its rows, not the thread
                log.exception("engine tick failed; failing its rows")
                for row in list(self._rows):
                    self._finish(row, "error", row.delivered(), error="internal error in the engine")
                self._prefilling.clear()
                self._last_batch = []
                worked = True
            # Each hand-over costs the event loop (and every client) one event per stream, and
            # the loop competes with this thread for the GIL and the other core: handing over
            # every 5 ms tick at 64 streams held the engine to ~0.45 x its step's speed, every
            # 25 ms to ~0.75 x. New streams' first text and finished rows go out at once.
            if not worked or self._urgent or time.perf_counter() - self._flushed_at >= self.flush_interval_s:
                self._flush()
            if not worked and not self._stopping:
                self._wake.wait(1.0)  # submit, ack, cancel and stop set it

    def _shut_down(self) -> None:
        for row in list(self._rows):
            self._finish(row, "cancelled", row.delivered(), error="the service is shutting down")
        with self._inbox_lock:  # from here on submit() refuses
            self._inbox_closed = True
        while self._inbox:
            handle, _ = self._inbox.popleft()
            self._events.append((handle, Finished("cancelled", 0, 0, None, "the service is shutting down")))
        self._flush()

    def _died(self, message: str) -> None:
        """Refuse new work and have the loop end every open generation (their leases go with them)."""
        self.failure = message
        with self._inbox_lock:
            self._inbox_closed = True
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed under us at shutdown
                loop.call_soon_threadsafe(self._fail_open, message)

    def _tick(self) -> bool:
        started = time.perf_counter()
        self._admit()
        self._reap_cancelled()
        worked = False
        if self._prefilling:
            self._prefill_chunk()
            worked = True
        window = self.stream_window
        # rows reading a long prompt are not ready; rows too far ahead of their client wait
        ready = [
            r
            for r in self._rows
            if r.feeding_in_steps or (r.decoding and (r.req.auto_ack or r.emitted - r.handle.acked < window))
        ]
        if ready:
            self._decode(ready)
            worked = True
        if worked:
            self.metrics.tick_seconds.observe(time.perf_counter() - started)
        counts = (len(self._rows), len(self._inbox))
        if counts != self._counts_shown:  # gauges only when they change: a lone stream's tick is ~0.4 ms
            self._counts_shown = counts
            self.metrics.streams_running.set(counts[0])
            self.metrics.queue_length.set(counts[1])
        return worked

    def _admit(self) -> None:
        model = self.model
        while self._inbox and len(self._rows) < self.max_streams:
            handle, req = self._inbox.popleft()
            state = req.state
            if state is not None:  # [L, H] -> [L, 1, H] views: no torch op (see `StepSampler`)
                h = torch.from_numpy(np.ascontiguousarray(state.h).reshape(model.layers, 1, model.hidden))
                c = torch.from_numpy(np.ascontiguousarray(state.c).reshape(model.layers, 1, model.hidden))
                pending, consumed = state.pending, state.chars_consumed
            else:
                h, c = self._fresh  # shared: steps never write into their inputs
                pending, consumed = -1, 0
            feed = ([pending] if pending >= 0 else []) + req.prompt_ids
            if not feed and req.max_new_chars == 0:  # nothing to read, nothing to write: unchanged
                blob = self._encode(h, c, 0, pending, consumed) if req.want_state else None
                self._events.append((handle, Finished("length", 0, consumed, blob)))
                continue
            if not feed:  # no text at all: start from a newline, as `chargen sample` does
                feed = [model.start_id]
            row = _Row(handle, req, h, c, feed[-1], feed[:-1], consumed + len(req.prompt_ids))
            self._rows.append(row)
            self._route_prompt(row)

    def _route_prompt(self, row: _Row) -> None:
        """Send a row to whichever path feeds the rest of its prompt (a function of its length only)."""
        left = len(row.to_prefill) - row.fed
        if left > self.step_prefill_chars:
            self._prefilling.append(row)  # `forward` in chunks, one row at a time
        elif left > 0:
            row.feeding_in_steps = True  # one character per tick, inside the batched step
        else:
            self._ready(row)

    def _ready(self, row: _Row) -> None:
        """The prompt is fed: record snapshot 0, or finish at once when nothing is to be generated."""
        row.decoding = True
        row.feeding_in_steps = False
        row.snaps.append((row.h_src, row.c_src, row.idx, row.pending))
        row.last_char_at = time.perf_counter()
        if row.max_new == 0:
            self._finish(row, "length", 0)

    def _reap_cancelled(self) -> None:
        for row in [r for r in self._rows if r.handle.cancelled]:
            if not row.decoding:  # the prompt is not fed yet: leave the session as it was
                with contextlib.suppress(ValueError):
                    self._prefilling.remove(row)
                self._finish(row, "cancelled", 0, state_override=False)
            else:
                self._finish(row, "cancelled", row.delivered())

    def _prefill_chunk(self) -> None:
        row = self._prefilling[0]
        chunk = row.to_prefill[row.fed : row.fed + self.prefill_chunk]
        # one row at a time: its numbers never depend on other streams (see module docstring)
        row.h_src, row.c_src = self._step_sampler.prefill(torch.tensor([chunk]), row.h_src, row.c_src, row.idx)
        row.idx = 0
        row.fed += len(chunk)
        self._prefilling.popleft()
        self._route_prompt(row)  # round-robin with the other long prompts, or on to the steps

    def _padding(self, rows: int) -> tuple[Tensor, Tensor]:
        if rows not in self._pad_cache:
            self._pad_cache[rows] = self.model.module.init_state(rows)
        return self._pad_cache[rows]

    def _steps_for(self, batch: list[_Row], feeding: list[bool]) -> int:
        """Characters each row takes this tick: ``decode_steps`` for a batch of up to
        ``MULTI_STEP_ROWS`` rows while nobody waits (no new request, no prompt being read, no row
        before its first character; the caller checks that no row is left out of the batch), so
        that the engine's Python runs once per that many characters (it is a tenth of a lone
        stream's tick); otherwise one."""
        steps = self.decode_steps
        if steps == 1 or len(batch) > MULTI_STEP_ROWS or self._inbox or self._prefilling or any(feeding):
            return 1
        for row in batch:
            if not row.generated:  # its first character goes out after one step, not after `steps`
                return 1
            steps = min(steps, row.max_new - row.generated)
            if not row.req.auto_ack:  # never past the client's window
                steps = min(steps, self.stream_window - (row.emitted - row.handle.acked))
        return max(steps, 1)

    def _decode(self, ready: list[_Row]) -> None:
        left_out = len(ready) > self.max_batch
        if left_out:  # more rows than one step takes: rotate who goes first
            start = self._rotate % len(ready)
            ready = (ready[start:] + ready[:start])[: self.max_batch]
            self._rotate += self.max_batch
        batch = ready
        n = len(batch)
        feeding = [r.feeding_in_steps for r in batch]
        exact = any(r.reproducible for r in batch)
        pad = max(0, self._pad_to - n) if exact else 0
        steps = 1 if left_out else self._steps_for(batch, feeding)  # rows waiting for a turn: one each
        if batch == self._last_batch and self._last_h is not None:
            # steady state: last tick's output (padding included) is this tick's input
            sources_h, sources_c = [self._last_h], [self._last_c]
            runs = [(0, 0, self._last_h.shape[1])]
            params = self._last_params
        else:
            sources_h, sources_c, runs = gather_runs(batch)
            if pad:
                ph, pc = self._padding(pad)
                runs.append((len(sources_h), 0, pad))
                sources_h.append(ph)
                sources_c.append(pc)
            params = BatchParams.of([r.params for r in batch], len(self.model.vocab))
        feed = [r.to_prefill[r.fed] if r.feeding_in_steps else r.pending for r in batch] + [0] * pad
        tokens = torch.from_numpy(np.array(feed, dtype=np.int64))  # a third of torch.tensor(list)'s cost
        assert params is not None
        # one draw per sampled character from each row's own PRNG, in order; rows still feeding draw none
        if steps == 1 and not exact and n <= SMALL_BATCH:  # a few unseeded rows: plain Python beats ~10 torch ops
            uniforms = [0.0 if f else r.rng.random() for f, r in zip(feeding, batch, strict=True)]
            logits, h2, c2 = self._step_sampler.step(tokens, sources_h, sources_c, runs)
            rows = logits.tolist()
            picks = [[-1 if feeding[i] else sample_row(rows[i], r.params, uniforms[i]) for i, r in enumerate(batch)]]
            states_h, states_c = [h2], [c2]
        else:  # the steps and the sampling in one scripted call: the GIL is given up once
            u = [
                [0.0 if f or r.greedy else r.rng.random() for f, r in zip(feeding, batch, strict=True)]
                for _ in range(steps)
            ]
            picked, states_h, states_c = self._step_sampler(
                tokens, sources_h, sources_c, runs, params, torch.tensor(u, dtype=torch.float64), n
            )
            picks = picked.tolist()
        self._last_batch, self._last_h, self._last_c, self._last_params = batch, states_h[-1], states_c[-1], params

        now = time.perf_counter()
        vocab = self.model.vocab
        observe_gap = self.metrics.time_between_chars.observe
        sampled = 0
        for h2, c2, choices in zip(states_h, states_c, picks, strict=True):
            for i, row in enumerate(batch):
                if feeding[i]:  # one more prompt character read; its pending (last) character stays
                    row.h_src, row.c_src, row.idx = h2, c2, i
                    row.fed += 1
                    if row.fed == len(row.to_prefill):
                        self._ready(row)
                    continue
                if row.finished:  # a stop string ended it earlier in this tick: the rest is unused
                    continue
                sampled += 1
                choice = choices[i]
                row.h_src, row.c_src, row.idx, row.pending = h2, c2, i, choice
                row.snaps.append((h2, c2, i, choice))
                row.generated += 1
                if row.generated > 1:
                    observe_gap(now - row.last_char_at)  # 0 for all but the first of a tick's characters
                row.last_char_at = now
                if row.stop or row.generated >= row.max_new or not row.emitted:
                    self._take_char(row, vocab[choice])
                else:  # the common case, inline: one more character for the outbox
                    row.emitted += 1
                    row.outbox += vocab[choice]
                    self._outboxes[row] = None
            self.metrics.batch_size.observe(n)
        self.metrics.chars_generated.inc(sampled)

    def _take_char(self, row: _Row, ch: str) -> None:
        """Stop strings: hold back text that may start one; a completed one ends the row, unreturned."""
        if not row.stop:
            self._emit(row, ch)
        else:
            held = row.held + ch
            for stop in row.stop:
                if held.endswith(stop):
                    self._emit(row, held[: len(held) - len(stop)])
                    row.held = ""
                    self._finish(row, "stop", row.generated - len(stop))
                    return
            cut = len(held)
            for j in range(len(held)):
                tail = held[j:]
                if any(s.startswith(tail) for s in row.stop):
                    cut = j
                    break
            self._emit(row, held[:cut])
            row.held = held[cut:]
        if row.generated >= row.max_new:
            self._emit(row, row.held)
            row.held = ""
            self._finish(row, "length", row.generated)

    def _emit(self, row: _Row, text: str) -> None:
        if text:
            if not row.emitted:
                self._urgent = True  # time to first character: do not wait for the interval
            row.emitted += len(text)
            row.outbox += text
            self._outboxes[row] = None

    def _encode(self, h: Tensor, c: Tensor, idx: int, pending: int, consumed: int) -> bytes:
        # numpy views, not tensor slices: a torch op here would give up the GIL (see `StepSampler`)
        state = SessionState(h=h.numpy()[:, idx], c=c.numpy()[:, idx], pending=pending, chars_consumed=consumed)
        return encode_state(state, self.model.fingerprint)

    def _finish(
        self, row: _Row, reason: str, returned: int, error: str | None = None, state_override: bool = True
    ) -> None:
        blob = None
        if row.req.want_state and state_override and row.snaps:
            h, c, idx, pending = row.snaps[returned - row.snap_base]
            blob = self._encode(h, c, idx, pending, row.consumed_base + returned)
        consumed = row.consumed_base + returned if state_override else row.consumed_base - len(row.req.prompt_ids)
        if row.outbox:
            self._events.append((row.handle, row.outbox))
            row.outbox = ""
        self._outboxes.pop(row, None)
        self._events.append((row.handle, Finished(reason, returned, consumed, blob, error)))
        self._urgent = True
        row.finished = True
        self._rows.remove(row)
        if row in self._last_batch:
            self._last_batch = []  # the next batch differs: gather afresh

    def _flush(self) -> None:
        """Hand every row's new text (one piece per row) and every finished row to the event loop."""
        self._flushed_at = time.perf_counter()
        self._urgent = False
        for row in self._outboxes:
            self._events.append((row.handle, row.outbox))
            row.outbox = ""
        self._outboxes.clear()
        for row in self._rows:  # drop snapshots before what the client has been sent
            keep_from = row.delivered()
            while row.snap_base < keep_from and len(row.snaps) > 1:
                row.snaps.popleft()
                row.snap_base += 1
        if not self._events:
            return
        events, self._events = self._events, []
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed under us at shutdown
                loop.call_soon_threadsafe(self._deliver, events)
