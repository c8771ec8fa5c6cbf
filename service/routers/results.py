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
    """A non-streamed request's whole text and how it finished; raises its ApiError if it failed.

    The client leaving (``http.disconnect``) cancels the generation at once: it never gets the
    text, so its session keeps the state from before the request.
    """

    async def watch_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        job.abandon()

    watcher = asyncio.create_task(watch_disconnect())
    try:
        text = "".join([piece async for piece in job.pieces()])
        outcome = await job.outcome()
    finally:
        watcher.cancel()
        job.abandon()  # no-op once finished; stops the row if this handler is cancelled
    error = failure(outcome)
    if error is not None:
        raise error
    return text, outcome.finished


def stream(
    job: Job, piece_event: Callable[[str], dict], final_event: Callable[[Finished], dict]
) -> EventStreamResponse:
    """A streamed request as server-sent events: one per text piece, the final one or the error,
    then [DONE]. The response itself releases the job when it ends, however it ends."""
    return EventStreamResponse(job_events(job, piece_event, final_event), on_close=job.abandon)


async def job_events(
    job: Job, piece_event: Callable[[str], dict], final_event: Callable[[Finished], dict]
) -> AsyncIterator[str]:
    # A piece counts as sent once the yield returns (the event was handed to the connection).
    async for piece in job.pieces():
        yield event(piece_event(piece))
        job.sent(len(piece))
    outcome = await job.outcome()
    error = failure(outcome)
    yield event(error.body() if error is not None else final_event(outcome.finished))
    yield DONE
