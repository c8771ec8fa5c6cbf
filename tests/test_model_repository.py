"""A models directory served by two `chargen serve` replicas on one real Redis: models published,
replaced, broken and removed while streams and sessions run, and the operators' load/unload.

Every publish is what the training job does: write a temporary name in the directory, then
rename it over the artifact's name (one atomic step).
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pytest_redis.executor import RedisExecutor

from service.artifact import load_model
from tests.service_support import ServerProcess, ServerThread, export_random_model, sse_data, wait_until, with_meta

ADMIN_KEY = "admin-" + secrets.token_urlsafe(12)
API_KEY = "user-" + secrets.token_urlsafe(12)
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
STREAM = {"prompt": "KING:", "max_new_chars": 600, "temperature": 1.0, "top_k": 8, "seed": 11}


def publish(source: Path, directory: Path, name: str, rename: bool = True) -> None:
    """As the training job does: a temporary name, then a rename. The artifact's meta.json is
    given the file's stem as its name (so the id is the stem) unless ``rename`` is False."""
    tmp = directory / f".{name}.tmp"
    if rename:
        with_meta(source, tmp, name=name.removesuffix(".pt"))
    else:
        shutil.copyfile(source, tmp)
    os.replace(tmp, directory / name)


def models(http: httpx.Client, url: str) -> dict[str, dict[str, Any]]:
    response = http.get(url + "/v1/models", headers=AUTH)
    assert response.status_code == 200, response.text
    return {row["id"]: row for row in response.json()["data"]}


def serving(http: httpx.Client, urls: list[str], model_id: str, fingerprint: str) -> bool:
    for url in urls:
        row = models(http, url).get(model_id)
        if row is None or row["status"] != "ready" or row["fingerprint"] != fingerprint:
            return False
    return True


class Answers:
    """Every HTTP answer the test gets, so it can say that none was a 5xx."""

    def __init__(self) -> None:
        self.statuses: list[int] = []

    def hook(self, response: httpx.Response) -> None:
        self.statuses.append(response.status_code)


@pytest.fixture
def http() -> Iterator[tuple[httpx.Client, Answers]]:
    answers = Answers()
    with httpx.Client(timeout=60, event_hooks={"response": [answers.hook]}) as client:
        yield client, answers
    assert [s for s in answers.statuses if s >= 500] == []


def test_two_replicas_follow_the_models_directory(
    tiny_artifact: Path, redis_proc: RedisExecutor, tmp_path: Path, http: tuple[httpx.Client, Answers]
) -> None:
    client, _ = http
    vocab = load_model(tiny_artifact).vocab
    directory = tmp_path / "models"
    directory.mkdir()
    publish(tiny_artifact, directory, "base.pt")
    versions = [export_random_model(tmp_path / f"fresh-v{i}.pt", vocab, seed=i) for i in (1, 2, 3)]
    fingerprints = [load_model(path).fingerprint for path in versions]
    env = dict(
        models_dir=directory,
        state_url=f"redis://{redis_proc.host}:{redis_proc.port}/0",
        redis_prefix=f"repo{secrets.token_hex(3)}:",
        keep_versions=1,
        models_poll_s=0.5,
        api_keys=API_KEY,
        admin_keys=ADMIN_KEY,
    )
    a, b = ServerProcess(None, **env).start(), ServerProcess(None, **env).start()
    urls = [a.url, b.url]
    try:
        reference = client.post(a.url + "/v1/generate", json=STREAM | {"stream": False}, headers=AUTH).json()
        assert reference["model"] == "base" and len(reference["text"]) == 600

        # 1. publish a model while a stream of the first runs: the stream completes unchanged
        with client.stream("POST", a.url + "/v1/generate", json=STREAM | {"stream": True}, headers=AUTH) as r:
            assert r.status_code == 200
            events = sse_data(r)
            text = next(events)["text"]
            publish(versions[0], directory, "fresh.pt")
            wait_until(lambda: serving(client, urls, "fresh", fingerprints[0]), timeout=30, what="fresh on both")
            for event in events:
                if event == "[DONE]":
                    break
                text += event.get("text", "")
        assert text == reference["text"]
        for url in urls:  # the new id answers on both replicas
            answer = client.post(url + "/v1/generate", json={"model": "fresh", "max_new_chars": 5}, headers=AUTH)
            assert answer.status_code == 200 and answer.json()["model"] == "fresh", answer.text

        # 2. replace it while a session exists: the session stays on its version
        created = client.post(a.url + "/v1/sessions", json={"model": "fresh", "prompt": "KING:"}, headers=AUTH)
        assert created.status_code == 201 and created.json()["model_fingerprint"] == fingerprints[0], created.text
        sid = created.json()["session_id"]
        publish(versions[1], directory, "fresh.pt")
        wait_until(lambda: serving(client, urls, "fresh", fingerprints[1]), timeout=30, what="fresh v2 on both")
        for url in urls:
            row = models(client, url)["fresh"]
            assert [(v["fingerprint"], v["status"]) for v in row["versions"]] == [
                (fingerprints[0], "ready"),
                (fingerprints[1], "ready"),
            ]
            answer = client.post(url + "/v1/generate", json={"session_id": sid, "max_new_chars": 10}, headers=AUTH)
            assert answer.status_code == 200 and answer.json()["model"] == "fresh", answer.text
            info = client.get(f"{url}/v1/sessions/{sid}", headers=AUTH).json()
            assert info["model"] == "fresh" and info["model_fingerprint"] == fingerprints[0]
        new = client.post(b.url + "/v1/sessions", json={"model": "fresh"}, headers=AUTH).json()
        assert new["model_fingerprint"] == fingerprints[1]  # new sessions: the new version

        # a third version: v1 is past CHARGEN_KEEP_VERSIONS=1, so its session gets the 409
        publish(versions[2], directory, "fresh.pt")
        wait_until(lambda: serving(client, urls, "fresh", fingerprints[2]), timeout=30, what="fresh v3 on both")
        for url in urls:
            wait_until(
                lambda url=url: (
                    [v["fingerprint"] for v in models(client, url)["fresh"]["versions"]] == fingerprints[1:]
                ),
                timeout=30,
                what="v1 unloaded",
            )
            answer = client.post(url + "/v1/generate", json={"session_id": sid, "max_new_chars": 10}, headers=AUTH)
            assert answer.status_code == 409, answer.text
            error = answer.json()["error"]
            assert error["code"] == "model_version_retired" and error["param"] == "session_id"
            assert (
                fingerprints[0] in error["message"] and f"the current version is {fingerprints[2]}" in error["message"]
            )
            kept = client.post(
                url + "/v1/generate", json={"session_id": new["session_id"], "max_new_chars": 5}, headers=AUTH
            )
            assert kept.status_code == 200, kept.text  # v2 is still kept

        # 3. a truncated file and a garbage file: listed failed, the others unaffected
        (directory / "truncated.pt").write_bytes(tiny_artifact.read_bytes()[:5000])
        (directory / "garbage.pt").write_bytes(secrets.token_bytes(4096))
        for url in urls:
            wait_until(
                lambda url=url: (
                    {models(client, url).get(n, {}).get("status") for n in ("truncated", "garbage")} == {"failed"}
                ),
                timeout=30,
                what="both listed failed",
            )
            listed = models(client, url)
            assert "is not a TorchScript model" in listed["truncated"]["reason"]
            assert "is not a TorchScript model" in listed["garbage"]["reason"]
            assert listed["base"]["status"] == listed["fresh"]["status"] == "ready"
            answer = client.post(url + "/v1/generate", json={"model": "garbage"}, headers=AUTH)
            assert answer.status_code == 404
            assert answer.json()["error"]["message"] == "model: 'garbage' is not served here (served: 'base', 'fresh')"
            answer = client.post(url + "/v1/generate", json={"model": "base", "max_new_chars": 5}, headers=AUTH)
            assert answer.status_code == 200

        # 4. remove a model during a stream: the stream finishes, then the id is gone
        body = STREAM | {"stream": True, "model": "base"}  # the default is now the newest model, fresh
        with client.stream("POST", b.url + "/v1/generate", json=body, headers=AUTH) as r:
            events = sse_data(r)
            text = next(events)["text"]
            (directory / "base.pt").unlink()
            wait_until(
                lambda: models(client, b.url).get("base", {}).get("status") in (None, "draining"),
                timeout=30,
                what="base draining",
            )
            refused = client.post(b.url + "/v1/generate", json={"model": "base"}, headers=AUTH)
            assert refused.status_code == 404
            assert refused.json()["error"]["message"] == "model: 'base' is not served here (served: 'fresh')"
            final = None
            for event in events:
                if event == "[DONE]":
                    break
                text += event.get("text", "")
                final = event.get("finish_reason") or final
        assert text == reference["text"] and final == "length"
        for url in urls:
            wait_until(lambda url=url: "base" not in models(client, url), timeout=30, what="base unloaded")

        # 5. the operators' endpoints: an admin key, not an API key
        unload = f"{a.url}/v1/models/fresh/unload"
        assert client.post(unload).status_code == 401
        assert client.post(unload, headers=AUTH).json()["error"]["code"] == "not_admin"
        assert client.post(unload, headers=AUTH).status_code == 403
        gone = client.post(unload, headers=ADMIN)
        assert gone.status_code == 202 and gone.json()["id"] == "fresh"
        wait_until(lambda: "fresh" not in models(client, a.url), timeout=30, what="fresh unloaded on A")
        assert models(client, b.url)["fresh"]["status"] == "ready"  # B was not told: per replica
        assert client.post(f"{a.url}/v1/models/fresh/load", headers=AUTH).status_code == 403
        loaded = client.post(f"{a.url}/v1/models/fresh/load", headers=ADMIN)
        assert loaded.status_code == 200 and loaded.json()["fingerprint"] == fingerprints[2], loaded.text
        broken = client.post(f"{a.url}/v1/models/garbage/load", headers=ADMIN)
        assert broken.status_code == 422 and "is not a TorchScript model" in broken.json()["error"]["message"]
        missing = client.post(f"{a.url}/v1/models/nothing/load", headers=ADMIN)
        assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"
    finally:
        a.stop()
        b.stop()


def test_max_models_and_a_bad_replacement_leave_the_served_models_alone(tiny_artifact: Path, tmp_path: Path) -> None:
    directory = tmp_path / "models"
    directory.mkdir()
    publish(tiny_artifact, directory, "a.pt")
    other = export_random_model(tmp_path / "b.pt", load_model(tiny_artifact).vocab, seed=3)
    with ServerThread(models_dir=directory, max_models=1, models_poll_s=0.3) as srv, httpx.Client(timeout=30) as http:
        publish(other, directory, "b.pt")
        wait_until(lambda: models(http, srv.url).get("b", {}).get("status") == "failed", what="b failed")
        assert models(http, srv.url)["b"]["reason"] == (
            "b.pt: CHARGEN_MAX_MODELS=1 models are served already ('a'); remove or unload one, or raise the limit"
        )
        fingerprint = models(http, srv.url)["a"]["fingerprint"]
        (directory / "a.pt").write_bytes(b"half a model")  # replaced in place by something broken
        wait_until(lambda: models(http, srv.url)["a"]["last_error"], what="a's bad replacement noticed")
        row = models(http, srv.url)["a"]
        assert row["status"] == "ready" and row["fingerprint"] == fingerprint
        assert http.post(srv.url + "/v1/generate", json={"model": "a", "max_new_chars": 3}).status_code == 200
        # admin endpoints are off without CHARGEN_ADMIN_KEYS
        off = http.post(srv.url + "/v1/models/a/unload", headers=ADMIN)
        assert off.status_code == 403 and off.json()["error"]["code"] == "admin_disabled"


def test_the_default_model_and_unknown_ids(tiny_artifact: Path, tmp_path: Path) -> None:
    directory = tmp_path / "models"
    directory.mkdir()
    publish(tiny_artifact, directory, "a.pt")
    publish(export_random_model(tmp_path / "b.pt", load_model(tiny_artifact).vocab, seed=4), directory, "b.pt")
    with ServerThread(models_dir=directory, default_model="a") as srv, httpx.Client(timeout=30) as http:
        assert http.post(srv.url + "/v1/generate", json={"max_new_chars": 2}).json()["model"] == "a"
        assert http.post(srv.url + "/v1/generate", json={"max_new_chars": 2, "model": "b"}).json()["model"] == "b"
        unknown = http.post(srv.url + "/v1/completions", json={"model": "c", "prompt": "x"})
        assert unknown.status_code == 404
        assert unknown.json()["error"] == {
            "message": "model: 'c' is not served here (served: 'a', 'b')",
            "type": "not_found_error",
            "param": "model",
            "code": "model_not_found",
        }
        session = http.post(srv.url + "/v1/sessions", json={"model": "b"}).json()["session_id"]
        wrong = http.post(srv.url + "/v1/inspect", json={"text": "K", "model": "a", "session_id": session})
        assert wrong.status_code == 409 and wrong.json()["error"]["code"] == "model_mismatch"
        assert http.post(srv.url + "/v1/inspect", json={"text": "K", "session_id": session}).json()["model"] == "b"
        assert [row["default"] for row in http.get(srv.url + "/v1/models").json()["data"]] == [True, False]


def test_a_model_id_is_the_env_then_the_meta_name_then_the_stem(tiny_artifact: Path, tmp_path: Path) -> None:
    named = with_meta(tiny_artifact, tmp_path / "run-7.pt", name="poet")  # as training/export writes it
    assert load_model(named).model_id == "poet"
    assert load_model(named, "chosen").model_id == "chosen"  # CHARGEN_MODEL_ID
    assert load_model(with_meta(tiny_artifact, tmp_path / "older.pt", name="")).model_id == "older"  # no name
    directory = tmp_path / "models"
    directory.mkdir()
    publish(named, directory, "run-7.pt", rename=False)
    with ServerThread(models_dir=directory) as srv, httpx.Client(timeout=30) as http:
        assert models(http, srv.url)["poet"]["file"] == "run-7.pt"


def test_a_half_written_file_fails_then_loads_once_complete_and_a_wrong_format_is_listed(
    tiny_artifact: Path, tmp_path: Path
) -> None:
    directory = tmp_path / "models"
    directory.mkdir()
    publish(tiny_artifact, directory, "a.pt")
    newer = with_meta(tiny_artifact, tmp_path / "newer.pt", format="chargen-lstm/2")
    with ServerThread(models_dir=directory, models_poll_s=0.3) as srv, httpx.Client(timeout=30) as http:
        whole = with_meta(tiny_artifact, tmp_path / "late-src.pt", name="late").read_bytes()
        late = directory / "late.pt"
        with late.open("wb") as f:  # copied in place, not renamed: seen half-written first
            f.write(whole[: len(whole) // 2])
            f.flush()
            wait_until(lambda: models(http, srv.url).get("late", {}).get("status") == "failed", what="late failed")
            f.write(whole[len(whole) // 2 :])
        wait_until(lambda: models(http, srv.url)["late"]["status"] == "ready", what="late loaded when complete")
        assert models(http, srv.url)["late"]["reason"] is None
        publish(newer, directory, "newer.pt")
        wait_until(lambda: models(http, srv.url).get("newer", {}).get("status") == "failed", what="newer failed")
        assert models(http, srv.url)["newer"]["reason"] == (
            f"{directory / 'newer.pt'} is not a chargen model "
            "(meta.json format: 'chargen-lstm/2', not 'chargen-lstm/1')"
        )
        assert sorted(http.get(srv.url + "/readyz").json()["models"]) == ["a", "late"]


def test_serve_refuses_a_models_dir_that_is_not_one_or_one_beside_a_model(tmp_path: Path) -> None:
    import subprocess

    from tests.service_support import CHARGEN

    cases = [
        ({"CHARGEN_MODELS_DIR": str(tmp_path / "none")}, f"CHARGEN_MODELS_DIR: {tmp_path / 'none'} is not a directory"),
        (
            {"CHARGEN_MODELS_DIR": str(tmp_path), "CHARGEN_MODEL": str(tmp_path / "a.pt")},
            "CHARGEN_MODEL and CHARGEN_MODELS_DIR are exclusive",
        ),
    ]
    for env, words in cases:
        done = subprocess.run(
            [CHARGEN, "serve", "--port", "0"], env={**os.environ, **env}, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 2 and words in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
