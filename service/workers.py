"""`chargen serve --workers N`: N worker processes sharing one port.

Each worker is the whole service (app, engine thread, store connections) with one torch thread,
as `chargen serve` alone is, so every core runs model steps and the HTTP work is spread over the
cores with them. They share one listening socket and take turns by their open connections
(service/balancer.py): each accepts only while it has no more than the least loaded of the
others, so 64 connections split 32/32, where the kernel's hash over a port's SO_REUSEPORT group
split them 28/36 and one shared socket left to the race 20/44 (docs/scaling.md, with why this
design rather than one HTTP front with N engine processes).

The supervisor here owns the port and the workers' lives: it listens on the port (it never
accepts), makes the table of the workers' connection counts, starts the workers (fresh
interpreters, `python -m service.workers PID SLOT FD TABLE`, the socket inherited), forwards
SIGTERM/SIGINT to them as SIGTERM (each drains its own streams and saves their sessions, then
exits), starts a new worker in place of one that dies, and exits once all have: 0 when each exited
0. Connections that arrive while no worker is up wait in the socket's queue. Sessions must be in a
store every worker reaches (Redis): memory:// sessions live inside one process, so it is refused.
Metrics: prometheus-client's multiprocess mode in a temporary directory removed at exit
(service/metrics.py), which also holds the connection table.
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
from pathlib import Path
from types import FrameType

from prometheus_client import multiprocess

from service import allocator
from service.balancer import LoadTable
from service.metrics import MULTIPROCESS_DIR
from service.settings import Settings

log = logging.getLogger("chargen.supervisor")

EXIT_USAGE = 2  # a worker that exits 2 found bad settings or a bad model: starting more cannot help
RESTART_WINDOW_S = 60.0  # a worker that dies is replaced, up to RESTART_LIMIT times in this window
RESTART_LIMIT = 5
BACKLOG = 2048  # connections the shared socket queues for the workers (uvicorn's default)
TABLE = "connections"  # the workers' connection counts: a file in the metrics directory


def shared_listener(host: str, port: int, send_buffer: int) -> socket.socket:
    """The listening socket every worker accepts on (inherited, never accepted on here)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if send_buffer:  # accepted connections inherit it (see service.main.bind_listener)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    sock.bind((host, port))
    sock.listen(BACKLOG)
    return sock


def memory_refused() -> str:
    return (
        "chargen: error: CHARGEN_WORKERS above 1 needs sessions every worker can reach, and memory:// "
        "sessions live inside one process: set CHARGEN_STATE_URL=redis://HOST:6379/0 (or run one worker)"
    )


class Supervisor:
    def __init__(self, count: int, listener: socket.socket, table: Path, env: dict[str, str]) -> None:
        self.count = count
        self.listener = listener
        self.table_path = table
        self.table = LoadTable(table)
        self.env = env
        self.workers: dict[int, subprocess.Popen[bytes]] = {}  # slot -> its worker process
        self.signals = 0  # SIGTERM/SIGINT received: 1 drains, 2 stops at once
        self.failed = False  # a worker exited non-zero, or starting workers was given up
        self.restarts: list[float] = []

    def start(self, slot: int) -> None:
        fd = self.listener.fileno()
        command = [sys.executable, "-m", "service.workers", str(os.getpid()), str(slot), str(fd), str(self.table_path)]
        self.workers[slot] = subprocess.Popen(command, env=self.env, pass_fds=[fd])

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
        host, port = self.listener.getsockname()[:2]
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
        self.table.retire(slot)  # the others stop waiting for its count
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
    try:
        listener = shared_listener(settings.host, settings.port, settings.socket_send_buffer_bytes)
    except OSError as err:
        log.error("cannot bind %s:%d: %s", settings.host, settings.port, err)
        return 1
    metrics_dir = tempfile.mkdtemp(prefix="chargen-metrics-")
    table = Path(metrics_dir) / TABLE
    LoadTable.create(table, settings.worker_count)
    # The CLI's --host/--port/--model reach the workers as the settings they override.
    env = {**os.environ, MULTIPROCESS_DIR: metrics_dir, "CHARGEN_MODEL": str(settings.model_path)}
    env["CHARGEN_HOST"], env["CHARGEN_PORT"] = settings.host, str(listener.getsockname()[1])
    if settings.model_id:
        env["CHARGEN_MODEL_ID"] = settings.model_id
    env = allocator.preloading(settings.allocator, env) or env  # run() checked that it can
    supervisor = None
    try:
        supervisor = Supervisor(settings.worker_count, listener, table, env)
        return supervisor.run()
    finally:
        if supervisor is not None:
            supervisor.table.close()
        listener.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)


def worker_main(parent_pid: int, slot: int, fd: int, table: Path) -> int:
    """One worker: the service on the shared socket, in its slot of the table (the checks of `chargen serve`)."""
    from service.main import read_model, read_settings, serve

    listener = socket.socket(fileno=fd)
    settings = read_settings()
    if settings is None:
        return EXIT_USAGE
    loaded = None
    if settings.models_dir is None:  # a directory's bad files are listed failed, not fatal
        loaded = read_model(settings)
        if loaded is None:
            return EXIT_USAGE
    return serve(settings, loaded, listener, parent_pid, balance=(LoadTable(table), slot))


if __name__ == "__main__":
    pid, slot, fd, table = sys.argv[1:5]
    raise SystemExit(worker_main(int(pid), int(slot), int(fd), Path(table)))
