"""Training characters/second: chargen's peephole LSTM against torch.nn.LSTM, side by side.

Both models get the same layers, width, batch, segment length, optimiser and loss (characters
enter through an embedding lookup in both). Each figure is the median of several rounds, and the
two models alternate round by round so that machine noise hits both alike.

    python benchmarks/train_throughput.py                      # 2x256, batch 32, T 100, CPU
    python benchmarks/train_throughput.py --layers 3 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
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
    vocab = int(targets.max()) + 1

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = forward(tokens)
        loss = F.cross_entropy(logits.float().reshape(-1, vocab), targets.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=100)
    parser.add_argument("--vocab", type=int, default=65)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per model (median reported)")
    parser.add_argument("--steps", type=int, default=3, help="training steps per round")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    B, T, V = args.batch_size, args.seq_len, args.vocab
    tokens = torch.randint(0, V, (B, T), device=device)
    targets = torch.randint(0, V, (B, T), device=device)

    ours = CharLSTM(ModelConfig(V, args.layers, args.hidden, dropout=0.0)).to(device)
    h, c = ours.init_state(B)
    baseline = TorchLSTMBaseline(V, args.layers, args.hidden).to(device)
    candidates = {
        "chargen peephole LSTM": train_step_fn(ours, lambda x: ours(x, h, c)[0], tokens, targets, device),
        "torch.nn.LSTM": train_step_fn(baseline, baseline, tokens, targets, device),
    }
    timings: dict[str, list[float]] = {name: [] for name in candidates}
    for step in candidates.values():  # warm-up: allocator, kernels, autotuning
        step()
    for _ in range(args.rounds):
        for name, step in candidates.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            timings[name].append((time.perf_counter() - start) / args.steps)

    chars = B * T
    print(
        f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"{args.layers}x{args.hidden}, batch {B}, T {T}, median of {args.rounds} rounds x {args.steps} steps"
    )
    rates = {name: chars / statistics.median(t) for name, t in timings.items()}
    for name, rate in rates.items():
        print(f"  {name:24s} {rate:10,.0f} chars/s")
    ratio = rates["chargen peephole LSTM"] / rates["torch.nn.LSTM"]
    print(f"  ratio ours / nn.LSTM     {ratio:10.2f}x")


if __name__ == "__main__":
    main()
