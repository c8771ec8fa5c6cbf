"""Batched sampling: one next character per row, each row with its own parameters and seed.

Every operation here is row-wise (sort, softmax, cumsum along the vocabulary), so a row's choice
depends only on its own logits, parameters and random number, never on the other rows of the
batch. Each row draws exactly one uniform number per sampled character from its own PRNG, so a
seeded request gives the same text whatever else shares its batches.
"""

from __future__ import annotations

import math
import random
import secrets
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None  # None or 0: no limit
    top_p: float | None = None  # None or 1: no nucleus cut
    seed: int | None = None  # None: a fresh random seed per request

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def rng(self) -> random.Random:
        # A per-row Mersenne Twister: reproducible for a seed, and far cheaper per draw than a
        # torch.Generator (one draw per row per engine tick).
        return random.Random(self.seed if self.seed is not None else secrets.randbits(64))


@dataclass
class BatchParams:
    """The parameters of the rows of one batch as tensors; reused while the batch is unchanged."""

    temperature: Tensor  # float64 [B], 1 where greedy
    greedy: Tensor  # bool [B]
    top_k: Tensor  # int64 [B], V where unlimited
    top_p: Tensor  # float64 [B], 1 where unlimited
    all_greedy: bool
    any_top_p: bool

    @classmethod
    def of(cls, params: list[SamplingParams], vocab_size: int) -> BatchParams:
        greedy = [p.greedy for p in params]
        top_p = [p.top_p if p.top_p is not None else 1.0 for p in params]
        return cls(
            temperature=torch.tensor(
                [1.0 if g else p.temperature for g, p in zip(greedy, params, strict=True)], dtype=torch.float64
            ),
            greedy=torch.tensor(greedy),
            top_k=torch.tensor([p.top_k if p.top_k else vocab_size for p in params], dtype=torch.int64),
            top_p=torch.tensor(top_p, dtype=torch.float64),
            all_greedy=all(greedy),
            any_top_p=any(p < 1.0 for p in top_p),
        )


def sample_batch(logits: Tensor, params: BatchParams, uniforms: list[float]) -> list[int]:
    """logits [B, V] -> one character id per row.

    uniforms[i] in [0, 1) is row i's random draw (ignored for greedy rows). Greedy takes the first
    maximum, like argmax. Sampling: scale by 1/temperature, keep the top_k largest, keep the
    smallest prefix of the sorted distribution whose mass reaches top_p, then invert the CDF.
    """
    if params.all_greedy:
        return torch.argmax(logits, dim=1).tolist()
    x = logits.to(torch.float64)
    sorted_logits, order = torch.sort(x, dim=1, descending=True, stable=True)
    vocab = x.shape[1]
    ranks = torch.arange(vocab).unsqueeze(0)
    scaled = sorted_logits / params.temperature.unsqueeze(1)
    scaled = scaled.masked_fill(ranks >= params.top_k.unsqueeze(1), -math.inf)
    probs = torch.softmax(scaled, dim=1)
    if params.any_top_p:
        mass_before = probs.cumsum(dim=1) - probs
        keep = (mass_before < params.top_p.unsqueeze(1)) | (params.top_p.unsqueeze(1) >= 1.0)
        probs = probs * keep
    cdf = probs.cumsum(dim=1)
    target = torch.tensor(uniforms, dtype=torch.float64) * cdf[:, -1]
    pos = torch.searchsorted(cdf, target.unsqueeze(1), right=True).clamp_(max=vocab - 1)
    picked = order.gather(1, pos).squeeze(1)
    picked = torch.where(params.greedy, order[:, 0], picked)
    return picked.tolist()


def sample_row(logits: list[float], params: SamplingParams, u: float) -> int:
    """One unseeded, non-greedy row in plain Python: the same distribution as `sample_batch`.

    For steps of a few unseeded rows, where torch's per-op overhead (~10 ops, ~80 µs) would cost
    a lone stream a quarter of its model step. The draw maps to a character differently from
    `sample_batch` (no sort without a cut), so it must never serve a seeded row: seeded text has
    to be the same in any batch.
    """
    temperature = params.temperature
    cut_k = params.top_k and params.top_k < len(logits)
    cut_p = params.top_p is not None and params.top_p < 1.0
    if cut_k or cut_p:
        order = sorted(range(len(logits)), key=logits.__getitem__, reverse=True)
        if cut_k:
            order = order[: params.top_k]
    else:
        order = range(len(logits))  # type: ignore[assignment]
    top = max(logits)
    weights = [math.exp((logits[i] - top) / temperature) for i in order]
    if cut_p:
        limit = params.top_p * sum(weights)  # type: ignore[operator]
        mass, kept = 0.0, 0
        for w in weights:  # the smallest prefix whose mass reaches top_p
            if mass >= limit:
                break
            mass += w
            kept += 1
        weights = weights[:kept]
    target = u * sum(weights)
    acc = 0.0
    for i, w in zip(order, weights, strict=False):  # weights may be a prefix of order
        acc += w
        if acc > target:
            return i
    return order[len(weights) - 1]
