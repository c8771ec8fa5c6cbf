"""Soak test: `chargen serve` with sessions in a real redis-server, under locust (headless) for minutes.

Starts its own redis-server and `chargen serve` on free ports, runs the given locustfile with
``--users`` users for ``--duration`` seconds, samples the service's resident memory (RSS) every
few seconds, then stops the service with SIGTERM (it must drain and exit 0) and reports:
requests/s, failures, p50/p95/p99 response times (a streamed request's time is the whole stream),
5xx answers seen by the service, and RSS after the first minute vs at the end.

    python benchmarks/soak.py                                   # 64 users, 5 minutes, chargen/models/shakespeare.pt
    python benchmarks/soak.py --duration 60 --json /tmp/soak.json

Exits 1 if any request failed, the service answered a 5xx, its RSS at the end is more than
``--rss-tolerance`` (10%) above its RSS after the first minute, or it did not exit 0 on SIGTERM.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(url: str, timeout: float, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"soak: the service exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"soak: {url} not ready after {timeout:.0f} s")


def aggregated(prefix: str) -> tuple[dict[str, str], list[dict[str, str]]]:
    with open(prefix + "_stats.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    total = next(row for row in rows if row["Name"] == "Aggregated")
    return total, [row for row in rows if row["Name"] != "Aggregated"]


def server_5xx(metrics_text: str) -> int:
    count = 0.0
    for line in metrics_text.splitlines():
        if line.startswith("chargen_http_requests_total{") and 'status="5' in line:
            count += float(line.rsplit(" ", 1)[1])
    return int(count)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--locustfile", default=str(ROOT / "locustfile.py"), help="locustfile to run (the load test's)")
    parser.add_argument("--model", default=str(ROOT / "chargen" / "models" / "shakespeare.pt"))
    parser.add_argument("--users", type=int, default=64)
    parser.add_argument("--spawn-rate", type=float, default=16)
    parser.add_argument("--duration", type=int, default=300, help="seconds")
    parser.add_argument("--first-minute", type=float, default=60.0, help="when the reference RSS is taken (s)")
    parser.add_argument("--rss-tolerance", type=float, default=0.10)
    parser.add_argument("--json", default=None, help="write the figures here")
    parser.add_argument("--keep", default=None, help="directory for locust's CSV and the service log")
    args = parser.parse_args()

    if not Path(args.locustfile).exists():
        raise SystemExit(f"soak: no locustfile at {args.locustfile}")
    work = Path(args.keep or tempfile.mkdtemp(prefix="chargen-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    redis_port, port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    redis_proc = subprocess.Popen(
        ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = {
        **os.environ,
        "CHARGEN_STATE_URL": f"redis://127.0.0.1:{redis_port}/0",
        "CHARGEN_LOG_LEVEL": "warning",  # no access log: its I/O is not what is being measured
    }
    service_log = (work / "service.log").open("wb")
    service = subprocess.Popen(
        [str(BIN / "chargen"), "serve", "--port", str(port), "--model", args.model],
        env=env,
        stdout=service_log,
        stderr=service_log,
    )
    figures: dict[str, Any] = {"users": args.users, "duration_s": args.duration, "locustfile": args.locustfile}
    try:
        wait_for(url + "/readyz", 120, service)
        process = psutil.Process(service.pid)
        samples: list[tuple[float, int]] = []
        stop = threading.Event()

        def sample() -> None:
            start = time.monotonic()
            while not stop.is_set():
                samples.append((time.monotonic() - start, process.memory_info().rss))
                stop.wait(5.0)

        prefix = str(work / "locust")
        locust = [
            str(BIN / "locust"),
            "-f",
            args.locustfile,
            "--headless",
            "-u",
            str(args.users),
            "-r",
            str(args.spawn_rate),
            "-t",
            f"{args.duration}s",
            "--host",
            url,
            "--csv",
            prefix,
            "--only-summary",
            "--stop-timeout",
            "30",
        ]
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.monotonic()
        run = subprocess.run(locust, cwd=ROOT, capture_output=True, text=True)
        figures["locust_seconds"] = round(time.monotonic() - started, 1)
        stop.set()
        sampler.join()
        (work / "locust.log").write_text(run.stdout + run.stderr)
        total, rows = aggregated(prefix)
        figures["requests"] = int(total["Request Count"])
        figures["failures"] = int(total["Failure Count"])
        figures["requests_per_s"] = round(float(total["Requests/s"]), 2)
        for key, name in (("50%", "p50_ms"), ("95%", "p95_ms"), ("99%", "p99_ms")):
            figures[name] = float(total[key])
        figures["per_request"] = {
            row["Name"]: {
                "count": int(row["Request Count"]),
                "failures": int(row["Failure Count"]),
                "p50_ms": float(row["50%"]),
                "p99_ms": float(row["99%"]),
            }
            for row in rows
        }
        figures["server_5xx"] = server_5xx(httpx.get(url + "/metrics", timeout=10).text)
        first = next((rss for t, rss in samples if t >= args.first_minute), samples[0][1])
        end = samples[-1][1]
        figures["rss_after_first_minute_mib"] = round(first / 2**20, 1)
        figures["rss_end_mib"] = round(end / 2**20, 1)
        figures["rss_peak_mib"] = round(max(rss for _, rss in samples) / 2**20, 1)
        figures["rss_change"] = round(end / first - 1, 4)
    finally:
        if service.poll() is None:
            service.send_signal(signal.SIGTERM)
            try:
                figures["service_exit"] = service.wait(60)
            except subprocess.TimeoutExpired:
                service.kill()
                figures["service_exit"] = "killed"
        redis_proc.terminate()
        redis_proc.wait(10)
        service_log.close()
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)

    ok = (
        figures["failures"] == 0
        and figures["requests"] > 0
        and figures["server_5xx"] == 0
        and figures["rss_change"] <= args.rss_tolerance
        and figures["service_exit"] == 0
    )
    figures["ok"] = ok
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
