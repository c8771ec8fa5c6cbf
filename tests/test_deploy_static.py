"""Deployment files checked without a Docker engine: the Dockerfile linted by hadolint, the compose
file validated by docker-compose and by the compose-spec JSON schema, the build context computed
with Docker's own .dockerignore rules, and the invariants docs/deployment.md relies on.

The processes the compose file describes are run for real in tests/test_deploy_topology.py.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from docker.utils.build import PatternMatcher, exclude_paths

from tests import docker_support

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
BIN = Path(sys.executable).parent  # console scripts of the test extras live next to the interpreter


def tool(name: str) -> str:
    """A test-extra executable: from the active environment first, then PATH."""
    found = BIN / name
    if found.exists():
        return str(found)
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; install the test extras: pip install -e '.[test]'")
    return path


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def stage(name: str) -> list[tuple[str, str]]:
    """The instructions of one named build stage."""
    current: str | None = None
    out: list[tuple[str, str]] = []
    for word, rest in dockerfile_instructions():
        if word == "FROM":
            current = rest.split()[-1] if " AS " in rest.upper() else None
        elif current == name:
            out.append((word, rest))
    assert out, f"no stage {name!r} in the Dockerfile"
    return out


def stage_bases() -> dict[str, str]:
    """Each named stage and the image or stage it starts FROM."""
    froms = [rest.split() for word, rest in dockerfile_instructions() if word == "FROM"]
    return {f[-1]: f[0] for f in froms if len(f) == 3 and f[1].upper() == "AS"}


# --- Dockerfile ---------------------------------------------------------------------------------


def test_hadolint_reports_nothing() -> None:
    # Every level, info and style included: a finding is fixed, or ignored inline with a reason.
    result = subprocess.run(
        [tool("hadolint"), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_every_hadolint_ignore_is_explained() -> None:
    lines = DOCKERFILE.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            reason = lines[i - 1].strip() if i else ""
            assert reason.startswith("#") and "hadolint" not in reason, f"line {i + 1}: ignore without a reason"


def test_runtime_image_is_the_default_target_and_serves_as_non_root() -> None:
    froms = [rest for word, rest in dockerfile_instructions() if word == "FROM"]
    assert froms[-1].split()[-1] == "runtime", "`docker build .` must give the service image"
    # Base images are pinned (a full version, not `latest` or a bare major).
    base = next(rest for word, rest in dockerfile_instructions() if word == "ARG" and rest.startswith("PYTHON_IMAGE="))
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.11\.\d+-slim-\w+", base), base

    runtime = stage("runtime")
    users = [rest for word, rest in runtime if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), users
    assert ("EXPOSE", "8000") in runtime
    assert any(word == "COPY" and "chargen/models/shakespeare.pt" in rest for word, rest in runtime)
    health = next(rest for word, rest in runtime if word == "HEALTHCHECK")
    assert "/healthz" in health and "urllib" in health  # slim has no curl
    assert ("CMD", '["chargen", "serve", "--host", "0.0.0.0"]') in runtime


def test_service_gets_cpu_torch_and_training_gets_the_cuda_build() -> None:
    runtime_venv = " ".join(rest for _, rest in stage("runtime-venv"))
    assert "TORCH_CPU_INDEX_URL=https://download.pytorch.org/whl/cpu" in runtime_venv
    assert '--index-url "${TORCH_CPU_INDEX_URL}"' in runtime_venv
    train_venv = " ".join(rest for _, rest in stage("train-venv"))
    assert "TORCH_CUDA_INDEX_URL=https://pypi.org/simple" in train_venv  # PyPI's linux wheel is CUDA
    # Both images install the built wheel (non-editable), never the source tree with -e.
    for name in ("runtime-venv", "train-venv"):
        runs = [rest for word, rest in stage(name) if word == "RUN"]
        assert any("pip install" in r and "/wheels/chargen-" in r for r in runs), name
        assert not any(" -e " in r or "--editable" in r for r in runs), name
    # Both training images (GPU and CPU torch) are the same job on a different virtualenv.
    assert any(word == "ENTRYPOINT" and "train-job" in rest for word, rest in stage("job"))
    bases = stage_bases()
    assert bases["train"] == bases["train-cpu"] == "job"
    assert ("COPY", "--from=train-venv /opt/venv /opt/venv") in stage("train")


# --- .dockerignore ------------------------------------------------------------------------------


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def test_dockerignore_keeps_every_copied_path() -> None:
    # Checked by pattern, not on disk: chargen/models/shakespeare.pt may not be trained yet in a checkout.
    matcher = PatternMatcher(dockerignore_patterns())
    sources: list[str] = []
    for word, rest in dockerfile_instructions():
        if word == "COPY" and "--from=" not in rest:
            args = [a for a in shlex.split(rest) if not a.startswith("--")]
            sources += args[:-1]
    assert "chargen/models/shakespeare.pt" in sources and "pyproject.toml" in sources
    for source in sources:
        probe = source if "." in Path(source).name else f"{source}/__init__.py"  # a dir: a file in it
        assert not matcher.matches(probe), f"COPY {source} but .dockerignore excludes it"


def test_build_context_leaves_out_data_runs_venv_and_caches() -> None:
    context = set(exclude_paths(str(ROOT), dockerignore_patterns(), "Dockerfile"))
    junk = re.compile(
        r"(^|/)(\.git|\.venv|runs|data|out|\.pytest_cache|__pycache__|\.hypothesis|tests|benchmarks)(/|$)"
        r"|\.(pyc|ckpt)$|(^|/)(last|best)\.pt$"
    )
    leaked = sorted(p for p in context if junk.search(p))
    assert not leaked, f"in the build context: {leaked[:10]}"
    artifacts = sorted(p for p in context if p.endswith(".pt"))
    assert artifacts in ([], ["chargen/models/shakespeare.pt"]), artifacts


# --- docker-compose.yml -------------------------------------------------------------------------


def compose_v2(tmp_path: Path) -> docker_support.Compose:
    """The compose v2 binary on the repository's files; `config` needs no Docker engine."""
    try:
        binary = docker_support.compose_binary()
    except docker_support.DockerUnavailable as err:
        pytest.fail(str(err))
    empty_env = tmp_path / "empty.env"
    empty_env.write_text("")
    return docker_support.Compose(binary, "chargen-config", empty_env, {})


def test_compose_config_is_valid_for_docker_compose_v2(tmp_path: Path) -> None:
    compose_v2_ = compose_v2(tmp_path)
    # The trainer too (GPU and CPU), not just the default services.
    for extra, train_cpu in (([], False), (["--profile", "train"], False), (["--profile", "train"], True)):
        result = compose_v2_(*extra, "config", "--quiet", train_cpu=train_cpu, check=False)
        assert result.returncode == 0, result.stderr


def compose_config(compose: docker_support.Compose, train_cpu: bool = False, **env: str) -> dict[str, Any]:
    args = ["--profile", "train", "config", "--format", "json"]
    return json.loads(compose(*args, train_cpu=train_cpu, **env).stdout)


def test_builds_take_a_mirror_from_the_environment_and_nothing_else(tmp_path: Path) -> None:
    compose = compose_v2(tmp_path)
    for name in ("api", "trainer"):  # unset: no build argument, so the Dockerfile's defaults apply
        build = compose_config(compose)["services"][name]["build"]
        assert "args" not in build and build["network"] == "default", build
    mirror = {
        "PYTHON_IMAGE": "mirror.example/python:3.11.13-slim-bookworm",
        "PIP_INDEX_URL": "https://mirror.example/pypi/simple",
        "TORCH_CPU_INDEX_URL": "https://mirror.example/torch-cpu/simple",
        "TORCH_CUDA_INDEX_URL": "https://mirror.example/torch-cu128/simple",
    }
    config = compose_config(compose, **mirror, CHARGEN_BUILD_NETWORK="host")
    for name in ("api", "trainer"):
        assert config["services"][name]["build"]["args"] == mirror
        assert config["services"][name]["build"]["network"] == "host"
    # Each argument is one the Dockerfile declares, with the default a user gets without a mirror.
    for arg in mirror:
        assert docker_support.dockerfile_arg(arg).startswith(
            ("python:", "https://pypi.org/", "https://download.pytorch.org/")
        )


def test_the_cpu_trainer_override_keeps_the_job_and_drops_only_the_gpu(tmp_path: Path) -> None:
    compose = compose_v2(tmp_path)
    gpu = compose_config(compose)["services"]["trainer"]
    cpu = compose_config(compose, train_cpu=True)["services"]["trainer"]
    assert gpu["build"]["target"] == "train" and cpu["build"]["target"] == "train-cpu"
    assert "deploy" in gpu and "deploy" not in cpu  # no GPU reservation: runs on any host
    assert cpu["command"][cpu["command"].index("--config") + 1] == "configs/tinyshakespeare-cpu.toml"
    same = ("volumes", "environment", "stop_grace_period", "profiles", "restart")
    assert {k: cpu[k] for k in same} == {k: gpu[k] for k in same}
    # The override runs what the train-cpu image runs by itself.
    (image_cmd,) = [json.loads(rest) for word, rest in stage("train-cpu") if word == "CMD"]
    assert image_cmd == cpu["command"]


def test_compose_file_matches_the_compose_spec_schema() -> None:
    result = subprocess.run(
        [tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_topology_is_what_the_docs_describe() -> None:
    services = compose()["services"]
    assert set(services) == {"redis", "api", "lb", "trainer"}

    redis = services["redis"]
    assert redis["image"].startswith("redis:7")
    args = redis["command"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--maxmemory-policy") + 1].startswith("volatile-")
    assert "--maxmemory" in args
    assert any(v.split(":")[1] == "/data" for v in redis["volumes"])  # the AOF lives on a volume

    api = services["api"]
    assert api["deploy"]["replicas"] == 2
    assert api["environment"]["CHARGEN_STATE_URL"] == "redis://redis:6379/0"
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "healthcheck" in api and "ports" not in api  # reached only through the lb

    lb = services["lb"]
    assert lb["image"].startswith("nginx:")
    assert "./deploy/nginx.conf:/etc/nginx/nginx.conf:ro" in lb["volumes"]
    assert lb["ports"] == ["${CHARGEN_LB_PUBLISH:-8000}:8000"]  # host port 8000 unless told otherwise

    trainer = services["trainer"]
    assert trainer["profiles"] == ["train"]
    command = trainer["command"]
    assert command[:2] == ["chargen", "train"] and "--resume" in command
    out = command[command.index("--out") + 1]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in trainer["volumes"]}
    assert out.startswith("/runs/") and "/runs" in mounts and "/data" in mounts and "/models" in mounts
    assert trainer["environment"]["CHARGEN_MODELS_DIR"] == "/models"
    assert trainer["environment"]["CHARGEN_CACHE"] == "/data"
    (device,) = trainer["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    # The api reads (only) the same models volume the trainer publishes into, and watches it.
    assert f"{mounts['/models']}:/models:ro" in api["volumes"]
    # the bundled model's directory in the image, then the volume; the image's CHARGEN_MODEL cleared
    assert (
        api["environment"]["CHARGEN_MODELS_DIR"] == "/app/models:/models" and api["environment"]["CHARGEN_MODEL"] == ""
    )
    # Named volumes, so data, checkpoints and models outlive containers.
    assert {mounts["/data"], mounts["/runs"], mounts["/models"]} <= set(compose()["volumes"])
