"""Sessions as the generation and session code use them: checked ids, leases, state for the model.

Every store failure leaves here as a `Problem` (not found, busy, store unavailable, state that
this model cannot use), one message for each, whichever route asked.
"""

from __future__ import annotations

import contextlib
import re

from service.artifact import LoadedModel
from service.problems import Problem, session_busy, session_not_found, store_unavailable
from service.state_codec import ModelMismatchError, SessionState, StateDecodeError, decode_state
from service.state_store import SessionBusy, SessionNotFound, SessionStore, StoredSession, StoreUnavailable

# secrets.token_urlsafe(24): 32 characters, 192 random bits
SESSION_ID = re.compile(r"[A-Za-z0-9_-]{32}")


def check_session_id(session_id: str, param: str = "session_id") -> str:
    if not SESSION_ID.fullmatch(session_id):
        message = f"{param}: no session {session_id[:40]!r} (ids are 32 URL-safe characters)"
        raise Problem("session_not_found", message, param)
    return session_id


async def take_lease(store: SessionStore, session_id: str, owner: str | None = None) -> tuple[str, bytes]:
    """The session's lease and state: (token, state bytes); another key's session is not found."""
    check_session_id(session_id)
    try:
        return await store.acquire(session_id, owner=owner)
    except SessionNotFound:
        raise session_not_found(session_id) from None
    except SessionBusy:
        raise session_busy(session_id) from None
    except StoreUnavailable as err:
        raise store_unavailable(err) from None


async def release_quietly(store: SessionStore, session_id: str, token: str) -> None:
    with contextlib.suppress(StoreUnavailable):  # the lease expires by itself
        await store.release(session_id, token)


async def read_owned_session(store: SessionStore, session_id: str, owner: str | None) -> StoredSession:
    """A session as stored, for a read that takes no lease; another key's session is invisible."""
    check_session_id(session_id)
    try:
        stored = await store.get(session_id)
    except StoreUnavailable as err:
        raise store_unavailable(err) from None
    if stored is None or (owner is not None and stored.owner != owner):
        raise session_not_found(session_id)
    return stored


def unusable_state(err: StateDecodeError) -> Problem:
    """The stored state cannot be used by this model (saved by another one, or damaged)."""
    if isinstance(err, ModelMismatchError):
        return Problem("model_mismatch", f"session_id: {err}", "session_id")
    return Problem("invalid_session_state", f"session_id: the stored state cannot be used ({err})", "session_id")


def state_for(model: LoadedModel, blob: bytes) -> SessionState:
    """A stored state, checked against the model."""
    try:
        return decode_state(blob, model.fingerprint, model.layers, model.hidden, len(model.vocab))
    except StateDecodeError as err:
        raise unusable_state(err) from None
