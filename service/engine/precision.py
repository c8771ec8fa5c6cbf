"""bf16 steps where the CPU makes them faster (``CHARGEN_PRECISION=auto|fp32|bf16``).

A bf16 copy of the artifact's weights is made at load; the engine then runs `Bf16Steps`, which
takes and returns fp32 tensors exactly as the artifact does: sessions, padding rows and sampling
are the same code in either precision, and h and c are rounded to bf16 at the input of each step
(the quality cost of that is measured by benchmarks/precision_quality.py, docs/benchmarks.md).

bf16 matrix products are fast only through oneDNN on CPUs with bf16 units (AMX, AVX512-BF16), so
bf16 turns ``torch.backends.mkldnn`` on; elsewhere they fall back to slow generic kernels. ``auto``
therefore measures, at start-up on the engine's thread count, the step at 1 row and at
``max_batch`` rows in both precisions, and picks bf16 only where it is faster at both sizes: a
lone stream's speed counts as much as a full batch's. The batch-invariance padding is measured on
the module that serves (service/engine/calibration.py), so seeded text stays independent of batch
neighbours in either precision.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from chargen.artifact import jit_deprecation_accepted
from service.artifact import LoadedModel

log = logging.getLogger("chargen.engine")

Precision = Literal["auto", "fp32", "bf16"]
AUTO_MARGIN = 1.05  # auto takes bf16 only when it is at least this much faster at both sizes (not noise)
BF16_UNITS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of CPUs with bf16 matrix instructions
_measured: dict[tuple[str, int, int, bool], dict[int, float]] = {}  # auto's speedups, once per process


def cpu_has_bf16_units() -> bool:
    """Whether the CPU has bf16 instructions (without them bf16 is emulated: slower, no need to measure)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = set(cpuinfo.read().split())
    except OSError:
        return True  # not Linux: let the measurement tell
    return any(unit in flags for unit in BF16_UNITS)


class Bf16Steps(nn.Module):
    """The artifact's ``init_state``, ``step`` and ``forward`` on bf16 weights, fp32 in and out."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.inner = module

    @torch.jit.export
    def init_state(self, batch: int) -> tuple[Tensor, Tensor]:
        h, c = self.inner.init_state(batch)
        return h.float(), c.float()

    @torch.jit.export
    def step(self, tokens: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        logits, h2, c2 = self.inner.step(tokens, h.to(torch.bfloat16), c.to(torch.bfloat16))
        return logits.float(), h2.float(), c2.float()

    def forward(self, tokens: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        logits, h2, c2 = self.inner.forward(tokens, h.to(torch.bfloat16), c.to(torch.bfloat16))
        return logits.float(), h2.float(), c2.float()


def bf16_copy(model: LoadedModel) -> LoadedModel:
    """The model with a bf16 copy of its weights behind fp32 inputs and outputs (scripted)."""
    inner = copy.deepcopy(model.module)
    with warnings.catch_warnings():  # Module.to reads each parameter's .grad, which a ScriptModule's warns about
        warnings.filterwarnings("ignore", category=UserWarning, message=r".*\.grad attribute of a Tensor.*")
        inner.to(torch.bfloat16)
    with jit_deprecation_accepted():
        module = torch.jit.script(Bf16Steps(inner))
    return dataclasses.replace(model, module=module)


def steps_per_s(module: nn.Module, rows: int, seconds: float = 0.1) -> float:
    """Characters/s of ``step`` at ``rows`` rows (best of 3 short runs after a warm-up)."""
    with torch.inference_mode():
        h, c = module.init_state(rows)
        tokens = torch.zeros(rows, dtype=torch.int64)
        for _ in range(5):
            _, h, c = module.step(tokens, h, c)
        best = 0.0
        for _ in range(3):
            steps, start = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - start) < seconds / 3 or steps < 3:
                _, h, c = module.step(tokens, h, c)
                steps += 1
            best = max(best, steps * rows / elapsed)
    return best


@dataclass(frozen=True)
class Choice:
    model: LoadedModel  # what the engine runs
    precision: str  # "fp32" or "bf16"
    speedup: dict[int, float]  # auto: bf16 over fp32 at each measured row count


def choose_precision(model: LoadedModel, precision: Precision, max_batch: int, mkldnn: bool) -> Choice:
    """The model the engine should run; on the calling thread, whose torch thread count serves.

    ``mkldnn``: the setting fp32 runs with (CHARGEN_MKLDNN); bf16 turns oneDNN on.
    """
    if precision == "fp32":
        return Choice(model, "fp32", {})
    if precision == "bf16":
        torch.backends.mkldnn.enabled = True  # bf16 matrix units are reached through oneDNN
        log.info("steps in bf16 (CHARGEN_PRECISION=bf16)")
        return Choice(bf16_copy(model), "bf16", {})
    if not cpu_has_bf16_units():
        log.info("steps in fp32: this CPU has no bf16 units (%s)", " or ".join(BF16_UNITS))
        return Choice(model, "fp32", {})
    key = (model.fingerprint, max_batch, torch.get_num_threads(), mkldnn)
    candidate = None
    if (speedup := _measured.get(key)) is None:
        candidate = bf16_copy(model)
        sizes = sorted({1, max_batch})
        speedup = _measured[key] = {rows: bf16_speedup(model, candidate, rows, mkldnn) for rows in sizes}
    shown = ", ".join(f"{x:.2f}x at {rows} row(s)" for rows, x in speedup.items())
    if all(x >= AUTO_MARGIN for x in speedup.values()):
        torch.backends.mkldnn.enabled = True
        log.info("steps in bf16: measured against fp32, %s", shown)
        return Choice(candidate or bf16_copy(model), "bf16", speedup)
    torch.backends.mkldnn.enabled = mkldnn
    log.info("steps in fp32: bf16 measured %s (auto takes it from %.2fx at every size)", shown, AUTO_MARGIN)
    return Choice(model, "fp32", speedup)


def bf16_speedup(model: LoadedModel, candidate: LoadedModel, rows: int, mkldnn: bool) -> float:
    """bf16's step rate over fp32's at ``rows`` rows, each with its oneDNN setting."""
    torch.backends.mkldnn.enabled = True
    bf16 = steps_per_s(candidate.module, rows)
    torch.backends.mkldnn.enabled = mkldnn
    return bf16 / steps_per_s(model.module, rows)
