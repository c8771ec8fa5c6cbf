"""Server-sent events: one ``data:`` line per event, each sent as soon as it is yielded."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


class EventStreamResponse(StreamingResponse):
    """A StreamingResponse that always closes its generator and runs ``on_close``, disconnect or not.

    Starlette cancels the sending task when the client disconnects; closing the generator here
    runs its ``finally`` at once instead of whenever the garbage collector gets to it. A generator
    that never started (the response head could not be sent) has no ``finally`` to run, so the
    response's own ``finally`` calls ``on_close`` (which stops the generation and lets the session
    be saved) whatever happened.
    """

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None] | None = None) -> None:
        super().__init__(content, media_type="text/event-stream", headers=SSE_HEADERS)
        self._generator = content
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self._stream_until_disconnect(receive, send)
        finally:
            if self._on_close is not None:
                self._on_close()

    async def _stream_until_disconnect(self, receive: Receive, send: Send) -> None:
        """What Starlette does for ASGI servers before spec 2.4 (uvicorn's httptools says 2.3), with
        one plain asyncio task instead of an anyio task group per stream: a listener that cancels
        the stream when the client disconnects. Per stream that was two tasks, a cancel scope and
        the async-library lookups (a tenth of the event loop's time in a profile of 1-character
        streams)."""
        streaming = asyncio.current_task()
        assert streaming is not None
        disconnected = False

        async def listen() -> None:
            nonlocal disconnected
            while (await receive())["type"] != "http.disconnect":
                pass
            disconnected = True
            streaming.cancel()

        listener = asyncio.create_task(listen())
        try:
            await self.stream_response(send)
        except asyncio.CancelledError:
            if not disconnected or streaming.uncancel() > 0:  # not ours, or cancelled again since
                raise
        finally:
            listener.cancel()

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            aclose = getattr(self._generator, "aclose", None)
            if aclose is not None:
                await aclose()
