"""Log-probabilities in the engine: which a batch computes, and handing them to each row's handle.

The scripted step scores every pick when any row of the batch asked (`StepSampler.decode_scored`);
a row that asked gets its entries appended to ``handle.logprobs``, one per generated character,
before the text they describe is handed over, so the event loop always finds them there. A row
with ``score_prompt`` (echo with logprobs) reads its whole prompt with `forward`, scored
(`StepSampler.prefill_scored`), into ``handle.prompt_logprobs``.
"""

from __future__ import annotations

from torch import Tensor

from service.engine.requests import Score
from service.engine.row import Row

NONE = -1  # top_n when no row of a batch wants log-probabilities: the step computes none


def batch_top_n(rows: list[Row]) -> int:
    """How many alternatives this batch's step reports: the most any of its rows asked for."""
    return max((r.logprobs for r in rows), default=NONE)


def scores(chosen: Tensor, top_v: Tensor, top_i: Tensor) -> list[list[Score]]:
    """[K, rows] and [K, rows, top_n] tensors -> per step, per row, (log p, [(id, log p), ...])."""
    values, ids = top_v.tolist(), top_i.tolist()  # .tolist() keeps the GIL (see StepSampler)
    return [
        [(lp, list(zip(i, v, strict=True))) for lp, v, i in zip(step, step_v, step_i, strict=True)]
        for step, step_v, step_i in zip(chosen.tolist(), values, ids, strict=True)
    ]


def keep(row: Row, score: Score) -> None:
    """A generated character's score, for a row that asked (its top list cut to what it asked)."""
    lp, top = score
    row.handle.logprobs.append((lp, top[: row.logprobs]))


def keep_prompt(row: Row, chosen: Tensor, top_v: Tensor, top_i: Tensor) -> None:
    """A prompt chunk's scores: one per character that followed a character of the chunk."""
    n = row.logprobs
    row.handle.prompt_logprobs.extend(
        (lp, list(zip(i[:n], v[:n], strict=True)))
        for lp, v, i in zip(chosen.tolist(), top_v.tolist(), top_i.tolist(), strict=True)
    )
