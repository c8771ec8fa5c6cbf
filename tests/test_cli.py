"""The `chargen` command as a user runs it: real subprocesses, exit codes, stderr."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import make_corpus_text

TINY = [
    "--layers",
    "2",
    "--hidden",
    "16",
    "--batch-size",
    "4",
    "--seq-len",
    "16",
    "--warmup-steps",
    "2",
    "--log-interval",
    "5",
    "--device",
    "cpu",
]


def chargen(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chargen", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "default"},
    )


def assert_usage_error(result: subprocess.CompletedProcess[str], needle: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # one clear line, no traceback
    assert lines[0].startswith("chargen: error:") and needle in lines[0], lines[0]


def test_sample_streams_and_is_reproducible(tiny_artifact: Path) -> None:
    args = [
        "sample",
        str(tiny_artifact),
        "--prompt",
        "ROMEO:",
        "--length",
        "80",
        "--temperature",
        "0.8",
        "--top-k",
        "10",
        "--top-p",
        "0.9",
        "--seed",
        "5",
    ]
    first, second = chargen(*args), chargen(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    assert first.stdout.startswith("ROMEO:") and len(first.stdout) == len("ROMEO:") + 80 + 1
    greedy = [
        chargen(
            "sample", str(tiny_artifact), "--prompt", "the", "--length", "40", "--temperature", "0", "--seed", str(s)
        ).stdout
        for s in (1, 2)
    ]
    assert greedy[0] == greedy[1]  # temperature 0 ignores the seed


def test_sample_writes_characters_as_they_are_sampled(tiny_artifact: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "chargen", "sample", str(tiny_artifact), "--length", "100000", "--seed", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.read(20)  # arrives long before 100,000 characters could be done
        assert len(first) == 20
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


def test_eval_reports_nats_and_bits(tiny_artifact: Path, corpus_file: Path) -> None:
    result = chargen("eval", str(tiny_artifact), "--corpus", str(corpus_file))
    assert result.returncode == 0, result.stderr
    assert "nats/char" in result.stdout and "bits/char" in result.stdout


def test_bad_inputs_are_one_line_and_exit_2(tiny_artifact: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert_usage_error(chargen("train", "--corpus", str(empty), "--out", str(tmp_path / "a")), "at least")
    small = tmp_path / "small.txt"
    small.write_text("To be or not to be, that is the question. " * 3)  # 129 chars: too few for 4 x 32
    too_big = [*TINY, "--seq-len", "32"]
    assert_usage_error(chargen("train", "--corpus", str(small), "--out", str(tmp_path / "b"), *too_big), "batch_size")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(bytes(range(256)) * 4)
    assert_usage_error(chargen("train", "--corpus", str(binary), "--out", str(tmp_path / "c")), "not UTF-8")
    config = tmp_path / "c.toml"
    config.write_text("hiden = 3\n")
    assert_usage_error(chargen("train", "--config", str(config)), "unknown config key 'hiden'")
    assert_usage_error(chargen("train", "--hidden", "many"), "--hidden")

    not_ours = tmp_path / "not-a-model.pt"
    not_ours.write_text("hello")
    assert_usage_error(chargen("sample", str(not_ours)), "not a TorchScript model")
    assert_usage_error(chargen("sample", str(tmp_path / "missing.pt")), "not found")
    assert_usage_error(chargen("sample", str(tiny_artifact), "--prompt", "Zebra€"), "'€'")
    assert_usage_error(chargen("sample", str(tiny_artifact), "--temperature", "-1"), "--temperature")
    unknown = tmp_path / "unknown.txt"
    unknown.write_text("the king € and queen " * 10)
    assert_usage_error(chargen("eval", str(tiny_artifact), "--corpus", str(unknown)), "'€'")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_plain_scripted_module_is_not_our_artifact(tmp_path: Path) -> None:
    import torch

    from chargen.artifact import jit_deprecation_accepted

    path = tmp_path / "other.pt"
    with jit_deprecation_accepted():
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    assert_usage_error(chargen("sample", str(path)), "not a chargen model")


def test_train_without_the_train_extra_says_how_to_install_it(tmp_path: Path) -> None:
    # As in the api image or after `pip install chargen`: no matplotlib, no tqdm. Fails at once,
    # before reading the corpus or creating --out.
    hide = (
        "import sys; sys.modules['matplotlib'] = sys.modules['tqdm'] = None; "
        "from chargen.cli import main; raise SystemExit(main())"
    )
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-c", hide, "train", "--corpus", str(tmp_path / "none.txt"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_usage_error(result, "train needs the train extra (matplotlib, tqdm missing): pip install 'chargen[train]'")
    assert not out.exists()


def test_train_then_resume_mismatch_leaves_the_run_untouched(tmp_path: Path) -> None:
    corpus = tmp_path / "plays.txt"
    corpus.write_text(make_corpus_text(6000))
    out = tmp_path / "run"
    done = chargen(
        "train", "--corpus", str(corpus), "--out", str(out), *TINY, "--max-steps", "10", "--eval-interval", "10"
    )
    assert done.returncode == 0, done.stderr
    assert "exported" in done.stderr and (out / "model.pt").exists()
    snapshot = {p.name: p.read_bytes() for p in out.iterdir()}
    again = chargen("train", "--corpus", str(corpus), "--out", str(out), *TINY, "--max-steps", "10")
    assert_usage_error(again, "already holds a run")
    wrong = chargen(
        "train", "--corpus", str(corpus), "--out", str(out), *TINY, "--max-steps", "20", "--eval-interval", "10",
        "--resume",
    )  # fmt: skip
    assert_usage_error(wrong, "different config (max_steps)")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == snapshot


def test_sigterm_checkpoints_and_the_same_command_resumes(tmp_path: Path) -> None:
    corpus = tmp_path / "plays.txt"
    corpus.write_text(make_corpus_text(20_000))
    out = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "chargen",
        "train",
        "--corpus",
        str(corpus),
        "--out",
        str(out),
        *TINY,
        "--max-steps",
        "100000",
        "--eval-interval",
        "50000",
        "--resume",
    ]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:  # wait until it is really training
        if line.startswith("step "):
            break
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    assert (out / "last.pt").exists() and not list(out.glob(".*tmp*"))
    from training.train import load_checkpoint

    stopped_at = load_checkpoint(out / "last.pt")["step"]
    assert stopped_at >= 5
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    header = proc.stderr.readline()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert f"from step {stopped_at} to 100000" in header
