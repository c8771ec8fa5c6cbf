"""The documentation as a newcomer uses it: its Python examples run as written against a real
`chargen serve`, and its settings tables name the settings service/settings.py really has."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from chargen.artifact import BUNDLED_MODEL
from service.settings import Settings
from tests.service_support import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
SERVICE_DOC = (ROOT / "docs" / "service.md").read_text()


def python_example(markdown: str, needle: str) -> str:
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", markdown, re.S) if needle in b]
    return block


def run_example(code: str, url: str) -> str:
    """The example as a user's script, pointed at the test server instead of localhost:8000."""
    done = subprocess.run(
        [sys.executable, "-c", code.replace("http://localhost:8000", url)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def bundled_server() -> ServerProcess:
    with ServerProcess(BUNDLED_MODEL) as server:  # the model the README's quick start serves
        yield server


def test_the_readme_says_how_to_install_the_openai_client() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert [d for d in extras["openai"] if d.startswith("openai")] == ["openai>=1.40,<3"]
    assert "`.venv/bin/pip install -e '.[openai]'`" in README


def test_the_readme_openai_example_runs_as_written(bundled_server: ServerProcess) -> None:
    code = python_example(README, "from openai import OpenAI")
    assert 'model="shakespeare"' in code and "max_tokens=300" in code
    assert len(run_example(code, bundled_server.url)) == 300  # one character per token, streamed


def test_the_service_doc_openai_example_runs_as_written(bundled_server: ServerProcess) -> None:
    code = python_example(SERVICE_DOC, "from openai import OpenAI")
    assert 'extra_body={"session_id": session_id}' in code
    # a completion of 200 characters and a line break, then two of 100 continuing one session
    assert len(run_example(code, bundled_server.url)) == 200 + 1 + 100 + 100


def test_the_readme_artifact_example_runs_as_written() -> None:
    code = python_example(README, "torch.jit.load")
    done = subprocess.run(
        [sys.executable, "-c", code + "\nprint(meta['format'], len(meta['vocab']), type(model).__name__)"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,  # the README's commands run from the repository root
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "chargen-lstm/1 65 RecursiveScriptModule\n"


def table_settings(markdown: str, heading: str) -> list[str]:
    """The CHARGEN_* names in the first column of the table under a heading."""
    section = markdown[markdown.index(heading) :]
    table = section[: section.index("\n\n", section.lower().index("| variable"))]
    rows = re.findall(r"^\| (`CHARGEN_.*?) \|", table, re.M)
    return [name.lower() for row in rows for name in re.findall(r"`CHARGEN_(\w+)`", row)]


def test_docs_service_md_lists_every_setting_once() -> None:
    listed = table_settings(SERVICE_DOC, "## Settings")
    assert sorted(listed) == sorted(Settings.model_fields)


def test_the_readme_settings_table_names_real_settings_and_the_model_id() -> None:
    listed = table_settings(README, "Settings come from the environment")
    assert set(listed) <= set(Settings.model_fields), set(listed) - set(Settings.model_fields)
    assert {"model", "model_id", "state_url", "host", "port"} <= set(listed)
    assert len(listed) == len(set(listed))
