"""Sessions in this process (``memory://``): the single-process default; they die with it."""

from __future__ import annotations

import time

from service.state_store.base import SessionBusy, SessionNotFound, SessionStore, StoredSession, new_lease_token


class MemoryStore(SessionStore):
    """Every call runs on the event loop without awaiting, so each is atomic by construction."""

    def __init__(self, ttl_s: int, lease_ms: int) -> None:
        super().__init__(ttl_s, lease_ms)
        self._sessions: dict[str, tuple[bytes, float]] = {}  # id -> (state, expires at, monotonic)
        self._leases: dict[str, tuple[str, float]] = {}
        self._owners: dict[str, str] = {}

    def _live(self, session_id: str) -> bytes | None:
        entry = self._sessions.get(session_id)
        return entry[0] if entry is not None and entry[1] > time.monotonic() else None

    def _holder(self, session_id: str) -> str | None:
        lease = self._leases.get(session_id)
        return lease[0] if lease is not None and lease[1] > time.monotonic() else None

    async def ping(self) -> str | None:
        return None

    async def open_connections(self, count: int) -> None:
        return None  # nothing to connect to

    async def create(self, session_id: str, state: bytes, owner: str | None = None) -> None:
        self._sessions[session_id] = (state, time.monotonic() + self.ttl_s)
        if owner is not None:
            self._owners[session_id] = owner

    async def get(self, session_id: str) -> StoredSession | None:
        entry = self._sessions.get(session_id)
        if entry is None or self._live(session_id) is None:
            return None
        return StoredSession(entry[0], max(0, round(entry[1] - time.monotonic())), self._owners.get(session_id))

    async def acquire(self, session_id: str, owner: str | None = None) -> tuple[str, bytes]:
        state = self._live(session_id)
        if state is None or (owner is not None and self._owners.get(session_id) != owner):
            raise SessionNotFound(session_id)
        if self._holder(session_id) is not None:
            raise SessionBusy(session_id)
        token = new_lease_token()
        now = time.monotonic()
        self._leases[session_id] = (token, now + self.lease_ms / 1000)
        self._sessions[session_id] = (state, now + self.ttl_s)
        return token, state

    async def renew(self, session_id: str, token: str) -> bool:
        state = self._live(session_id)
        if self._holder(session_id) != token or state is None:
            return False
        now = time.monotonic()
        self._leases[session_id] = (token, now + self.lease_ms / 1000)
        self._sessions[session_id] = (state, now + self.ttl_s)
        return True

    async def save(self, session_id: str, token: str, state: bytes) -> bool:
        if self._holder(session_id) != token or self._live(session_id) is None:
            return False  # an expired session stays gone, even while its lease is held
        self._sessions[session_id] = (state, time.monotonic() + self.ttl_s)
        return True

    async def save_and_release(self, session_id: str, token: str, state: bytes) -> bool:
        saved = await self.save(session_id, token, state)
        await self.release(session_id, token)
        return saved

    async def release(self, session_id: str, token: str) -> None:
        if self._holder(session_id) == token:
            del self._leases[session_id]

    async def delete(self, session_id: str, token: str) -> bool:
        if self._holder(session_id) != token:
            return False
        self._sessions.pop(session_id, None)
        self._leases.pop(session_id, None)
        self._owners.pop(session_id, None)
        return True

    async def sweep_expired(self, full_pass: bool = False) -> int:
        now = time.monotonic()
        expired = [sid for sid, (_, until) in self._sessions.items() if until <= now]
        for sid in expired:
            del self._sessions[sid]
            self._owners.pop(sid, None)
        for sid in [sid for sid, (_, until) in self._leases.items() if until <= now]:
            del self._leases[sid]
        return len(expired)
