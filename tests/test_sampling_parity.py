"""One sampler everywhere (chargen/sampling.py): the penalty math on known logits, a seeded
stream's text alone and in a crowded engine with n, penalties and logprobs, and `chargen sample`
against the API."""

from __future__ import annotations

import asyncio
import math
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from chargen.sampling import Adjustment, BatchParams, Sampler, SamplingParams, sample_batch
from service.artifact import LoadedModel, load_model
from service.engine import Engine, GenerationRequest
from tests.service_support import ServerThread, generate
from tests.test_engine import with_engine

PROMPT = "ROMEO:\nthe night is "


def test_penalties_and_logit_bias_follow_openais_definition_on_known_logits() -> None:
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, logit_bias=((0, 1.5), (2, -100.0)))
    adjust = Adjustment(params, 4)
    for char_id in (3, 3, 1):  # generated so far: id 3 twice, id 1 once
        adjust.add(char_id)
    # logits[j] + bias[j] - count[j] * frequency - (count[j] > 0) * presence
    assert adjust.values == [1.5, -0.75, -100.0, -1.0]
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    adjusted = [2.5, 1.25, -97.0, 3.0]
    batch = BatchParams.of([params], 4, [adjust])
    # greedy takes the adjusted argmax (id 3 before: 4.0; now id 3 at 3.0 still leads id 0 at 2.5)
    greedy = BatchParams.of([SamplingParams(temperature=0, presence_penalty=0.5)], 4, [adjust])
    assert sample_batch(logits, greedy, [0.0]) == [3]
    # sampling inverts the CDF of softmax(adjusted): each draw lands where the exact CDF says
    weights = [math.exp(x) for x in adjusted]
    cdf = [sum(weights[: i + 1]) / sum(weights) for i in range(4)]
    for u in (0.0, cdf[0] - 1e-9, cdf[0] + 1e-9, cdf[1] + 1e-9, 0.999999):
        expected = next(i for i, edge in enumerate(cdf) if edge > u)
        assert sample_batch(logits, batch, [u]) == [expected]
    # a row without an adjustment, next to one with: its pick is exactly the one it makes alone
    crowd = BatchParams.of([SamplingParams(), params], 4, [None, adjust])
    alone = BatchParams.of([SamplingParams()], 4)
    for u in (0.1, 0.5, 0.9):
        assert sample_batch(logits.repeat(2, 1), crowd, [u, u])[0] == sample_batch(logits, alone, [u])[0]


def test_the_cli_sampler_draws_one_number_per_character_from_the_seed() -> None:
    sampler = Sampler(SamplingParams(temperature=1.0, seed=7), 5)
    logits = torch.tensor([0.0, 1.0, 2.0, 0.5, -1.0])
    draws = random.Random(7)
    probs = torch.softmax(logits.double(), 0).cumsum(0).tolist()
    for _ in range(20):
        u = draws.random()
        assert sampler.next(logits) == next(i for i, edge in enumerate(probs) if edge > u * probs[-1])


@pytest.fixture(scope="module")
def model(tiny_artifact: Path) -> LoadedModel:
    return load_model(tiny_artifact)


async def choices(engine: Engine, request: GenerationRequest) -> list[tuple[str, list[float]]]:
    """Each choice's text and its characters' log-probabilities."""
    first = engine.submit(request)

    async def read(handle: Any) -> tuple[str, list[float]]:
        parts = []
        while (piece := await handle.text.get()) is not None:
            parts.append(piece)
        await handle.finished
        text = "".join(parts)
        return text, [lp for lp, _ in handle.logprobs[: len(text)]]

    return list(await asyncio.gather(*(read(h) for h in [first, *first.siblings])))


def test_seeded_choices_with_penalties_and_logprobs_do_not_depend_on_the_other_streams(model: LoadedModel) -> None:
    params = SamplingParams(temperature=1.0, top_k=30, seed=99, presence_penalty=0.4, frequency_penalty=0.3)
    mine = GenerationRequest(model.encode(PROMPT), 150, params, n=3, logprobs=2)

    async def alone(engine: Engine) -> Any:
        return await choices(engine, mine)

    async def crowded(engine: Engine) -> Any:
        rng = random.Random(0)
        others = [
            choices(
                engine,
                GenerationRequest(
                    model.encode(rng.choice(["", "KING:", PROMPT * 3])),
                    rng.randint(1, 200),
                    SamplingParams(
                        temperature=rng.choice([0.0, 0.7, 1.3]),
                        seed=rng.choice([None, 5]),
                        frequency_penalty=rng.choice([0.0, 1.0]),
                        logit_bias=((1, rng.choice([0.0, 3.0])),),
                    ),
                    n=rng.randint(1, 3),
                    logprobs=rng.choice([None, 0, 5]),
                ),
            )
            for _ in range(10)
        ]
        results = await asyncio.gather(choices(engine, mine), *others)
        return results[0]

    expected = with_engine(model, alone)
    texts = [text for text, _ in expected]
    assert [len(t) for t in texts] == [150, 150, 150] and len(set(texts)) == 3
    assert with_engine(model, crowded) == expected
    assert with_engine(model, crowded, max_batch=4, decode_steps=1) == expected
    single = GenerationRequest(model.encode(PROMPT), 150, params)
    assert with_engine(model, lambda engine: choices(engine, single))[0][0] == texts[0]  # choice 0 is n=1's text


def test_chargen_sample_prints_what_the_api_returns_for_a_seed(tiny_artifact: Path) -> None:
    settings = dict(prompt="KING:\n", temperature=0.9, top_k=20, top_p=0.95, seed=31)
    command = [sys.executable, "-m", "chargen", "sample", str(tiny_artifact), "--length", "300"]
    command += ["--prompt", "KING:\n", "--temperature", "0.9", "--top-k", "20", "--top-p", "0.95", "--seed", "31"]
    cli = subprocess.run(command, capture_output=True, text=True, check=True, timeout=120).stdout
    with ServerThread(model=str(tiny_artifact)) as server, httpx.Client(timeout=60) as client:
        api = generate(client, server.url, max_new_chars=300, **settings)["text"]
    assert len(api) == 300
    assert cli == "KING:\n" + api + "\n"


def test_choices_not_yet_forked_end_with_their_first_when_it_is_cancelled(model: LoadedModel) -> None:
    async def scenario(engine: Engine) -> list[str]:
        first = engine.submit(GenerationRequest(model.encode(PROMPT * 20), 50, SamplingParams(seed=1), n=3))
        first.cancel()  # before its long prompt is read: no choice was forked yet
        results = await asyncio.gather(first.finished, *(h.finished for h in first.siblings))
        return [r.reason for r in results]

    assert with_engine(model, scenario, prefill_chunk=8) == ["cancelled", "cancelled", "cancelled"]


def test_every_choice_of_an_empty_request_is_answered(model: LoadedModel) -> None:
    async def scenario(engine: Engine) -> list[tuple[str, int]]:
        first = engine.submit(GenerationRequest([], 0, SamplingParams(), n=4))  # nothing to read or write
        results = await asyncio.gather(*(h.finished for h in [first, *first.siblings]))
        return [(r.reason, r.completion_chars) for r in results]

    assert with_engine(model, scenario) == [("length", 0)] * 4
