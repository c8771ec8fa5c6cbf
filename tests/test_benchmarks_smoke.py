"""The serving benchmark and the locust load test run end to end at a tiny scale (no timing checks).

They are scripts people run by hand; these tests only keep them from rotting.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.service_support import ServerThread

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "ROMEO:\nthe night "  # characters the tiny artifact knows


def run_benchmark(script: str, args: list[str]) -> str:
    """Run benchmarks/SCRIPT to the end; its stdout (the test fails with its output if it fails)."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server on PATH")
def test_serve_throughput_runs_end_to_end(tiny_artifact: Path, tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    args = ["--model", str(tiny_artifact), "--levels", "1,2", "--chars", "20", "--prompt", PROMPT]
    args += ["--ceiling-seconds", "0.1", "--min-seconds", "0", "--also-seeded-single", "--json", str(out)]
    stdout = run_benchmark("serve_throughput.py", args)
    assert "batching off" in stdout and "targets:" in stdout
    figures = json.loads(out.read_text())
    assert [lv["streams"] for lv in figures["batched"]] == [1, 2]
    for lv in figures["batched"]:  # one burst per level: its characters over its duration
        readings = lv["extra"]["ceiling_readings"]
        assert lv["chars"] == lv["streams"] * 20
        assert lv["chars_per_s"] == lv["chars"] / lv["seconds"]
        assert lv["extra"]["ratio"] == lv["chars_per_s"] / ((readings[0] + readings[1]) / 2)
    assert figures["baseline"][0]["streams"] == 2 and figures["seeded_single"]["chars"] == 20
    assert set(figures["ceiling"]) == {"1", "2"}
    assert all(lv["extra"]["bursts"] == 1 and lv["extra"]["ceiling"] > 0 for lv in figures["batched"])
    assert set(figures["ceiling_readings"]) == {"1", "2", "1 seeded"}


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server on PATH")
def test_serve_ab_runs_two_services_side_by_side(tiny_artifact: Path) -> None:
    args = ["--model", str(tiny_artifact), "--streams", "2", "--chars", "20", "--prompt", PROMPT, "--pairs", "2"]
    args += ["--ceiling-seconds", "0.1", "--a-src", str(ROOT), "--b-env", "CHARGEN_MAX_BATCH=1"]
    stdout = run_benchmark("serve_ab.py", args)
    assert "2 streams, 20 characters each, 2 pairs" in stdout and "CHARGEN_MAX_BATCH=1" in stdout
    lines = {line.split(":")[0].strip(): line for line in stdout.splitlines() if ":" in line}
    assert "x ceiling" in lines["A"] and "x ceiling" in lines["B"] and "B/A, median of the pairs" in lines


@pytest.mark.skipif(shutil.which("locust", path=str(Path(sys.executable).parent)) is None, reason="needs locust")
def test_locustfile_runs_headless_without_failures(tiny_artifact: Path, tmp_path: Path) -> None:
    locust = shutil.which("locust", path=str(Path(sys.executable).parent))
    prefix = str(tmp_path / "run")
    env = {**os.environ, "CHARGEN_LOCUST_CHARS": "20", "CHARGEN_LOCUST_PROMPT": PROMPT}
    with ServerThread(model=str(tiny_artifact)) as server:
        options = ["--headless", "-u", "4", "-r", "4", "-t", "4s", "--stop-timeout", "10", "--only-summary"]
        done = subprocess.run(
            [locust, "-f", str(ROOT / "locustfile.py"), *options, "--host", server.url, "--csv", prefix],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            cwd=tmp_path,
        )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "locust_summary.py"), prefix],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert summary.returncode == 0, summary.stdout + summary.stderr  # requests were made, none failed
    for name in ("POST /v1/sessions", "stream: session continue", "stream: stateless", "DELETE /v1/sessions"):
        assert name in summary.stdout


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server on PATH")
def test_store_capacity_benchmark_runs_end_to_end() -> None:
    stdout = run_benchmark("store_capacity.py", ["--rounds", "1", "--seconds", "0.5", "--concurrency", "4"])
    lines = stdout.splitlines()
    assert lines[0] == "state 16,860 bytes, 4 client tasks, 1 rounds of 0.5 s"
    assert lines[1].startswith("memory per session: ")
    assert lines[2].split() == ["store", "ops/s", "Redis", "CPU", "CPU", "us/op", "ops/s", "per", "Redis", "core"]
    assert [line[:20].strip() for line in lines[3:5]] == ["one redis-server", "3-primary cluster"]
    assert lines[5].startswith("cluster / single, ops/s, median of rounds side by side: ")
    assert lines[6] == "each operation: 3 round trips (create; continue = acquire + save-and-release)"


def test_precision_quality_compares_fp32_and_bf16(tiny_artifact: Path, corpus_file: Path) -> None:
    args = ["--model", str(tiny_artifact), "--corpus", str(corpus_file), "--sizes", "1,4", "--rounds", "1"]
    stdout = run_benchmark("precision_quality.py", args)
    assert "nats/char: fp32 " in stdout and "bf16 - fp32 " in stdout
    assert [line.split()[0] for line in stdout.splitlines()[-2:]] == ["1", "4"]


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server on PATH")
def test_serve_workers_runs_one_worker_against_two(tiny_artifact: Path, tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    args = ["--model", str(tiny_artifact), "--workers", "2", "--clients", "1,2", "--stream-levels", "2"]
    args += ["--chars", "20", "--seconds", "0.3", "--bursts", "1", "--rounds", "1", "--json", str(out)]
    stdout = run_benchmark("serve_workers.py", args)
    assert "1 worker chars/s" in stdout and "workers 2 chars/s" in stdout
    summary = json.loads(out.read_text())["summary"]
    assert set(summary["chars_per_s"]) == {"1", "2"} and set(summary["ttfc_ms"]) == {"2"}


def test_the_torchserve_handler_answers_a_batch_with_each_requests_characters(tiny_artifact: Path) -> None:
    """benchmarks/torchserve/handler.py, called as TorchServe calls it (no TorchServe needed)."""
    sys.path.insert(0, str(ROOT / "benchmarks" / "torchserve"))
    try:
        import handler  # type: ignore[import-not-found]
    finally:
        sys.path.pop(0)

    context = SimpleNamespace(
        system_properties={"model_dir": str(tiny_artifact.parent)},
        manifest={"model": {"serializedFile": tiny_artifact.name}},
    )
    handler._generator = None
    assert handler.handle(None, context) is None  # start-up: loads the model
    bodies = [
        {"body": json.dumps({"prompt": PROMPT, "max_new_chars": 7, "temperature": 1.0}).encode()},
        {"body": {"prompt": "the", "max_new_chars": 3, "temperature": 0.5}},  # TorchServe's decoded JSON
    ]
    texts = [reply["text"] for reply in handler.handle(bodies, context)]
    vocab = set(handler._generator.vocab)
    assert [len(text) for text in texts] == [7, 3] and set("".join(texts)) <= vocab
