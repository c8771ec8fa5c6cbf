"""1 worker against N: the service's characters/s and time to first character, side by side.

Both services run at once on one `redis-server` (an idle one costs nothing), `chargen serve`
with ``CHARGEN_WORKERS=1`` and with ``--workers`` (default: auto, one per core). Each round
measures, for each service in turn:

- characters/s at each ``--clients`` level: that many concurrent clients, each on its own
  keep-alive connection sending non-streaming ``POST /v1/generate`` requests (``--chars``
  characters, temperature 1, no session) one after another for ``--seconds``;
- streaming time to first character: bursts of ``--stream-levels`` SSE clients starting at once
  (serve_throughput.py's client), p50 and p99 over every stream of the round.

Printed: the median over ``--rounds`` rounds of each figure, and N/1 per level. This is the
shape of the TorchServe comparison in docs/benchmarks.md (200 characters per request, 1, 8 and
64 clients, median of 3 rounds).

    python benchmarks/serve_workers.py                       # auto workers, 1,8,64 clients, 3 rounds
    python benchmarks/serve_workers.py --workers 2 --rounds 5 --seconds 10
    python benchmarks/serve_workers.py --env CHARGEN_PRECISION=bf16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_throughput import ROOT, Redis, Service, median, percentile, run_burst, run_clients

PROMPT = "ROMEO:\n"


async def closed_loop_client(host: str, port: int, body: bytes, until: float, path: str = "/v1/generate") -> int:
    """Requests one after another on one keep-alive connection until `until`: characters received
    (the reply's ``text``; `path` another server's route, as torchserve_compare.py does)."""
    reader, writer = await asyncio.open_connection(host, port)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    chars = 0
    try:
        while time.perf_counter() < until:
            writer.write(head + body)
            status = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
            reply = await reader.readexactly(length)
            if b" 200 " not in status:
                raise RuntimeError(f"{status.decode().strip()}: {reply[:300].decode(errors='replace')}")
            chars += len(json.loads(reply)["text"])
    finally:
        writer.close()
    return chars


async def clients_rate(url: str, clients: int, chars: int, seconds: float, path: str = "/v1/generate") -> float:
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": PROMPT, "max_new_chars": chars, "temperature": 1.0}).encode()
    start = time.perf_counter()
    until = start + seconds
    got = await asyncio.gather(*(closed_loop_client(host, int(port), body, until, path) for _ in range(clients)))
    return sum(got) / (time.perf_counter() - start)


def ttfc(url: str, streams: int, chars: int, bursts: int) -> list[float]:
    out: list[float] = []
    for _ in range(bursts):
        out += [r.ttfc for r in run_clients(run_burst(url, streams, chars, PROMPT, None, False))]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "chargen" / "models" / "shakespeare.pt")
    parser.add_argument("--workers", default="auto", help="CHARGEN_WORKERS of the second service")
    parser.add_argument("--clients", default="1,8,64", help="concurrent non-streaming clients, comma-separated")
    parser.add_argument("--stream-levels", default="1,64", help="concurrent streams for TTFC, comma-separated")
    parser.add_argument("--chars", type=int, default=200, help="characters per request")
    parser.add_argument("--seconds", type=float, default=6.0, help="measured time per level, service and round")
    parser.add_argument("--bursts", type=int, default=5, help="streaming bursts per level, service and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for both services (repeatable)")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here as JSON")
    args = parser.parse_args(argv)
    clients = [int(x) for x in args.clients.split(",") if x.strip()]
    stream_levels = [int(x) for x in args.stream_levels.split(",") if x.strip()]
    top = max(clients + stream_levels)
    env = {
        "CHARGEN_MAX_STREAMS": str(max(64, top)),
        "CHARGEN_MAX_QUEUE": str(max(64, top)),
        "CHARGEN_MAX_STREAMS_PER_KEY": "0",
        **dict(pair.split("=", 1) for pair in args.env),
    }
    names = ["1 worker", f"workers {args.workers}"]
    rates: dict[str, dict[int, list[float]]] = {name: {n: [] for n in clients} for name in names}
    firsts: dict[str, dict[int, list[list[float]]]] = {name: {n: [] for n in stream_levels} for name in names}
    cores = len(os.sched_getaffinity(0))
    print(f"model {args.model}, {args.chars} chars per request, {cores} cores {' '.join(args.env)}", flush=True)
    with Redis() as redis:
        env["CHARGEN_STATE_URL"] = redis.url
        with (
            Service(args.model, {**env, "CHARGEN_WORKERS": "1"}) as one,
            Service(args.model, {**env, "CHARGEN_WORKERS": args.workers}) as many,
        ):
            services = dict(zip(names, (one, many), strict=True))
            for service in services.values():  # warm-up: every batch size's first steps, pooled connections
                run_clients(clients_rate(service.url, top, args.chars, 1.0))
            for round_ in range(args.rounds):
                for n in clients:
                    for name, service in services.items():
                        rates[name][n].append(run_clients(clients_rate(service.url, n, args.chars, args.seconds)))
                for n in stream_levels:
                    for name, service in services.items():
                        firsts[name][n].append(ttfc(service.url, n, args.chars, args.bursts))
                shown = ", ".join(f"{name} {n}: {rates[name][n][-1]:.0f}" for n in clients for name in names)
                print(f"round {round_ + 1}: chars/s {shown}", flush=True)
    print(f"\nmedian of {args.rounds} rounds, {args.chars} characters per request")
    print(f"{'clients':>7} " + " ".join(f"{name + ' chars/s':>22}" for name in names) + f" {'ratio':>6}")
    summary: dict[str, Any] = {"chars_per_s": {}, "ttfc_ms": {}}
    for n in clients:
        a, b = (median(rates[name][n]) for name in names)
        summary["chars_per_s"][n] = {names[0]: a, names[1]: b}
        print(f"{n:>7} {a:>22.0f} {b:>22.0f} {b / a:>6.2f}")
    print(f"\nstreaming TTFC (ms), p50 / p99, median over rounds of each round's {args.bursts} bursts")
    for n in stream_levels:
        cells = []
        for name in names:
            p50 = median([1e3 * percentile(r, 50) for r in firsts[name][n]])
            p99 = median([1e3 * percentile(r, 99) for r in firsts[name][n]])
            summary["ttfc_ms"].setdefault(n, {})[name] = {"p50": p50, "p99": p99}
            cells.append(f"{name}: {p50:.1f} / {p99:.1f}")
        print(f"{n:>7} streams  " + "   ".join(cells))
    if args.json is not None:
        args.json.write_text(json.dumps({"rates": rates, "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
