"""One generation request from the event loop's side: validate, take the session, run, save.

The routes (native /v1/generate, OpenAI /v1/completions, session priming) share this: they differ
only in how they parse the request and shape the response.

Life of a request with a session: take the session's lease (409 if busy), read and check its
state, queue a row in the engine (429 when full), pass text on as it comes, then save the state
the engine returns (after exactly the text the client got) while still holding the lease, and
release it. The save runs in its own task, so it happens even when the client disconnects and
the response generator is torn down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from service.artifact import LoadedModel
from service.engine import Engine, EngineFull, EngineStopped, Finished, GenerationRequest, StreamHandle
from service.errors import ApiError
from service.metrics import Metrics
from service.sampling import SamplingParams
from service.settings import Settings
from service.sse import DONE, event
from service.state_codec import ModelMismatchError, StateDecodeError, decode_state
from service.state_store import SessionBusy, SessionNotFound, SessionStore, StoredSession, StoreUnavailable

log = logging.getLogger("chargen.service")

# secrets.token_urlsafe(24): 32 characters, 192 random bits
SESSION_ID = re.compile(r"[A-Za-z0-9_-]{32}")


@dataclass
class GenerationSpec:
    prompt: str
    max_new_chars: int
    params: SamplingParams
    stop: tuple[str, ...] = ()
    session_id: str | None = None
    stream: bool = False
    owner: str | None = None  # the caller's API key owner id (None: keys not configured)


@dataclass
class Outcome:
    finished: Finished
    error: ApiError | None  # the generation ran but its session could not be saved


def check_session_id(session_id: str, param: str = "session_id") -> str:
    if not SESSION_ID.fullmatch(session_id):
        raise ApiError(
            404, f"{param}: no session {session_id[:40]!r} (ids are 32 URL-safe characters)", param, "session_not_found"
        )
    return session_id


def not_found(session_id: str, param: str = "session_id") -> ApiError:
    return ApiError(404, f"{param}: session {session_id!r} does not exist or has expired", param, "session_not_found")


def busy(session_id: str, param: str = "session_id") -> ApiError:
    return ApiError(
        409, f"{param}: session {session_id!r} is in use by another request; retry when it ends", param, "session_busy"
    )


def store_down(err: StoreUnavailable) -> ApiError:
    return ApiError(
        503,
        f"the session store is unavailable: {err}; requests without a session still work",
        None,
        "store_unavailable",
        {"Retry-After": "1"},
    )


async def stream_job(
    job: Job, piece_event: Callable[[str], dict], final_event: Callable[[Finished], dict]
) -> AsyncIterator[str]:
    """A streamed request as server-sent events: one per text piece, the final one or the error,
    then [DONE].

    Shared by /v1/generate and /v1/completions, which differ only in the shapes of their events.
    A piece counts as sent once the yield returns (the event was handed to the connection).
    """
    try:
        async for piece in job.pieces():
            yield event(piece_event(piece))
            job.sent(len(piece))
        outcome = await job.outcome()
        finished = outcome.finished
        if outcome.error is not None:
            yield event(outcome.error.body())
        elif finished.reason not in ("length", "stop"):
            reason = finished.error or finished.reason
            yield event(ApiError(503, f"generation was interrupted ({reason})", None, "interrupted").body())
        else:
            yield event(final_event(finished))
        yield DONE
    finally:
        job.abandon()


async def read_owned_session(store: SessionStore, session_id: str, owner: str | None) -> StoredSession:
    """A session as stored, for a read that takes no lease; another key's session is invisible (404)."""
    check_session_id(session_id)
    try:
        stored = await store.get(session_id)
    except StoreUnavailable as err:
        raise store_down(err) from None
    if stored is None or (owner is not None and stored.owner != owner):
        raise not_found(session_id)
    return stored


class Generations:
    def __init__(
        self, engine: Engine, store: SessionStore, model: LoadedModel, settings: Settings, metrics: Metrics
    ) -> None:
        self.engine = engine
        self.store = store
        self.model = model
        self.settings = settings
        self.metrics = metrics
        self._tasks: set[asyncio.Task[Outcome]] = set()
        self._jobs: set[Job] = set()
        self._per_owner: dict[str, int] = {}  # running generations per API key
        self.draining = False  # SIGTERM: refuse new generations, let running ones finish

    @property
    def active(self) -> int:
        """Generations not yet finished and saved."""
        return len(self._tasks)

    def stop_all(self) -> None:
        """Stop every running generation (drain timeout); each saves what its client was sent."""
        for job in list(self._jobs):
            job.stop()

    def validate(self, spec: GenerationSpec, prompt_param: str = "prompt", max_param: str = "max_new_chars") -> None:
        s = self.settings
        if len(spec.prompt) > s.max_prompt_chars:
            raise ApiError(
                400,
                f"{prompt_param}: {len(spec.prompt)} characters, more than the limit of {s.max_prompt_chars}",
                prompt_param,
                "prompt_too_long",
            )
        unknown = self.model.unknown_chars(spec.prompt)
        if unknown:
            shown = ", ".join(repr(ch) for ch in unknown[:20]) + (", ..." if len(unknown) > 20 else "")
            raise ApiError(
                400, f"{prompt_param}: characters the model does not know: {shown}", prompt_param, "unknown_characters"
            )
        if spec.max_new_chars > s.max_new_chars:
            raise ApiError(
                400,
                f"{max_param}: {spec.max_new_chars} is over the limit of {s.max_new_chars}",
                max_param,
                "too_many_chars",
            )
        if len(spec.stop) > s.max_stop_strings:
            raise ApiError(
                400,
                f"stop: at most {s.max_stop_strings} stop strings, got {len(spec.stop)}",
                "stop",
                "too_many_stop_strings",
            )
        for text in spec.stop:
            if not text:
                raise ApiError(400, "stop: stop strings must not be empty", "stop", "empty_stop_string")
            if len(text) > s.max_stop_chars:
                raise ApiError(
                    400,
                    f"stop: a stop string is {len(text)} characters, over the limit of {s.max_stop_chars}",
                    "stop",
                    "stop_string_too_long",
                )

    async def start(self, spec: GenerationSpec, received_at: float | None = None) -> Job:
        """Take the session (if any), queue the row; raises ApiError for 404/409/429/503."""
        if self.draining:
            raise ApiError(
                503, "the service is shutting down; retry on another replica", None, "draining", {"Retry-After": "1"}
            )
        limit = self.settings.max_streams_per_key
        if spec.owner is not None and limit and self._per_owner.get(spec.owner, 0) >= limit:
            raise ApiError(
                429,
                f"this API key already runs {limit} generations at once (the limit); retry when one ends",
                None,
                "key_stream_limit",
                {"Retry-After": str(self.settings.retry_after_s)},
            )
        # Take the key's slot before the first await, so concurrent requests cannot all pass the check.
        self._take_slot(spec.owner)
        try:
            return await self._start(spec, received_at)
        except BaseException:
            self._free_slot(spec.owner)
            raise

    def _take_slot(self, owner: str | None) -> None:
        if owner is not None:
            self._per_owner[owner] = self._per_owner.get(owner, 0) + 1

    def _free_slot(self, owner: str | None) -> None:
        if owner is not None:
            left = self._per_owner.pop(owner) - 1
            if left:
                self._per_owner[owner] = left

    async def _start(self, spec: GenerationSpec, received_at: float | None) -> Job:
        token: str | None = None
        state = None
        if spec.session_id is not None:
            check_session_id(spec.session_id)
            try:
                token, blob = await self.store.acquire(spec.session_id, owner=spec.owner)
            except SessionNotFound:
                raise not_found(spec.session_id) from None
            except SessionBusy:
                raise busy(spec.session_id) from None
            except StoreUnavailable as err:
                raise store_down(err) from None
            try:
                state = decode_state(
                    blob, self.model.fingerprint, self.model.layers, self.model.hidden, len(self.model.vocab)
                )
            except StateDecodeError as err:
                await self._release_quietly(spec.session_id, token)
                if isinstance(err, ModelMismatchError):
                    raise ApiError(409, f"session_id: {err}", "session_id", "model_mismatch") from None
                raise ApiError(
                    409, f"session_id: the stored state cannot be used ({err})", "session_id", "invalid_session_state"
                ) from None
        request = GenerationRequest(
            prompt_ids=self.model.encode(spec.prompt),
            max_new_chars=spec.max_new_chars,
            params=spec.params,
            stop=spec.stop,
            state=state,
            auto_ack=not spec.stream,
            want_state=token is not None,
        )
        try:
            handle = self.engine.submit(request)
        except EngineFull as err:
            if token is not None:
                await self._release_quietly(spec.session_id, token)  # type: ignore[arg-type]
            raise ApiError(
                429,
                f"the service is at capacity ({err}); retry shortly",
                None,
                "capacity",
                {"Retry-After": str(self.settings.retry_after_s)},
            ) from None
        except EngineStopped as err:
            if token is not None:
                await self._release_quietly(spec.session_id, token)  # type: ignore[arg-type]
            raise ApiError(503, f"the model engine is not running ({err})", None, "engine_stopped") from None
        job = Job(self, spec, handle, token, received_at or time.perf_counter())
        task = asyncio.get_running_loop().create_task(job._finalize())
        self._tasks.add(task)
        self._jobs.add(job)

        def done(task: asyncio.Task[Outcome]) -> None:
            self._tasks.discard(task)
            self._jobs.discard(job)
            self._free_slot(spec.owner)  # the slot taken in start()

        task.add_done_callback(done)
        job._task = task
        return job

    async def _release_quietly(self, session_id: str, token: str) -> None:
        with contextlib.suppress(StoreUnavailable):  # the lease expires by itself
            await self.store.release(session_id, token)

    async def drain(self, timeout: float = 10.0) -> None:
        """Wait for in-flight saves (at shutdown)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)


class Job:
    def __init__(
        self, owner: Generations, spec: GenerationSpec, handle: StreamHandle, token: str | None, received_at: float
    ) -> None:
        self.owner = owner
        self.spec = spec
        self.handle = handle
        self.token = token
        self.received_at = received_at
        self._task: asyncio.Task[Outcome] | None = None
        self._first = True
        self._unsent_since: float | None = None  # a piece was handed to the response, not yet sent
        self._stop_requested = False

    @property
    def session_id(self) -> str | None:
        return self.spec.session_id

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
                self.owner.metrics.time_to_first_char.observe(time.perf_counter() - self.received_at)
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

    async def _finalize(self) -> Outcome:
        owner, store, sid, token = self.owner, self.owner.store, self.spec.session_id, self.token
        owner.metrics.active_streams.inc()
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
            owner.metrics.active_streams.dec()
        error: ApiError | None = None
        if finished.reason == "error":
            error = ApiError(500, f"generation failed: {finished.error}", None, "engine_error")
        # A JSON request that was cancelled (its client went away, or the service is stopping)
        # never answers with its text, so its session keeps the state from before the request.
        unanswered = finished.reason == "cancelled" and not self.spec.stream
        if sid is not None and token is not None:
            if finished.state is None or unanswered:
                await owner._release_quietly(sid, token)
            else:
                try:  # one round trip: save, then free the lease, in one script
                    if not await store.save_and_release(sid, token, finished.state):
                        error = ApiError(
                            409,
                            f"session_id: lost the lease on session {sid!r}, or the session expired, before "
                            "saving; this request's text was not saved",
                            "session_id",
                            "lease_lost",
                        )
                except StoreUnavailable as err:
                    error = store_down(err)
                    await owner._release_quietly(sid, token)
        return Outcome(finished, error)

    async def _keep_lease(self) -> None:
        """Renew the lease while generating, so only a dead replica's lease can expire.

        If the store stops answering or the lease is lost, the session can no longer be saved:
        stop the generation at once (the client gets an error event, not text that would be lost)
        rather than at the end of a possibly long stream. Renewing at least every 2 s bounds how
        long a stream runs on after Redis dies.
        """
        assert self.spec.session_id is not None and self.token is not None
        period = min(self.owner.store.lease_ms / 3000, 2.0)
        # Checked around every call, not only left to cancel(): redis-py's asyncio client can
        # swallow a cancellation that arrives during a command (measured: most of the time), and
        # this task must never act on a lease that _finalize has already released.
        while not self.handle.finished.done():
            await asyncio.sleep(period)
            if self.handle.finished.done():
                return
            try:
                renewed = await self.owner.store.renew(self.spec.session_id, self.token)
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
        limit = self.owner.settings.stream_stall_timeout_s
        while True:
            await asyncio.sleep(min(limit / 4, 1.0))
            since = self._unsent_since
            if since is not None and time.monotonic() - since > limit:
                log.warning("a streaming client accepted nothing for %.0f s; dropping its stream", limit)
                self.abandon()
                return
