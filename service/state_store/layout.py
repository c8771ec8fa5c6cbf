"""Redis key names: every key of one session in one hash slot, so Redis Cluster can shard them.

Redis Cluster places a key by the CRC16 of its hash tag (the text between its first ``{`` and
the next ``}``) modulo 16384 slots, and refuses a script whose keys lie in two slots. So:

    {prefix}session:{<id>}     hash: state, updated_ms, owner; with the session's TTL
    {prefix}lease:{<id>}       the lease token (SET NX PX)
    {prefix}expiries:{<tag>}   sorted set id -> expected expiry (ms), one per slot: <tag> is a
                               short string chosen to hash to the same slot as <id>

The braces are literal. A single redis-server keeps the same layout, so a store can move to a
cluster without renaming anything. Before hash tags (chargen 0.1's layout) the keys were
``{prefix}session:<id>``, ``{prefix}lease:<id>`` and one ``{prefix}expiries``; see
``service.state_store.migrate``.
"""

from __future__ import annotations

from binascii import crc_hqx
from functools import cache

SLOTS = 16384  # Redis Cluster's fixed number of hash slots


def key_slot(tag: str) -> int:
    """The hash slot of a key whose hash tag is ``tag`` (CRC16-XMODEM, as Redis computes it)."""
    return crc_hqx(tag.encode(), 0) % SLOTS


@cache
def slot_tags() -> tuple[str, ...]:
    """For each slot, the shortest hex string whose CRC16 falls in it (~0.15 s, once per process)."""
    tags: list[str | None] = [None] * SLOTS
    missing, n = SLOTS, 0
    while missing:
        tag = f"{n:x}"
        slot = key_slot(tag)
        if tags[slot] is None:
            tags[slot] = tag
            missing -= 1
        n += 1
    return tuple(t for t in tags if t is not None)


def check_prefix(prefix: str) -> str:
    if "{" in prefix or "}" in prefix:
        raise ValueError("must not contain { or }: the session id in braces is the keys' hash tag")
    return prefix


class KeyLayout:
    def __init__(self, prefix: str) -> None:
        self.prefix = check_prefix(prefix)

    def session(self, session_id: str) -> str:
        return f"{self.prefix}session:{{{session_id}}}"

    def lease(self, session_id: str) -> str:
        return f"{self.prefix}lease:{{{session_id}}}"

    def expiries_of_slot(self, slot: int) -> str:
        return f"{self.prefix}expiries:{{{slot_tags()[slot]}}}"

    def expiries(self, session_id: str) -> str:
        """The expiry index in the session's own slot."""
        return self.expiries_of_slot(key_slot(session_id))

    def keys(self, session_id: str) -> list[str]:
        """[session, lease, expiry index]: the KEYS of every per-session script, one slot."""
        return [self.session(session_id), self.lease(session_id), self.expiries(session_id)]

    # chargen 0.1's layout, read only to refuse (and migrate) it
    def old_session(self, session_id: str) -> str:
        return f"{self.prefix}session:{session_id}"

    def old_lease(self, session_id: str) -> str:
        return f"{self.prefix}lease:{session_id}"

    def old_expiries(self) -> str:
        return f"{self.prefix}expiries"
