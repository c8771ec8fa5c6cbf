"""Data-parallel training with torchrun: 2 CPU processes on the gloo backend."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import torch

from tests.conftest import make_corpus_text
from training.train import load_checkpoint


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
