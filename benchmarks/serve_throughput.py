"""Serving throughput: the real service under 1..64 concurrent streams, against the machine's ceiling.

One run does these:

1. a diagnostic: the batching engine alone in this process (no HTTP) at each level, against the
   artifact's step at the same thread setting in this process;
2. the service with batching on: ``chargen serve`` (uvicorn; ``--workers`` worker processes) in a
   subprocess with sessions in a real ``redis-server`` started here on a free port; for each level
   N, N clients each create a session, then all stream ``--chars`` characters at once (SSE,
   ``POST /v1/generate``), in bursts repeated until ``--min-seconds`` were measured; printed per
   level: aggregate characters/s (median over the bursts), time to first character (TTFC) and
   time between characters (TBC), p50 and p99, as the clients see them;
3. the ceiling of this machine: the artifact's ``step`` in a tight loop at the level's batch size,
   no HTTP, no sampling (characters/s = batch / seconds per step), the better of two ways to use
   the cores: ONE process with one torch thread per core, and one single-threaded process PER
   CORE, all at once, the level's rows split between them (their rates summed). Helper processes
   take the readings (none share this process's threads). This machine drifts ±25 % within
   minutes, so a level is measured in rounds (bursts for ``--round-seconds``) with a ceiling
   reading before the first round and after every round; each round's rate is divided by the mean
   of the two readings around it, and the level's ratio is the median of those paired ratios. The
   ratio against the highest reading of the level is printed beside it, as the most pessimistic
   view;
4. the baseline: the same service with batching off (``CHARGEN_MAX_BATCH=1``) at the highest level.

Every process of the run (this one, the ceiling's helpers, the service) runs on one allocator:
``--allocator`` (default auto: tcmalloc where it is installed, as the service's default).

Then the ratios against the targets. Characters that arrive in one SSE event count as arriving
together (a gap of 0 for all but the first).

    python benchmarks/serve_throughput.py                          # chargen/models/shakespeare.pt, 1,8,32,64
    python benchmarks/serve_throughput.py --workers auto           # one worker process per core
    python benchmarks/serve_throughput.py --model runs/x/model.pt --chars 200 --levels 1,8
    python benchmarks/serve_throughput.py --json out.json          # also write the figures as JSON
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "ROMEO:\n"  # short: the ceiling has no prompt work either; --prompt for longer ones


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


# ---- the ceiling ---------------------------------------------------------------------------


class Ceiling:
    """The artifact's `step` in a tight loop: one loaded module, warm state per batch size."""

    def __init__(self, model_path: Path, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self.torch = torch
        self.module = torch.jit.load(str(model_path))
        self.warm: dict[int, tuple[Any, Any, Any]] = {}

    def read(self, batch: int, seconds: float) -> float:
        """Characters/s at `batch` rows (median of 5 rounds of seconds/5 each)."""
        torch, module = self.torch, self.module
        with torch.inference_mode():
            if batch not in self.warm:
                h, c = module.init_state(batch)
                tokens = torch.zeros(batch, dtype=torch.int64)
                for _ in range(20):  # warm-up: the profiling executor specialises on the first calls
                    _, h, c = module.step(tokens, h, c)
                self.warm[batch] = (tokens, h, c)
            tokens, h, c = self.warm[batch]
            rates = []
            for _ in range(5):
                steps, start = 0, time.perf_counter()
                while (elapsed := time.perf_counter() - start) < seconds / 5 or steps < 5:
                    logits, h, c = module.step(tokens, h, c)
                    tokens = logits.argmax(1)  # feed something real back, as serving does
                    steps += 1
                rates.append(steps * batch / elapsed)
            self.warm[batch] = (tokens, h, c)
        rates.sort()
        return rates[len(rates) // 2]


def ceiling_helper(conn: Any, model_path: str, threads: int) -> None:
    """A helper process: a Ceiling at `threads` threads, reading (batch, seconds) jobs until None."""
    roof = Ceiling(Path(model_path), threads)
    conn.send(roof.read(1, 0.05))  # loaded and warm: ready
    while (job := conn.recv()) is not None:
        conn.send(roof.read(*job))


class MachineCeiling:
    """The better of one process with a torch thread per core and one 1-thread process per core.

    On a CPU where a second OpenMP thread barely speeds up these small matrices, the first is one
    core's ceiling, not the machine's; the second is what N independent engines can reach.
    """

    def __init__(self, model_path: Path, cores: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.cores = cores
        self.helpers = []
        for threads in [cores] + [1] * cores:  # helpers[0]: the wide one; then one per core
            ours, theirs = context.Pipe()
            proc = context.Process(target=ceiling_helper, args=(theirs, str(model_path), threads), daemon=True)
            proc.start()
            self.helpers.append((proc, ours))
        for _, conn in self.helpers:
            conn.recv()
        self.readings: dict[int, list[dict[str, float]]] = {}  # batch -> each reading's two figures

    def read(self, batch: int, seconds: float) -> float:
        wide = self.helpers[0][1]
        wide.send((batch, seconds))
        one_process = float(wide.recv())
        shares = [batch // self.cores + (i < batch % self.cores) for i in range(self.cores)]
        busy = [(conn, rows) for (_, conn), rows in zip(self.helpers[1:], shares, strict=True) if rows]
        for conn, rows in busy:
            conn.send((rows, seconds))
        per_core = sum(float(conn.recv()) for conn, _ in busy)
        self.readings.setdefault(batch, []).append({"one process": one_process, "per core": per_core})
        return max(one_process, per_core)

    def close(self) -> None:
        for proc, conn in self.helpers:
            conn.send(None)
            proc.join(10)


# ---- the service and redis -----------------------------------------------------------------


class Redis:
    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="chargen-bench-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Redis:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("serve_throughput: redis-server is not on PATH")
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(
            [binary, *args, "--dir", self.dir],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit("serve_throughput: redis-server did not start")
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


class Service:
    """The service in a subprocess, configured through CHARGEN_* variables.

    It runs `python -m service.main`, which is what `chargen serve` calls (`service.main.run`)
    without the command-line layer, so the service package first on PYTHONPATH is the one
    measured, whatever the age of that tree (`serve_ab.py --a-src`).
    """

    def __init__(self, model: Path, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "service.main"]
        where = {"CHARGEN_HOST": "127.0.0.1", "CHARGEN_PORT": str(self.port), "CHARGEN_MODEL": str(model)}
        self.env = {**os.environ, "CHARGEN_LOG_LEVEL": "warning", **where, **env}
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Service:
        import httpx

        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise SystemExit(f"serve_throughput: the service exited:\n{self.log.read().decode()[-2000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200 and self.all_workers_up():
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("serve_throughput: the service did not become ready")
            time.sleep(0.2)

    def all_workers_up(self) -> bool:
        """With CHARGEN_WORKERS above 1, /readyz answers once one worker is up: wait for them all."""
        import httpx

        wanted = self.env.get("CHARGEN_WORKERS", "1")
        if wanted == "1":
            return True
        count = len(os.sched_getaffinity(0)) if wanted == "auto" else int(wanted)
        for line in httpx.get(self.url + "/metrics", timeout=2).text.splitlines():
            if line.startswith("chargen_workers "):
                return float(line.split()[1]) == count
        return False

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# ---- streaming clients ---------------------------------------------------------------------


@dataclass
class StreamResult:
    ttfc: float  # seconds from sending the request to the first character
    gaps: list[float]  # seconds between consecutive characters
    chars: int
    started: float
    ended: float


@dataclass
class Level:
    streams: int
    chars_per_s: float
    ttfc_p50_ms: float
    ttfc_p99_ms: float
    tbc_p50_ms: float
    tbc_p99_ms: float
    chars: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


async def open_stream(host: str, port: int, body: dict[str, Any]) -> tuple[asyncio.StreamReader, Any, bytes]:
    """A connection and the bytes of one `POST /v1/generate`, ready to send."""
    reader, writer = await asyncio.open_connection(host, port)
    payload = json.dumps(body).encode()
    head = (
        f"POST /v1/generate HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Accept: text/event-stream\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    )
    return reader, writer, head.encode() + payload


async def sse_events(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    """The `data:` payloads of a chunked `text/event-stream` response, as they arrive."""
    status = await reader.readline()
    headers = []
    while (line := await reader.readline()) not in (b"\r\n", b""):
        headers.append(line.lower())
    if b" 200 " not in status:
        raise RuntimeError(f"HTTP {status.decode().strip()}: {(await reader.read(300)).decode(errors='replace')}")
    if b"transfer-encoding: chunked\r\n" not in headers:
        raise RuntimeError("expected a chunked event stream")
    buffer = b""
    while size := int((await reader.readline()).strip(), 16):
        buffer += (await reader.readexactly(size + 2))[:-2]
        *events, buffer = buffer.split(b"\n\n")
        for event in events:
            if event.startswith(b"data: "):
                yield event[6:]


async def one_stream(url: str, body: dict[str, Any], go: asyncio.Event) -> StreamResult:
    """One streaming client: connect, wait for the start signal, send, time every character.

    A deliberately small HTTP/1.1 client (a socket, chunked decoding, SSE framing): the clients
    run on the same two cores as the service, and httpx spent more CPU per event than the
    service does (TTFC at 64 streams measured ~4x higher through it; docs/benchmarks.md).
    """
    host, port = url.removeprefix("http://").split(":")
    reader, writer, request = await open_stream(host, int(port), body)
    await go.wait()
    started = time.perf_counter()
    writer.write(request)
    first: float | None = None
    last = started
    gaps: list[float] = []
    chars = 0
    try:
        async for data in sse_events(reader):
            if data == b"[DONE]":
                break
            payload = json.loads(data)
            if "error" in payload:
                raise RuntimeError(f"stream error: {payload['error']}")
            text = payload.get("text")
            if not text:
                continue
            now = time.perf_counter()
            if first is None:
                first = now
            else:
                gaps.append(now - last)
            gaps.extend([0.0] * (len(text) - 1))  # the rest of one event arrive with its first
            last = now
            chars += len(text)
    finally:
        writer.close()
    return StreamResult((first or last) - started, gaps, chars, started, last)


def run_clients(clients: Any) -> Any:
    """Run the clients' coroutine on uvloop (uvicorn[standard] brings it), else on asyncio's loop.

    The clients share the two cores with the service: on uvloop a 64-stream burst measured TTFC
    p50/p99 89/121 ms against 106/169 ms on asyncio's own loop, and 8 % more characters/s.
    """
    try:
        import uvloop
    except ImportError:
        return asyncio.run(clients)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(clients)


async def run_burst(
    url: str, streams: int, chars: int, prompt: str, seed: int | None, sessions: bool
) -> list[StreamResult]:
    """`streams` clients start streaming at the same moment; each gets `chars` characters."""
    import httpx

    bodies = [
        {"prompt": prompt, "max_new_chars": chars, "temperature": 1.0, "stream": True}
        | ({"seed": seed + i} if seed is not None else {})
        for i in range(streams)
    ]
    async with httpx.AsyncClient(timeout=httpx.Timeout(60.0)) as client:
        if sessions:  # outside the timing: a fresh session in Redis per client
            for body in bodies:
                created = await client.post(url + "/v1/sessions", json={})
                created.raise_for_status()
                body["session_id"] = created.json()["session_id"]
        go = asyncio.Event()
        tasks = [asyncio.create_task(one_stream(url, body, go)) for body in bodies]
        await asyncio.sleep(0.2 + 0.005 * streams)  # every client connected and waiting
        go.set()
        results = await asyncio.gather(*tasks)
        for body in bodies:
            if session_id := body.get("session_id"):
                await client.delete(url + f"/v1/sessions/{session_id}")
    got = sum(r.chars for r in results)
    if got != streams * chars:
        raise RuntimeError(f"expected {streams * chars} characters, got {got}")
    return results


def run_level(
    url: str,
    streams: int,
    chars: int,
    prompt: str,
    seed: int | None,
    sessions: bool,
    min_seconds: float,
    ceiling: Any = None,
    round_seconds: float = 1.5,
) -> Level:
    """Bursts of `streams` clients, in rounds of `round_seconds`, until `min_seconds` were measured.

    With `ceiling` (a function returning a ceiling reading in characters/s) it is read before the
    first round and after each one: a round's rate over the mean of the readings around it is
    that round's ratio, and the level's ratio is their median, so a drifting machine moves both
    sides of each ratio together. Characters/s is the median over the rounds (one burst of a
    lone 500-character stream lasts a fifth of a second: too short to read on this machine);
    TTFC and TBC percentiles are over every stream of every burst.
    """
    readings = [ceiling()] if ceiling else []
    rates: list[float] = []
    ratios: list[float] = []
    ttfc: list[float] = []
    gaps: list[float] = []
    measured = 0.0
    got = 0
    bursts = 0
    client_cpu = client_wall = 0.0
    while measured < min_seconds or not rates:
        round_chars, round_seconds_done = 0, 0.0
        while round_seconds_done < min(round_seconds, min_seconds - measured) or not round_chars:
            cpu, wall = time.process_time(), time.perf_counter()
            results = run_clients(run_burst(url, streams, chars, prompt, seed, sessions))
            client_cpu += time.process_time() - cpu
            client_wall += time.perf_counter() - wall
            round_seconds_done += max(r.ended for r in results) - min(r.started for r in results)
            round_chars += sum(r.chars for r in results)
            ttfc += [r.ttfc for r in results]
            gaps += [g for r in results for g in r.gaps]
            bursts += 1
        rates.append(round_chars / round_seconds_done)
        if ceiling:
            readings.append(ceiling())
            ratios.append(rates[-1] / ((readings[-2] + readings[-1]) / 2))
        measured += round_seconds_done
        got += round_chars
    rate = median(rates)
    # the clients share the cores with the service: what they took (sessions made and deleted included)
    extra: dict[str, Any] = {"bursts": bursts, "rounds": len(rates), "client_cores": client_cpu / client_wall}
    if ceiling:
        extra |= {
            "ceiling": median(readings),
            "ratio": median(ratios),
            "ratio_vs_highest": rate / max(readings),
            "ceiling_readings": readings,
            "round_ratios": ratios,
        }
    return Level(
        streams,
        rate,
        1e3 * percentile(ttfc, 50),
        1e3 * percentile(ttfc, 99),
        1e3 * percentile(gaps, 50),
        1e3 * percentile(gaps, 99),
        got,
        measured,
        extra,
    )


def warm_up(url: str, prompt: str, streams: int, sessions: bool) -> None:
    """A first burst at the highest level, unmeasured: what a service that has run for a minute
    has already done once (pooled Redis connections, every batch size's first steps, the
    framework's first requests). Measured cold, the first 64-stream burst had ~2.5x the TTFC."""
    run_clients(run_burst(url, streams, 20, prompt, None, sessions))


def measure_engine(model_path: Path, streams: int, chars: int, prompt: str, threads: int) -> float:
    """Characters/s of the batching engine alone, in this process: no HTTP, no SSE, no Redis.

    The diagnostic between the ceiling and the service: what the engine's own bookkeeping and
    sampling cost, before the event loop, the sockets and the clients take their share.
    """
    import torch

    sys.path.insert(0, str(ROOT))
    from service.artifact import load_model
    from service.engine import Engine, GenerationRequest
    from service.metrics import Metrics
    from service.sampling import SamplingParams

    torch.set_num_threads(threads)
    model = load_model(model_path)

    async def run() -> float:
        engine = Engine(model, Metrics(), max_streams=max(64, streams), torch_threads=threads)
        engine.start(asyncio.get_running_loop())

        async def one(n: int) -> None:
            request = GenerationRequest(model.encode(prompt), n, SamplingParams(), auto_ack=False)
            handle = engine.submit(request)
            while (piece := await handle.text.get()) is not None:
                handle.ack(len(piece))  # as the service does once a piece is written to the socket
            await handle.finished

        try:
            await one(20)  # warm-up
            start = time.perf_counter()
            await asyncio.gather(*(one(chars) for _ in range(streams)))
            return streams * chars / (time.perf_counter() - start)
        finally:
            await asyncio.to_thread(engine.stop)

    return asyncio.run(run())


def prompt_feed_ms(model_path: Path, prompt_chars: int, threads: int) -> float:
    """Milliseconds the engine needs to feed one prompt of this length (one row, `forward`)."""
    import torch

    torch.set_num_threads(threads)
    module = torch.jit.load(str(model_path))
    with torch.inference_mode():
        tokens = torch.zeros(1, max(prompt_chars - 1, 1), dtype=torch.int64)
        h, c = module.init_state(1)
        for _ in range(5):
            module.forward(tokens, h, c)
        times = []
        for _ in range(21):
            start = time.perf_counter()
            module.forward(tokens, h, c)
            times.append(time.perf_counter() - start)
    times.sort()
    return 1e3 * times[len(times) // 2]


# ---- report --------------------------------------------------------------------------------


def table(title: str, levels: list[Level], ceiling: dict[int, float] | None = None) -> str:
    """One row per level: its paired ratio, and the ratio against its highest ceiling reading
    (a level measured without readings, the baseline, is set against `ceiling`)."""
    lines = [
        title,
        f"{'streams':>7} {'chars/s':>9} {'ceiling':>9} {'x ceiling':>9} {'x highest':>9} {'TTFC p50':>9} "
        f"{'TTFC p99':>9} {'TBC p50':>8} {'TBC p99':>8}   (ms) {'clients, cores':>14}",
    ]
    for lv in levels:
        roof = lv.extra.get("ceiling") or (ceiling or {}).get(lv.streams) or math.nan
        ratio = lv.extra.get("ratio", lv.chars_per_s / roof)
        pessimistic = lv.extra.get("ratio_vs_highest", math.nan)
        lines.append(
            f"{lv.streams:>7} {lv.chars_per_s:>9.0f} {roof:>9.0f} {ratio:>9.2f} {pessimistic:>9.2f} "
            f"{lv.ttfc_p50_ms:>9.1f} {lv.ttfc_p99_ms:>9.1f} {lv.tbc_p50_ms:>8.2f} {lv.tbc_p99_ms:>8.2f}"
            f"      {lv.extra.get('client_cores', math.nan):>14.2f}"
        )
    return "\n".join(lines)


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "chargen" / "models" / "shakespeare.pt")
    parser.add_argument("--chars", type=int, default=500, help="characters each stream generates")
    parser.add_argument("--levels", default="1,8,32,64", help="concurrent streams, comma-separated")
    parser.add_argument("--prompt", default=PROMPT, help="prompt every stream sends")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads of the service (per worker)")
    parser.add_argument("--workers", default="1", help="the service's CHARGEN_WORKERS (a number, or auto)")
    parser.add_argument("--ceiling-seconds", type=float, default=0.75, help="tight-loop time per ceiling reading")
    parser.add_argument("--round-seconds", type=float, default=1.5, help="bursts between two ceiling readings")
    parser.add_argument("--min-seconds", type=float, default=15.0, help="measured time per level (rounds repeat)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the CHARGEN_MAX_BATCH=1 service")
    parser.add_argument("--no-sessions", action="store_true", help="stateless streams (no Redis sessions)")
    parser.add_argument("--seed", type=int, default=None, help="seed stream i with SEED+i (default: unseeded)")
    parser.add_argument("--also-seeded-single", action="store_true", help="also run 1 seeded stream")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here as JSON")
    parser.add_argument(
        "--allocator",
        choices=["auto", "tcmalloc", "system"],
        default="auto",
        help="malloc of every process of the run: this one, the ceiling's helpers and the service (CHARGEN_ALLOCATOR)",
    )
    args = parser.parse_args(argv)
    # The ceiling runs on the allocator the service runs on: this process starts itself again on
    # tcmalloc (as `chargen serve` does), and its helpers and the service inherit the preload.
    sys.path.insert(0, str(ROOT))
    from service import allocator

    allocator.restart_with_tcmalloc(args.allocator)
    levels = sorted({int(x) for x in args.levels.split(",") if x.strip()})
    model = args.model.resolve()
    if not model.exists():
        parser.error(f"no model at {model}")
    sessions = not args.no_sessions
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))  # before torch is imported

    cores = len(os.sched_getaffinity(0))
    print(
        f"model {model}, {args.chars} chars per stream, prompt {len(args.prompt)} chars, "
        f"torch threads {args.threads}, workers {args.workers}, {cores} cores, sessions in Redis: {sessions}, "
        f"every process on {allocator.describe()}",
        flush=True,
    )
    feed_ms = prompt_feed_ms(model, len(args.prompt), args.threads)
    print(f"prompt feeding: {feed_ms:.2f} ms per prompt (one row)", flush=True)
    one_engine = Ceiling(model, args.threads)  # the diagnostic's own: one process at the service's threads
    engine_only: dict[int, float] = {}
    for n in levels:
        before = one_engine.read(n, args.ceiling_seconds)
        engine_only[n] = measure_engine(model, n, args.chars, args.prompt, args.threads)
        ratio = engine_only[n] / ((before + one_engine.read(n, args.ceiling_seconds)) / 2)
        print(
            f"engine alone (no HTTP), {n} streams: {engine_only[n]:.0f} chars/s ({ratio:.2f} x its step "
            f"in one process at {args.threads} thread(s))",
            flush=True,
        )
    roofs = MachineCeiling(model, cores)

    ceiling: dict[int, float] = {}
    readings: dict[str, list[float]] = {}

    def level(key: str, n: int, seed: int | None) -> Level:
        lv = run_level(
            service.url,
            n,
            args.chars,
            args.prompt,
            seed,
            sessions,
            args.min_seconds,
            lambda: roofs.read(n, args.ceiling_seconds),
            args.round_seconds,
        )
        readings[key] = lv.extra["ceiling_readings"]
        ceiling.setdefault(n, lv.extra["ceiling"])
        return lv

    top = max(levels)
    env = {
        "CHARGEN_TORCH_THREADS": str(args.threads),
        "CHARGEN_MAX_STREAMS": str(max(64, top)),
        "CHARGEN_MAX_QUEUE": str(max(64, top)),
        "CHARGEN_MAX_NEW_CHARS": str(max(4096, args.chars)),
        "CHARGEN_WORKERS": args.workers,
        "CHARGEN_ALLOCATOR": args.allocator,
    }
    batched: list[Level] = []
    baseline: list[Level] = []
    seeded_single: Level | None = None
    with Redis() as redis:
        env["CHARGEN_STATE_URL"] = redis.url if sessions else "memory://"
        with Service(model, env) as service:
            warm_up(service.url, args.prompt, top, sessions)
            for n in levels:
                batched.append(level(str(n), n, args.seed))
                print(table("", batched[-1:]).splitlines()[-1], flush=True)
            if args.also_seeded_single:
                seeded_single = level("1 seeded", 1, 1)
        if not args.no_baseline:
            with Service(model, {**env, "CHARGEN_MAX_BATCH": "1"}) as service:
                warm_up(service.url, args.prompt, top, sessions)
                baseline.append(
                    run_level(service.url, top, args.chars, args.prompt, args.seed, sessions, args.min_seconds)
                )
    roofs.close()
    shown = "; ".join(f"{key}: {min(r):.0f}-{max(r):.0f}" for key, r in readings.items())
    print(f"ceiling readings during each level (lowest-highest), chars/s: {shown}", flush=True)
    ways = {
        n: {way: median([r[way] for r in got]) for way in ("one process", "per core")}
        for n, got in roofs.readings.items()
    }
    shown = "; ".join(f"{n}: {w['one process']:.0f} vs {w['per core']:.0f}" for n, w in ways.items())
    print(f"ceiling, one process with {cores} threads vs {cores} one-thread processes (medians): {shown}")
    print()
    print(table("service, batching on (CHARGEN_MAX_BATCH=64)", batched))
    if seeded_single is not None:
        print(table("one seeded stream", [seeded_single]).splitlines()[-1])
    if baseline:
        print(table("\nservice, batching off (CHARGEN_MAX_BATCH=1)", baseline, ceiling))
    print("\ntargets:")
    by_n = {lv.streams: lv for lv in batched}
    checks: dict[str, Any] = {}
    if top in by_n:
        r = by_n[top].extra["ratio"]
        checks[f"{top} streams >= 0.8 x the machine's ceiling@{top}"] = (r, r >= 0.8)
        if baseline:
            b = by_n[top].chars_per_s / baseline[0].chars_per_s
            checks[f"{top} streams >= 5 x unbatched baseline"] = (b, b >= 5)
        # Two readings of "prompt feeding". Per prompt: every prompt of the burst read on its own
        # (one row, `forward`) before the last one's first step. Batched: what the engine does for
        # prompts of up to CHARGEN_STEP_PREFILL_CHARS (32) characters, one character per shared
        # step at the burst's batch size (all but the last character; the last one's step is the
        # first character's).
        per_prompt = 50 + feed_ms * top
        batched_steps = len(args.prompt) - 1 if len(args.prompt) - 1 <= 32 else None
        ttfc = by_n[top].ttfc_p99_ms
        checks[f"TTFC p99 @{top} <= 50 ms + prompt feeding, per prompt ({per_prompt:.0f} ms)"] = (
            ttfc,
            ttfc <= per_prompt,
        )
        if batched_steps is not None:
            in_steps = 50 + batched_steps * 1e3 * top / ceiling[top]
            checks[f"TTFC p99 @{top} <= 50 ms + prompt feeding, batched steps ({in_steps:.0f} ms)"] = (
                ttfc,
                ttfc <= in_steps,
            )
    if 1 in by_n:
        r = by_n[1].extra["ratio"]
        checks["1 stream >= 0.8 x ceiling@1"] = (r, r >= 0.8)
    if seeded_single is not None:
        r = seeded_single.extra["ratio"]
        checks["1 seeded stream >= 0.8 x ceiling@1"] = (r, r >= 0.8)
    for name, (value, ok) in checks.items():
        print(f"  {name}: {value:.2f} -> {verdict(ok)}")
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "model": str(model),
                    "chars_per_stream": args.chars,
                    "prompt_chars": len(args.prompt),
                    "threads": args.threads,
                    "workers": args.workers,
                    "cores": cores,
                    "ceiling_ways": ways,
                    "sessions": sessions,
                    "ceiling": ceiling,
                    "ceiling_readings": readings,
                    "prompt_feed_ms": feed_ms,
                    "engine_only": engine_only,
                    "batched": [asdict(lv) for lv in batched],
                    "seeded_single": asdict(seeded_single) if seeded_single else None,
                    "baseline": [asdict(lv) for lv in baseline],
                    "targets": {k: {"value": v, "met": ok} for k, (v, ok) in checks.items()},
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
