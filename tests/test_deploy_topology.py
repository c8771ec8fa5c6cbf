"""The docker-compose topology, run for real on loopback without a Docker engine.

From docker-compose.yml and deploy/nginx.conf this module starts what the compose file describes:
redis-server with the `redis` service's command line, two `chargen serve` replicas with the `api`
service's environment, and nginx with the repository's nginx.conf pointed at the two replicas.
Only what cannot be the same outside containers is changed: ports (free loopback ports), file
paths (a temporary directory), the Redis host in CHARGEN_STATE_URL, and the model path (a path
inside the image; here the tiny model the test session trains).

Then, over real HTTP through nginx: a session continues correctly whichever replica serves each
request, streamed characters arrive as they are produced, and the health checks of the Dockerfile
and compose file pass against the running processes.

Needs nginx and redis-server (Debian: apt-get install --no-install-recommends nginx redis-server);
without them the module is skipped.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.service_support import assert_streamed_as_produced

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
NGINX_CONF = ROOT / "deploy" / "nginx.conf"
DOCKERFILE = ROOT / "Dockerfile"
STARTUP_S = 120  # two replicas importing torch on a busy 2-core CI machine


def find_binary(name: str) -> str | None:
    # nginx lives in /usr/sbin, which is not on a non-root user's PATH.
    return shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None
    )


NGINX = find_binary("nginx")
REDIS_SERVER = find_binary("redis-server")
pytestmark = [
    pytest.mark.skipif(NGINX is None, reason="nginx not installed (Debian: apt-get install nginx)"),
    pytest.mark.skipif(
        REDIS_SERVER is None, reason="redis-server not installed (Debian: apt-get install redis-server)"
    ),
]


# --- the compose file, as docker compose would read it ------------------------------------------


def interpolate(value: str) -> str:
    """Compose's ${VAR:-default} / ${VAR-default} / ${VAR} with the file's defaults (no .env)."""

    def one(match: re.Match[str]) -> str:
        return match.group(3) or ""

    return re.sub(r"\$\{(\w+)(:?-)?([^}]*)\}", one, value)


def compose_services() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))["services"]


def redis_args(port: int, data_dir: Path) -> list[str]:
    """The redis service's command with the port, bind address and data dir made local."""
    command = [interpolate(str(a)) for a in compose_services()["redis"]["command"]]
    assert command[0] == "redis-server"
    args, rest = [], command[1:]
    while rest:  # `--name value...` groups; drop the ones we must own
        name, rest = rest[0], rest[1:]
        assert name.startswith("--"), f"unexpected redis argument {name!r}"
        values = []
        while rest and not rest[0].startswith("--"):
            values.append(rest.pop(0))
        if name not in ("--port", "--bind", "--dir", "--daemonize"):
            args += [name, *values]
    return [*args, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir), "--daemonize", "no"]


def api_environment(redis_port: int, model: Path) -> dict[str, str]:
    env = {k: interpolate(str(v)) for k, v in compose_services()["api"]["environment"].items()}
    assert env["CHARGEN_STATE_URL"].startswith("redis://redis:6379/")
    env["CHARGEN_STATE_URL"] = env["CHARGEN_STATE_URL"].replace("redis:6379", f"127.0.0.1:{redis_port}")
    # the compose value is the image's directory and a volume: here, the one model file instead
    assert env.pop("CHARGEN_MODELS_DIR") == "/app/models:/models"
    env["CHARGEN_MODEL"] = str(model)
    return env


# --- nginx.conf, rendered for loopback ----------------------------------------------------------


def render_nginx_conf(text: str, tmp: Path, listen_port: int, replicas: list[int]) -> str:
    """Rewrite exactly the lines marked `# test: rewritten`; anything else is run as written.

    Each rule must match once and every marked line must be matched, so a change to nginx.conf that
    this renderer does not understand fails loudly instead of testing a different config.
    """
    rules: list[tuple[str, Any]] = [
        # Workers of a root master would run as `nginx`, which cannot read the 0700 tmp dir.
        (r"user \S+;", "user root;" if os.geteuid() == 0 else ""),
        (r"pid \S+;", f"pid {tmp}/nginx.pid;"),
        (r"error_log \S+ (\w+);", lambda m: f"error_log {tmp}/error.log {m.group(1)};"),
        # No Docker DNS here, and the servers below are addresses.
        (r"resolver [^;]+;", ""),
        (r"access_log \S+ (\w+);", lambda m: f"access_log {tmp}/access.log {m.group(1)};"),
        (
            r"server api:8000 ([^;]*);",
            # `resolve` is for names (and needs nginx >= 1.27.3); keep every other parameter.
            lambda m: " ".join(f"server 127.0.0.1:{p} {m.group(1).replace('resolve', '').strip()};" for p in replicas),
        ),
        (r"listen 8000;", f"listen 127.0.0.1:{listen_port};"),
    ]
    used = [0] * len(rules)
    lines = []
    for line in text.splitlines():
        code, _, comment = line.partition("#")
        if code.strip() and comment.strip().startswith("test: rewritten"):
            stripped = code.strip()
            for i, (pattern, replacement) in enumerate(rules):
                match = re.fullmatch(pattern, stripped)
                if match:
                    used[i] += 1
                    new = replacement(match) if callable(replacement) else replacement
                    line = code.replace(stripped, new)
                    break
            else:
                raise AssertionError(f"nginx.conf line marked for rewriting but not understood: {line!r}")
        lines.append(line)
        if line.strip() == "http {":  # temp files under tmp, not the packaged /var/lib/nginx
            lines += [
                f"    {d}_temp_path {tmp}/{d}_temp;" for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
            ]
    assert used == [1] * len(rules), f"nginx.conf rewrite rules matched {used} times (each must match once)"
    return "\n".join(lines) + "\n"


# --- processes ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self, chars: int = 3000) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"--- {self.name} log ({self.log}) ---\n{text[-chars:]}"

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=5)


def start(name: str, argv: list[str], tmp: Path, env: dict[str, str] | None = None) -> Proc:
    log = tmp / f"{name}.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp)
    return Proc(name, popen, log)


def wait_until(check: Any, procs: list[Proc], what: str, timeout: float = STARTUP_S) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except (OSError, httpx.HTTPError):
            pass
        dead = [p for p in procs if p.popen.poll() is not None]
        if dead or time.monotonic() > deadline:
            logs = "\n".join(p.tail() for p in procs)
            state = f"{dead[0].name} exited with {dead[0].popen.returncode}" if dead else f"timed out after {timeout}s"
            raise AssertionError(f"{what}: {state}\n{logs}")
        time.sleep(0.2)


@dataclass
class Topology:
    lb: str
    replicas: list[str]
    redis_port: int
    redis: Proc
    procs: list[Proc]
    access_log: Path
    tmp: Path

    def logs(self) -> str:
        return "\n".join(p.tail() for p in self.procs)


@pytest.fixture(scope="module")
def topology(tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    tmp = tmp_path_factory.mktemp("topology")
    procs: list[Proc] = []
    try:
        redis_port = free_port()
        (tmp / "redis").mkdir()
        redis = start("redis", [str(REDIS_SERVER), *redis_args(redis_port, tmp / "redis")], tmp)
        procs.append(redis)

        env = {**os.environ, **api_environment(redis_port, tiny_artifact)}
        ports = [free_port(), free_port()]
        for i, port in enumerate(ports):  # the same command as the image's CMD, local host/port
            argv = [sys.executable, "-m", "chargen", "serve", "--host", "127.0.0.1", "--port", str(port)]
            procs.append(start(f"api-{i + 1}", argv, tmp, {**env, "PYTHONPATH": str(ROOT)}))

        lb_port = free_port()
        conf = tmp / "nginx.conf"
        conf.write_text(render_nginx_conf(NGINX_CONF.read_text(encoding="utf-8"), tmp, lb_port, ports))
        base = [str(NGINX), "-p", str(tmp), "-e", str(tmp / "error.log"), "-c", str(conf)]
        checked = subprocess.run([*base, "-t"], capture_output=True, text=True, timeout=30)
        assert checked.returncode == 0, f"nginx -t rejected the rendered config:\n{checked.stderr}"
        procs.append(start("nginx", [*base, "-g", "daemon off;"], tmp))

        replicas = [f"http://127.0.0.1:{p}" for p in ports]
        for url in replicas:
            wait_until(lambda url=url: httpx.get(f"{url}/readyz", timeout=2).status_code == 200, procs, f"{url} ready")
        lb = f"http://127.0.0.1:{lb_port}"
        wait_until(lambda: httpx.get(f"{lb}/healthz", timeout=2).status_code == 200, procs, "nginx up")
        yield Topology(lb, replicas, redis_port, redis, procs, tmp / "access.log", tmp)
    finally:
        for proc in reversed(procs):
            proc.stop()


# --- tests --------------------------------------------------------------------------------------


def generate(client: httpx.Client, url: str, **body: Any) -> dict[str, Any]:
    response = client.post(f"{url}/v1/generate", json=body)
    assert response.status_code == 200, f"{url}: {response.status_code} {response.text}"
    return response.json()


def upstreams_in_access_log(topology: Topology, since: int) -> list[str]:
    """Which replica served each proxied request after byte offset `since` of nginx's access log."""
    text = topology.access_log.read_bytes()[since:].decode()
    return re.findall(r"upstream=(\S+)", text)


def test_redis_runs_with_the_compose_persistence_and_eviction_settings(topology: Topology) -> None:
    import redis

    client = redis.Redis(port=topology.redis_port)
    args = compose_services()["redis"]["command"]
    assert client.config_get("appendonly")["appendonly"] == "yes"
    policy = client.config_get("maxmemory-policy")["maxmemory-policy"]
    assert policy == args[args.index("--maxmemory-policy") + 1]


def test_session_continues_on_whichever_replica_serves(topology: Topology) -> None:
    n, prompt = 24, "ROMEO:"
    with httpx.Client(timeout=60) as client:
        # Reference: greedy, all in one request, no session.
        whole = generate(client, topology.lb, prompt=prompt, max_new_chars=6 * n, temperature=0)["text"]

        created = client.post(f"{topology.lb}/v1/sessions", json={})
        assert created.status_code == 201, created.text
        session = created.json()["session_id"]

        log_start = topology.access_log.stat().st_size
        # Through the lb (nginx picks), then each replica directly, then the lb again.
        targets = [topology.lb, topology.lb, topology.replicas[0], topology.replicas[1], topology.lb, topology.lb]
        pieces = []
        for i, url in enumerate(targets):
            body = generate(
                client, url, prompt=prompt if i == 0 else "", max_new_chars=n, temperature=0, session_id=session
            )
            assert body["session_id"] == session
            pieces.append(body["text"])

    assert "".join(pieces) == whole, f"pieces {pieces!r}\nwhole {whole!r}"
    # nginx itself spread the session's requests over both replicas (least_conn: ties go round robin).
    served = upstreams_in_access_log(topology, log_start)
    replica_addrs = {url.removeprefix("http://") for url in topology.replicas}
    assert set(served) == replica_addrs, f"nginx sent the session to {served}"


def test_streamed_characters_arrive_through_nginx_as_they_are_produced(topology: Topology) -> None:
    assert_streamed_as_produced(topology.lb, chars=1500)


def test_healthchecks_of_the_images_pass_against_the_running_processes(topology: Topology) -> None:
    # The Dockerfile HEALTHCHECK (liveness, port from CHARGEN_PORT) and compose's api healthcheck
    # (readiness on 8000 in the container), run as written with only the port made local.
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    match = re.search(r"^HEALTHCHECK .*? CMD (\[.*\])$", text, re.MULTILINE)
    assert match, "no exec-form HEALTHCHECK in the Dockerfile"
    image_check = json.loads(match.group(1))
    compose_check = compose_services()["api"]["healthcheck"]["test"]
    assert image_check[0] == "python" and compose_check[:2] == ["CMD", "python"]

    for url in topology.replicas:
        port = url.rsplit(":", 1)[1]
        for argv in (image_check, [a.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for a in compose_check[1:]]):
            result = subprocess.run(
                [sys.executable, *argv[1:]], env={**os.environ, "CHARGEN_PORT": port}, capture_output=True, timeout=30
            )
            assert result.returncode == 0, f"{argv} on {url}: {result.stderr.decode()}"
        # ...and a dead port fails it.
    dead = subprocess.run(
        [sys.executable, *image_check[1:]], env={**os.environ, "CHARGEN_PORT": str(free_port())}, capture_output=True
    )
    assert dead.returncode != 0


def test_nginx_body_limit_is_the_service_limit_and_is_enforced(topology: Topology) -> None:
    from service.settings import Settings

    limit = re.search(r"client_max_body_size (\d+)k;", NGINX_CONF.read_text(encoding="utf-8"))
    assert limit, "client_max_body_size not in kilobytes"
    nginx_bytes = int(limit.group(1)) * 1024
    service_bytes = int(compose_services()["api"]["environment"].get("CHARGEN_MAX_BODY_BYTES", 0)) or (
        Settings.model_fields["max_body_bytes"].default
    )
    assert nginx_bytes == service_bytes, "deploy/nginx.conf and the api's CHARGEN_MAX_BODY_BYTES disagree"

    too_big = b'{"prompt": "' + b"a" * nginx_bytes + b'"}'
    response = httpx.post(f"{topology.lb}/v1/generate", content=too_big, headers={"content-type": "application/json"})
    assert response.status_code == 413


def test_sessions_survive_a_redis_restart(topology: Topology) -> None:
    # Runs last: it restarts the module's Redis. The compose file's append-only file is what keeps
    # the session; the replicas reconnect by themselves.
    with httpx.Client(timeout=60) as client:
        whole = generate(client, topology.lb, prompt="JULIET:", max_new_chars=40, temperature=0)["text"]
        session = client.post(f"{topology.lb}/v1/sessions", json={}).json()["session_id"]
        first = generate(client, topology.lb, prompt="JULIET:", max_new_chars=20, temperature=0, session_id=session)

        topology.redis.stop()  # SIGTERM, as `docker compose restart redis` sends: AOF flushed
        redis = start(
            "redis-restarted",
            [str(REDIS_SERVER), *redis_args(topology.redis_port, topology.tmp / "redis")],
            topology.tmp,
        )
        topology.procs.append(redis)
        for url in topology.replicas:
            wait_until(
                lambda url=url: httpx.get(f"{url}/readyz", timeout=2).status_code == 200, topology.procs, f"{url} back"
            )

        second = generate(client, topology.lb, prompt="", max_new_chars=20, temperature=0, session_id=session)
    assert first["text"] + second["text"] == whole
