"""Sessions in Redis: one redis-server, or a Redis Cluster (redis-py's asyncio cluster client).

Both use the same keys (layout.py) and the same scripts (lua.py); only the client differs. A
request makes two round trips: ACQUIRE (take the lease and read the state) and SAVE with release
(write the state, free the lease), plus one RENEW every few seconds of a long stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import time
from collections.abc import Awaitable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisClusterException, RedisError
from redis.maint_notifications import MaintNotificationsConfig

from service.state_store import base, lua
from service.state_store.base import SessionBusy, SessionNotFound, SessionStore, StoredSession, StoreUnavailable
from service.state_store.layout import SLOTS, KeyLayout
from service.state_store.target import parse_target, redacted

T = TypeVar("T")

SWEEP_SHARE = 8  # each sweep call reads 1/8 of the slots' expiry indexes: a full pass every 8 calls
MAX_CONNECTIONS = 100  # per redis-server (each primary's, in a cluster); redis-py's default
RELEASE_RETRY_S = 0.25  # a release that failed is retried this often until the lease would have expired
SWEEP_BATCH = 128  # index reads per pipeline: ~6 ms of the event loop's time (redis-py packs and parses)


@dataclass(frozen=True)
class TlsFiles:
    """For rediss:// servers: the CA to trust (None: the system's) and a client certificate."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None


class OldLayoutSession(StoreUnavailable):
    """The session exists, under chargen 0.1's key names: an operator has to migrate the store."""

    def __init__(self, session_id: str) -> None:
        super().__init__(
            f"session {session_id!r} is stored in chargen 0.1's Redis key layout, which this version does not "
            "read; an operator must run `python -m service.state_store.migrate` once (docs/scaling.md)"
        )


class Script:
    """A Lua script run by its SHA1; a server that lacks it (a replica just promoted, a restart)
    gets the text once by EVAL on that node alone. (redis-py's own Script loads it on every
    primary, which fails while one of them is down.)"""

    def __init__(self, client: Any, text: str) -> None:
        self.client = client
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()

    async def __call__(self, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return await self.client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await self.client.eval(self.text, len(keys), *keys, *args)


class RedisStore(SessionStore):
    def __init__(
        self,
        url: str,
        ttl_s: int,
        lease_ms: int,
        prefix: str = "chargen:",
        timeout_s: float = 2.0,
        password: str | None = None,
        tls: TlsFiles | None = None,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        super().__init__(ttl_s, lease_ms)
        self.layout = KeyLayout(prefix)
        self.prefix = prefix
        self.url = redacted(url)
        target = parse_target(url)
        self.cluster = target.cluster
        # Scrubbed from every error message this store raises (see _call).
        self._secrets = [s for s in (password, target.password, target.username) if s]
        options: dict[str, Any] = dict(
            socket_timeout=timeout_s, socket_connect_timeout=timeout_s, health_check_interval=30
        )
        if password or target.password:
            options["password"] = password or target.password
        if target.tls and tls is not None:
            options.update(ssl_ca_certs=tls.ca, ssl_certfile=tls.cert, ssl_keyfile=tls.key)
        self.redis: Any
        if target.cluster:
            # One retry, with no wait: after a failover the first command to the dead primary
            # fails, makes the client re-read the slot map, and the retry reaches the promoted
            # replica. Every script answers a repeat the same way (lua.py), so a retry is safe.
            # Not full coverage: while one shard fails over, the others keep serving.
            self.redis = RedisCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
                username=target.username,  # (one redis-server: from_url reads both from the URL)
                ssl=target.tls,
                require_full_coverage=False,
                retry=Retry(NoBackoff(), 1),
                **options,
            )
        else:
            # One quick try per call: a request must fail fast with 503, and the pool reconnects
            # by itself on the next call once Redis is back. Without maintenance notifications
            # (a Redis Enterprise feature), the pool checks a pooled connection before handing
            # it out, so the first request after a Redis restart reconnects instead of failing.
            # A burst of more calls than max_connections waits (up to timeout_s) for a connection
            # to come free; redis-py's default pool raised "Too many connections" instead.
            maintenance = MaintNotificationsConfig(enabled=False)
            pool = aioredis.BlockingConnectionPool.from_url(
                url,
                max_connections=max_connections,
                timeout=timeout_s,
                retry=Retry(NoBackoff(), 0),
                maint_notifications_config=maintenance,
                **options,
            )
            self.redis = aioredis.Redis.from_pool(pool)
        self._create = Script(self.redis, lua.CREATE)
        self._acquire = Script(self.redis, lua.ACQUIRE)
        self._renew = Script(self.redis, lua.RENEW)
        self._save = Script(self.redis, lua.SAVE)
        self._release = Script(self.redis, lua.RELEASE)
        self._delete = Script(self.redis, lua.DELETE)
        self._get = Script(self.redis, lua.GET)
        self._settle = Script(self.redis, lua.SETTLE_EXPIRY)
        self._sweep_cursor = random.randrange(SLOTS)  # replicas start their sweeps apart
        self._background: set[asyncio.Task[None]] = set()

    def describe(self) -> str:
        return self.url

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text[:300]

    async def _call(self, awaitable: Awaitable[T]) -> T:
        try:
            return await awaitable
        except (RedisError, RedisClusterException, OSError) as err:
            raise StoreUnavailable(f"Redis error ({self._scrub(str(err) or type(err).__name__)})") from None

    def _expiry_score(self) -> int:
        return now_ms() + self.ttl_s * 1000

    async def ping(self) -> str | None:
        if not self.cluster:
            await self._call(self.redis.ping())
            return None
        return await self._ping_primaries()

    async def _ping_primaries(self) -> str | None:
        """Ping every primary; if one fails, re-read the slot map (a replica may have taken over)
        and ping again. Some primaries down: a note naming them and their slots."""
        await self._call(self.redis.initialize())
        failed = await self._unreachable_primaries()
        if failed:
            with contextlib.suppress(RedisError, RedisClusterException, OSError):
                await self.redis.nodes_manager.initialize()
            failed = await self._unreachable_primaries()
        primaries = self.redis.get_primaries()
        if not failed:
            return None
        if len(failed) == len(primaries):
            raise StoreUnavailable(f"no Redis Cluster primary answers ({', '.join(n.name for n in failed)})")
        slots = self.redis.nodes_manager.slots_cache
        shown = "; ".join(f"{node.name} (slots {slot_ranges(node.name, slots)})" for node in failed)
        return (
            f"{len(failed)} of {len(primaries)} Redis Cluster primaries unreachable: {shown}; "
            "sessions stored there get 503 until a replica takes over"
        )

    async def _unreachable_primaries(self) -> list[ClusterNode]:
        primaries = self.redis.get_primaries()
        answers = await asyncio.gather(*(node.execute_command("PING") for node in primaries), return_exceptions=True)
        return [node for node, answer in zip(primaries, answers, strict=True) if isinstance(answer, BaseException)]

    async def open_connections(self, count: int) -> None:
        # Every running generation holds a pooled connection for its lease and its save: a burst
        # of 64 new streams on a cold pool opened 60 connections at once (~1.5 ms each on the
        # event loop) and its time to first character tripled. `count` concurrent PINGs make
        # the pool (each primary's, in a cluster) open that many now; they stay idle until needed.
        if not self.cluster:
            await self._call(asyncio.gather(*(self.redis.ping() for _ in range(count))))
            return
        await self._call(self.redis.initialize())
        pings = [node.execute_command("PING") for node in self.redis.get_primaries() for _ in range(count)]
        await self._call(asyncio.gather(*pings))

    async def create(self, session_id: str, state: bytes, owner: str | None = None) -> None:
        await self.restore(session_id, state, owner, self.ttl_s * 1000, now_ms())

    async def restore(self, session_id: str, state: bytes, owner: str | None, ttl_ms: int, updated_ms: int) -> None:
        """Write a whole session as given (create, and the migration from the old layout)."""
        args = [ttl_ms, now_ms() + ttl_ms, session_id, state, updated_ms, owner or ""]
        await self._call(self._create(self.layout.keys(session_id), args))

    async def _refuse_old_layout(self, session_id: str) -> None:
        """On a miss, a session under chargen 0.1's key names gets a clear refusal, not a 404.
        Only on one redis-server: that layout never worked on a cluster."""
        if not self.cluster and await self._call(self.redis.exists(self.layout.old_session(session_id))):
            raise OldLayoutSession(session_id)

    async def get(self, session_id: str) -> StoredSession | None:
        state, owner, ttl = await self._call(self._get([self.layout.session(session_id)], []))
        if state is None:
            await self._refuse_old_layout(session_id)
            return None
        return StoredSession(bytes(state), max(0, int(ttl)), owner.decode() if owner is not None else None)

    async def acquire(self, session_id: str, owner: str | None = None) -> tuple[str, bytes]:
        token = base.new_lease_token()
        args = [token, self.lease_ms, self.ttl_s, self._expiry_score(), session_id, owner or ""]
        try:
            result = await self._call(self._acquire(self.layout.keys(session_id), args))
        except BaseException:
            # Cancelled (or cut off) after sending: Redis may have taken the lease for a caller
            # that will never use it. The token is ours alone, so freeing it is always safe.
            self._release_soon(session_id, token)
            raise
        if result[0] == -1:
            await self._refuse_old_layout(session_id)
            raise SessionNotFound(session_id)
        if result[0] == 0:
            raise SessionBusy(session_id)
        return token, bytes(result[1])

    def _release_soon(self, session_id: str, token: str) -> None:
        self._background_task(self._release_quietly(session_id, token))

    def _background_task(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _release_quietly(self, session_id: str, token: str) -> None:
        with contextlib.suppress(StoreUnavailable):  # else the lease expires by itself
            await self.release(session_id, token)

    async def renew(self, session_id: str, token: str) -> bool:
        args = [token, self.lease_ms, self.ttl_s, self._expiry_score(), session_id]
        return bool(await self._call(self._renew(self.layout.keys(session_id), args)))

    async def save(self, session_id: str, token: str, state: bytes) -> bool:
        return await self._save_state(session_id, token, state, release=False)

    async def save_and_release(self, session_id: str, token: str, state: bytes) -> bool:
        return await self._save_state(session_id, token, state, release=True)

    async def _save_state(self, session_id: str, token: str, state: bytes, release: bool) -> bool:
        args = [token, state, self.ttl_s, self._expiry_score(), session_id, now_ms(), "1" if release else "0"]
        return bool(await self._call(self._save(self.layout.keys(session_id), args)))

    async def release(self, session_id: str, token: str) -> None:
        try:
            await self._call(self._release([self.layout.lease(session_id)], [token]))
        except StoreUnavailable:
            # Redis (or this session's shard) is down: keep trying in the background, so that the
            # session is free as soon as Redis is back (a failover: seconds), not lease_ms later.
            self._background_task(self._release_until_expired(session_id, token))
            raise

    async def _release_until_expired(self, session_id: str, token: str) -> None:
        deadline = time.monotonic() + self.lease_ms / 1000
        while time.monotonic() < deadline:
            await asyncio.sleep(RELEASE_RETRY_S)
            with contextlib.suppress(StoreUnavailable):
                await self._call(self._release([self.layout.lease(session_id)], [token]))
                return

    async def delete(self, session_id: str, token: str) -> bool:
        return bool(await self._call(self._delete(self.layout.keys(session_id), [token, session_id])))

    async def sweep_expired(self, full_pass: bool = False) -> int:
        count = SLOTS if full_pass else SLOTS // SWEEP_SHARE
        first, self._sweep_cursor = self._sweep_cursor, (self._sweep_cursor + count) % SLOTS
        now = now_ms()  # one cut-off for the whole call: what falls due meanwhile waits for the next
        expired = 0
        for offset in range(0, count, SWEEP_BATCH):
            slots = [(first + i) % SLOTS for i in range(offset, min(offset + SWEEP_BATCH, count))]
            expired += await self._sweep_slots(slots, now)
        return expired

    async def _sweep_slots(self, slots: list[int], now: int) -> int:
        indexes = [self.layout.expiries_of_slot(slot) for slot in slots]
        async with self.redis.pipeline(transaction=False) as pipe:
            for index in indexes:
                pipe.zrangebyscore(index, "-inf", now, start=0, num=1000)
            due = await self._call(pipe.execute())
        expired = 0
        for index, ids in zip(indexes, due, strict=True):
            for raw in ids:
                session_id = raw.decode()
                keys = [index, self.layout.session(session_id)]
                expired += int(await self._call(self._settle(keys, [session_id, now])))
        return expired

    async def close(self) -> None:
        if self._background:  # releases in flight; those still retrying give up (the leases expire)
            _, retrying = await asyncio.wait(list(self._background), timeout=1)
            for task in retrying:
                task.cancel()
        await self.redis.aclose()


def now_ms() -> int:
    return int(time.time() * 1000)


def slot_ranges(node_name: str, slots_cache: dict[int, list[ClusterNode]]) -> str:
    """The slots a node serves as primary, as ranges: "0-5460" or "0-99,200-299"."""
    owned = sorted(slot for slot, nodes in slots_cache.items() if nodes and nodes[0].name == node_name)
    ranges: list[list[int]] = []
    for slot in owned:
        if ranges and ranges[-1][1] == slot - 1:
            ranges[-1][1] = slot
        else:
            ranges.append([slot, slot])
    return ",".join(f"{a}-{b}" if a != b else str(a) for a, b in ranges) or "none"
