"""Batched per-row sampling: each row's pick depends only on its own logits, parameters and draw."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from service.sampling import BatchParams, SamplingParams, sample_batch, sample_row

V = 65

params_strategy = st.builds(
    SamplingParams,
    temperature=st.sampled_from([0.0, 0.3, 1.0, 2.0]),
    top_k=st.sampled_from([None, 0, 1, 5, 100]),
    top_p=st.sampled_from([None, 0.01, 0.5, 0.9, 1.0]),
)


def logits_of(seed: int, rows: int) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 3


@settings(max_examples=150, deadline=None)
@given(
    st.integers(0, 10_000),
    params_strategy,
    st.floats(0, 0.999999),
    st.integers(0, 40),
    st.lists(params_strategy, min_size=40, max_size=40),
)
def test_a_rows_pick_is_the_same_alone_and_in_any_batch(
    seed: int, mine: SamplingParams, u: float, pos: int, others: list[SamplingParams]
) -> None:
    row = logits_of(seed, 1)
    alone = sample_batch(row, BatchParams.of([mine], V), [u])[0]
    crowd = logits_of(seed + 1, 41)
    crowd[pos] = row[0]
    params = [*others[:pos], mine, *others[pos:]]
    uniforms = [0.5] * 41
    uniforms[pos] = u
    assert sample_batch(crowd, BatchParams.of(params, V), uniforms)[pos] == alone


def test_greedy_top_k_1_and_tiny_top_p_all_take_the_argmax() -> None:
    logits = logits_of(0, 8)
    argmax = torch.argmax(logits, dim=1).tolist()
    for p in (SamplingParams(temperature=0), SamplingParams(top_k=1), SamplingParams(top_p=1e-9)):
        assert sample_batch(logits, BatchParams.of([p] * 8, V), [0.7] * 8) == argmax


def test_mixed_batch_greedy_rows_ignore_their_draw() -> None:
    logits = logits_of(1, 2)
    params = BatchParams.of([SamplingParams(temperature=0), SamplingParams(temperature=1)], V)
    a = sample_batch(logits, params, [0.0, 0.3])
    b = sample_batch(logits, params, [0.99, 0.3])
    assert a == b and a[0] == int(torch.argmax(logits[0]))


def test_sampling_follows_the_softmax_and_respects_top_k() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0] + [-30.0] * (V - 4)])
    probs = torch.softmax(logits[0, :4].double(), 0)
    counts = [0] * V
    n = 4000
    for i in range(n):
        counts[sample_batch(logits, BatchParams.of([SamplingParams()], V), [(i + 0.5) / n])[0]] += 1
    for k in range(4):  # stratified draws: frequencies match the probabilities closely
        assert math.isclose(counts[k] / n, float(probs[k]), abs_tol=0.002)
    counts = [0] * V
    for i in range(1000):
        counts[sample_batch(logits, BatchParams.of([SamplingParams(top_k=2)], V), [(i + 0.5) / 1000])[0]] += 1
    assert counts[0] + counts[1] == 1000


def test_top_p_keeps_the_smallest_prefix_reaching_the_mass() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05] + [1e-12] * (V - 4)]))
    seen = {sample_batch(logits, BatchParams.of([SamplingParams(top_p=0.8)], V), [i / 200])[0] for i in range(200)}
    assert seen == {0, 1}


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), params_strategy)
def test_the_plain_python_row_sampler_draws_from_the_same_distribution(seed: int, p: SamplingParams) -> None:
    """`sample_row` (lone unseeded rows) and `sample_batch` give each character the same mass."""
    if p.greedy or p.top_k == 1:
        return  # reproducible rows never take the plain Python path
    logits = logits_of(seed, 1)
    n = 2000
    grid = [(i + 0.5) / n for i in range(n)]  # stratified draws: frequencies = probabilities
    batch = sample_batch(logits.repeat(n, 1), BatchParams.of([p] * n, V), grid)
    row = [sample_row(logits[0].tolist(), p, u) for u in grid]
    for char in set(batch) | set(row):
        assert abs(batch.count(char) - row.count(char)) <= 2, char
