"""Faults with real processes, really broken: redis-server killed with SIGKILL mid-stream (with and
without persistence), `chargen serve` killed with SIGKILL mid-request, and SIGTERM's drain.

redis-server is started here directly (not through pytest-redis) because these tests need its
PID to SIGKILL it and its data directory to restart it with the same append-only file.
"""

from __future__ import annotations

import re
import secrets
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.artifact import load_model
from service.state_codec import decode_state, describe_state
from service.state_store.layout import KeyLayout
from tests.redis_support import RedisServer
from tests.service_support import (
    ServerProcess,
    ServerThread,
    generate,
    generate_retrying_busy,
    new_session,
    sse_data,
    wait_until,
)

PROMPT = "ROMEO:\nthe night "
LONG = 1_000_000


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


def text_of(events: list[Any]) -> str:
    return "".join(e["text"] for e in events if isinstance(e, dict) and "text" in e)


def test_redis_killed_mid_stream_ends_streams_promptly_and_the_service_recovers(
    tiny_artifact: Path, redis_server: RedisServer, client: httpx.Client
) -> None:
    settings = dict(
        model=str(tiny_artifact),
        state_url=redis_server.url,
        redis_prefix=f"t{secrets.token_hex(4)}:",
        redis_timeout_s=1,
        lease_ms=3000,  # renewed every second: a dead Redis is noticed within ~1 s
        max_new_chars=LONG,
    )
    with ServerThread(**settings) as srv:
        sid = new_session(client, srv.url, PROMPT)
        stateless: list[Any] = []
        enough = threading.Event()

        def stateless_stream() -> None:  # a stream without a session, running across the outage
            with httpx.Client(timeout=60) as own:
                body = dict(prompt=PROMPT, max_new_chars=LONG, stream=True, seed=1)
                with own.stream("POST", srv.url + "/v1/generate", json=body) as response:
                    for item in sse_data(response):
                        stateless.append(item)
                        if enough.is_set():
                            return

        other = threading.Thread(target=stateless_stream)
        other.start()
        body = dict(session_id=sid, max_new_chars=LONG, stream=True)
        with client.stream("POST", srv.url + "/v1/generate", json=body) as response:
            events = sse_data(response)
            first = next(events)
            assert "text" in first
            wait_until(lambda: stateless, what="the stateless stream")
            redis_server.kill()
            killed_at = time.monotonic()
            stateless_at_kill = len(stateless)
            rest = list(events)  # must end by itself: no hang
            ended_after = time.monotonic() - killed_at
        assert ended_after < 10, f"the stream ran on for {ended_after:.1f} s after Redis died"
        assert rest[-1] == "[DONE]"
        error = rest[-2]["error"]
        assert error["code"] == "store_unavailable" and "session store is unavailable" in error["message"]

        # the service stays up: liveness fine, not ready, session requests 503, the rest works
        assert client.get(srv.url + "/healthz").status_code == 200
        ready = client.get(srv.url + "/readyz")
        assert ready.status_code == 503 and "store" in ready.json()["reason"]
        for method, path, payload in (
            ("POST", "/v1/generate", {"session_id": sid, "max_new_chars": 5}),
            ("POST", "/v1/sessions", None),
            ("GET", f"/v1/sessions/{sid}", None),
            ("POST", f"/v1/sessions/{sid}/fork", None),
            ("DELETE", f"/v1/sessions/{sid}", None),
        ):
            response = client.request(method, srv.url + path, json=payload)
            assert response.status_code == 503, (path, response.text)
            assert response.json()["error"]["code"] == "store_unavailable"
        assert generate(client, srv.url, prompt=PROMPT, max_new_chars=20)["usage"]["completion_chars"] == 20
        # the stream without a session went on through the outage
        assert len(stateless) > stateless_at_kill and "[DONE]" not in stateless
        enough.set()
        other.join(30)

        # Redis back (empty: no persistence): the service recovers by itself, no restart
        redis_server.start()
        wait_until(lambda: client.get(srv.url + "/readyz").status_code == 200, timeout=30, what="recovery")
        again = new_session(client, srv.url, PROMPT)
        assert generate(client, srv.url, session_id=again, max_new_chars=10)["usage"]["completion_chars"] == 10


def test_persistent_redis_killed_and_restarted_sessions_continue_exactly(
    tiny_artifact: Path, tmp_path: Path, client: httpx.Client
) -> None:
    store = RedisServer(tmp_path, persistent=True).start()
    try:
        settings = dict(
            model=str(tiny_artifact), state_url=store.url, redis_prefix="p:", redis_timeout_s=1, max_new_chars=LONG
        )
        with ServerThread(**settings) as srv:
            sid = new_session(client, srv.url, PROMPT)
            before = generate(client, srv.url, session_id=sid, max_new_chars=70, temperature=0)["text"]
            store.kill()
            store.start()  # same directory: replays the append-only file
            wait_until(lambda: client.get(srv.url + "/readyz").status_code == 200, timeout=30, what="recovery")
            after = generate_retrying_busy(client, srv.url, session_id=sid, max_new_chars=50, temperature=0)["text"]
            info = client.get(f"{srv.url}/v1/sessions/{sid}").json()
            assert info["chars_consumed"] == len(PROMPT) + 120
            # greedy 120 in one go from a fresh session is the same text: nothing lost or replayed
            ref = new_session(client, srv.url, PROMPT)
            assert generate(client, srv.url, session_id=ref, max_new_chars=120, temperature=0)["text"] == before + after
    finally:
        store.stop()


def test_service_killed_mid_request_leaves_the_previous_state_and_the_lease_expires(
    tiny_artifact: Path, redis_server: RedisServer, client: httpx.Client
) -> None:
    prefix = f"k{secrets.token_hex(4)}:"
    env = dict(state_url=redis_server.url, redis_prefix=prefix, lease_ms=2000, max_new_chars=LONG)
    r = redis_server.client()
    model = load_model(tiny_artifact)
    with ServerProcess(tiny_artifact, **env) as victim:
        sid = new_session(client, victim.url, PROMPT)
        first = generate(client, victim.url, session_id=sid, max_new_chars=30, temperature=0)["text"]
        saved = r.hget(KeyLayout(prefix).session(sid), "state")
        assert saved is not None
        body = dict(session_id=sid, max_new_chars=LONG, stream=True, temperature=0)
        with client.stream("POST", victim.url + "/v1/generate", json=body) as response:
            events = sse_data(response)
            received = next(events)["text"] + next(events)["text"]
            assert received
            assert victim.proc is not None
            victim.proc.send_signal(signal.SIGKILL)  # mid-request: the stream is running
            victim.proc.wait(10)
            with pytest.raises(httpx.HTTPError):
                list(events)
        victim.proc = None
    # exactly the bytes saved before the request: no torn or partial write, and it still decodes
    assert r.hget(KeyLayout(prefix).session(sid), "state") == saved
    decode_state(saved, model.fingerprint, model.layers, model.hidden, len(model.vocab))
    assert describe_state(saved)[1] == len(PROMPT) + 30
    # the dead process's lease is still there, and expires by itself
    assert r.exists(KeyLayout(prefix).lease(sid)) == 1
    wait_until(lambda: r.exists(KeyLayout(prefix).lease(sid)) == 0, timeout=10, what="the lease to expire")
    with ServerThread(model=str(tiny_artifact), **env) as successor:
        rest = generate(client, successor.url, session_id=sid, max_new_chars=40, temperature=0)["text"]
        ref = new_session(client, successor.url, PROMPT)
        assert generate(client, successor.url, session_id=ref, max_new_chars=70, temperature=0)["text"] == first + rest


def test_sigterm_drains_running_streams_saves_their_sessions_and_exits_0(
    tiny_artifact: Path, redis_server: RedisServer, client: httpx.Client
) -> None:
    drain_s = 8
    env = dict(state_url=redis_server.url, redis_prefix="d:", drain_timeout_s=drain_s, max_new_chars=LONG)
    server = ServerProcess(tiny_artifact, **env).start()
    proc = server.proc
    assert proc is not None
    results: dict[str, list[Any]] = {"short": [], "long": []}
    try:
        short_sid = new_session(client, server.url, PROMPT)
        long_sid = new_session(client, server.url, PROMPT)

        def stream(name: str, sid: str, chars: int) -> None:
            with httpx.Client(timeout=60) as own:
                body = dict(session_id=sid, max_new_chars=chars, stream=True, temperature=0)
                with own.stream("POST", server.url + "/v1/generate", json=body) as response:
                    for item in sse_data(response):
                        results[name].append(item)

        # the long stream cannot finish within the drain timeout; its speed sizes the short one,
        # which should take about 2 s: running when SIGTERM comes, done well within the timeout
        long_thread = threading.Thread(target=stream, args=("long", long_sid, LONG))
        long_thread.start()
        wait_until(lambda: results["long"], timeout=30, what="the long stream")
        before, t0 = len(text_of(results["long"])), time.monotonic()
        time.sleep(1.0)
        rate = (len(text_of(results["long"])) - before) / (time.monotonic() - t0)
        short_chars = int(min(max(rate * 2, 200), LONG))
        short_thread = threading.Thread(target=stream, args=("short", short_sid, short_chars))
        short_thread.start()
        wait_until(lambda: results["short"], timeout=30, what="the short stream")
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()

        # draining: no new generations (503 draining, on a new connection), not ready
        def refused() -> bool:
            response = httpx.post(server.url + "/v1/generate", json={"max_new_chars": 5}, timeout=5)
            return response.status_code == 503 and response.json()["error"]["code"] == "draining"

        assert wait_until(refused, timeout=5, what="503 draining")
        assert httpx.get(server.url + "/readyz", timeout=5).status_code == 503

        assert proc.wait(drain_s + 20) == 0
        assert time.monotonic() - signalled >= drain_s - 1  # it waited for the long stream
        # What an operator sees of it (`docker compose logs api`): the service's own log lines,
        # formatted like uvicorn's, not only uvicorn's "Shutting down".
        log = proc.stderr.read().decode()  # type: ignore[union-attr]
        # 2 streams, 3 when the first 5-character probe above reached it before the signal was handled
        assert re.search(rf"^INFO:     draining: [23] generation\(s\) running, up to {drain_s} s$", log, re.M), log
        assert "WARNING:  drain timeout: stopping 1 generation(s), saving what was sent\n" in log
        assert "INFO:     drained; shutting down\n" in log
        short_thread.join(10)
        long_thread.join(10)
    finally:
        server.stop()

    # the short stream finished normally during the drain and was saved
    short = results["short"]
    assert short[-1] == "[DONE]" and short[-2]["finish_reason"] == "length", short[-2:]
    assert len(text_of(short)) == short_chars
    # the long one was stopped at the drain timeout with an error event, saved at what it was sent
    long = results["long"]
    assert long[-1] == "[DONE]" and long[-2]["error"]["code"] == "interrupted", long[-2:]
    r = redis_server.client()
    assert describe_state(r.hget(KeyLayout("d:").session(long_sid), "state"))[1] == len(PROMPT) + len(text_of(long))
    assert describe_state(r.hget(KeyLayout("d:").session(short_sid), "state"))[1] == len(PROMPT) + short_chars
    assert r.keys("d:lease:*") == []  # every lease released
