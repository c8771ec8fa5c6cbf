"""What crosses between the event loop and the engine thread: a request, its handle, its result."""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from service.sampling import SamplingParams
from service.state_codec import SessionState

# A character's log-probability and the most likely characters' (id, log-probability), best first.
Score = tuple[float, list[tuple[int, float]]]


class EngineFull(RuntimeError):
    """Every row and every queue slot is taken."""


class EngineStopped(RuntimeError):
    """The engine is shutting down, or its thread died."""


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    max_new_chars: int
    params: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    state: SessionState | None = None  # None: start from the model's initial state
    auto_ack: bool = True  # True: not streamed; text counts as sent as soon as it is produced
    want_state: bool = False  # encode the final state (for sessions)
    n: int = 1  # choices: the prompt is read once, then its state is copied into n rows
    logprobs: int | None = None  # None: no log-probabilities; k: each character's and the top k
    score_prompt: bool = False  # also the prompt's log-probabilities (echo with logprobs)


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

    def __init__(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        self.text: asyncio.Queue[str | None] = asyncio.Queue()
        self.finished: asyncio.Future[Finished] = asyncio.get_running_loop().create_future()
        self.acked = 0  # characters the client was sent; written by the loop, read by the engine
        self.cancelled = False
        self.siblings: list[StreamHandle] = []  # the request's other choices (n > 1), in order
        # Appended by the engine thread before the text they describe is handed over (engine/logprobs.py)
        self.logprobs: list[Score] = []  # one per generated character
        self.prompt_logprobs: list[Score | None] = []  # one per prompt character (None: nothing before it)

    def ack(self, chars: int) -> None:
        self.acked += chars
        self._wake()

    def cancel(self) -> None:
        if not self.cancelled and not self.finished.done():
            self.cancelled = True
            self._wake()

    def _finish(self, result: Finished) -> None:
        self.text.put_nowait(None)
        if not self.finished.done():
            self.finished.set_result(result)


class Inbox:
    """Requests waiting for a row. The loop puts, the engine thread takes; once the thread has
    closed it (shutting down, or dead), a put is refused, so no request can land after the
    thread's last look and wait for ever."""

    def __init__(self) -> None:
        self.waiting: deque[tuple[StreamHandle, GenerationRequest]] = deque()
        self._lock = threading.Lock()  # only put() and close() take it: the thread's pops do not
        self._closed = False

    def __len__(self) -> int:
        return len(self.waiting)

    def put(self, handle: StreamHandle, req: GenerationRequest) -> bool:
        """Queue a request (on the loop); False once the inbox is closed."""
        with self._lock:
            if self._closed:
                return False
            self.waiting.append((handle, req))
            return True

    def close(self) -> list[tuple[StreamHandle, GenerationRequest]]:
        """Refuse further puts (on the engine thread); what was still waiting."""
        with self._lock:
            self._closed = True
            left = list(self.waiting)
            self.waiting.clear()
        return left
