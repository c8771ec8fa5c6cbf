"""tcmalloc for the processes that run the model (service/allocator.py): preloaded into `chargen
serve` (which starts itself again on it, same pid) and into each worker; the system's malloc on
request; a clear error where tcmalloc is asked for and missing. Real processes, real library
(the README's test command installs libtcmalloc-minimal4)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from service import allocator
from service.main import run
from tests.service_support import ServerProcess


def runs_on_tcmalloc(pid: int) -> bool:
    return allocator.LIBRARY_NAME in Path(f"/proc/{pid}/maps").read_text()


@pytest.fixture(scope="module")
def library() -> str:
    found = allocator.tcmalloc_library()
    if found is None:
        pytest.fail("no libtcmalloc_minimal: apt-get install libtcmalloc-minimal4 (the README's test command does)")
    return found


def test_auto_and_tcmalloc_preload_the_library_once_and_system_preloads_nothing(library: str) -> None:
    env = allocator.preloading("auto", {"LD_PRELOAD": "libother.so", "PATH": "/bin"})
    assert env == {"LD_PRELOAD": f"{library} libother.so", "PATH": "/bin", allocator.PRELOADED: "1"}
    assert allocator.preloading("tcmalloc", {}) == {"LD_PRELOAD": library, allocator.PRELOADED: "1"}
    assert allocator.preloading("auto", env) is None  # already there
    assert allocator.preloading("system", {}) is None


def test_without_the_library_auto_falls_back_and_tcmalloc_is_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(allocator, "tcmalloc_library", lambda: None)
    assert allocator.preloading("auto", {}) is None
    monkeypatch.setenv("CHARGEN_ALLOCATOR", "tcmalloc")
    monkeypatch.setenv("CHARGEN_MODEL", "/nonexistent.pt")  # past the check, run() would stop here, not serve
    assert run() == 2  # before anything is loaded or started
    assert capsys.readouterr().err == (
        "chargen: error: CHARGEN_ALLOCATOR=tcmalloc, but the dynamic linker finds no libtcmalloc_minimal "
        "(Debian/Ubuntu: apt-get install libtcmalloc-minimal4)\n"
    )


@pytest.mark.parametrize(("choice", "expected"), [("auto", True), ("system", False)])
def test_chargen_serve_runs_on_the_allocator_chosen(
    library: str, tiny_artifact: Path, choice: str, expected: bool
) -> None:
    with ServerProcess(tiny_artifact, allocator=choice) as server:
        assert server.proc is not None
        assert runs_on_tcmalloc(server.proc.pid) is expected  # the same pid: it started itself again in place
        reply = httpx.post(f"{server.url}/v1/generate", json={"prompt": "KING", "max_new_chars": 20}, timeout=60)
        assert reply.status_code == 200 and len(reply.json()["text"]) == 20
