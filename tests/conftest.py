"""Shared fixtures: a small generated corpus and a tiny trained, exported artifact.

Tests never need the real Tiny Shakespeare: they make their own text and train a model of a few
thousand parameters in seconds.
"""

from __future__ import annotations

import os

# Tiny models gain nothing from intra-op threads, and on CI's 2 cores the suite runs several
# processes at once (servers, torchrun ranks): one thread each avoids OpenMP threads spinning at
# barriers for a core another process holds. Set before torch is imported; subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import random
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import configuration as hypothesis_configuration
from hypothesis import settings as hypothesis_settings

from tests import docker_support
from tests.redis_support import LocalCluster
from training.config import TrainConfig
from training.export import export
from training.train import train

ROOT = Path(__file__).resolve().parent.parent

# Hypothesis keeps an example database and a constants cache under ./.hypothesis by default: both
# go to a temporary directory instead (removed at the end), and no example database is kept, so
# no run depends on what an earlier one found.
_HYPOTHESIS_HOME = tempfile.mkdtemp(prefix="chargen-tests-hypothesis-")
hypothesis_configuration.set_hypothesis_home_dir(_HYPOTHESIS_HOME)
hypothesis_settings.register_profile("chargen", database=None)
hypothesis_settings.load_profile("chargen")


def _untracked_paths() -> set[str] | None:
    """Untracked and ignored paths of the checkout (directories collapsed), None outside git."""
    try:
        done = subprocess.run(
            ["git", "status", "--porcelain", "--ignored", "--untracked-files=normal", "-z"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    entries = [e[3:] for e in done.stdout.split("\0") if e.startswith(("??", "!!"))]
    # what running Python and pytest makes by design: bytecode, pytest's own cache
    return {e for e in entries if "__pycache__" not in e and not e.startswith(".pytest_cache")}


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_TREE_BEFORE] = _untracked_paths()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Tests must not leave files in the working tree: the run fails if they did."""
    shutil.rmtree(_HYPOTHESIS_HOME, ignore_errors=True)
    before = session.config.stash.get(_TREE_BEFORE, None)
    after = _untracked_paths()
    if before is None or after is None:
        return
    left = sorted(after - before)
    if left:
        print(f"\ntests left files in the working tree: {', '.join(left)}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


_TREE_BEFORE = pytest.StashKey[set[str] | None]()

WORDS = (
    "ROMEO JULIET KING QUEEN the and of to my lord what is this night thou art thee good sweet "
    "love death fair speak hear come go hath doth shall not now here there"
).split()


def make_corpus_text(chars: int = 20_000, seed: int = 0) -> str:
    """Play-like text: speaker lines in capitals, then short verse lines."""
    rng = random.Random(seed)
    lines: list[str] = []
    while sum(len(line) + 1 for line in lines) < chars:
        lines.append(rng.choice(["ROMEO:", "JULIET:", "KING:", "QUEEN:"]))
        for _ in range(rng.randint(1, 3)):
            lines.append(" ".join(rng.choice(WORDS).lower() for _ in range(rng.randint(3, 8))) + ",")
        lines.append("")
    return "\n".join(lines)[:chars]


def tiny_config(corpus: Path, out: Path, **overrides: object) -> TrainConfig:
    """A model and run small enough to train in a second or two on CI's 2 cores."""
    values: dict[str, object] = dict(
        corpus=str(corpus),
        out=str(out),
        layers=2,
        hidden=32,
        dropout=0.1,
        batch_size=8,
        seq_len=32,
        max_steps=40,
        learning_rate=1e-2,
        min_lr=1e-3,
        warmup_steps=5,
        eval_interval=20,
        log_interval=10,
        seed=1234,
        device="cpu",
    )
    values.update(overrides)
    return TrainConfig(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "plays.txt"
    path.write_text(make_corpus_text(), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_artifact(corpus_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained and exported 2x32 model (the real export path, TorchScript with meta.json)."""
    out = tmp_path_factory.mktemp("tiny-run")
    # named "model", the id the service tests expect (a run is named after its directory otherwise)
    result = train(tiny_config(corpus_file, out, max_steps=60, name="model"), progress_tty=False)
    path = out / "model.pt"
    export(result.checkpoint, path)
    return path


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A Redis Cluster (3 primaries, a replica each) on loopback, shared by the tests that only
    read and write sessions; a test that kills a node starts its own."""
    cluster = LocalCluster(tmp_path_factory.mktemp("redis-cluster"), password=secrets.token_urlsafe(12)).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    """A plain HTTP client for talking to a test server."""
    with httpx.Client(timeout=60) as c:
        yield c


# --- a real Docker engine (tests/test_docker_*.py; the machinery is in tests/docker_support.py) ---


@pytest.fixture(scope="session")
def docker_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[docker_support.DockerEngine]:
    """The Docker daemon, started here if none runs. Without one the Docker tests skip, saying why;
    with CHARGEN_REQUIRE_DOCKER=1 (the README's test command, hence CI) they fail instead."""
    try:
        engine = docker_support.DockerEngine(tmp_path_factory.mktemp("dockerd"))
    except docker_support.DockerUnavailable as err:
        if docker_support.REQUIRE_DOCKER:
            pytest.fail(f"CHARGEN_REQUIRE_DOCKER=1 but {err}")
        pytest.skip(str(err))
    try:
        yield engine
    finally:
        engine.stop()


@pytest.fixture(scope="session")
def docker_images(docker_engine: docker_support.DockerEngine, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Both images built from the repository's Dockerfile, once per run (tests/docker_support.py)."""
    try:
        docker_support.build_images(docker_engine, tmp_path_factory.mktemp("compose-build"))
    except docker_support.DockerUnavailable as err:
        if docker_support.REQUIRE_DOCKER:
            pytest.fail(f"CHARGEN_REQUIRE_DOCKER=1 but {err}")
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def docker_stack(
    docker_engine: docker_support.DockerEngine,
    docker_images: None,
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[docker_support.Stack]:
    """`docker compose up` of the default profile, a project per test module (its own containers,
    network and volumes), removed when the module's tests are done, with a check that nothing is left."""
    name = request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_docker_")
    stack = docker_support.Stack.create(docker_engine, tmp_path_factory.mktemp("compose"), name)
    try:
        stack.up()
        yield stack
    finally:
        stack.remove()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if docker_support.REPORT:
        terminalreporter.section("Docker: images and stack, as measured in this run")
        for line in docker_support.REPORT:
            terminalreporter.write_line(line)
