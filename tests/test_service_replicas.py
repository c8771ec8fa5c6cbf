"""Two `chargen serve` processes sharing one real Redis: a session moves between replicas and
survives a restart, giving exactly the text one process would have given."""

from __future__ import annotations

import secrets
from pathlib import Path

import httpx
from pytest_redis.executor import RedisExecutor

from tests.service_support import ServerProcess, generate, new_session

PROMPT = "JULIET:\nsweet "


def test_sessions_continue_across_replicas_and_restarts(tiny_artifact: Path, redis_proc: RedisExecutor) -> None:
    env = dict(state_url=f"redis://{redis_proc.host}:{redis_proc.port}/0", redis_prefix=f"rep{secrets.token_hex(3)}:")
    a = ServerProcess(tiny_artifact, **env).start()
    b = ServerProcess(tiny_artifact, **env).start()
    try:
        with httpx.Client(timeout=60) as http:
            # greedy: 2N on A in one request == N on A then N on B
            whole = generate(
                http, a.url, session_id=new_session(http, a.url, PROMPT), max_new_chars=100, temperature=0
            )["text"]
            sid = new_session(http, a.url, PROMPT)
            first = generate(http, a.url, session_id=sid, max_new_chars=50, temperature=0)["text"]
            second = generate(http, b.url, session_id=sid, max_new_chars=50, temperature=0)["text"]
            assert first + second == whole

            # seeded sampling: continuing on B gives what continuing on A gives
            fork = http.post(f"{b.url}/v1/sessions/{sid}/fork").json()["session_id"]
            on_a = generate(http, a.url, session_id=sid, max_new_chars=80, temperature=1.0, top_k=10, seed=99)
            on_b = generate(http, b.url, session_id=fork, max_new_chars=80, temperature=1.0, top_k=10, seed=99)
            assert on_a["text"] == on_b["text"]

            # restart B: the session lives in Redis, not in the process
            before = http.get(f"{a.url}/v1/sessions/{sid}").json()["chars_consumed"]
            reference = generate(
                http,
                a.url,
                session_id=http.post(f"{a.url}/v1/sessions/{sid}/fork").json()["session_id"],
                max_new_chars=30,
                temperature=0,
            )["text"]
            b.stop()
            b.start()
            after_restart = generate(http, b.url, session_id=sid, max_new_chars=30, temperature=0)
            assert after_restart["text"] == reference
            assert http.get(f"{a.url}/v1/sessions/{sid}").json()["chars_consumed"] == before + 30
    finally:
        a.stop()
        b.stop()


def test_serve_refuses_a_bad_model_with_exit_code_2(tmp_path: Path) -> None:
    import subprocess

    from tests.service_support import CHARGEN

    not_a_model = tmp_path / "junk.pt"
    not_a_model.write_bytes(b"not torchscript")
    for model, words in ((tmp_path / "missing.pt", "not found"), (not_a_model, "not a TorchScript model")):
        done = subprocess.run(
            [CHARGEN, "serve", "--model", str(model), "--port", "0"], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 2 and words in done.stderr, done.stderr
