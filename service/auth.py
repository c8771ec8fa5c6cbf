"""Optional API keys (``CHARGEN_API_KEYS``) and who owns a session.

With keys configured, every route but the health checks, the metrics and the static playground
needs ``Authorization: Bearer <key>``; anything else is a 401 in OpenAI's envelope with
``WWW-Authenticate: Bearer``. The service keeps only SHA-256 digests of the keys (the setting may
list the digests themselves, ``sha256:<hex>``, so the raw keys need not be in the environment).

A presented key is hashed and compared with every configured digest using
``hmac.compare_digest``, without stopping at the first match, so the time taken does not depend
on which key (if any) matched or on how many leading bytes agree.

A session belongs to the key that created it: the session record stores an owner id derived from
the key's digest (never the key), and a session whose owner differs is reported as not found, the
same 404 as a session that does not exist, so one key cannot even learn another's session ids.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from typing import Annotated

from fastapi import Depends, Request

from service.errors import ApiError

DIGEST = re.compile(r"sha256:([0-9a-fA-F]{64})")
BEARER = {"WWW-Authenticate": "Bearer"}


class ApiKeys:
    """The configured keys, as digests only."""

    def __init__(self, setting: str) -> None:
        self._digests: list[bytes] = []
        for entry in (part.strip() for part in setting.split(",")):
            if not entry:
                continue
            match = DIGEST.fullmatch(entry)
            self._digests.append(bytes.fromhex(match.group(1)) if match else hashlib.sha256(entry.encode()).digest())

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def owner_of(self, presented: str) -> str | None:
        """The owner id of a presented key, or None if it is not one of ours."""
        digest = hashlib.sha256(presented.encode("utf-8", "surrogatepass")).digest()
        found: bytes | None = None
        for known in self._digests:  # no early exit: constant work whatever matches
            if hmac.compare_digest(digest, known):
                found = known
        return owner_id(found) if found is not None else None


def owner_id(key_digest: bytes) -> str:
    """What a session stores as its owner: a hash of the key's digest (domain-separated, 128 bits).

    Not the digest itself, so a Redis dump holds nothing that appears in the configuration.
    """
    return hashlib.sha256(b"chargen-session-owner\0" + key_digest).hexdigest()[:32]


async def require_key(request: Request) -> str | None:
    """Router-level dependency: the caller's owner id (None when keys are not configured)."""
    keys: ApiKeys | None = getattr(request.app.state, "api_keys", None)
    if keys is None or not keys.enabled:
        return None
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    credentials = credentials.strip()
    if scheme.lower() != "bearer" or not credentials:
        raise ApiError(
            401, "no API key: send the header Authorization: Bearer <key>", None, "missing_api_key", dict(BEARER)
        )
    owner = keys.owner_of(credentials)
    if owner is None:  # the key itself is never echoed or logged
        raise ApiError(
            401,
            "invalid API key",
            None,
            "invalid_api_key",
            {"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    return owner


# Routes that need the owner declare this; FastAPI runs require_key once per request even though
# it is also the router-level dependency (dependency results are cached per request).
OwnerDep = Annotated[str | None, Depends(require_key)]
