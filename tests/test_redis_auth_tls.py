"""Authenticated and encrypted Redis, with real redis-server processes started here: an ACL user
with only the rights docs/scaling.md lists, a password from a file, a TLS-only server with
certificates made by the test. Credentials never reach a log line, an error, /readyz or /metrics.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.settings import Settings
from tests.redis_support import CHARGEN_ACL, RedisServer, TlsFiles, make_tls_files
from tests.service_support import CHARGEN, ServerProcess, ServerThread, generate, new_session, wait_until

PASSWORD = "pw-Zq8vX3-never-shown"  # the chargen user's
ADMIN = "admin-Kt5mW9-never-shown"  # the default user's (the test's own client)
WRONG = "wrong-Hy2nB7-never-shown"


class LoggedServer(ServerProcess):
    """`chargen serve` with its stderr in a file (a pipe could fill up at log level debug), ready
    once /readyz answers with ``ready_status``."""

    def __init__(self, model: Path, log: Path, ready_status: int = 200, **env: Any) -> None:
        super().__init__(model, **env)
        self.log = log
        self.ready_status = ready_status

    def start(self) -> LoggedServer:
        args = ["serve", "--host", "127.0.0.1", "--port", str(self.port), "--model", str(self.model)]
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen([CHARGEN, *args], env=self.env, stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: httpx.get(self.url + "/readyz").status_code == self.ready_status, timeout=90)
        return self

    def output(self) -> str:
        self.stop()
        return self.log.read_text()


@pytest.fixture
def acl_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(
        tmp_path, password=ADMIN, extra_args=["--user", "chargen", *CHARGEN_ACL.split(), f">{PASSWORD}"]
    )
    yield server.start()
    server.stop()


def exercise(http: httpx.Client, url: str) -> list[str]:
    """Every kind of request that touches the store; returns the bodies of all the responses."""
    sid = new_session(http, url, "KING:\n")
    bodies = [str(generate(http, url, session_id=sid, max_new_chars=20))]
    with http.stream("POST", url + "/v1/generate", json={"session_id": sid, "max_new_chars": 20, "stream": True}) as r:
        bodies.append(r.read().decode())
    for response in (
        http.get(f"{url}/v1/sessions/{sid}"),
        http.post(f"{url}/v1/sessions/{sid}/fork"),
        http.delete(f"{url}/v1/sessions/{sid}"),
        http.get(url + "/readyz"),
        http.get(url + "/metrics"),
    ):
        assert response.status_code in (200, 201, 204), response.text
        bodies.append(response.text)
    return bodies


def test_an_acl_user_and_password_in_the_url_work_and_are_never_shown(
    tiny_artifact: Path, acl_redis: RedisServer, tmp_path: Path
) -> None:
    host = f"127.0.0.1:{acl_redis.port}"
    env: dict[str, Any] = dict(log_level="debug", redis_timeout_s=1)
    good = LoggedServer(tiny_artifact, tmp_path / "good.log", state_url=f"redis://chargen:{PASSWORD}@{host}/0", **env)
    bad = LoggedServer(tiny_artifact, tmp_path / "bad.log", 503, state_url=f"redis://chargen:{WRONG}@{host}/0", **env)
    try:
        with httpx.Client(timeout=60) as http:
            bodies = exercise(http, good.start().url)
            # the least-privilege user did all of it, on its own keys
            assert acl_redis.client().keys("chargen:session:*") != []
            # a wrong password: the service runs, and says why sessions fail, without the password
            ready = http.get(bad.start().url + "/readyz")
            assert "invalid username-password pair" in ready.json()["checks"]["store"], ready.text
            refused = http.post(bad.url + "/v1/sessions")
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "store_unavailable"
            bodies += [ready.text, refused.text, http.get(bad.url + "/metrics").text]
    finally:
        logs = [good.output(), bad.output()]
    assert "cannot connect to the session store yet: Redis error (invalid username-password pair" in logs[1], logs[1]
    for text in bodies + logs:
        for secret in (PASSWORD, WRONG):
            assert secret not in text


def test_a_password_file_and_a_user_name_in_the_url(
    tiny_artifact: Path, acl_redis: RedisServer, tmp_path: Path
) -> None:
    secret = tmp_path / "redis-password"
    secret.write_text(PASSWORD + "\n")  # as `echo` and editors write it
    url = f"redis://chargen@127.0.0.1:{acl_redis.port}/0"
    with (
        ServerThread(model=str(tiny_artifact), state_url=url, state_password_file=str(secret)) as srv,
        httpx.Client(timeout=60) as http,
    ):
        exercise(http, srv.url)


def test_serve_refuses_bad_credential_settings_without_repeating_them(tiny_artifact: Path, tmp_path: Path) -> None:
    secret = tmp_path / "redis-password"
    secret.write_text(PASSWORD)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    cases = [
        ({"CHARGEN_STATE_URL": f"redis://u:{PASSWORD}@h:1/0", "CHARGEN_STATE_PASSWORD_FILE": str(secret)}, "not both"),
        ({"CHARGEN_STATE_URL": "redis://u@h:1/0", "CHARGEN_STATE_PASSWORD_FILE": str(tmp_path / "no")}, "readable"),
        ({"CHARGEN_STATE_URL": "redis://u@h:1/0", "CHARGEN_STATE_PASSWORD_FILE": str(empty)}, "is empty"),
        ({"CHARGEN_STATE_URL": f"mongodb://u:{PASSWORD}@h:1/0"}, "must start with memory://"),
        ({"CHARGEN_STATE_URL": f"redis+cluster://u:{PASSWORD}@h:1,h2/"}, "host:port"),
        ({"CHARGEN_REDIS_PREFIX": "a{b}:"}, "must not contain { or }"),
    ]
    for env, words in cases:
        done = subprocess.run(
            [CHARGEN, "serve", "--model", str(tiny_artifact), "--port", "0"],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, **env},
        )
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], done.stderr
        assert PASSWORD not in done.stderr


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[RedisServer, TlsFiles]]:
    tls = make_tls_files(tmp_path)
    server = RedisServer(tmp_path, tls=tls)
    yield server.start(), tls
    server.stop()


def test_rediss_to_a_tls_only_server(tiny_artifact: Path, tls_redis: tuple[RedisServer, TlsFiles]) -> None:
    server, tls = tls_redis
    client_cert = dict(state_tls_cert_file=str(tls.client_cert), state_tls_key_file=str(tls.client_key))
    settings = dict(model=str(tiny_artifact), redis_timeout_s=1, **client_cert)
    with httpx.Client(timeout=60) as http:
        with ServerThread(state_url=server.url, state_tls_ca_file=str(tls.ca), **settings) as srv:
            exercise(http, srv.url)
        assert server.client().keys("chargen:session:*") != []  # written over TLS
        # a server whose certificate does not chain to the configured CA is refused
        with ServerThread(state_url=server.url, state_tls_ca_file=str(tls.other_ca), **settings) as srv:
            ready = http.get(srv.url + "/readyz")
            assert ready.status_code == 503 and "CERTIFICATE_VERIFY_FAILED" in ready.text, ready.text
        # and plain redis:// gets nowhere: the server has no plain port
        with ServerThread(state_url=server.url.replace("rediss://", "redis://"), **settings) as srv:
            ready = http.get(srv.url + "/readyz")
            assert ready.status_code == 503 and ready.json()["checks"]["store"].startswith("unavailable"), ready.text


def test_the_settings_object_never_shows_the_store_password() -> None:
    # A Settings object ends up in tracebacks, debuggers and log lines (`log.debug("%r", settings)`).
    settings = Settings(state_url="redis://chargen:s3cret-pw@127.0.0.1:6379/0")
    assert "s3cret-pw" not in repr(settings)
    assert "s3cret-pw" not in str(settings)
    assert settings.state_url == "redis://chargen:s3cret-pw@127.0.0.1:6379/0"  # still there for the store
