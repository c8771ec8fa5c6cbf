"""How a generation's result leaves over HTTP: one JSON answer, or server-sent events.

Shared by /v1/generate and /v1/completions, which differ only in the shapes of their bodies.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from starlette.requests import Request

from service.engine import Finished
from service.errors import ApiError
from service.job import Job, Outcome
from service.problems import interrupted
from service.sse import DONE, EventStreamResponse, event


def failure(outcome: Outcome) -> ApiError | None:
    """What went wrong, if the generation did not end by itself (length or stop string)."""
    if outcome.problem is not None:
        return ApiError.of(outcome.problem)
    finished = outcome.finished
    if finished.reason not in ("length", "stop"):
        return ApiError.of(interrupted(finished.error or finished.reason))
    return None


async def collect(job: Job, request: Request) -> tuple[str, Finished]:
    """A non-streamed request's whole text and how it finished; raises its ApiError if it failed."""
    return (await collect_all([job], request))[0]


async def collect_all(jobs: list[Job], request: Request) -> list[tuple[str, Finished]]:
    """Each choice's whole text and how it finished (n > 1: one job per choice); raises the first
    failure's ApiError.

    The client leaving (``http.disconnect``) cancels every choice at once: it never gets the
    text, so its session keeps the state from before the request.
    """

    async def watch_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        for job in jobs:
            job.abandon()

    async def text_of(job: Job) -> str:
        return "".join([piece async for piece in job.pieces()])

    watcher = asyncio.create_task(watch_disconnect())
    try:
        texts = await asyncio.gather(*(text_of(job) for job in jobs))
        outcomes = [await job.outcome() for job in jobs]
    finally:
        watcher.cancel()
        for job in jobs:
            job.abandon()  # no-op once finished; stops the row if this handler is cancelled
    for outcome in outcomes:
        error = failure(outcome)
        if error is not None:
            raise error
    return [(text, outcome.finished) for text, outcome in zip(texts, outcomes, strict=True)]


PieceEvent = Callable[[int, str], dict]  # (choice index, text piece) -> the event
FinalEvent = Callable[[int, Finished], dict]
OpeningEvent = Callable[[int], dict]  # a choice's first event (echo), sent before its first piece
ClosingEvent = Callable[[list[Finished]], dict]  # one event after every choice's final one


def stream(
    job: Job, piece_event: Callable[[str], dict], final_event: Callable[[Finished], dict]
) -> EventStreamResponse:
    """One generation as server-sent events: one per text piece, the final one or the error, then [DONE]."""
    return stream_all([job], lambda _, piece: piece_event(piece), lambda _, finished: final_event(finished))


def stream_all(
    jobs: list[Job],
    piece_event: PieceEvent,
    final_event: FinalEvent,
    opening: OpeningEvent | None = None,
    closing: ClosingEvent | None = None,
) -> EventStreamResponse:
    """A streamed request's choices as server-sent events: one per text piece of any choice as it
    comes (each choice's ``opening`` before its first: the engine has read its prompt by then),
    each choice's final one (or the first error), then [DONE].
    The response itself releases the jobs when it ends, however it ends."""

    def abandon() -> None:
        for job in jobs:
            job.abandon()

    events = job_events(jobs, piece_event, final_event, opening, closing)
    return EventStreamResponse(events, on_close=abandon)


async def job_events(
    jobs: list[Job],
    piece_event: PieceEvent,
    final_event: FinalEvent,
    opening: OpeningEvent | None,
    closing: ClosingEvent | None,
) -> AsyncIterator[str]:
    unopened = set(range(len(jobs))) if opening is not None else set()
    # A piece counts as sent once the yield returns (the event was handed to the connection).
    async for i, piece in pieces_of(jobs):
        if i in unopened:
            unopened.discard(i)
            yield event(opening(i))  # type: ignore[misc, arg-type]
        yield event(piece_event(i, piece))
        jobs[i].sent(len(piece))
    outcomes = [await job.outcome() for job in jobs]
    errors = [e for e in map(failure, outcomes) if e is not None]
    if errors:
        yield event(errors[0].body())
    else:
        for i, outcome in enumerate(outcomes):
            if i in unopened:
                yield event(opening(i))  # type: ignore[misc, arg-type]
            yield event(final_event(i, outcome.finished))
        if closing is not None:
            yield event(closing([outcome.finished for outcome in outcomes]))
    yield DONE


async def pieces_of(jobs: list[Job]) -> AsyncIterator[tuple[int, str]]:
    """(choice index, piece) as each choice produces them; one job is read directly."""
    if len(jobs) == 1:
        async for piece in jobs[0].pieces():
            yield 0, piece
        return
    queue: asyncio.Queue[tuple[int, str | None]] = asyncio.Queue()

    async def pump(i: int, job: Job) -> None:
        try:
            async for piece in job.pieces():
                await queue.put((i, piece))
        finally:
            queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, job)) for i, job in enumerate(jobs)]
    try:
        left = len(jobs)
        while left:
            i, piece = await queue.get()
            if piece is None:
                left -= 1
            else:
                yield i, piece
    finally:
        for task in tasks:
            task.cancel()
