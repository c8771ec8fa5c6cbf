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
from bisect import bisect_right
from dataclasses import dataclass
from itertools import accumulate
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from chargen.artifact import jit_deprecation_accepted


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


class BatchParams(NamedTuple):
    """The parameters of the rows of one batch as tensors; reused while the batch is unchanged.

    A NamedTuple so that the TorchScript sampler (`sample_logits`, `StepSampler`) takes it whole.
    """

    temperature: Tensor  # float64 [B, 1], 1 where greedy
    greedy: Tensor  # bool [B]
    top_k: Tensor  # int64 [B, 1], V where unlimited
    top_p: Tensor  # float64 [B, 1], 1 where unlimited
    cut: Tensor  # bool [B]: the row keeps only part of the distribution (top_k or top_p)
    all_greedy: bool
    any_greedy: bool
    all_cut: bool
    any_cut: bool
    any_top_p: bool

    @classmethod
    def of(cls, params: list[SamplingParams], vocab_size: int) -> BatchParams:
        greedy = [p.greedy for p in params]
        top_k = [p.top_k if p.top_k and p.top_k < vocab_size else vocab_size for p in params]
        top_p = [p.top_p if p.top_p is not None else 1.0 for p in params]
        cut = [k < vocab_size or q < 1.0 for k, q in zip(top_k, top_p, strict=True)]
        return cls(
            temperature=torch.tensor(
                [[1.0 if g else p.temperature] for g, p in zip(greedy, params, strict=True)], dtype=torch.float64
            ),
            greedy=torch.tensor(greedy),
            top_k=torch.tensor([[k] for k in top_k], dtype=torch.int64),  # built [B, 1]: an unsqueeze gives up the GIL
            top_p=torch.tensor([[q] for q in top_p], dtype=torch.float64),
            cut=torch.tensor(cut),
            all_greedy=all(greedy),
            any_greedy=any(greedy),
            all_cut=all(cut),
            any_cut=any(cut),
            any_top_p=any(q < 1.0 for q in top_p),
        )


def sample_logits(logits: Tensor, params: BatchParams, u: Tensor) -> Tensor:
    """logits [B, V] -> one character id per row [B] (TorchScript-compatible: see `StepSampler`).

    u [B] in [0, 1) holds each row's random draw (ignored for greedy rows). Greedy takes the first
    maximum, like argmax. Sampling scales by 1/temperature and inverts the CDF with the row's draw:
    over the vocabulary in its own order when the row keeps the whole distribution (no sort: the
    common case costs a handful of vectorised ops), and over the sorted distribution when it has a
    cut: keep the top_k largest, then the smallest prefix whose mass reaches top_p. Which of the
    two a row takes depends only on its own parameters, never on the other rows.
    """
    if params.all_greedy:
        return torch.argmax(logits, dim=1)
    x = logits.to(torch.float64) / params.temperature
    u = u.to(torch.float64).unsqueeze(1)
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


def gather(sources: list[Tensor], runs: list[tuple[int, int, int]]) -> Tensor:
    """A batch's state from slices of earlier tensors: run (k, start, end) is
    ``sources[k][:, start:end]``; a single run that covers its whole source is that tensor itself."""
    if len(runs) == 1:
        k, start, end = runs[0]
        if start == 0 and end == sources[k].shape[1]:
            return sources[k]
    return torch.cat([sources[k][:, start:end] for k, start, end in runs], dim=1)


class StepSampler(nn.Module):
    """Everything a tick does with tensors, in ONE TorchScript call: gathering the batch's state,
    the artifact's ``step`` and every row's sampling, K steps.

    Each eager torch op gives up the GIL and must take it back; while the event loop is busy
    (admitting 64 requests, say) each op on the engine's thread then waits up to a switch interval
    for it: measured, a burst's engine went 12 ms without a tick. Scripted, a tick gives up the
    GIL once. With K > 1 (small batches, see the engine) each step's picks are fed to the next one,
    so the engine's Python runs once per K characters.

    The state is given as source tensors and runs of rows in them (`gather`). u [K, rows] holds
    each row's draw for each step. Only the first ``rows`` rows are sampled; the rest pad the step
    (each step feeds them their token in ``tokens`` again). Returns the picks [K, rows] and the
    state after each step, K tensors h and K tensors c [layers, batch, hidden]. Step k is exactly
    one call of `step` and `sample_logits`, so a row's text does not depend on K.
    """

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        tokens: Tensor,
        sources_h: list[Tensor],
        sources_c: list[Tensor],
        runs: list[tuple[int, int, int]],
        params: BatchParams,
        u: Tensor,
        rows: int,
    ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        h = gather(sources_h, runs)
        c = gather(sources_c, runs)
        picks: list[Tensor] = []
        hs: list[Tensor] = []
        cs: list[Tensor] = []
        padding = tokens[rows:]
        for k in range(u.shape[0]):
            logits, h, c = self.model.step(tokens, h, c)
            picked = sample_logits(logits[:rows], params, u[k])
            picks.append(picked)
            hs.append(h)
            cs.append(c)
            tokens = torch.cat([picked, padding])
        return torch.stack(picks), hs, cs

    @torch.jit.export
    def step(
        self, tokens: Tensor, sources_h: list[Tensor], sources_c: list[Tensor], runs: list[tuple[int, int, int]]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The artifact's ``step`` on a gathered state, without sampling (logits [B, V], h, c)."""
        return self.model.step(tokens, gather(sources_h, runs), gather(sources_c, runs))

    @torch.jit.export
    def prefill(self, tokens: Tensor, h: Tensor, c: Tensor, row: int) -> tuple[Tensor, Tensor]:
        """The artifact's ``forward`` over tokens [1, T] from row ``row`` of (h, c): the new h, c."""
        _, h2, c2 = self.model.forward(tokens, h[:, row : row + 1], c[:, row : row + 1])
        return h2, c2


def _script(obj: Any) -> Any:
    with jit_deprecation_accepted():  # the artifact is TorchScript, so its sampler is too
        return torch.jit.script(obj)


_sample_logits_scripted = _script(sample_logits)


def step_sampler(model: Any) -> nn.Module:
    """`StepSampler` for a loaded artifact, compiled; for any other module with ``step``, eager."""
    sampler = StepSampler(model)
    return _script(sampler) if isinstance(model, torch.jit.ScriptModule) else sampler


def sample_batch(logits: Tensor, params: BatchParams, uniforms: list[float]) -> list[int]:
    """`sample_logits` from Python: one character id per row, from each row's draw in `uniforms`."""
    return _sample_logits_scripted(logits, params, torch.tensor(uniforms, dtype=torch.float64)).tolist()


def sample_row(logits: list[float], params: SamplingParams, u: float) -> int:
    """One unseeded, non-greedy row in plain Python: the same distribution as `sample_batch`.

    For steps of a few unseeded rows, where torch's per-op overhead (~6 ops, ~50 µs) would cost
    a lone stream a sixth of its model step. Its sums round differently from `sample_batch`'s, so
    a draw near a boundary can land on the neighbouring character: it must never serve a seeded
    row, whose text has to be the same in any batch.
    """
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
