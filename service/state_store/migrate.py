"""Move sessions from chargen 0.1's Redis key layout to the hash-tagged one (docs/scaling.md).

    python -m service.state_store.migrate                 # in place, on CHARGEN_STATE_URL
    python -m service.state_store.migrate --to redis+cluster://host:7000,host:7001/   # into a cluster
    python -m service.state_store.migrate --dry-run       # count only

chargen 0.1 kept ``{prefix}session:<id>``, ``{prefix}lease:<id>`` and one ``{prefix}expiries``
sorted set, which Redis Cluster cannot serve; this version reads only
``{prefix}session:{<id>}`` and friends (layout.py), and answers 503 with a pointer here for a
session it finds under the old name. Each session keeps its state, owner, last update and
remaining TTL. A session whose old lease is held (a 0.1 replica is using it) is left for the
next run: stop the 0.1 replicas first. It is safe to run again; it moves only what is left.
The source, its credentials and TLS files come from the CHARGEN_* settings, like the service's.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import dataclass

from pydantic import ValidationError
from redis.exceptions import RedisError

from service.settings import Settings
from service.state_store import RedisStore, StoreUnavailable, open_store
from service.state_store.layout import KeyLayout


@dataclass
class Tally:
    moved: int = 0
    in_use: int = 0  # an old lease is held: left for the next run
    gone: int = 0  # expired between the scan and the copy


async def migrate(source: RedisStore, target: RedisStore, dry_run: bool, keep: bool) -> Tally:
    old = KeyLayout(source.prefix)
    tally = Tally()
    client = source.redis
    async for raw in client.scan_iter(match=old.old_session("*"), count=1000):
        key = raw.decode()
        session_id = key[len(old.old_session("")) :]
        if session_id.startswith("{"):
            continue  # already in the new layout
        if await client.exists(old.old_lease(session_id)):
            tally.in_use += 1
            continue
        fields, ttl_ms = await asyncio.gather(client.hgetall(key), client.pttl(key))
        if not fields or ttl_ms <= 0:
            tally.gone += 1
            continue
        if not dry_run:
            owner = fields.get(b"owner")
            updated = int(fields.get(b"updated_ms", b"0"))
            await target.restore(session_id, fields[b"state"], owner.decode() if owner else None, ttl_ms, updated)
            if not keep:
                await client.delete(key)
        tally.moved += 1
    if not dry_run and not keep and tally.in_use == 0:
        await client.delete(old.old_expiries())  # nothing left that it indexes
    return tally


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.state_store.migrate", description=__doc__.split("\n")[0])
    parser.add_argument("--to", help="where to put the sessions (default: the same Redis, CHARGEN_STATE_URL)")
    parser.add_argument("--dry-run", action="store_true", help="count what would move; change nothing")
    parser.add_argument("--keep", action="store_true", help="leave the old keys in place after copying")
    args = parser.parse_args(argv)
    try:
        settings = Settings()
        source = open_store(settings)
        target = open_store(Settings(state_url=args.to)) if args.to else source
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in err.errors())
        print(f"chargen: error: invalid settings: {problems}", file=sys.stderr)
        return 2
    try:
        if not isinstance(source, RedisStore) or source.cluster or not isinstance(target, RedisStore):
            print(
                "chargen: error: the old layout only ever lived on one redis-server: point CHARGEN_STATE_URL at it",
                file=sys.stderr,
            )
            return 2
        tally = await migrate(source, target, args.dry_run, args.keep)
    except (StoreUnavailable, RedisError) as err:
        print(f"chargen: error: {source._scrub(str(err))}", file=sys.stderr)
        return 1
    finally:
        await source.close()
        if target is not source:
            await target.close()
    verb = "would move" if args.dry_run else "moved"
    print(
        f"{verb} {tally.moved} session(s) from {source.describe()} to {target.describe()}; {tally.in_use} in use "
        f"by a chargen 0.1 replica (run again once those stopped); {tally.gone} expired meanwhile"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
