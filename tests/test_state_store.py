"""Both session stores, same contract: atomic records with a sliding TTL and a per-session lease.

The Redis store talks to a real redis-server started by pytest-redis on a free port.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
from pytest_redis.executor import RedisExecutor

from service.state_store import MemoryStore, RedisStore, SessionBusy, SessionNotFound, SessionStore, StoreUnavailable
from tests.redis_support import CommandLog, LocalCluster, RedisServer, ReplyGate
from tests.service_support import ServerThread, free_port, generate, new_session

Scenario = Callable[[SessionStore], Awaitable[None]]


@pytest.fixture(params=["memory", "redis", "cluster"])
def make_store(request: pytest.FixtureRequest) -> Callable[..., SessionStore]:
    """The same scenarios on each store: in this process, one redis-server, a Redis Cluster."""

    def factory(ttl_s: int = 60, lease_ms: int = 5000) -> SessionStore:
        prefix = f"chargen:test-{secrets.token_hex(4)}:"  # each test its own keys (the ACL allows chargen:*)
        if request.param == "memory":
            return MemoryStore(ttl_s, lease_ms)
        if request.param == "cluster":
            cluster: LocalCluster = request.getfixturevalue("redis_cluster")
            return RedisStore(cluster.url, ttl_s, lease_ms, prefix=prefix)
        proc: RedisExecutor = request.getfixturevalue("redis_proc")
        return RedisStore(f"redis://{proc.host}:{proc.port}/0", ttl_s, lease_ms, prefix=prefix)

    return factory


def run(store: SessionStore, scenario: Scenario) -> None:
    async def main() -> None:
        try:
            await scenario(store)
        finally:
            await store.close()

    asyncio.run(main())


def test_create_get_acquire_save_release(make_store: Callable[..., SessionStore]) -> None:
    async def scenario(store: SessionStore) -> None:
        await store.ping()
        assert await store.get("nope") is None
        await store.create("s1", b"state-0")
        got = await store.get("s1")
        assert got is not None and got.state == b"state-0" and 0 < got.expires_in_s <= 60
        token, state = await store.acquire("s1")
        assert state == b"state-0"
        with pytest.raises(SessionBusy):
            await store.acquire("s1")
        assert await store.save("s1", token, b"state-1")
        assert not await store.save("s1", "not-the-token", b"lost update")
        await store.release("s1", "not-the-token")  # releasing someone else's lease does nothing
        with pytest.raises(SessionBusy):
            await store.acquire("s1")
        await store.release("s1", token)
        token2, state = await store.acquire("s1")
        assert state == b"state-1"
        await store.release("s1", token2)
        with pytest.raises(SessionNotFound):
            await store.acquire("missing")

    run(make_store(), scenario)


def test_binary_state_survives_byte_for_byte(make_store: Callable[..., SessionStore]) -> None:
    blob = bytes(range(256)) * 40

    async def scenario(store: SessionStore) -> None:
        await store.create("bin", b"")
        token, _ = await store.acquire("bin")
        assert await store.save("bin", token, blob)
        await store.release("bin", token)
        stored = await store.get("bin")
        assert stored is not None and stored.state == blob

    run(make_store(), scenario)


def test_delete_needs_the_lease(make_store: Callable[..., SessionStore]) -> None:
    async def scenario(store: SessionStore) -> None:
        await store.create("d", b"x")
        token, _ = await store.acquire("d")
        assert not await store.delete("d", "other")
        assert await store.delete("d", token)
        assert await store.get("d") is None
        with pytest.raises(SessionNotFound):
            await store.acquire("d")

    run(make_store(), scenario)


def test_a_dead_holders_lease_expires(make_store: Callable[..., SessionStore]) -> None:
    async def scenario(store: SessionStore) -> None:
        await store.create("l", b"x")
        token, _ = await store.acquire("l")
        assert await store.renew("l", token)
        await asyncio.sleep(0.4)
        token2, _ = await store.acquire("l")  # the first holder "crashed": its lease ran out
        assert not await store.save("l", token, b"stale")  # and it can no longer write
        assert not await store.renew("l", token)
        assert await store.save("l", token2, b"fresh")

    run(make_store(lease_ms=200), scenario)


def test_ttl_slides_on_use_and_expiry_is_counted_once(make_store: Callable[..., SessionStore]) -> None:
    async def scenario(store: SessionStore) -> None:
        await store.create("a", b"x")
        await store.create("b", b"x")
        await asyncio.sleep(0.6)
        token, _ = await store.acquire("a")  # use refreshes a's TTL
        await store.release("a", token)
        await asyncio.sleep(0.7)
        assert await store.get("b") is None
        assert await store.get("a") is not None
        # A full pass reads the expiry index of all 16384 slots (most of a second): delete a, so
        # that it cannot fall due during one and the counts below do not depend on their speed.
        assert await store.delete("a", (await store.acquire("a"))[0])
        assert await store.sweep_expired(full_pass=True) == 1  # b
        assert await store.sweep_expired(full_pass=True) == 0  # counted once
        await store.create("c", b"x")
        await asyncio.sleep(1.1)
        assert await store.sweep_expired(full_pass=True) == 1  # c

    run(make_store(ttl_s=1), scenario)


def test_unreachable_redis_is_store_unavailable() -> None:
    async def scenario(store: SessionStore) -> None:
        with pytest.raises(StoreUnavailable):
            await store.ping()
        with pytest.raises(StoreUnavailable):
            await store.acquire("x")

    run(RedisStore(f"redis://127.0.0.1:{free_port()}/0", 60, 1000, timeout_s=0.5), scenario)


def test_save_never_recreates_an_expired_session(make_store: Callable[..., SessionStore]) -> None:
    """A session whose TTL ran out while its lease was held stays gone: the save is refused, and
    no ownerless copy of it appears (which another caller could then use)."""

    async def scenario(store: SessionStore) -> None:
        await store.create("gone", b"x", owner="alice")
        token, _ = await store.acquire("gone", owner="alice")
        await asyncio.sleep(1.3)  # the session's TTL (1 s) runs out; its lease (5 s) does not
        assert await store.save("gone", token, b"late") is False
        assert await store.get("gone") is None
        with pytest.raises(SessionNotFound):
            await store.acquire("gone")

    run(make_store(ttl_s=1), scenario)


def test_a_request_cancelled_during_acquire_does_not_keep_the_lease(redis_proc: RedisExecutor) -> None:
    """Redis has taken the lease but the caller is cancelled before it hears so (a client gone,
    a shutdown): the lease must not stay held for lease_ms (30 s here)."""
    prefix = f"cancel-{secrets.token_hex(4)}:"

    async def main() -> None:
        gate = await ReplyGate(redis_proc.port).start()
        store = RedisStore(f"redis://127.0.0.1:{gate.port}/0", 60, 30_000, prefix=prefix)
        direct = RedisStore(f"redis://{redis_proc.host}:{redis_proc.port}/0", 60, 30_000, prefix=prefix)
        raw = aioredis.Redis(host=redis_proc.host, port=redis_proc.port)
        try:
            await direct.create("c", b"x")
            await store.ping()
            gate.close_gate()
            acquiring = asyncio.create_task(store.acquire("c"))
            while not await raw.keys(f"{prefix}*lease*"):  # Redis ran the script; its reply is held
                await asyncio.sleep(0.01)
            acquiring.cancel()
            with pytest.raises(asyncio.CancelledError):
                await acquiring
            gate.open_gate()
            for _ in range(300):  # 3 s, a tenth of the lease
                try:
                    token, _ = await direct.acquire("c")
                    break
                except SessionBusy:
                    await asyncio.sleep(0.01)
            else:
                pytest.fail("the cancelled request's lease is still held")
            await direct.release("c", token)
        finally:
            await store.close()
            await direct.close()
            await raw.aclose()
            await gate.stop()

    asyncio.run(main())


def test_a_generation_on_a_session_costs_redis_two_calls(tiny_artifact: Path, tmp_path: Path) -> None:
    """Take the lease (and the state), then save and release in one script: two round trips per
    request, streamed or not, whatever the store's layout."""
    server = RedisServer(tmp_path).start()
    r = server.client()
    log = CommandLog(r)
    try:
        with (
            ServerThread(model=str(tiny_artifact), state_url=server.url, sweep_interval_s=3600) as srv,
            httpx.Client(timeout=60) as http,
        ):
            sid = new_session(http, srv.url)
            generate(http, srv.url, session_id=sid, max_new_chars=5)  # scripts loaded, pool warm
            for stream in (False, True):
                log.reset()
                body = {"session_id": sid, "max_new_chars": 20, "stream": stream}
                with http.stream("POST", srv.url + "/v1/generate", json=body) as response:
                    assert response.status_code == 200
                    response.read()
                assert log.commands() == ["EVALSHA", "EVALSHA"], stream
    finally:
        r.close()
        server.stop()


def test_a_release_that_fails_is_retried_until_redis_is_back(tmp_path: Path) -> None:
    """Redis is down when a request ends, so its lease cannot be freed then: the store keeps
    trying, and the session is free as soon as Redis is back, not lease_ms (30 s) later."""
    server = RedisServer(tmp_path, persistent=True).start()

    async def main() -> None:
        store = RedisStore(server.url, 60, 30_000, timeout_s=0.5)
        try:
            await store.create("r", b"x")
            token, _ = await store.acquire("r")
            server.kill()
            with pytest.raises(StoreUnavailable):
                await store.release("r", token)
            server.start()  # same port, same append-only file: the lease is still there
            for _ in range(300):  # 3 s, a tenth of the lease
                try:
                    await store.release("r", (await store.acquire("r"))[0])
                    return
                except (SessionBusy, StoreUnavailable):
                    await asyncio.sleep(0.01)
            pytest.fail("the lease stayed held after Redis came back")
        finally:
            await store.close()

    try:
        asyncio.run(main())
    finally:
        server.stop()


def test_a_burst_beyond_the_pool_waits_for_a_connection(redis_proc: RedisExecutor) -> None:
    """More concurrent calls than pooled connections wait for one to come free; redis-py's default
    pool raised "Too many connections" past 100 (seen at 64 streams with sessions in benchmarks)."""

    async def scenario(store: SessionStore) -> None:
        await store.create("burst", b"state")
        states = await asyncio.gather(*(store.get("burst") for _ in range(40)))
        assert [s.state if s else None for s in states] == [b"state"] * 40

    url = f"redis://{redis_proc.host}:{redis_proc.port}/0"
    run(RedisStore(url, 60, 1000, prefix=f"chargen:test-{secrets.token_hex(4)}:", max_connections=3), scenario)
