"""Faults inside the service and at its edge, over real HTTP (or the real app over ASGI): the
engine thread dying, a JSON client that leaves, a client that leaves mid-body, a stream whose
connection is gone before its first byte."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from service.main import create_app
from service.settings import Settings
from tests.service_support import ServerThread, metric, new_session, sse_data, wait_until

PROMPT = "ROMEO:\nthe night "
LONG = 10_000_000  # no test waits for a generation this long to end by itself


def request_counts(client: httpx.Client, url: str) -> dict[tuple[str, str, str], float]:
    """chargen_http_requests_total by (method, route, status)."""
    counts = {}
    for line in client.get(url + "/metrics").text.splitlines():
        if line.startswith("chargen_http_requests_total{"):
            labels, value = line[len("chargen_http_requests_total{") :].rsplit("} ", 1)
            parsed = dict(part.split("=", 1) for part in labels.split(","))
            key = (parsed["method"].strip('"'), parsed["route"].strip('"'), parsed["status"].strip('"'))
            counts[key] = float(value)
    return counts


def test_an_engine_that_dies_ends_every_request_with_503_frees_its_leases_and_fails_healthz(
    tiny_artifact: Path, client: httpx.Client
) -> None:
    with ServerThread(model=str(tiny_artifact), max_new_chars=LONG) as srv:
        streamed_sid = new_session(client, srv.url, PROMPT)
        json_sid = new_session(client, srv.url, PROMPT)
        engine = srv.app.state.registry.resolve(None).engine
        answered: dict[str, Any] = {}

        def json_request() -> None:  # a non-streamed request with a session, running when the engine dies
            with httpx.Client(timeout=30) as own:
                body = {"session_id": json_sid, "max_new_chars": LONG}
                answered["json"] = own.post(srv.url + "/v1/generate", json=body)

        body = dict(session_id=streamed_sid, max_new_chars=LONG, stream=True)
        with client.stream("POST", srv.url + "/v1/generate", json=body, timeout=30) as response:
            events = sse_data(response)
            assert "text" in next(events)
            other = threading.Thread(target=json_request)
            other.start()
            wait_until(lambda: metric(client, srv.url, "chargen_active_streams") == 2, what="both generations")

            def broken(*args: Any, **kwargs: Any) -> None:
                raise RuntimeError("injected: handing text over failed")

            engine._handover.flush = broken  # outside the tick's own guard: the thread dies of it
            rest = list(events)
        other.join(30)
        assert rest[-1] == "[DONE]"
        assert rest[-2]["error"]["code"] == "engine_stopped", rest[-2]
        assert answered["json"].status_code == 503, answered["json"].text
        assert answered["json"].json()["error"]["code"] == "engine_stopped"
        # the orchestrator sees it: liveness fails (so the process is restarted), readiness too
        health = client.get(srv.url + "/healthz")
        assert health.status_code == 503 and "engine" in health.json()["reason"], health.text
        assert client.get(srv.url + "/readyz").status_code == 503
        # nothing is left holding a lease or a slot: the sessions can be taken at once
        assert metric(client, srv.url, "chargen_active_streams") == 0
        for sid in (streamed_sid, json_sid):
            again = client.post(srv.url + "/v1/generate", json={"session_id": sid, "max_new_chars": 3})
            assert again.status_code == 503 and again.json()["error"]["code"] == "engine_stopped", again.text
            assert client.delete(f"{srv.url}/v1/sessions/{sid}").status_code == 204


def test_a_json_client_that_goes_away_cancels_its_generation_and_leaves_the_session(
    tiny_artifact: Path, client: httpx.Client
) -> None:
    with ServerThread(model=str(tiny_artifact), max_new_chars=LONG) as srv:
        sid = new_session(client, srv.url, PROMPT)
        body = {"session_id": sid, "max_new_chars": LONG}
        with contextlib.suppress(httpx.ReadTimeout):  # the client gives up after a second and closes
            httpx.post(srv.url + "/v1/generate", json=body, timeout=httpx.Timeout(10, read=1.0))
        wait_until(
            lambda: metric(client, srv.url, "chargen_active_streams") == 0,
            timeout=10,
            what="the abandoned generation to stop",
        )
        # the session is as it was (its client never got the text) and free again
        assert client.get(f"{srv.url}/v1/sessions/{sid}").json()["chars_consumed"] == len(PROMPT)
        more = client.post(srv.url + "/v1/generate", json={"session_id": sid, "max_new_chars": 5})
        assert more.status_code == 200 and more.json()["usage"]["completion_chars"] == 5
        # counted as the client's doing on its route, not as a server error
        counts = request_counts(client, srv.url)
        assert counts.get(("POST", "/v1/generate", "499")) == 1, counts


def test_a_client_that_leaves_mid_body_is_a_499_on_its_route_not_a_500(
    tiny_artifact: Path, client: httpx.Client
) -> None:
    with ServerThread(model=str(tiny_artifact)) as srv:
        with socket.create_connection(("127.0.0.1", srv.port)) as sock:
            head = b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            head += b"Content-Length: 100\r\n\r\n"
            sock.sendall(head + b'{"prompt": ')  # 11 of the 100 bytes announced, then gone
            time.sleep(0.2)
        wait_until(lambda: request_counts(client, srv.url).get(("POST", "/v1/generate", "499")) == 1, timeout=10)
        counts = request_counts(client, srv.url)
        assert not [key for key in counts if key[2].startswith("5")], counts
        assert ("POST", "unmatched", "500") not in counts


def test_a_stream_whose_connection_fails_before_its_first_byte_releases_its_job(tiny_artifact: Path) -> None:
    """The response's own cleanup releases the job, even when its event generator never started
    (the server could not send the response head)."""

    async def main() -> int:
        app = create_app(Settings(model=str(tiny_artifact), max_new_chars=LONG))
        async with app.router.lifespan_context(app):
            generations = app.state.generations
            body = json.dumps({"prompt": PROMPT, "max_new_chars": LONG, "stream": True}).encode()
            messages = [{"type": "http.request", "body": body, "more_body": False}]

            async def receive() -> dict[str, Any]:
                if messages:
                    return messages.pop(0)
                await asyncio.Event().wait()  # the client says nothing more
                raise AssertionError("unreachable")

            async def send(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    raise OSError("connection reset by peer")

            scope = {
                "type": "http",
                "asgi": {"version": "3.0", "spec_version": "2.4"},
                "http_version": "1.1",
                "method": "POST",
                "scheme": "http",
                "path": "/v1/generate",
                "raw_path": b"/v1/generate",
                "root_path": "",
                "query_string": b"",
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
                "client": ("127.0.0.1", 50000),
                "server": ("127.0.0.1", 8000),
                "state": {},
            }
            with contextlib.suppress(Exception):  # the disconnect itself propagates out of the app
                await app(scope, receive, send)
            deadline = time.monotonic() + 5
            while generations.active and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            return generations.active  # type: ignore[no-any-return]

    assert asyncio.run(main()) == 0
