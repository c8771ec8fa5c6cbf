"""deploy/train-job.sh, the training image's entrypoint: it passes SIGTERM on to the trainer (so a
preempted job checkpoints and exits 143, and the rerun resumes) and publishes OUT/model.pt into the
models volume only when the job succeeded.

A stand-in trainer keeps these fast; the real `chargen train` SIGTERM path is tested in training's
own tests. The stand-in follows the same contract: `--out DIR`; on SIGTERM it writes DIR/last.pt
and exits 143; otherwise it writes DIR/model.pt and exits 0 (or exits 3 when told to fail).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRAIN_JOB = ROOT / "deploy" / "train-job.sh"

FAKE_TRAINER = """
import signal, sys, time
from pathlib import Path
args = " ".join(sys.argv).replace("--out=", "--out ").split()
out = Path(args[args.index("--out") + 1]); out.mkdir(parents=True, exist_ok=True)
stop = False
def on_term(signum, frame):
    global stop
    stop = True
signal.signal(signal.SIGTERM, on_term)
(out / "started").write_text("")
for _ in range(int(sys.argv[1]) * 20):
    if stop:
        (out / "last.pt").write_text("checkpoint")
        sys.exit(143)
    time.sleep(0.05)
if "--fail" in sys.argv:
    sys.exit(3)
(out / "model.pt").write_text("artifact")
"""


def run_job(args: list[str], models: Path, **env: str) -> subprocess.Popen[str]:
    environment = {k: v for k, v in os.environ.items() if k != "CHARGEN_PUBLISH_AS"}
    environment.update(CHARGEN_MODELS_DIR=str(models), **env)
    return subprocess.Popen(
        ["sh", str(TRAIN_JOB), sys.executable, "-c", FAKE_TRAINER, *args],
        env=environment,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(path: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_success_publishes_the_model_under_the_run_name(tmp_path: Path) -> None:
    out, models = tmp_path / "runs" / "shakespeare-gpu", tmp_path / "models"
    job = run_job(["0", "--out", str(out), "--resume"], models)
    _, err = job.communicate(timeout=60)
    assert job.returncode == 0, err
    assert (models / "shakespeare-gpu.pt").read_text() == "artifact"
    assert [p.name for p in models.iterdir()] == ["shakespeare-gpu.pt"]  # no temporary left behind
    assert f"replicas watching {models} serve it without a restart" in err


def test_publish_name_and_out_equals_form(tmp_path: Path) -> None:
    out, models = tmp_path / "run7", tmp_path / "models"
    job = run_job(["0", f"--out={out}"], models, CHARGEN_PUBLISH_AS="candidate.pt")
    job.communicate(timeout=60)
    assert job.returncode == 0
    assert (models / "candidate.pt").exists()


def test_sigterm_reaches_the_trainer_which_checkpoints_and_nothing_is_published(tmp_path: Path) -> None:
    out, models = tmp_path / "runs" / "job", tmp_path / "models"
    job = run_job(["30", "--out", str(out), "--resume"], models)
    wait_for(out / "started")
    started = time.monotonic()
    job.send_signal(signal.SIGTERM)  # what `docker stop` sends to the container's PID 1
    _, err = job.communicate(timeout=30)
    assert job.returncode == 143, err  # the trainer's own status: "preempted, rerun to resume"
    assert time.monotonic() - started < 10  # stopped at once, not after the 30 s run
    assert (out / "last.pt").read_text() == "checkpoint"
    assert not models.exists() or not any(models.iterdir())


def test_failed_job_keeps_its_status_and_publishes_nothing(tmp_path: Path) -> None:
    out, models = tmp_path / "run", tmp_path / "models"
    job = run_job(["0", "--out", str(out), "--fail"], models)
    _, err = job.communicate(timeout=60)
    assert job.returncode == 3 and "nothing published" in err
    assert not models.exists()


def test_a_command_without_out_is_just_run(tmp_path: Path) -> None:
    models = tmp_path / "models"
    job = subprocess.run(
        ["sh", str(TRAIN_JOB), sys.executable, "-c", "print('hello')"],
        env={**os.environ, "CHARGEN_MODELS_DIR": str(models)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert job.returncode == 0 and job.stdout == "hello\n", job.stderr
    assert not models.exists()
