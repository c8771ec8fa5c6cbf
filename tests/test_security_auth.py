"""API keys over real HTTP: 401s, open probes, sessions owned by their key, the per-key stream
limit, keys configured as digests, and keys never logged or stored."""

from __future__ import annotations

import hashlib
import os
import secrets
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from pytest_redis.executor import RedisExecutor

from service.auth import ApiKeys
from service.state_store.layout import KeyLayout
from tests.service_support import CHARGEN, ServerThread, free_port, sse_data, wait_until

ALICE = "sk-alice-" + secrets.token_hex(16)
BOB = "sk-bob-" + secrets.token_hex(16)
CAROL = "sk-carol-" + secrets.token_hex(16)  # configured only as its SHA-256 digest
PROMPT = "ROMEO:\nthe night "


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def server(tiny_artifact: Path, redis_proc: RedisExecutor) -> Iterator[ServerThread]:
    keys = f"{ALICE}, {BOB},sha256:{hashlib.sha256(CAROL.encode()).hexdigest()}"
    settings = dict(
        model=str(tiny_artifact),
        state_url=f"redis://{redis_proc.host}:{redis_proc.port}/0",
        redis_prefix="auth:",
        api_keys=keys,
        max_streams_per_key=2,
        max_new_chars=1_000_000,
    )
    with ServerThread(**settings) as running:
        yield running


PROTECTED = [
    ("POST", "/v1/generate", {"prompt": "KING:", "max_new_chars": 3}),
    ("POST", "/v1/completions", {"model": "model", "prompt": "KING:", "max_tokens": 3}),
    ("GET", "/v1/models", None),
    ("GET", "/v1/models/model", None),
    ("POST", "/v1/sessions", None),
    ("GET", "/v1/sessions/" + "A" * 32, None),
    ("DELETE", "/v1/sessions/" + "A" * 32, None),
    ("POST", f"/v1/sessions/{'A' * 32}/fork", None),
]


def test_every_api_route_needs_a_valid_key(server: ServerThread, client: httpx.Client) -> None:
    for method, path, body in PROTECTED:
        for headers in ({}, bearer("sk-wrong"), {"Authorization": ALICE}, {"Authorization": f"Basic {ALICE}"}):
            response = client.request(method, server.url + path, json=body, headers=headers)
            assert response.status_code == 401, (method, path, headers, response.text)
            assert response.headers["www-authenticate"].startswith("Bearer")
            error = response.json()["error"]
            assert error["code"] in ("missing_api_key", "invalid_api_key")
            assert set(error) == {"message", "type", "param", "code"}
            assert ALICE not in response.text
        for key in (ALICE, CAROL):
            response = client.request(method, server.url + path, json=body, headers=bearer(key))
            assert response.status_code != 401, (method, path, response.text)


def test_probes_metrics_and_the_playground_page_need_no_key(server: ServerThread, client: httpx.Client) -> None:
    assert client.get(server.url + "/healthz").status_code == 200
    assert client.get(server.url + "/readyz").status_code == 200
    assert client.get(server.url + "/metrics").status_code == 200
    assert client.get(server.url + "/openapi.json").status_code == 200
    page = client.get(server.url + "/")  # the playground page: open, its API calls send the key
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert client.get(server.url + "/static/app.js").status_code == 200


def test_a_session_belongs_to_its_key_and_is_invisible_to_others(
    server: ServerThread, client: httpx.Client, redis_proc: RedisExecutor
) -> None:
    created = client.post(server.url + "/v1/sessions", json={"prompt": PROMPT}, headers=bearer(ALICE))
    assert created.status_code == 201
    sid = created.json()["session_id"]
    mine = client.get(f"{server.url}/v1/sessions/{sid}", headers=bearer(ALICE))
    assert mine.status_code == 200 and mine.json()["chars_consumed"] == len(PROMPT)
    # Bob sees exactly what he would see for a session that does not exist
    for method, path, body in (
        ("GET", f"/v1/sessions/{sid}", None),
        ("POST", "/v1/generate", {"session_id": sid, "max_new_chars": 3}),
        ("POST", "/v1/completions", {"model": "model", "session_id": sid, "max_tokens": 3}),
        ("POST", f"/v1/sessions/{sid}/fork", None),
        ("DELETE", f"/v1/sessions/{sid}", None),
    ):
        theirs = client.request(method, server.url + path, json=body, headers=bearer(BOB))
        missing = client.request(
            method,
            server.url + path.replace(sid, "B" * 32),
            json=body and {**body, "session_id": "B" * 32},
            headers=bearer(BOB),
        )
        assert theirs.status_code == missing.status_code == 404, (path, theirs.text)
        assert theirs.json()["error"]["code"] == missing.json()["error"]["code"] == "session_not_found"
    # Bob's attempts changed nothing and did not lock it
    ok = client.post(server.url + "/v1/generate", json={"session_id": sid, "max_new_chars": 5}, headers=bearer(ALICE))
    assert ok.status_code == 200, ok.text
    # a fork belongs to the same key
    fork = client.post(f"{server.url}/v1/sessions/{sid}/fork", headers=bearer(ALICE)).json()["session_id"]
    assert client.get(f"{server.url}/v1/sessions/{fork}", headers=bearer(ALICE)).status_code == 200
    assert client.get(f"{server.url}/v1/sessions/{fork}", headers=bearer(BOB)).status_code == 404
    # Redis holds an owner id, never the key or its plain digest
    r = redis.Redis(host=redis_proc.host, port=redis_proc.port)
    record = r.hgetall(KeyLayout("auth:").session(sid))
    owner = record[b"owner"].decode()
    assert owner == r.hget(KeyLayout("auth:").session(fork), "owner").decode()
    dump = b"".join(k + v for k, v in record.items())
    assert ALICE.encode() not in dump and hashlib.sha256(ALICE.encode()).hexdigest().encode() not in dump
    assert owner == ApiKeys(ALICE).owner_of(ALICE) and ApiKeys(ALICE).owner_of(BOB) is None
    assert client.delete(f"{server.url}/v1/sessions/{sid}", headers=bearer(ALICE)).status_code == 204


def test_per_key_concurrent_stream_limit(server: ServerThread, client: httpx.Client) -> None:
    body = {"prompt": PROMPT, "max_new_chars": 1_000_000, "stream": True}
    with (
        httpx.Client(timeout=60) as one,
        httpx.Client(timeout=60) as two,
        one.stream("POST", server.url + "/v1/generate", json=body, headers=bearer(ALICE)) as first,
    ):
        events_1 = sse_data(first)
        next(events_1)
        with two.stream("POST", server.url + "/v1/generate", json=body, headers=bearer(ALICE)) as second:
            events_2 = sse_data(second)
            next(events_2)
            third = client.post(server.url + "/v1/generate", json={"max_new_chars": 3}, headers=bearer(ALICE))
            assert third.status_code == 429, third.text
            assert third.json()["error"]["code"] == "key_stream_limit" and third.headers["retry-after"]
            # another key is not affected
            other = client.post(server.url + "/v1/generate", json={"max_new_chars": 3}, headers=bearer(BOB))
            assert other.status_code == 200
    # the slots come back when the streams end
    wait_until(
        lambda: (
            client.post(server.url + "/v1/generate", json={"max_new_chars": 3}, headers=bearer(ALICE)).status_code
            == 200
        ),
        what="the key's slots to free up",
    )


def test_keys_are_not_logged(tiny_artifact: Path, tmp_path: Path) -> None:
    key = "sk-secret-" + secrets.token_hex(16)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "CHARGEN_API_KEYS": key, "CHARGEN_LOG_LEVEL": "debug"}
    log_file = tmp_path / "serve.log"
    with log_file.open("wb") as out:
        proc = subprocess.Popen(
            [CHARGEN, "serve", "--port", str(port), "--model", str(tiny_artifact)], env=env, stdout=out, stderr=out
        )
        try:
            wait_until(lambda: httpx.get(url + "/readyz", timeout=2).status_code == 200, timeout=90, what="serve")
            with httpx.Client(timeout=30) as c:
                assert c.get(url + "/v1/models", headers=bearer(key)).status_code == 200
                assert c.get(url + "/v1/models", headers=bearer(key + "x")).status_code == 401
                assert c.get(url + "/v1/models", headers={"Authorization": key}).status_code == 401
                assert c.post(url + "/v1/generate", json={"prompt": key}, headers=bearer(key)).status_code == 400
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
    log = log_file.read_text()
    assert "GET /v1/models" in log  # the access log is there, at debug level
    assert key not in log and hashlib.sha256(key.encode()).hexdigest() not in log
