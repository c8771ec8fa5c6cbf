"""The engine's scripted tick: gathering a batch's state, the model's step and every row's sampling
in one TorchScript call. The sampler itself is chargen/sampling.py, shared with `chargen sample`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from chargen.logprobs import score
from chargen.sampling import (
    Adjustment,
    BatchParams,
    SamplingParams,
    sample_batch,
    sample_logits,
    sample_row,
    sample_with_draws,
    script,
)

__all__ = [
    "Adjustment",
    "BatchParams",
    "SamplingParams",
    "StepSampler",
    "gather",
    "sample_batch",
    "sample_logits",
    "sample_row",
    "step_sampler",
]


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
    GIL once. With K > 1 (see the engine) each step's picks are fed to the next one, so the
    engine's Python runs once per K characters.

    Every method also returns ``held``: the tensors it was given, handed back. A tensor that Python
    holds keeps its Python object alive through its C++ references, so the call's last reference
    to it going away must take the GIL (torch's PyObject preservation) -- inside the call, where
    the GIL was given up, it waited behind the event loop for a switch interval per input tensor
    (a fifth of the engine thread's time in a profile of 32 streams). Handed back, those last
    references go with the call's result, after the GIL is taken back once.

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
    ) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor]]:
        picks, hs, cs, _, _, _, held = self.decode_scored(tokens, sources_h, sources_c, runs, params, u, rows, -1)
        return picks, hs, cs, held

    @torch.jit.export
    def decode_scored(
        self,
        tokens: Tensor,
        sources_h: list[Tensor],
        sources_c: list[Tensor],
        runs: list[tuple[int, int, int]],
        params: BatchParams,
        u: Tensor,
        rows: int,
        top_n: int,
    ) -> tuple[Tensor, list[Tensor], list[Tensor], Tensor, Tensor, Tensor, list[Tensor]]:
        """`forward`, and with top_n >= 0 each pick's log-probability [K, rows] and the top_n most
        likely characters' [K, rows, top_n] with their ids (`chargen.logprobs.score`)."""
        held = [tokens, u, params.temperature, params.greedy, params.top_k, params.top_p, params.cut, params.adjust]
        held = held + sources_h + sources_c
        h = gather(sources_h, runs)
        c = gather(sources_c, runs)
        picks: list[Tensor] = []
        hs: list[Tensor] = []
        cs: list[Tensor] = []
        chosen: list[Tensor] = []
        top_v: list[Tensor] = []
        top_i: list[Tensor] = []
        draws = u.to(torch.float64).unsqueeze(2)  # [K, rows, 1]: shaped once, not per step
        padded = rows < tokens.shape[0]  # without padding, no slicing and joining per step
        padding = tokens[rows:]
        for k in range(u.shape[0]):
            logits, h, c = self.model.step(tokens, h, c)
            if padded:
                logits = logits[:rows]
            picked = sample_with_draws(logits, params, draws[k])
            picks.append(picked)
            hs.append(h)
            cs.append(c)
            if top_n >= 0:
                lp, tv, ti = score(logits, picked, top_n)
                chosen.append(lp)
                top_v.append(tv)
                top_i.append(ti)
            tokens = torch.cat([picked, padding]) if padded else picked
        if top_n < 0:
            empty = torch.zeros(0)
            return torch.stack(picks), hs, cs, empty, empty, empty.long(), held
        return torch.stack(picks), hs, cs, torch.stack(chosen), torch.stack(top_v), torch.stack(top_i), held

    @torch.jit.export
    def step(
        self, tokens: Tensor, sources_h: list[Tensor], sources_c: list[Tensor], runs: list[tuple[int, int, int]]
    ) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
        """The artifact's ``step`` on a gathered state, without sampling (logits [B, V], h, c)."""
        logits, h, c = self.model.step(tokens, gather(sources_h, runs), gather(sources_c, runs))
        return logits, h, c, [tokens] + sources_h + sources_c  # noqa: RUF005 (TorchScript has no [*x])

    @torch.jit.export
    def prefill(self, tokens: Tensor, h: Tensor, c: Tensor, row: int) -> tuple[Tensor, Tensor, list[Tensor]]:
        """The artifact's ``forward`` over tokens [1, T] from row ``row`` of (h, c): the new h, c."""
        _, h2, c2 = self.model.forward(tokens, h[:, row : row + 1], c[:, row : row + 1])
        return h2, c2, [tokens, h, c]

    @torch.jit.export
    def prefill_scored(
        self, tokens: Tensor, h: Tensor, c: Tensor, row: int, targets: Tensor, top_n: int
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, list[Tensor]]:
        """`prefill`, and the log-probability of each character that follows one of tokens [1, T]
        (targets [T]: the prompt scored, as `echo` with `logprobs` asks) with the top_n alternatives."""
        logits, h2, c2 = self.model.forward(tokens, h[:, row : row + 1], c[:, row : row + 1])
        lp, top_v, top_i = score(logits[0], targets, top_n)
        return h2, c2, lp, top_v, top_i, [tokens, h, c, targets]


def step_sampler(model: Any) -> nn.Module:
    """`StepSampler` for a loaded artifact, compiled; for any other module with ``step``, eager."""
    sampler = StepSampler(model)
    return script(sampler) if isinstance(model, torch.jit.ScriptModule) else sampler
