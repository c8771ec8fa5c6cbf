"""The GPU trainer's acceptance run: one command on a CUDA machine; --smoke runs it on CPU.

    python benchmarks/gpu_acceptance.py --corpus tinyshakespeare.txt --minutes 6 --max-steps 1300 --out runs/acceptance
    python benchmarks/gpu_acceptance.py --smoke              # CPU, a tiny config, about a minute
    python benchmarks/gpu_acceptance.py --corpus tinyshakespeare.txt --max-steps 100 --eval-interval 50  # a preflight

On CUDA it
1. trains configs/tinyshakespeare-gpu.toml (all of it, or what --minutes allows) with the trainer
   itself: bf16 autocast, the cell through torch.compile;
2. times a training step of chargen (eager and compiled cell) against torch.nn.LSTM (cuDNN) of the
   same size and batch, side by side, with each one's peak GPU memory;
3. with two or more GPUs, trains 2 processes under torchrun (DDP over NCCL) and checks that both
   ranks end with identical weights; with one GPU it says so and skips this;
4. exports the best checkpoint, loads the artifact on CPU in a process that imports torch alone,
   and checks that its logits on validation text match the GPU model's (float32) within
   LOGIT_TOLERANCE;
5. evaluates the whole validation split and writes OUT/acceptance.json, with the loss curve
   beside it (OUT/train/loss.png).
It exits 0 when every check passed. --smoke does the same on CPU with a tiny config, trained on
this repository's README (no download), and the DDP part on gloo.

The machine needs no network: pass --corpus a copy of Tiny Shakespeare (recognised by its sha256).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from train_throughput import TorchLSTMBaseline, measure, rates, train_step_fn  # noqa: E402

from training.config import ConfigError, TrainConfig, load_config  # noqa: E402
from training.data import CorpusError, Vocab, load_corpus, split  # noqa: E402
from training.export import export, model_from_checkpoint  # noqa: E402
from training.fast_layer import compiled_cells  # noqa: E402
from training.train import LN2, evaluate, load_checkpoint, train, weights_fingerprint  # noqa: E402

TARGET_VAL_NATS = 1.42  # the GPU config's target (issue 14); nanoGPT shakespeare_char: 1.4697
LOGIT_TOLERANCE = 1e-3  # max |logit difference|, CPU artifact vs GPU model in float32 (no TF32)
SAMPLE_CHARS = 2000  # validation characters both run for the logit comparison
SMOKE = dict(layers=2, hidden=32, dropout=0.1, batch_size=8, seq_len=32, max_steps=40, eval_interval=20)
SMOKE |= dict(log_interval=10, warmup_steps=5, early_stop_patience=0, learning_rate=1e-2, min_lr=1e-3)

# Runs in a fresh interpreter that imports torch and nothing of chargen: what the service does.
CPU_ARTIFACT_CHECK = """
import json, sys, torch
artifact, tokens_file, out_file = sys.argv[1:]
extra = {"meta.json": ""}
module = torch.jit.load(artifact, map_location="cpu", _extra_files=extra)
assert json.loads(extra["meta.json"])["format"] == "chargen-lstm/1"
tokens = torch.load(tokens_file, weights_only=True)
h, c = module.init_state(1)
with torch.no_grad():
    logits, _, _ = module(tokens[:-1].unsqueeze(0), h, c)
torch.save({"logits": logits[0], "imported_chargen": any(m.split(".")[0] in ("training", "service", "chargen")
            for m in sys.modules)}, out_file)
"""


def log(message: str) -> None:
    print(f"gpu_acceptance: {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def train_phase(config: TrainConfig, minutes: float | None) -> dict[str, Any]:
    deadline = None if minutes is None else time.monotonic() + 60 * minutes
    start = time.perf_counter()
    result = train(config, should_stop=lambda step: deadline is not None and time.monotonic() > deadline)
    wall = time.perf_counter() - start
    records = metrics(Path(config.out))
    rates_logged = [r["chars_per_s"] for r in records if r["kind"] == "train"]
    rates_logged = rates_logged[1:] or rates_logged  # the first window holds compilation: left out if others exist
    peaks = [r["peak_gpu_mem_gib"] for r in records if "peak_gpu_mem_gib" in r]
    return {
        "steps": result.step,
        "stopped_by_budget": result.interrupted,
        "stopped_early": result.stopped_early,
        "wall_s": wall,
        "chars_per_s_median": statistics.median(rates_logged) if rates_logged else None,
        "peak_gpu_mem_gib": max(peaks) if peaks else None,
        "best_checkpoint": str(result.checkpoint),
    }


def speed_phase(config: TrainConfig, vocab_size: int, device: torch.device, rounds: int, steps: int) -> dict[str, Any]:
    """chargen's training step against nn.LSTM's at the config's size and batch, side by side."""
    from training.model import CharLSTM, ModelConfig

    B, T, L, H = config.batch_size, config.seq_len, config.layers, config.hidden
    torch.manual_seed(0)
    tokens = torch.randint(0, vocab_size, (B, T), device=device)
    targets = torch.randint(0, vocab_size, (B, T), device=device)
    ours = CharLSTM(ModelConfig(vocab_size, L, H, dropout=0.0)).to(device)
    h, c = ours.init_state(B)
    baseline = TorchLSTMBaseline(vocab_size, L, H).to(device)
    step_ours = train_step_fn(ours, lambda x: ours(x, h, c)[0], tokens, targets, device)
    candidates = {
        "torch.nn.LSTM": (train_step_fn(baseline, baseline, tokens, targets, device), nullcontext),
        "chargen": (step_ours, nullcontext),
    }
    if device.type == "cuda":  # the trainer compiles the cell on CUDA only (docs/training.md)
        candidates["chargen, compiled cell"] = (step_ours, lambda: compiled_cells(True))
    peaks: dict[str, float | None] = {}
    for name, (step, context) in candidates.items():  # peak memory of each alone
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        with context():
            step()
        peaks[name] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    timings, first = measure(candidates, rounds, steps)
    return {
        name: {"chars_per_s": rate, "x_nn_lstm": ratio, "first_step_s": first[name], "peak_gpu_mem_gib": peaks[name]}
        for name, (rate, ratio) in rates(timings, B * T, "torch.nn.LSTM").items()
    }


def ddp_phase(config: TrainConfig, config_path: Path, out: Path, steps: int, device: torch.device) -> dict[str, Any]:
    """2 processes under torchrun: both ranks must end with the same weights."""
    if device.type == "cuda" and torch.cuda.device_count() < 2:
        log("one GPU: the 2-process DDP check needs two, skipped")
        return {"ran": False, "reason": "one GPU"}
    run = out / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
        "--master-port", str(free_port()), "-m", "training.cli", "train", "--config", str(config_path),
        "--corpus", config.corpus, "--out", str(run), "--device", device.type, "--max-steps", str(steps),
        "--eval-interval", str(steps), "--log-interval", str(max(1, steps // 4)), "--warmup-steps", "2",
    ]  # fmt: skip
    for name in ("layers", "hidden", "batch_size", "seq_len", "dropout", "compile"):
        command += [f"--{name.replace('_', '-')}", str(getattr(config, name))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        log(f"torchrun failed:\n{done.stderr[-4000:]}")
        return {"ran": True, "ok": False, "error": done.stderr[-2000:]}
    checkpoint = load_checkpoint(run / "last.pt")
    fingerprints = checkpoint["rank_fingerprints"]
    equal = len(fingerprints) == 2 and len(set(fingerprints)) == 1
    equal = equal and fingerprints[0] == weights_fingerprint(checkpoint["model"])
    return {"ran": True, "ok": equal, "world": checkpoint["world"], "steps": checkpoint["step"],
            "rank_fingerprints": fingerprints, "wall_s": time.perf_counter() - start}  # fmt: skip


def artifact_phase(best: Path, out: Path, val_ids: torch.Tensor, device: torch.device) -> dict[str, Any]:
    """Export; the artifact on CPU (torch alone) against the GPU model on the same characters."""
    artifact = out / "model.pt"
    meta = export(best, artifact)
    model = model_from_checkpoint(load_checkpoint(best)).to(device).eval()
    sample = val_ids[: SAMPLE_CHARS + 1].cpu()
    with tempfile.TemporaryDirectory() as tmp:
        tokens_file, logits_file = Path(tmp) / "tokens.pt", Path(tmp) / "logits.pt"
        torch.save(sample, tokens_file)
        command = [sys.executable, "-c", CPU_ARTIFACT_CHECK, str(artifact), str(tokens_file), str(logits_file)]
        subprocess.run(command, check=True, cwd=tmp, env={**os.environ, "PYTHONPATH": ""}, timeout=600)
        cpu = torch.load(logits_file, weights_only=True)
    x = sample[:-1].unsqueeze(0).to(device)
    h, c = model.init_state(1)
    with torch.no_grad():
        gpu = model(x, h, c)[0][0].float().cpu()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            gpu_bf16 = model(x, h, c)[0][0].float().cpu()
    targets = sample[1:]
    nll = torch.nn.functional.cross_entropy
    diff = float((cpu["logits"] - gpu).abs().max())
    return {
        "path": str(artifact),
        "bytes": artifact.stat().st_size,
        "params": meta["params"],
        "fingerprint": meta["fingerprint"],
        "loaded_without_chargen": not cpu["imported_chargen"],
        "sample_chars": SAMPLE_CHARS,
        "max_abs_logit_diff_fp32": diff,
        "logit_tolerance": LOGIT_TOLERANCE,
        "max_abs_logit_diff_bf16_autocast": float((cpu["logits"] - gpu_bf16).abs().max()),
        "sample_nats_cpu_artifact": float(nll(cpu["logits"], targets)),
        "sample_nats_gpu_model": float(nll(gpu, targets)),
        "ok": diff <= LOGIT_TOLERANCE and not cpu["imported_chargen"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny config, the same code path")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "tinyshakespeare-gpu.toml")
    parser.add_argument("--corpus", help="the corpus (default: the config's; --smoke: README.md)")
    parser.add_argument("--minutes", type=float, help="stop training after this long (default: the whole config)")
    parser.add_argument("--out", type=Path, help="new or empty (default runs/acceptance; --smoke: a temp dir)")
    parser.add_argument("--ddp-steps", type=int, help="steps of the 2-process run (default 200; --smoke 10)")
    parser.add_argument("--max-steps", type=int, help="the config's max_steps: fit the LR schedule to the time at hand")
    parser.add_argument("--eval-interval", type=int, help="the config's eval_interval")
    args = parser.parse_args()

    if args.smoke:
        device = torch.device("cpu")
        overrides: dict[str, Any] = {**SMOKE, "corpus": args.corpus or str(ROOT / "README.md"), "device": "cpu"}
    elif torch.cuda.is_available():
        device = torch.device("cuda")
        overrides = {"device": "cuda", **({"corpus": args.corpus} if args.corpus else {})}
    else:
        print("gpu_acceptance: error: no CUDA device here; --smoke runs the same code on CPU", file=sys.stderr)
        return 2
    for name in ("max_steps", "eval_interval"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix="chargen-acceptance-")) if args.smoke else ROOT / "runs" / "acceptance"
    if args.out.exists() and any(args.out.iterdir()):
        print(f"gpu_acceptance: error: {args.out} is not empty; choose another --out", file=sys.stderr)
        return 2
    config = load_config(args.config, {**overrides, "out": str(args.out / "train")})
    summary: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "gpus": torch.cuda.device_count() if device.type == "cuda" else 0,
        "torch": str(torch.__version__),
        "smoke": args.smoke,
        "config": config.to_dict(),
        "minutes": args.minutes,
    }

    log(f"1/5 training {config.layers}x{config.hidden}, batch {config.batch_size}, T {config.seq_len} on {device}")
    summary["train"] = train_phase(config, args.minutes)
    best = Path(summary["train"]["best_checkpoint"])
    checkpoint = load_checkpoint(best)
    corpus = load_corpus(config.corpus)
    vocab = Vocab(checkpoint["vocab"])
    val_ids = split(vocab.encode(corpus.text))[1].to(device)

    log("2/5 chargen against nn.LSTM, side by side")
    rounds, steps = (2, 1) if args.smoke else (5, 3)
    summary["speed"] = speed_phase(config, len(vocab), device, rounds, steps)

    log("3/5 two processes under torchrun")
    summary["ddp"] = ddp_phase(config, args.config, args.out, args.ddp_steps or (10 if args.smoke else 200), device)

    log("4/5 export, and the artifact on CPU against the model on the training device")
    summary["artifact"] = artifact_phase(best, args.out, val_ids, device)

    log("5/5 the validation split")
    model = model_from_checkpoint(checkpoint).to(device)
    val = evaluate(model, val_ids, config.seq_len, device)
    summary["validation"] = {"nats_per_char": val, "bits_per_char": val / LN2, "target_nats": TARGET_VAL_NATS,
                             "meets_target": val <= TARGET_VAL_NATS, "checkpoint_step": checkpoint["step"]}  # fmt: skip
    summary["loss_curve"] = str(Path(config.out) / "loss.png")
    checks = {
        "artifact_matches": summary["artifact"]["ok"],
        "ranks_equal": summary["ddp"]["ok"] if summary["ddp"]["ran"] else None,
        "validation_finite": math.isfinite(val),
    }
    summary["checks"] = checks
    summary["passed"] = all(v is not False for v in checks.values())
    (args.out / "acceptance.json").write_text(json.dumps(summary, indent=1) + "\n")

    speed = summary["speed"]
    print(f"device {summary['device']}, torch {summary['torch']}, {config.layers}x{config.hidden}, "
          f"batch {config.batch_size}, T {config.seq_len}")  # fmt: skip
    trained, peak = summary["train"], summary["train"]["peak_gpu_mem_gib"]
    print(f"  trained {trained['steps']} steps in {trained['wall_s'] / 60:.1f} min, "
          f"{trained['chars_per_s_median'] or 0:,.0f} chars/s logged"
          + (f", peak GPU memory {peak:.2f} GiB" if peak is not None else ""))  # fmt: skip
    for name, figures in speed.items():
        peak = figures["peak_gpu_mem_gib"]
        print(f"  {name:24s} {figures['chars_per_s']:10,.0f} chars/s  {figures['x_nn_lstm']:5.2f}x nn.LSTM"
              + (f"  peak {peak:.2f} GiB" if peak is not None else ""))  # fmt: skip
    print(f"  validation {val:.4f} nats/char ({val / LN2:.4f} bits/char), target <= {TARGET_VAL_NATS}: "
          f"{'met' if val <= TARGET_VAL_NATS else 'not met'}")  # fmt: skip
    diff = summary["artifact"]["max_abs_logit_diff_fp32"]
    print(f"  artifact on CPU vs model on {device.type}: max |logit diff| {diff:.2e} (tolerance {LOGIT_TOLERANCE:g})")
    ddp = summary["ddp"]
    print("  DDP: " + ("skipped (one GPU)" if not ddp["ran"] else f"2 ranks, identical weights: {ddp['ok']}"))
    print(f"  {'PASSED' if summary['passed'] else 'FAILED'}: {args.out / 'acceptance.json'}")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except (ConfigError, CorpusError) as err:
        print(f"gpu_acceptance: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
