"""benchmarks/gpu_acceptance.py --smoke: the GPU acceptance run's code path, on CPU with a tiny config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_acceptance_run_passes_on_cpu_in_smoke_mode(tmp_path: Path) -> None:
    out = tmp_path / "acceptance"
    # --max-steps and --eval-interval fit the schedule to a device's time: 10 steps, evaluated twice,
    # so the run logs one training record (at step 10), which must still give the logged rate.
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_acceptance.py"), "--smoke", "--out", str(out)]
    command += ["--max-steps", "10", "--eval-interval", "5"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    assert f"PASSED: {out / 'acceptance.json'}" in done.stdout
    summary = json.loads((out / "acceptance.json").read_text())
    assert summary["checks"] == {"artifact_matches": True, "ranks_equal": True, "validation_finite": True}
    # the checkpoint validated is the best of the run's evaluations (the smoke corpus is README.md,
    # so which evaluation is best changes with the README's text)
    records = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    best = min(evals, key=lambda r: r["val_loss_nats"])
    assert [r["step"] for r in evals] == [5, 10] and summary["config"]["max_steps"] == 10
    assert summary["train"]["steps"] == 10 and summary["validation"]["checkpoint_step"] == best["step"]
    (logged,) = [r for r in records if r["kind"] == "train"]
    assert summary["train"]["chars_per_s_median"] == logged["chars_per_s"]
    assert set(summary["speed"]) == {"torch.nn.LSTM", "chargen"}
    assert summary["speed"]["torch.nn.LSTM"]["x_nn_lstm"] == 1.0
    ddp = summary["ddp"]
    assert (ddp["ran"], ddp["ok"], ddp["world"], ddp["steps"]) == (True, True, 2, 10)
    assert len(set(ddp["rank_fingerprints"])) == 1
    artifact = summary["artifact"]
    assert artifact["loaded_without_chargen"] and artifact["max_abs_logit_diff_fp32"] <= artifact["logit_tolerance"]
    assert abs(artifact["sample_nats_cpu_artifact"] - artifact["sample_nats_gpu_model"]) < 1e-5
    assert (out / "train" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / "model.pt").is_file()
    assert not list(tmp_path.glob("*.pt"))  # nothing left where it ran
