"""Building the batch of one tick: which rows step together, how many characters they take, and
the inputs of the one scripted call (their state as slices of earlier tensors, the padding)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from service.artifact import LoadedModel
from service.engine.config import EngineConfig
from service.engine.logprobs import batch_top_n
from service.engine.requests import Score
from service.engine.row import STEP_FEED, Row
from service.sampling import BatchParams

Runs = list[tuple[int, int, int]]  # (source, start, end): rows start..end of sources[source]
STEP_TIME_WEIGHT = 0.2  # a new tick's weight in the running average of a batch size's step time


def gather_runs(rows: list[Row]) -> tuple[list[Tensor], list[Tensor], Runs]:
    """The rows' state as source tensors and runs of rows that sit side by side in the same source
    (rows that stepped together last tick): the scripted call slices and joins them, one slice per
    run, not one per row. When a stream joins or leaves, the others still sit in last tick's output
    in order, so the new batch is a few slices instead of 2 x 64 one-row slices. Only Python here:
    any torch op on the engine's thread gives up the GIL (see `StepSampler`)."""
    sources_h: list[Tensor] = []
    sources_c: list[Tensor] = []
    numbers: dict[int, int] = {}  # id(h source) -> its index in sources
    runs: Runs = []
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


@dataclass
class Batch:
    rows: list[Row]
    feeding: list[bool]  # per row: it reads a prompt character this step and samples none
    steps: int  # characters each row takes this tick (one scripted call runs them all)
    exact: bool  # it carries a reproducible row, so it is padded to the measured size
    tokens: Tensor  # int64 [rows + padding]: each row's character to feed
    sources_h: list[Tensor]
    sources_c: list[Tensor]
    runs: Runs
    params: BatchParams
    top_n: int  # alternatives its step reports with each pick's log-probability; -1: none (logprobs.py)
    penalized: bool  # a row's adjustment changes with each pick: params anew every tick, one step each
    scores: list[list[Score]] | None = None  # per step, per row: filled by the step when top_n >= 0


class BatchBuilder:
    """Up to ``max_batch`` ready rows per step, rotating who goes first when more are ready.

    While nobody waits (no request to admit, no prompt being read, no row before its first
    character or penalized, none left out of the batch) a batch takes up to ``decode_steps``
    characters per tick, as many as fit in ``multi_step_ms`` at the step time measured for its
    size (`timed`): the engine's Python, and the GIL's hand-back after the call, then come once per
    that many characters, while a newcomer waits at most about that long to join. Every step is
    the same call at the same batch size and each row draws its numbers in order, so the text is
    the same as one character per tick.
    """

    def __init__(self, model: LoadedModel, config: EngineConfig) -> None:
        self.model = model
        self.max_batch = config.max_batch
        self.decode_steps = config.decode_steps
        self.multi_step_s = config.multi_step_ms / 1000
        self.step_seconds: dict[int, float] = {}  # batch size (padding included) -> seconds per step, averaged
        self.stream_window = config.stream_window
        self.pad_to = 1  # rows a reproducible step is padded to: the measured step_min_rows
        self._rotate = 0
        self._last_rows: list[Row] = []  # the rows of the last step, whose output is in _last_h/_c
        self._last_h: Tensor | None = None
        self._last_c: Tensor | None = None
        self._last: Batch | None = None  # the last step's batch (its params, top_n, penalized)
        self._padding: dict[int, tuple[Tensor, Tensor]] = {}

    def build(self, ready: list[Row], quiet: bool) -> Batch:
        """This tick's batch; ``quiet``: no request waits to be admitted and no prompt is being read."""
        left_out = len(ready) > self.max_batch
        if left_out:  # more rows than one step takes: rotate who goes first
            start = self._rotate % len(ready)
            ready = (ready[start:] + ready[:start])[: self.max_batch]
            self._rotate += self.max_batch
        rows = ready
        feeding = [r.phase is STEP_FEED for r in rows]
        exact = any(r.reproducible for r in rows)
        pad = max(0, self.pad_to - len(rows)) if exact else 0
        last, last_h, last_c = self._last, self._last_h, self._last_c
        if rows == self._last_rows and last is not None and last_h is not None and last_c is not None:
            # steady state: last tick's output (padding included) is this tick's input
            sources_h, sources_c, runs = [last_h], [last_c], [(0, 0, last_h.shape[1])]
            params, top_n, penalized = last.params, last.top_n, last.penalized
        else:
            sources_h, sources_c, runs = gather_runs(rows)
            if pad:
                ph, pc = self._padding_rows(pad)
                runs.append((len(sources_h), 0, pad))
                sources_h.append(ph)
                sources_c.append(pc)
            params, top_n, penalized = None, batch_top_n(rows), any(r.penalized for r in rows)
        if params is None or penalized:
            params = BatchParams.of([r.params for r in rows], len(self.model.vocab), [r.adjust for r in rows])
        # rows waiting for a turn: one character each, or they would wait `steps` steps per character
        steps = self._steps_for(rows, feeding, len(rows) + pad) if quiet and not left_out and not penalized else 1
        feed = [r.to_feed[r.fed] if f else r.pending for r, f in zip(rows, feeding, strict=True)] + [0] * pad
        tokens = torch.from_numpy(np.array(feed, dtype=np.int64))  # a third of torch.tensor(list)'s cost
        return Batch(rows, feeding, steps, exact, tokens, sources_h, sources_c, runs, params, top_n, penalized)

    def stepped(self, batch: Batch, h: Tensor, c: Tensor) -> None:
        """The batch ran; (h, c) is its last step's output, the next tick's input if it is the same."""
        self._last_rows, self._last_h, self._last_c, self._last = batch.rows, h, c, batch

    def timed(self, batch: Batch, seconds: float) -> None:
        """The batch's call took ``seconds``: the step time of its size, averaged over recent ticks."""
        size, per_step = batch.tokens.shape[0], seconds / batch.steps
        last = self.step_seconds.get(size)
        self.step_seconds[size] = per_step if last is None else last + STEP_TIME_WEIGHT * (per_step - last)

    def forget(self, row: Row | None = None) -> None:
        """A row of the last step left (or, with None, anything may have changed): gather afresh."""
        if row is None or row in self._last_rows:
            self._last_rows = []

    def _steps_for(self, rows: list[Row], feeding: list[bool], size: int) -> int:
        per_step = self.step_seconds.get(size)
        if per_step is None or self.decode_steps == 1 or any(feeding):  # an unmeasured size: one step, timed
            return 1
        steps = min(self.decode_steps, int(self.multi_step_s / per_step))
        for row in rows:
            if not row.sampled:  # its first character goes out after one step, not after `steps`
                return 1
            steps = min(steps, row.max_new - row.sampled)
            if not row.auto_ack:  # never past the client's window
                steps = min(steps, self.stream_window - (row.released - row.handle.acked))
        return max(steps, 1)

    def _padding_rows(self, rows: int) -> tuple[Tensor, Tensor]:
        if rows not in self._padding:
            self._padding[rows] = self.model.module.init_state(rows)
        return self._padding[rows]
