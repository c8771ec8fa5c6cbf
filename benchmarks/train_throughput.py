"""Training characters/second: chargen's peephole LSTM against torch.nn.LSTM, side by side.

Every model gets the same layers, width, batch, segment length, optimiser and loss (characters
enter through an embedding lookup in all of them). Each round runs every candidate in turn, so that
machine noise hits them alike; a figure is the median over rounds, and a ratio is the median of the
rounds' paired ratios against nn.LSTM.

    python benchmarks/train_throughput.py                      # 2x256, batch 32, T 100, CPU
    OMP_NUM_THREADS=1 python benchmarks/train_throughput.py --compile --reference
    python benchmarks/train_throughput.py --compare-src /path/to/older/checkout   # its model too
    python benchmarks/train_throughput.py --layers 3 --hidden 700 --batch-size 128 --seq-len 200 --device cuda

Candidates: "chargen" is the trainer's path (CharLSTM in eager mode: training/fast_layer.py);
"--compile" adds the same with the cell's two functions through torch.compile, and prints the
compilation time, which the trainer pays in its first step; "--reference" adds autograd through
model.peephole_lstm_layer, the code the artifact runs; "--compare-src DIR" adds DIR's
training/model.py (an older checkout, e.g. `git worktree add /tmp/old <commit>`).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from training import model as model_module
from training.fast_layer import compiled_cells
from training.model import CharLSTM, ModelConfig


class TorchLSTMBaseline(nn.Module):
    """nn.LSTM (cuDNN / oneDNN kernels) with the same input and output sizes."""

    def __init__(self, vocab: int, layers: int, hidden: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.lstm = nn.LSTM(hidden, hidden, layers, batch_first=True)
        self.output = nn.Linear(hidden, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.output(self.lstm(self.embed(tokens))[0])


def train_step_fn(
    model: nn.Module,
    forward: Callable[[torch.Tensor], torch.Tensor],
    tokens: torch.Tensor,
    targets: torch.Tensor,
    device: torch.device,
) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = forward(tokens)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return step


@contextmanager
def reference_layer() -> Iterator[None]:
    """CharLSTM's eager forward with autograd through peephole_lstm_layer (the artifact's layer)."""
    fast = model_module.peephole_layer
    model_module.peephole_layer = model_module.peephole_lstm_layer
    try:
        yield
    finally:
        model_module.peephole_layer = fast


def model_from_source(src: Path):  # type: ignore[no-untyped-def]
    """training/model.py of another checkout, loaded as a module of its own."""
    path = src / "training" / "model.py"
    spec = importlib.util.spec_from_file_location("compared_model", path)
    if spec is None or spec.loader is None or not path.is_file():
        raise SystemExit(f"no training/model.py under {src}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


Candidate = tuple[Callable[[], None], Callable[[], AbstractContextManager[object]]]  # (step, its context)


def measure(
    candidates: dict[str, Candidate], rounds: int, steps: int
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Seconds per step of every candidate in every round (candidates alternate within a round),
    and each one's first step (allocator, kernels, autotuning, compilation)."""
    warmup: dict[str, float] = {}
    for name, (step, context) in candidates.items():
        start = time.perf_counter()
        with context():
            step()
        warmup[name] = time.perf_counter() - start
    timings: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, (step, context) in candidates.items():
            with context():
                start = time.perf_counter()
                for _ in range(steps):
                    step()
                timings[name].append((time.perf_counter() - start) / steps)
    return timings, warmup


def rates(timings: dict[str, list[float]], chars_per_step: int, base: str) -> dict[str, tuple[float, float]]:
    """Each candidate's chars/s (median round) and its ratio to `base` (median of paired rounds)."""
    return {
        name: (
            chars_per_step / statistics.median(seconds),
            statistics.median(b / s for b, s in zip(timings[base], seconds, strict=True)),
        )
        for name, seconds in timings.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=100)
    parser.add_argument("--vocab", type=int, default=65)
    parser.add_argument("--rounds", type=int, default=9, help="rounds; each runs every candidate (median reported)")
    parser.add_argument("--steps", type=int, default=2, help="training steps per candidate per round")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true", help="also chargen with torch.compile of the cell")
    parser.add_argument("--reference", action="store_true", help="also autograd through peephole_lstm_layer")
    parser.add_argument("--compare-src", type=Path, help="also the CharLSTM of another checkout")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    B, T, V, L, H = args.batch_size, args.seq_len, args.vocab, args.layers, args.hidden
    tokens = torch.randint(0, V, (B, T), device=device)
    targets = torch.randint(0, V, (B, T), device=device)

    def chargen(model_class: type[nn.Module], config_class: type) -> tuple[nn.Module, Callable]:  # type: ignore[type-arg]
        model = model_class(config_class(V, L, H, dropout=0.0)).to(device)
        h, c = model.init_state(B)
        return model, lambda x: model(x, h, c)[0]

    baseline = TorchLSTMBaseline(V, L, H).to(device)
    candidates: dict[str, Candidate] = {
        "torch.nn.LSTM": (train_step_fn(baseline, baseline, tokens, targets, device), nullcontext),
        "chargen": (train_step_fn(*chargen(CharLSTM, ModelConfig), tokens, targets, device), nullcontext),
    }
    if args.compile:
        step = train_step_fn(*chargen(CharLSTM, ModelConfig), tokens, targets, device)
        candidates["chargen, compiled cell"] = (step, lambda: compiled_cells(True))
    if args.reference:
        step = train_step_fn(*chargen(CharLSTM, ModelConfig), tokens, targets, device)
        candidates["reference layer, autograd"] = (step, reference_layer)
    if args.compare_src:
        other = model_from_source(args.compare_src)
        step = train_step_fn(*chargen(other.CharLSTM, other.ModelConfig), tokens, targets, device)
        candidates[f"CharLSTM of {args.compare_src}"] = (step, nullcontext)

    timings, warmup = measure(candidates, args.rounds, args.steps)
    print(
        f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, {L}x{H}, batch {B}, "
        f"T {T}, median of {args.rounds} rounds x {args.steps} steps"
    )
    for name, (rate, ratio) in rates(timings, B * T, "torch.nn.LSTM").items():
        print(f"  {name:32s} {rate:10,.0f} chars/s  {ratio:5.2f}x nn.LSTM")
    if args.compile:
        extra = warmup["chargen, compiled cell"] - warmup["chargen"]
        print(f"  compilation of the cell: {extra:.1f} s, paid in the first training step (first step minus eager's)")


if __name__ == "__main__":
    main()
