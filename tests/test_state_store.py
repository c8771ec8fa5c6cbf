"""Both session stores, same contract: atomic records with a sliding TTL and a per-session lease.

The Redis store talks to a real redis-server started by pytest-redis on a free port.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable

import pytest
from pytest_redis.executor import RedisExecutor

from service.state_store import MemoryStore, RedisStore, SessionBusy, SessionNotFound, SessionStore, StoreUnavailable
from tests.service_support import free_port

Scenario = Callable[[SessionStore], Awaitable[None]]


@pytest.fixture(params=["memory", "redis"])
def make_store(request: pytest.FixtureRequest) -> Callable[..., SessionStore]:
    def factory(ttl_s: int = 60, lease_ms: int = 5000) -> SessionStore:
        if request.param == "memory":
            return MemoryStore(ttl_s, lease_ms)
        proc: RedisExecutor = request.getfixturevalue("redis_proc")
        prefix = f"test-{secrets.token_hex(4)}:"  # each test its own keys
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
        assert await store.sweep_expired() == 1
        assert await store.sweep_expired() == 0  # counted once
        await asyncio.sleep(0.8)
        assert await store.sweep_expired() == 1

    run(make_store(ttl_s=1), scenario)


def test_unreachable_redis_is_store_unavailable() -> None:
    async def scenario(store: SessionStore) -> None:
        with pytest.raises(StoreUnavailable):
            await store.ping()
        with pytest.raises(StoreUnavailable):
            await store.acquire("x")

    run(RedisStore(f"redis://127.0.0.1:{free_port()}/0", 60, 1000, timeout_s=0.5), scenario)
