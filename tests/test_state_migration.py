"""Sessions stored by chargen 0.1 (keys without hash tags): refused with a clear 503 naming the
migration, then moved by `python -m service.state_store.migrate`, in place or into a cluster."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import httpx
import redis

from service.state_store import RedisStore
from service.state_store.layout import KeyLayout
from tests.redis_support import LocalCluster, RedisServer
from tests.service_support import ServerThread, generate, new_session

PROMPT = "QUEEN:\nmy lord "
OLD = KeyLayout("chargen:")


def to_old_layout(r: redis.Redis, session_id: str, lease: bool = False) -> None:
    """Rewrite a session under chargen 0.1's key names, as 0.1 wrote them."""
    fields = r.hgetall(OLD.session(session_id))
    ttl_ms = r.pttl(OLD.session(session_id))
    r.delete(OLD.session(session_id))
    r.zrem(OLD.expiries(session_id), session_id)
    r.hset(OLD.old_session(session_id), mapping=fields)
    r.pexpire(OLD.old_session(session_id), ttl_ms)
    r.zadd(OLD.old_expiries(), {session_id: 1})
    if lease:
        r.set(OLD.old_lease(session_id), "a-0.1-replica", px=60_000)


def run_migration(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CHARGEN_STATE_URL": url}
    return subprocess.run(
        [sys.executable, "-m", "service.state_store.migrate", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_old_layout_sessions_are_refused_then_migrated_in_place(tiny_artifact: Path, tmp_path: Path) -> None:
    server = RedisServer(tmp_path).start()
    r = server.client()
    try:
        with ServerThread(model=str(tiny_artifact), state_url=server.url) as srv, httpx.Client(timeout=60) as http:
            sid, busy, reference = (new_session(http, srv.url, PROMPT) for _ in range(3))
            expected = generate(http, srv.url, session_id=reference, max_new_chars=30, temperature=0)["text"]
            to_old_layout(r, sid)
            to_old_layout(r, busy, lease=True)
            for response in (
                http.post(srv.url + "/v1/generate", json={"session_id": sid, "max_new_chars": 5}),
                http.get(f"{srv.url}/v1/sessions/{sid}"),
            ):
                assert response.status_code == 503, response.text
                error = response.json()["error"]
                assert error["code"] == "store_unavailable"
                assert "chargen 0.1's Redis key layout" in error["message"]
                assert "python -m service.state_store.migrate" in error["message"]
            # a session that never existed is still a plain 404
            missing = http.get(f"{srv.url}/v1/sessions/{'x' * 32}")
            assert missing.status_code == 404

            dry = run_migration(server.url, "--dry-run")
            assert dry.returncode == 0 and dry.stdout.startswith("would move 1 session(s)"), dry.stderr
            done = run_migration(server.url)
            assert done.returncode == 0, done.stderr
            assert done.stdout.startswith(f"moved 1 session(s) from {server.url} to {server.url}; 1 in use"), (
                done.stdout
            )

            # it continues exactly where it was, with its TTL; the old key is gone
            assert generate(http, srv.url, session_id=sid, max_new_chars=30, temperature=0)["text"] == expected
            assert r.exists(OLD.old_session(sid)) == 0 and 0 < r.ttl(OLD.session(sid)) <= 3600
            # the one in use moves once its 0.1 holder is gone
            r.delete(OLD.old_lease(busy))
            again = run_migration(server.url)
            assert again.stdout.startswith("moved 1 session(s)") and r.exists(OLD.old_expiries()) == 0, again.stdout
            assert generate(http, srv.url, session_id=busy, max_new_chars=30, temperature=0)["text"] == expected
    finally:
        r.close()
        server.stop()


def test_old_layout_sessions_migrate_into_a_cluster(
    tiny_artifact: Path, tmp_path: Path, redis_cluster: LocalCluster
) -> None:
    server = RedisServer(tmp_path).start()
    r = server.client()
    try:
        with ServerThread(model=str(tiny_artifact), state_url=server.url) as srv, httpx.Client(timeout=60) as http:
            sessions = [new_session(http, srv.url, PROMPT) for _ in range(5)]
        states = {sid: r.hget(OLD.session(sid), "state") for sid in sessions}
        for sid in sessions:
            to_old_layout(r, sid)
        done = run_migration(server.url, "--to", redis_cluster.url)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("moved 5 session(s)") and redis_cluster.password not in done.stdout

        async def read_back() -> dict[str, bytes | None]:
            store = RedisStore(redis_cluster.url, 60, 1000)
            try:
                return {sid: (await store.get(sid)).state for sid in sessions}  # type: ignore[union-attr]
            finally:
                await store.close()

        assert asyncio.run(read_back()) == states
        assert r.keys("chargen:*") == []  # moved, not copied
    finally:
        r.close()
        server.stop()
