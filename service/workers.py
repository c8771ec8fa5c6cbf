"""`chargen serve --workers N`: N worker processes sharing one port.

Each worker is the whole service (app, engine thread, store connections) with one torch thread,
as `chargen serve` alone is, listening on its own socket in the port's SO_REUSEPORT group: the
kernel spreads new connections over the workers by a hash of their addresses, so every core runs
model steps and the HTTP work is spread over the cores with them. (One socket shared by all, as
uvicorn's and gunicorn's workers do, let whichever worker accepts first take a connection: 64
keep-alive clients split 20/44 there, against 28-30/34-36 by the hash; docs/scaling.md, with why
this design rather than one HTTP front with N engine processes.)

The supervisor here owns the port and the workers' lives: it reserves the port (a bound socket in
the group that never listens), starts the workers (fresh interpreters, `python -m service.workers
PID`), forwards SIGTERM/SIGINT to them as SIGTERM
(each drains its own streams and saves their sessions, then exits), starts a new worker in place
of one that dies, and exits once all have: 0 when each exited 0. Sessions must be in a store every
worker reaches (Redis): memory:// sessions live inside one process, so it is refused. Metrics:
prometheus-client's multiprocess mode in a temporary directory removed at exit (service/metrics.py).
"""

from __future__ import annotations

import logging
import logging.config
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from types import FrameType

from prometheus_client import multiprocess

from service.metrics import MULTIPROCESS_DIR
from service.settings import Settings

log = logging.getLogger("chargen.supervisor")

EXIT_USAGE = 2  # a worker that exits 2 found bad settings or a bad model: starting more cannot help
RESTART_WINDOW_S = 60.0  # a worker that dies is replaced, up to RESTART_LIMIT times in this window
RESTART_LIMIT = 5


def reuseport_socket(host: str, port: int, send_buffer: int) -> socket.socket:
    """A socket bound to host:port in the port's SO_REUSEPORT group (not listening yet)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if send_buffer:  # accepted connections inherit it (see service.main.bind_listener)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    sock.bind((host, port))
    return sock


def memory_refused() -> str:
    return (
        "chargen: error: CHARGEN_WORKERS above 1 needs sessions every worker can reach, and memory:// "
        "sessions live inside one process: set CHARGEN_STATE_URL=redis://HOST:6379/0 (or run one worker)"
    )


class Supervisor:
    def __init__(self, count: int, reserved: socket.socket, env: dict[str, str]) -> None:
        self.count = count
        self.reserved = reserved
        self.env = env
        self.workers: dict[int, subprocess.Popen[bytes]] = {}  # slot -> its worker process
        self.signals = 0  # SIGTERM/SIGINT received: 1 drains, 2 stops at once
        self.failed = False  # a worker exited non-zero, or starting workers was given up
        self.restarts: list[float] = []

    def start(self, slot: int) -> None:
        command = [sys.executable, "-m", "service.workers", str(os.getpid())]
        self.workers[slot] = subprocess.Popen(command, env=self.env)

    def forward(self, sig: int, frame: FrameType | None) -> None:
        self.signals += 1
        log.info("stopping %d worker(s)%s", len(self.workers), " now" if self.signals > 1 else ": draining")
        for proc in self.workers.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # a worker's second SIGTERM makes it exit at once

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.forward)
        for slot in range(self.count):
            self.start(slot)
        host, port = self.reserved.getsockname()[:2]
        pids = ", ".join(str(p.pid) for p in self.workers.values())
        log.info("%d workers (pids %s) sharing http://%s:%d", self.count, pids, host, port)
        while self.workers:
            time.sleep(0.1)
            for slot, proc in list(self.workers.items()):
                if (code := proc.poll()) is not None:
                    self.reap(slot, proc, code)
        return 1 if self.failed else 0

    def reap(self, slot: int, proc: subprocess.Popen[bytes], code: int) -> None:
        del self.workers[slot]
        multiprocess.mark_process_dead(proc.pid, self.env[MULTIPROCESS_DIR])  # its live gauges leave the sums
        if self.signals:  # stopping: each worker's own exit status counts
            self.failed |= code != 0
            return
        now = time.monotonic()
        self.restarts = [t for t in self.restarts if now - t < RESTART_WINDOW_S]
        if code == EXIT_USAGE or len(self.restarts) >= RESTART_LIMIT:
            why = "bad settings or model" if code == EXIT_USAGE else f"{len(self.restarts)} restarts in a minute"
            log.error("worker pid %d exited with %d (%s): stopping the others", proc.pid, code, why)
            self.failed = True
            self.forward(signal.SIGTERM, None)
            return
        log.warning("worker pid %d exited with %d: starting another in its place", proc.pid, code)
        self.restarts.append(now)
        self.start(slot)


def supervise(settings: Settings) -> int:
    """Run settings.worker_count workers on one socket until signalled; the exit code."""
    if settings.state_url.startswith("memory://"):
        print(memory_refused(), file=sys.stderr)
        return EXIT_USAGE
    from service.main import logging_config

    logging.config.dictConfig(logging_config(settings))
    try:  # held, never listening: it keeps the port (and port 0's pick) for the workers' group
        reserved = reuseport_socket(settings.host, settings.port, 0)
    except OSError as err:
        log.error("cannot bind %s:%d: %s", settings.host, settings.port, err)
        return 1
    metrics_dir = tempfile.mkdtemp(prefix="chargen-metrics-")
    # The CLI's --host/--port/--model reach the workers as the settings they override.
    env = {**os.environ, MULTIPROCESS_DIR: metrics_dir, "CHARGEN_MODEL": str(settings.model_path)}
    env["CHARGEN_HOST"], env["CHARGEN_PORT"] = settings.host, str(reserved.getsockname()[1])
    if settings.model_id:
        env["CHARGEN_MODEL_ID"] = settings.model_id
    try:
        return Supervisor(settings.worker_count, reserved, env).run()
    finally:
        reserved.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)


def worker_main(parent_pid: int) -> int:
    """One worker: the service on its own socket in the port's group (the checks of `chargen serve`)."""
    from service.main import read_model, read_settings, serve

    settings = read_settings()
    if settings is None:
        return EXIT_USAGE
    try:
        listener = reuseport_socket(settings.host, settings.port, settings.socket_send_buffer_bytes)
    except OSError as err:
        print(f"chargen: error: cannot bind {settings.host}:{settings.port}: {err}", file=sys.stderr)
        return 1
    loaded = None
    if settings.models_dir is None:  # a directory's bad files are listed failed, not fatal
        loaded = read_model(settings)
        if loaded is None:
            return EXIT_USAGE
    return serve(settings, loaded, listener, parent_pid)


if __name__ == "__main__":
    raise SystemExit(worker_main(int(sys.argv[1])))
