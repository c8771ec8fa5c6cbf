"""Data-parallel training with torchrun: 2 CPU processes on the gloo backend."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch

from tests.conftest import make_corpus_text
from training.config import ConfigError
from training.distributed import Dist
from training.train import load_checkpoint, pick_device, weights_fingerprint

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_train_one_model(tmp_path: Path) -> None:
    corpus = tmp_path / "plays.txt"
    corpus.write_text(make_corpus_text(12_000))
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
        "--master-port", str(free_port()), "-m", "training.cli", "train", "--corpus", str(corpus), "--out", str(out),
        "--layers", "2", "--hidden", "16", "--batch-size", "4", "--seq-len", "16", "--max-steps", "20",
        "--eval-interval", "10", "--log-interval", "5", "--warmup-steps", "2", "--device", "cpu",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("x 2 processes") == 1  # rank 0 alone logs
    assert "exported" in result.stderr
    assert (out / "model.pt").exists()

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [(r["kind"], r["step"]) for r in rows]
    assert len(steps) == len(set(steps))  # one writer: no record twice
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [10, 20]

    checkpoint = load_checkpoint(out / "last.pt")
    assert checkpoint["world"] == 2
    assert checkpoint["h"].shape == (2, 8, 16)  # both ranks' 4 streams, gathered
    assert checkpoint["rng"]["cpu"].shape[0] == 2
    assert not torch.equal(checkpoint["h"][:, :4], checkpoint["h"][:, 4:])  # each rank its own streams
    # Each rank's own weights, hashed on that rank when the checkpoint was taken: identical, and
    # the weights the checkpoint holds.
    assert checkpoint["rank_fingerprints"] == [weights_fingerprint(checkpoint["model"])] * 2


def test_under_torchrun_each_process_takes_the_gpu_of_its_local_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    ranks = [Dist(rank=r, world=2, local_rank=r) for r in (0, 1)]
    for name in ("cuda", "auto"):
        assert [pick_device(name, d) for d in ranks] == [torch.device("cuda", 0), torch.device("cuda", 1)]
    for d in ranks:  # cuda:1 on every rank would put both on one GPU while NCCL uses local_rank
        with pytest.raises(ConfigError, match="LOCAL_RANK"):
            pick_device("cuda:1", d)
    with pytest.raises(ConfigError, match="2 GPUs"):
        pick_device("cuda", Dist(rank=2, world=3, local_rank=2))


@pytest.fixture
def corpus_server(tmp_path: Path) -> Iterator[tuple[str, str, list[str]]]:
    """A local HTTP server for the "tinyshakespeare" download: (url, sha256, requests seen)."""
    payload = make_corpus_text(12_000).encode()
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/input.txt", hashlib.sha256(payload).hexdigest(), seen
    server.shutdown()


def test_one_layer_two_ranks_one_download_and_a_sigterm_to_one_rank(
    corpus_server: tuple[str, str, list[str]], tmp_path: Path
) -> None:
    """One layer (no W_below in use) under DDP; the corpus fetched by one process per node while
    the other waits; SIGTERM to rank 1 alone stops both ranks at the same step."""
    url, sha256, seen = corpus_server
    out = tmp_path / "run"
    env = {**os.environ, "CHARGEN_CACHE": str(tmp_path / "cache"), "CHARGEN_TEST_CORPUS_URL": url}
    env["CHARGEN_TEST_CORPUS_SHA256"] = sha256
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
        "--master-port", str(free_port()), str(ROOT / "tests" / "torchrun_local_corpus.py"), "train",
        "--corpus", "tinyshakespeare", "--out", str(out), "--layers", "1", "--hidden", "16", "--batch-size", "4",
        "--seq-len", "16", "--max-steps", "100000", "--eval-interval", "50000", "--log-interval", "5",
        "--warmup-steps", "2", "--device", "cpu",
    ]  # fmt: skip
    launcher = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").exists():  # rank 0 has logged: both ranks are training
            if launcher.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"training did not start: {launcher.communicate(timeout=60)[1][-3000:]}")
            time.sleep(0.1)
        workers = psutil.Process(launcher.pid).children(recursive=True)
        rank1 = [p for p in workers if p.environ().get("RANK") == "1"]
        assert len(rank1) == 1
        rank1[0].send_signal(signal.SIGTERM)
        _, stderr = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert seen == ["/input.txt"]  # one download, not one per rank
    checkpoint = load_checkpoint(out / "last.pt")
    assert f"stopped at step {checkpoint['step']}" in stderr
    assert checkpoint["world"] == 2 and checkpoint["model_config"]["layers"] == 1
    assert checkpoint["rank_fingerprints"] == [weights_fingerprint(checkpoint["model"])] * 2
