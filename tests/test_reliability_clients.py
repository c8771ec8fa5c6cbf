"""Clients that misbehave, against a real `chargen serve` process: streams opened and never read,
streams read very slowly, and 50 simultaneous requests on one session.

(A client that disconnects mid-stream is tests/test_service_api.py::
test_stream_is_incremental_and_disconnect_saves_the_sent_text.)
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
from pytest_redis.executor import RedisExecutor

from tests.service_support import ServerProcess, ServerThread, metric, new_session, sse_data, wait_until

PROMPT = "ROMEO:\nthe night "


def open_stream(port: int, body: dict[str, Any], rcvbuf: int = 4096) -> socket.socket:
    """A raw HTTP/1.1 streaming request on a socket with a small receive buffer; nothing is read."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: sets the window
    sock.connect(("127.0.0.1", port))
    payload = json.dumps(body).encode()
    head = (
        "POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    sock.sendall(head.encode() + payload)
    return sock


def dechunk(raw: bytes) -> bytes:
    """The body of a chunked HTTP/1.1 response."""
    _, _, rest = raw.partition(b"\r\n\r\n")
    body = b""
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        body += rest[:size]
        rest = rest[size + 2 :]
    return body


def plateau(client: httpx.Client, url: str, name: str, still_s: float = 1.5, timeout: float = 60) -> float:
    """Wait until a counter stops moving; its value then."""
    deadline = time.monotonic() + timeout
    last = metric(client, url, name)
    while time.monotonic() < deadline:
        time.sleep(still_s)
        now = metric(client, url, name)
        if now == last:
            return now
        last = now
    raise AssertionError(f"{name} kept growing")


def test_never_reading_clients_stop_generation_memory_stays_bounded_and_rows_are_freed(
    tiny_artifact: Path, client: httpx.Client
) -> None:
    asked = 10_000_000
    env = dict(max_new_chars=asked, stream_window=64, stream_stall_timeout_s=4, socket_send_buffer_bytes=8192)
    with ServerProcess(tiny_artifact, **env) as srv:
        assert srv.proc is not None
        process = psutil.Process(srv.proc.pid)
        client.post(srv.url + "/v1/generate", json={"prompt": PROMPT, "max_new_chars": 2000})  # warm up
        rss_before = process.memory_info().rss
        sessions = [new_session(client, srv.url, PROMPT) for _ in range(2)]
        bodies = [{"session_id": sid, "max_new_chars": asked, "stream": True} for sid in sessions]
        bodies += [{"prompt": PROMPT, "max_new_chars": asked, "stream": True, "seed": i} for i in range(14)]

        slow: dict[str, Any] = {}

        def slow_reader() -> None:  # reads ~20 KB/s: slower than generation, but it keeps reading
            sock = open_stream(srv.port, {"prompt": PROMPT, "max_new_chars": 6000, "stream": True, "seed": 99})
            raw = b""
            started = time.monotonic()
            while not raw.endswith(b"0\r\n\r\n"):
                chunk = sock.recv(1024)
                if not chunk:
                    break
                raw += chunk
                time.sleep(0.05)
            slow["seconds"] = time.monotonic() - started
            slow["events"] = [line[6:] for line in dechunk(raw).decode().split("\n\n") if line.startswith("data: ")]
            sock.close()

        reader = threading.Thread(target=slow_reader)
        reader.start()
        socks = [open_stream(srv.port, body) for body in bodies]
        try:
            wait_until(lambda: metric(client, srv.url, "chargen_active_streams") >= 16, what="the streams")
            # generation stops: each row waits CHARGEN_STREAM_WINDOW characters past what its
            # connection accepted, and the connection accepts only its buffers' worth (~200 KB
            # of socket and transport buffers; a piece carries many characters, ~1 byte each)
            total = plateau(client, srv.url, "chargen_chars_generated_total")
            assert total < 16 * 100_000, total  # asked for 16 x 10 million
            rss_growth = process.memory_info().rss - rss_before
            assert rss_growth < 64 * 2**20, f"RSS grew {rss_growth / 2**20:.0f} MiB"
            # after CHARGEN_STREAM_STALL_TIMEOUT_S without progress the rows, slots and leases are freed
            wait_until(
                lambda: metric(client, srv.url, "chargen_engine_streams_running") == 0,
                timeout=30,
                what="the stalled rows to be dropped",
            )
            assert metric(client, srv.url, "chargen_active_streams") == 0
            for sid in sessions:  # usable again, saved at what its connection accepted
                consumed = client.get(f"{srv.url}/v1/sessions/{sid}").json()["chars_consumed"]
                assert len(PROMPT) < consumed < len(PROMPT) + 100_000
                more = client.post(srv.url + "/v1/generate", json={"session_id": sid, "max_new_chars": 5})
                assert more.status_code == 200, more.text
            assert process.is_running() and client.get(srv.url + "/healthz").status_code == 200
        finally:
            for sock in socks:
                sock.close()
            reader.join(120)
        # the slow reader was never dropped: its pauses are shorter than the stall timeout
        events = slow["events"]
        assert events[-1] == "[DONE]", events[-3:]
        assert json.loads(events[-2])["finish_reason"] == "length"
        assert sum(len(json.loads(e).get("text", "")) for e in events[:-2]) == 6000


def test_fifty_simultaneous_requests_on_one_session(
    tiny_artifact: Path, redis_proc: RedisExecutor, client: httpx.Client
) -> None:
    url = f"redis://{redis_proc.host}:{redis_proc.port}/0"
    with ServerThread(model=str(tiny_artifact), state_url=url, redis_prefix="c50:", max_queue=64) as srv:
        sid = new_session(client, srv.url, PROMPT)
        expected = len(PROMPT)
        for round_ in range(2):
            barrier = threading.Barrier(50)
            outcomes: list[tuple[int, int]] = []  # (status, chars fed + returned)
            lock = threading.Lock()

            def worker(i: int, barrier: threading.Barrier, outcomes: list[Any], lock: threading.Lock) -> None:
                prompt = "KING:"[: i % 6]
                chars = 1 + (i * 7) % 40
                with httpx.Client(timeout=60) as own:
                    barrier.wait()
                    if i % 3 == 0:  # streamed
                        body = dict(session_id=sid, prompt=prompt, max_new_chars=chars, stream=True, seed=i)
                        with own.stream("POST", srv.url + "/v1/generate", json=body) as response:
                            if response.status_code == 200:
                                events = list(sse_data(response))
                                assert events[-1] == "[DONE]"
                                got = sum(len(e.get("text", "")) for e in events if isinstance(e, dict))
                                assert got == events[-2]["usage"]["completion_chars"] == chars
                                result = (200, len(prompt) + got)
                            else:
                                response.read()
                                result = (response.status_code, 0)
                    elif i % 3 == 1:  # OpenAI completions
                        body = dict(model="model", session_id=sid, prompt=prompt, max_tokens=chars, seed=i)
                        response = own.post(srv.url + "/v1/completions", json=body)
                        ok = response.status_code == 200
                        result = (
                            response.status_code,
                            len(prompt) + len(response.json()["choices"][0]["text"]) if ok else 0,
                        )
                    else:
                        body = dict(session_id=sid, prompt=prompt, max_new_chars=chars, seed=i)
                        response = own.post(srv.url + "/v1/generate", json=body)
                        ok = response.status_code == 200
                        result = (response.status_code, len(prompt) + len(response.json()["text"]) if ok else 0)
                    if response.status_code == 409:
                        assert response.json()["error"]["code"] == "session_busy"
                with lock:
                    outcomes.append(result)

            threads = [threading.Thread(target=worker, args=(i, barrier, outcomes, lock)) for i in range(50)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert len(outcomes) == 50
            statuses = {status for status, _ in outcomes}
            assert statuses <= {200, 409}, outcomes
            assert 200 in statuses and 409 in statuses, (round_, outcomes)
            expected += sum(fed for status, fed in outcomes if status == 200)
            # exactly what the successful requests fed and returned: no lost or doubled update
            assert client.get(f"{srv.url}/v1/sessions/{sid}").json()["chars_consumed"] == expected
