"""The deployment as users run it: both images built from the repository's Dockerfile, and
`docker compose up` of docker-compose.yml (redis, two api replicas, nginx), with Docker Compose v2
and a real Docker engine.

Every request goes through the load balancer's published port, on 127.0.0.1 only. The faults are
the real ones: `docker kill` of the replica that serves a stream, `docker compose restart redis`,
`docker compose stop api`. Each test starts from a healthy stack (`ensure_healthy` brings back
what an earlier test stopped), so none depends on the order they run in.

The machinery (daemon, stand-in base images, package mirror) is in tests/docker_support.py and
docs/deployment.md says what it does. Without a Docker engine these tests skip with the reason;
with CHARGEN_REQUIRE_DOCKER=1 (the README's test command) they fail instead.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from tests import docker_support
from tests.docker_support import MB, RUNTIME_IMAGE, STAND_IN_LABEL, STAND_INS, TRAIN_CPU_IMAGE, Stack, report
from tests.service_support import assert_streamed_as_produced, generate, new_session, sse_data

pytestmark = pytest.mark.timeout(1800)  # the first test waits for the images to build


@pytest.fixture
def stack(docker_stack: Stack) -> Iterator[Stack]:
    docker_stack.ensure_healthy()
    yield docker_stack


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as c:
        yield c


def replicas(stack: Stack) -> list[Any]:
    found = stack.compose.containers(stack.client, "api")
    assert [c.name for c in found] == [f"{stack.compose.project}-api-1", f"{stack.compose.project}-api-2"]
    return found


def replica_address(stack: Stack, container: Any) -> str:
    container.reload()
    network = container.attrs["NetworkSettings"]["Networks"][f"{stack.compose.project}_default"]
    return f"{network['IPAddress']}:8000"


def replica_metric(container: Any, name: str) -> float:
    """A metric of one replica, read inside its container (the replicas publish no port)."""
    code = "import urllib.request as u; print(u.urlopen('http://127.0.0.1:8000/metrics', timeout=5).read().decode())"
    result = container.exec_run(["python", "-c", code])
    assert result.exit_code == 0, result.output.decode()
    lines = result.output.decode().splitlines()
    values = [line.rsplit(" ", 1)[1] for line in lines if line.startswith((name + " ", name + "{"))]
    assert values, f"{name} not in the metrics of {container.name}"
    return sum(map(float, values))  # over its labels (the model)


def lb_access_log(stack: Stack) -> str:
    (lb,) = stack.compose.containers(stack.client, "lb")
    return lb.logs(stdout=True, stderr=False).decode()


def upstreams_after(stack: Stack, mark: int, request: str, count: int) -> list[str]:
    """Which replica served each of the `count` `request`s ("POST /v1/generate") that the load
    balancer logged after the first `mark` characters of its access log. Its own health checks are
    in the same log, and a line reaches `docker logs` a moment after its response, so: wait for them."""
    deadline = time.monotonic() + 10
    while True:
        log = lb_access_log(stack)[mark:]
        served = re.findall(rf'"{re.escape(request)} HTTP/1\.1" .* upstream=(\S+)$', log, re.MULTILINE)
        if len(served) >= count or time.monotonic() > deadline:
            return served
        time.sleep(0.1)


# --- the images ---------------------------------------------------------------------------------


def test_images_come_from_the_dockerfile_and_keep_the_mirror_out(stack: Stack) -> None:
    runtime = stack.client.images.get(RUNTIME_IMAGE)
    config = runtime.attrs["Config"]
    assert config["User"] == "10001:10001"
    assert config["Cmd"] == ["chargen", "serve", "--host", "0.0.0.0"]
    assert list(config["ExposedPorts"]) == ["8000/tcp"]
    assert "/healthz" in " ".join(config["Healthcheck"]["Test"])
    # The build read its packages from the loopback mirror through PIP_INDEX_URL and
    # TORCH_CPU_INDEX_URL; that address is in no final image's environment or history.
    for name in (RUNTIME_IMAGE, TRAIN_CPU_IMAGE):
        image = stack.client.images.get(name)
        steps = " ".join(step.get("CreatedBy", "") for step in image.history())
        assert "/simple" not in steps and "INDEX_URL" not in steps, name
        assert not [v for v in image.attrs["Config"]["Env"] if "INDEX_URL" in v], name

    base = stack.client.images.get(docker_support.dockerfile_arg("PYTHON_IMAGE")).attrs["Size"]
    size, trainer = runtime.attrs["Size"], stack.client.images.get(TRAIN_CPU_IMAGE).attrs["Size"]
    report(
        f"{RUNTIME_IMAGE}: {size / MB:.0f} MB, of which {(size - base) / MB:.0f} MB are chargen's layers on the "
        f"{base / MB:.0f} MB base image; {TRAIN_CPU_IMAGE}: {trainer / MB:.0f} MB"
    )


def test_the_api_image_has_the_service_without_the_trainers_packages(stack: Stack) -> None:
    api = replicas(stack)[0]
    probe = "import importlib.util as u; print(*(bool(u.find_spec(m)) for m in ('fastapi', 'matplotlib', 'tqdm')))"
    assert api.exec_run(["python", "-c", probe]).output.decode() == "True False False\n"
    refused = api.exec_run(["chargen", "train", "--corpus", "x.txt"])  # says what is missing, at once
    assert refused.exit_code == 2
    assert refused.output.decode() == (
        "chargen: error: train needs the train extra (matplotlib, tqdm missing): pip install 'chargen[train]'\n"
    )


def test_stand_in_base_images_say_what_they_are(stack: Stack) -> None:
    for stand_in in STAND_INS:
        labels = stack.client.images.get(stand_in.image).labels or {}
        if STAND_IN_LABEL not in labels:
            continue  # the real image, pulled or loaded: nothing to label
        assert labels[STAND_IN_LABEL] == stand_in.recipe
        assert labels["org.opencontainers.image.description"].endswith("not the official image")
        assert labels["org.chargen.stand-in.version"].startswith(f"{stand_in.version_of} ")


# --- the running stack --------------------------------------------------------------------------


def test_every_service_is_healthy_by_its_own_check_and_the_api_is_not_root(stack: Stack, client: httpx.Client) -> None:
    containers = stack.compose.containers(stack.client)
    services = sorted(c.labels["com.docker.compose.service"] for c in containers)
    assert services == ["api", "api", "lb", "redis"]
    for container in containers:
        assert container.attrs["Config"]["Healthcheck"]["Test"][0] in ("CMD", "CMD-SHELL"), container.name
        assert container.attrs["State"]["Health"]["Status"] == "healthy", container.name
    for replica in replicas(stack):
        status = replica.exec_run(["cat", "/proc/1/status"]).output.decode()  # the server process itself
        assert re.search(r"^Uid:\s+10001\s+10001\s+10001\s+10001$", status, re.MULTILINE), status
        assert replica.exec_run(["id", "-un"]).output.decode() == "chargen\n"
    ready = client.get(f"{stack.lb}/readyz")
    assert ready.status_code == 200 and ready.json()["model"] == "shakespeare", ready.text


def test_a_stream_arrives_through_the_load_balancer_as_it_is_generated(stack: Stack) -> None:
    assert_streamed_as_produced(stack.lb, chars=1500)


def test_a_session_continues_across_both_replicas(stack: Stack, client: httpx.Client) -> None:
    n, prompt = 24, "ROMEO:"
    whole = generate(client, stack.lb, prompt=prompt, max_new_chars=6 * n, temperature=0)["text"]
    session = new_session(client, stack.lb)
    mark = len(lb_access_log(stack))
    pieces = [
        generate(client, stack.lb, prompt=prompt if i == 0 else "", max_new_chars=n, temperature=0, session_id=session)[
            "text"
        ]
        for i in range(6)
    ]
    assert "".join(pieces) == whole
    # nginx's own access log: the session's requests were served by both replicas.
    served = upstreams_after(stack, mark, "POST /v1/generate", 6)
    assert len(served) == 6 and set(served) == {replica_address(stack, r) for r in replicas(stack)}, served


def test_a_forked_session_continues_like_its_original(stack: Stack, client: httpx.Client) -> None:
    session = new_session(client, stack.lb, prompt="JULIET:\n")
    generate(client, stack.lb, max_new_chars=30, temperature=0, session_id=session)
    forked = client.post(f"{stack.lb}/v1/sessions/{session}/fork")
    assert forked.status_code == 201, forked.text
    fork = forked.json()["session_id"]
    assert fork != session and forked.json()["forked_from"] == session
    original_next = generate(client, stack.lb, max_new_chars=40, temperature=0, session_id=session)["text"]
    fork_next = generate(client, stack.lb, max_new_chars=40, temperature=0, session_id=fork)["text"]
    assert fork_next == original_next and len(fork_next) == 40
    consumed = [client.get(f"{stack.lb}/v1/sessions/{s}").json()["chars_consumed"] for s in (session, fork)]
    assert consumed == [len("JULIET:\n") + 70] * 2


def test_the_official_openai_client_works_through_the_load_balancer(stack: Stack) -> None:
    from openai import OpenAI

    openai = OpenAI(base_url=f"{stack.lb}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in openai.models.list()] == ["shakespeare"]
    completion = openai.completions.create(model="shakespeare", prompt="ROMEO:\n", max_tokens=50, temperature=0)
    assert len(completion.choices[0].text) == 50
    chunks = openai.completions.create(
        model="shakespeare", prompt="ROMEO:\n", max_tokens=50, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in chunks) == completion.choices[0].text


def test_metrics_answer_through_the_load_balancer(stack: Stack, client: httpx.Client) -> None:
    response = client.get(f"{stack.lb}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    for family in ("chargen_http_requests_total counter", "chargen_time_to_first_char_seconds histogram"):
        assert f"# TYPE {family}\n" in response.text


# --- faults -------------------------------------------------------------------------------------


def wait_for_session(client: httpx.Client, url: str, deadline_s: float, **body: Any) -> tuple[dict[str, Any], float]:
    """Generate on a session whose lease or store is not available yet; the result and the wait."""
    started = time.monotonic()
    while True:
        response = client.post(f"{url}/v1/generate", json=body)
        if response.status_code == 200:
            return response.json(), time.monotonic() - started
        # 409: busy (a dead replica's lease); 503: store down; 502: nginx sent this POST on a pooled
        # keepalive connection to the replica before its restart and, the method not being
        # idempotent, did not pass it on (seen twice in about ten runs; docs/deployment.md)
        assert response.status_code in (409, 502, 503), response.text
        assert time.monotonic() - started < deadline_s, f"still {response.status_code}: {response.text}"
        time.sleep(0.5)


def test_a_replica_killed_mid_stream(stack: Stack, client: httpx.Client) -> None:
    prompt = "KING:\n"
    whole = generate(client, stack.lb, prompt=prompt, max_new_chars=80, temperature=0)["text"]
    session = new_session(client, stack.lb)
    first = generate(client, stack.lb, prompt=prompt, max_new_chars=40, temperature=0, session_id=session)["text"]
    body = {"session_id": session, "max_new_chars": 4096, "temperature": 0, "stream": True}
    events: list[Any] = []
    with client.stream("POST", f"{stack.lb}/v1/generate", json=body) as response:
        assert response.status_code == 200
        data = sse_data(response)
        events.append(next(data))
        (serving,) = [r for r in replicas(stack) if replica_metric(r, "chargen_active_streams") == 1]
        serving.kill()  # SIGKILL, what `docker compose kill` sends (to every replica; this is one)
        killed_at = time.monotonic()
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):  # closed without its end
            events.extend(data)
        ended_after = time.monotonic() - killed_at
    assert "[DONE]" not in events and "text" in events[0]

    # New requests: nginx moves off the dead replica (connect timeout 1 s, then the next replica;
    # marked down after max_fails=3; gone from Docker's DNS at the next re-resolution). Measured
    # (benchmarks/lb_failover.py, stand-in nginx 1.30.6): after 4 of 12 kills one request was not
    # passed on and got 504 after the 1 s; never more than one.
    statuses, slowest = [], 0.0
    for _ in range(20):
        sent = time.monotonic()
        statuses.append(client.post(f"{stack.lb}/v1/generate", json={"prompt": "A", "max_new_chars": 5}).status_code)
        slowest = max(slowest, time.monotonic() - sent)
    failed = [i for i, status in enumerate(statuses) if status != 200]
    assert set(statuses) <= {200, 502, 504} and len(failed) <= 1 and all(i < 6 for i in failed), statuses
    serving.reload()
    assert serving.attrs["State"]["ExitCode"] == 137  # and Docker did not restart it

    # The session is as it was before the killed stream: nothing was saved mid-stream. Its lease,
    # held by the dead replica, expires after CHARGEN_LEASE_MS (30 s); then it continues exactly.
    assert client.get(f"{stack.lb}/v1/sessions/{session}").json()["chars_consumed"] == len(prompt) + 40
    stack.ensure_healthy()  # the killed replica back, while the lease runs out
    rest, waited = wait_for_session(client, stack.lb, 60, max_new_chars=40, temperature=0, session_id=session)
    assert first + rest["text"] == whole
    report(
        f"replica killed mid-stream: stream closed {ended_after:.2f} s after the kill; 20 requests after it: "
        f"{len(failed)} failed ({[statuses[i] for i in failed]}), slowest {slowest:.2f} s; session continued "
        f"{waited:.0f} s after the replica was back (its lease expiring)"
    )


def test_sessions_survive_a_redis_restart(stack: Stack, client: httpx.Client) -> None:
    whole = generate(client, stack.lb, prompt="QUEEN:\n", max_new_chars=60, temperature=0)["text"]
    session = new_session(client, stack.lb)
    first = generate(client, stack.lb, prompt="QUEEN:\n", max_new_chars=30, temperature=0, session_id=session)["text"]
    stack.compose("restart", "redis", timeout=120)  # SIGTERM: Redis writes its AOF, then starts again
    rest, waited = wait_for_session(client, stack.lb, 60, max_new_chars=30, temperature=0, session_id=session)
    assert first + rest["text"] == whole
    assert client.get(f"{stack.lb}/v1/sessions/{session}").json()["chars_consumed"] == len("QUEEN:\n") + 60
    report(f"docker compose restart redis: the session continued {waited:.1f} s after the restart returned")


class Stream(threading.Thread):
    """A streaming request read to its end in a thread: its events, and when text began."""

    def __init__(self, url: str, body: dict[str, Any]) -> None:
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.events: list[Any] = []
        self.started = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with (
                httpx.Client(timeout=60) as client,
                client.stream("POST", f"{self.url}/v1/generate", json=self.body) as r,
            ):
                for event in sse_data(r):
                    self.events.append(event)
                    self.started.set()
        except BaseException as err:  # reported by the test
            self.error = err
            self.started.set()

    @property
    def text(self) -> str:
        return "".join(e.get("text", "") for e in self.events if isinstance(e, dict))


def test_stopping_the_api_drains_running_streams_and_saves_them(stack: Stack, client: httpx.Client) -> None:
    sessions = [new_session(client, stack.lb, prompt="ROMEO:\n") for _ in range(2)]
    streams = [Stream(stack.lb, {"session_id": s, "max_new_chars": 4096, "stream": True}) for s in sessions]
    for stream in streams:
        stream.start()
        assert stream.started.wait(30) and stream.error is None, stream.error
    assert all(stream.events[-1] != "[DONE]" for stream in streams)  # both still running
    since = datetime.now(UTC)
    stopping = time.monotonic()
    stack.compose("stop", "api", timeout=120)  # SIGTERM; SIGKILL after stop_grace_period (30 s)
    stopped_after = time.monotonic() - stopping
    for stream in streams:
        stream.join(60)
        assert stream.error is None and stream.events[-1] == "[DONE]", (stream.error, stream.events[-3:])
        assert len(stream.text) == 4096 and not [e for e in stream.events if isinstance(e, dict) and "error" in e]

    running_at_drain = 0
    for replica in replicas(stack):
        replica.reload()
        assert replica.attrs["State"]["ExitCode"] == 0, replica.name  # exited by itself, not SIGKILLed
        logs = replica.logs(since=since).decode()
        drained = re.search(r"draining: (\d+) generation\(s\) running", logs)
        assert drained and "drained; shutting down" in logs, logs[-2000:]
        running_at_drain += int(drained.group(1))
    assert running_at_drain == 2

    stack.ensure_healthy()
    for session in sessions:  # each saved with every character its stream delivered
        consumed = client.get(f"{stack.lb}/v1/sessions/{session}").json()["chars_consumed"]
        assert consumed == len("ROMEO:\n") + 4096
    report(f"docker compose stop api with 2 streams running: drained, saved and exited 0 in {stopped_after:.1f} s")
