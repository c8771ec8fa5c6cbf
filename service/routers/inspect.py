"""The LSTM inspector: what the model expected at each character, and what its cells hold.

``POST /v1/inspect`` runs a text through the artifact's ``inspect`` method and returns, per
character, its surprisal in bits, the model's top-5 predictions for that position, and the
requested units' cell values (tanh c) and gate activations. ``POST /v1/inspect/units`` ranks units
by how well their activation correlates with where a regular expression matches the text
(Karpathy, Johnson and Fei-Fei, "Visualizing and Understanding Recurrent Networks", 2015).

Positions. The text is read after a "previous" character: the session's pending character when
``session_id`` is given (its state is read, never changed), else a newline from the initial state,
as generation starts. So every character of the text, the first included, has a prediction; the
activations shown at character t are the state just after reading it.

Threads. Model code never runs on the event loop: each request runs in a worker thread, one at a
time (a lock), with the engine's intra-op thread count, so an inspection slows the engine's
streams by at most one core's share. A few requests may wait; past that, 429.
"""

from __future__ import annotations

import asyncio
import math
import threading
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import regex
import torch
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from service.artifact import LoadedModel
from service.auth import OwnerDep
from service.dependencies import RegistryDep, SettingsDep, StoreDep
from service.errors import ApiError, ErrorEnvelope
from service.problems import unknown_characters
from service.repository import ModelRegistry
from service.session_access import read_owned_session, state_for
from service.state_store import SessionStore, StoredSession

router = APIRouter(tags=["inspect"])

# Bounds: work and response size grow with text length x units (every unit is 4 series of floats).
MAX_TEXT_CHARS = 2000
MAX_UNITS = 32
MAX_PATTERN_CHARS = 200
MAX_TOP_UNITS = 32
TOP_PREDICTIONS = 5
# `regex` (not `re`) so a catastrophically backtracking pattern is stopped instead of holding the
# GIL, and with it the whole service, for ever.
PATTERN_TIMEOUT_S = 0.25
MAX_WAITING = 4  # inspections queued behind the running one before 429
DIGITS = 4  # decimals kept in the JSON: plenty for colouring, a third of the bytes of float32 repr
LN2 = math.log(2.0)
SIGNALS = ("input", "forget", "output")  # order of the gates in the artifact's inspect()


class InspectRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(..., description=f"1 to {MAX_TEXT_CHARS} characters of the model's vocabulary")
    session_id: str | None = Field(None, description="start from this session's state (read only)")
    model: str | None = Field(None, description="model id or version (default: the session's, else the default)")
    layer: int = Field(0, description="layer of the requested units, 0-based")
    units: list[int] = Field(default_factory=list, description=f"up to {MAX_UNITS} unit indices, 0-based")


class UnitSearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(..., description=f"1 to {MAX_TEXT_CHARS} characters of the model's vocabulary")
    pattern: str = Field(..., description=f"a regular expression, up to {MAX_PATTERN_CHARS} characters")
    session_id: str | None = None
    model: str | None = Field(None, description="model id or version (default: the session's, else the default)")
    layer: int | None = Field(None, description="search this layer only (default: every layer)")
    top: int = Field(5, ge=1, le=MAX_TOP_UNITS, description="how many units to return")
    signal: Literal["cell", "input", "forget", "output"] = Field("cell", description="what to correlate")


class Prediction(BaseModel):
    char: str
    p: float


class CharInfo(BaseModel):
    char: str
    surprisal_bits: float
    top: list[Prediction]  # the model's best guesses for this position, before reading it


class UnitTrace(BaseModel):
    layer: int
    unit: int
    cell: list[float]  # tanh(c_t) after each character
    input: list[float]
    forget: list[float]
    output: list[float]


class InspectResponse(BaseModel):
    model: str
    layers: int
    hidden: int
    session_id: str | None
    chars: list[CharInfo]
    next: list[Prediction]  # predictions for the character after the whole text
    mean_surprisal_bits: float
    units: list[UnitTrace]


class RankedUnit(BaseModel):
    layer: int
    unit: int
    correlation: float  # Pearson r between the activation and the match mask
    values: list[float]  # the correlated signal after each character


class UnitSearchResponse(BaseModel):
    model: str
    session_id: str | None
    pattern: str
    signal: str
    matched_chars: int
    mask: list[int]  # 1 where the pattern matches, per character
    units: list[RankedUnit]


@dataclass
class Start:
    prev: int  # fed before the text: yields the prediction of its first character
    h: torch.Tensor  # [L, 1, H]
    c: torch.Tensor


class InspectRunner:
    """Runs model work in a worker thread, one request at a time; a bounded number may wait."""

    def __init__(self, torch_threads: int) -> None:
        self.torch_threads = torch_threads
        self._model_lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._admitted = 0

    async def run(self, fn: Any, *args: Any) -> Any:
        with self._count_lock:
            if self._admitted > MAX_WAITING:
                raise ApiError(
                    429,
                    "the inspector is busy with other requests; retry shortly",
                    None,
                    "capacity",
                    {"Retry-After": "1"},
                )
            self._admitted += 1
        # The worker releases its slot itself: if this request is cancelled, the thread still runs.
        return await asyncio.to_thread(self._call, fn, *args)

    def _call(self, fn: Any, *args: Any) -> Any:
        try:
            with self._model_lock:
                # OpenMP thread counts are per calling thread: match the engine's (settings.torch_threads).
                torch.set_num_threads(self.torch_threads)
                with torch.inference_mode():
                    return fn(*args)
        finally:
            with self._count_lock:
                self._admitted -= 1


def runner_for(request: Request, torch_threads: int) -> InspectRunner:
    state = request.app.state
    runner = getattr(state, "inspect_runner", None)
    if runner is None:  # created on first use: one per app (the event loop is single-threaded)
        runner = state.inspect_runner = InspectRunner(torch_threads)
    return runner  # type: ignore[no-any-return]


def require_inspect(model: LoadedModel) -> None:
    if not model.has_inspect:
        raise ApiError(
            501,
            f"the loaded model {model.model_id!r} was exported before the inspector existed and has no "
            "inspect() method; re-export it from its checkpoint with `chargen export CHECKPOINT -o MODEL`",
            None,
            "inspect_unsupported",
        )


def check_text(model: LoadedModel, text: str) -> list[int]:
    if not text:
        raise ApiError(400, "text: must not be empty", "text", "empty_text")
    if len(text) > MAX_TEXT_CHARS:
        raise ApiError(
            400, f"text: {len(text)} characters, more than the limit of {MAX_TEXT_CHARS}", "text", "text_too_long"
        )
    unknown = model.unknown_chars(text)
    if unknown:
        raise unknown_characters("text", unknown)
    return model.encode(text)


def check_layer(model: LoadedModel, layer: int) -> int:
    if not 0 <= layer < model.layers:
        raise ApiError(
            400, f"layer: {layer} is not a layer of this model (0 to {model.layers - 1})", "layer", "invalid_layer"
        )
    return layer


def check_units(model: LoadedModel, units: list[int]) -> list[int]:
    if len(units) > MAX_UNITS:
        raise ApiError(400, f"units: {len(units)} units, more than the limit of {MAX_UNITS}", "units", "too_many_units")
    bad = [u for u in units if not 0 <= u < model.hidden]
    if bad:
        raise ApiError(
            400, f"units: {bad[0]} is not a unit of this model (0 to {model.hidden - 1})", "units", "invalid_unit"
        )
    return units


def compile_pattern(pattern: str) -> regex.Pattern[str]:
    if not pattern:
        raise ApiError(400, "pattern: must not be empty", "pattern", "empty_pattern")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ApiError(
            400,
            f"pattern: {len(pattern)} characters, more than the limit of {MAX_PATTERN_CHARS}",
            "pattern",
            "pattern_too_long",
        )
    try:
        # MULTILINE: ^ and $ mean start and end of a line, which is what people look for in text
        return regex.compile(pattern, regex.MULTILINE | regex.VERSION0)
    except (regex.error, ValueError, OverflowError) as err:
        raise ApiError(400, f"pattern: not a valid regular expression ({err})", "pattern", "invalid_pattern") from None


def match_mask(pattern: regex.Pattern[str], text: str) -> np.ndarray:
    """1.0 at every character inside a match of the pattern (runs in the worker thread)."""
    mask = np.zeros(len(text), dtype=np.float64)
    try:
        for match in pattern.finditer(text, timeout=PATTERN_TIMEOUT_S, concurrent=True):
            mask[match.start() : match.end()] = 1.0
    except TimeoutError:
        raise ApiError(
            400,
            f"pattern: matching took longer than {PATTERN_TIMEOUT_S} s (nested repetition?); simplify it",
            "pattern",
            "pattern_timeout",
        ) from None
    return mask


async def model_for(
    registry: ModelRegistry, store: SessionStore, requested: str | None, session_id: str | None, owner: str | None
) -> tuple[LoadedModel, StoredSession | None]:
    """The model an inspection runs on: its session's version (read only, no lease), else the one
    asked for, else the default; and the session as stored."""
    if session_id is None:
        return registry.resolve(requested).model, None
    stored = await read_owned_session(store, session_id, owner)
    return registry.for_session(stored.state, requested).model, stored


def starting_point(model: LoadedModel, stored: StoredSession | None) -> Start:
    """The state the text is read from: the session's, else the initial one."""
    if stored is None:
        zeros = torch.zeros(model.layers, 1, model.hidden)
        return Start(model.start_id, zeros, zeros.clone())
    state = state_for(model, stored.state)
    h = torch.from_numpy(state.h).unsqueeze(1)
    c = torch.from_numpy(state.c).unsqueeze(1)
    return Start(state.pending if state.pending >= 0 else model.start_id, h, c)


@dataclass
class Traces:
    logp: torch.Tensor  # [T+1, V] float64 log-probabilities; row t predicts character t
    gates: torch.Tensor  # [L, T, 3, H] after each character of the text
    cells: torch.Tensor  # [L, T, H] tanh(c) after each character of the text


def run_model(model: LoadedModel, start: Start, ids: list[int]) -> Traces:
    tokens = torch.tensor([[start.prev, *ids]], dtype=torch.int64)
    logits, gates, cells, _, _ = model.module.inspect(tokens, start.h, start.c)
    # position 0 is the previous character: its state is before the text, so it is dropped
    return Traces(
        logp=torch.log_softmax(logits[0].double(), dim=-1),
        gates=gates[:, 0, 1:],
        cells=torch.tanh(cells[:, 0, 1:]),
    )


def rounded(values: torch.Tensor | np.ndarray) -> list[float]:
    array = values.numpy() if isinstance(values, torch.Tensor) else values
    return [float(v) for v in np.round(array.astype(np.float64), DIGITS)]


def predictions(model: LoadedModel, logp_rows: torch.Tensor) -> list[list[Prediction]]:
    k = min(TOP_PREDICTIONS, logp_rows.shape[-1])
    values, indices = torch.topk(logp_rows, k, dim=-1)
    probs = np.round(values.exp().numpy(), DIGITS)
    vocab = model.vocab
    return [
        [Prediction(char=vocab[i], p=float(p)) for i, p in zip(row_ids, row_p, strict=True)]
        for row_ids, row_p in zip(indices.tolist(), probs, strict=True)
    ]


def inspect_text(
    model: LoadedModel, start: Start, text: str, ids: list[int], layer: int, units: list[int]
) -> dict[str, Any]:
    traces = run_model(model, start, ids)
    positions = torch.arange(len(ids))
    surprisal = -traces.logp[positions, torch.tensor(ids)] / LN2
    tops = predictions(model, traces.logp)
    chars = [
        CharInfo(char=ch, surprisal_bits=s, top=top)
        for ch, s, top in zip(text, rounded(surprisal), tops[:-1], strict=True)
    ]
    gates = traces.gates[layer]  # [T, 3, H]
    unit_traces = [
        UnitTrace(
            layer=layer,
            unit=u,
            cell=rounded(traces.cells[layer, :, u]),
            **{name: rounded(gates[:, g, u]) for g, name in enumerate(SIGNALS)},
        )
        for u in units
    ]
    return {
        "chars": chars,
        "next": tops[-1],
        "mean_surprisal_bits": round(float(surprisal.mean()), DIGITS),
        "units": unit_traces,
    }


def correlations(signal: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Pearson r of each column of signal [T, N] with mask [T]; 0 for a constant column."""
    x = signal - signal.mean(axis=0)
    y = mask - mask.mean()
    denom = np.sqrt((x * x).sum(axis=0) * (y * y).sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (x * y[:, None]).sum(axis=0) / denom
    return np.where(denom > 1e-12, r, 0.0)  # type: ignore[no-any-return]


def search_units(
    model: LoadedModel, start: Start, text: str, ids: list[int], body: UnitSearchRequest
) -> dict[str, Any]:
    mask = match_mask(compile_pattern(body.pattern), text)
    matched = int(mask.sum())
    if matched == 0:
        raise ApiError(400, "pattern: matches no character of text", "pattern", "pattern_matches_nothing")
    if matched == len(text):
        raise ApiError(
            400,
            "pattern: matches every character of text, so nothing can correlate with it",
            "pattern",
            "pattern_matches_all",
        )
    traces = run_model(model, start, ids)
    # [L, T, H]
    series = traces.cells if body.signal == "cell" else traces.gates[:, :, SIGNALS.index(body.signal)]
    layers = [body.layer] if body.layer is not None else list(range(model.layers))
    found: list[tuple[float, int, int]] = []
    for n in layers:
        r = correlations(series[n].double().numpy(), mask)
        found.extend((float(r[u]), n, u) for u in range(model.hidden))
    found.sort(key=lambda item: (-abs(item[0]), item[1], item[2]))
    ranked = [
        RankedUnit(layer=n, unit=u, correlation=round(r, DIGITS), values=rounded(series[n, :, u]))
        for r, n, u in found[: body.top]
    ]
    return {"matched_chars": matched, "mask": [int(v) for v in mask], "units": ranked}


def limits(model: LoadedModel) -> dict[str, Any]:
    return {
        "available": model.has_inspect,
        "layers": model.layers,
        "hidden": model.hidden,
        "max_text_chars": MAX_TEXT_CHARS,
        "max_units": MAX_UNITS,
        "max_pattern_chars": MAX_PATTERN_CHARS,
        "max_top_units": MAX_TOP_UNITS,
    }


@router.get("/inspect")
async def inspect_info(registry: RegistryDep, model: str | None = None) -> dict[str, Any]:
    """Whether the model (default: the default model) can be inspected, its shape, and the request
    limits (for the page)."""
    return limits(registry.resolve(model).model)


# declared for the OpenAPI document (main.py adds the errors every API route can give)
NOT_INSPECTABLE = {501: {"model": ErrorEnvelope, "description": "the loaded model has no inspect() method"}}


@router.post("/inspect", response_model=InspectResponse, responses=NOT_INSPECTABLE)
async def inspect(
    body: InspectRequest,
    request: Request,
    registry: RegistryDep,
    store: StoreDep,
    settings: SettingsDep,
    owner: OwnerDep,
) -> InspectResponse:
    model, stored = await model_for(registry, store, body.model, body.session_id, owner)
    require_inspect(model)
    ids = check_text(model, body.text)
    layer = check_layer(model, body.layer)
    units = check_units(model, body.units)
    start = starting_point(model, stored)
    runner = runner_for(request, settings.torch_threads)
    result = await runner.run(inspect_text, model, start, body.text, ids, layer, units)
    return InspectResponse(
        model=model.model_id, layers=model.layers, hidden=model.hidden, session_id=body.session_id, **result
    )


@router.post("/inspect/units", response_model=UnitSearchResponse, responses=NOT_INSPECTABLE)
async def find_units(
    body: UnitSearchRequest,
    request: Request,
    registry: RegistryDep,
    store: StoreDep,
    settings: SettingsDep,
    owner: OwnerDep,
) -> UnitSearchResponse:
    model, stored = await model_for(registry, store, body.model, body.session_id, owner)
    require_inspect(model)
    ids = check_text(model, body.text)
    compile_pattern(body.pattern)  # a bad pattern is a 400 before any model work
    if body.layer is not None:
        check_layer(model, body.layer)
    start = starting_point(model, stored)
    runner = runner_for(request, settings.torch_threads)
    result = await runner.run(search_units, model, start, body.text, ids, body)
    return UnitSearchResponse(
        model=model.model_id, session_id=body.session_id, pattern=body.pattern, signal=body.signal, **result
    )
