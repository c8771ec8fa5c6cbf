"""The training loop: truncated BPTT over carried state, evaluation in bits/char, exact resume."""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from training.config import ConfigError, TrainConfig
from training.data import Corpus, CorpusError, StreamBatcher, Vocab, eval_streams, load_corpus, split
from training.distributed import Dist, setup, torchrun_ranks
from training.fast_layer import compiled_cells
from training.model import CharLSTM, ModelConfig, count_parameters, upgrade_state_dict

LN2 = math.log(2.0)
EVAL_STREAMS = 64  # rows the validation text is cut into for stateful evaluation
CHECKPOINT_FORMAT = "chargen-checkpoint/1"


def pick_device(name: str, ddp: Dist) -> torch.device:
    """The device this process trains on; under torchrun, CUDA means cuda:LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    if not ddp.enabled:
        return device
    if device.index is not None:  # every rank would take that one GPU, while NCCL uses local_rank
        raise ConfigError(
            f"device {name!r} under torchrun: each process takes cuda:LOCAL_RANK; "
            "pass --device cuda and choose the GPUs with CUDA_VISIBLE_DEVICES"
        )
    gpus = torch.cuda.device_count()
    if ddp.local_rank >= gpus:
        raise ConfigError(f"local rank {ddp.local_rank} on a node with {gpus} GPUs; start one process per GPU")
    return torch.device("cuda", ddp.local_rank)


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up to learning_rate, then cosine decay to min_lr at max_steps."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return config.min_lr + cosine * (config.learning_rate - config.min_lr)


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA (where the GPU has bf16: Ampere and later), float32 elsewhere."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


# Weight decay shrinks the weight matrices W_x (input_proj), W_below, W_h and W_y (output.weight).
# The biases (the forget gate's starts at 1) and the diagonal peepholes are offsets and per-unit
# gains, which decay would pull towards 0. By name, not by rank: here bias is [L, 4H].
DECAYED = ("input_proj.weight", "w_below", "w_h", "output.weight")
NOT_DECAYED = ("bias", "peephole", "output.bias")


def optimizer_groups(model: CharLSTM, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW's parameter groups: the weight matrices with weight_decay, the rest without."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    unknown = sorted({name for name, _ in named} - set(DECAYED) - set(NOT_DECAYED))
    if unknown:
        raise ValueError(f"say in training/train.py whether weight decay applies to {unknown}")
    return [
        {"params": [p for name, p in named if name in DECAYED], "weight_decay": weight_decay},
        {"params": [p for name, p in named if name in NOT_DECAYED], "weight_decay": 0.0},
    ]


def weights_fingerprint(state: dict[str, Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes: identifies these exact weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def load_corpus_per_node(spec: str, ddp: Dist) -> Corpus:
    """The corpus on every rank, downloaded (if it must be) once per node: local rank 0 fetches it
    into the cache while the others wait, then each rank reads the file and checks its sha256."""
    if not ddp.enabled:
        return load_corpus(spec)
    corpus, error = None, None
    if ddp.local_rank == 0:
        try:
            corpus = load_corpus(spec)
        except CorpusError as err:
            error = err
    if ddp.any(error is not None):  # the others wait here until every node's fetch is done
        raise error or CorpusError(f"corpus {spec!r} could not be loaded on another rank (see its error)")
    return corpus or load_corpus(spec)


@torch.no_grad()
def evaluate(model: CharLSTM, ids: Tensor, seq_len: int, device: torch.device, ddp: Dist | None = None) -> float:
    """Mean loss in nats/char of predicting ids[1:] from ids[:-1], state carried within a row.

    The text is cut into EVAL_STREAMS contiguous rows evaluated side by side; the few characters
    left over continue the last row, so every character after the first is scored. Under torchrun
    each rank scores its share of the rows and the sums are reduced.
    """
    ddp = ddp or Dist()
    was_training = model.training
    model.eval()
    inputs, targets = ids[:-1], ids[1:]
    all_rows = eval_streams(inputs, EVAL_STREAMS)
    used = all_rows.numel()
    mine = list(range(ddp.rank, all_rows.size(0), ddp.world))
    rows = all_rows[mine]
    target_rows = targets[:used].view_as(all_rows)[mine]
    h, c = model.init_state(rows.size(0))
    total = torch.zeros((), dtype=torch.float64, device=device)  # read once at the end, not per segment
    count = 0

    def score(x: Tensor, y: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        nonlocal total, count
        with autocast_for(device):
            logits, h, c = model(x.to(device), h, c)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), reduction="sum")
        total += loss
        count += y.numel()
        return h, c

    if len(mine) > 0:
        for start in range(0, rows.size(1), seq_len):
            h, c = score(rows[:, start : start + seq_len], target_rows[:, start : start + seq_len], h, c)
    tail = inputs[used:]
    if len(tail) > 0 and mine and mine[-1] == all_rows.size(0) - 1:  # the rank holding the last row
        score(tail.unsqueeze(0), targets[used:].unsqueeze(0), h[:, -1:], c[:, -1:])
    model.train(was_training)
    total, count = ddp.sum([float(total), float(count)])
    return total / count


def atomic_write_bytes(path: Path, write: Callable[[Path], None]) -> None:
    """Write through `write(tmp)` then rename, so a reader never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    atomic_write_bytes(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: Path) -> dict[str, Any]:
    # weights_only: a checkpoint holds tensors, numbers, strings and dicts, never code.
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"checkpoint not found: {path}") from None
    except Exception as err:  # any unreadable file: pickle, zip and torch all raise their own
        raise ConfigError(f"{path} is not a readable chargen checkpoint ({type(err).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{path} is not a chargen checkpoint")
    return payload


@dataclass
class History:
    """Everything logged so far; written to metrics.jsonl and plotted."""

    records: list[dict[str, Any]] = field(default_factory=list)

    def add(self, record: dict[str, Any], path: Path | None) -> None:
        self.records.append(record)
        if path is not None:
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def rewrite(self, path: Path) -> None:
        lines = "".join(json.dumps(r) + "\n" for r in self.records)
        atomic_write_bytes(path, lambda tmp: tmp.write_text(lines))


def plot(history: History, path: Path) -> None:
    """Train and validation bits/char against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["train_bpc"]) for r in history.records if r["kind"] == "train"]
    val = [(r["step"], r["val_bpc"]) for r in history.records if r["kind"] == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train", alpha=0.7)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("bits/char")
    ax.set_title("chargen training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write_bytes(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


class Progress:
    """A tqdm bar on a terminal; plain log lines otherwise (batch jobs, CI, log files)."""

    def __init__(self, total: int, initial: int, enabled_tty: bool, quiet: bool = False) -> None:
        self.quiet = quiet  # torchrun ranks other than 0 say nothing
        self.bar = None
        if enabled_tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, steps: int, fields: dict[str, str]) -> None:
        if self.bar is not None:
            self.bar.update(steps)
            self.bar.set_postfix(fields, refresh=False)

    def log(self, line: str) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class RunFiles:
    out: Path

    @property
    def last(self) -> Path:
        return self.out / "last.pt"

    @property
    def best(self) -> Path:
        return self.out / "best.pt"

    @property
    def metrics(self) -> Path:
        return self.out / "metrics.jsonl"

    @property
    def plot(self) -> Path:
        return self.out / "loss.png"

    @property
    def model(self) -> Path:
        return self.out / "model.pt"


@dataclass
class TrainResult:
    step: int  # optimiser steps done
    best_val_loss: float  # nats/char
    stopped_early: bool
    interrupted: bool
    checkpoint: Path  # the best checkpoint
    is_main: bool = True  # False on torchrun ranks other than 0, which write nothing


def train(
    config: TrainConfig,
    resume: bool = False,
    should_stop: Callable[[int], bool] = lambda step: False,
    progress_tty: bool | None = None,
) -> TrainResult:
    """Train until max_steps, an early stop, or `should_stop(step)` (then checkpoint and return)."""
    config.validate()
    ddp = torchrun_ranks()  # one process unless started by torchrun
    files = RunFiles(Path(config.out))
    device = pick_device(config.device, ddp)
    setup(ddp, device)
    corpus = load_corpus_per_node(config.corpus, ddp)
    vocab = Vocab.from_text(corpus.text)
    # The whole text lives on the training device (8 bytes a character: 9 MB for Tiny Shakespeare),
    # so a step's batch is a slice there, with no copy from the host.
    train_ids, val_ids = (ids.to(device) for ids in split(vocab.encode(corpus.text)))
    # Under torchrun the streams are B per rank: rank r trains rows [r*B, (r+1)*B) of the batch.
    B = config.batch_size
    batcher = StreamBatcher(train_ids, B * ddp.world, config.seq_len, config.seed)
    my_rows = slice(ddp.rank * B, (ddp.rank + 1) * B)
    if len(val_ids) < 2:
        raise ConfigError("validation split is empty; use a larger corpus")

    saved: dict[str, Any] | None = None
    if files.last.exists():
        if not resume:
            raise ConfigError(f"{files.out} already holds a run; pass --resume or choose another --out")
        saved = load_checkpoint(files.last)
        different = config.mismatches(saved["config"])
        if different:
            raise ConfigError(f"--resume with a different config ({', '.join(different)}) than {files.last}")
        if saved["corpus"]["sha256"] != corpus.sha256:
            raise ConfigError(f"--resume with a different corpus than the one {files.last} was trained on")
        if saved["world"] != ddp.world:
            raise ConfigError(f"--resume with {ddp.world} processes; {files.last} was written by {saved['world']}")
    if ddp.is_main:
        files.out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(config.seed)  # the same initial weights on every rank
    model_config = ModelConfig(len(vocab), config.layers, config.hidden, config.dropout)
    model = CharLSTM(model_config).to(device)
    torch.manual_seed(config.seed + ddp.rank)  # but each rank its own dropout masks
    net: torch.nn.Module = model
    if ddp.enabled:  # averages gradients across ranks during backward
        device_ids = [device.index] if device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    groups = optimizer_groups(model, config.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=config.learning_rate, betas=(0.9, 0.99))
    h, c = model.init_state(B)
    history = History()
    step, best_val, evals_without_improvement = 0, math.inf, 0
    if saved is not None:
        model.load_state_dict(upgrade_state_dict(saved["model"], config.layers))
        try:
            optimizer.load_state_dict(saved["optimizer"])
        except ValueError:  # its parameter groups differ: written before they were chosen by name
            raise ConfigError(f"{files.last} was written by an older chargen; start a new run") from None
        h, c = saved["h"][:, my_rows].to(device), saved["c"][:, my_rows].to(device)
        step, best_val = saved["step"], saved["best_val_loss"]
        evals_without_improvement = saved["evals_without_improvement"]
        torch.set_rng_state(saved["rng"]["cpu"][ddp.rank])
        if device.type == "cuda" and saved["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(saved["rng"]["cuda"][ddp.rank], device)
        history.records = list(saved["history"])
        if ddp.is_main:
            history.rewrite(files.metrics)  # drop records written after the checkpoint
    elif ddp.is_main:
        files.metrics.unlink(missing_ok=True)

    def checkpoint_payload() -> dict[str, Any]:
        """Everything needed to continue exactly; a collective under torchrun (every rank calls it)."""
        cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        fingerprint = bytes.fromhex(weights_fingerprint(model.state_dict()).removeprefix("sha256:"))
        fingerprints = ddp.gather_rows(torch.frombuffer(bytearray(fingerprint), dtype=torch.uint8)[None], dim=0)
        return {
            "format": CHECKPOINT_FORMAT,
            "config": config.to_dict(),
            "model_config": model_config.to_dict(),
            "vocab": vocab.chars,
            "corpus": corpus.describe(),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "world": ddp.world,
            # each rank's own weights, hashed there: DDP keeps them identical, and this shows it
            "rank_fingerprints": ["sha256:" + bytes(row.tolist()).hex() for row in fingerprints],
            "h": ddp.gather_rows(h, dim=1),  # every rank's streams
            "c": ddp.gather_rows(c, dim=1),
            "step": step,
            "best_val_loss": best_val,
            "evals_without_improvement": evals_without_improvement,
            "rng": {  # one row per rank
                "cpu": ddp.gather_rows(torch.get_rng_state()[None], dim=0),
                "cuda": ddp.gather_rows(cuda_rng[None], dim=0) if cuda_rng is not None else None,
            },
            "history": history.records,
            "window": {"loss": float(window_loss), "steps": window_steps},
            "torch_version": str(torch.__version__),
        }

    tty = (sys.stderr.isatty() if progress_tty is None else progress_tty) and ddp.is_main
    progress = Progress(config.max_steps, step, tty, quiet=not ddp.is_main)
    processes = f" x {ddp.world} processes" if ddp.enabled else ""
    progress.log(
        f"chargen: {corpus.name} ({len(corpus.text):,} chars, vocab {len(vocab)}), "
        f"{config.layers}x{config.hidden} LSTM, {count_parameters(model):,} params, device {device}{processes}, "
        f"{batcher.steps_per_epoch} steps/epoch, from step {step} to {config.max_steps}"
    )
    compile_cells = config.compile == "yes" or (config.compile == "auto" and device.type == "cuda")
    if compile_cells:
        progress.log("torch.compile of the LSTM cell: paid in the first training step and the first evaluation")
    model.train()
    chars_per_step = B * ddp.world * config.seq_len
    # The loss since the last log line, summed on the device: reading it every step would make the
    # host wait for the GPU every step.
    window_loss = torch.zeros((), dtype=torch.float64, device=device)
    window_steps = 0
    timed_steps, window_start = 0, time.perf_counter()  # steps run by this process since then
    if saved is not None:  # the log window in progress, so resumed metrics equal a straight run's
        window_loss += saved["window"]["loss"]
        window_steps = saved["window"]["steps"]
    stopped_early = interrupted = False
    wrote_best = files.best.exists() if saved is not None else False  # decided alike on every rank
    wrote_best = ddp.any(wrote_best)

    with compiled_cells(compile_cells):
        while step < config.max_steps:
            epoch, index = batcher.position(step)
            if index == 0:  # new stream offsets: the carried state no longer continues them
                h, c = model.init_state(B)
            x, y = (t[my_rows] for t in batcher.batch(step))  # on the device already
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, config)
            with autocast_for(device):
                logits, h, c = net(x, h.detach(), c.detach())
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            h, c = h.detach(), c.detach()
            step += 1
            window_loss += loss.detach()
            window_steps += 1
            timed_steps += 1

            if step % config.log_interval == 0 or step == config.max_steps:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)  # the window's GPU work is done: now time it
                elapsed = time.perf_counter() - window_start
                loss_sum, steps_sum = ddp.sum([float(window_loss), float(window_steps)])
                mean = loss_sum / steps_sum  # over every rank's streams
                record = {
                    "kind": "train",
                    "step": step,
                    "epoch": epoch,
                    "train_loss": mean,
                    "train_bpc": mean / LN2,
                    "lr": lr_at(step - 1, config),
                    "chars_per_s": timed_steps * chars_per_step / elapsed,
                }
                if device.type == "cuda":
                    record["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                history.add(record, files.metrics if ddp.is_main else None)
                remaining = (config.max_steps - step) * elapsed / timed_steps
                progress.update(
                    timed_steps,
                    {"loss": f"{mean:.3f}", "bpc": f"{mean / LN2:.3f}", "chars/s": f"{record['chars_per_s']:,.0f}"},
                )
                if not tty:
                    progress.log(
                        f"step {step}/{config.max_steps} loss {mean:.4f} bpc {mean / LN2:.4f} "
                        f"{record['chars_per_s']:,.0f} chars/s eta {remaining / 60:.1f} min"
                    )
                window_loss.zero_()
                window_steps = 0
                timed_steps, window_start = 0, time.perf_counter()

            if step % config.eval_interval == 0 or step == config.max_steps:
                val = evaluate(model, val_ids, config.seq_len, device, ddp)
                improved = val < best_val
                if improved:
                    best_val, evals_without_improvement = val, 0
                else:
                    evals_without_improvement += 1
                record = {"kind": "eval", "step": step, "val_loss_nats": val, "val_bpc": val / LN2}
                history.add(record, files.metrics if ddp.is_main else None)
                progress.log(
                    f"step {step}: val {val:.4f} nats/char, {val / LN2:.4f} bits/char" + (" (best)" if improved else "")
                )
                payload = checkpoint_payload()
                wrote_best = wrote_best or improved
                if ddp.is_main:
                    if improved:
                        save_checkpoint(files.best, payload)
                    save_checkpoint(files.last, payload)
                    plot(history, files.plot)
                patience = config.early_stop_patience
                if patience and evals_without_improvement >= patience:
                    progress.log(f"early stop: no improvement in {patience} evaluations")
                    stopped_early = True
                    break

            # Every step, so that a SIGTERM to any rank stops all of them at the same step: under NCCL
            # this is a host-to-host exchange over gloo, which never waits for the GPU.
            if step < config.max_steps and ddp.any(should_stop(step)):
                payload = checkpoint_payload()
                if ddp.is_main:
                    save_checkpoint(files.last, payload)
                progress.log(f"stopped at step {step}; checkpoint {files.last}; rerun with --resume to continue")
                interrupted = True
                break

    progress.close()
    if not wrote_best:  # stopped before the first evaluation: best.pt is the weights as they are
        payload = checkpoint_payload()
        if ddp.is_main:
            save_checkpoint(files.best, payload)
    return TrainResult(step, best_val, stopped_early, interrupted, files.best, ddp.is_main)
