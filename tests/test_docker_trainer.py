"""The batch training job in its container, as a user runs it:

    docker compose -f docker-compose.yml -f deploy/train-cpu.yml --profile train run --rm trainer ...

with a tiny CPU config (the CPU target of the same job: the CUDA image is 5.4 GB and needs a GPU).
It trains as the non-root user, checkpoints into the `runs` volume, is stopped with SIGTERM
(`docker stop`, what a preempting scheduler sends), resumes from its checkpoint when the same
command runs again, finishes, and publishes its model into the `models` volume. Both api replicas,
watching that volume, then serve it without a restart, while a session made before carries on.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import make_corpus_text
from tests.docker_support import Stack, report
from tests.service_support import generate, new_session

pytestmark = pytest.mark.timeout(1800)  # the first Docker test waits for the images to build

MAX_STEPS = 600
TRAIN = [
    "chargen", "train", "--corpus", "/corpus/plays.txt", "--out", "/runs/tiny", "--resume",
    "--layers", "2", "--hidden", "32", "--batch-size", "8", "--seq-len", "32", "--dropout", "0.0",
    "--max-steps", str(MAX_STEPS), "--eval-interval", "100", "--log-interval", "10", "--device", "cpu",
]  # fmt: skip


@pytest.fixture
def stack(docker_stack: Stack) -> Iterator[Stack]:
    docker_stack.ensure_healthy()  # on the bundled model, whatever an earlier test switched to
    yield docker_stack


def run_trainer(stack: Stack, corpus: Path, name: str, *command: str) -> subprocess.Popen[str]:
    """`docker compose --profile train run --rm trainer COMMAND` with the corpus mounted read-only.

    One torch thread, as every process of the test suite has (tests/conftest.py): with two on CI's
    two busy cores, this tiny model trained at a tenth of the speed (measured: 260 s instead of 22 s).
    """
    return stack.compose.popen(
        "--profile", "train", "run", "--rm", "--no-TTY", "--name", name, "--env", "OMP_NUM_THREADS=1",
        "--volume", f"{corpus}:/corpus:ro", "trainer", *command,
        train_cpu=True,
    )  # fmt: skip


def read_until(job: subprocess.Popen[str], pattern: str, timeout: float = 300) -> list[str]:
    """The job's output lines up to the first that matches."""
    assert job.stdout is not None
    lines, deadline = [], time.monotonic() + timeout
    for line in job.stdout:
        lines.append(line.rstrip("\n"))
        if re.search(pattern, line):
            return lines
        assert time.monotonic() < deadline, f"no {pattern!r} after {timeout} s:\n" + "\n".join(lines[-20:])
    raise AssertionError(f"the job ended before {pattern!r}:\n" + "\n".join(lines[-30:]))


def test_the_training_job_checkpoints_resumes_publishes_and_the_api_serves_its_model(
    stack: Stack, tmp_path: Path
) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    corpus.chmod(0o755)  # readable by the job's uid 10001
    text = make_corpus_text(20_000, seed=3)
    (corpus / "plays.txt").write_text(text, encoding="utf-8")
    (corpus / "plays.txt").chmod(0o644)
    name = f"{stack.compose.project}-train"
    with httpx.Client(timeout=30) as client:  # a session on the bundled model, before the publish
        session = new_session(client, stack.lb, "ROMEO:")

    # 1. Train until the first evaluation has written its checkpoints, then SIGTERM.
    started = time.monotonic()
    job = run_trainer(stack, corpus, name, *TRAIN)
    first_lines = read_until(job, r"^step 100: val ")
    stack.client.containers.get(name).stop(timeout=120)  # SIGTERM; SIGKILL only after 120 s
    rest, _ = job.communicate(timeout=180)
    first_run = first_lines + rest.splitlines()
    assert job.returncode == 143, "\n".join(first_run[-20:])  # checkpointed, "rerun to resume"
    stopped = [re.match(r"stopped at step (\d+); checkpoint /runs/tiny/last.pt", line) for line in first_run]
    (stopped_at,) = [int(m.group(1)) for m in stopped if m]
    assert 100 <= stopped_at < MAX_STEPS  # at or after the evaluation that printed the line
    assert "train-job: command exited with status 143; nothing published" in first_run

    # 2. The same command again: it resumes from that step, finishes, publishes /models/tiny.pt.
    job = run_trainer(stack, corpus, name, *TRAIN)
    output, _ = job.communicate(timeout=600)
    assert job.returncode == 0, output[-3000:]
    assert f"from step {stopped_at} to {MAX_STEPS}" in output
    assert "train-job: published /models/tiny.pt; replicas watching /models serve it without a restart" in output
    trained_in = time.monotonic() - started

    # Everything the job wrote belongs to its non-root user; the model's card says what it is.
    written = [f"/runs/tiny/{f}" for f in ("last.pt", "best.pt", "loss.png", "model.pt")] + ["/models/tiny.pt"]
    script = (
        f"import json, os, zipfile; print(os.getuid(), *(os.stat(p).st_uid for p in {written!r}));"
        "import importlib.util as u; print(*(u.find_spec(m) is not None for m in ('matplotlib', 'tqdm')));"
        "z = zipfile.ZipFile('/models/tiny.pt');"
        "print(json.dumps(json.loads(z.read(next(n for n in z.namelist() if n.endswith('extra/meta.json'))))))"
    )
    job = run_trainer(stack, corpus, name, "python", "-c", script)
    output, _ = job.communicate(timeout=120)
    assert job.returncode == 0, output
    uids, train_extra, meta_json = output.strip().splitlines()[-3:]
    assert uids.split() == ["10001"] * 6
    assert train_extra == "True True"  # the image the job runs in has the train extra
    meta = json.loads(meta_json)
    assert meta["train_steps"] == MAX_STEPS and meta["vocab"] == sorted(set(text))

    # 3. Served by both replicas without a restart (they watch the volume); the bundled model's
    # session made before the publish carries on.
    with httpx.Client(timeout=30) as client:
        for container in stack.compose.containers(stack.client, "api"):
            wait_for_model(container, "tiny", meta["fingerprint"])
        listed = {m["id"]: m for m in client.get(f"{stack.lb}/v1/models").json()["data"]}
        assert (listed["tiny"]["fingerprint"], listed["tiny"]["train_steps"]) == (meta["fingerprint"], MAX_STEPS)
        generated = generate(
            client, stack.lb, model="tiny", prompt="ROMEO:", max_new_chars=200, temperature=0.8, seed=1
        )
        assert generated["model"] == "tiny"
        assert len(generated["text"]) == 200 and set(generated["text"]) <= set(text)
        for _ in range(4):  # through the lb: both replicas, round robin
            continued = generate(client, stack.lb, session_id=session, max_new_chars=20)
            assert continued["model"] == "shakespeare"
    report(
        f"training job (CPU, {MAX_STEPS} steps of a 2x32 model): trained, SIGTERM at step {stopped_at}, resumed "
        f"and published in {trained_in:.0f} s; served by both replicas without a restart"
    )


def wait_for_model(container: Any, model_id: str, fingerprint: str, timeout: float = 60) -> None:
    """Until one replica lists the model ready, asked inside its container (replicas publish no port)."""
    code = (
        "import json, urllib.request as u;"
        "rows = json.load(u.urlopen('http://127.0.0.1:8000/v1/models', timeout=5))['data'];"
        f"print(any(r['id'] == {model_id!r} and r['status'] == 'ready' and r['fingerprint'] == {fingerprint!r}"
        " for r in rows))"
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = container.exec_run(["python", "-c", code])
        if result.exit_code == 0 and result.output.decode().strip() == "True":
            return
        time.sleep(0.5)
    raise AssertionError(f"{container.name} did not serve {model_id} within {timeout} s")
