"""Each part of the engine on its own (service/engine/): stop strings, snapshots, a row's progress,
building the batch, the calibration, the step, the hand-over, the scheduler and the outputs.

The whole engine is tests/test_engine.py. Rows here get a stand-in for their StreamHandle (only
its `acked` and `cancelled` are read on the engine's side); the model is the real tiny artifact.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from service.artifact import LoadedModel, load_model
from service.engine.batch import BatchBuilder, gather_runs
from service.engine.calibration import Padding, choose_padding, find_step_min_rows
from service.engine.config import EngineConfig
from service.engine.handover import Handover
from service.engine.loop import EngineLoop
from service.engine.outputs import Outputs
from service.engine.requests import Finished, GenerationRequest, Inbox
from service.engine.row import DECODE, DONE, PREFILL, STEP_FEED, Row
from service.engine.scheduler import Scheduler
from service.engine.snapshots import Snapshots
from service.engine.step import SMALL_BATCH, Stepper
from service.engine.stops import StopMatcher
from service.metrics import Metrics
from service.sampling import SamplingParams, gather, sample_batch
from service.state_codec import decode_state


@pytest.fixture(scope="module")
def model(tiny_artifact: Path) -> LoadedModel:
    return load_model(tiny_artifact)


def handle(acked: int = 0) -> Any:
    return SimpleNamespace(acked=acked, cancelled=False, siblings=[], logprobs=[], prompt_logprobs=[])


def make_row(model: LoadedModel, prompt: str = "KING", n: int = 10, **options: Any) -> Row:
    ids = model.encode(prompt)
    stop = tuple(options.pop("stop", ()))
    auto_ack = options.pop("auto_ack", True)
    req = GenerationRequest(ids, n, SamplingParams(**options), stop, auto_ack=auto_ack, want_state=True)
    h, c = model.module.init_state(1)
    return Row(handle(), req, h, c, ids[-1], ids[:-1], len(ids), len(model.vocab))


# ---- stops.py -------------------------------------------------------------------------------


def push_all(matcher: StopMatcher, text: str) -> tuple[list[str], str | None]:
    released = []
    for ch in text:
        out, stop = matcher.push(ch)
        released.append(out)
        if stop is not None:
            return released, stop
    return released, None


def test_stop_matching_holds_back_only_what_may_start_a_stop_string() -> None:
    matcher = StopMatcher(("END", "\n\n"))
    released, stop = push_all(matcher, "a E")
    assert (released, stop, matcher.held) == (["a", " ", ""], None, "E")
    released, stop = push_all(matcher, "Nd")  # "EN" may still be "END"; "ENd" is not
    assert (released, stop, matcher.held) == (["", "ENd"], None, "")
    released, stop = push_all(matcher, "xEND more")
    assert (released, stop, matcher.held) == (["x", "", "", ""], "END", "")


def test_stop_matching_with_overlapping_stop_strings_keeps_the_longest_possible_tail() -> None:
    matcher = StopMatcher(("abc", "bcd"))
    released, stop = push_all(matcher, "abx")
    assert (released, stop) == (["", "", "abx"], None)
    released, stop = push_all(matcher, "abcd")  # "abc" completes first: "bcd" never does
    assert (released, stop) == (["", "", ""], "abc")


def test_stop_matching_releases_what_it_holds_at_the_end_and_passes_text_without_stops() -> None:
    matcher = StopMatcher(("zz",))
    assert matcher.push("z") == ("", None)
    assert (matcher.release(), matcher.held) == ("z", "")
    plain = StopMatcher(())
    assert [plain.push(ch) for ch in "ab"] == [("a", None), ("b", None)]


# ---- snapshots.py -------------------------------------------------------------------------------


def test_snapshots_look_up_any_position_kept_and_always_keep_the_newest() -> None:
    h, c = torch.zeros(1, 3, 2), torch.ones(1, 3, 2)
    snaps = Snapshots()
    assert not snaps
    for position in range(5):
        snaps.record(h, c, position % 3, 10 + position)
    assert snaps.at(3) == (h, c, 0, 13)
    snaps.forget_before(3)
    assert (snaps.first, len(snaps.states), snaps.at(3)[3], snaps.at(4)[3]) == (3, 2, 13, 14)
    snaps.forget_before(99)  # past the newest: the newest stays
    assert (snaps.first, [s[3] for s in snaps.states]) == (4, [14])


# ---- row.py ----------------------------------------------------------------------------------------


def test_a_rows_marks_are_positions_in_its_text_and_never_pass_each_other(model: LoadedModel) -> None:
    row = make_row(model, stop=("EN",), auto_ack=False)
    assert (row.phase, row.sampled, row.released, row.sent()) == (PREFILL, 0, 0, 0)
    row.sampled = 5
    row.stops.push("E")  # one character held back: it may start "EN"
    assert (row.released, row.sent()) == (4, 0)
    row.handle.acked = 3
    assert row.sent() == 3
    row.handle.acked = 9  # never past what was released
    assert row.sent() == 4
    unacked = make_row(model)  # a JSON request counts everything released as sent
    unacked.sampled = 7
    assert unacked.sent() == 7
    unacked.prompt_read(12.5)
    assert (unacked.phase, unacked.last_char_at, len(unacked.snapshots.states)) == (DECODE, 12.5, 1)


# ---- batch.py -------------------------------------------------------------------------------------


def test_gathering_a_batch_takes_one_slice_per_run_of_neighbouring_rows() -> None:
    """Rows that stepped together are gathered as one slice; the batch is the same as row by row."""
    last_h, last_c = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    new_h, new_c = torch.randn(2, 1, 3), torch.randn(2, 1, 3)  # a stream that just joined
    rows = [SimpleNamespace(h_src=last_h, c_src=last_c, idx=i) for i in (0, 1, 3, 4)]  # row 2 left
    rows.insert(2, SimpleNamespace(h_src=new_h, c_src=new_c, idx=0))
    sources_h, sources_c, runs = gather_runs(rows)  # type: ignore[arg-type]
    assert runs == [(0, 0, 2), (1, 0, 1), (0, 3, 5)]  # rows 0-1, the new one, rows 3-4
    assert sources_h == [last_h, new_h] and sources_c == [last_c, new_c]
    one_by_one = torch.cat([r.h_src[:, r.idx : r.idx + 1] for r in rows], dim=1)
    assert torch.equal(gather(sources_h, runs), one_by_one)
    assert torch.equal(gather(sources_c, runs), torch.cat([r.c_src[:, r.idx : r.idx + 1] for r in rows], dim=1))
    assert gather([last_h], [(0, 0, 5)]) is last_h  # a steady batch: last tick's output, no copy


def decoding(model: LoadedModel, count: int, sampled: int = 1, **options: Any) -> list[Row]:
    rows = [make_row(model, **options) for _ in range(count)]
    for row in rows:
        row.prompt_read(0.0)
        row.sampled = sampled
    return rows


def test_only_a_batch_with_a_reproducible_row_is_padded(model: LoadedModel) -> None:
    builder = BatchBuilder(model, EngineConfig(max_batch=8, decode_steps=8, stream_window=128))
    builder.pad_to = 6
    unseeded = builder.build(decoding(model, 2), quiet=True)
    assert (unseeded.exact, len(unseeded.tokens), unseeded.runs[-1]) == (False, 2, (1, 0, 1))
    seeded = builder.build(decoding(model, 1) + decoding(model, 1, seed=3), quiet=True)
    assert (seeded.exact, len(seeded.tokens), seeded.runs[-1]) == (True, 6, (2, 0, 4))  # 2 rows + 4 padding
    assert seeded.tokens.tolist()[2:] == [0, 0, 0, 0]


def timed(builder: BatchBuilder, rows: int, seconds_per_step: float) -> None:
    """Tell the builder that a step of `rows` rows takes this long, as a tick of that size does."""
    builder.step_seconds.pop(rows, None)
    builder.timed(builder.build(decoding(builder.model, rows), quiet=False), seconds_per_step)


def test_several_characters_per_tick_only_while_nobody_waits(model: LoadedModel) -> None:
    builder = BatchBuilder(model, EngineConfig(max_batch=4, decode_steps=8, multi_step_ms=10, stream_window=20))
    assert builder.build(decoding(model, 2), quiet=True).steps == 1  # a size not timed yet: one step, timed
    timed(builder, 2, 0.001)
    assert builder.build(decoding(model, 2), quiet=True).steps == 8
    assert builder.build(decoding(model, 2), quiet=False).steps == 1  # a request waits, or a prompt is read
    timed(builder, 4, 0.004)
    assert builder.build(decoding(model, 4), quiet=True).steps == 2  # 2 steps of 4 ms fit in 10 ms
    timed(builder, 3, 0.011)
    assert builder.build(decoding(model, 3), quiet=True).steps == 1  # one step is over the budget already
    builder.timed(builder.build(decoding(model, 3), quiet=False), 0.001)  # faster ticks pull the average down
    assert builder.step_seconds[3] == pytest.approx(0.011 + 0.2 * (0.001 - 0.011))
    timed(builder, 1, 0.001)
    assert builder.build(decoding(model, 2, sampled=0), quiet=True).steps == 1  # a first character is due
    assert builder.build(decoding(model, 1, sampled=7), quiet=True).steps == 3  # n=10: 3 characters left
    streamed = decoding(model, 1, auto_ack=False)
    streamed[0].handle.acked = 0
    streamed[0].max_new = 100
    streamed[0].sampled = 15  # 15 of a 20-character window already ahead of the client
    assert builder.build(streamed, quiet=True).steps == 5
    builder.max_batch = 1  # rows waiting for a turn: one character each
    assert builder.build(decoding(model, 2), quiet=True).steps == 1


def test_more_ready_rows_than_a_step_takes_rotate_and_a_steady_batch_reuses_its_output(model: LoadedModel) -> None:
    builder = BatchBuilder(model, EngineConfig(max_batch=2, decode_steps=1, stream_window=128))
    rows = decoding(model, 3)
    firsts = [builder.build(rows, quiet=True).rows for _ in range(3)]
    assert firsts == [rows[0:2], [rows[2], rows[0]], [rows[1], rows[2]]]
    builder.max_batch = 8
    batch = builder.build(rows, quiet=True)
    h, c = torch.randn(model.layers, 3, model.hidden), torch.randn(model.layers, 3, model.hidden)
    builder.stepped(batch, h, c)
    again = builder.build(rows, quiet=True)
    assert again.sources_h == [h] and again.runs == [(0, 0, 3)] and again.params is batch.params
    builder.forget(rows[1])  # a row of that step left: the next batch is gathered afresh
    assert builder.build(rows, quiet=True).sources_h != [h]


# ---- calibration.py ---------------------------------------------------------------------------


class OffBelow:
    """The artifact's module whose step differs below `below` rows (as MKL's kernels do)."""

    def __init__(self, module: Any, below: int) -> None:
        self.module, self.below = module, below

    def step(self, tokens: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> Any:
        logits, h2, c2 = self.module.step(tokens, h, c)
        return (logits + 1.0 if tokens.shape[0] < self.below else logits), h2, c2


def test_calibration_finds_the_smallest_agreeing_batch_size_and_reports_an_override(model: LoadedModel) -> None:
    real = find_step_min_rows(model, 32)
    assert real is not None and 1 <= real <= 32
    variant = dataclasses.replace(model, module=OffBelow(model.module, below=12))
    assert find_step_min_rows(variant, 32) == max(12, real)
    assert choose_padding(variant, 32, None) == Padding(max(12, real), True)
    assert choose_padding(variant, 32, 20) == Padding(20, True)
    assert choose_padding(variant, 32, 4) == Padding(4, False)  # padded below what was measured


def test_calibration_that_fails_pads_nothing_and_says_so(model: LoadedModel) -> None:
    broken = dataclasses.replace(model, module=SimpleNamespace(step=None))
    assert choose_padding(broken, 8, None) == Padding(1, False)


# ---- step.py -----------------------------------------------------------------------------------------


def test_the_step_draws_one_number_per_sampled_character_and_none_for_feeding_or_greedy_rows(
    model: LoadedModel,
) -> None:
    stepper = Stepper(model)
    builder = BatchBuilder(model, EngineConfig(max_batch=8, decode_steps=3, stream_window=128))
    sampling, greedy = decoding(model, 1, seed=5), decoding(model, 1, temperature=0)
    feeding = make_row(model, prompt="KING:")
    feeding.phase = STEP_FEED
    timed(builder, 2, 0.001)
    for rows, steps in (([*sampling, *greedy], 3), ([*sampling, *greedy, feeding], 1)):
        before = [r.rng.getstate() for r in rows]
        batch = builder.build(rows, quiet=True)
        assert batch.steps == steps
        picks, hs, cs = stepper.decode(batch)
        assert len(picks) == len(hs) == len(cs) == steps
        expected = random.Random()
        expected.setstate(before[0])
        for _ in range(steps):
            expected.random()
        assert rows[0].rng.getstate() == expected.getstate()  # one draw per step
        assert rows[1].rng.getstate() == before[1]  # greedy: no draw
        if steps == 1:
            assert rows[2].rng.getstate() == before[2]  # feeding its prompt: no draw


def test_a_few_unseeded_rows_are_sampled_in_python_with_the_scripted_samplers_distribution(
    model: LoadedModel,
) -> None:
    stepper = Stepper(model)
    builder = BatchBuilder(model, EngineConfig(max_batch=8, decode_steps=1, stream_window=128))
    rows = decoding(model, SMALL_BATCH)
    batch = builder.build(rows, quiet=True)
    draws = [random.Random(i).random() for i in range(SMALL_BATCH)]
    for row, i in zip(rows, range(SMALL_BATCH), strict=True):
        row.rng = random.Random(i)
    picks, hs, _ = stepper.decode(batch)
    logits, h, _ = model.module.step(
        batch.tokens, gather(batch.sources_h, batch.runs), gather(batch.sources_c, batch.runs)
    )
    assert torch.equal(hs[0], h)
    # the same distribution and draws (sample_row's sums round differently: only a draw right on a
    # boundary could land on the neighbour, and none of these does)
    assert picks[0] == sample_batch(logits, batch.params, draws)


# ---- handover.py ------------------------------------------------------------------------------------


class RowStub:
    def __init__(self, handle: str) -> None:
        self.handle, self.outbox = handle, ""


def test_the_handover_sends_one_piece_per_row_and_results_after_their_text() -> None:
    async def main() -> list[Any]:
        delivered: list[Any] = []
        handover = Handover(delivered.extend, interval_s=60.0)
        handover.loop = asyncio.get_running_loop()
        first, second = RowStub("one"), RowStub("two")
        handover.flush()
        assert not handover.due(worked=True)  # within the interval, nothing urgent
        assert handover.due(worked=False)  # out of work: hand over now
        handover.text(first, "ab")  # type: ignore[arg-type]
        handover.text(second, "x")  # type: ignore[arg-type]
        handover.text(first, "c")  # type: ignore[arg-type]
        done = Finished("length", 3, 3, None)
        handover.finished(second, "two", done)  # type: ignore[arg-type]
        assert handover.urgent and handover.due(worked=True)
        handover.flush()
        await asyncio.sleep(0)
        return delivered

    assert asyncio.run(main()) == [("two", "x"), ("two", Finished("length", 3, 3, None)), ("one", "abc")]


def test_with_many_streams_the_handover_waits_longer_so_the_event_loop_gets_at_most_its_budget() -> None:
    handover = Handover(lambda events: None, interval_s=0.02, events_per_s=800.0)
    assert [handover.interval(n) for n in (0, 1, 16, 32, 64)] == [0.02, 0.02, 0.02, 0.04, 0.08]
    assert Handover(lambda events: None, interval_s=0.02).interval(64) == 0.02  # no budget: the interval alone
    rows = [RowStub(str(i)) for i in range(32)]
    for row in rows:
        handover.text(row, "a")  # type: ignore[arg-type]
    handover._flushed_at = time.perf_counter() - 0.03
    assert not handover.due(worked=True)  # 30 ms: due for 16 streams, not yet for 32
    handover._flushed_at = time.perf_counter() - 0.041
    assert handover.due(worked=True)
    handover.flush()
    handover.text(rows[0], "b")  # type: ignore[arg-type]
    handover._flushed_at = time.perf_counter() - 0.021
    assert handover.due(worked=True)  # one stream with text: the interval


def test_a_tick_hands_over_the_text_of_earlier_ticks_just_before_its_model_call(model: LoadedModel) -> None:
    """While the call runs without the GIL the event loop writes the events; after the call this
    thread's Python then does not wait for the GIL behind it (loop.py)."""
    posted: list[list[Any]] = []
    handover = Handover(lambda events: None, interval_s=0.0)
    handover.post = lambda fn, events: posted.append(events)  # type: ignore[method-assign]
    inbox = Inbox()
    config = EngineConfig(decode_steps=1, max_streams=2)
    engine = EngineLoop(model, Metrics().for_model(model.model_id), config, inbox, threading.Event(), handover, print)
    unsent_at_call: list[int] = []
    decode = engine.stepper.decode

    def recording_decode(batch: Any) -> Any:
        unsent_at_call.append(sum(len(row.outbox) for row in handover.outboxes))
        return decode(batch)

    engine.stepper.decode = recording_decode  # type: ignore[method-assign]
    request = GenerationRequest(model.encode("KING"), 5, SamplingParams(seed=3))
    inbox.put(handle(), request)
    for _ in range(9):  # 3 prompt characters, then 5 sampled ones, then one tick with no row
        engine.tick()
    texts = [text for events in posted for _, text in events if isinstance(text, str)]
    assert unsent_at_call == [0] * 8  # every call started with everything earlier handed over
    assert len(texts) == 5 and len("".join(texts)) == 5  # one piece per tick, each handed over once
    assert isinstance(posted[-1][-1][1], Finished)


# ---- scheduler.py and outputs.py -----------------------------------------------------------------


def engine_parts(model: LoadedModel, **options: Any) -> tuple[Scheduler, Outputs, Handover, Inbox]:
    handover = Handover(lambda events: None, interval_s=0.0)
    inbox = Inbox()
    outputs = Outputs(model, Metrics().for_model(model.model_id), handover, leave=lambda row: scheduler.remove(row))
    config = EngineConfig(**(dict(max_streams=3, prefill_chunk=4, step_prefill_chars=5, stream_window=10) | options))
    scheduler = Scheduler(model, config, inbox, Stepper(model), outputs)
    return scheduler, outputs, handover, inbox


def queue(inbox: Inbox, model: LoadedModel, prompt: str, n: int = 5, **params: Any) -> Any:
    request = GenerationRequest(model.encode(prompt), n, SamplingParams(**params), want_state=True)
    entry = handle()
    assert inbox.put(entry, request)
    return entry


def test_the_prompts_path_depends_only_on_its_length_and_admission_stops_at_max_streams(model: LoadedModel) -> None:
    scheduler, _, handover, inbox = engine_parts(model)
    queue(inbox, model, "KING:ROMEO:")  # 10 characters to read before the last: forward, in chunks
    queue(inbox, model, "KING:")  # 4: inside the batched steps
    queue(inbox, model, "K")  # nothing before the last character: generating at once
    waiting = queue(inbox, model, "K")
    scheduler.admit()
    assert [r.phase for r in scheduler.rows] == [PREFILL, STEP_FEED, DECODE]
    assert list(inbox.waiting) and inbox.waiting[0][0] is waiting  # max_streams 3: it waits its turn
    assert scheduler.ready() == scheduler.rows[1:]
    scheduler.prefill_one()  # 4 characters read; 6 left, still more than step_prefill_chars
    assert (scheduler.rows[0].fed, scheduler.rows[0].phase) == (4, PREFILL)
    scheduler.prefill_one()  # 8 read, 2 left: on to the steps
    assert (scheduler.rows[0].fed, scheduler.rows[0].phase) == (8, STEP_FEED)
    assert not handover.events


def test_a_row_too_far_ahead_of_its_client_waits_and_a_cancelled_prompt_leaves_the_session(
    model: LoadedModel,
) -> None:
    scheduler, _, handover, inbox = engine_parts(model)
    request = GenerationRequest(model.encode("K"), 50, SamplingParams(), auto_ack=False)
    streamed = handle()
    inbox.put(streamed, request)
    reading = queue(inbox, model, "KING:ROMEO:JULIET:")
    scheduler.admit()
    row = scheduler.rows[0]
    row.sampled = 10  # the whole window ahead of its client
    assert scheduler.ready() == []
    streamed.acked = 1
    assert scheduler.ready() == [row]
    reading.cancelled = True
    scheduler.reap_cancelled()
    assert scheduler.rows == [row] and not scheduler.prefilling
    assert handover.events == [(reading, Finished("cancelled", 0, 0, None))]  # consumed: as before the request


def test_outputs_end_a_row_at_a_stop_string_mid_tick_with_the_state_before_it(model: LoadedModel) -> None:
    scheduler, outputs, handover, _ = engine_parts(model)
    vocab = model.vocab
    row = make_row(model, n=50, stop=(vocab[3] + vocab[4],))
    row.prompt_read(time.perf_counter())
    scheduler.rows.append(row)
    states = [torch.randn(model.layers, 1, model.hidden) for _ in range(4)]
    picks = [[1], [3], [4], [2]]  # the stop string is the 2nd and 3rd characters; the 4th is unused
    batch = SimpleNamespace(rows=[row], feeding=[False], scores=None)
    outputs.take(batch, picks, states, states)  # type: ignore[arg-type]
    assert row.phase is DONE and scheduler.rows == [] and row.sampled == 3
    (_, text), (_, finished) = handover.events
    assert text == vocab[1]  # released: the character before the stop string
    assert (finished.reason, finished.completion_chars, finished.chars_consumed) == ("stop", 1, len("KING") + 1)
    saved = decode_state(finished.state, model.fingerprint, model.layers, model.hidden, len(model.vocab))
    assert saved.pending == 1 and torch.equal(torch.from_numpy(saved.h), states[0][:, 0])


def test_a_plain_rows_tick_is_taken_at_once_and_its_last_character_ends_it(model: LoadedModel) -> None:
    scheduler, outputs, handover, _ = engine_parts(model)
    vocab = model.vocab
    metrics = outputs.metrics
    rows = [make_row(model, n=6), make_row(model, n=6)]
    for row in rows:
        row.prompt_read(time.perf_counter())
        row.snapshots.record(row.h_src, row.c_src, 0, 0)  # its first character, sent a second ago
        row.sampled, row.last_char_at = 1, time.perf_counter() - 1.0
        scheduler.rows.append(row)
    states = [torch.randn(model.layers, 2, model.hidden) for _ in range(5)]
    picks = [[1, 5], [2, 6], [3, 7], [4, 8]]
    gaps_before = list(metrics.time_between_chars.counts)
    batch = SimpleNamespace(rows=rows, feeding=[False, False], scores=None)
    outputs.take(batch, picks, states[:4], states[1:])  # type: ignore[arg-type]

    first, second = rows
    assert first.sampled == 5 and first.outbox == "".join(vocab[i] for i in (1, 2, 3, 4))
    assert (first.h_src, first.c_src, first.idx, first.pending) == (states[3], states[4], 0, 4)
    assert [first.snapshots.at(p)[2:] for p in range(2, 6)] == [(0, 1), (0, 2), (0, 3), (0, 4)]
    assert first.snapshots.at(3)[0] is states[1] and first.snapshots.at(3)[1] is states[2]
    assert [second.snapshots.at(p)[2:] for p in range(2, 6)] == [(1, 5), (1, 6), (1, 7), (1, 8)]
    gaps = [after - before for after, before in zip(metrics.time_between_chars.counts, gaps_before, strict=True)]
    assert sum(gaps) == 8 and gaps[0] == 6  # per row: one gap of about a second, three of 0

    outputs.take(batch, [[9, 10]], [states[0]], [states[0]])  # type: ignore[arg-type]
    assert scheduler.rows == []  # the 6th character of each ended it
    results = [event for event in handover.events if isinstance(event[1], Finished)]
    assert [(f.reason, f.completion_chars) for _, f in results] == [("length", 6), ("length", 6)]
