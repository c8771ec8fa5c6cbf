"""Running the model: one scripted call per tick, where every row is sampled with its own
parameters and PRNG (see `StepSampler` in service/sampling.py), and long prompts one row at a time.

Every eager torch op gives up the GIL and must take it back, which behind a busy event loop waits
up to a switch interval, so nothing here is an eager op but building the call's inputs with
functions that keep the GIL (`torch.tensor`, `.tolist()`); what each call hands back as ``held``
is its own inputs, released here rather than inside the call (see `StepSampler`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from service.artifact import LoadedModel
from service.engine.batch import Batch
from service.engine.logprobs import keep_prompt, scores
from service.engine.row import Row
from service.sampling import sample_row, step_sampler

# Up to this many unseeded rows are sampled in plain Python (`sample_row`): a few rows' sums in
# Python cost less than the ~10 torch ops of the scripted sampler (~50 µs, a sixth of a 1-row
# step of the 3x256 model). Not a setting: it is where the interpreter's per-row cost meets
# torch's per-op cost, a property of Python and torch rather than of a deployment, and it cannot
# change any text a client could reproduce (seeded and greedy rows never take this path).
SMALL_BATCH = 4


class Stepper:
    """The loaded model behind the engine: `decode` for a batch, `prefill` for a long prompt."""

    def __init__(self, model: LoadedModel) -> None:
        self.sampler = step_sampler(model.module)

    def decode(self, batch: Batch) -> tuple[list[list[int]], list[Tensor], list[Tensor]]:
        """Run the batch's steps: each step's picks [rows] (unused for rows still feeding their
        prompt) and its output state h, c [layers, rows + padding, hidden].

        One draw per sampled character from each row's own PRNG, in order; rows still feeding draw
        none, greedy rows draw none, so a row's numbers never depend on its neighbours.
        """
        rows, feeding = batch.rows, batch.feeding
        if batch.steps == 1 and not batch.exact and len(rows) <= SMALL_BATCH and batch.top_n < 0:
            uniforms = [0.0 if f else r.rng.random() for f, r in zip(feeding, rows, strict=True)]
            logits, h, c, _held = self.sampler.step(batch.tokens, batch.sources_h, batch.sources_c, batch.runs)
            values = logits.tolist()
            picks = [
                -1 if f else sample_row(values[i], r.params, uniforms[i], r.adjust)
                for i, (f, r) in enumerate(zip(feeding, rows, strict=True))
            ]
            return [picks], [h], [c]
        # the steps and the sampling in one scripted call: the GIL is given up once
        u = [
            [0.0 if f or r.greedy else r.rng.random() for f, r in zip(feeding, rows, strict=True)]
            for _ in range(batch.steps)
        ]
        inputs = (batch.tokens, batch.sources_h, batch.sources_c, batch.runs, batch.params)
        draws = torch.tensor(u, dtype=torch.float64)
        if batch.top_n < 0:
            picked, hs, cs, _held = self.sampler(*inputs, draws, len(rows))
        else:  # and each pick's log-probability (engine/logprobs.py)
            picked, hs, cs, *scored, _held = self.sampler.decode_scored(*inputs, draws, len(rows), batch.top_n)
            batch.scores = scores(*scored)
        return picked.tolist(), hs, cs

    def prefill(self, row: Row, chunk: list[int]) -> None:
        """Feed a chunk of the row's prompt with `forward`, one row at a time (its numbers then never
        depend on other streams): the row's state becomes the output; scored when it asked."""
        tokens = torch.tensor([chunk])
        if row.score_prompt:  # each character's log-probability given the ones before it
            end = row.fed + 1 + len(chunk)
            targets = torch.tensor([*row.to_feed[row.fed + 1 : end], row.pending][: len(chunk)])
            row.h_src, row.c_src, *scored, _held = self.sampler.prefill_scored(
                tokens, row.h_src, row.c_src, row.idx, targets, max(row.logprobs, 0)
            )
            keep_prompt(row, *scored)
        else:
            row.h_src, row.c_src, _held = self.sampler.prefill(tokens, row.h_src, row.c_src, row.idx)
        row.idx = 0
        row.fed += len(chunk)
