"""Hostile input over real HTTP: each gets a clear 4xx in OpenAI's envelope, never a 5xx; and
nothing a client sends becomes a Redis command or key (watched with Redis MONITOR)."""

from __future__ import annotations

import secrets
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
import redis
from pytest_redis.executor import RedisExecutor

from service.state_store.layout import KeyLayout
from tests.service_support import ServerThread, new_session

JSON = {"content-type": "application/json"}

# (name, raw body, status, param, words in the message)
HOSTILE: list[tuple[str, bytes, int, str | None, str]] = [
    ("huge body", b'{"prompt": "' + b"a" * 100_000 + b'"}', 413, "body", "larger than the limit"),
    ("deeply nested JSON", b"[" * 3000 + b"]" * 3000, 400, "body", "nested more than 64"),
    (
        "nested JSON in a field",
        b'{"prompt": ' + b"[" * 1500 + b"]" * 1500 + b"}",
        400,
        "body",
        "nested more than 64 levels",
    ),
    ("a list instead of a string", b'{"prompt": [[["a"]]]}', 400, "prompt", "string"),
    ("invalid UTF-8", b'{"prompt": "\xff\xfe\xc3"}', 400, "body", "invalid UTF-8"),
    ("NUL byte in the prompt", b'{"prompt": "ROMEO\\u0000"}', 400, "prompt", "'\\x00'"),
    ("bell and escape in the prompt", b'{"prompt": "a\\u0007\\u001b"}', 400, "prompt", "'\\x07', '\\x1b'"),
    ("raw control character in JSON", b'{"prompt": "a\x01"}', 400, "body", "not valid JSON"),
    ("lone surrogate in the prompt", b'{"prompt": "\\ud800"}', 400, "prompt", "'\\ud800'"),
    ("lone surrogate as a field name", b'{"\\udfff": 1}', 400, "body", "unicode"),
    ("enormous max_new_chars", b'{"max_new_chars": 10000000000000000000000000000000}', 400, "max_new_chars", "limit"),
    ("max_new_chars 1e308", b'{"max_new_chars": 1e308}', 400, "max_new_chars", "integer"),
    ("max_new_chars overflowing to infinity", b'{"max_new_chars": 1e999}', 400, "max_new_chars", "finite"),
    ("negative max_new_chars", b'{"max_new_chars": -1}', 400, "max_new_chars", "greater than or equal to 0"),
    ("NaN temperature", b'{"temperature": NaN}', 400, "temperature", "finite"),
    ("infinite temperature", b'{"temperature": Infinity}', 400, "temperature", "finite"),
    ("negative temperature", b'{"temperature": -1}', 400, "temperature", "greater than or equal"),
    ("NaN top_p", b'{"top_p": NaN}', 400, "top_p", "less than or equal"),
    ("NaN seed", b'{"seed": NaN}', 400, "seed", "finite"),
    ("seed past 64 bits", b'{"seed": 18446744073709551616}', 400, "seed", "less than or equal"),
    ("huge top_k", b'{"top_k": 99999999999999999999}', 400, "top_k", "less than or equal"),
    ("integer of 5000 digits", b'{"seed": ' + b"9" * 5000 + b"}", 400, "body", "number too long"),
    ("not an object", b'"prompt"', 400, "body", "JSON object"),
]


def test_nesting_is_refused_whatever_the_recursion_limit(server: ServerThread, client: httpx.Client) -> None:
    """The nesting limit is the service's own, not the parser's recursion limit, which other code in
    the process (hypothesis does) may raise: then 200 levels inside a field parsed and reached the
    field's validation instead (this test depended on which tests ran before it)."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)
    try:
        nested = b'{"prompt": ' + b"[" * 1500 + b"]" * 1500 + b"}"
        response = client.post(server.url + "/v1/generate", content=nested, headers=JSON)
    finally:
        sys.setrecursionlimit(limit)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "body"
    assert response.json()["error"]["message"] == "body: JSON nested more than 64 levels deep"
    # brackets inside a string are text, not nesting: the prompt reaches its own check
    text = "[" * 100 + "{" * 100
    response = client.post(server.url + "/v1/generate", json={"prompt": text, "max_new_chars": 1})
    assert response.json()["error"]["code"] == "unknown_characters", response.text


@pytest.fixture(scope="module")
def server(tiny_artifact: Path, redis_proc: RedisExecutor) -> Iterator[ServerThread]:
    settings = dict(
        model=str(tiny_artifact),
        state_url=f"redis://{redis_proc.host}:{redis_proc.port}/0",
        redis_prefix="hostile:",
        max_body_bytes=65536,
    )
    with ServerThread(**settings) as running:
        yield running


@pytest.mark.parametrize(("name", "body", "status", "param", "words"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_bodies_get_a_clear_4xx(
    server: ServerThread, client: httpx.Client, name: str, body: bytes, status: int, param: str | None, words: str
) -> None:
    cases = [("/v1/generate", body)]
    if param in ("prompt", "temperature", "top_p", "top_k", "seed"):  # same fields on the OpenAI route
        cases.append(("/v1/completions", b'{"model": "model", ' + body[1:]))
    for path, content in cases:
        response = client.post(server.url + path, content=content, headers=JSON)
        assert response.status_code == status, (path, response.text)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["param"] == param and words in error["message"], (path, error)


def test_nul_and_control_characters_are_named_and_the_service_carries_on(
    server: ServerThread, client: httpx.Client
) -> None:
    # the vocabulary decides: characters the model was never trained on are refused by name
    for text in ("\x00", "\r", "\x7f", "\u202e", "\ufeff"):
        response = client.post(server.url + "/v1/sessions", json={"prompt": "KING:" + text})
        assert response.status_code == 400 and repr(text) in response.json()["error"]["message"]
    assert client.get(server.url + "/healthz").status_code == 200
    ok = client.post(server.url + "/v1/generate", json={"prompt": "KING:", "max_new_chars": 5})
    assert ok.status_code == 200


def test_nothing_from_a_client_reaches_redis_as_a_command_or_key(
    server: ServerThread, client: httpx.Client, redis_proc: RedisExecutor
) -> None:
    """Ids are checked against the token pattern before any Redis call; values go as script
    arguments, never spliced into commands. MONITOR shows every command Redis receives."""
    hostile_ids = [
        "*",
        "../../../../etc/passwd",
        "a" * 31 + "\r",
        "x\r\nFLUSHALL\r\n",
        "session:*",
        "hostile:lease:" + "A" * 18,
        "A" * 33,
        "%2e%2e%2f",
        "' OR 1=1 --",
        "{{7*7}}",
    ]
    marker = "MARK" + secrets.token_hex(8)
    seen: list[str] = []
    stop = threading.Event()

    def monitor() -> None:
        with redis.Redis(host=redis_proc.host, port=redis_proc.port).monitor() as m:
            for command in m.listen():
                seen.append(command["command"])
                if marker in command["command"] or stop.is_set():
                    return

    watcher = threading.Thread(target=monitor, daemon=True)
    watcher.start()
    time.sleep(0.3)
    for sid in hostile_ids:
        if sid.isprintable():  # in a URL path too (percent-encoded by the client)
            assert client.get(server.url + "/v1/sessions/" + quote(sid, safe="")).status_code == 404
        for method, path, body in (
            ("POST", "/v1/generate", {"session_id": sid}),
            ("POST", "/v1/completions", {"model": "model", "session_id": sid}),
        ):
            response = client.request(method, server.url + path, json=body)
            assert response.status_code == 404, response.text
            assert response.json()["error"]["code"] == "session_not_found"
    real = new_session(client, server.url, "KING:")  # a legitimate call shows MONITOR works
    redis.Redis(host=redis_proc.host, port=redis_proc.port).get(marker)
    watcher.join(10)
    stop.set()
    log = "\n".join(seen)
    assert real in log
    keys = KeyLayout("hostile:")
    assert keys.session(real) in log
    arguments = {token for line in seen for token in line.split(" ")}
    for sid in hostile_ids:
        shown = sid.replace("\r", "\\r").replace("\n", "\\n")  # how MONITOR prints them
        assert shown not in arguments, sid
        assert keys.session(shown) not in log and keys.lease(shown) not in log, sid
    assert not any(line.upper().startswith("FLUSHALL") for line in seen)
    assert redis.Redis(host=redis_proc.host, port=redis_proc.port).exists(keys.session(real)) == 1
