"""ASGI middleware: request body limits (size and JSON nesting) and per-route request counting."""

from __future__ import annotations

import json
import re

from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import error_body
from service.metrics import Metrics


async def send_json_error(send: Send, status: int, message: str, param: str | None, code: str) -> None:
    body = json.dumps(error_body(status, message, param, code)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


MAX_JSON_DEPTH = 64  # no request's shape nests past 3 levels; the parser's own limit is the recursion limit


def json_nested_deeper_than(body: bytes, limit: int) -> bool:
    """Whether brackets outside strings nest past ``limit``. Counting brackets first keeps the
    byte-by-byte scan for the rare body that has more than ``limit`` of them at all."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    depth, in_string, escaped = 0, False, False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # closing quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > limit:
                return True
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
    return False


class BodyLimitMiddleware:
    """Reads at most max_bytes of a request body (all of it, then replays it): past that, 413.
    JSON nested past MAX_JSON_DEPTH is a 400 here, before any parser recurses into it: the limit
    is the service's own, whatever recursion limit the process runs with."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        too_big = f"body: larger than the limit of {self.max_bytes} bytes"
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await send_json_error(send, 413, too_big, "body", "body_too_large")
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await send_json_error(send, 413, too_big, "body", "body_too_large")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        if json_nested_deeper_than(b"".join(chunks), MAX_JSON_DEPTH):
            message = f"body: JSON nested more than {MAX_JSON_DEPTH} levels deep"
            await send_json_error(send, 400, message, "body", "invalid_json")
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: wait for http.disconnect, as usual

        await self.app(scope, replay, send)


class RequestMetricsMiddleware:
    """Counts requests by method, route template (not the raw path: ids stay out of labels) and status.

    A client that goes away before its response is complete is counted as 499 (nginx's "client
    closed request"), on the route it asked for, so that 5xx means the server failed.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        self._templates: list[tuple[str, set[str], re.Pattern[str]]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        complete = left = False

        async def watch_receive() -> Message:
            nonlocal left
            message = await receive()
            if message["type"] == "http.disconnect" and not complete:
                left = True
            return message

        async def capture(message: Message) -> None:
            nonlocal status, complete, left
            if message["type"] == "http.response.start":
                status = message["status"]
            try:
                await send(message)
            except OSError:  # the server's way (ASGI 2.4) of saying the client is gone
                left = True
                raise
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                complete = True

        try:
            await self.app(scope, watch_receive, capture)
        finally:
            shown = "499" if left else str(status)  # left before the response was complete
            self.metrics.requests.labels(scope["method"], self.route_template(scope), shown).inc()

    def route_template(self, scope: Scope) -> str:
        """The path template of the request's route, "unmatched" for none.

        The route the router chose names it when its own template is the whole path. A route
        included under a prefix (the API's /v1) knows only its path within its router, and when
        routing never ran (the body was refused, the client left first) there is no route at all:
        then it is the documented template that the method and path match.
        """
        route = scope.get("route")
        regex = getattr(route, "path_regex", None)
        if regex is not None and regex.match(scope["path"]):
            return route.path  # type: ignore[no-any-return, union-attr]
        if self._templates is None:  # once, on the first request that needs it
            paths = scope["app"].openapi().get("paths", {})
            self._templates = [
                (template, {m.upper() for m in item}, compile_path(template)[0]) for template, item in paths.items()
            ]
        for template, methods, pattern in self._templates:
            if scope["method"] in methods and pattern.match(scope["path"]):
                return template
        return "unmatched"


class DrainingReadinessMiddleware:
    """While the service drains on SIGTERM, /readyz says 503 so load balancers stop sending work."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/readyz":
            generations = getattr(scope["app"].state, "generations", None)
            if generations is not None and generations.draining:
                body = json.dumps(
                    {"status": "not ready", "reason": "draining: the service is shutting down", "checks": {}}
                ).encode()
                headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                await send({"type": "http.response.start", "status": 503, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)
