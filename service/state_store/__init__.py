"""Where session state lives between requests: in this process (memory://), in one redis-server
(redis://, rediss://, unix://) or in a Redis Cluster (redis+cluster://, rediss+cluster://).

Every store gives the same guarantees (base.py), so the HTTP layer never knows which one it has.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from service.state_store.base import (
    SessionBusy,
    SessionNotFound,
    SessionStore,
    StoredSession,
    StoreUnavailable,
    new_lease_token,
)
from service.state_store.memory_store import MemoryStore
from service.state_store.redis_store import OldLayoutSession, RedisStore
from service.state_store.target import read_password_file

if TYPE_CHECKING:
    from service.settings import Settings

__all__ = [
    "MemoryStore",
    "OldLayoutSession",
    "RedisStore",
    "SessionBusy",
    "SessionNotFound",
    "SessionStore",
    "StoreUnavailable",
    "StoredSession",
    "make_store",
    "new_lease_token",
    "open_store",
]


def make_store(
    url: str,
    ttl_s: int,
    lease_ms: int,
    prefix: str = "chargen:",
    timeout_s: float = 2.0,
    password_file: Path | None = None,
    tls_ca_file: Path | None = None,
    tls_cert_file: Path | None = None,
    tls_key_file: Path | None = None,
) -> SessionStore:
    if url.startswith("memory://"):
        return MemoryStore(ttl_s, lease_ms)
    password = read_password_file(password_file) if password_file is not None else None
    return RedisStore(
        url,
        ttl_s,
        lease_ms,
        prefix=prefix,
        timeout_s=timeout_s,
        password=password,
        tls_ca_file=tls_ca_file,
        tls_cert_file=tls_cert_file,
        tls_key_file=tls_key_file,
    )


def open_store(settings: Settings) -> SessionStore:
    """The store that the service's settings describe."""
    return make_store(
        settings.state_url,
        settings.session_ttl_s,
        settings.lease_ms,
        prefix=settings.redis_prefix,
        timeout_s=settings.redis_timeout_s,
        password_file=settings.state_password_file,
        tls_ca_file=settings.state_tls_ca_file,
        tls_cert_file=settings.state_tls_cert_file,
        tls_key_file=settings.state_tls_key_file,
    )
