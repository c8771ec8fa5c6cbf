"""Using an exported artifact from the command line: load it, sample from it, score a text."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from chargen.artifact import ArtifactError, read_artifact
from chargen.sampling import Sampler, SamplingParams
from training.data import CorpusError, Vocab

__all__ = ["Artifact", "ArtifactError", "generate", "load_artifact", "score_text"]


@dataclass
class Artifact:
    module: torch.jit.ScriptModule
    meta: dict[str, Any]
    vocab: Vocab


def load_artifact(path: str) -> Artifact:
    """The artifact at ``path`` (read and checked by chargen.artifact); raises ArtifactError."""
    module, meta = read_artifact(path)
    return Artifact(module=module, meta=meta, vocab=Vocab(list(meta["vocab"])))


@torch.inference_mode()
def generate(
    artifact: Artifact,
    prompt: str,
    length: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
) -> Iterator[str]:
    """Yield `length` sampled characters, one at a time, after feeding the prompt.

    The service's sampler (chargen/sampling.py), one row: for the same model, prompt, settings
    and seed, `chargen sample` prints what the API returns.
    """
    model, vocab = artifact.module, artifact.vocab
    sampler = Sampler(SamplingParams(temperature, top_k, top_p, seed), len(vocab))
    h, c = model.init_state(1)
    if prompt:
        logits, h, c = model.forward(vocab.encode(prompt).unsqueeze(0), h, c)
        last = logits[0, -1]
    else:  # no context: start as if after a newline when there is one, else from zero state
        start = vocab.index.get("\n", 0)
        last, h, c = model.step(torch.tensor([start]), h, c)
        last = last[0]
    for _ in range(length):
        next_id = sampler.next(last)
        yield vocab.chars[next_id]
        logits, h, c = model.step(torch.tensor([next_id]), h, c)
        last = logits[0]


@torch.inference_mode()
def score_text(artifact: Artifact, text: str, seq_len: int = 256, streams: int = 64) -> tuple[float, int]:
    """(mean nats/char, characters scored) of predicting text[1:] from text[:-1], state carried."""
    ids = artifact.vocab.encode(text)  # raises CorpusError naming the unknown characters
    if len(ids) < 2:
        raise CorpusError("need at least 2 characters to score")
    model = artifact.module
    inputs, targets = ids[:-1], ids[1:]
    rows = max(1, min(streams, len(inputs) // seq_len))
    width = len(inputs) // rows
    x_rows, y_rows = inputs[: rows * width].view(rows, width), targets[: rows * width].view(rows, width)
    h, c = model.init_state(rows)
    total = 0.0
    for start in range(0, width, seq_len):
        logits, h, c = model.forward(x_rows[:, start : start + seq_len], h, c)
        y = y_rows[:, start : start + seq_len]
        total += float(F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))
    tail = inputs[rows * width :]
    if len(tail):
        logits, _, _ = model.forward(tail.unsqueeze(0), h[:, -1:], c[:, -1:])
        total += float(F.cross_entropy(logits[0], targets[rows * width :], reduction="sum"))
    return total / len(targets), len(targets)
