"""Session-store capacity: one redis-server against a 3-primary Redis Cluster, side by side.

Starts both on loopback (the cluster with a replica per primary, as the failover test runs it),
then alternates rounds of the same load on each: client tasks that each create a session and
continue it once, as a request with a session does (CREATE, then ACQUIRE and SAVE-with-release:
three round trips). Per store it prints, as medians over the rounds:

- operations (create + continue) per second, and per cent of one core the Redis processes used;
- Redis CPU per operation, and so the operations one core of Redis serves per second;
- memory per session (state of --state-bytes, hash, key and expiry-index entry), sessions per GB.

On a 2-core machine the Python client, not Redis, sets the operations per second; the CPU per
operation is what scales. Figures from a shared machine vary by ±25 %: compare within one run.

    python benchmarks/store_capacity.py                       # 3x700 model states (16,860 bytes)
    python benchmarks/store_capacity.py --state-bytes 6204    # the bundled 3x256 model
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.state_store import RedisStore  # noqa: E402
from tests.redis_support import LocalCluster, RedisServer  # noqa: E402


@dataclass
class Target:
    name: str
    url: str
    nodes: list[redis.Redis]  # the primaries: where the CPU and memory are read
    ops_per_s: list[float] = field(default_factory=list)
    cpu_share: list[float] = field(default_factory=list)  # Redis CPU seconds per wall second
    cpu_us_per_op: list[float] = field(default_factory=list)


def redis_cpu_s(nodes: list[redis.Redis]) -> float:
    total = 0.0
    for node in nodes:
        info = node.info("cpu")
        total += float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
    return total


async def load(url: str, seconds: float, concurrency: int, state: bytes, ttl_s: int) -> int:
    """Create-and-continue operations done in `seconds` by `concurrency` tasks."""
    store = RedisStore(url, ttl_s, 5000, prefix="chargen:bench:")
    await store.open_connections(concurrency)
    done = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            session_id = secrets.token_urlsafe(24)
            await store.create(session_id, state)
            token, _ = await store.acquire(session_id)
            await store.save_and_release(session_id, token, state)
            done += 1

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await store.close()
    return done


def measure_round(target: Target, args: argparse.Namespace, state: bytes) -> None:
    cpu_before, start = redis_cpu_s(target.nodes), time.perf_counter()
    ops = asyncio.run(load(target.url, args.seconds, args.concurrency, state, args.ttl))
    wall, cpu = time.perf_counter() - start, redis_cpu_s(target.nodes) - cpu_before
    target.ops_per_s.append(ops / wall)
    target.cpu_share.append(cpu / wall)
    target.cpu_us_per_op.append(cpu / ops * 1e6)


def bytes_per_session(node: redis.Redis, url: str, state: bytes, count: int = 2000) -> float:
    """used_memory grown by `count` sessions (everything a session costs Redis), per session."""

    async def create() -> None:
        store = RedisStore(url, 3600, 5000, prefix=f"chargen:size{secrets.token_hex(3)}:")
        try:
            for _ in range(count):
                await store.create(secrets.token_urlsafe(24), state)
        finally:
            await store.close()

    before = int(node.info("memory")["used_memory"])
    asyncio.run(create())
    return (int(node.info("memory")["used_memory"]) - before) / count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state-bytes", type=int, default=16_860, help="state size (3x700 model: 16,860)")
    parser.add_argument("--rounds", type=int, default=6, help="rounds per store, alternated")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of a round")
    parser.add_argument("--concurrency", type=int, default=32, help="client tasks (requests in flight)")
    parser.add_argument("--ttl", type=int, default=5, help="session TTL: keeps memory flat during the rounds")
    args = parser.parse_args(argv)
    state = secrets.token_bytes(args.state_bytes)
    with tempfile.TemporaryDirectory(prefix="chargen-capacity-") as tmp:
        single_dir, cluster_dir = Path(tmp, "single"), Path(tmp, "cluster")
        single_dir.mkdir()
        cluster_dir.mkdir()
        single = RedisServer(single_dir).start()
        cluster = LocalCluster(cluster_dir).start()
        try:
            primaries = [cluster.client(primary) for *_, primary, _ in cluster.shards()]
            targets = [
                Target("one redis-server", single.url, [single.client()]),
                Target("3-primary cluster", cluster.url, primaries),
            ]
            size = bytes_per_session(targets[0].nodes[0], single.url, state)
            for round_ in range(args.rounds):
                for target in targets if round_ % 2 == 0 else targets[::-1]:
                    measure_round(target, args, state)
            report(targets, args, size)
        finally:
            cluster.stop()
            single.stop()
    return 0


def report(targets: list[Target], args: argparse.Namespace, size: float) -> None:
    rounds = f"{args.rounds} rounds of {args.seconds} s"
    print(f"state {args.state_bytes:,} bytes, {args.concurrency} client tasks, {rounds}")
    print(f"memory per session: {size:,.0f} bytes (state, hash, key, expiry index): {1e9 / size:,.0f} sessions per GB")
    print(f"{'store':<20} {'ops/s':>9} {'Redis CPU':>10} {'CPU us/op':>10} {'ops/s per Redis core':>21}")
    for t in targets:
        ops, share, per_op = (statistics.median(v) for v in (t.ops_per_s, t.cpu_share, t.cpu_us_per_op))
        print(f"{t.name:<20} {ops:>9,.0f} {share:>9.0%} {per_op:>10.1f} {1e6 / per_op:>21,.0f}")
    ratios = [c / s for s, c in zip(targets[0].ops_per_s, targets[1].ops_per_s, strict=True)]
    print(f"cluster / single, ops/s, median of rounds side by side: {statistics.median(ratios):.2f}")
    print("each operation: 3 round trips (create; continue = acquire + save-and-release)")


if __name__ == "__main__":
    raise SystemExit(main())
