"""`chargen serve --workers N`: real worker processes on one port, sessions in a real Redis.

One supervisor with two workers: both count in /metrics (prometheus multiprocess mode, summed),
a killed worker is replaced, seeded text and sessions are the same whichever worker answers,
and SIGTERM drains every worker's streams (each saves its session) before an exit 0 that leaves
no metrics directory behind. Without Redis, more than one worker is refused. Connections spread
evenly, and a stopped worker does not hold the others back.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from pytest_redis.executor import RedisExecutor

from service.balancer import SLOT, STALE_S, LoadTable, now_ms
from service.main import create_app, exit_status, worker_server
from service.settings import Settings
from tests.service_support import CHARGEN, ServerProcess, generate, metric, new_session, wait_until

PROMPT = "JULIET:\nsweet "
LONG = 8000  # characters each draining stream still has to produce after SIGTERM (well over 0.1 s)


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def stream_to_end(url: str, body: dict[str, Any], started: threading.Event, out: dict[str, Any]) -> None:
    """One streaming generation: set ``started`` at its first text, keep its text and last event."""
    text: list[str] = []
    with httpx.Client(timeout=120) as http, http.stream("POST", f"{url}/v1/generate", json=body) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            text.append(event.get("text", ""))
            started.set()
            out["last"] = event
    out["text"] = "".join(text)


def test_auto_is_the_cores_this_process_may_use() -> None:
    assert Settings(workers="auto").worker_count == len(os.sched_getaffinity(0))
    assert Settings(workers="3").worker_count == 3
    assert Settings().worker_count == 1


@pytest.mark.parametrize(
    ("args", "env", "words"),
    [
        (["--workers", "2"], {}, "set CHARGEN_STATE_URL=redis://HOST:6379/0 (or run one worker)"),
        ([], {"CHARGEN_WORKERS": "2"}, "set CHARGEN_STATE_URL=redis://HOST:6379/0 (or run one worker)"),
        (["--workers", "none"], {}, "CHARGEN_WORKERS: Value error, expected a whole number from 1 to 256, or auto"),
    ],
)
def test_more_workers_than_one_need_redis_and_a_count(
    tiny_artifact: Path, args: list[str], env: dict[str, str], words: str
) -> None:
    done = subprocess.run(
        [CHARGEN, "serve", "--model", str(tiny_artifact), "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "CHARGEN_STATE_URL": "memory://", **env},
    )
    assert done.returncode == 2
    assert len(done.stderr.splitlines()) == 1 and words in done.stderr, done.stderr


def test_workers_share_a_port_replace_the_dead_and_drain_on_sigterm(
    tiny_artifact: Path, redis_proc: RedisExecutor, tmp_path: Path
) -> None:
    state = dict(state_url=f"redis://{redis_proc.host}:{redis_proc.port}/0", redis_prefix=f"w{secrets.token_hex(3)}:")
    server = ServerProcess(tiny_artifact, workers=2, max_new_chars=LONG, **state)
    server.env["TMPDIR"] = str(tmp_path)  # where the supervisor makes its metrics directory
    server.start()
    supervisor = server.proc
    assert supervisor is not None
    try:
        with httpx.Client(timeout=60) as http:
            wait_until(lambda: metric(http, server.url, "chargen_workers") == 2, what="both workers")
            assert len(children(supervisor.pid)) == 2
            assert all("tcmalloc_minimal" in Path(f"/proc/{pid}/maps").read_text() for pid in children(supervisor.pid))
            assert [p.name.startswith("chargen-metrics-") for p in tmp_path.iterdir()] == [True]

            # seeded text and sessions do not depend on the worker: each request a new connection
            seeded = {"prompt": PROMPT, "max_new_chars": 40, "temperature": 1.0, "seed": 5}
            texts = {httpx.post(f"{server.url}/v1/generate", json=seeded, timeout=60).json()["text"] for _ in range(8)}
            assert len(texts) == 1
            whole = generate(
                http, server.url, session_id=new_session(http, server.url, PROMPT), max_new_chars=60, temperature=0
            )
            sid = new_session(http, server.url, PROMPT)
            parts = [
                httpx.post(
                    f"{server.url}/v1/generate",
                    json={"session_id": sid, "max_new_chars": 20, "temperature": 0},
                    timeout=60,
                ).json()["text"]
                for _ in range(3)
            ]
            assert "".join(parts) == whole["text"]

            # every worker's counts, summed: 8 + 1 + 3 generations, 8 * 40 + 60 + 3 * 20 characters
            generated = 'chargen_http_requests_total{method="POST",route="/v1/generate",status="200"}'
            assert metric(http, server.url, generated) == 12
            wait_until(lambda: metric(http, server.url, "chargen_chars_generated_total") == 440, what="flushes")

            # a worker that dies is replaced; the dead one leaves the live gauge
            victim = children(supervisor.pid)[0]
            os.kill(victim, signal.SIGKILL)
            wait_until(lambda: victim not in children(supervisor.pid) and len(children(supervisor.pid)) == 2)
            wait_until(lambda: metric(http, server.url, "chargen_workers") == 2, what="the replacement")
            assert supervisor.poll() is None

            # SIGTERM: both workers drain, their streams end whole and their sessions are saved
            sessions = [new_session(http, server.url, PROMPT) for _ in range(4)]
            outs: list[dict[str, Any]] = [{} for _ in sessions]
            started = [threading.Event() for _ in sessions]
            threads = [
                threading.Thread(
                    target=stream_to_end,
                    args=(server.url, {"session_id": s, "max_new_chars": LONG, "stream": True}, started[i], outs[i]),
                )
                for i, s in enumerate(sessions)
            ]
            for thread in threads:
                thread.start()
            for event in started:
                assert event.wait(60)
            supervisor.send_signal(signal.SIGTERM)
            draining = wait_until(lambda: http.get(f"{server.url}/readyz").status_code == 503, what="draining")
            assert draining
            for thread in threads:
                thread.join(120)
            assert supervisor.wait(60) == 0
        assert [len(out["text"]) for out in outs] == [LONG] * 4
        assert [out["last"]["finish_reason"] for out in outs] == ["length"] * 4
        assert list(tmp_path.iterdir()) == []  # the metrics directory went with the supervisor
    finally:
        server.stop()

    # the drained sessions are in Redis at what their clients got: a fresh server continues them
    with ServerProcess(tiny_artifact, **state) as single, httpx.Client(timeout=60) as http:
        consumed = [http.get(f"{single.url}/v1/sessions/{s}").json()["chars_consumed"] for s in sessions]
        assert consumed == [len(PROMPT) + LONG] * 4


# ---- connections spread over the workers (service/balancer.py) --------------------------------


def worker_connections(url: str) -> dict[int, float]:
    """Each worker's open connections, by pid, as /metrics shows them (asked on a new connection)."""
    out = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("chargen_worker_connections{"):
            labels, value = line.rsplit(" ", 1)
            out[int(labels.split('pid="')[1].split('"')[0])] = float(value)
    return out


def test_the_load_table_compares_live_workers_only(tmp_path: Path) -> None:
    path = tmp_path / "connections"
    LoadTable.create(path, 3)
    table = LoadTable(path)
    assert table.least_of_others(0) is None  # no other worker has started
    table.publish(1, 5)
    table.publish(2, 3)
    assert (table.least_of_others(0), table.least_of_others(2)) == (3, 5)
    table.retire(2)  # stopping, or reaped by the supervisor
    assert table.least_of_others(0) == 5
    SLOT.pack_into(table._map, SLOT.size, 5, now_ms() - int(2000 * STALE_S))  # a heartbeat 2 s old: wedged
    assert table.least_of_others(0) is None
    table.close()


def load_table(table: Path) -> tuple[list[int], list[float]]:
    """Each live worker's open connections and the seconds since its last heartbeat, read from the
    workers' own load table (no connection of ours among them)."""
    loads = LoadTable(table)
    try:
        live = [(count, beat) for count, beat in map(loads.read, range(loads.slots)) if count >= 0]
    finally:
        loads.close()
    return [count for count, _ in live], [(now_ms() - beat) / 1000 for _, beat in live]


def test_workers_take_turns_and_one_that_stops_is_left_out(tiny_artifact: Path, redis_proc: RedisExecutor) -> None:
    """20 connections opened one after another split 10/10 (the kernel's hash or a race would
    rarely give that); with one worker stopped (SIGSTOP), the other takes every new connection
    once the stopped one's heartbeat is a second old.

    A worker starved of the CPU for a second (a loaded CI machine) is rightly left out like a
    stopped one, and the split is then not the rule's: such an attempt is retried, and only
    attempts during which every heartbeat stayed fresh are judged."""
    state = dict(state_url=f"redis://{redis_proc.host}:{redis_proc.port}/0", redis_prefix=f"b{secrets.token_hex(3)}:")
    server = ServerProcess(tiny_artifact, workers=2, **state)
    server.start()
    assert server.proc is not None
    clients: list[httpx.Client] = []
    try:
        wait_until(lambda: len(worker_connections(server.url)) == 2, what="both workers")
        table = Path(Path(f"/proc/{children(server.proc.pid)[0]}/cmdline").read_bytes().split(b"\0")[-2].decode())
        for _attempt in range(3):
            for client in clients:
                client.close()
            clients.clear()
            wait_until(lambda: load_table(table)[0] == [0, 0], what="idle workers")  # our scrapes closed too
            fresh, spread = True, []
            for _ in range(20):  # each a keep-alive connection of its own, kept open
                fresh = fresh and max(load_table(table)[1]) < STALE_S / 2
                client = httpx.Client(timeout=10)
                clients.append(client)
                assert client.get(server.url + "/healthz").status_code == 200
                counts, ages = load_table(table)
                fresh = fresh and max(ages) < STALE_S / 2
                spread.append(max(counts) - min(counts))
            if fresh:
                break
        assert fresh, "a worker's heartbeat went stale in every attempt: the machine was starved"
        assert spread == [1, 0] * 10  # they took turns, connection by connection
        assert sorted(worker_connections(server.url).values()) == [10.0, 11.0]  # 11: the scrape's own

        stopped = children(server.proc.pid)[0]
        os.kill(stopped, signal.SIGSTOP)
        try:
            for _ in range(4):
                client = httpx.Client(timeout=10)
                clients.append(client)
                assert client.get(server.url + "/healthz").status_code == 200
            counts = worker_connections(server.url)
            assert (counts[stopped], sum(counts.values())) == (10.0, 25.0)  # 4 + the scrape, all elsewhere
        finally:
            os.kill(stopped, signal.SIGCONT)
    finally:
        for client in clients:
            client.close()
        server.stop()


def test_a_worker_whose_engine_dies_drains_and_exits_1_for_the_supervisor_to_replace(
    tiny_artifact: Path, redis_proc: RedisExecutor, tmp_path: Path
) -> None:
    """A dead engine would keep taking its share of the connections and answer each with 503
    while probes on the shared port mostly reach the other workers: the worker leaves instead."""
    settings = Settings(
        model=str(tiny_artifact),
        state_url=f"redis://{redis_proc.host}:{redis_proc.port}/0",
        redis_prefix=f"e{secrets.token_hex(3)}:",
        drain_timeout_s=5,
    )
    LoadTable.create(tmp_path / "connections", 2)
    table = LoadTable(tmp_path / "connections")
    listener = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    app = create_app(settings)
    server = worker_server(app, settings, listener, table, 0, None)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: httpx.get(url + "/healthz", timeout=5).status_code == 200, what="the worker")
        assert table.read(0)[0] >= 0  # taking its turns
        engine = app.state.registry.resolve(None).engine

        def broken(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("injected: handing text over failed")

        engine._handover.flush = broken  # outside the tick's own guard: the engine thread dies of it
        reply = httpx.post(url + "/v1/generate", json={"prompt": PROMPT, "max_new_chars": 5}, timeout=30)
        assert (reply.status_code, reply.json()["error"]["code"]) == (503, "engine_stopped")
        thread.join(30)
        assert not thread.is_alive()
        assert (server.engine_died, exit_status(server)) == (True, 1)
        assert table.read(0)[0] == -1  # out of the turns: the other workers take every new connection
    finally:
        server.should_exit = server.force_exit = True
        thread.join(10)
        listener.close()
        table.close()
