"""What each row produces from a step: its characters, stop strings, text for its client, and
its result with the session state after exactly the text returned."""

from __future__ import annotations

import time
from collections.abc import Callable

from torch import Tensor

from service.artifact import LoadedModel
from service.engine.batch import Batch
from service.engine.handover import Handover
from service.engine.logprobs import keep
from service.engine.requests import Finished, Score, StreamHandle
from service.engine.row import DONE, Row
from service.metrics import ModelMetrics
from service.state_codec import SessionState, encode_state


class Outputs:
    """The per-row side of a step: every sampled character goes through `take`.

    ``leave`` removes a finished row from the engine's rows and batches; ``join`` adds a choice
    forked from a row whose prompt was read.
    """

    def __init__(
        self,
        model: LoadedModel,
        metrics: ModelMetrics,
        handover: Handover,
        leave: Callable[[Row], None],
        join: Callable[[Row], None] | None = None,
    ) -> None:
        self.model = model
        self.metrics = metrics
        self.handover = handover
        self.leave = leave
        self.join = join

    def take(self, batch: Batch, picks: list[list[int]], states_h: list[Tensor], states_c: list[Tensor]) -> None:
        """Walk a tick's steps row by row: a prompt character read, or one more character per step.

        Rows are independent within a tick, so each row takes all its steps before the next row.
        A row whose tick is plain (no stop strings, penalties or log-probabilities, neither its
        first character nor its last) takes them in one go: its state, counts and outbox are
        written once per tick rather than once per character (at 32 rows x 16 steps that was
        most of the engine's Python after the call).
        """
        now = time.perf_counter()
        vocab = self.model.vocab
        outboxes = self.handover.outboxes
        gaps = self.metrics.time_between_chars
        rows, feeding, steps = batch.rows, batch.feeding, len(picks)
        scored = batch.scores
        sampled = 0
        for i, row in enumerate(rows):
            if feeding[i]:
                for h2, c2 in zip(states_h, states_c, strict=True):
                    self._feed(row, h2, c2, i)
                continue
            plain = (
                not row.has_stops
                and not row.penalized
                and (scored is None or row.logprobs < 0)
                and row.sampled > 0
                and row.sampled + steps < row.max_new
            )
            if plain:  # the common case, inline: `steps` more characters for the outbox
                column = [step[i] for step in picks]
                row.snapshots.record_steps(states_h, states_c, i, column)
                row.h_src, row.c_src, row.idx, row.pending = states_h[-1], states_c[-1], i, column[-1]
                row.sampled += steps
                gaps.observe(now - row.last_char_at)
                gaps.observe_repeated(0.0, steps - 1)  # the rest of a tick's characters come with the first
                row.last_char_at = now
                row.outbox += "".join([vocab[ch] for ch in column])
                outboxes[row] = None
                sampled += steps
                continue
            for k in range(steps):
                if row.phase is DONE:  # a stop string ended it earlier in this tick: the rest is unused
                    break
                sampled += 1
                self._one(row, states_h[k], states_c[k], i, picks[k][i], scored[k][i] if scored else None, now)
        self.metrics.batch_size.observe_repeated(len(rows), steps)
        self.metrics.chars_generated.inc(sampled)

    def _feed(self, row: Row, h: Tensor, c: Tensor, idx: int) -> None:
        """One more prompt character read; its pending (last) character stays."""
        row.h_src, row.c_src, row.idx = h, c, idx
        row.fed += 1
        if row.fed == len(row.to_feed):
            self.prompt_read(row)

    def _one(self, row: Row, h: Tensor, c: Tensor, idx: int, choice: int, score: Score | None, now: float) -> None:
        """One more character of a row, with everything it may bring (stops, penalties, scores)."""
        row.h_src, row.c_src, row.idx, row.pending = h, c, idx, choice
        row.snapshots.record(h, c, idx, choice)
        row.sampled += 1
        if row.penalized:
            row.adjust.add(choice)  # type: ignore[union-attr]
        if score is not None and row.logprobs >= 0:
            keep(row, score)
        if row.sampled > 1:
            self.metrics.time_between_chars.observe(now - row.last_char_at)  # 0 for all but a tick's first
        row.last_char_at = now
        if row.has_stops or row.sampled >= row.max_new or row.sampled == 1:
            self._release(row, self.model.vocab[choice])
        else:
            row.outbox += self.model.vocab[choice]
            self.handover.outboxes[row] = None

    def prompt_read(self, row: Row) -> None:
        """The row's prompt is fed: it generates from here, or ends at once if asked for nothing."""
        now = time.perf_counter()
        row.prompt_read(now)
        forks, row.forks = row.forks, []
        for choice, handle in enumerate(forks, start=1):  # n > 1: the state read once, copied
            fork = row.fork(handle, choice, len(self.model.vocab))
            fork.prompt_read(now)
            assert self.join is not None
            self.join(fork)
            if fork.max_new == 0:
                self.finish(fork, "length", 0)
        if row.max_new == 0:
            self.finish(row, "length", 0)

    def _release(self, row: Row, ch: str) -> None:
        """The uncommon cases of one character: stop strings, the last one, a row's first text."""
        first = row.sampled - 1 == len(row.stops.held)  # nothing was released before this character
        text, stop = row.stops.push(ch)
        if stop is None and row.sampled >= row.max_new:
            text += row.stops.release()
        if text:
            if first:
                self.handover.urgent = True  # time to first character: do not wait for the interval
            self.handover.text(row, text)
        if stop is not None:  # the stop string is not returned, and the state is the one before it
            self.finish(row, "stop", row.sampled - len(stop))
        elif row.sampled >= row.max_new:
            self.finish(row, "length", row.sampled)

    def finish(self, row: Row, reason: str, at: int, error: str | None = None, unread: bool = False) -> None:
        """The row leaves the engine at position ``at`` of its text: that much is returned, and its
        session saved with the state there. ``unread``: it leaves before its prompt was read, and
        its session stays as it was."""
        req = row.req
        for handle in row.forks:  # choices not forked yet (n > 1): they end with it, with nothing
            self.answer(handle, Finished(reason, 0, 0, None, error))
        row.forks = []
        blob = None
        if unread:
            consumed = row.session_chars - len(req.prompt_ids)
        else:
            consumed = row.session_chars + at
            if req.want_state and row.snapshots:
                h, c, idx, pending = row.snapshots.at(at)
                blob = self.encode(h, c, idx, pending, consumed)
        self.handover.finished(row, row.handle, Finished(reason, at, consumed, blob, error))
        row.phase = DONE
        self.leave(row)

    def answer(self, handle: StreamHandle, result: Finished) -> None:
        """A request that ends without becoming a row."""
        self.handover.finished(None, handle, result)

    def encode(self, h: Tensor, c: Tensor, idx: int, pending: int, consumed: int) -> bytes:
        # numpy views, not tensor slices: a torch op here would give up the GIL (see `StepSampler`)
        state = SessionState(h=h.numpy()[:, idx], c=c.numpy()[:, idx], pending=pending, chars_consumed=consumed)
        return encode_state(state, self.model.fingerprint)
