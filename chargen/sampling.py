"""The one sampler: `chargen sample`, the service's routes and the engine's batched steps all pick
characters here (it needs only torch, so both halves import it).

A row is one stream of text with its own parameters and PRNG. Every operation is row-wise (sort,
softmax, cumsum along the vocabulary), so a row's choice depends only on its own logits,
parameters, adjustment and random number, never on the other rows of a batch. Each row draws
exactly one uniform number per sampled character (none when greedy) from its own PRNG, so a seeded
stream gives the same text alone (the CLI), in any batch (the engine) and for every choice of ``n``.

Order of operations, per row: logits + adjustment (logit_bias and OpenAI's presence/frequency
penalties), then greedy (argmax) or 1/temperature, top_k, top_p and inversion of the CDF with the
row's draw. Log-probabilities reported to clients are the model's own (`log_softmax` of the raw
logits), before any of this, as OpenAI documents.
"""

from __future__ import annotations

import functools
import math
import random
import secrets
from bisect import bisect_right
from dataclasses import dataclass
from itertools import accumulate
from typing import Any, NamedTuple

import torch
from torch import Tensor

from chargen.artifact import jit_deprecation_accepted


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None  # None or 0: no limit
    top_p: float | None = None  # None or 1: no nucleus cut
    seed: int | None = None  # None: a fresh random seed per request
    presence_penalty: float = 0.0  # subtracted once from each character generated at least once
    frequency_penalty: float = 0.0  # subtracted per time a character was generated
    logit_bias: tuple[tuple[int, float], ...] = ()  # (character id, added to its logit)
    choice: int = 0  # which of a request's n choices: each has its own stream of draws

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        """Its adjustment changes with every character it generates."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0

    @property
    def adjusted(self) -> bool:
        return self.penalized or any(bias != 0 for _, bias in self.logit_bias)

    def rng(self) -> random.Random:
        # A per-row Mersenne Twister: reproducible for a seed, and far cheaper per draw than a
        # torch.Generator (one draw per row per engine tick). Choice 0 is the seed itself (n=1 and
        # the CLI give the same text); choice i > 0 a stream of its own, derived from the seed.
        if self.seed is None:
            return random.Random(secrets.randbits(64))
        return random.Random(self.seed if self.choice == 0 else f"{self.seed}/choice/{self.choice}")


class Adjustment:
    """What a row adds to its logits before sampling: logit_bias, and OpenAI's penalties over the
    characters the row generated so far::

        logits[j] += bias[j] - count[j] * frequency_penalty - (count[j] > 0) * presence_penalty

    Kept as a Python list and updated per character (`add`), so the engine builds the batch's
    adjustment tensor with one ``torch.tensor`` call (see `BatchParams.of`).
    """

    __slots__ = ("counts", "frequency", "presence", "values")

    def __init__(self, params: SamplingParams, vocab_size: int) -> None:
        self.values = [0.0] * vocab_size
        for char_id, bias in params.logit_bias:
            self.values[char_id] += bias
        self.counts = [0] * vocab_size
        self.presence = params.presence_penalty
        self.frequency = params.frequency_penalty

    def add(self, char_id: int) -> None:
        """One more generated character."""
        first = self.counts[char_id] == 0
        self.counts[char_id] += 1
        self.values[char_id] -= self.frequency + (self.presence if first else 0.0)


class BatchParams(NamedTuple):
    """The parameters of the rows of one batch as tensors; reused while the batch is unchanged.

    A NamedTuple so that the TorchScript sampler (`sample_logits`, the engine's StepSampler) takes it whole.
    """

    temperature: Tensor  # float64 [B, 1], 1 where greedy
    greedy: Tensor  # bool [B]
    top_k: Tensor  # int64 [B, 1], V where unlimited
    top_p: Tensor  # float64 [B, 1], 1 where unlimited
    cut: Tensor  # bool [B]: the row keeps only part of the distribution (top_k or top_p)
    adjust: Tensor  # float64 [B, V] added to the logits (zeros for rows without); [0] when no row has one
    all_greedy: bool
    any_greedy: bool
    all_cut: bool
    any_cut: bool
    any_top_p: bool
    any_adjust: bool

    @classmethod
    def of(
        cls, params: list[SamplingParams], vocab_size: int, adjust: list[Adjustment | None] | None = None
    ) -> BatchParams:
        greedy = [p.greedy for p in params]
        top_k = [p.top_k if p.top_k and p.top_k < vocab_size else vocab_size for p in params]
        top_p = [p.top_p if p.top_p is not None else 1.0 for p in params]
        cut = [k < vocab_size or q < 1.0 for k, q in zip(top_k, top_p, strict=True)]
        zeros = [0.0] * vocab_size
        any_adjust = adjust is not None and any(a is not None for a in adjust)
        return cls(
            temperature=torch.tensor(
                [[1.0 if g else p.temperature] for g, p in zip(greedy, params, strict=True)], dtype=torch.float64
            ),
            greedy=torch.tensor(greedy),
            top_k=torch.tensor([[k] for k in top_k], dtype=torch.int64),  # built [B, 1]: an unsqueeze gives up the GIL
            top_p=torch.tensor([[q] for q in top_p], dtype=torch.float64),
            cut=torch.tensor(cut),
            adjust=torch.tensor([zeros if a is None else a.values for a in adjust], dtype=torch.float64)
            if any_adjust and adjust is not None
            else torch.tensor([], dtype=torch.float64),  # torch.tensor keeps the GIL (see StepSampler)
            all_greedy=all(greedy),
            any_greedy=any(greedy),
            all_cut=all(cut),
            any_cut=any(cut),
            any_top_p=any(q < 1.0 for q in top_p),
            any_adjust=any_adjust,
        )


def sample_logits(logits: Tensor, params: BatchParams, u: Tensor) -> Tensor:
    """logits [B, V] -> one character id per row [B] (TorchScript-compatible: the engine scripts it).

    u [B] in [0, 1) holds each row's random draw (ignored for greedy rows). The adjustment (if any
    row has one) is added first. Greedy takes the first maximum, like argmax. Sampling scales by
    1/temperature and inverts the CDF with the row's draw: over the vocabulary in its own order when
    the row keeps the whole distribution (no sort: the common case costs a handful of vectorised
    ops), and over the sorted distribution when it has a cut: keep the top_k largest, then the
    smallest prefix whose mass reaches top_p. Which of the two a row takes depends only on its own
    parameters, never on the other rows.
    """
    return sample_with_draws(logits, params, u.to(torch.float64).unsqueeze(1))


def sample_with_draws(logits: Tensor, params: BatchParams, u: Tensor) -> Tensor:
    """`sample_logits` with the draws already float64 [B, 1]: the engine shapes a tick's draws once,
    not once per step (each torch op costs a few µs in a step of about a millisecond)."""
    if params.any_adjust:  # float64 sums: a row whose adjustment is zero keeps its exact logits
        logits = logits.to(torch.float64) + params.adjust
    if params.all_greedy:
        return torch.argmax(logits, dim=1)
    x = logits.to(torch.float64) / params.temperature
    if params.all_cut:
        picked = sample_sorted(x, params, u)
    else:
        picked = invert_cdf(torch.softmax(x, dim=1), u)
        if params.any_cut:
            picked = torch.where(params.cut, sample_sorted(x, params, u), picked)
    if params.any_greedy:
        picked = torch.where(params.greedy, torch.argmax(logits, dim=1), picked)
    return picked


def invert_cdf(probs: Tensor, u: Tensor) -> Tensor:
    """The first index whose cumulative mass exceeds u times the total mass, per row."""
    cdf = probs.cumsum(dim=1)
    pos = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    return pos.clamp_(max=probs.shape[1] - 1).squeeze(1)


def sample_sorted(x: Tensor, params: BatchParams, u: Tensor) -> Tensor:
    """The rows with a cut: top_k, then top_p, over the distribution sorted from most likely down."""
    sorted_x, order = torch.sort(x, dim=1, descending=True, stable=True)
    ranks = torch.arange(x.shape[1]).unsqueeze(0)
    probs = torch.softmax(sorted_x.masked_fill(ranks >= params.top_k, -math.inf), dim=1)
    if params.any_top_p:
        mass_before = probs.cumsum(dim=1) - probs
        probs = probs * ((mass_before < params.top_p) | (params.top_p >= 1.0))
    return order.gather(1, invert_cdf(probs, u).unsqueeze(1)).squeeze(1)


def script(obj: Any) -> Any:
    with jit_deprecation_accepted():  # the artifact is TorchScript, so its sampler is too
        return torch.jit.script(obj)


@functools.cache
def scripted_sample_logits() -> Any:
    """`sample_logits` compiled (once per process, on first use)."""
    return script(sample_logits)


def sample_batch(logits: Tensor, params: BatchParams, uniforms: list[float]) -> list[int]:
    """`sample_logits` from Python: one character id per row, from each row's draw in `uniforms`.

    The scripted function the engine runs, so a lone stream here picks what it picks there.
    """
    return scripted_sample_logits()(logits, params, torch.tensor(uniforms, dtype=torch.float64)).tolist()


def sample_row(logits: list[float], params: SamplingParams, u: float, adjust: Adjustment | None = None) -> int:
    """One unseeded, non-greedy row in plain Python: the same distribution as `sample_batch`.

    For steps of a few unseeded rows, where torch's per-op overhead (~6 ops, ~50 µs) would cost
    a lone stream a sixth of its model step. Its sums round differently from `sample_batch`'s, so
    a draw near a boundary can land on the neighbouring character: it must never serve a seeded
    row, whose text has to be the same in any batch.
    """
    if adjust is not None:
        logits = [x + a for x, a in zip(logits, adjust.values, strict=True)]
    temperature = params.temperature
    cut_k = params.top_k and params.top_k < len(logits)
    cut_p = params.top_p is not None and params.top_p < 1.0
    if cut_k or cut_p:
        order = sorted(range(len(logits)), key=logits.__getitem__, reverse=True)
        if cut_k:
            order = order[: params.top_k]
        values = [logits[i] for i in order]
    else:
        order = range(len(logits))  # type: ignore[assignment]
        values = logits
    scale = 1.0 / temperature
    shift = max(logits) * scale  # exp(x/T - max/T): the largest weight is 1, none overflows
    exp = math.exp
    weights = [exp(x * scale - shift) for x in values]
    if cut_p:
        limit = params.top_p * sum(weights)  # type: ignore[operator]
        mass, kept = 0.0, 0
        for w in weights:  # the smallest prefix whose mass reaches top_p
            if mass >= limit:
                break
            mass += w
            kept += 1
        weights = weights[:kept]
    cdf = list(accumulate(weights))  # weights may be a prefix of order
    return order[min(bisect_right(cdf, u * cdf[-1]), len(cdf) - 1)]


class Sampler:
    """One stream sampled one character at a time (the CLI): the engine's rows do exactly this,
    batched. ``next(logits)`` with logits [V] -> the character id."""

    def __init__(self, params: SamplingParams, vocab_size: int) -> None:
        self.params = params
        self.vocab_size = vocab_size
        self.rng = params.rng()
        self.adjust = Adjustment(params, vocab_size) if params.adjusted else None
        self._batch = BatchParams.of([params], vocab_size)

    def next(self, logits: Tensor) -> int:
        u = 0.0 if self.params.greedy else self.rng.random()  # greedy draws none, as in the engine
        batch = self._batch if self.adjust is None else BatchParams.of([self.params], self.vocab_size, [self.adjust])
        picked = sample_batch(logits.reshape(1, -1), batch, [u])[0]
        if self.adjust is not None:
            self.adjust.add(picked)
        return picked
