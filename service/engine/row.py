"""One generation inside the engine thread, and where it stands."""

from __future__ import annotations

import dataclasses

from torch import Tensor

from service.engine.requests import GenerationRequest, StreamHandle
from service.engine.snapshots import Snapshots
from service.engine.stops import StopMatcher
from service.sampling import Adjustment

# A row's phase: reading a long prompt with `forward`, reading the rest of its prompt one character
# per batched step, generating, or gone from the engine.
PREFILL = "prefill"
STEP_FEED = "step-feed"
DECODE = "decode"
DONE = "done"


class Row:
    """One generation in the engine thread.

    Progress is one count, ``sampled``: the characters generated so far. Every other mark is a
    position in that text, and never passes the one after it::

        0 <= sent() <= released <= sampled

    - ``released`` = ``sampled`` less what the stop strings hold back (a tail that may be the start
      of one): the text that may go to the client;
    - ``sent()``: what the client has been sent (a stream acks what it sent; a JSON request counts
      everything released);
    - a row finishes *at* a position: its text up to there is returned and its state there is
      saved (``snapshots`` keeps the state after each position from ``sent()`` on).

    The prompt has its own count, ``fed``: the characters of ``to_feed`` already read. The row's
    current state is ``h_src[:, idx]``, ``c_src[:, idx]`` and the character ``pending`` (see
    snapshots.State): slices of the tensors its last step wrote, which is what the next batch
    gathers.
    """

    __slots__ = (
        "adjust",
        "auto_ack",
        "c_src",
        "fed",
        "forks",
        "greedy",
        "h_src",
        "handle",
        "has_stops",
        "idx",
        "last_char_at",
        "logprobs",
        "max_new",
        "outbox",
        "params",
        "penalized",
        "pending",
        "phase",
        "reproducible",
        "req",
        "rng",
        "sampled",
        "score_prompt",
        "session_chars",
        "snapshots",
        "stops",
        "to_feed",
    )

    def __init__(
        self,
        handle: StreamHandle,
        req: GenerationRequest,
        h: Tensor,
        c: Tensor,
        pending: int,
        to_feed: list[int],
        session_chars: int,
        vocab_size: int,
    ) -> None:
        self.handle = handle
        self.req = req
        self.params = p = req.params
        self.rng = p.rng()
        # its text must not depend on the batch, so its steps are padded (see calibration.py)
        self.reproducible = p.seed is not None or p.greedy or p.top_k == 1
        self.greedy = p.greedy
        self.adjust = Adjustment(p, vocab_size) if p.adjusted else None  # logit_bias and penalties
        self.penalized = p.penalized  # its adjustment changes with each character
        self.logprobs = -1 if req.logprobs is None else req.logprobs  # alternatives it reports (-1: none)
        self.score_prompt = req.score_prompt
        self.forks = handle.siblings  # the other choices: rows of their own once the prompt is read
        self.max_new = req.max_new_chars
        self.auto_ack = req.auto_ack
        self.h_src, self.c_src, self.idx, self.pending = h, c, 0, pending
        self.to_feed = to_feed  # the prompt before its last character (which is `pending`)
        self.fed = 0
        self.session_chars = session_chars  # the session's text length once the prompt is read
        self.phase = PREFILL
        self.sampled = 0
        self.stops = StopMatcher(req.stop)
        self.has_stops = bool(req.stop)
        self.outbox = ""  # released text not yet handed to the event loop
        self.snapshots = Snapshots()
        self.last_char_at = 0.0

    @property
    def released(self) -> int:
        return self.sampled - len(self.stops.held)

    def sent(self) -> int:
        """Characters the client has been sent: where a row that is stopped early finishes."""
        return self.released if self.auto_ack else min(self.handle.acked, self.released)

    def fork(self, handle: StreamHandle, choice: int, vocab_size: int) -> Row:
        """Choice ``choice`` of this row's request, starting from this row's state (the prompt just
        read): a row of its own with its own stream of draws; the state's tensors are shared, never
        copied (steps never write into their inputs)."""
        req = dataclasses.replace(self.req, params=dataclasses.replace(self.params, choice=choice))
        row = Row(handle, req, self.h_src, self.c_src, self.pending, [], self.session_chars, vocab_size)
        row.idx = self.idx
        row.forks = []
        handle.prompt_logprobs = self.handle.prompt_logprobs  # the same prompt, read once
        return row

    def prompt_read(self, now: float) -> None:
        """The whole prompt is fed: generation starts from here (position 0)."""
        self.phase = DECODE
        self.snapshots.record(self.h_src, self.c_src, self.idx, self.pending)
        self.last_char_at = now
