"""One running generation on the event loop: its text as it comes, flow control, the lease kept
alive while it runs, and the save after exactly the text its client got.

The save runs in its own task (`finalize`), so it happens even when the client disconnects and
the response is torn down.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from service.engine import Finished, StreamHandle
from service.metrics import ModelMetrics
from service.problems import Problem, store_unavailable
from service.session_access import release_quietly
from service.settings import Settings
from service.state_store import SessionStore, StoreUnavailable

if TYPE_CHECKING:
    from service.generation import GenerationSpec
    from service.repository import ServedVersion

log = logging.getLogger("chargen.service")


@dataclass
class Outcome:
    finished: Finished
    problem: Problem | None  # the generation failed, or ran but its session could not be saved


@dataclass(eq=False)  # a job is itself, not its fields (jobs live in sets)
class Job:
    store: SessionStore
    settings: Settings
    metrics: ModelMetrics  # the series of the job's model
    spec: GenerationSpec
    handle: StreamHandle
    token: str | None  # the session's lease, if it has a session
    received_at: float  # perf_counter() when the request arrived (time to first character)
    version: ServedVersion | None = field(default=None, init=False)  # the model version it runs on
    _task: asyncio.Task[Outcome] | None = field(default=None, init=False)
    _first: bool = field(default=True, init=False)
    _unsent_since: float | None = field(default=None, init=False)  # a piece was handed to the response, not yet sent
    _stop_requested: bool = field(default=False, init=False)

    @property
    def model_id(self) -> str:
        assert self.version is not None
        return self.version.model_id

    @property
    def session_id(self) -> str | None:
        return self.spec.session_id

    def attach(self, task: asyncio.Task[Outcome]) -> None:
        """The task running `finalize`."""
        self._task = task

    async def pieces(self) -> AsyncIterator[str]:
        """Text as the engine produces it; pieces that arrived together are joined."""
        while True:
            piece = await self.handle.text.get()
            if self._stop_requested:
                # Stop here, between pieces: everything yielded so far was sent and acked, so
                # the engine saves exactly the text this client got; queued text is dropped.
                self.handle.cancel()
                return
            if piece is None:
                return
            parts = [piece]
            done = False
            while not self.handle.text.empty():
                more = self.handle.text.get_nowait()
                if more is None:
                    done = True
                    break
                parts.append(more)
            if self._first:
                self._first = False
                self.metrics.time_to_first_char.observe(time.perf_counter() - self.received_at)
            self._unsent_since = time.monotonic()
            yield "".join(parts)
            if done:
                return

    def sent(self, chars: int) -> None:
        """The client has been sent these characters (streaming flow control and disconnect point)."""
        self._unsent_since = None
        self.handle.ack(chars)

    def abandon(self) -> None:
        """The client went away: stop within one engine tick; the session is saved at what was sent."""
        self.handle.cancel()

    def stop(self) -> None:
        """End the generation early (drain): a stream ends after the last piece its client was sent,
        then reports the interruption; a JSON request is answered 503 and its session left as it was."""
        if not self.spec.stream or self._unsent_since is not None:  # not streaming, or stuck in a send
            self.abandon()
            return
        self._stop_requested = True
        self.handle.text.put_nowait("")  # wake pieces() (the engine never sends empty text)

    async def outcome(self) -> Outcome:
        assert self._task is not None
        return await asyncio.shield(self._task)

    async def finalize(self) -> Outcome:
        store, sid, token = self.store, self.spec.session_id, self.token
        self.metrics.active_streams.inc()
        watchers = []
        if token is not None:
            watchers.append(asyncio.create_task(self._keep_lease()))
        if self.spec.stream:
            watchers.append(asyncio.create_task(self._watch_stall()))
        try:
            finished = await self.handle.finished
        finally:
            for watcher in watchers:
                watcher.cancel()
            self.metrics.active_streams.dec()
        problem: Problem | None = None
        if finished.reason == "error":
            problem = Problem("engine_error", f"generation failed: {finished.error}")
        elif finished.reason == "engine_stopped":
            problem = Problem("engine_stopped", f"{finished.error}; retry on another replica")
        # A JSON request that was cancelled (its client went away, or the service is stopping)
        # never answers with its text, so its session keeps the state from before the request.
        unanswered = finished.reason == "cancelled" and not self.spec.stream
        if sid is not None and token is not None:
            if finished.state is None or unanswered:
                await release_quietly(store, sid, token)
            else:
                try:  # one round trip: save, then free the lease, in one script
                    if not await store.save_and_release(sid, token, finished.state):
                        message = f"session_id: lost the lease on session {sid!r}, or the session expired, "
                        message += "before saving; this request's text was not saved"
                        problem = Problem("lease_lost", message, "session_id")
                except StoreUnavailable as err:
                    problem = store_unavailable(err)
                    await release_quietly(store, sid, token)
        return Outcome(finished, problem)

    async def _keep_lease(self) -> None:
        """Renew the lease while generating, so only a dead replica's lease can expire.

        If the store stops answering or the lease is lost, the session can no longer be saved:
        stop the generation at once (the client gets an error event, not text that would be lost)
        rather than at the end of a possibly long stream. Renewing at least every 2 s bounds how
        long a stream runs on after Redis dies.
        """
        assert self.spec.session_id is not None and self.token is not None
        period = min(self.store.lease_ms / 3000, 2.0)
        # Checked around every call, not only left to cancel(): redis-py's asyncio client can
        # swallow a cancellation that arrives during a command (measured: most of the time), and
        # this task must never act on a lease that finalize has already released.
        while not self.handle.finished.done():
            await asyncio.sleep(period)
            if self.handle.finished.done():
                return
            try:
                renewed = await self.store.renew(self.spec.session_id, self.token)
                if self.handle.finished.done():
                    return
                if not renewed:
                    log.warning("lease on session %s was lost; stopping its generation", self.spec.session_id)
                    self.abandon()
                    return
            except StoreUnavailable as err:
                if self.handle.finished.done():
                    return
                log.warning("cannot renew the lease on session %s (%s); stopping its generation", self.session_id, err)
                self.abandon()
                return

    async def _watch_stall(self) -> None:
        """A streaming client that accepts nothing for stream_stall_timeout_s loses its stream.

        The engine already stops a row CHARGEN_STREAM_WINDOW characters ahead of its client, so a
        client that never reads costs no compute; this frees its engine row, its per-key slot and
        its session lease (saved at what it was sent) instead of holding them indefinitely.
        """
        limit = self.settings.stream_stall_timeout_s
        while True:
            await asyncio.sleep(min(limit / 4, 1.0))
            since = self._unsent_since
            if since is not None and time.monotonic() - since > limit:
                log.warning("a streaming client accepted nothing for %.0f s; dropping its stream", limit)
                self.abandon()
                return
