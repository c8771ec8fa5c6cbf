"""The start-up measurement that keeps seeded text independent of the other streams.

MKL picks different matrix kernels for small and large row counts, which changes the last bits
of the results: on AMD EPYC (AVX2) sizes 1, 2-3 and >= 4 differ, on an Intel Xeon with AVX-512
every size below 16 differs from 16 and up. A step that carries a reproducible row (seeded,
greedy or top-k 1) is therefore padded to ``step_min_rows`` rows, the smallest size from which
every size agrees, measured here for the loaded model on the engine's own thread (its thread
count is what serves). Long prompts are fed one row at a time. So such a row's numbers, and with
per-row PRNGs its text, never depend on which other streams share its batches. Steps of only
unseeded sampling rows are not padded: their text is random anyway, a last-bit difference in the
logits cannot be told from another draw, and a lone stream then pays the 1-row price.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from service.artifact import LoadedModel

log = logging.getLogger("chargen.engine")


def find_step_min_rows(model: LoadedModel, max_batch: int) -> int | None:
    """The smallest batch size from which a row's `step` output is bit-identical at every size up
    to ``max_batch`` and wherever the row sits; None when even that does not hold.

    Which sizes share a kernel depends on the CPU and the BLAS build, so it is measured on the
    machine and thread count that serve, not assumed: one step at each size from ``max_batch``
    down to the first that differs (100-200 ms for the 3x256 model at 64 rows).
    """
    m = model.module
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        h = torch.randn(model.layers, max_batch, model.hidden, generator=gen) * 0.5
        c = torch.randn(model.layers, max_batch, model.hidden, generator=gen)
        tokens = torch.randint(0, len(model.vocab), (max_batch,), generator=gen)
        reference = m.step(tokens, h, c)

        def same(rows: slice, out: tuple[Tensor, Tensor, Tensor], at: slice) -> bool:
            return bool(
                torch.equal(out[0][at], reference[0][rows])
                and torch.equal(out[1][:, at], reference[1][:, rows])
                and torch.equal(out[2][:, at], reference[2][:, rows])
            )

        # the same rows, rotated by one: a row's numbers must not depend on its position
        shift = torch.cat([torch.arange(1, max_batch), torch.arange(1)])
        rotated = m.step(tokens[shift], h[:, shift].contiguous(), c[:, shift].contiguous())
        if max_batch > 1 and not same(slice(1, max_batch), rotated, slice(0, max_batch - 1)):
            return None
        smallest = max_batch
        for rows in range(max_batch - 1, 0, -1):
            out = m.step(tokens[:rows], h[:, :rows].contiguous(), c[:, :rows].contiguous())
            if not same(slice(0, rows), out, slice(0, rows)):
                break
            smallest = rows
        return smallest


@dataclass(frozen=True)
class Padding:
    step_min_rows: int  # rows a step with a reproducible row is padded to
    batch_invariant: bool  # whether every batch size from step_min_rows on agrees bit for bit


def choose_padding(model: LoadedModel, max_batch: int, requested: int | None) -> Padding:
    """The smallest batch size from which every size agrees, as measured, unless ``requested``."""
    top = max(max_batch, requested or 1)
    try:
        smallest = find_step_min_rows(model, top)
    except Exception:
        log.exception("measuring the model's batch invariance failed")
        smallest = None
    step_min_rows = requested or smallest or 1  # no size helps when a row's position matters
    invariant = smallest is not None and smallest <= step_min_rows
    if invariant:
        log.info(
            "steps with a seeded or greedy row are padded to %d rows (batch sizes %d-%d give "
            "bit-identical rows on this machine)",
            step_min_rows,
            smallest,
            top,
        )
    else:
        log.warning(
            "batched steps are not bit-identical at every batch size from %d rows on this machine "
            "(they are from %s): seeded output may differ in rare near-ties depending on concurrent streams",
            step_min_rows,
            smallest,
        )
    return Padding(step_min_rows, invariant)
