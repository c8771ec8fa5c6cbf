"""Which rows the engine runs: admitting requests, the path each prompt takes, and which rows are
ready for this tick's step.

Which path reads which character of a prompt depends only on the prompt's length and the
settings, never on the other streams: a long one is fed with `forward` in chunks, one row at a
time and round-robin with the other long ones (so a long prompt never stalls the others for more
than one chunk); its last ``step_prefill_chars`` characters, like all of a short one, ride in the
batched steps, one character per tick, so a burst of new streams reads its prompts together.
"""

from __future__ import annotations

import contextlib
from collections import deque

import numpy as np
import torch

from service.artifact import LoadedModel
from service.engine.config import EngineConfig
from service.engine.outputs import Outputs
from service.engine.requests import Finished, Inbox
from service.engine.row import DECODE, PREFILL, STEP_FEED, Row
from service.engine.step import Stepper


class Scheduler:
    def __init__(
        self, model: LoadedModel, config: EngineConfig, inbox: Inbox, stepper: Stepper, outputs: Outputs
    ) -> None:
        self.model = model
        self.inbox = inbox
        self.stepper = stepper
        self.outputs = outputs
        self.max_streams = config.max_streams
        self.prefill_chunk = config.prefill_chunk
        self.step_prefill_chars = config.step_prefill_chars
        self.stream_window = config.stream_window
        self.rows: list[Row] = []
        self.prefilling: deque[Row] = deque()  # rows reading a long prompt with `forward`, in turn
        self._fresh = model.module.init_state(1)  # (h, c) of a row with no text yet

    def admit(self) -> None:
        """Waiting requests become rows, up to ``max_streams`` (counting the choices a row will fork)."""
        model, waiting = self.model, self.inbox.waiting
        if not waiting:
            return
        taken = self.taken()
        while waiting and (not self.rows or taken + waiting[0][1].n <= self.max_streams):
            handle, req = waiting.popleft()
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
                blob = self.outputs.encode(h, c, 0, pending, consumed) if req.want_state else None
                self.outputs.answer(handle, Finished("length", 0, consumed, blob))
                for sibling in handle.siblings:  # n > 1: every choice is the same empty text
                    self.outputs.answer(sibling, Finished("length", 0, consumed, None))
                continue
            if not feed:  # no text at all: start from a newline, as `chargen sample` does
                feed = [model.start_id]
            row = Row(handle, req, h, c, feed[-1], feed[:-1], consumed + len(req.prompt_ids), len(model.vocab))
            if req.score_prompt and state is None and req.prompt_ids:
                handle.prompt_logprobs.append(None)  # the first character has nothing before it
            self.rows.append(row)
            taken += req.n
            self._route(row)

    def taken(self) -> int:
        """Rows running, and rows their prompts will fork into (n > 1)."""
        return len(self.rows) + sum(len(r.forks) for r in self.rows)

    def _route(self, row: Row) -> None:
        """Send a row to whichever path feeds the rest of its prompt (a function of its length and
        the request only): a prompt to score is read with `forward`, which gives its logits."""
        left = len(row.to_feed) - row.fed
        if left > self.step_prefill_chars or (left and row.score_prompt):
            row.phase = PREFILL
            self.prefilling.append(row)  # `forward` in chunks, one row at a time
        elif left > 0:
            row.phase = STEP_FEED  # one character per tick, inside the batched step
        else:
            self.outputs.prompt_read(row)

    def prefill_one(self) -> None:
        """One chunk of the first long prompt in line; the row then goes to the back, or on."""
        row = self.prefilling.popleft()
        self.stepper.prefill(row, row.to_feed[row.fed : row.fed + self.prefill_chunk])
        self._route(row)

    def reap_cancelled(self) -> None:
        for row in [r for r in self.rows if r.handle.cancelled]:
            if row.phase is not DECODE:  # the prompt is not read yet: leave the session as it was
                with contextlib.suppress(ValueError):
                    self.prefilling.remove(row)
                self.outputs.finish(row, "cancelled", 0, unread=True)
            else:
                self.outputs.finish(row, "cancelled", row.sent())

    def ready(self) -> list[Row]:
        """Rows for this tick's step: those reading their prompt in steps, and decoding rows not
        too far ahead of their client (rows reading a long prompt are not ready)."""
        window = self.stream_window
        return [
            r
            for r in self.rows
            if r.phase is STEP_FEED
            or (r.phase is DECODE and (r.auto_ack or r.sampled - len(r.stops.held) - r.handle.acked < window))
        ]

    def join(self, row: Row) -> None:
        """A choice forked from a row whose prompt was read (outputs.py)."""
        self.rows.append(row)

    def remove(self, row: Row) -> None:
        self.rows.remove(row)

    def clear(self) -> None:
        """After a failed tick: every row was finished."""
        self.rows.clear()
        self.prefilling.clear()
