"""The wheel as a user installs it: built from the sources, installed (not editable) into a fresh
virtualenv, and `chargen serve` run from another directory serves the bundled model.

The fresh virtualenv borrows this one's third-party packages (torch, FastAPI, ...) through a
.pth line and gets the wheel with --no-deps, so nothing is downloaded and it takes seconds; the
chargen packages it imports are the wheel's own, which the test checks.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import httpx

from tests.service_support import free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["pyproject.toml", "README.md", "chargen", "training", "service"]


def run(*args: str | Path, cwd: Path | None = None) -> str:
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300, cwd=cwd)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_the_installed_wheel_serves_the_bundled_model_from_any_directory(tmp_path: Path) -> None:
    # build from a copy, so that the build's own files (build/, *.egg-info) stay out of the checkout
    source = tmp_path / "source"
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, source / name)
    dist = tmp_path / "dist"
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", dist, source)
    (wheel,) = dist.glob("chargen-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    assert {"chargen/models/shakespeare.pt", "chargen/cli.py", "service/static/index.html"} <= names

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())
    (site / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "--quiet", wheel)
    elsewhere = tmp_path / "elsewhere"  # not the checkout: `python -c` puts the working directory first
    elsewhere.mkdir()
    check = "import chargen.artifact as a, service, training; print(a.BUNDLED_MODEL, service.__file__)"
    where = run(python, "-c", check, cwd=elsewhere)
    bundled, service_file = where.split()
    assert Path(bundled).is_file() and Path(bundled).is_relative_to(venv), where
    assert Path(service_file).is_relative_to(venv), where  # the wheel's service, not the checkout's

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHARGEN_") and k != "PYTHONPATH"}
    serve = [str(venv / "bin" / "chargen"), "serve", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(serve, cwd=elsewhere, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"chargen serve exited: {proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
            return httpx.get(url + "/readyz", timeout=2).status_code == 200

        wait_until(ready, timeout=120, interval=0.2, what="the installed chargen serve")
        models = httpx.get(url + "/v1/models", timeout=10).json()
        assert [m["id"] for m in models["data"]] == ["shakespeare"] and models["data"][0]["vocab_size"] == 65
        body = {"prompt": "ROMEO:\n", "max_new_chars": 40, "temperature": 0.8, "seed": 1}
        answer = httpx.post(url + "/v1/generate", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"] == {"prompt_chars": 7, "completion_chars": 40}
        assert len(answer.json()["text"]) == 40 and answer.json()["model"] == "shakespeare"
    finally:
        proc.terminate()
        proc.wait(30)
    assert list(elsewhere.iterdir()) == []  # it wrote nothing where it ran
