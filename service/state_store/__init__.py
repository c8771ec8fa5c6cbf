"""Where session state lives between requests: in this process (memory://), in one redis-server
(redis://, rediss://, unix://) or in a Redis Cluster (redis+cluster://, rediss+cluster://).

Every store gives the same guarantees (base.py), so the HTTP layer never knows which one it has.
"""

from __future__ import annotations

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
from service.state_store.redis_store import OldLayoutSession, RedisStore, TlsFiles
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
    "TlsFiles",
    "new_lease_token",
    "open_store",
]


def open_store(settings: Settings) -> SessionStore:
    """The store that the service's settings describe."""
    if settings.state_url.startswith("memory://"):
        return MemoryStore(settings.session_ttl_s, settings.lease_ms)
    file = settings.state_password_file
    tls = TlsFiles(settings.state_tls_ca_file, settings.state_tls_cert_file, settings.state_tls_key_file)
    password = read_password_file(file) if file is not None else None
    ttl, lease = settings.session_ttl_s, settings.lease_ms
    return RedisStore(settings.state_url, ttl, lease, settings.redis_prefix, settings.redis_timeout_s, password, tls)
