"""End to end over real HTTP: the real app under uvicorn on a free port, sessions in memory:// and in
a real redis-server (pytest-redis), every endpoint, session semantics, bad input, limits."""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pytest_redis import factories
from pytest_redis.executor import RedisExecutor

from service.artifact import load_model
from tests.service_support import (
    ServerThread,
    export_random_model,
    generate,
    generate_retrying_busy,
    metric,
    new_session,
    sse_data,
    wait_until,
)

PROMPT = "ROMEO:\nthe night "
LONG = 100_000  # a stream this long cannot finish while a test looks at it

redis_for_outage = factories.redis_proc()  # a redis-server of its own, to stop and start


def settings_for(store: str, model: Path, redis: RedisExecutor | None, **extra: Any) -> dict[str, Any]:
    url = "memory://" if store == "memory" else f"redis://{redis.host}:{redis.port}/0"  # type: ignore[union-attr]
    options: dict[str, Any] = dict(
        model=str(model),
        state_url=url,
        redis_prefix=f"t{secrets.token_hex(4)}:",
        max_new_chars=LONG,
        max_prompt_chars=500,
        max_body_bytes=4096,
    )
    options.update(extra)
    return options


@pytest.fixture(scope="module", params=["memory", "redis"])
def server(request: pytest.FixtureRequest, tiny_artifact: Path) -> Iterator[ServerThread]:
    redis = request.getfixturevalue("redis_proc") if request.param == "redis" else None
    with ServerThread(**settings_for(request.param, tiny_artifact, redis)) as running:
        yield running


def test_health_readiness_models_and_metrics(server: ServerThread, client: httpx.Client) -> None:
    assert client.get(server.url + "/healthz").json() == {"status": "ok"}
    ready = client.get(server.url + "/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert ready.json()["batch_invariant"] is True
    assert isinstance(ready.json()["step_min_rows"], int) and ready.json()["step_min_rows"] >= 1  # measured
    models = client.get(server.url + "/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["model"]
    assert models["data"][0]["fingerprint"].startswith("sha256:")
    generate(client, server.url, prompt="KING:", max_new_chars=5)
    text = client.get(server.url + "/metrics").text
    for name in (
        "chargen_http_requests_total",
        "chargen_chars_generated_total",
        "chargen_time_to_first_char_seconds",
        "chargen_time_between_chars_seconds",
        "chargen_active_streams",
        "chargen_sessions_created_total",
        "chargen_sessions_expired_total",
        "chargen_engine_batch_size",
        "chargen_engine_queue_length",
        "chargen_engine_streams_running",
        "chargen_engine_tick_seconds",
    ):
        assert f"\n{name}" in text, name
    assert 'route="/v1/generate",status="200"' in text


def test_generate_returns_the_documented_shape_and_seed_reproduces(server: ServerThread, client: httpx.Client) -> None:
    body = dict(prompt=PROMPT, max_new_chars=80, temperature=0.9, top_k=30, top_p=0.95, seed=7)
    first = generate(client, server.url, **body)
    assert set(first) == {"text", "finish_reason", "session_id", "model", "usage"}
    assert len(first["text"]) == 80 and first["finish_reason"] == "length" and first["session_id"] is None
    assert first["usage"] == {"prompt_chars": len(PROMPT), "completion_chars": 80}
    assert generate(client, server.url, **body)["text"] == first["text"]
    assert generate(client, server.url, **{**body, "seed": 8})["text"] != first["text"]
    streamed = client.post(server.url + "/v1/generate", json={**body, "stream": True})
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = list(sse_data(streamed))
    assert events[-1] == "[DONE]"
    assert events[-2] == {
        "finish_reason": "length",
        "session_id": None,
        "usage": {"prompt_chars": len(PROMPT), "completion_chars": 80},
    }
    assert "".join(e["text"] for e in events[:-2]) == first["text"]


def test_stop_strings_end_generation_and_are_not_returned(server: ServerThread, client: httpx.Client) -> None:
    full = generate(client, server.url, prompt=PROMPT, max_new_chars=200, temperature=0)["text"]
    stop = next(full[i : i + 2] for i in range(10, 150) if full.find(full[i : i + 2]) == i)
    cut = full.find(stop)
    out = generate(client, server.url, prompt=PROMPT, max_new_chars=200, temperature=0, stop=[stop, "zzzz"])
    assert (out["text"], out["finish_reason"], out["usage"]["completion_chars"]) == (full[:cut], "stop", cut)


def test_session_greedy_2n_equals_n_then_n(server: ServerThread, client: httpx.Client) -> None:
    one = new_session(client, server.url, PROMPT)
    two = new_session(client, server.url, PROMPT)
    whole = generate(client, server.url, session_id=one, max_new_chars=120, temperature=0)["text"]
    first = generate(client, server.url, session_id=two, max_new_chars=60, temperature=0)["text"]
    # the second half streamed: same state, same text
    events = list(
        sse_data(
            client.post(
                server.url + "/v1/generate", json=dict(session_id=two, max_new_chars=60, temperature=0, stream=True)
            )
        )
    )
    second = "".join(e["text"] for e in events if isinstance(e, dict) and "text" in e)
    assert first + second == whole
    assert events[-2]["session_id"] == two
    info = client.get(f"{server.url}/v1/sessions/{two}").json()
    assert info["chars_consumed"] == len(PROMPT) + 120 and info["model"] == "model"
    # a fresh session is the model's initial state: same as a stateless request with the same prompt
    fresh = new_session(client, server.url)
    with_session = generate(client, server.url, session_id=fresh, prompt=PROMPT, max_new_chars=40, temperature=0)
    assert with_session["text"] == generate(client, server.url, prompt=PROMPT, max_new_chars=40, temperature=0)["text"]


def test_session_lifecycle_fork_and_delete(server: ServerThread, client: httpx.Client) -> None:
    created = client.post(server.url + "/v1/sessions", json={"prompt": PROMPT})
    assert created.status_code == 201 and created.json()["expires_in_s"] == 3600
    sid = created.json()["session_id"]
    assert len(sid) >= 22  # >= 128 random bits
    info = client.get(f"{server.url}/v1/sessions/{sid}").json()
    assert info["session_id"] == sid and info["chars_consumed"] == len(PROMPT) and 0 < info["expires_in_s"] <= 3600
    forked = client.post(f"{server.url}/v1/sessions/{sid}/fork")
    assert forked.status_code == 201
    fork = forked.json()["session_id"]
    assert fork != sid
    a = generate(client, server.url, session_id=sid, max_new_chars=50, temperature=0.8, seed=3)["text"]
    b = generate(client, server.url, session_id=fork, max_new_chars=50, temperature=0.8, seed=3)["text"]
    assert a == b  # same state, same seed
    c = generate(client, server.url, session_id=fork, max_new_chars=20, temperature=0.8, seed=4)["text"]
    assert client.get(f"{server.url}/v1/sessions/{fork}").json()["chars_consumed"] == len(PROMPT) + 70
    assert client.get(f"{server.url}/v1/sessions/{sid}").json()["chars_consumed"] == len(PROMPT) + 50
    # the fork went on from the same state as its parent: the parent, asked the same, says the same
    assert len(c) == 20
    assert generate(client, server.url, session_id=sid, max_new_chars=20, temperature=0.8, seed=4)["text"] == c
    assert client.delete(f"{server.url}/v1/sessions/{sid}").status_code == 204
    for response in (
        client.get(f"{server.url}/v1/sessions/{sid}"),
        client.delete(f"{server.url}/v1/sessions/{sid}"),
        client.post(f"{server.url}/v1/sessions/{sid}/fork"),
        client.post(server.url + "/v1/generate", json={"session_id": sid}),
    ):
        assert response.status_code == 404, response.text
        assert sid in response.json()["error"]["message"]


def test_stream_is_incremental_and_disconnect_saves_the_sent_text(server: ServerThread, client: httpx.Client) -> None:
    sid = new_session(client, server.url, PROMPT)
    body = dict(session_id=sid, max_new_chars=LONG, temperature=0, stream=True)
    with client.stream("POST", server.url + "/v1/generate", json=body) as response:
        events = sse_data(response)
        received = next(events)["text"]
        # the first characters are here while the generation is still running: nothing is buffered
        assert metric(client, server.url, "chargen_active_streams") >= 1
        assert client.post(server.url + "/v1/generate", json={"session_id": sid}).status_code == 409
        received += next(events)["text"]
    # the client is gone: the server stops and saves the state after what it sent
    consumed = wait_until(
        lambda: (n := client.get(f"{server.url}/v1/sessions/{sid}").json()["chars_consumed"]) > len(PROMPT) and n,
        what="the session to be saved",
    )
    sent = consumed - len(PROMPT)
    assert len(received) <= sent < LONG
    rest = generate_retrying_busy(client, server.url, session_id=sid, max_new_chars=40, temperature=0)["text"]
    ref = generate(
        client, server.url, session_id=new_session(client, server.url, PROMPT), max_new_chars=sent + 40, temperature=0
    )["text"]
    assert ref.startswith(received)
    assert ref[sent:] == rest


def test_concurrent_use_of_one_session_is_409(server: ServerThread, client: httpx.Client) -> None:
    sid = new_session(client, server.url, PROMPT)
    body = dict(session_id=sid, max_new_chars=LONG, stream=True)
    with client.stream("POST", server.url + "/v1/generate", json=body) as response:
        events = sse_data(response)  # kept: dropping the iterator would close the response
        next(events)
        for method, path, payload in (
            ("POST", "/v1/generate", {"session_id": sid}),
            ("POST", "/v1/completions", {"model": "model", "session_id": sid}),
            ("DELETE", f"/v1/sessions/{sid}", None),
            ("POST", f"/v1/sessions/{sid}/fork", None),
        ):
            busy = client.request(method, server.url + path, json=payload)
            assert busy.status_code == 409, (path, busy.text)
            assert busy.json()["error"]["param"] == "session_id" and "in use" in busy.json()["error"]["message"]
    generate_retrying_busy(client, server.url, session_id=sid, max_new_chars=3)


def test_seeded_text_is_independent_of_concurrent_streams(server: ServerThread, client: httpx.Client) -> None:
    body = dict(prompt=PROMPT, max_new_chars=300, temperature=1.0, top_p=0.9, seed=2024)
    alone = generate(client, server.url, **body)["text"]
    results: dict[int, str] = {}

    def worker(i: int) -> None:
        with httpx.Client(timeout=60) as own:
            if i == 0:
                results[i] = generate(own, server.url, **body)["text"]
            else:
                events = sse_data(
                    own.post(
                        server.url + "/v1/generate",
                        json=dict(
                            prompt="KING:" * i,
                            max_new_chars=100 + 40 * i,
                            temperature=0.5 + i / 10,
                            seed=i,
                            stream=True,
                        ),
                    )
                )
                results[i] = "".join(e["text"] for e in events if isinstance(e, dict) and "text" in e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[0] == alone
    assert all(len(results[i]) == 100 + 40 * i for i in range(1, 8))


BAD_GENERATE = [
    ({"prompt": "caf\u00e9 \u20ac"}, 400, "prompt", "'\u00e9', '\u20ac'"),
    ({"prompt": "a" * 501}, 400, "prompt", "limit of 500"),
    ({"max_new_chars": LONG + 1}, 400, "max_new_chars", "limit"),
    ({"max_new_chars": -1}, 400, "max_new_chars", "greater than or equal"),
    ({"temperature": -0.1}, 400, "temperature", "greater than or equal"),
    ({"top_p": 0}, 400, "top_p", "greater than 0"),
    ({"top_p": 1.5}, 400, "top_p", "less than or equal"),
    ({"top_k": -1}, 400, "top_k", "greater than or equal"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
    ({"stop": ["x" * 65]}, 400, "stop", "limit of 64"),
    ({"stop": [""]}, 400, "stop", "empty"),
    ({"stream": "sometimes"}, 400, "stream", "boolean"),
    ({"prompt": 12}, 400, "prompt", "string"),
    ({"tempreature": 1}, 400, "tempreature", "unknown field"),
    ({"session_id": "A" * 32}, 404, "session_id", "does not exist or has expired"),
    ({"session_id": "../../etc"}, 404, "session_id", "no session"),
]


@pytest.mark.parametrize(("body", "status", "param", "words"), BAD_GENERATE)
def test_bad_input_is_a_4xx_naming_the_field(
    server: ServerThread, client: httpx.Client, body: dict[str, Any], status: int, param: str, words: str
) -> None:
    response = client.post(server.url + "/v1/generate", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and param in error["message"] and words in error["message"]
    assert set(error) == {"message", "type", "param", "code"}


def test_malformed_bodies_and_oversized_bodies(server: ServerThread, client: httpx.Client) -> None:
    url = server.url + "/v1/generate"
    cases = [
        (client.post(url, content=b'{"prompt": ', headers={"content-type": "application/json"}), 400, "body"),
        (client.post(url, content=b"[1, 2]", headers={"content-type": "application/json"}), 400, "body"),
        (client.post(url), 400, "body"),
        (client.post(url, json={"prompt": "a" * 5000}), 413, "body"),
        (client.post(server.url + "/v1/sessions", json={"prompt": "\u00e9"}), 400, "prompt"),
        (client.post(server.url + "/v1/sessions", json={"promt": "x"}), 400, "promt"),
    ]
    for response, status, param in cases:
        assert response.status_code == status, response.text
        assert response.json()["error"]["param"] == param
        assert param in response.json()["error"]["message"]

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while reading
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"a" * 1000
        yield b'"}'

    response = client.post(url, content=chunked(), headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["param"] == "body"
    assert client.get(server.url + "/nowhere").status_code == 404


def test_full_service_answers_429_with_retry_after(tiny_artifact: Path, client: httpx.Client) -> None:
    with ServerThread(**settings_for("memory", tiny_artifact, None, max_streams=1, max_queue=0)) as small:
        with client.stream("POST", small.url + "/v1/generate", json=dict(max_new_chars=LONG, stream=True)) as r:
            events = sse_data(r)  # kept: dropping the iterator would close the response
            next(events)
            refused = client.post(small.url + "/v1/generate", json={"max_new_chars": 5})
            assert refused.status_code == 429
            assert refused.headers["retry-after"] == "1"
            assert "capacity" in refused.json()["error"]["message"]
            assert client.post(small.url + "/v1/completions", json={"model": "model"}).status_code == 429
        wait_until(
            lambda: client.post(small.url + "/v1/generate", json={"max_new_chars": 5}).status_code == 200,
            what="the slot to free up",
        )


def test_a_state_saved_by_another_model_is_a_409(
    tiny_artifact: Path, redis_proc: RedisExecutor, client: httpx.Client, tmp_path: Path
) -> None:
    other = export_random_model(tmp_path / "other.pt", load_model(tiny_artifact).vocab, seed=5)
    shared = settings_for("redis", tiny_artifact, redis_proc)
    with ServerThread(**shared) as ours, ServerThread(**{**shared, "model": str(other)}) as theirs:
        sid = new_session(client, theirs.url, "KING:")
        response = client.post(ours.url + "/v1/generate", json={"session_id": sid})
        assert response.status_code == 409
        error = response.json()["error"]
        assert error["code"] == "model_mismatch" and "saved by model sha256:" in error["message"]
        info = client.get(f"{ours.url}/v1/sessions/{sid}").json()
        assert info["model"].startswith("sha256:")  # not ours: shown by fingerprint
        assert generate(client, theirs.url, session_id=sid, max_new_chars=5)["usage"]["completion_chars"] == 5


def test_redis_outage_503s_session_requests_only_and_recovers(
    tiny_artifact: Path, redis_for_outage: RedisExecutor, client: httpx.Client
) -> None:
    with ServerThread(**settings_for("redis", tiny_artifact, redis_for_outage, redis_timeout_s=1)) as srv:
        sid = new_session(client, srv.url, PROMPT)
        redis_for_outage.stop()
        try:
            response = client.post(srv.url + "/v1/generate", json={"session_id": sid, "max_new_chars": 5})
            assert response.status_code == 503
            assert "session store is unavailable" in response.json()["error"]["message"]
            assert client.post(srv.url + "/v1/sessions").status_code == 503
            assert generate(client, srv.url, prompt=PROMPT, max_new_chars=5)["usage"]["completion_chars"] == 5
            ready = client.get(srv.url + "/readyz")
            assert ready.status_code == 503 and "store" in ready.json()["reason"]
        finally:
            redis_for_outage.start()
        wait_until(lambda: client.get(srv.url + "/readyz").status_code == 200, what="recovery")
        sid = new_session(client, srv.url, PROMPT)  # the restarted Redis is empty; the service works again
        assert generate(client, srv.url, session_id=sid, max_new_chars=5)["session_id"] == sid


def test_openai_envelope_on_completions_errors(server: ServerThread, client: httpx.Client) -> None:
    url = server.url + "/v1/completions"
    for body, param in (
        ({"model": "model", "n": 17}, "n"),  # over CHARGEN_MAX_N
        ({"model": "gpt-4", "prompt": "x"}, "model"),
        ({"model": "model", "max_tokens": LONG + 1}, "max_tokens"),
        ({"model": "model", "prompt": ["a", "b"]}, "prompt"),
        ({"prompt": "x"}, "model"),
        ({"model": "model", "best_of": 3}, "best_of"),
        ({"model": "model", "suffix": "x"}, "suffix"),
        ({"model": "model", "logprobs": 6}, "logprobs"),
        ({"model": "model", "logit_bias": {"999": 1}}, "logit_bias"),
        ({"model": "model", "presence_penalty": 2.5}, "presence_penalty"),
    ):
        response = client.post(url, json=body)
        assert 400 <= response.status_code < 500, response.text
        assert response.json()["error"]["param"] == param, json.dumps(response.json())
