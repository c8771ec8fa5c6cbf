"""The contract every session store keeps, and the errors the HTTP layer maps to responses.

- a session is one record (state bytes, and its owner when API keys are on) with a sliding TTL,
  written in one atomic operation;
- a per-session lease (lock with a random token and an expiry) admits one request at a time; a
  save or delete only happens while the caller still holds its lease, so no update is ever lost,
  and a replica that dies mid-request only blocks its sessions until the lease expires;
- a save never brings back a session that expired or was evicted meanwhile.
"""

from __future__ import annotations

import abc
import secrets
from dataclasses import dataclass


class StoreUnavailable(RuntimeError):
    """The state store does not answer (Redis down, unreachable, or refusing us)."""


class SessionNotFound(LookupError):
    pass


class SessionBusy(RuntimeError):
    """Another request holds this session's lease."""


@dataclass
class StoredSession:
    state: bytes
    expires_in_s: int
    owner: str | None = None  # owner id (a hash of the API key that created it), None without keys


def new_lease_token() -> str:
    return secrets.token_hex(16)


class SessionStore(abc.ABC):
    """Async interface used by the service; every method may raise StoreUnavailable."""

    def __init__(self, ttl_s: int, lease_ms: int) -> None:
        self.ttl_s = ttl_s
        self.lease_ms = lease_ms

    def describe(self) -> str:
        """Where sessions live, safe to log: never a user name or password."""
        return "memory"

    @abc.abstractmethod
    async def ping(self) -> str | None:
        """Raise StoreUnavailable if the store cannot serve sessions; return a note (for /readyz)
        when it serves only some of them (a Redis Cluster shard failing over), else None."""

    @abc.abstractmethod
    async def open_connections(self, count: int) -> None:
        """Connect ahead of time so that a burst of requests does not pay for connection set-up."""

    @abc.abstractmethod
    async def create(self, session_id: str, state: bytes, owner: str | None = None) -> None:
        """Store a new session with a fresh TTL (and its owner, in the same atomic write)."""

    @abc.abstractmethod
    async def get(self, session_id: str) -> StoredSession | None:
        """Read without taking the lease or refreshing the TTL (inspection)."""

    @abc.abstractmethod
    async def acquire(self, session_id: str, owner: str | None = None) -> tuple[str, bytes]:
        """Take the lease, refresh the TTL, return (token, state).

        Raises SessionNotFound or SessionBusy. With ``owner``, a session owned by anyone else is
        SessionNotFound (checked before the lease is taken, so it is not even briefly locked).
        A caller cancelled while this runs leaves no lease behind.
        """

    @abc.abstractmethod
    async def renew(self, session_id: str, token: str) -> bool:
        """Extend a held lease and the session's TTL; False if the lease or the session was lost."""

    @abc.abstractmethod
    async def save(self, session_id: str, token: str, state: bytes) -> bool:
        """Write state and refresh the TTL atomically, only while token holds the lease and the
        session still exists."""

    @abc.abstractmethod
    async def save_and_release(self, session_id: str, token: str, state: bytes) -> bool:
        """``save`` and ``release`` in one atomic step (one round trip): a request's last call.
        The lease is released whether or not the save happened."""

    @abc.abstractmethod
    async def release(self, session_id: str, token: str) -> None: ...

    @abc.abstractmethod
    async def delete(self, session_id: str, token: str) -> bool:
        """Remove the session, only while token holds the lease."""

    @abc.abstractmethod
    async def sweep_expired(self, full_pass: bool = False) -> int:
        """Forget sessions whose TTL ran out; returns how many (each counted once, by one replica).

        A Redis store looks at a share of its expiry index per call (the service calls this
        every CHARGEN_SWEEP_INTERVAL_S); ``full_pass`` looks at all of it.
        """

    async def close(self) -> None:
        return None
