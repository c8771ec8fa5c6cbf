"""The batching engine with the real tiny artifact: batched steps, per-row sampling, sessions' state."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch

from service.artifact import LoadedModel, load_model
from service.engine import Engine, EngineConfig, EngineFull, EngineStopped, Finished, GenerationRequest
from service.engine.calibration import find_step_min_rows
from service.metrics import Metrics
from service.sampling import BatchParams, SamplingParams, sample_batch, step_sampler
from service.state_codec import decode_state

T = TypeVar("T")
PROMPT = "ROMEO:\nthe night is "


@pytest.fixture(scope="module")
def model(tiny_artifact: Path) -> LoadedModel:
    return load_model(tiny_artifact)


def with_engine(
    model: LoadedModel, scenario: Callable[[Engine], Awaitable[T]], metrics: Metrics | None = None, **options: Any
) -> T:
    async def main() -> T:
        engine = Engine(model, metrics or Metrics(), **options)
        engine.start(asyncio.get_running_loop())
        try:
            return await scenario(engine)
        finally:
            await asyncio.to_thread(engine.stop)

    return asyncio.run(main())


async def collect(engine: Engine, request: GenerationRequest, ack: bool = False) -> tuple[str, Finished]:
    handle = engine.submit(request)
    parts = []
    while (piece := await handle.text.get()) is not None:
        parts.append(piece)
        if ack:
            handle.ack(len(piece))
    return "".join(parts), await handle.finished


def req(model: LoadedModel, prompt: str = PROMPT, n: int = 100, **kw: Any) -> GenerationRequest:
    stop = tuple(kw.pop("stop", ()))
    state = kw.pop("state", None)
    want_state = kw.pop("want_state", True)
    return GenerationRequest(model.encode(prompt), n, SamplingParams(**kw), stop, state, want_state=want_state)


def decode(model: LoadedModel, blob: bytes | None):  # type: ignore[no-untyped-def]
    assert blob is not None
    return decode_state(blob, model.fingerprint, model.layers, model.hidden, len(model.vocab))


def test_batched_step_matches_single_row_steps(model: LoadedModel) -> None:
    m = model.module
    gen = torch.Generator().manual_seed(3)
    rows = 9
    h = torch.randn(model.layers, rows, model.hidden, generator=gen)
    c = torch.randn(model.layers, rows, model.hidden, generator=gen)
    tokens = torch.randint(0, len(model.vocab), (rows,), generator=gen)
    with torch.inference_mode():
        logits, h2, _c2 = m.step(tokens, h, c)
        for i in range(rows):
            li, hi, _ci = m.step(tokens[i : i + 1], h[:, i : i + 1].contiguous(), c[:, i : i + 1].contiguous())
            torch.testing.assert_close(li[0], logits[i], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(hi[:, 0], h2[:, i], rtol=1e-5, atol=1e-5)
    # from some size on the results are bit-identical whatever the batch (see engine docstring)
    smallest = find_step_min_rows(model, 64)
    assert smallest is not None and 1 <= smallest <= 64


def test_seeded_text_does_not_depend_on_the_other_streams(model: LoadedModel) -> None:
    target = dict(temperature=1.0, top_k=20, top_p=0.95, seed=1234)

    async def alone(engine: Engine) -> str:
        return (await collect(engine, req(model, n=300, **target)))[0]

    async def crowded(engine: Engine) -> str:
        rng = random.Random(0)
        others = [
            collect(
                engine,
                req(
                    model,
                    prompt=rng.choice(["", "KING:", PROMPT * 3]),
                    n=rng.randint(1, 400),
                    temperature=rng.choice([0.0, 0.5, 1.5]),
                    seed=rng.randint(0, 99),
                ),
            )
            for _ in range(12)
        ]
        mine = collect(engine, req(model, n=300, **target))
        late = [asyncio.sleep(0.001 * i) for i in range(3)]
        results = await asyncio.gather(mine, *others, *late)
        return results[0][0]  # type: ignore[no-any-return]

    expected = with_engine(model, alone)
    assert len(expected) == 300
    assert with_engine(model, crowded) == expected
    assert with_engine(model, crowded, max_batch=3) == expected  # rows rotate through small batches
    assert with_engine(model, crowded, prefill_chunk=5) == expected


def test_the_scripted_step_sampler_is_the_step_then_the_sampler(model: LoadedModel) -> None:
    """The engine's one call per tick gives the states of `step` and the picks of `sample_batch`,
    each step's picks fed to the next (padding rows fed their token again), for one step or several;
    its `step` and `prefill` are the artifact's `step` and `forward` on the same gathered state."""
    sampler = step_sampler(model.module)
    assert isinstance(sampler, torch.jit.ScriptModule)  # compiled: the GIL is given up once
    gen = torch.Generator().manual_seed(5)
    rows, pad, steps = 9, 3, 3
    with torch.inference_mode():
        h = torch.randn(model.layers, rows + pad, model.hidden, generator=gen) * 0.5
        c = torch.randn(model.layers, rows + pad, model.hidden, generator=gen)
        tokens = torch.randint(0, len(model.vocab), (rows + pad,), generator=gen)
        mixed = [
            SamplingParams(),
            SamplingParams(temperature=0),
            SamplingParams(temperature=0.5, top_k=3),
            SamplingParams(top_p=0.8),
            SamplingParams(temperature=2.0, seed=1),
            SamplingParams(top_k=1),
            SamplingParams(temperature=0.7, top_k=10, top_p=0.9),
            SamplingParams(temperature=1.3),
            SamplingParams(temperature=0),
        ]
        params = BatchParams.of(mixed, len(model.vocab))
        draws = [[random.Random(k * rows + i).random() for i in range(rows)] for k in range(steps)]
        # the state given in two pieces, as the engine does when a batch changed
        sources_h, sources_c = [h[:, :4], h[:, 4:]], [c[:, :4], c[:, 4:]]
        runs = [(0, 0, 4), (1, 0, rows + pad - 4)]
        *one_step, _ = sampler.step(tokens, sources_h, sources_c, runs)
        reference = model.module.step(tokens, h, c)
        assert all(torch.equal(a, b) for a, b in zip(one_step, reference, strict=True))
        prompt = tokens[:5].unsqueeze(0)
        _, h_ref, c_ref = model.module.forward(prompt, h[:, 2:3], c[:, 2:3])
        h_pre, c_pre, _ = sampler.prefill(prompt, h, c, 2)
        assert torch.equal(h_pre, h_ref) and torch.equal(c_pre, c_ref)
        u = torch.tensor(draws, dtype=torch.float64)
        picked, hs, cs, _ = sampler(tokens, sources_h, sources_c, runs, params, u, rows)
        padding = tokens[rows:].tolist()
        assert picked.shape == (steps, rows) and len(hs) == len(cs) == steps
        for k in range(steps):
            logits, h, c = model.module.step(tokens, h, c)
            assert torch.equal(hs[k], h) and torch.equal(cs[k], c)
            expected = sample_batch(logits[:rows], params, draws[k])
            assert picked[k].tolist() == expected
            tokens = torch.tensor(expected + padding)


def test_every_scripted_call_hands_back_the_tensors_it_was_given(model: LoadedModel) -> None:
    """Python holds the engine's input tensors, so the last C++ reference to one must take the GIL
    to let go of its Python object: inside the call, with the GIL given up, that waited behind the
    event loop once per input. Each call hands its inputs back (the very objects), so those last
    references go after the call, with the GIL taken back once."""
    sampler = step_sampler(model.module)
    rows = 3
    h, c = (torch.zeros(model.layers, rows, model.hidden) for _ in range(2))
    sources_h, sources_c, runs = [h[:, :1], h[:, 1:]], [c[:, :1], c[:, 1:]], [(0, 0, 1), (1, 0, rows - 1)]
    tokens = torch.tensor([1, 2, 3])
    params = BatchParams.of([SamplingParams()] * rows, len(model.vocab))
    u = torch.full((2, rows), 0.5, dtype=torch.float64)
    param_tensors = [t for t in params if isinstance(t, torch.Tensor)]
    prompt, targets = torch.tensor([[4, 5]]), torch.tensor([5, 6])
    calls = {
        "forward": (sampler(tokens, sources_h, sources_c, runs, params, u, rows), [tokens, u, *param_tensors]),
        "decode_scored": (
            sampler.decode_scored(tokens, sources_h, sources_c, runs, params, u, rows, 2),
            [tokens, u, *param_tensors],
        ),
        "step": (sampler.step(tokens, sources_h, sources_c, runs), [tokens]),
        "prefill": (sampler.prefill(prompt, h, c, 1), [prompt, h, c]),
        "prefill_scored": (sampler.prefill_scored(prompt, h, c, 1, targets, 2), [prompt, h, c, targets]),
    }
    for name, (result, given) in calls.items():
        if name in ("forward", "decode_scored", "step"):
            given = given + sources_h + sources_c
        held = result[-1]
        assert [id(t) for t in held] == [id(t) for t in given], name


class RowCounter:
    """The artifact's module, recording the rows of every `step`."""

    def __init__(self, module: Any) -> None:
        self.module = module
        self.rows: list[int] = []

    def step(self, tokens: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> Any:
        self.rows.append(int(tokens.shape[0]))
        return self.module.step(tokens, h, c)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.module, name)


def test_only_steps_with_a_reproducible_row_are_padded(model: LoadedModel) -> None:
    counted = dataclasses.replace(model, module=RowCounter(model.module))
    counter = counted.module

    async def lone(engine: Engine, **params: Any) -> list[int]:
        counter.rows.clear()
        await collect(engine, req(model, n=20, **params))
        return list(counter.rows)

    async def scenario(engine: Engine) -> None:
        assert set(await lone(engine, temperature=1.0)) == {1}  # unseeded sampling: the 1-row price
        assert set(await lone(engine, temperature=1.0, seed=3)) == {4}
        assert set(await lone(engine, temperature=0)) == {4}
        assert set(await lone(engine, temperature=1.0, top_k=1)) == {4}

    with_engine(counted, scenario, step_min_rows=4)


class SmallBatchKernel(RowCounter):
    """The artifact's module with a kernel of its own below `below` rows, as MKL has: its logits
    differ there, by enough to change sampled text (MKL's differ in the last bits)."""

    def __init__(self, module: Any, below: int) -> None:
        super().__init__(module)
        self.below = below

    def step(self, tokens: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> Any:
        logits, h2, c2 = super().step(tokens, h, c)
        if tokens.shape[0] < self.below:
            logits = logits + 2.0 * (torch.arange(logits.shape[1]) % 3)
        return logits, h2, c2


def test_padding_is_measured_for_the_model_and_keeps_seeded_text_independent(model: LoadedModel) -> None:
    """Where small batches have a kernel of their own up to 19 rows, the engine measures that at
    start-up and pads seeded steps to 20 rows; padding to 4 (enough on AMD's AVX2) would not do."""
    real = find_step_min_rows(model, 64)
    assert real is not None
    variant = dataclasses.replace(model, module=SmallBatchKernel(model.module, below=20))
    assert find_step_min_rows(variant, 64) == max(20, real)
    target = dict(temperature=1.0, seed=77)

    async def alone(engine: Engine) -> tuple[str, int, bool | None]:
        text = (await collect(engine, req(variant, n=150, **target)))[0]
        return text, engine.step_min_rows or 0, engine.batch_invariant

    async def crowded(engine: Engine) -> str:
        others = [collect(engine, req(variant, prompt="KING:", n=20 + 5 * i, temperature=1.0)) for i in range(30)]
        results = await asyncio.gather(collect(engine, req(variant, n=150, **target)), *others)
        return results[0][0]

    expected, padded_to, invariant = with_engine(variant, alone)
    assert (padded_to, invariant) == (max(20, real), True)
    assert with_engine(variant, crowded) == expected
    # padded to 4, the seeded row meets the other kernel as the crowd thins out: its text changes
    assert with_engine(variant, crowded, step_min_rows=4) != with_engine(variant, alone, step_min_rows=4)[0]
    assert with_engine(variant, alone, step_min_rows=4)[2] is False


def test_seeded_text_is_the_same_beside_unseeded_rows_in_small_batches(model: LoadedModel) -> None:
    target = dict(temperature=1.0, top_p=0.9, seed=99)

    async def alone(engine: Engine) -> str:
        return (await collect(engine, req(model, n=200, **target)))[0]

    async def beside_unseeded(engine: Engine) -> str:
        others = [collect(engine, req(model, prompt="KING:", n=50 + 40 * i, temperature=1.0)) for i in range(3)]
        results = await asyncio.gather(collect(engine, req(model, n=200, **target)), *others)
        return results[0][0]

    expected = with_engine(model, alone)
    assert with_engine(model, beside_unseeded) == expected
    assert with_engine(model, beside_unseeded, max_batch=2) == expected  # batches of 1 and 2 rows, mixed


def test_greedy_2n_equals_n_then_n_through_the_saved_state(model: LoadedModel) -> None:
    async def scenario(engine: Engine) -> tuple[str, str]:
        whole, _ = await collect(engine, req(model, n=120, temperature=0))
        first, fin = await collect(engine, req(model, n=60, temperature=0))
        state = decode(model, fin.state)
        assert state.chars_consumed == len(PROMPT) + 60
        second, fin2 = await collect(engine, req(model, prompt="", n=60, temperature=0, state=state))
        assert fin2.chars_consumed == len(PROMPT) + 120
        return whole, first + second

    whole, split = with_engine(model, scenario)
    assert whole == split


def test_stop_string_is_not_returned_and_state_is_rewound_before_it(model: LoadedModel) -> None:
    async def scenario(engine: Engine) -> None:
        full, _ = await collect(engine, req(model, n=200, temperature=0))
        stop = next(full[i : i + 3] for i in range(20, 150) if full.find(full[i : i + 3]) == i)
        cut = full.find(stop)
        text, fin = await collect(engine, req(model, n=200, temperature=0, stop=["\u00a7never", stop]))
        assert (text, fin.reason, fin.completion_chars) == (full[:cut], "stop", cut)
        rest, _ = await collect(engine, req(model, prompt="", n=30, temperature=0, state=decode(model, fin.state)))
        assert rest == full[cut : cut + 30]

    with_engine(model, scenario)


def test_cancel_saves_the_state_after_what_the_client_was_sent(model: LoadedModel) -> None:
    async def scenario(engine: Engine) -> None:
        full, _ = await collect(engine, req(model, n=400, temperature=0))
        request = req(model, n=4000, temperature=0)
        request.auto_ack = False  # streamed: the engine may only run stream_window chars ahead
        handle = engine.submit(request)
        received = ""
        while len(received) < 25:
            received += await handle.text.get()  # type: ignore[operator]
        handle.ack(20)  # the client got 20 characters when it went away
        handle.cancel()
        fin = await handle.finished
        assert fin.reason == "cancelled" and fin.completion_chars == 20
        assert received == full[: len(received)]
        rest, _ = await collect(engine, req(model, prompt="", n=50, temperature=0, state=decode(model, fin.state)))
        assert rest == full[20:70]

    with_engine(model, scenario, stream_window=32)


def test_text_is_handed_over_in_pieces_but_first_and_last_at_once(model: LoadedModel) -> None:
    """While busy the engine hands text over at most every flush interval, one piece per stream;
    a stream's first characters and its end never wait for the interval."""

    async def scenario(engine: Engine) -> None:
        full, _ = await collect(engine, req(model, n=300, temperature=0))
        started = asyncio.get_running_loop().time()
        handles = [engine.submit(req(model, n=300, temperature=0)) for _ in range(3)]
        for handle in handles:
            pieces = []
            while (piece := await handle.text.get()) is not None:
                pieces.append(piece)
            assert "".join(pieces) == full
            # the first character at once, the rest when a row started or finished: without the
            # interval each of the 300 characters would be its own piece
            assert len(pieces[0]) == 1 and len(pieces) <= 5
            assert (await handle.finished).completion_chars == 300
        assert asyncio.get_running_loop().time() - started < 30  # not one 60 s interval waited

    with_engine(model, scenario, flush_interval_s=60.0)


def test_a_stream_ahead_of_its_client_hands_over_what_it_has(model: LoadedModel) -> None:
    """A streamed row that reaches its window stops, and its text goes out even mid-interval."""

    async def scenario(engine: Engine) -> None:
        request = req(model, n=500, temperature=0)
        request.auto_ack = False
        handle = engine.submit(request)
        received = ""
        while len(received) < 40:  # never acked: the engine must stop 40 characters ahead
            received += await handle.text.get()  # type: ignore[operator]
        await asyncio.sleep(0.2)
        assert len(received) + sum(len(p) for p in drain(handle.text)) == 40
        handle.ack(40)
        while len(received) < 80:
            received += await handle.text.get()  # type: ignore[operator]
        handle.cancel()
        assert (await handle.finished).completion_chars == 40

    with_engine(model, scenario, flush_interval_s=60.0, stream_window=40)


def drain(queue: asyncio.Queue[str | None]) -> list[str]:
    items = []
    while not queue.empty():
        item = queue.get_nowait()
        assert item is not None
        items.append(item)
    return items


def test_priming_with_nothing_leaves_a_fresh_state_fresh(model: LoadedModel) -> None:
    async def scenario(engine: Engine) -> None:
        text, fin = await collect(engine, req(model, prompt="", n=0))
        assert text == "" and decode(model, fin.state).pending == -1
        text, fin = await collect(engine, req(model, prompt="KING", n=0))
        state = decode(model, fin.state)
        assert (state.pending, state.chars_consumed) == (model.index["G"], 4)

    with_engine(model, scenario)


def test_prompt_fed_in_chunks_gives_the_same_text(model: LoadedModel) -> None:
    prompt = PROMPT * 12

    async def scenario(engine: Engine) -> str:
        return (await collect(engine, req(model, prompt=prompt, n=80, temperature=0)))[0]

    assert with_engine(model, scenario, prefill_chunk=7) == with_engine(model, scenario, prefill_chunk=64)


def test_full_engine_refuses_instead_of_queueing_without_bound(model: LoadedModel) -> None:
    async def scenario(engine: Engine) -> None:
        handles = [engine.submit(req(model, n=4000)) for _ in range(3)]
        with pytest.raises(EngineFull):
            engine.submit(req(model, n=1))
        for handle in handles:
            handle.cancel()
        for handle in handles:
            await handle.finished
        assert engine.in_flight == 0
        engine.submit(req(model, n=1))  # room again

    with_engine(model, scenario, max_streams=2, max_queue=1)


def test_metrics_of_the_engine_move(model: LoadedModel) -> None:
    metrics = Metrics()

    async def scenario(engine: Engine) -> None:
        await asyncio.gather(*(collect(engine, req(model, n=50, seed=i)) for i in range(5)))

    with_engine(model, scenario, metrics=metrics)

    def value(name: str) -> float | None:  # the engine's series carry its model's id
        return metrics.registry.get_sample_value(name, {"model": model.model_id})

    assert value("chargen_chars_generated_total") == 250
    assert value("chargen_engine_batch_size_count") >= 50
    assert value("chargen_engine_tick_seconds_count") >= 50 / EngineConfig().decode_steps  # several per tick
    assert value("chargen_time_between_chars_seconds_count") == 245


def test_a_small_batch_takes_several_characters_per_tick_with_the_same_text_and_states(model: LoadedModel) -> None:
    """`decode_steps` characters per tick for up to 4 rows: a tick's Python serves 8 characters,
    and seeded text, stop strings, lengths and saved states are those of one character per tick."""

    async def scenario(engine: Engine) -> tuple[list[tuple[str, str, int, bytes | None]], float]:
        ticks = engine.metrics.tick_seconds.counts
        before = sum(ticks)
        runs = [
            req(model, n=203, seed=7, temperature=0.9),  # 203: the last tick takes what is left
            req(model, n=150, seed=8, top_k=5, stop=["th", "\u00a7never"]),
            req(model, n=120, temperature=0),
        ]
        results = []
        for request in runs:
            text, fin = await collect(engine, request)
            results.append((text, fin.reason, fin.chars_consumed, fin.state))
        crowd = await asyncio.gather(*(collect(engine, r) for r in runs))  # three rows side by side
        results += [(text, fin.reason, fin.chars_consumed, fin.state) for text, fin in crowd]
        return results, sum(ticks) - before

    one_per_tick, ticks_one = with_engine(model, scenario, decode_steps=1)
    eight_per_tick, ticks_eight = with_engine(model, scenario, decode_steps=8)
    assert eight_per_tick == one_per_tick
    assert one_per_tick[1][1] == "stop"  # the stop string was met, mid-tick or not
    assert ticks_eight < ticks_one / 4


def test_rows_waiting_for_a_turn_keep_one_character_per_tick(model: LoadedModel) -> None:
    """More ready rows than max_batch: the batch rotates one character at a time, or a row left
    out would wait 8 steps of the others for each of its characters."""

    async def crowd(engine: Engine) -> tuple[list[str], int]:
        ticks = engine.metrics.tick_seconds.counts
        before = sum(ticks)
        done = await asyncio.gather(*(collect(engine, req(model, n=60, seed=i)) for i in range(5)))
        return [text for text, _ in done], sum(ticks) - before

    texts_one, ticks_one = with_engine(model, crowd, decode_steps=1, max_batch=2)
    texts_eight, ticks_eight = with_engine(model, crowd, decode_steps=8, max_batch=2)
    assert texts_eight == texts_one
    assert ticks_eight > 0.6 * ticks_one  # several characters per tick only once at most 2 rows are left


class CallCounter(RowCounter):
    """Also counts `forward` calls (long prompts are fed with `forward`, one row at a time)."""

    def __init__(self, module: Any) -> None:
        super().__init__(module)
        self.forwards = 0

    def forward(self, tokens: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> Any:
        self.forwards += 1
        return self.module.forward(tokens, h, c)


def test_a_burst_of_short_prompts_is_read_in_shared_steps(model: LoadedModel) -> None:
    counted = dataclasses.replace(model, module=CallCounter(model.module))
    counter = counted.module
    prompt = PROMPT[:14]  # 13 characters to feed before the last one: under step_prefill_chars

    async def scenario(engine: Engine) -> None:
        counter.rows.clear()  # the start-up batch invariance check's steps
        handles = [engine.submit(req(model, prompt=prompt, n=1, temperature=1.0)) for _ in range(8)]
        results = [await h.finished for h in handles]
        assert all(r.completion_chars == 1 for r in results)
        assert counter.forwards == 0  # no prompt went through `forward`
        # 8 x (13 prompt characters + 1 sampled): 112 row-steps, in far fewer steps than that
        assert sum(counter.rows) == 8 * (13 + 1)
        assert len(counter.rows) <= 2 * (13 + 1)
        counter.rows.clear()
        long_prompt = PROMPT * 4  # 79 characters to feed: `forward` in chunks, the last 15 in steps
        await collect(engine, req(model, prompt=long_prompt, n=1, temperature=1.0))
        assert counter.forwards == 1 and len(counter.rows) == 16  # 64 by forward, 15 fed + 1 sampled by step

    with_engine(counted, scenario, prefill_chunk=64, step_prefill_chars=32)


@pytest.mark.parametrize("prompt_copies", [1, 4])  # fed in steps only; by forward, then in steps
def test_seeded_text_with_its_prompt_fed_in_steps_does_not_depend_on_the_crowd(
    model: LoadedModel, prompt_copies: int
) -> None:
    target = dict(temperature=1.0, top_k=30, seed=77)
    prompt = PROMPT * prompt_copies

    async def alone(engine: Engine) -> str:
        return (await collect(engine, req(model, prompt=prompt, n=150, **target)))[0]

    async def crowded(engine: Engine) -> str:
        # others with short prompts join at the same moment: their prompts share the target's steps
        others = [collect(engine, req(model, prompt="KING:" * (i % 3 + 1), n=60, temperature=1.0)) for i in range(9)]
        results = await asyncio.gather(collect(engine, req(model, prompt=prompt, n=150, **target)), *others)
        return results[0][0]

    expected = with_engine(model, alone)
    assert with_engine(model, crowded) == expected
    assert with_engine(model, crowded, max_batch=3) == expected


def test_the_engine_thread_calls_no_torch_op_that_gives_up_the_gil(model: LoadedModel) -> None:
    """Past start-up, the engine's thread touches tensors only through the scripted calls and a
    few functions that keep the GIL: any other torch op gives it up and, behind a busy event loop,
    waits up to a switch interval to take it back (docs/service.md, "One scripted call per tick")."""
    from torch.overrides import TorchFunctionMode

    keeps_the_gil = {"from_numpy", "tensor", "tolist", "numpy", "__get__"}  # __get__: .shape

    class Recording(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.calls: set[str] = set()

        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            if watched and watched[0].worker.calibrated.is_set():  # start-up's own tensor work is not recorded
                self.calls.add(getattr(func, "__name__", repr(func)))
            return func(*args, **(kwargs or {}))

    recording = Recording()
    watched: list[Engine] = []

    class Watched(Engine):
        def _thread_main(self) -> None:
            watched.append(self)
            with recording:
                super()._thread_main()

    async def main() -> None:
        engine = Watched(model, Metrics(), prefill_chunk=8, step_prefill_chars=4)
        engine.start(asyncio.get_running_loop())
        try:
            _, first = await collect(engine, req(model, n=30, seed=1))
            saved = decode(model, first.state)
            jobs = [
                collect(engine, req(model, prompt=PROMPT * 3, n=40, state=saved)),  # long prompt: prefill
                collect(engine, req(model, n=60, temperature=0, stop=("e",))),  # greedy, padded, a stop string
                *(collect(engine, req(model, prompt="KING:", n=20 + 7 * i), ack=True) for i in range(6)),
            ]
            await asyncio.gather(*jobs)
        finally:
            await asyncio.to_thread(engine.stop)

    asyncio.run(main())
    assert recording.calls and recording.calls <= keeps_the_gil, recording.calls - keeps_the_gil


def test_a_request_submitted_while_the_engine_stops_is_finished_not_lost(model: LoadedModel) -> None:
    """submit() racing stop(): the request lands in the inbox just after the engine thread took its
    last look at it. It must still finish (cancelled, shutting down) or be refused, never hang."""
    from collections import deque

    async def main() -> Finished | None:
        engine = Engine(model, Metrics())
        engine.start(asyncio.get_running_loop())

        class StopsBeforeTheAppend(deque):  # type: ignore[type-arg]
            def append(self, item: Any) -> None:
                engine.stop(timeout=1.0)  # the engine drains what it has and exits (or waits for us)
                super().append(item)

        engine._inbox.waiting = StopsBeforeTheAppend()
        try:
            handle = engine.submit(req(model, n=5))
        except EngineStopped:
            return None
        try:
            return await asyncio.wait_for(handle.finished, 5)
        finally:
            await asyncio.to_thread(engine.stop)

    finished = asyncio.run(main())
    assert finished is not None
    assert (finished.reason, finished.completion_chars, finished.error) == (
        "cancelled",
        0,
        "the service is shutting down",
    )
