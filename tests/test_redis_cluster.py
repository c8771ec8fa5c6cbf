"""Two `chargen serve` replicas on a real Redis Cluster (3 primaries, a replica each, started
here on loopback), and one primary SIGKILLed while streams run.

What it shows (docs/scaling.md quotes the window it prints):
- sessions continue across replicas, and one session used at once gives one 200 and 409s;
- streams and sessions on the other shards never notice the failure;
- a stream on the failed shard ends with a 503 error event, its session's requests get 503
  (`store_unavailable`) during the failover window, /readyz stays 200 and names the shard;
- after the window, every session there continues from its last saved state.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.state_store.layout import key_slot
from tests.redis_support import LocalCluster
from tests.service_support import ServerProcess, generate, new_session, sse_data, wait_until

PROMPT = "KING:\nthe night "


def generate_when_free(http: httpx.Client, url: str, session_id: str, within_s: float) -> str:
    """40 greedy characters on the session, once no lease holds it (retrying 409 session_busy)."""
    deadline = time.monotonic() + within_s
    while True:
        body = {"session_id": session_id, "max_new_chars": 40, "temperature": 0}
        response = http.post(url + "/v1/generate", json=body)
        busy = response.status_code == 409 and response.json()["error"]["code"] == "session_busy"
        if not busy or time.monotonic() > deadline:
            assert response.status_code == 200, response.text
            return str(response.json()["text"])
        time.sleep(0.1)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """Its own cluster: this test kills a node."""
    cluster = LocalCluster(tmp_path, password="cluster-secret-4711").start()
    yield cluster
    cluster.stop()


class Stream:
    """A streamed generation read in a thread until stopped, an error event, or its end."""

    def __init__(self, url: str, session_id: str) -> None:
        self.url = url
        self.session_id = session_id
        self.text = ""
        self.error: dict[str, Any] | None = None
        self.error_at: float | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        body = {"session_id": self.session_id, "max_new_chars": 1_000_000, "stream": True, "temperature": 0}
        with httpx.Client(timeout=30) as http, http.stream("POST", self.url + "/v1/generate", json=body) as response:
            assert response.status_code == 200
            for data in sse_data(response):
                if isinstance(data, dict) and "error" in data:
                    self.error, self.error_at = data["error"], time.monotonic()
                    return
                if isinstance(data, dict):
                    self.text += data["text"]
                if self.stop.is_set() or data == "[DONE]":
                    return
                time.sleep(0.01)  # a client reading at its own pace: the stream lasts

    def start(self) -> Stream:
        self.thread.start()
        wait_until(lambda: len(self.text) > 50, timeout=30, what="the stream to start")
        return self

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(30)


def shard_of(cluster: LocalCluster, session_id: str) -> int:
    return cluster.primary_of_slot(key_slot(session_id))


def reference(http: httpx.Client, url: str, session_id: str, chars: int) -> str:
    """What a session's next greedy characters are now, read from a fork (the session is untouched)."""
    fork = http.post(f"{url}/v1/sessions/{session_id}/fork")
    assert fork.status_code == 201, fork.text
    text = generate(http, url, session_id=fork.json()["session_id"], max_new_chars=chars, temperature=0)["text"]
    assert http.delete(f"{url}/v1/sessions/{fork.json()['session_id']}").status_code == 204
    return text


def test_two_replicas_on_a_cluster_and_a_primary_killed_mid_stream(tiny_artifact: Path, cluster: LocalCluster) -> None:
    # a 3 s lease is renewed every second, so a stream on the failed shard finds out within the window
    env = dict(state_url=cluster.url, redis_timeout_s=1, lease_ms=3000, max_new_chars=1_000_000, log_level="warning")
    a = ServerProcess(tiny_artifact, **env).start()
    b = ServerProcess(tiny_artifact, **env).start()
    try:
        with httpx.Client(timeout=60) as http:
            # a session continues on the other replica exactly as on the same one
            whole = generate(http, a.url, session_id=new_session(http, a.url, PROMPT), max_new_chars=80, temperature=0)
            sid = new_session(http, a.url, PROMPT)
            first = generate(http, a.url, session_id=sid, max_new_chars=40, temperature=0)["text"]
            second = generate(http, b.url, session_id=sid, max_new_chars=40, temperature=0)["text"]
            assert first + second == whole["text"]

            # one session used by six requests at once, on both replicas: one 200, five 409
            barrier = threading.Barrier(6)

            def contend(url: str) -> tuple[int, str | None]:
                barrier.wait()
                response = httpx.post(url + "/v1/generate", json={"session_id": sid, "max_new_chars": 3000}, timeout=60)
                return response.status_code, response.json().get("error", {}).get("code")

            with ThreadPoolExecutor(6) as pool:
                outcomes = Counter(pool.map(contend, [a.url, b.url] * 3))
            assert outcomes == {(200, None): 1, (409, "session_busy"): 5}

            # sessions spread over the three shards; the victim is the shard of the first
            sessions = [new_session(http, (a.url, b.url)[i % 2], PROMPT) for i in range(18)]
            victim = shard_of(cluster, sessions[0])
            on_victim = [s for s in sessions if shard_of(cluster, s) == victim]
            elsewhere = [s for s in sessions if shard_of(cluster, s) != victim]
            assert len(on_victim) >= 2 and len(elsewhere) >= 2, (len(on_victim), len(elsewhere))
            streamed_victim, quiet_victim = on_victim[0], on_victim[1:]
            streamed_other, quiet_other = elsewhere[0], elsewhere[1:]
            expected = {s: reference(http, a.url, s, 40) for s in quiet_victim + quiet_other[:3]}
            greedy = generate(
                http, a.url, session_id=new_session(http, a.url, PROMPT), max_new_chars=3000, temperature=0
            )

            streams = [Stream(a.url, streamed_victim).start(), Stream(b.url, streamed_other).start()]
            wait_until(lambda: cluster.replica_caught_up(victim), timeout=10, what="the replica to catch up")
            cluster.kill(victim)
            killed_at = time.monotonic()

            # the failover window, seen from both replicas: the failed shard's sessions get 503,
            # the others keep working, /readyz stays 200 and names the failed primary
            seen: Counter[str] = Counter()
            while True:
                assert time.monotonic() - killed_at < 30, "no replica took over"
                statuses = [http.get(f"{url}/v1/sessions/{quiet_victim[0]}").status_code for url in (a.url, b.url)]
                if statuses == [200, 200]:
                    window = time.monotonic() - killed_at
                    break
                assert set(statuses) <= {200, 503}, statuses
                down = http.get(f"{a.url}/v1/sessions/{quiet_victim[0]}")
                if down.status_code == 503:
                    assert down.json()["error"]["code"] == "store_unavailable", down.text
                    seen["503"] += 1
                for other in quiet_other[:2]:
                    assert http.get(f"{b.url}/v1/sessions/{other}").status_code == 200
                    seen["other shard 200"] += 1
                ready = http.get(a.url + "/readyz")
                assert ready.status_code == 200, ready.text
                if "degraded" in ready.json():
                    assert f"127.0.0.1:{victim}" in ready.json()["degraded"]["store"]
                    seen["readyz degraded"] += 1
                time.sleep(0.05)
            print(f"\nfailover window: {window:.2f} s from SIGKILL until the shard's sessions answer again")
            assert seen["503"] >= 1 and seen["readyz degraded"] >= 1 and seen["other shard 200"] >= 2, seen
            wait_until(lambda: "degraded" not in http.get(a.url + "/readyz").json(), timeout=10, what="readyz")

            # the stream on the failed shard ended with an error event; the other one never noticed
            victim_stream, other_stream = streams
            wait_until(lambda: victim_stream.error is not None, timeout=10, what="the error event")
            assert other_stream.error is None and other_stream.thread.is_alive()
            for stream in streams:
                stream.finish()
            # Its save at the end failed while the shard was down (store_unavailable: the session
            # keeps its state from before the stream), or, when the stream learned of the failure
            # just as the window closed, reached the promoted replica (interrupted: saved after
            # exactly the text the client got). Either way it continues from that saved state.
            consumed = http.get(f"{b.url}/v1/sessions/{streamed_victim}").json()["chars_consumed"] - len(PROMPT)
            code = {0: "store_unavailable", len(victim_stream.text): "interrupted"}.get(consumed)
            assert victim_stream.error is not None and victim_stream.error["code"] == code, (
                consumed,
                victim_stream.error,
            )
            # The stream's lease, if the promoted replica has it, is freed by replica A's retried
            # release once the shard answers, or expires after lease_ms: until then, 409 session_busy.
            got = generate_when_free(http, b.url, streamed_victim, within_s=3 + 2)  # lease_ms=3000
            assert got == greedy["text"][consumed : consumed + 40]

            # every session continues from its last saved state: the failed shard's from before
            # the stream (the stream's own save could not happen), the others' as they were
            for session_id, text in expected.items():
                url = (a.url, b.url)[hash(session_id) % 2]
                got = generate(http, url, session_id=session_id, max_new_chars=40, temperature=0)["text"]
                assert got == text, session_id
            after = generate(http, b.url, session_id=streamed_other, max_new_chars=10, temperature=0)
            assert len(after["text"]) == 10
    finally:
        a.stop()
        b.stop()
